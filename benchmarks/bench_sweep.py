"""Benchmark batched sweeps: several grid points per generation batch (per-row weights) against
one point at a time, side by side in one process, with the greedy texts checked identical.

Workload: the default base (SmolLM2-135M-Instruct) with the shipped vectors helpful and harmless
attached, the 5×5 grid -1,-0.5,0,0.5,1 and the XSTest eval prompts
(``../shared/data/eval/xstest_prompts.jsonl``, 234 prompts; ``--prompts-per-kind N`` takes the
first N unsafe and N safe ones), greedy, ``--max-new-tokens`` (default 24), batch size 16, CPU fp32.

* ``one point at a time``: :func:`lora_arith.evaluation.sweep.evaluate_points` with ``points_per_batch=1``:
  set the mix, generate all prompts, next point (the sweep's path before batching);
* ``batched``: the same with ``points_per_batch=P`` (``--points-per-batch``, default 5): each
  length group of 16 prompts is generated once for P points (16·P rows), each prompt tokenized
  once, with fused per-row LoRA (one GEMM pair per module, ``PreferenceMixer.row_weights(...,
  fused=True)``) and the engine behind ``serve`` (``serving.engine.Engine``: rows leave as they finish).

The two runs alternate by point chunk (one chunk of P points one way, then the same chunk the
other way, the first of the two alternating from chunk to chunk and round to round), so load from
other jobs on the machine hits both alike; ``--repeats R`` runs R rounds and reports the medians.
Prints a table and the ratio.

Usage::

    python benchmarks/bench_sweep.py                          # 5x5 grid, 16+16 prompts: a few minutes
    python benchmarks/bench_sweep.py --prompts-per-kind 200   # all 234 prompts (~40 min on 2 cores)
    python benchmarks/bench_sweep.py --threads 2 --out bench.json
    python benchmarks/bench_sweep.py --threads 1 --max-points 10 --points-per-batch 10   # a quicker subset
    python benchmarks/bench_sweep.py --max-points 5 --max-new-tokens 8 --profile   # top torch ops of each path
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=DATA / "eval" / "xstest_prompts.jsonl")
    parser.add_argument("--prompts-per-kind", type=int, default=16)
    parser.add_argument("--grid", default="-1,-0.5,0,0.5,1")
    parser.add_argument("--points-per-batch", type=int, default=5)
    parser.add_argument("--max-points", type=int, default=None, help="Only the first N points of the grid.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=1, help="Rounds of the whole comparison; medians are reported (default 1)."
    )
    parser.add_argument("--out", type=Path, default=None, help="Also write the figures as JSON here.")
    parser.add_argument(
        "--share-prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Batched path: run the prompts' common prefix (system turn) once per point (default: yes).",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Profile the first chunk of each path (torch profiler, top ops). It keeps every op: use a short "
        "--max-new-tokens (e.g. 8), or it runs out of memory.",
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lora_arith.evaluation.evaluate import load_eval_prompts
    from lora_arith.model.mixing import PreferenceMixer
    from lora_arith.evaluation.sweep import evaluate_points, grid_points, parse_grid

    items = load_eval_prompts([args.prompts])
    items = [p for p in items if p.should_refuse][: args.prompts_per_kind] + [p for p in items if not p.should_refuse][
        : args.prompts_per_kind
    ]
    adapters = {name: str(REPO / "adapters" / name) for name in ("helpful", "harmless")}
    mixer = PreferenceMixer(None, adapters, device="cpu")
    points = grid_points(mixer.names, parse_grid(args.grid))[: args.max_points]
    options = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    mixer.generate(["hi"], max_new_tokens=2)  # warm-up

    size = args.points_per_batch
    paths = (("one point at a time", 1), ("batched", size))
    totals: dict[str, list[float]] = {label: [] for label, _ in paths}
    texts: dict[str, list] = {}
    same = True
    for repeat in range(args.repeats):
        times = {label: 0.0 for label, _ in paths}
        run_texts: dict[str, list] = {label: [] for label, _ in paths}
        for number, start in enumerate(range(0, len(points), size)):
            chunk = points[start : start + size]
            order = paths if (repeat + number) % 2 == 0 else paths[::-1]  # who goes first alternates
            for label, per_batch in order:
                profiler = None
                if args.profile and start == 0 and repeat == 0:
                    from torch.profiler import ProfilerActivity, profile

                    profiler = profile(activities=[ProfilerActivity.CPU])
                    profiler.__enter__()
                began = time.perf_counter()
                results = evaluate_points(
                    mixer, chunk, items, points_per_batch=per_batch, share_prefix=args.share_prefix, **options
                )
                times[label] += time.perf_counter() - began
                if profiler is not None:
                    profiler.__exit__(None, None, None)
                    print(f"profile of {label} ({len(chunk)} points):", flush=True)
                    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10), flush=True)
                run_texts[label] += [[c["completion"] for c in result["completions"]] for result in results]
            done = start + len(chunk)
            print(
                f"round {repeat + 1}/{args.repeats}, {done}/{len(points)} points: "
                f"one at a time {times['one point at a time']:.1f} s, batched {times['batched']:.1f} s",
                flush=True,
            )
        for label, _ in paths:
            totals[label].append(times[label])
        same = same and run_texts["one point at a time"] == run_texts["batched"]
        texts = texts or run_texts
    differing = sum(
        a != b for row_a, row_b in zip(texts["one point at a time"], texts["batched"]) for a, b in zip(row_a, row_b)
    )
    seconds = {label: statistics.median(values) for label, values in totals.items()}
    ratio = seconds["one point at a time"] / seconds["batched"]
    ratios = [one / batched for one, batched in zip(totals["one point at a time"], totals["batched"])]
    work = f"{len(points)} points × {len(items)} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}"
    work += f", prefix {'shared' if args.share_prefix else 'not shared'}"
    print()
    print(f"Workload: {work}; threads {torch.get_num_threads()}; {args.repeats} round(s), medians")
    print()
    print("| path | wall time (s) | per point (s) | speed-up |")
    print("| --- | --- | --- | --- |")
    for label, value in seconds.items():
        speed = 1.0 if label == "one point at a time" else ratio
        name = label if label != "batched" else f"batched ({size} points per batch)"
        print(f"| {name} | {value:.1f} | {value / len(points):.2f} | {speed:.2f}× |")
    print()
    if args.repeats > 1:
        print("speed-up of each round: " + ", ".join(f"{value:.2f}×" for value in ratios))
    print(f"identical greedy texts: {same} ({differing} of {len(points) * len(items)} completions differ in round 1)")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "workload": work,
                    "seconds": seconds,
                    "rounds": totals,
                    "ratio": ratio,
                    "identical": same,
                    "differing": differing,
                }
            )
        )


if __name__ == "__main__":
    main()
