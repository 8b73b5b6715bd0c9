"""Benchmark per-row mixing: is ``PreferenceMixer.generate`` without per-row weights as fast as
before it existed, and what do per-row weights cost?

Workload: the default base (SmolLM2-135M-Instruct) with the shipped vectors attached
(helpful 1, harmless 1), 16 chat prompts in one batch, 32 new tokens each, greedy, CPU fp32.

Three measurements, each the median of ``--repeats`` warm calls in its own process:

* ``before``: ``mixer.generate(prompts)`` with lora-arith as of ``--baseline`` (a git revision,
  default c7ff772, the commit before per-row mixing), extracted with ``git archive``;
* ``now``: the same call with this working tree;
* ``now, per-row``: this tree, ``mixer.generate(prompts, weights=...)`` with 4 different mixes.

Processes alternate over ``--rounds`` rounds, so load from other jobs hits all alike.

Usage::

    python benchmarks/bench_row_mixing.py                 # 3 rounds x 3 repeats
    python benchmarks/bench_row_mixing.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "How do I kill a Python process?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for sleeping better.",
] * 4
MIXES = [
    {"helpful": 1.0, "harmless": 1.0},
    {"helpful": 1.0, "harmless": 0.0},
    {"helpful": 0.5, "harmless": 1.5},
    {"helpful": 1.0, "harmless": -1.0},
]


def worker(kind: str, repeats: int, max_tokens: int) -> None:
    import torch

    from lora_arith.model.mixing import PreferenceMixer

    adapters = {name: str(REPO / "adapters" / f"{name}.safetensors") for name in ("helpful", "harmless")}
    mixer = PreferenceMixer(None, adapters, device="cpu")
    mixer.set(helpful=1.0, harmless=1.0)
    options = dict(max_new_tokens=max_tokens, batch_size=len(PROMPTS))
    if kind == "per-row":
        options["weights"] = [MIXES[i % len(MIXES)] for i in range(len(PROMPTS))]
    mixer.generate(PROMPTS[:2], max_new_tokens=2)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        texts = mixer.generate(PROMPTS, **options)
        times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "threads": torch.get_num_threads(), "texts": texts}))


def run(tree: Path, kind: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--repeats", str(args.repeats)]
    command += ["--max-tokens", str(args.max_tokens)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="c7ff772", help="git revision measured as 'before'")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", choices=["plain", "per-row"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats, args.max_tokens)

    with tempfile.TemporaryDirectory() as folder:
        old = Path(folder)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "lora_arith"], check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        (old / "adapters").symlink_to(REPO / "adapters")
        cases = {"before": (old, "plain"), "now": (REPO, "plain"), "now, per-row": (REPO, "per-row")}
        times: dict[str, list[float]] = {name: [] for name in cases}
        texts = {}
        for round_number in range(args.rounds):
            for name, (tree, kind) in cases.items():
                result = run(tree, kind, args)
                times[name] += result["times"]
                texts[name] = result["texts"]
                print(f"round {round_number + 1} {name}: {statistics.median(result['times']):.2f} s", file=sys.stderr)
    print(f"\n{len(PROMPTS)} prompts x {args.max_tokens} new tokens, one batch; median of {len(times['now'])} calls\n")
    print("| generate | median | vs before |")
    print("|---|---|---|")
    before = statistics.median(times["before"])
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} s | {statistics.median(values) / before:.3f}x |")
    print(f"\nsame texts before and now (no per-row weights): {texts['before'] == texts['now']}")


if __name__ == "__main__":
    main()
