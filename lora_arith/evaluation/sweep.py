"""Sweeps over preference weights η: evaluate every grid point on one loaded base, write
CSV/JSON, and draw heatmaps in the style of the paper's Figure 2."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.evaluation.metrics import FLAT_RATES, METRICS, metric as find_metric
from lora_arith.lora.numerics import finite_number, require_count

if TYPE_CHECKING:
    from lora_arith.evaluation.config import EvalConfig
    from lora_arith.model.mixing import PreferenceMixer

__all__ = [
    "DEFAULT_GRID", "SweepResult", "sweep", "parse_grid", "flatten", "grid_points", "point_key", "generate_points",
    "evaluate_points", "sweep_row", "PointLog", "rows_to_csv", "heatmap_planes", "plot_heatmap", "write_sweep",
]  # fmt: skip

DEFAULT_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
"""The weights η a sweep tries for every vector unless told otherwise."""


def parse_grid(text: str | Sequence[float]) -> list[float]:
    """``"-1,-0.5,0,0.5,1"`` (or a sequence of numbers) as sorted distinct finite floats."""
    try:
        parts = text.split(",") if isinstance(text, str) else list(text)
        values = sorted({float(part) for part in parts if not isinstance(part, str) or part.strip()})
    except (TypeError, ValueError):
        raise LoraArithError(f"cannot parse the grid {text!r}; expected numbers separated by commas") from None
    if not values:
        raise LoraArithError("the grid is empty")
    if any(finite_number(value) is None for value in values):
        raise LoraArithError(f"the grid {text!r} holds a value that is not a finite number")
    return values


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an :func:`lora_arith.evaluation.evaluate.evaluate_model` result, as one flat row:
    each rate with its Wilson 95% bounds (``_lo``/``_hi``) and n, the margins, and the judge."""
    row: dict[str, Any] = {}
    for rate in FLAT_RATES:
        metrics, key = result.get(rate.part, {}), rate.key
        if key in metrics:
            interval = metrics.get(f"{key}_ci") or (None, None)
            row.update(
                {key: metrics[key], f"{key}_lo": interval[0], f"{key}_hi": interval[1], rate.n_key: metrics.get(rate.n_key)}
            )
    for key in ("logprob_margin", "reward_margin"):
        if key in result.get("pairs", {}):
            row[key] = result["pairs"][key]
    if "judge" in result.get("prompts", {}):
        row["judge"] = result["prompts"]["judge"]
    return row


def grid_points(names: Sequence[str], grid: Sequence[float]) -> list[dict[str, float]]:
    """Every combination of ``grid`` values over ``names``, as name → η mappings."""
    return [dict(zip(names, point)) for point in itertools.product(grid, repeat=len(names))]


def _is_point_record(record: Any) -> bool:
    """Whether ``record`` is a finished point as :class:`PointLog` writes it: ``{"point": {name:
    η}, "result": {...}}`` with finite weights."""
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        return False
    point = record.get("point")
    return isinstance(point, dict) and all(finite_number(value) is not None for value in point.values())


