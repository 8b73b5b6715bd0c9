"""Training that survives interruption: ``--save-steps`` checkpoints, ``--resume`` after a
SIGKILL (train and vector), ``--eval-data`` metrics, ``--precompute-ref``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import lora_arith
from lora_arith.cli import main
from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.factors import single_threaded
from lora_arith.training.train import (
    RUN_SETTINGS,
    TRAINING_METADATA,
    TrainConfig,
    checkpoint_folder,
    last_checkpoint,
    run_settings,
    single_file_name,
    train_preference,
)

QUICK = {"batch_size": 2, "grad_accum": 1, "max_length": 64, "rank": 4, "alpha": 8}
QUICK_ARGS = ["--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--rank", "4", "--alpha", "8"]
FP32_ARGS = ["--no-4bit", "--no-bf16"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread here and in the subprocesses (``OMP_NUM_THREADS=1``), so that every run of a
    comparison does its arithmetic in the same order."""
    with single_threaded():
        yield


def config(pairs_file: Path, chat_base: Path, **changes) -> TrainConfig:
    settings = dict(data=[str(pairs_file)], base=str(chat_base), quantize_4bit=False, bf16=False, **QUICK)
    return TrainConfig(**(settings | changes))


def launch(args: list[str]) -> subprocess.Popen:
    """``python -m lora_arith ARGS`` in a subprocess that imports this checkout's lora_arith, on one thread."""
    root = str(Path(lora_arith.__file__).parents[1])
    env = os.environ | {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lora_arith", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill_after(process: subprocess.Popen, checkpoint: Path, timeout: float = 1800) -> None:
    """SIGKILL ``process`` as soon as ``checkpoint`` is complete (its trainer_state.json written last)."""
    deadline = time.monotonic() + timeout
    while not (checkpoint / "trainer_state.json").is_file():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {checkpoint.name}:\n{process.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {checkpoint} after {timeout} s")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def assert_same_tensors(left: Path, right: Path) -> None:
    """The two safetensors files hold bit-identical tensors."""
    a, b = load_file(left), load_file(right)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def count_steps(monkeypatch) -> list[int]:
    """The steps the next trainer built by lora_arith.training.train runs (a callback added to it)."""
    import lora_arith.training.train as train
    from transformers import TrainerCallback

    steps: list[int] = []

    class Counter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    original = train._make_trainer

    def counted(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Counter())
        return trainer

    monkeypatch.setattr(train, "_make_trainer", counted)
    return steps


def test_killed_run_resumes_to_the_same_adapter_bit_for_bit(chat_base, pairs_file, tmp_path, monkeypatch):
    # 4 pairs, batch 2: 4 steps are 2 epochs, so the resumed run also crosses an epoch boundary
    args = ["train", "--data", str(pairs_file), "--base", str(chat_base), *QUICK_ARGS, *FP32_ARGS, "--max-steps", "4"]
    killed = tmp_path / "killed"
    checkpoints = checkpoint_folder(killed)
    assert checkpoints == tmp_path / "killed.checkpoints"
    process = launch([*args, "--save-steps", "1", "-o", str(killed)])
    kill_after(process, checkpoints / "checkpoint-1")
    assert not killed.exists(), "the run was really interrupted: no output yet"
    assert json.loads((checkpoints / RUN_SETTINGS).read_text())["swap"] is False

    done = last_checkpoint(checkpoints)
    assert done is not None and done.name in ("checkpoint-1", "checkpoint-2", "checkpoint-3")
    steps_run = count_steps(monkeypatch)
    result = CliRunner().invoke(main, [*args, "--save-steps", "1", "-o", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.output
    assert len(steps_run) == 4 - int(done.name.split("-")[1]), "only the steps after the checkpoint ran again"
    assert not checkpoints.exists(), "the checkpoints are removed once the output is written"
    log = json.loads((killed / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 2, 3, 4], "the log holds the steps before the kill too"

    whole = train_preference(config(pairs_file, chat_base, max_steps=4), tmp_path / "whole")
    # bit-identical: the checkpoint restores the adapter, AdamW moments, scheduler, the RNG states
    # and the step; transformers replays the sampler's epoch order and skips the batches done
    assert_same_tensors(killed / "adapter_model.safetensors", whole.path / "adapter_model.safetensors")
    assert [entry["loss"] for entry in log] == [entry["loss"] for entry in whole.log]


def test_vector_resumes_the_interrupted_run_and_skips_the_finished_one(chat_base, pairs_file, tmp_path, monkeypatch):
    import lora_arith.training.vector as vector

    args = ["vector", "--data", str(pairs_file), "--base", str(chat_base), *QUICK_ARGS, *FP32_ARGS, "--max-steps", "2"]
    phi = tmp_path / "phi.safetensors"
    kept = tmp_path / "phi.safetensors.checkpoints"
    process = launch([*args, "--save-steps", "1", "-o", str(phi)])
    kill_after(process, kept / "negative.checkpoints" / "checkpoint-1")  # the positive run is finished by then
    assert (kept / "positive" / "training_metadata.json").is_file() and not phi.exists()
    finished = (kept / "positive" / "adapter_model.safetensors").stat().st_mtime_ns

    calls = []
    original = vector.train_preference

    def spy(config, output, **options):
        calls.append((Path(output).name, options))
        return original(config, output, **options)

    monkeypatch.setattr(vector, "train_preference", spy)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(main, [*args, "--save-steps", "1", "-o", str(phi), "--resume", "--keep-runs", str(runs)])
    assert result.exit_code == 0, result.output
    assert calls == [("negative", {"swap": True, "resume": True, "force": False, "progress": False})], "positive is skipped"
    assert (runs / "positive" / "adapter_model.safetensors").stat().st_mtime_ns >= finished
    assert not kept.exists()
    from lora_arith.lora.adapter_io import open_adapter

    assert set(open_adapter(phi).training) == {"positive", "negative"}  # both runs' summaries, the skipped one too
    # (that a resumed run equals an uninterrupted one is tested above, for train)


def test_resume_errors_are_one_line(chat_base, pairs_file, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(pairs_file), "--base", str(chat_base), *QUICK_ARGS, *FP32_ARGS, "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and "nothing to resume: no checkpoint in" in result.output
    assert result.output.count("\n") == 1

    # a checkpoint folder as an interrupted run leaves it (a complete checkpoint-2, a cut-short checkpoint-3)
    checkpoints = checkpoint_folder(out)
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-3").mkdir()
    settings = run_settings(config(pairs_file, chat_base, lr=1e-3), swap=False)
    (checkpoints / RUN_SETTINGS).write_text(json.dumps(settings))
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "checkpoint-2: the settings differ from its run's (lr 0.001 -> 0.0005)" in result.output
    result = CliRunner().invoke(main, [*args, "--resume", "--swap", "--lr", "0.001"])
    assert result.exit_code == 1 and "(swap False -> True)" in result.output

    # damaged files an interrupted run left: one-line errors, not tracebacks inside transformers
    (checkpoints / RUN_SETTINGS).write_text("[1, 2]")
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"its {RUN_SETTINGS} is not a JSON object; --force starts over" in result.output
    (checkpoints / RUN_SETTINGS).write_text(json.dumps(run_settings(config(pairs_file, chat_base), swap=False)))
    for damaged in ("[1, 2]", '{"global_step": 2, "no_such_field": 1}', "{cut short"):
        (checkpoints / "checkpoint-2" / "trainer_state.json").write_text(damaged)
        result = CliRunner().invoke(main, [*args, "--resume"])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "checkpoint-2: its trainer_state.json is damaged" in result.output and "--force starts over" in result.output
    (checkpoints / RUN_SETTINGS).write_text(json.dumps(settings))

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "holds the checkpoints of an interrupted run" in result.output
    assert "--resume" in result.output and (checkpoints / "checkpoint-2").is_dir()

    # settings that do not change what is trained may differ (here save_steps and logging_steps)
    with pytest.raises(LoraArithError, match="differ"):
        train_preference(config(pairs_file, chat_base), out, resume=True)
    same = config(pairs_file, chat_base, lr=1e-3, save_steps=7, logging_steps=2)
    assert run_settings(same, swap=False) == settings

    result = CliRunner().invoke(main, [*args, "--max-steps", "1", "--warmup-ratio", "0", "--force"])
    assert result.exit_code == 0, result.output
    assert not checkpoints.exists(), "--force started over and discarded the old checkpoints"


def test_vector_resume_errors(chat_base, pairs_file, tmp_path):
    phi = tmp_path / "phi.safetensors"
    args = ["vector", "--data", str(pairs_file), "--base", str(chat_base), *QUICK_ARGS, "-o", str(phi)]
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in result.output
    kept = checkpoint_folder(phi)
    kept.mkdir()
    (kept / RUN_SETTINGS).write_text(json.dumps(run_settings(config(pairs_file, chat_base, rank=8), swap=False)))
    result = CliRunner().invoke(main, [*args, "--resume", "--no-4bit", "--no-bf16"])
    assert result.exit_code == 1 and "the settings differ" in result.output and "rank 8 -> 4" in result.output
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "holds the runs of an interrupted vector" in result.output


def test_eval_data_metrics_and_precomputed_reference(chat_base, pairs_file, tmp_path):
    out = tmp_path / "run"
    run = train_preference(
        config(pairs_file, chat_base, max_steps=2, eval_data=str(pairs_file), precompute_ref=True), out
    )
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 2]
    for entry in log:  # each step: its training metrics and its evaluation, in one entry
        assert {"loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(entry)
    info = json.loads((out / "training_metadata.json").read_text())
    assert info["training"]["eval"]["eval_loss"] == log[-1]["eval_loss"]
    assert info["eval_data"][0]["file"] == pairs_file.name and info["hyperparameters"]["precompute_ref"] is True
    # step 1 has learning rate 0 (warm-up): the policy is still the reference there, not after step 2
    assert log[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4) and log[1]["eval_loss"] < log[0]["eval_loss"]
    assert run.final_metrics["loss"] == log[-1]["loss"]

    # the reference log-probs are the frozen base's either way: precomputing them changes no result
    plain = train_preference(config(pairs_file, chat_base, max_steps=2), tmp_path / "plain")
    for mine, theirs in zip(log, plain.log):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["rewards/margins"] == pytest.approx(theirs["rewards/margins"], abs=1e-5)


def test_a_resumed_vector_whose_runs_are_done_is_written_by_the_main_process_only(chat_base, pairs_file, tmp_path, monkeypatch):
    """Under accelerate launch every process resumes; with both runs finished none trains, and
    only rank 0 may combine and write (every process wrote before)."""
    import lora_arith.training.vector as vector

    phi = tmp_path / "phi.safetensors"
    settings = config(pairs_file, chat_base)
    kept = checkpoint_folder(phi)
    for name, _ in vector.RUNS:
        run = kept / name
        run.mkdir(parents=True)
        (run / TRAINING_METADATA).write_text("{}")
        (run / single_file_name(run)).write_text("")
    (kept / RUN_SETTINGS).write_text(json.dumps(run_settings(settings, swap=False)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(vector, "train_preference", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert vector.train_vector(settings, phi, resume=True) is None
    assert not phi.exists() and kept.is_dir(), "rank 1 wrote nothing and left the runs to rank 0"
