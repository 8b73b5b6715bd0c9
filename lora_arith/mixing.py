"""Test-time mixing: one base model, several adapters attached, each with its own weight η.

All adapters stay active on PEFT's LoRA layers; changing the mix only rescales each
layer's per-adapter ``scaling`` (``η · α / r``), which takes milliseconds — nothing is
re-merged or reloaded. The output of the model is then ``W x + Σ ηᵢ ΔWᵢ x``, exactly what
``lora-arith combine`` with the same weights produces.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from lora_arith.adapter_io import open_adapter
from lora_arith.errors import LoraArithError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def lora_config_from(config: Mapping[str, Any]):
    """A ``peft.LoraConfig`` from a saved config dict, ignoring keys this PEFT version lacks."""
    from peft import LoraConfig

    known = {field.name for field in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping")}
    kwargs["inference_mode"] = True
    return LoraConfig(**kwargs)


def attach_adapter(model, name: str, path: str | Path):
    """Attach the adapter at ``path`` (any form :func:`open_adapter` reads) to ``model`` as
    ``name``. ``model`` may be a plain transformers model (it is wrapped) or a PeftModel.
    Returns the PeftModel."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    opened = open_adapter(path)
    config = lora_config_from(opened.config)
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise LoraArithError(f"an adapter named {name!r} is already attached")
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    state = {k: v for k, v in load_file(opened.weights_path).items() if k not in opened.ignored_keys}
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()}, adapter_name=name)
    unmatched = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unmatched:
        raise LoraArithError(f"{path}: {len(unmatched)} tensors match no module of the base, e.g. {unmatched[0]}")
    model.eval()
    return model


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


class PreferenceMixer:
    """A base model with named adapters attached, mixed at run time with per-adapter weights.

    Example::

        mixer = PreferenceMixer(None, {"helpful": "adapters/helpful",
                                       "harmless": "adapters/harmless"})
        mixer.set(helpful=0.8, harmless=0.5)
        mixer.generate(["How do I kill a Python process?"])

    Args:
        base: a base model id or directory (``None`` = the embedded default), or an already
            loaded transformers model (then ``tokenizer`` is required).
        adapters: name → adapter path (may be empty: then this is the plain base).
        tokenizer: the tokenizer, when ``base`` is a loaded model.
        quantize_4bit: load the base in NF4 (bitsandbytes).
        device: ``"cpu"``/``"cuda"``; default: CUDA when available.

    Every adapter starts with weight 1.0.
    """

    def __init__(
        self,
        base: "str | None | PreTrainedModel",
        adapters: Mapping[str, str | Path],
        *,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        quantize_4bit: bool = False,
        device: str | None = None,
    ) -> None:
        if base is None or isinstance(base, (str, Path)):
            from lora_arith.base_model import load_base

            model, tokenizer = load_base(
                None if base is None else str(base), quantize_4bit=quantize_4bit, device=device
            )
        elif tokenizer is None:
            raise LoraArithError("a loaded base model needs its tokenizer")
        else:
            model = base
        self.quantized = getattr(model, "hf_quantizer", None) is not None
        for name, path in adapters.items():
            model = attach_adapter(model, name, path)
        self.model = model
        self.tokenizer = tokenizer
        self.names = list(adapters)
        if self.names:
            self.model.base_model.set_adapter(self.names, inference_mode=True)
        self.weights: dict[str, float] = {name: 1.0 for name in self.names}
        self._lora_layers = _lora_layers(self.model)

    def set(self, **weights: float) -> dict[str, float]:
        """Set the weights η of the named adapters (others keep theirs); returns the full mix."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise LoraArithError(f"no adapter named {', '.join(unknown)}; attached: {', '.join(self.names)}")
        self.weights.update({name: float(value) for name, value in weights.items()})
        for layer in self._lora_layers:
            for name in weights:
                layer.set_scale(name, self.weights[name])
        return dict(self.weights)

    def generate(self, prompts: Sequence[Any], **options: Any) -> list[str]:
        """Generate completions for ``prompts`` with the current mix (see :func:`lora_arith.generation.generate`)."""
        from lora_arith.generation import generate

        return generate(self.model, self.tokenizer, prompts, **options)

    @torch.no_grad()
    def merged_model(self) -> "PreTrainedModel":
        """The base with the current mix folded into its weights (a plain transformers model).

        Faster at inference; only for a base that is not quantized. This unloads the
        adapters: the mixer cannot be used afterwards.
        """
        if not self.names:
            return self.model
        if self.quantized:
            raise LoraArithError(
                "cannot fold adapters into a 4-bit base without rounding; load it with quantize_4bit=False"
            )
        return self.model.merge_and_unload(adapter_names=self.names)


def adapter_names(specs) -> dict[str, Any]:
    """Name each parsed ``PATH[:WEIGHT]`` spec by its file or folder stem (``helpful``,
    ``harmless``…), adding ``-2``, ``-3`` to repeated stems. Returns name → spec."""
    named: dict[str, Any] = {}
    for spec in specs:
        stem = Path(spec.path.rstrip("/")).name.removesuffix(".safetensors") or "adapter"
        name, counter = stem, 2
        while name in named:
            name, counter = f"{stem}-{counter}", counter + 1
        named[name] = spec
    return named
