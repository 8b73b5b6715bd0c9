"""Sweeps over preference weights η: evaluate every grid point on one loaded base, write
CSV/JSON, and draw heatmaps in the style of the paper's Figure 2."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from lora_arith.errors import LoraArithError

HEATMAP_METRICS = {
    "refusal_rate_unsafe": "refusal rate on unsafe prompts",
    "compliance_rate_safe": "compliance rate on safe prompts",
    "logprob_margin": "log-prob margin (chosen − rejected)",
    "reward_accuracy": "implicit-reward accuracy",
}


def parse_grid(text: str) -> list[float]:
    """Parse ``"-1,-0.5,0,0.5,1"`` into sorted distinct floats."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise LoraArithError(f"cannot parse the grid {text!r}; expected numbers separated by commas") from None
    if not values:
        raise LoraArithError("the grid is empty")
    if not all(math.isfinite(value) for value in values):
        raise LoraArithError(f"the grid {text!r} holds a value that is not a finite number")
    return values


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an :func:`lora_arith.evaluation.evaluate` result, as one flat row."""
    row: dict[str, Any] = {}
    prompts, pairs = result.get("prompts", {}), result.get("pairs", {})
    for key in ("refusal_rate_unsafe", "compliance_rate_safe"):
        if key in prompts:
            row[key] = prompts[key]
    for key in ("logprob_margin", "reward_accuracy", "reward_margin"):
        if key in pairs:
            row[key] = pairs[key]
    return row


def run_sweep(
    mixer,
    grid: Sequence[float],
    evaluate_point: Callable[[Any], dict[str, Any]],
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate every combination of ``grid`` weights over the mixer's adapters.

    ``evaluate_point(mixer)`` runs the evaluation at the current mix and returns an
    :func:`~lora_arith.evaluation.evaluate` result. Returns one row per grid point: the
    weights (``eta_NAME``), the flat metrics and the full result under ``"result"``.
    """
    points = list(itertools.product(grid, repeat=len(mixer.names)))
    if progress:
        from tqdm import tqdm

        points = tqdm(points, desc="sweep", unit="point")
    rows = []
    for point in points:
        weights = dict(zip(mixer.names, point))
        mixer.set(**weights)
        result = evaluate_point(mixer)
        rows.append({**{f"eta_{n}": w for n, w in weights.items()}, **flatten(result), "result": result})
    return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows (without the full results) as CSV text."""
    columns = [key for key in rows[0] if key != "result"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_heatmap(rows: Sequence[dict[str, Any]], names: Sequence[str], metric: str, path: Path) -> None:
    """Draw ``metric`` over the grid of the first two adapters (a 1-row map for one adapter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    axes.set_title(HEATMAP_METRICS.get(metric, metric))
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_sweep(rows: Sequence[dict[str, Any]], names: Sequence[str], directory: Path) -> list[Path]:
    """Write ``sweep.csv``, ``sweep.json`` and one ``heatmap_METRIC.png`` per metric present
    into ``directory``; return the written paths."""
    written = [directory / "sweep.csv", directory / "sweep.json"]
    written[0].write_text(rows_to_csv(rows))
    written[1].write_text(json.dumps(list(rows), indent=1, ensure_ascii=False))
    for metric in HEATMAP_METRICS:
        if any(row.get(metric) is not None for row in rows):
            path = directory / f"heatmap_{metric}.png"
            plot_heatmap(rows, names, metric, path)
            written.append(path)
    return written
