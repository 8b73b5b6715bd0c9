"""The whole recipe for one preference: train θ+ on the pairs, θ− on the pairs swapped, and
extract the preference vector φ = Δ+ − Δ− exactly on the factors."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from lora_arith.adapter_io import DTYPES
from lora_arith.atomic import check_output
from lora_arith.combine import AdapterSpec, combine
from lora_arith.train import TrainConfig, train_preference, training_summary


def train_vector(
    config: TrainConfig,
    output: str | Path,
    *,
    keep_runs: str | Path | None = None,
    method: str = "cat",
    rank: int | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Train both DPO runs of ``config`` (its ``output`` and ``swap`` are ignored) and write
    φ = Δ+ − Δ− to ``output`` (a ``.safetensors`` file or a PEFT folder).

    The vector's metadata records both runs' training summaries. ``keep_runs`` names a folder
    to keep the two intermediate adapters in (as ``positive/`` and ``negative/``).
    """
    check_output(output, force)
    if keep_runs is not None:
        check_output(keep_runs, force)
    with tempfile.TemporaryDirectory(prefix="lora-arith-vector-") as work:
        runs = {}
        for name, swap in (("positive", False), ("negative", True)):
            runs[name] = train_preference(replace(config, output=str(Path(work) / name), swap=swap, overwrite=False))
        result = combine(
            [AdapterSpec(str(runs["positive"]), 1.0), AdapterSpec(str(runs["negative"]), -1.0)],
            method=method,
            rank=rank,
        )
        for item, name in zip(result.recipe["inputs"], runs):
            item["path"] = f"{name} run"
        result.training = {name: training_summary(path) for name, path in runs.items()}
        written = result.save(output, force=force, dtype=DTYPES[dtype] if dtype else None)
        if keep_runs is not None:
            if Path(keep_runs).exists():
                shutil.rmtree(keep_runs)
            shutil.copytree(work, keep_runs)
    return written
