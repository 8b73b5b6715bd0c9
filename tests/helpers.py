"""Helpers shared by the test files (import them ``from helpers``): tiny model settings, random
PEFT adapters, PEFT's own deltas, dense reference models, logits and preference pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(path: Path):
    """Load a saved tiny base in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_seeds = itertools.count(1)


def make_adapter(base: Path, out: Path, *, seed: int | None = None, **lora_kwargs: Any) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B for the tiny base at ``base``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(next(_seeds) if seed is None else seed)
    kwargs: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    kwargs.update(lora_kwargs)
    model = get_peft_model(load_base(base), LoraConfig(**kwargs))
    with torch.no_grad():  # make B visibly non-zero and A of a similar scale
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(out, save_embedding_layers=False)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config))
    return out


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Each LoRA module's delta as PEFT itself computes it (``get_delta_weight``), in the
    orientation of the base weight. Independent of lora_arith's reader."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_base(base), adapter)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
            deltas[name] = module.get_delta_weight("default").detach().float()
    return deltas


def dense_patched_model(base: Path, weighted_adapters: list[tuple[Path, float]]):
    """A copy of the base whose weights are patched densely: W + Σ wᵢ ΔWᵢ."""
    model = load_base(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for adapter, weight in weighted_adapters:
            for name, delta in peft_deltas(base, adapter).items():
                modules[name].weight += weight * delta
    return model


def logits(model, seed: int = 0) -> torch.Tensor:
    """fp32 CPU logits of a model (plain or PEFT, on any device) on a fixed random batch of token ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 12), generator=generator)
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


PAIRS = [
    {"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast, then bake.", "rejected": "I can't help."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": "Paris.",
        "rejected": "Sorry, I won't answer that.",
    },
    {"prompt": "Tell me a joke about cats.", "chosen": "Why did the cat sit on the computer?", "rejected": "No."},
    {"prompt": "Explain photosynthesis.", "chosen": "Plants turn light into sugar.", "rejected": "I'm sorry."},
]
"""Four preference pairs (one with chat messages) for tiny training runs."""
