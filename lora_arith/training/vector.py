"""``lora-arith vector``: train θ+ on the pairs, θ− on the pairs swapped, and write the
preference vector φ = Δ+ − Δ− computed exactly on the factors.

With ``config.save_steps`` (or ``resume``) the two runs are kept in ``OUTPUT.checkpoints/``
next to the output (``positive/``, ``negative/`` and their own ``*.checkpoints/`` folders), so
an interrupted vector can be resumed: a finished run is skipped, the interrupted one continues
from its last checkpoint. The folder is removed once the vector is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_arith.lora.adapter_io import output_kind
from lora_arith._internal.atomic import atomic_output, check_output, removed_on_signal
from lora_arith.lora.combine import check_options, combine
from lora_arith.lora.specs import AdapterSpec
from lora_arith._internal.errors import OptionError
from lora_arith.training.train import (
    RUN_SETTINGS,
    TRAINING_LOG,
    TRAINING_METADATA,
    TrainConfig,
    TrainResult,
    check_same_settings,
    discard_leftovers,
    checkpoint_folder,
    has_checkpoint,
    is_main_process,
    run_settings,
    single_file_name,
    train_preference,
    training_inputs,
)

__all__ = ["RUNS", "VectorResult", "train_vector"]

RUNS = (("positive", False), ("negative", True))
"""The two DPO runs of a vector: their names (in the recipe and under ``--keep-runs``) and swap flags."""


@dataclasses.dataclass(frozen=True)
class VectorResult:
    """A written preference vector: its path, and the two DPO runs it was made of (``positive``
    and ``negative``, each a :class:`~lora_arith.training.train.TrainResult` with its metadata and
    per-step log; their folders are gone unless ``keep_runs`` kept them, where their ``path`` points)."""

    path: Path
    runs: dict[str, TrainResult]

    def __repr__(self) -> str:
        runs = ", ".join(
            f"{name}=(steps={(run.metadata.get('training') or {}).get('steps')}, loss={run.final_metrics.get('loss')})"
            for name, run in self.runs.items()
        )
        return f"VectorResult(path={self.path!r}, {runs})"


def train_vector(
    config: TrainConfig,
    output: str | Path,
    *,
    keep_runs: str | Path | None = None,
    method: str = "cat",
    rank: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> VectorResult | None:
    """Train both DPO runs of ``config`` and write φ = Δ+ − Δ− to ``output`` (a ``.safetensors``
    file or a PEFT folder).

    The vector's metadata records both runs' training summaries, which each run's single-file
    form carries. ``keep_runs`` names a folder to keep the two intermediate adapters in (as
    ``positive/`` and ``negative/``). ``resume`` continues an interrupted vector (see the
    module's docstring); ``force`` also discards one. ``progress=False`` hides the runs'
    progress bars (see :func:`train_preference`).

    Returns a :class:`VectorResult` (the written output and both runs' logs), or None on the
    processes other than the main one under ``accelerate launch`` (they train, the main one writes).
    """
    check_options(method, rank, dtype=dtype)  # what the final combine is given, before both runs train
    inputs = training_inputs(config)
    output = check_output(output, force=force, inputs=inputs, kind=output_kind(output))
    if keep_runs is not None:
        keep_runs = check_output(keep_runs, force=force, inputs=inputs, kind="runs", outputs=[output.path])
    kept = checkpoint_folder(output.path)
    persistent = config.save_steps is not None or resume
    with _runs_folder(kept, config, persistent=persistent, resume=resume, force=force) as work:
        specs, runs = [], {}
        for (name, swap), weight in zip(RUNS, (1.0, -1.0)):
            run = work / name
            if not _finished(run):
                interrupted = has_checkpoint(run)
                # force only ever discards this run's own stale checkpoints: the run itself is unfinished
                runs[name] = train_preference(
                    config, run, swap=swap, resume=interrupted, force=not interrupted, progress=progress
                )
            specs.append(AdapterSpec(str(run / single_file_name(run)), weight, name=name))
        if not is_main_process():  # every process trains, the main one writes (also when no run was left to train)
            return None
        for name, _ in RUNS:  # a run finished by an earlier, interrupted call: its record as it wrote it
            runs[name] = runs.get(name) or _recorded(work / name)
        result = combine(specs, method=method, rank=rank)
        written = result.save(output, dtype=dtype)
        if keep_runs is not None:
            with atomic_output(keep_runs) as folder:
                for name, _ in RUNS:
                    shutil.copytree(work / name, folder / name)
            runs = {name: dataclasses.replace(run, path=Path(keep_runs.path) / name) for name, run in runs.items()}
    if persistent:
        shutil.rmtree(kept, ignore_errors=True)
    return VectorResult(Path(written), runs)


def _recorded(run: Path) -> TrainResult:
    """The result of a finished run, read back from its folder."""
    log = run / TRAINING_LOG
    return TrainResult(
        run, json.loads((run / TRAINING_METADATA).read_text()), json.loads(log.read_text()) if log.is_file() else []
    )


def _finished(run: Path) -> bool:
    """Whether the run folder holds a finished adapter (written atomically, so whole or absent)."""
    return (run / TRAINING_METADATA).is_file() and (run / single_file_name(run)).is_file()


@contextlib.contextmanager
def _runs_folder(kept: Path, config: TrainConfig, *, persistent: bool, resume: bool, force: bool) -> Iterator[Path]:
    """The folder the two runs are written to: ``kept`` when ``persistent`` (surviving a kill,
    checked against ``config`` when resuming), else a temporary folder removed at the end or on
    a signal. Without ``resume``, the runs of an interrupted vector in ``kept`` are refused
    unless ``force``, which discards them."""
    settings = run_settings(config, swap=False)
    record = kept / RUN_SETTINGS
    if resume:
        if not kept.is_dir():
            raise OptionError("save_steps", "nothing to resume: {where} does not exist (it is written with {} N)", where=kept)
        check_same_settings(kept, settings, kept)
    else:
        discard_leftovers(kept, "the runs of an interrupted vector", force=force)
    if not persistent:
        with tempfile.TemporaryDirectory(prefix="lora-arith-vector-") as work, removed_on_signal(Path(work)):
            yield Path(work)
        return
    kept.mkdir(parents=True, exist_ok=True)
    if is_main_process() and not record.is_file():
        with atomic_output(record, force=True) as path:
            path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    yield kept
