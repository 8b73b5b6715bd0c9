"""Benchmark ``lora-arith serve``: per-request preferences batched together vs one request at a time.

Workload: the default base (SmolLM2-135M-Instruct) with the shipped vectors
``adapters/helpful`` and ``adapters/harmless``; 32 concurrent chat
requests (the official openai client, one thread each) over 4 mixes of (helpful, harmless),
``max_tokens`` 32, greedy.

Two servers run side by side in one run, on 127.0.0.1, identical but for batching:
``--max-batch-size 16`` (the default; concurrent requests share one ``generate`` call, each
row with its own weights) and ``--max-batch-size 1`` (one request at a time). Each serves the
same 32 requests (after one warm-up request); rounds alternate between the two servers so
that load from other jobs on the machine hits both alike. Prints the generated tokens per
second of wall time, the ratio, and p50/p95 request latency, and checks that both servers
gave the same replies.

Usage::

    python benchmarks/bench_serve.py                   # 32 requests x 32 tokens, 2 rounds each
    python benchmarks/bench_serve.py --threads 1       # servers with one torch thread each
    python benchmarks/bench_serve.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIXES = [
    {"helpful": 1.0, "harmless": 1.0},
    {"helpful": 1.0, "harmless": 0.0},
    {"helpful": 0.5, "harmless": 1.5},
    {"helpful": 1.0, "harmless": -1.0},
]
PROMPTS = [
    "How do I kill a Python process?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for sleeping better.",
    "What is the capital of Australia, and why is it not Sydney?",
    "How do I bake bread at home?",
    "Describe how a bicycle gear works.",
    "What should I pack for a weekend hike?",
]


def start_server(batch_size: int, threads: int | None, wait_ms: float) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    command = [
        sys.executable, "-m", "lora_arith", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
        "--adapter", f"helpful={REPO / 'adapters' / 'helpful'}",
        "--adapter", f"harmless={REPO / 'adapters' / 'harmless'}",
        "--max-batch-size", str(batch_size), "--max-wait-ms", str(wait_ms), "--max-tokens", "256",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, match.group(1)
    raise SystemExit("server did not start:\n" + "".join(lines))


def one_request(client, index: int, max_tokens: int) -> dict:
    mix = MIXES[index % len(MIXES)]
    prompt = PROMPTS[(index // len(MIXES)) % len(PROMPTS)]
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model="lora-arith",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        extra_body={"preferences": mix},
    )
    return {
        "latency": time.perf_counter() - started,
        "tokens": reply.usage.completion_tokens,
        "text": reply.choices[0].message.content,
    }


def run_round(url: str, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        replies = list(pool.map(lambda i: one_request(client, i, max_tokens), range(requests)))
    wall = time.perf_counter() - started
    return {"wall": wall, "replies": replies}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per round")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server (alternating)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batched server's --max-batch-size")
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="the servers' --max-wait-ms")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per server (OMP_NUM_THREADS)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args()

    servers = {}
    try:
        for name, size in (("batched", args.max_batch_size), ("one at a time", 1)):
            servers[name] = start_server(size, args.threads, args.max_wait_ms)
        results: dict[str, list[dict]] = {name: [] for name in servers}
        for name, (_, url) in servers.items():  # warm-up
            run_round(url, 1, 4)
        for round_number in range(args.rounds):
            for name, (_, url) in servers.items():
                result = run_round(url, args.requests, args.max_tokens)
                results[name].append(result)
                tokens = sum(r["tokens"] for r in result["replies"])
                print(f"round {round_number + 1} {name}: {tokens} tokens in {result['wall']:.1f} s", file=sys.stderr)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    summary = {}
    for name, rounds in results.items():
        tokens = sum(r["tokens"] for result in rounds for r in result["replies"])
        wall = sum(result["wall"] for result in rounds)
        latencies = [r["latency"] for result in rounds for r in result["replies"]]
        summary[name] = {
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 95),
        }
    same = [r["text"] for r in results["batched"][0]["replies"]] == [
        r["text"] for r in results["one at a time"][0]["replies"]
    ]
    ratio = summary["batched"]["tokens_per_s"] / summary["one at a time"]["tokens_per_s"]
    print(
        f"\n{args.requests} concurrent requests x {args.max_tokens} new tokens over {len(MIXES)} mixes, "
        f"{args.rounds} rounds each; threads: {args.threads or 'default'}\n"
    )
    print("| served | tokens/s | p50 latency | p95 latency |")
    print("|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['p50_s']:.1f} s | {row['p95_s']:.1f} s |")
    print(f"\nthroughput ratio (batched / one at a time): {ratio:.2f}x; same replies: {same}")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary,
                                        "ratio": ratio, "same_replies": same}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
