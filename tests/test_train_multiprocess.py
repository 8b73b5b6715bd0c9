"""``train`` as several processes: ``accelerate launch`` (DDP over gloo, on CPU) trains one adapter,
both processes take part, and only the main one writes checkpoints and the output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lora_arith
from lora_arith.lora.adapter_io import open_adapter

pytestmark = pytest.mark.multiprocess

# Records, per process (by RANK), every file opened for writing under $WRITES_UNDER, through
# Python's audit hook; written to $WRITES_LOG.RANK.PID at exit (RANK "launcher" for the
# launcher). torch.save and json writes go through Python's open; safetensors writes from Rust
# and is not seen.
AUDIT = '''
import atexit, os, sys
_under, _log = os.environ.get("WRITES_UNDER"), os.environ.get("WRITES_LOG")
if _under and _log:
    _seen = []
    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        path = os.fsdecode(args[0])
        if writes and path.startswith(_under):
            _seen.append(os.path.relpath(path, _under))
    sys.addaudithook(_hook)
    def _dump():
        with open(f"{_log}.{os.environ.get('RANK', 'launcher')}.{os.getpid()}", "w") as handle:
            handle.write("\\n".join(_seen))
    atexit.register(_dump)
'''


def free_port() -> str:
    """A TCP port free right now, for the processes' rendezvous (others may run tests alongside)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_accelerate_launch_two_cpu_processes(chat_base, pairs_file, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    runs = tmp_path / "runs"
    runs.mkdir()
    root = str(Path(lora_arith.__file__).parents[1])
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(hooks), root]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WRITES_UNDER": str(runs),
        "WRITES_LOG": str(tmp_path / "writes"),
    }
    out = runs / "run"
    # --multi_gpu (torchrun's launcher) starts the processes; --device cpu makes accelerate set up
    # MULTI_CPU over gloo. (`accelerate launch --cpu --num_processes 2` starts only one process.)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]
    train = ["-m", "lora_arith", "train", "--data", str(pairs_file), "--base", str(chat_base), "--device", "cpu"]
    train += ["--no-4bit", "--no-bf16", "--max-steps", "2", "--save-steps", "1", "--batch-size", "1"]
    train += ["--grad-accum", "1", "--max-length", "64", "--rank", "2", "-o", str(out)]
    done = subprocess.run([*launcher, *train], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lines = done.stdout.splitlines()
    assert any(line.startswith(f"wrote {out}: 4 pairs, 2 steps") and "rank 0 of 2 processes" in line for line in lines)
    assert f"rank 1 of 2: trained 2 steps; rank 0 writes {out}" in lines
    info = json.loads((out / "training_metadata.json").read_text())
    assert info["training"]["processes"] == 2 and info["training"]["steps"] == 2
    adapter = open_adapter(out)
    assert adapter.config["r"] == 2 and adapter.modules
    assert sorted(path.name for path in runs.iterdir()) == ["run"], "checkpoints removed, no temporary left"

    writes = {}
    for rank in ("0", "1"):
        (log,) = tmp_path.glob(f"writes.{rank}.*")  # one process per rank
        writes[rank] = [line for line in log.read_text().split("\n") if line]
    assert writes["1"] == [], f"rank 1 wrote {writes['1']}"
    main = writes["0"]
    for step in (1, 2):  # each checkpoint once, by the main process
        state = f"run.checkpoints/checkpoint-{step}/trainer_state.json"
        assert main.count(state) == 1, main
    assert sum(name.endswith("training_metadata.json") for name in main) == 1
