"""Read-only views of adapters: per-module norms and cosine similarities, from the factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lora_arith.adapter_io import AdapterFile
from lora_arith.errors import LoraArithError
from lora_arith.factors import frobenius_norm, inner, single_threaded


@dataclass(frozen=True)
class Similarity:
    """Cosine similarities between adapters' deltas.

    Attributes:
        labels: one label per adapter, in order.
        overall: ``(n, n)`` cosines of the whole adapters, every module's delta flattened
            into one vector (a module missing from an adapter counts as zero).
        by_module_type: the same, restricted to each module type (``q_proj``, …).
    """

    labels: list[str]
    overall: torch.Tensor
    by_module_type: dict[str, torch.Tensor]


def _cosines(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    return torch.where(denominator > 0, gram / denominator.clamp_min(1e-300), torch.zeros_like(gram))


def similarity(adapters: Sequence[AdapterFile], progress: bool = False) -> Similarity:
    """Cosine similarity matrices of the adapters' deltas, computed module by module from the factors."""
    count = len(adapters)
    names = sorted({name for adapter in adapters for name in adapter.modules})
    overall = torch.zeros(count, count, dtype=torch.float64)
    by_type: dict[str, torch.Tensor] = {}
    for name in names:
        shapes = {a.modules[name].shape for a in adapters if name in a.modules}
        if len(shapes) > 1:
            listing = ", ".join(f"{a.label} {a.modules[name].shape}" for a in adapters if name in a.modules)
            raise LoraArithError(
                f"module {name} has different shapes in the adapters ({listing}); are they for the same base?"
            )
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="similarity", unit="module", leave=False)
    with single_threaded():
        for name in names:
            deltas = {i: a.delta(name) for i, a in enumerate(adapters) if name in a.modules}
            gram = torch.zeros(count, count, dtype=torch.float64)
            for i in deltas:
                for j in deltas:
                    if j >= i:
                        gram[i, j] = gram[j, i] = inner(deltas[i], deltas[j])
            overall += gram
            module_type = name.rsplit(".", 1)[-1]
            by_type[module_type] = by_type.get(module_type, torch.zeros_like(gram)) + gram
    return Similarity(
        labels=[a.label for a in adapters],
        overall=_cosines(overall),
        by_module_type={t: _cosines(g) for t, g in sorted(by_type.items())},
    )


def module_norms(adapter: AdapterFile) -> dict[str, float]:
    """The Frobenius norm of each module's delta (scaling included)."""
    with single_threaded():
        return {name: frobenius_norm(adapter.delta(name)) for name in adapter.modules}
