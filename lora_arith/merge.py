"""Writing a full model with weighted adapter deltas merged into the base weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from lora_arith.atomic import atomic_output, check_output, removed_on_signal
from lora_arith.errors import LoraArithError

REQUANTIZE_WARNING = (
    "merging into a 4-bit model rounds every merged weight back to NF4, whose steps (about 1/8 of each "
    "64-weight block's largest value) are far larger than a typical LoRA delta, so most of the preference "
    "is rounded away; pass --requantize to accept that loss, or write a bf16/fp32 model instead"
)


def merge_adapters(
    base: str | None,
    specs: Sequence[str],
    output: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    quantize_4bit: bool = False,
    requantize: bool = False,
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Fold ``Σ wᵢ ΔWᵢ`` of the adapter specs (``PATH[:WEIGHT]``) into the base and save the model
    with its tokenizer to ``output``, loadable with ``AutoModelForCausalLM.from_pretrained``.

    The merge is done in full precision. ``quantize_4bit`` then stores the result in NF4, which
    is refused unless ``requantize`` acknowledges the rounding loss. ``device`` is where the base
    is loaded and the merge computed.
    """
    import torch

    from lora_arith.adapter_io import DTYPES, adapter_sources
    from lora_arith.base_model import base_sources, load_base
    from lora_arith.mixing import PreferenceMixer, named_specs

    if quantize_4bit and not requantize:
        raise LoraArithError(REQUANTIZE_WARNING)
    if not specs:
        raise LoraArithError("give at least one --adapter to merge")
    named = named_specs(specs)
    inputs = base_sources(base) + [p for s in named.values() for p in adapter_sources(s.path)]
    output = check_output(output, force=force, inputs=inputs, kind="model")
    model, tokenizer = load_base(base, quantize_4bit=False, device=device)
    mixer = PreferenceMixer(model, {n: s.path for n, s in named.items()}, tokenizer=tokenizer)
    mixer.set(**{n: s.weight for n, s in named.items()})
    merged = mixer.merged_model().to(DTYPES[dtype] if not quantize_4bit else torch.float32)
    with atomic_output(output) as temporary:
        if quantize_4bit:
            _save_requantized(merged, tokenizer, temporary)
        else:
            merged.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
    return output.path


def _save_requantized(model, tokenizer, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Beside the output's temporary, named after it, so a kill leaves nothing unrecognisable behind.
    with removed_on_signal(folder.with_name(folder.name + ".full-precision")) as full_precision:
        model.save_pretrained(full_precision)
        quantized = AutoModelForCausalLM.from_pretrained(
            full_precision,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
        )
        quantized.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
