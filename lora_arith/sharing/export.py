"""Export for serving engines.

vLLM loads any PEFT LoRA folder whose modules have ranks up to its ``--max-lora-rank``, scales
every module by the config's ``lora_alpha / r`` (it ignores ``rank_pattern``/``alpha_pattern``),
loads embedding LoRA, and refuses DoRA, LoRA biases and ``modules_to_save``. So an export keeps
each module's own rank (padding would only make files bigger), folds every scaling into the
factors (``lora_alpha == r`` everywhere, so vLLM's one scaling is 1), compresses optimally only
the modules above ``max_rank``, and reports the smallest ``--max-lora-rank`` that serves it.

Several weightings of the same adapters (``mixes``) give one adapter each: the way per-user mixes
are served side by side with ``vllm serve --enable-lora --lora-modules NAME=PATH ...``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_arith.lora.adapter_io import (
    adapter_sources,
    open_adapter,
    public_config,
    rank_range,
    save_adapter,
    unit_scaling_config,
)
from lora_arith._internal.atomic import atomic_output, check_output
from lora_arith.sharing.model_card import is_hub_id
from lora_arith.lora.combine import combine
from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.lora.factors import compress, single_threaded
from lora_arith.lora.numerics import require_count
from lora_arith._internal.provenance import EXPORT_METHOD
from lora_arith.lora.specs import MIX_NAME, AdapterSpec, check_mixes, named_weights, path_list

__all__ = [
    "VLLM_RANKS",
    "Export",
    "serving_rank",
    "parse_mix",
    "parse_mixes",
    "export_for_vllm",
    "export_mix",
    "export_mixes",
    "export_adapters",
    "export_report",
    "lora_modules_line",
    "ranks_text",
]

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""

@dataclass(frozen=True)
class Export:
    """What :func:`export_for_vllm` wrote for one adapter.

    Attributes:
        path: the written adapter folder.
        ranks: every module's rank in the output.
        compressed: modules whose rank was reduced by optimal SVD truncation (above
            ``max_rank``), with the relative error of each; the others are exact.
        base: the base model the adapter records (its Hub id or folder name), if any.
    """

    path: Path
    ranks: dict[str, int]
    compressed: dict[str, float]
    base: str | None = None

    @property
    def rank(self) -> int:
        """The largest module rank."""
        return max(self.ranks.values())

    def __repr__(self) -> str:  # not every module's rank
        return (
            f"Export(path={self.path!r}, modules={len(self.ranks)}, rank={rank_range(self.ranks.values())}, "
            f"compressed={len(self.compressed)})"
        )

    @property
    def max_lora_rank(self) -> int:
        """The smallest vLLM ``--max-lora-rank`` that serves this adapter."""
        return serving_rank(self.rank)


def serving_rank(rank: int) -> int:
    """The smallest value of vLLM's ``--max-lora-rank`` (:data:`VLLM_RANKS`) that is at least ``rank``."""
    fitting = [r for r in VLLM_RANKS if r >= rank]
    if not fitting:
        raise LoraArithError(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    return fitting[0]


def parse_mix(text: str, count: int) -> tuple[str, list[float]]:
    """Parse ``NAME=W1,W2,...`` with one weight per input adapter (read by
    :func:`~lora_arith.lora.specs.named_weights`)."""
    name, sep, _ = text.partition("=")
    if not sep or not MIX_NAME.fullmatch(name):
        raise OptionError("mixes", "{} {text!r}: expected NAME=W1,W2,... (NAME of letters, digits, '.', '_', '-')", text=text)
    name, weights = named_weights(text, "mixes", "{} {item!r}: the weights must be numbers separated by commas")
    if len(weights) != count:
        raise OptionError(
            "mixes", "{} {text!r}: {n} weights for {count} adapters; give one per adapter", text=text, n=len(weights), count=count
        )
    return name, weights


def parse_mixes(texts: Sequence[str], count: int) -> dict[str, list[float]]:
    """Parse the ``mix`` option's texts (:func:`parse_mix`) into name → weights; names must differ."""
    mixes = dict(parse_mix(text, count) for text in texts)
    if len(mixes) != len(texts):
        raise OptionError("mixes", "each {} needs its own NAME")
    return mixes


def _check_vllm_compatible(adapters: Sequence[str]) -> None:
    for adapter in adapters:
        opened = open_adapter(adapter)
        if opened.config.get("fan_in_fan_out"):
            raise LoraArithError(f"{adapter}: vLLM needs nn.Linear layers; this adapter has fan_in_fan_out=True (Conv1D)")


def _write(
    specs: Sequence[AdapterSpec], output: Path, max_rank: int | None, force: bool, *, checked: bool = False
) -> Export:
    cap = VLLM_RANKS[-1] if max_rank is None else max_rank
    combination = combine(list(specs), method="cat")
    compressed: dict[str, float] = {}
    with single_threaded():
        for name, delta in combination.deltas.items():
            if delta.rank > cap:
                result = compress(delta, rank=min(cap, delta.B.shape[0], delta.A.shape[1]))
                combination.deltas[name], compressed[name] = result.delta, result.relative_error
    ranks = {name: delta.rank for name, delta in combination.deltas.items()}
    template = {k: v for k, v in combination.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    config = unit_scaling_config(ranks, template)
    recipe = dataclasses.replace(combination.recipe, method=EXPORT_METHOD, max_rank=max_rank)
    if not checked:
        output = check_output(output, force=force, inputs=combination.sources, kind="adapter")
    hint = "its scaling, folded into the factors, does not fit the adapter's dtype; convert it to fp32 first"
    path = save_adapter(output, combination.tensors(hint=hint), config, recipe.to_dict(), training=combination.training)
    return Export(path, ranks, compressed, public_config(config).get("base_model_name_or_path"))


def export_for_vllm(
    adapter: str | os.PathLike[str], output: str | os.PathLike[str], *, max_rank: int | None = None, force: bool = False
) -> Export:
    """Write ``adapter`` as a vLLM-ready PEFT folder at ``output``.

    Each module keeps its rank, except that modules above ``max_rank`` (default: vLLM's
    largest, 512) are compressed optimally (QR + SVD of the small core) and reported. Scalings
    are folded into the factors (``lora_alpha == r`` for every module); embedding LoRA is kept.
    """
    if Path(output).suffix == ".safetensors":
        raise LoraArithError("vLLM loads adapter folders: give -o a folder name, not a .safetensors file")
    return export_mix([AdapterSpec(str(adapter), 1.0)], output, max_rank=max_rank, force=force)


def export_mix(
    specs: Sequence[AdapterSpec], output: str | os.PathLike[str], *, max_rank: int | None = None, force: bool = False
) -> Export:
    """Write the exact weighted sum of ``specs`` (``combine(..., method="cat")``) as one vLLM-ready
    adapter folder at ``output``, as :func:`export_mixes` writes each of its mixes: ranks add up,
    scalings are folded in, only modules above ``max_rank`` are compressed. ``serve --engine
    vllm`` writes each request's mix with it."""
    if max_rank is not None:
        require_count(max_rank, "max_rank")
    _check_vllm_compatible([spec.path for spec in specs])
    return _write(list(specs), Path(output), max_rank, force)


def export_mixes(
    adapters: Sequence[str],
    mixes: Mapping[str, Sequence[float]],
    output: str | os.PathLike[str],
    *,
    max_rank: int | None = None,
    force: bool = False,
) -> dict[str, Export]:
    """Write one vLLM-ready adapter per mix into the folder ``output`` (as ``output/NAME``).

    ``mixes`` maps a name to one weight per adapter; each mix is the exact weighted sum of the
    adapters (ranks add up), compressed optimally only where a module exceeds ``max_rank``.
    """
    mixes = check_mixes(mixes, len(adapters))
    if max_rank is not None:
        require_count(max_rank, "max_rank")
    _check_vllm_compatible(adapters)
    sources = [source for adapter in adapters for source in adapter_sources(adapter)]
    checked = check_output(output, force=force, inputs=sources, kind="mixes")
    exports: dict[str, Export] = {}
    with atomic_output(checked) as folder:
        for name, weights in mixes.items():
            specs = [AdapterSpec(str(a), w) for a, w in zip(adapters, weights)]
            written = _write(specs, folder / name, max_rank, force, checked=True)
            exports[name] = dataclasses.replace(written, path=Path(output) / name)
    return exports


def export_adapters(
    adapters: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    mixes: Mapping[str, Sequence[float]] | None = None,
    max_rank: int | None = None,
    force: bool = False,
) -> dict[str | None, Export]:
    """What ``lora-arith export`` writes: with ``mixes``, one adapter per mix of ``adapters``
    (:func:`export_mixes`, keyed by the mix's name); without, the one adapter given, rewritten
    (:func:`export_for_vllm`, keyed ``None``). ``adapters`` is one path or a list of them.
    Returns ``{name: Export}``; raises :class:`LoraArithError` (an ``OptionError`` naming the
    option) for mixes that do not fit the adapters, or an existing output without ``force``."""
    adapters = path_list(adapters, "adapters")
    if mixes is not None:
        return export_mixes(adapters, mixes, output, max_rank=max_rank, force=force)
    if len(adapters) != 1:
        raise OptionError("mixes", "several adapters are exported as mixes: give {} NAME=W1,W2,... (one weight each)")
    return {None: export_for_vllm(adapters[0], output, max_rank=max_rank, force=force)}


def export_report(exports: Mapping[str | None, Export], max_rank: int | None = None) -> list[str]:
    """The lines that say what :func:`export_adapters` wrote: each adapter's modules and ranks, the
    modules compressed above ``max_rank`` with the worst error, and how to serve the result with vLLM."""
    lines = []
    for name, result in exports.items():
        lines.append(f"wrote {result.path}: {len(result.ranks)} modules, {ranks_text(result.ranks)} (lora_alpha = r)")
        if result.compressed:
            worst = max(result.compressed, key=result.compressed.get)
            lines.append(
                f"  {len(result.compressed)} modules above rank {max_rank} compressed optimally; "
                f"max relative error {result.compressed[worst]:.3e} ({worst})"
            )
        if name is None:
            lines.append(f"  serve with --max-lora-rank {result.max_lora_rank} (the smallest that serves it)")
    if None not in exports:
        # a Hub id serves as written; a local base is recorded by its folder's name only
        base = next((export.base for export in exports.values() if export.base and is_hub_id(export.base)), "BASE")
        lines.append(f"serve with: vllm serve {base} {lora_modules_line(exports)}")
    return lines


def ranks_text(ranks: Mapping[str, int]) -> str:
    """``"rank 8"``, or ``"ranks 4-12"`` when the modules' ranks differ: how reports state them."""
    return ("ranks " if len(set(ranks.values())) > 1 else "rank ") + rank_range(ranks.values())


def lora_modules_line(exports: Mapping[str, Export]) -> str:
    """The ``vllm serve`` arguments that serve ``exports`` side by side."""
    modules = " ".join(f"{name}={export.path}" for name, export in exports.items())
    rank = max(export.max_lora_rank for export in exports.values())
    return f"--enable-lora --max-loras {len(exports)} --max-lora-rank {rank} --lora-modules {modules}"
