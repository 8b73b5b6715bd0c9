"""What the benchmark scripts share to measure: worker processes, timing, peak RSS and report formatting.

A benchmark script re-invokes itself with a hidden ``--worker NAME --worker-params JSON`` argument
(:func:`add_worker_arguments`, :func:`run_worker_if_asked`); its parent runs each measurement in such a
fresh process (:func:`run_worker`) and reads one JSON line back, so one side's memory never pollutes
the other's. The parent imports only the standard library, and so does this module: on Linux
``ru_maxrss`` of a child inherits the high-water mark of the process it was spawned from, so a
heavy parent would inflate every child's figure. Workers report their own peak as ``VmHWM`` from
``/proc/self/status`` (reset at exec, :func:`peak_rss_bytes`), and a whole command is measured with
``getrusage(RUSAGE_CHILDREN)`` inside a small stdlib-only wrapper process (:func:`worker_cli`).
"""

from __future__ import annotations

# Only the standard library, at module level and below (see the module docstring).
import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULT_MARKER = "@@BENCH-RESULT@@ "
REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

Json = dict[str, Any]
Worker = Callable[[Json], Json]


# -- measuring --------------------------------------------------------------------------------


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS since its exec (``VmHWM``; falls back to ``ru_maxrss``)."""
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's RSS now (0 if unknown)."""
    return proc_status_bytes("VmRSS") or 0


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of ``function()``, measured with ``perf_counter``."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (empty where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def disk_bytes(path: Path) -> int:
    """The size of a file, or of every file below a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def git_commit() -> str | None:
    """The repository's HEAD commit (``-dirty`` if tracked files in lora_arith/ changed), if known."""

    def git(*words: str) -> str:
        completed = subprocess.run(["git", "-C", str(REPO), *words], capture_output=True, text=True, check=False)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "lora_arith") else "")


# -- worker processes -------------------------------------------------------------------------


def add_worker_arguments(parser: argparse.ArgumentParser, workers: Mapping[str, Worker]) -> None:
    """The hidden ``--worker NAME`` and ``--worker-params JSON`` options a script re-invokes itself with."""
    parser.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
    parser.add_argument("--worker-params", default="{}", help=argparse.SUPPRESS)


def run_worker_if_asked(workers: Mapping[str, Worker], args: argparse.Namespace) -> bool:
    """Entry point of a worker process: if ``args`` name a ``--worker``, run it, print its JSON result on
    one marked line and return True; otherwise (the parent) return False."""
    if not args.worker:
        return False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = workers[args.worker](json.loads(args.worker_params))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return True


def thread_env(threads: int | None) -> dict[str, str]:
    """The variables that pin a process's intra-op thread count (none for None: the library default)."""
    return {name: str(threads) for name in THREAD_VARIABLES} if threads else {}


def run_worker(script: str | Path, name: str, params: Json, env: Mapping[str, str] | None = None) -> Json:
    """Run worker ``name`` of ``script`` in a fresh Python process and return its JSON result (with the
    load average before and after: other processes on the machine make multi-threaded timings unreliable).

    The worker sees ``env`` on top of this process's environment, no Hugging Face network access, and
    this checkout first on ``PYTHONPATH`` (so the code measured is the ``lora_arith`` beside this file).
    """
    child_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH")]))
    argv = [sys.executable, str(Path(script).resolve()), "--worker", name, "--worker-params", json.dumps(params)]
    load_before = load_average()
    completed = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=child_env, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed (exit {completed.returncode}); stdout tail:\n{completed.stdout[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["load_average_before"], result["load_average_after"] = load_before, load_average()
    return result


def worker_cli(params: Json) -> Json:
    """Run ``params["argv"]`` as a child and report its wall time and peak RSS.

    This worker imports only the standard library, so ``RUSAGE_CHILDREN.ru_maxrss`` (which
    also carries this small process's high-water mark at spawn) is the child's own peak.
    """
    start = time.perf_counter()
    completed = subprocess.run(params["argv"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "argv": params["argv"],
        "returncode": completed.returncode,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "wrapper_peak_rss_bytes": peak_rss_bytes(),
        "stdout": completed.stdout[-3000:],
        "stderr": completed.stderr[-3000:],
    }


@contextlib.contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created if missing), or else a temporary folder that is removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    temporary = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(temporary)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(message, file=sys.stderr, flush=True)


# -- reporting --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    """Milliseconds below a second, seconds from there."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(value: float) -> str:
    """A ratio such as a speed-up: whole numbers from 10×, one decimal below."""
    return f"{value:,.0f}×" if value >= 10 else f"{value:.1f}×"


def gib(size: float) -> str:
    """A byte count in GiB."""
    return f"{size / GiB:.2f} GiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