def point_key(point: dict[str, float]) -> str:
    """A stable text key of a point (names sorted, weights rounded to 1e-9)."""
    return json.dumps({name: round(float(value), 9) for name, value in sorted(point.items())})


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_points(
    mixer,
    prompts: Sequence[Any],
    points: Sequence[dict[str, float]],
    *,
    max_new_tokens: int,
    batch_size: int,
    sources: Sequence[str] | None = None,
    share_prefix: bool = True,
) -> list[list[str]]:
    """Greedy completions of every prompt at every point, all points in the same batches.

    Runs on the engine behind ``serve`` (:class:`lora_arith.serving.engine.Engine`): every
    (point, prompt) is a row with its own weights (fused per-row LoRA: one GEMM pair per module),
    ``len(points) × batch_size`` rows decode together, a row leaves the batch as it finishes and
    the next joins. The prompts go in as one-point generation groups them (by length,
    ``batch_size`` at a time), each group at every point. Each prompt is templated and tokenized
    once for all points. With ``share_prefix``, the tokens every chat prompt starts with (the
    template's system turn) are run once per point instead of once per row. Returns one list of
    completions (in prompt order) per point."""
    from lora_arith.model.generation import encode_prompts
    from lora_arith.serving.engine import greedy_completions

    require_count(batch_size, "batch_size")
    require_count(max_new_tokens, "max_new_tokens")
    token_ids = encode_prompts(mixer.model, mixer.tokenizer, prompts, max_new_tokens, sources)
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    rows = [(p, i) for group in _chunks(order, batch_size) for p in range(len(points)) for i in group]
    texts = greedy_completions(
        mixer,
        [token_ids[i] for _, i in rows],
        [points[p] for p, _ in rows],
        max_new_tokens=max_new_tokens,
        max_batch_size=len(points) * batch_size,
        share_prefix=share_prefix,
    )
    completions = [[""] * len(prompts) for _ in points]
    for (p, i), text in zip(rows, texts):
        completions[p][i] = text
    return completions


