"""Weighted combination of adapters, module by module, on the low-rank factors.

``combine`` opens every input lazily, checks them against each other (base model,
shapes, ranks), then for each module reads only that module's factors from each input,
sums them exactly by concatenation and, with ``method="svd"``, compresses the sum
optimally. Peak memory stays near the largest module plus the output.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter, deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from lora_arith.lora.adapter_io import (
    DTYPES,
    AdapterFile,
    ModuleInfo,
    factor_tensors,
    open_adapter,
    rank_range,
    save_adapter,
    unit_scaling_config,
)
from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.lora.factors import LowRankDelta, compress, single_threaded, weighted_sum
from lora_arith.lora.numerics import DTYPE_HINT, finite_number, require_count, require_finite
from lora_arith._internal.privacy import public_name
from lora_arith._internal.provenance import METHODS, Recipe, RecipeInput
from lora_arith.lora.specs import AdapterSpec, require_specs

__all__ = ["ModuleResult", "Combination", "combine", "extract", "extract_specs", "check_options", "checked_dtype"]

# Config fields that say which modules are targeted; carried over when all inputs agree.
_TARGETING_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass(frozen=True)
class ModuleResult:
    """How one output module was made."""

    name: str
    rank: int
    inputs_present: int
    relative_error: float | None = None


@dataclass
class Combination:
    """The combined adapter, held in memory until :meth:`save`.

    ``training`` carries the inputs' recorded training summaries (by input path) into the output;
    ``sources`` are the local files and folders the inputs were read from.
    """

    deltas: dict[str, LowRankDelta]
    kinds: dict[str, str]
    config: dict[str, Any]
    recipe: Recipe
    dtype: torch.dtype
    modules: list[ModuleResult] = field(default_factory=list)
    input_count: int = 0
    training: dict[str, Any] | None = None
    sources: list[Path] = field(default_factory=list, repr=False)
    """The local files and folders the inputs were read from; an output never touches them."""

    def __repr__(self) -> str:  # not every module's factors: they would fill a notebook cell
        inputs = [f"{entry.path}:{entry.weight:g}" for entry in self.recipe.inputs]  # a name may repeat
        ranks = rank_range(delta.rank for delta in self.deltas.values())
        return (
            f"Combination(inputs={inputs}, method={self.recipe.method!r}, modules={len(self.deltas)}, "
            f"rank={ranks}, dtype={self.dtype})"
        )

    @property
    def partial_modules(self) -> list[str]:
        """Modules that only some inputs have (the others contribute zero)."""
        return [m.name for m in self.modules if m.inputs_present < self.input_count]

    @property
    def max_relative_error(self) -> float | None:
        """The largest per-module relative error of the compression, or None for ``cat``."""
        errors = [m.relative_error for m in self.modules if m.relative_error is not None]
        return max(errors) if errors else None

    def tensors(self, dtype: torch.dtype | str | None = None, hint: str | None = None) -> dict[str, torch.Tensor]:
        """The PEFT state-dict tensors, in ``dtype`` (a torch dtype or ``"fp32"``/``"bf16"``/``"fp16"``;
        default: the inputs' dtype); ``hint`` is what an overflow error suggests (default: another
        ``--dtype``)."""
        return factor_tensors(self.deltas, self.kinds, checked_dtype(dtype) or self.dtype, hint or DTYPE_HINT)

    def save(self, path: str | os.PathLike[str], *, force: bool = False, dtype: torch.dtype | str | None = None) -> Path:
        """Write a PEFT directory, or the single-file form if ``path`` ends in ``.safetensors``, in
        ``dtype`` (as :meth:`tensors`).
        ``path`` may be an :class:`~lora_arith._internal.atomic.Output` already checked; a plain path is
        checked (once, when it is written) against :attr:`sources`."""
        return save_adapter(
            path,
            self.tensors(dtype),
            self.config,
            self.recipe.to_dict(),
            training=self.training,
            force=force,
            inputs=self.sources,
        )


def _check_bases(adapters: Sequence[AdapterFile], allow_mismatch: bool) -> str | None:
    # a local base is recorded by folder name (older adapters: by absolute path); compare those alike
    bases = {public_name(a.base_model) for a in adapters if a.base_model}
    if len(bases) > 1 and not allow_mismatch:
        listing = ", ".join(f"{a.label} → {a.base_model}" for a in adapters if a.base_model)
        raise OptionError(
            "allow_base_mismatch",
            "adapters are for different base models ({listing}); pass {} to combine anyway",
            listing=listing,
        )
    return next((a.base_model for a in adapters if a.base_model), None)


def _module_union(adapters: Sequence[AdapterFile]) -> dict[str, ModuleInfo]:
    union: dict[str, tuple[ModuleInfo, str]] = {}
    for adapter in adapters:
        for name, info in adapter.modules.items():
            if name not in union:
                union[name] = (info, adapter.label)
                continue
            seen, label = union[name]
            if (seen.shape, seen.kind) != (info.shape, info.kind):
                raise LoraArithError(
                    f"module {name} has shape {seen.shape} in {label} but {info.shape} in {adapter.label}"
                )
    return {name: union[name][0] for name in sorted(union)}


def _targeted(module: str, targets: Iterable[str]) -> bool:
    """Whether PEFT's list matching (``name == t`` or ``name.endswith("." + t)``) targets ``module``."""
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _target_modules(adapters: Sequence[AdapterFile], modules: Iterable[str]) -> Any:
    """``target_modules`` for the output: the inputs' lists joined (or their common regex), plus
    the type of every module that they do not cover, so that PEFT can load every tensor. A
    missing or empty ``target_modules`` is thus derived from the tensors."""
    modules = list(modules)
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) and t == targets[0] for t in targets) and targets[0]:
        return targets[0]
    listed = {str(name) for t in targets if isinstance(t, (list, tuple)) for name in t}
    if not all(isinstance(t, (list, tuple)) or not t for t in targets):
        listed = set()  # regexes that disagree: name the module types instead
    missing = {name.rsplit(".", 1)[-1] for name in modules if not _targeted(name, listed)}
    return sorted(listed | missing)


