"""Export for serving engines. vLLM wants one LoRA rank for every module, from a fixed set,
``lora_alpha == r`` and a plain config; this module rewrites any adapter into that shape."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_arith.adapter_io import LINEAR, factor_tensors, open_adapter, save_adapter
from lora_arith.errors import LoraArithError
from lora_arith.factors import LowRankDelta, compress, single_threaded

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM accepts (``--max-lora-rank`` must be at least the chosen one)."""


@dataclass(frozen=True)
class Export:
    """What :func:`export_for_vllm` wrote.

    Attributes:
        path: the written adapter folder.
        rank: the uniform rank of every module.
        padded: modules whose rank was raised with zero factors (their delta is unchanged).
        compressed: modules whose rank was reduced by optimal SVD truncation, with the relative error of each.
    """

    path: Path
    rank: int
    padded: list[str]
    compressed: dict[str, float]


def choose_rank(needed: int, max_rank: int | None) -> int:
    """The smallest vLLM rank ≥ ``needed``, or the largest one ≤ ``max_rank`` when that is lower."""
    if max_rank is not None and max_rank < VLLM_RANKS[0]:
        raise LoraArithError(f"--max-rank must be at least {VLLM_RANKS[0]}, vLLM's smallest rank")
    fitting = [r for r in VLLM_RANKS if r >= needed]
    rank = fitting[0] if fitting else VLLM_RANKS[-1]
    if max_rank is not None and rank > max_rank:
        rank = max(r for r in VLLM_RANKS if r <= max_rank)
    return rank


def _pad(delta: LowRankDelta, rank: int) -> LowRankDelta:
    extra = rank - delta.rank
    return LowRankDelta(
        torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1),
        torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0),
    )


def export_for_vllm(
    adapter: str | os.PathLike[str], output: str | os.PathLike[str], *, max_rank: int | None = None, force: bool = False
) -> Export:
    """Write ``adapter`` as a vLLM-ready PEFT folder at ``output``.

    Every module gets the same rank from :data:`VLLM_RANKS`: the smallest that holds the
    largest module rank, capped by ``max_rank``. Smaller modules are padded with zeros
    (exact); larger ones are compressed optimally (reported). The scaling is folded into the
    factors, so ``lora_alpha == r``; the config has no ``rank_pattern``/``alpha_pattern``.
    """
    if Path(output).suffix == ".safetensors":
        raise LoraArithError("vLLM loads adapter folders: give -o a folder name, not a .safetensors file")
    opened = open_adapter(adapter)
    embedding = [name for name, info in opened.modules.items() if info.kind != LINEAR]
    if embedding:
        raise LoraArithError(f"vLLM export supports linear modules only; {embedding[0]} is an embedding LoRA")
    if opened.config.get("fan_in_fan_out"):
        raise LoraArithError("vLLM export needs nn.Linear layers; this adapter has fan_in_fan_out=True (Conv1D)")
    rank = choose_rank(max(info.rank for info in opened.modules.values()), max_rank)

    deltas: dict[str, LowRankDelta] = {}
    padded: list[str] = []
    compressed: dict[str, float] = {}
    with single_threaded():
        for name, info in opened.modules.items():
            delta = opened.delta(name)
            if info.rank > rank:
                result = compress(delta, rank=min(rank, min(info.shape)))
                delta, compressed[name] = result.delta, result.relative_error
            if delta.rank < rank:
                delta = _pad(delta, rank)
                padded.append(name)
            deltas[name] = delta

    config = {
        "peft_type": "LORA",
        "task_type": opened.config.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": opened.base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted({info.module_type for info in opened.modules.values()}),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
    hint = "its scaling, folded into the factors, does not fit the adapter's dtype; convert it to fp32 first"
    tensors = factor_tensors(deltas, {name: LINEAR for name in deltas}, opened.dtype, hint)
    recipe = {
        "tool": "lora-arith",
        "method": "export-vllm",
        "rank": rank,
        "inputs": [{"path": str(adapter), "weight": 1.0, "sha256": opened.sha256}],
    }
    path = save_adapter(output, tensors, config, recipe, training=opened.training, force=force, inputs=opened.sources)
    return Export(path, rank, padded, compressed)
