"""``lora-arith vector``: train θ+ on the pairs, θ− on the pairs swapped, and write the
preference vector φ = Δ+ − Δ− computed exactly on the factors."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lora_arith.adapter_io import DTYPES, output_kind
from lora_arith.atomic import atomic_output, check_output, removed_on_signal
from lora_arith.combine import combine
from lora_arith.specs import AdapterSpec
from lora_arith.train import TrainConfig, train_preference, training_inputs

RUNS = (("positive", False), ("negative", True))
"""The two DPO runs of a vector: their names (in the recipe and under ``--keep-runs``) and swap flags."""


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
    """Train both DPO runs of ``config`` and write φ = Δ+ − Δ− to ``output`` (a ``.safetensors``
    file or a PEFT folder).

    The vector's metadata records both runs' training summaries, which each run's single-file
    form carries. ``keep_runs`` names a folder to keep the two intermediate adapters in (as
    ``positive/`` and ``negative/``).
    """
    inputs = training_inputs(config)
    output = check_output(output, force=force, inputs=inputs, kind=output_kind(output))
    if keep_runs is not None:
        keep_runs = check_output(keep_runs, force=force, inputs=inputs, kind="runs", outputs=[output.path])
    with tempfile.TemporaryDirectory(prefix="lora-arith-vector-") as work, removed_on_signal(Path(work)):
        specs = []
        for (name, swap), weight in zip(RUNS, (1.0, -1.0)):
            run = train_preference(config, Path(work) / name, swap=swap)
            specs.append(AdapterSpec(str(run.single_file), weight, name=name))
        result = combine(specs, method=method, rank=rank)
        written = result.save(output, dtype=DTYPES[dtype] if dtype else None)
        if keep_runs is not None:
            with atomic_output(keep_runs) as folder:
                shutil.copytree(work, folder, dirs_exist_ok=True)
    return written