def _output_template(adapters: Sequence[AdapterFile], base_model: str | None, modules: Iterable[str]) -> dict[str, Any]:
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fan_in_fan_out) > 1:
        raise LoraArithError("the adapters disagree on fan_in_fan_out, so they are not for the same base layers")
    template: dict[str, Any] = {
        "base_model_name_or_path": base_model,
        "task_type": adapters[0].config.get("task_type"),
        "target_modules": _target_modules(adapters, modules),
        "fan_in_fan_out": fan_in_fan_out.pop(),
    }
    for name in _TARGETING_FIELDS + ("revision",):
        values = [a.config.get(name) for a in adapters]
        if values[0] is not None and all(v == values[0] for v in values):
            template[name] = values[0]
    return template


def checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """An output dtype given by name (``"fp32"``, ``"bf16"``, ``"fp16"``) or as one of those torch
    dtypes, as a torch dtype (``None`` stays ``None``); anything else is an error, as an adapter of
    another dtype could not be opened again."""
    if dtype is None:
        return None
    found = DTYPES.get(dtype) if isinstance(dtype, str) else dtype if dtype in DTYPES.values() else None
    if found is None:
        raise OptionError("dtype", "{} {dtype!r} is not one of {choices}", dtype=dtype, choices=", ".join(DTYPES))
    return found


def check_options(
    method: str, rank: int | None = None, energy: float | None = None, dtype: torch.dtype | str | None = None
) -> None:
    """:func:`combine`'s ``method``, ``rank``, ``energy`` and ``dtype``, checked before any adapter
    is read (and by :func:`~lora_arith.training.vector.train_vector` before either DPO run)."""
    if method not in METHODS:
        raise OptionError("method", "{} {method!r} is not one of {choices}", method=method, choices=", ".join(METHODS))
    given = tuple(name for name, value in (("rank", rank), ("energy", energy)) if value is not None)
    if method == "cat" and given:
        verb = "needs" if len(given) == 1 else "need"
        raise OptionError((*given, "method"), " and ".join(["{}"] * len(given)) + f" {verb} {{}} svd")
    if len(given) == 2:
        raise OptionError(("rank", "energy"), "give {} or {}, not both")
    if rank is not None:
        require_count(rank, "rank")
    if energy is not None and (finite_number(energy) is None or not 0.0 < energy <= 1.0):
        raise OptionError("energy", "{} must be in (0, 1], got {energy!r}", energy=energy)
    checked_dtype(dtype)


