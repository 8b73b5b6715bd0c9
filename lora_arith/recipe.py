"""The whole recipe for one preference: train θ+ on the pairs, θ− on the pairs swapped, and
extract the preference vector φ = Δ+ − Δ− exactly on the factors."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from lora_arith.adapter_io import DTYPES, output_kind
from lora_arith.atomic import atomic_output, check_output, removed_on_signal
from lora_arith.combine import AdapterSpec, combine
from lora_arith.train import TrainConfig, train_preference, training_inputs, training_summary


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
    inputs = training_inputs(config)
    output = check_output(output, force=force, inputs=inputs, kind=output_kind(output))
    if keep_runs is not None:
        keep_runs = check_output(keep_runs, force=force, inputs=inputs, kind="runs", outputs=[output.path])
    with tempfile.TemporaryDirectory(prefix="lora-arith-vector-") as work, removed_on_signal(Path(work)):
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
        written = result.save(output, dtype=DTYPES[dtype] if dtype else None)
        if keep_runs is not None:
            with atomic_output(keep_runs) as folder:
                shutil.copytree(work, folder, dirs_exist_ok=True)
    return written
