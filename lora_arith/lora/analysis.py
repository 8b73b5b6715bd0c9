"""Read-only views of adapters: per-module norms, cosine similarities and interference, from the factors."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable, Sequence

import torch

from lora_arith.lora.adapter_io import AdapterFile, open_adapter
from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.numerics import finite_number, require_count
from lora_arith.lora.factors import frobenius_norm, inner, projected_energy, single_threaded, subspaces

__all__ = ["Similarity", "similarity", "module_norms", "ModuleOverlap", "PairInterference", "interference"]


@dataclass(frozen=True)
class Similarity:
    """Cosine similarities between adapters' deltas.

    Attributes:
        labels: one label per adapter, in order.
        overall: ``(n, n)`` cosines of the whole adapters, every module's delta flattened
            into one vector (a module missing from an adapter counts as zero). A cosine with a
            delta that is zero (an untrained adapter: PEFT starts ``B`` at zero) is undefined: NaN.
        by_module_type: the same, restricted to each module type (``q_proj``, …).
    """

    labels: list[str]
    overall: torch.Tensor
    by_module_type: dict[str, torch.Tensor]

    def __repr__(self) -> str:
        """One line: the overall cosines when there are at most four adapters, else their shape."""
        n = len(self.labels)
        shown = [[round(float(v), 4) for v in row] for row in self.overall] if n <= 4 else f"<{n}×{n} cosines>"
        return f"Similarity(labels={self.labels}, overall={shown}, module_types={sorted(self.by_module_type)})"


def _cosines(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    return torch.where(denominator > 0, gram / denominator.clamp_min(1e-300), torch.full_like(gram, math.nan))


def _opened(adapters: Sequence[AdapterFile | str | os.PathLike[str]]) -> list[AdapterFile]:
    """The adapters, opened where given as paths (or Hub references)."""
    if isinstance(adapters, (str, os.PathLike, AdapterFile)) or not isinstance(adapters, Iterable):
        raise LoraArithError(f"give a list of adapters (paths or opened adapters), not {adapters!r}")
    adapters = list(adapters)
    if len(adapters) < 2:
        raise LoraArithError(f"give at least two adapters to compare, not {len(adapters)}")
    return [adapter if isinstance(adapter, AdapterFile) else open_adapter(adapter) for adapter in adapters]


def _shared_modules(adapters: Sequence[AdapterFile]) -> list[str]:
    """Every module of the adapters, sorted; a module whose shape differs between them (adapters
    for different bases) is an error naming it."""
    names = sorted({name for adapter in adapters for name in adapter.modules})
    for name in names:
        shapes = {a.modules[name].shape for a in adapters if name in a.modules}
        if len(shapes) > 1:
            listing = ", ".join(f"{a.label} {a.modules[name].shape}" for a in adapters if name in a.modules)
            raise LoraArithError(
                f"module {name} has different shapes in the adapters ({listing}); are they for the same base?"
            )
    return names


def similarity(adapters: Sequence[AdapterFile | str | os.PathLike[str]], progress: bool = False) -> Similarity:
    """Cosine similarity matrices of the adapters' deltas (opened adapters or paths), computed
    module by module from the factors. Returns a :class:`Similarity`; raises
    :class:`LoraArithError` for fewer than two adapters or one that cannot be read."""
    adapters = _opened(adapters)
    count = len(adapters)
    names = _shared_modules(adapters)
    overall = torch.zeros(count, count, dtype=torch.float64)
    by_type: dict[str, torch.Tensor] = {}
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


@dataclass(frozen=True)
class ModuleOverlap:
    """One module's part in the overlap of two adapters.

    Attributes:
        name: the module.
        contribution: ``⟨X_m, Y_m⟩ / (‖X‖ ‖Y‖)``, this module's term of the overall cosine
            (the terms of all modules add up to it).
        cosine: the cosine of the two deltas within the module alone.
    """

    name: str
    contribution: float
    cosine: float


@dataclass(frozen=True)
class PairInterference:
    """How two adapters' deltas ``X`` (first) and ``Y`` (second) overlap.

    Energy shares are ``Σ_m ‖P_m X_m‖² / Σ_m ‖X_m‖²`` over the modules ``m``, where ``P_m``
    projects onto ``Y_m``'s column space (``column_share``; acting on the output side) or row
    space (``row_share``; the input side). Each share is a pair ``(X in Y's space, Y in X's space)``.
    ``chance_*`` are the same shares expected for random subspaces of the same ranks
    (``rank / dimension`` per module, energy-weighted), the level that means "no overlap".

    Attributes:
        first, second: the labels.
        cosine: the overall cosine (as in :func:`similarity`).
        cosine_by_module_type: the cosine within each module type.
        column_share, row_share: the energy shares described above.
        chance_column, chance_row: their chance levels.
        top_modules: the modules with the largest ``|contribution|``, largest first.

    A figure that involves a delta that is zero (overall, in a module type or in a module: an
    untrained adapter) is undefined: NaN here, ``None`` in :meth:`to_dict`.
    """

    first: str
    second: str
    cosine: float
    cosine_by_module_type: dict[str, float] = field(repr=False)  # the details stay off the summary
    column_share: tuple[float, float]
    row_share: tuple[float, float]
    chance_column: tuple[float, float]
    chance_row: tuple[float, float]
    top_modules: list[ModuleOverlap] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON values: an undefined one (NaN) is ``None``."""
        return {
            "first": self.first,
            "second": self.second,
            "cosine": finite_number(self.cosine),
            "cosine_by_module_type": {t: finite_number(c) for t, c in self.cosine_by_module_type.items()},
            "column_share": [finite_number(v) for v in self.column_share],
            "row_share": [finite_number(v) for v in self.row_share],
            "chance_column": [finite_number(v) for v in self.chance_column],
            "chance_row": [finite_number(v) for v in self.chance_row],
            "top_modules": [
                {"name": m.name, "contribution": finite_number(m.contribution), "cosine": finite_number(m.cosine)}
                for m in self.top_modules
            ],
        }


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN (undefined) where a zero delta makes the denominator zero."""
    return numerator / denominator if denominator > 0 else math.nan


def interference(
    adapters: Sequence[AdapterFile | str | os.PathLike[str]], top: int = 5, progress: bool = False
) -> list[PairInterference]:
    """For each pair of adapters (opened adapters or paths): cosines (overall, per module type), the share of each one's
    energy inside the other's column and row spaces, and the ``top`` modules where they overlap
    most. Everything comes from the factors (QR of ``B`` and ``Aᵀ`` and an SVD of the small core
    per module, see :func:`lora_arith.lora.factors.subspaces`); no dense ``out × in`` matrix is formed.
    Returns one :class:`PairInterference` per pair; raises :class:`LoraArithError` for fewer than
    two adapters, one that cannot be read, or a ``top`` that is not a whole number.
    """
    require_count(top, "top", 0)
    adapters = _opened(adapters)
    count = len(adapters)
    names = _shared_modules(adapters)
    pairs = list(combinations(range(count), 2))
    energy = [0.0] * count
    cross = {pair: 0.0 for pair in pairs}
    type_energy: dict[str, list[float]] = {}
    type_cross: dict[str, dict[tuple[int, int], float]] = {}
    # [pair][direction]: projected energy of one adapter in the other's spaces, and its chance level
    column = {pair: [0.0, 0.0] for pair in pairs}
    row = {pair: [0.0, 0.0] for pair in pairs}
    chance_column = {pair: [0.0, 0.0] for pair in pairs}
    chance_row = {pair: [0.0, 0.0] for pair in pairs}
    per_module: dict[tuple[int, int], list[tuple[str, float, float]]] = {pair: [] for pair in pairs}
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="interference", unit="module", leave=False)
    with single_threaded():
        for name in names:
            deltas = {i: a.delta(name) for i, a in enumerate(adapters) if name in a.modules}
            own = {i: inner(d, d) for i, d in deltas.items()}
            spaces = {i: subspaces(d) for i, d in deltas.items()}
            module_type = name.rsplit(".", 1)[-1]
            t_energy = type_energy.setdefault(module_type, [0.0] * count)
            t_cross = type_cross.setdefault(module_type, {pair: 0.0 for pair in pairs})
            for i, value in own.items():
                energy[i] += value
                t_energy[i] += value
            for i, j in pairs:
                if i not in deltas or j not in deltas:
                    continue
                product = inner(deltas[i], deltas[j])
                cross[(i, j)] += product
                t_cross[(i, j)] += product
                per_module[(i, j)].append((name, product, _ratio(product, (own[i] * own[j]) ** 0.5)))
                out_features, in_features = deltas[i].shape
                for direction, (x, y) in enumerate(((i, j), (j, i))):
                    column[(i, j)][direction] += projected_energy(deltas[x], spaces[y][0], "column")
                    row[(i, j)][direction] += projected_energy(deltas[x], spaces[y][1], "row")
                    chance_column[(i, j)][direction] += own[x] * spaces[y][0].shape[1] / out_features
                    chance_row[(i, j)][direction] += own[x] * spaces[y][1].shape[1] / in_features
    result = []
    for i, j in pairs:
        scale = (energy[i] * energy[j]) ** 0.5
        shares = [
            tuple(_ratio(values[d], energy[(i, j)[d]]) for d in (0, 1))
            for values in (column[(i, j)], row[(i, j)], chance_column[(i, j)], chance_row[(i, j)])
        ]
        ranked = sorted(per_module[(i, j)], key=lambda item: -abs(item[1]))[:top]
        result.append(
            PairInterference(
                first=adapters[i].label,
                second=adapters[j].label,
                cosine=_ratio(cross[(i, j)], scale),
                cosine_by_module_type={
                    t: _ratio(type_cross[t][(i, j)], (type_energy[t][i] * type_energy[t][j]) ** 0.5)
                    for t in sorted(type_cross)
                },
                column_share=shares[0],
                row_share=shares[1],
                chance_column=shares[2],
                chance_row=shares[3],
                top_modules=[ModuleOverlap(n, _ratio(p, scale), c) for n, p, c in ranked],
            )
        )
    return result
