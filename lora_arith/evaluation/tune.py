"""``tune``: find the weights η that maximise (or minimise) one metric subject to constraints on
others, measure the choice on held-out prompts, and report it.

:func:`tune` loads the base once, splits the prompts (stratified by kind) into a tuning part and a
held-out part, runs the search of :mod:`lora_arith.evaluation.search` on the tuning part, and
measures the chosen η (and any ``compare`` adapters) on both parts. It returns a
:class:`TuneResult`; :meth:`TuneResult.save` writes ``report.json``, ``report.md``,
``frontier.png`` and ``adapter/`` (the chosen mix, exactly, by :func:`~lora_arith.lora.combine.combine`).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith._internal.privacy import public_name
from lora_arith.evaluation.config import VECTORS_EXAMPLE, Adapters, EvalConfig, adapter_specs, load_inputs, require_mapping
from lora_arith.evaluation.metrics import KINDS, METRICS, PROMPT_RATES, Metric, metric
from lora_arith.lora.numerics import require_count
from lora_arith.evaluation.search import (
    check_budget,
    Constraint,
    Constraints,
    eta_text,
    metric_key,
    pareto_front,
    parse_bounds,
    parse_constraints,
    search,
    search_ranges,
    split_pairs,
    split_prompts,
)

if TYPE_CHECKING:
    from lora_arith._internal.atomic import Output
    from lora_arith.lora.combine import Combination
    from lora_arith.model.mixing import PreferenceMixer

__all__ = ["TuneResult", "tune", "plot_frontier", "DEFAULT_BOUNDS"]

DEFAULT_BOUNDS = (-1.0, 2.0)
"""The search range of every η unless ``bounds`` says otherwise."""

Bounds = Union[None, Sequence[float], Sequence[str], Mapping[str, Sequence[float]]]


@dataclass
class TuneResult:
    """What :func:`tune` found: the chosen ``eta``, the ``report`` (the content of ``report.json``)
    and every point evaluated on the tuning prompts."""

    eta: dict[str, float]
    report: dict[str, Any]
    evaluated: list[dict[str, Any]]
    chosen: dict[str, Any]
    """The chosen point's flat metrics row on the tuning prompts."""
    compare: dict[str, dict[str, Any]]
    """Each compared adapter's flat metrics row on the tuning prompts."""
    objective: str
    constraint: Constraints
    vectors: dict[str, str] = field(repr=False)
    sources: list[Path] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:  # not every evaluated point: see .evaluated, .report or .markdown
        return (
            f"TuneResult(eta={self.eta}, objective={self.objective!r}, subject_to={str(self.constraint)!r}, "
            f"evaluated={len(self.evaluated)})"
        )

    @property
    def markdown(self) -> str:
        """The report as Markdown (``report.md``): the chosen η and its rates, held-out and tuning."""
        return _markdown(self.report)

    def adapter(self) -> Combination:
        """The chosen mix as one adapter (exact, ranks concatenated)."""
        from lora_arith.lora.combine import combine
        from lora_arith.lora.specs import AdapterSpec

        return combine([AdapterSpec(self.vectors[name], weight) for name, weight in self.eta.items()])

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw the evaluated points, their Pareto frontier, the chosen point and the compared ones."""
        x_key = next((key for key in self.constraint.keys if key != self.objective), "compliance_rate_safe")
        plot_frontier(
            self.evaluated, self.chosen, self.compare, x_key, self.objective, self.constraint, path,
            title=f"tune: {' + '.join(self.vectors)} on the tuning prompts ({self.report['judge']})",
        )  # fmt: skip

    def save(self, directory: str | os.PathLike[str] | Output, *, force: bool = False) -> Path:
        """Write ``report.json``, ``report.md``, ``frontier.png`` and ``adapter/`` into ``directory``,
        all at once (atomically); an existing folder is replaced only with ``force``."""
        from lora_arith._internal.atomic import atomic_output

        combination = self.adapter()
        with atomic_output(directory, kind="tune", force=force, inputs=self.sources) as temporary:
            combination.save(temporary / "adapter")
            (temporary / "report.json").write_text(json.dumps(self.report, indent=1, ensure_ascii=False))
            (temporary / "report.md").write_text(self.markdown)
            self.plot(temporary / "frontier.png")
        return Path(directory)


def tune(
    vectors: Mapping[str, str | os.PathLike[str]],
    *,
    prompts: Sequence[Any] | str | os.PathLike[str] = (),
    maximize: str | None = None,
    minimize: str | None = None,
    subject_to: str | Sequence[str] | Constraint | Constraints,
    bounds: Bounds = None,
    budget: int = 40,
    split: float = 0.5,
    seed: int = 0,
    compare: Adapters | None = None,
    pairs: Sequence[Any] | str | os.PathLike[str] = (),
    points_per_batch: int = 10,
    limit: int | None = None,
    max_pairs: int | None = None,
    label: str | None = None,
    mixer: PreferenceMixer | None = None,
    log: Callable[[str], None] | None = None,
    config: EvalConfig | None = None,
    **settings: Any,
) -> TuneResult:
    """Find the weights η of ``vectors`` (name → adapter path) that maximise (or minimise) one
    metric subject to every constraint of ``subject_to`` (e.g. ``"compliance_rate>=0.9"``).

    Args:
        prompts: evaluation prompts (JSONL paths or :class:`~lora_arith.evaluation.evaluate.EvalPrompt`
            objects), split by kind into tuning and held-out parts (``split`` of each kind to
            tuning, chosen with ``seed``).
        maximize, minimize: the metric to optimise; give exactly one (names in
            :mod:`lora_arith.evaluation.metrics`: refusal_rate, compliance_rate, ...).
        bounds: the search range: ``(low, high)`` for every vector, ``{name: (low, high)}``, or the
            command line's ``"LOW,HIGH"`` / ``"NAME=LOW,HIGH"`` texts. Default :data:`DEFAULT_BOUNDS`.
        budget: points evaluated on the tuning prompts at most.
        compare: adapters (name → path or :class:`~lora_arith.lora.specs.AdapterSpec`) measured the
            same way, e.g. a union baseline.
        pairs: preference pairs, for reward_accuracy and logprob_margin, split as the prompts
            are (``split`` of each file to tuning); ``label`` (helpful or harmless) reads pair
            files of PKU-SafeRLHF records.
        points_per_batch: grid points generated together in one batch (per-row weights).
        mixer: an already loaded :class:`~lora_arith.model.mixing.PreferenceMixer` with every
            vector and compared adapter attached by name, instead of loading the base (the report
            records the mixer's base; ``base``, ``quantize_4bit`` and ``device`` are then left out).
        log: called with a line per search round (e.g. ``print``).
        config, settings: how mixes are evaluated: an :class:`EvalConfig`, or its fields as
            keywords (``base=``, ``max_new_tokens=``, ``judge=``, ``batch_size=``, ...).

    Raises:
        LoraArithError: for a bad metric, constraint, bound or split, missing prompts of a kind the
            metrics need, or when no evaluated point satisfies the constraints.
    """
    config = EvalConfig.build(config, settings, "tune")
    if (maximize is None) == (minimize is None):
        raise OptionError(("maximize", "minimize"), "give one of {} METRIC or {} METRIC")
    objective = metric_key(maximize or minimize)
    constraint = _constraints(subject_to)
    named = {name: os.fspath(path) for name, path in require_mapping(vectors, "vectors", VECTORS_EXAMPLE).items()}
    require_count(budget, "budget")
    require_count(points_per_batch, "points_per_batch")
    if not named:
        raise OptionError("vectors", "give at least one of {} to tune (NAME → adapter)")  # no dimension: no search
    check_budget(budget, len(named))  # before the base loads
    compared = adapter_specs(compare or {}, "compare")
    clash = sorted(set(compared) & set(named))
    if clash:
        raise OptionError(("compare", "vectors"), "{} and {} share the name {name}", name=clash[0])
    ranges = _bounds(bounds, list(named))
    inputs = load_inputs(prompts, pairs, limit=limit, max_pairs=max_pairs, label=label)
    if not inputs.prompts and metric(objective).part == "prompts":
        raise OptionError("prompts", "tune needs {} for the refusal and compliance rates")
    tuning_prompts, held_out = split_prompts(inputs.prompts, split, seed)
    tuning_pairs, held_out_pairs = split_pairs(inputs.pairs, split, seed) if inputs.pairs else ([], [])
    for key in (objective, *constraint.keys):
        kind = metric(key).kind
        if kind is not None and not inputs.count(kind):
            raise OptionError("prompts", "{key} needs {kind} prompts, and {} has none", key=key, kind=kind)
        if metric(key).part == "pairs" and not inputs.pairs:  # found only after the whole search before
            raise OptionError("pairs", "{key} is measured on preference pairs: give {}", key=metric(key).name)
    config = config.on_mixer(mixer, [*named, *compared])
    judge = config.make_judge()
    if mixer is None:
        mixer = config.mixer({**named, **compared})
    zeros = {name: 0.0 for name in mixer.names}  # every point names every adapter: a given mixer keeps its weights

    references: dict[int, dict] = {}  # the reference log-probs of each part's pairs, computed once

    def evaluate(points: list[dict[str, float]], items, pairs) -> list[dict[str, Any]]:
        from lora_arith.evaluation.sweep import evaluate_points, flatten

        full = [{**zeros, **point} for point in points]
        results = evaluate_points(
            mixer,
            full,
            items,
            pairs,
            judge=judge,
            points_per_batch=points_per_batch,
            reference=references.setdefault(id(pairs), {}),
            **config.generation(),
        )
        return [flatten(result) for result in results]

    rounds = itertools.count(1)

    def evaluate_tuning(points: list[dict[str, float]]) -> list[dict[str, Any]]:
        rows = evaluate(points, tuning_prompts, tuning_pairs)
        if log is not None:
            log(f"round {next(rounds)}: {len(points)} points")
        return rows

    found = search(evaluate_tuning, ranges, objective, constraint, budget=budget, minimize=minimize is not None)
    if found.chosen is None:
        raise LoraArithError(_infeasible(constraint, found.best_constraint))
    eta = found.chosen["eta"]
    compare_points = {name: {**zeros, name: spec.weight} for name, spec in compared.items()}
    held_rows = evaluate([eta, *compare_points.values()], held_out, held_out_pairs)
    tuning_compare = evaluate(list(compare_points.values()), tuning_prompts, tuning_pairs) if compare_points else []
    report = {
        "objective": {"metric": maximize or minimize, "key": objective, "direction": "max" if maximize else "min"},
        "constraint": str(constraint),
        "bounds": {n: list(b) for n, b in ranges.items()},
        "budget": budget,
        "split": split,
        "seed": seed,
        "judge": judge.name,
        "base": config.public_base(),
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "n_prompts": {
            "tuning": {kind: sum(p.kind == kind for p in tuning_prompts) for kind in KINDS},
            "held_out": {kind: sum(p.kind == kind for p in held_out) for kind in KINDS},
        },
        "n_pairs": {"tuning": len(tuning_pairs), "held_out": len(held_out_pairs)},
        "vectors": {name: public_name(path) for name, path in named.items()},
        "chosen": {"eta": eta, "tuning": _strip(found.chosen), "held_out": held_rows[0]},
        "compare": {
            name: {"weight": compared[name].weight, "tuning": tune_row, "held_out": held_row}
            for name, tune_row, held_row in zip(compare_points, tuning_compare, held_rows[1:])
        },
        "evaluated": found.evaluated,
    }
    return TuneResult(
        eta=eta,
        report=report,
        evaluated=found.evaluated,
        chosen=found.chosen,
        compare=dict(zip(compare_points, tuning_compare)),
        objective=objective,
        constraint=constraint,
        vectors=named,
        sources=config.sources([*named.values(), *(s.path for s in compared.values())], inputs.files),
    )


def _constraints(subject_to: str | Sequence[str] | Constraint | Constraints) -> Constraints:
    if isinstance(subject_to, Constraint):
        return Constraints((subject_to,))
    if isinstance(subject_to, Constraints):
        return subject_to
    return parse_constraints([subject_to] if isinstance(subject_to, str) else list(subject_to))


def _bounds(bounds: Bounds, names: list[str]) -> dict[str, tuple[float, float]]:
    """The search range of each vector from any of the forms :func:`tune` takes."""
    if bounds is None:
        return {name: DEFAULT_BOUNDS for name in names}
    if isinstance(bounds, str):
        bounds = [bounds]
    try:
        if isinstance(bounds, Mapping):
            ranges = [(name, float(low), float(high), f"{name}={low},{high}") for name, (low, high) in bounds.items()]
        elif len(bounds) == 2 and not any(isinstance(value, str) for value in bounds):
            low, high = bounds
            ranges = [(None, float(low), float(high), f"{low},{high}")]
        else:
            return parse_bounds(list(bounds), names, DEFAULT_BOUNDS)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):  # not a sequence, a range that is not two numbers, not texts
        raise OptionError(
            "bounds", "{} is (LOW, HIGH), {{NAME: (LOW, HIGH)}} or texts 'NAME=LOW,HIGH', not {value!r}", value=bounds
        ) from None
    return search_ranges(ranges, names, DEFAULT_BOUNDS)


def _infeasible(constraint: Constraints, best: dict[str, Any]) -> str:
    """Why no point was chosen, with the point that came closest."""
    if len(constraint.items) == 1:
        value = best.get(constraint.items[0].key)
        return (
            f"no evaluated point satisfies {constraint}: the best {constraint.items[0].metric} reached was "
            f"{'n/a' if value is None else f'{value:.3f}'} at {eta_text(best['eta'])}"
        )
    return (
        f"no evaluated point satisfies {constraint}: the closest was {eta_text(best['eta'])}, "
        f"with {constraint.values_text(best)}"
    )


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("eta", "round")}


def _markdown(report: dict[str, Any]) -> str:
    """``report.md``: the chosen η and its rates on the held-out and tuning prompts, with any
    compared adapters."""
    from lora_arith.evaluation.evaluate import rate_text

    pairs = report["n_pairs"]
    shown = METRICS if pairs["tuning"] else PROMPT_RATES

    def cell(row: dict[str, Any], shown_metric: Metric) -> str:
        if shown_metric.is_rate:
            return rate_text(row, shown_metric.key, shown_metric.n_key)
        value = row.get(shown_metric.key)
        return "n/a" if value is None else f"{value:.3f}"

    def cells(row: dict[str, Any]) -> str:
        return " | ".join(cell(row, shown_metric) for shown_metric in shown)

    chosen = report["chosen"]
    name = "chosen: " + eta_text(chosen["eta"])
    lines = [
        f"# tune: {report['objective']['direction']} {report['objective']['metric']} subject to {report['constraint']}",
        "",
        f"Chosen η: **{eta_text(chosen['eta'])}** (bounds {report['bounds']}, {len(report['evaluated'])} points "
        f"evaluated on the tuning prompts, budget {report['budget']}).",
        f"Base: {report['base']}; max_new_tokens {report['max_new_tokens']}; judge: {report['judge']}; "
        f"split {report['split']:g} (seed {report['seed']}), stratified by kind: tuning {report['n_prompts']['tuning']}, "
        f"held-out {report['n_prompts']['held_out']}"
        + (f"; pairs by file: tuning {pairs['tuning']}, held-out {pairs['held_out']}." if pairs["tuning"] else "."),
        "",
        "| model | part |" + "".join(f" {shown_metric.column} |" for shown_metric in shown),
        "| --- | --- |" + " --- |" * len(shown),
        f"| {name} | held-out | {cells(chosen['held_out'])} |",
        f"| {name} | tuning | {cells(chosen['tuning'])} |",
    ]
    for compared, entry in report["compare"].items():
        lines.append(f"| {compared} ×{entry['weight']:g} | held-out | {cells(entry['held_out'])} |")
        lines.append(f"| {compared} ×{entry['weight']:g} | tuning | {cells(entry['tuning'])} |")
    lines += ["", "Rates: Wilson 95% intervals and n. Files: adapter/ (the chosen mix), frontier.png, report.json.", ""]
    return "\n".join(lines)


def plot_frontier(
    evaluated: Sequence[dict[str, Any]],
    chosen: dict[str, Any] | None,
    compare: dict[str, dict[str, Any]],
    x_key: str,
    y_key: str,
    constraint: Constraint | Constraints,
    path,
    *,
    title: str = "",
) -> None:
    """Every evaluated point, the Pareto frontier, the chosen point and the compare points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    points = [r for r in evaluated if r.get(x_key) is not None and r.get(y_key) is not None]
    axes.scatter([r[x_key] for r in points], [r[y_key] for r in points], s=18, color="0.6", label="evaluated (tuning)")
    front = pareto_front(points, x_key, y_key)
    axes.plot(
        [r[x_key] for r in front], [r[y_key] for r in front], "-o", color="tab:blue", ms=4, label="Pareto frontier"
    )
    constraint = _constraints(constraint)
    for line in constraint.items:
        if line.key == x_key:
            axes.axvline(line.value, color="tab:red", ls="--", lw=1, label=str(line))
        elif line.key == y_key:
            axes.axhline(line.value, color="tab:red", ls="--", lw=1, label=str(line))
    if chosen is not None:
        axes.scatter(
            [chosen[x_key]],
            [chosen[y_key]],
            marker="*",
            s=220,
            color="tab:orange",
            zorder=5,
            label=f"chosen ({eta_text(chosen['eta'])})",
        )
    markers = itertools.cycle("sD^vP")
    for name, row in compare.items():
        if row.get(x_key) is not None and row.get(y_key) is not None:
            axes.scatter([row[x_key]], [row[y_key]], marker=next(markers), s=60, zorder=4, label=f"compare: {name}")
    axes.set_xlabel(x_key.replace("_", " "))
    axes.set_ylabel(y_key.replace("_", " "))
    axes.set_title(title or "tune: evaluated points on the tuning prompts")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)