def evaluate_points(
    mixer,
    points: Sequence[dict[str, float]],
    prompts: Sequence[Any] = (),
    pairs: Sequence[Any] = (),
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    beta: float = 0.1,
    judge=None,
    points_per_batch: int = 1,
    share_prefix: bool = True,
    on_point: Callable[[dict[str, float], dict[str, Any]], None] | None = None,
    progress: bool = False,
    reference: dict | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the mixer at every point (name → η; names left out keep the mixer's weights).

    With ``points_per_batch == 1`` each point is set on the mixer and evaluated on its own (the
    one-point-at-a-time path); with more, ``points_per_batch`` points share every generation
    batch (:func:`generate_points`, ``share_prefix`` passed on), which gives the same greedy
    texts. Pair metrics are computed point by point, with the reference log-probabilities
    computed once (and kept in ``reference``, a dict, for later calls on the same ``pairs``).
    ``on_point(point, result)`` is called as each point finishes. Returns the
    :func:`~lora_arith.evaluation.evaluate.evaluate_model` results in order."""
    from lora_arith.evaluation.evaluate import evaluate_model, pair_metrics, score_prompts

    require_count(points_per_batch, "points_per_batch")
    reference = {} if reference is None else reference
    results: list[dict[str, Any]] = []
    chunks = list(_chunks(list(points), points_per_batch))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(points), desc="sweep", unit="point")
    saved = dict(mixer.weights)
    try:
        for chunk in chunks:
            chunk_results: list[dict[str, Any]] = [{} for _ in chunk]
            if prompts and len(chunk) > 1:
                texts = generate_points(
                    mixer,
                    [p.prompt for p in prompts],
                    chunk,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    sources=[p.source for p in prompts],
                    share_prefix=share_prefix,
                )
                for result, completions in zip(chunk_results, texts):
                    result["prompts"], result["completions"] = score_prompts(prompts, completions, judge)
            for point, result in zip(chunk, chunk_results):
                mixer.set(**{**saved, **point})
                if prompts and len(chunk) == 1:
                    result.update(
                        evaluate_model(
                            mixer.model,
                            mixer.tokenizer,
                            prompts,
                            max_new_tokens=max_new_tokens,
                            batch_size=batch_size,
                            judge=judge,
                        )
                    )
                if pairs:
                    result["pairs"] = pair_metrics(
                        mixer.model,
                        mixer.tokenizer,
                        pairs,
                        beta=beta,
                        batch_size=max(1, batch_size // 2),
                        reference=reference,
                    )
                results.append(result)
                if on_point is not None:
                    on_point(point, result)
                if bar is not None:
                    bar.update()
    finally:
        mixer.set(**saved)
        if bar is not None:
            bar.close()
    return results


def sweep_row(point: dict[str, float], result: dict[str, Any]) -> dict[str, Any]:
    """One output row: the weights (``eta_NAME``), the flat metrics and the full result."""
    return {**{f"eta_{name}": value for name, value in point.items()}, **flatten(result), "result": result}


@dataclass
class SweepResult:
    """A finished sweep: one row per grid point (``eta_NAME``, the flat metrics and the full
    ``result``), the files written into ``directory``, and how many points an earlier run had done."""

    rows: list[dict[str, Any]]
    files: list[Path]
    directory: Path
    resumed: int = 0

    def __repr__(self) -> str:  # not every point's metrics: see .rows or .csv
        return f"SweepResult(directory={self.directory!r}, points={len(self.rows)}, resumed={self.resumed})"

    @property
    def csv(self) -> str:
        """The rows (without the full results) as CSV text, as in ``sweep.csv``."""
        return rows_to_csv(self.rows)


def sweep(
    vectors: Mapping[str, str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    prompts: Sequence[Any] | str | os.PathLike[str] = (),
    pairs: Sequence[Any] | str | os.PathLike[str] = (),
    grid: str | Sequence[float] = DEFAULT_GRID,
    fix: Mapping[str, float] | None = None,
    points_per_batch: int = 10,
    force: bool = False,
    limit: int | None = None,
    max_pairs: int | None = None,
    label: str | None = None,
    mixer: PreferenceMixer | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    config: EvalConfig | None = None,
    **settings: Any,
) -> SweepResult:
    """Evaluate every combination of ``grid`` weights over ``vectors`` (name → adapter path) and
    write ``sweep.csv``, ``sweep.json`` and heatmaps into the folder ``output``.

    The base is loaded once and ``points_per_batch`` grid points share every generation batch.
    Each finished point is appended to ``output/points.jsonl``, so calling again with the same
    settings and inputs resumes an interrupted sweep; other settings are an error unless ``force``
    starts over. ``fix`` holds the vectors not on a heatmap's axes (three or more vectors) at the
    given grid values. ``mixer``: an already loaded mixer with ``vectors`` attached by name (its base is the
    one a later call resumes by; ``base``, ``quantize_4bit`` and ``device`` are then left out).
    ``limit``, ``max_pairs``, ``label``, ``config`` and ``settings`` are as for
    :func:`~lora_arith.evaluation.evaluate.evaluate`;
    ``log`` gets a line when earlier points are resumed.

    Returns a :class:`SweepResult` (``.rows``, ``.files``, ``.resumed``); raises
    :class:`LoraArithError` for a grid, ``fix`` or input that cannot work, or a folder holding a
    sweep of other settings (without ``force``)."""
    from lora_arith._internal.atomic import check_output
    from lora_arith.evaluation.config import VECTORS_EXAMPLE, EvalConfig, load_inputs, require_mapping

    config = EvalConfig.build(config, settings, "sweep")
    named = {name: os.fspath(path) for name, path in require_mapping(vectors, "vectors", VECTORS_EXAMPLE).items()}
    config = config.on_mixer(mixer, named)
    require_count(points_per_batch, "points_per_batch")  # before the base loads and the output is made
    inputs = load_inputs(prompts, pairs, limit=limit, max_pairs=max_pairs, label=label)
    sources = config.sources(named.values(), inputs.files)
    output = Path(os.path.expanduser(os.fspath(output)))  # as check_output reads it: "~/sweep" is in the home folder
    check_output(output, force=force or output.exists(), inputs=sources, kind="sweep")
    values = parse_grid(grid)
    fixed = dict(require_mapping(fix or {}, "fix", "{'harmless': 1.0}"))
    heatmap_planes(list(named), {n: values for n in named}, fixed)  # check fix before any work
    judge = config.make_judge()
    points = grid_points(list(named), values)
    record = PointLog(output, {**inputs.settings(config, named, judge), "points": points}, force=force)
    todo = [p for p in points if point_key(p) not in record.done]
    if len(todo) < len(points) and log is not None:
        log(f"resuming: {len(points) - len(todo)} of {len(points)} points already done")
    if todo:
        evaluate_points(
            mixer or config.mixer(named), todo, inputs.prompts, inputs.pairs, judge=judge,
            points_per_batch=points_per_batch, on_point=record.add, progress=progress, **config.generation(),
        )  # fmt: skip
    rows = [sweep_row(p, record.done[point_key(p)]) for p in points]
    files = write_sweep(rows, list(named), output, fixed=fixed)
    return SweepResult(rows, files, output, len(points) - len(todo))


class PointLog:
    """The resumable record of a sweep: ``DIRECTORY/points.jsonl``.

    Its first line is a header with the hash of the settings and inputs; each further line is one
    finished point ``{"point": {name: η}, "result": {...}}``, appended and flushed to disk as the
    point finishes. Opening the log of the same settings resumes it (a line cut short by a kill
    is dropped); other settings are an error unless ``force`` starts over.
    """

    FILE = "points.jsonl"

    def __init__(self, directory: Path, settings: dict[str, Any], *, force: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self.header = {"lora_arith_sweep": 1, "settings_sha256": digest}
        self.done: dict[str, dict[str, Any]] = {}
        if force and self.directory.exists():
            if self.directory.is_dir() and not self.directory.is_symlink():
                shutil.rmtree(self.directory)
            else:
                self.directory.unlink()
        if self.directory.exists() and not self.path.is_file():
            if not self.directory.is_dir() or any(self.directory.iterdir()):
                raise OptionError(
                    "force", "output {directory} exists and holds no sweep to resume; pass {} to overwrite it",
                    directory=self.directory,
                )
        if not self.directory.parent.resolve().is_dir():
            raise LoraArithError(f"output directory {self.directory.parent} does not exist")
        self.directory.mkdir(exist_ok=True)
        if self.path.is_file():
            self._read()
        else:
            self._append(self.header)

    def _read(self) -> None:
        data = self.path.read_bytes()
        valid, offset = [], 0
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):  # each record is one write ending in a newline: this one was cut short
                break
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if number > 1 and not _is_point_record(record):
                raise OptionError("force", "{path}:{number} is not a finished point; pass {} to start over",
                                  path=self.path, number=number)  # fmt: skip
            valid.append(record)
            offset += len(line)
        if not valid or valid[0] != self.header:
            raise OptionError(
                "force", "{path} records a sweep with other settings or inputs; pass {} to start over", path=self.path
            )
        if offset < len(data):  # a record cut short by a kill: drop it
            with open(self.path, "r+b") as handle:
                handle.truncate(offset)
        for record in valid[1:]:
            self.done[point_key(record["point"])] = record["result"]

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def add(self, point: dict[str, float], result: dict[str, Any]) -> None:
        """Record a finished point."""
        self._append({"point": point, "result": result})
        self.done[point_key(point)] = result


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows (without the full results) as CSV text."""
    columns = [key for key in rows[0] if key != "result"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def heatmap_planes(
    names: Sequence[str], grid_values: dict[str, list[float]], fixed: dict[str, float] | None = None
) -> list[tuple[str, str | None, dict[str, float]]]:
    """The (x, y, fixed weights of the others) of each heatmap: one per pair of vectors, the
    other vectors held at ``fixed`` (default: the grid value nearest 0)."""
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise OptionError(
            "fix", "{} names no swept vector: {unknown}; vectors: {names}", unknown=", ".join(unknown), names=", ".join(names)
        )
    for name, value in fixed.items():
        if not any(abs(value - v) < 1e-9 for v in grid_values[name]):
            raise OptionError("fix", "{} {name}={value:g} is not on the grid of {name}", name=name, value=value)
    if len(names) == 1:
        return [(names[0], None, {})]
    planes = []
    for x_name, y_name in itertools.combinations(names, 2):
        others = {n: fixed.get(n, min(grid_values[n], key=abs)) for n in names if n not in (x_name, y_name)}
        planes.append((x_name, y_name, others))
    return planes


def plot_heatmap(
    rows: Sequence[dict[str, Any]],
    names: Sequence[str],
    metric: str,
    path: Path,
    *,
    fixed: dict[str, float] | None = None,
) -> None:
    """Draw ``metric`` over the grid of ``names[0]`` × ``names[1]`` (a 1-row map for one adapter);
    only rows whose other vectors are at ``fixed`` are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fixed = fixed or {}
    rows = [r for r in rows if all(abs(r[f"eta_{n}"] - v) < 1e-9 for n, v in fixed.items())]
    x_name = names[0]
    y_name = names[1] if len(names) > 1 else None
    xs = sorted({row[f"eta_{x_name}"] for row in rows})
    ys = sorted({row[f"eta_{y_name}"] for row in rows}) if y_name else [0.0]
    grid = np.full((len(ys), len(xs)), np.nan)
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        y = ys.index(row[f"eta_{y_name}"]) if y_name else 0
        grid[y, xs.index(row[f"eta_{x_name}"])] = value

    figure, axes = plt.subplots(figsize=(1.1 * len(xs) + 2, 1.0 * len(ys) + 1.6))
    image = axes.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    axes.set_yticks(range(len(ys)), [f"{y:g}" for y in ys] if y_name else [""])
    axes.set_xlabel(f"η {x_name}")
    if y_name:
        axes.set_ylabel(f"η {y_name}")
    for (y, x), value in np.ndenumerate(grid):
        if not np.isnan(value):
            axes.text(
                x, y, f"{value:.2f}", ha="center", va="center", color="white" if value < np.nanmean(grid) else "black"
            )
    title = find_metric(metric).label
    if fixed:
        title += "\n(" + ", ".join(f"η {n} = {v:g}" for n, v in fixed.items()) + ")"
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def write_sweep(
    rows: Sequence[dict[str, Any]], names: Sequence[str], directory: Path, *, fixed: dict[str, float] | None = None
) -> list[Path]:
    """Write ``sweep.csv`` (rates with their Wilson bounds and n), ``sweep.json`` and heatmaps of
    each metric present into ``directory``, each file atomically; return the written paths.

    With one or two vectors the maps are ``heatmap_METRIC.png``; with more, one map per pair of
    vectors, ``heatmap_METRIC_X-Y.png``, the others held at ``fixed`` (see :func:`heatmap_planes`)."""
    from lora_arith._internal.atomic import atomic_output

    grid_values = {n: sorted({row[f"eta_{n}"] for row in rows}) for n in names}
    planes = heatmap_planes(names, grid_values, fixed)
    outputs: list[tuple[Path, Callable[[Path], None]]] = [
        (directory / "sweep.csv", lambda p: p.write_text(rows_to_csv(rows))),
        (directory / "sweep.json", lambda p: p.write_text(json.dumps(list(rows), indent=1, ensure_ascii=False))),
    ]
    for metric in (m.key for m in METRICS):
        if not any(row.get(metric) is not None for row in rows):
            continue
        for x_name, y_name, others in planes:
            suffix = "" if len(names) <= 2 else f"_{x_name}-{y_name}"
            plane = [x_name] + ([y_name] if y_name else [])
            outputs.append(
                (
                    directory / f"heatmap_{metric}{suffix}.png",
                    lambda p, plane=plane, metric=metric, others=others: plot_heatmap(
                        rows, plane, metric, p, fixed=others
                    ),
                )
            )
    for path, write in outputs:
        with atomic_output(path, directory=False, force=True) as temporary:
            write(temporary)
    return [path for path, _ in outputs]