def _output_dtype(adapters: Sequence[AdapterFile], dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is not None:
        return checked_dtype(dtype)
    dtypes = Counter(a.dtype for a in adapters)
    return max(dtypes, key=lambda d: (torch.finfo(d).bits, dtypes[d]))


def _check_rank(modules: dict[str, ModuleInfo], rank: int | None) -> None:
    if rank is None:
        return
    for name, info in modules.items():
        if rank > min(info.shape):
            raise OptionError(
                "rank",
                "{} {rank} is larger than module {name} allows (its delta is {rows}×{cols})",
                rank=rank,
                name=name,
                rows=info.shape[0],
                cols=info.shape[1],
            )


READ_AHEAD = 2
"""How many modules :func:`combine` works on ahead of the one it collects."""

_T = TypeVar("_T")


def _summed(adapters: Sequence[AdapterFile], weights: Sequence[float], name: str) -> tuple[str, int, LowRankDelta]:
    """``(name, inputs that have it, their exact weighted sum)`` for module ``name``, read from disk."""
    present = [(a, w) for a, w in zip(adapters, weights) if name in a.modules]
    summed = weighted_sum([a.delta(name) for a, _ in present], [w for _, w in present])
    require_finite(summed.B, f"module {name}", "the weighted sum overflows fp32; the weights are too large")
    return name, len(present), summed


def _module_result(
    adapters: Sequence[AdapterFile],
    weights: Sequence[float],
    name: str,
    method: str,
    rank: int | None,
    energy: float | None,
) -> tuple[LowRankDelta, ModuleResult]:
    """Module ``name`` of the output: the exact weighted sum (``cat``) or its optimal compression to
    ``rank`` or ``energy`` (``svd``)."""
    name, present, summed = _summed(adapters, weights, name)
    if method == "cat":
        return summed, ModuleResult(name, summed.rank, present)
    compressed = compress(summed, rank=rank, energy=energy)
    for factor in (compressed.delta.B, compressed.delta.A):
        require_finite(factor, f"module {name}", "the SVD overflowed fp32; the weights are too large")
    return compressed.delta, ModuleResult(name, compressed.rank, present, compressed.relative_error)


def _in_order(pool: Executor, work: Callable[[str], _T], names: Sequence[str]) -> Iterator[_T]:
    """``work(name)`` for every name, in order, each computed in ``pool`` up to :data:`READ_AHEAD`
    modules before it is yielded (memory stays bounded by a few modules). An error is raised when
    its module's turn comes, so the first failing module is reported, as when working in turn."""
    pending: deque[Future] = deque()
    upcoming = iter(names)

    def submit_ahead() -> None:  # the module in hand, plus READ_AHEAD after it
        for name in itertools.islice(upcoming, READ_AHEAD + 1 - len(pending)):
            pending.append(pool.submit(work, name))

    try:
        submit_ahead()
        while pending:
            result = pending.popleft().result()
            yield result
            submit_ahead()
    finally:
        for future in pending:  # on an error (or an abandoned loop): do not start more
            future.cancel()


def combine(
    specs: Iterable[AdapterSpec],
    *,
    method: str = "cat",
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype | str | None = None,
    allow_base_mismatch: bool = False,
    progress: bool = False,
) -> Combination:
    """Combine adapters into ``Σ wᵢ ΔWᵢ`` per module.

    Args:
        specs: parsed ``AdapterSpec`` objects (text is parsed by :func:`lora_arith.lora.specs.parse_specs`).
        method: ``"cat"`` (exact; ranks add up) or ``"svd"`` (optimal rank reduction).
        rank: with ``svd``, the rank of every output module. Defaults to the largest input rank.
        energy: with ``svd``, instead of ``rank``: the smallest per-module rank keeping this
            fraction of the squared Frobenius norm.
        dtype: output dtype (``torch.dtype`` or ``"fp32"``/``"bf16"``/``"fp16"``); defaults to the inputs'.
        allow_base_mismatch: combine adapters that name different base models.
        progress: show a progress bar over modules.

    Modules present in only some adapters are combined as a union (missing = zero).

    Returns:
        a :class:`Combination` held in memory (``.deltas``, ``.modules``; ``.save(path)`` writes it).

    Raises:
        TypeError: ``specs`` that are not :class:`~lora_arith.lora.specs.AdapterSpec` objects.
        LoraArithError: an adapter that cannot be read, adapters of different bases (without
            ``allow_base_mismatch``) or shapes, or an option that cannot work (an
            :class:`~lora_arith._internal.errors.OptionError` naming it).
    """
    specs = require_specs(specs, "combine")
    if not specs:
        raise LoraArithError("give at least one adapter")
    check_options(method, rank, energy, dtype)

    adapters = [open_adapter(spec.path) for spec in specs]
    base_model = _check_bases(adapters, allow_base_mismatch)
    modules = _module_union(adapters)
    if method == "svd" and rank is None and energy is None:
        rank = max(info.rank for a in adapters for info in a.modules.values())
        rank = min(rank, min(min(info.shape) for info in modules.values()))
    _check_rank(modules, rank)
    out_dtype = _output_dtype(adapters, dtype)

    deltas: dict[str, LowRankDelta] = {}
    results: list[ModuleResult] = []
    names = list(modules)
    weights = [spec.weight for spec in specs]
    with contextlib.ExitStack() as stack:
        stack.enter_context(single_threaded())
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-arith-combine"))
        # Modules are read, summed and compressed in the pool, each on one thread, several at a
        # time (the arithmetic releases the GIL), and collected here in order; the inputs' sha256
        # (for the recipe) are computed on the side.
        hashing = pool.submit(lambda: [adapter.sha256 for adapter in adapters])
        outputs = _in_order(pool, lambda name: _module_result(adapters, weights, name, method, rank, energy), names)
        stack.callback(outputs.close)  # on an error, cancel the modules not yet started
        if progress:
            from tqdm import tqdm

            outputs = tqdm(outputs, desc="combining", unit="module", leave=False, total=len(names))
        for delta, result in outputs:
            deltas[result.name] = delta
            results.append(result)
        hashing.result()

    kinds = {name: info.kind for name, info in modules.items()}
    config = unit_scaling_config({r.name: r.rank for r in results}, _output_template(adapters, base_model, modules))
    recipe = Recipe(
        method,
        tuple(
            RecipeInput(
                spec.public_name,
                spec.weight,
                adapter.sha256,
                public_name(adapter.base_model) if adapter.base_model else None,
            )
            for spec, adapter in zip(specs, adapters)
        ),
        rank=rank,
        energy=energy,
    )
    training = {s.public_name: a.training for s, a in zip(specs, adapters) if a.training}
    sources = [source for adapter in adapters for source in adapter.sources]
    return Combination(deltas, kinds, config, recipe, out_dtype, results, len(adapters), training or None, sources)


def extract(positive: str | os.PathLike[str], negative: str | os.PathLike[str], **options: Any) -> Combination:
    """The preference vector φ = ΔW(positive) − ΔW(negative): ``positive`` trained on the pairs,
    ``negative`` on the same pairs swapped. Exact by default (``method="cat"``, ranks add up);
    ``options`` are those of :func:`combine` (method, rank, energy, dtype, ...).

    Returns a :class:`Combination` (``.save(path)`` writes it); raises what :func:`combine` raises."""
    return combine(extract_specs(positive, negative), **options)


def extract_specs(positive: str | os.PathLike[str], negative: str | os.PathLike[str]) -> list[AdapterSpec]:
    """The specs of φ = ΔW(positive) − ΔW(negative), refusing one adapter given twice (perhaps
    as a folder and its weights file), whose difference is exactly zero."""
    specs = [AdapterSpec(positive, 1.0), AdapterSpec(negative, -1.0)]
    if len({os.path.realpath(spec.weights_file) for spec in specs}) == 1:
        raise LoraArithError(f"{positive} and {negative} are the same adapter: their difference is zero; give θ+ and θ−")
    return specs
