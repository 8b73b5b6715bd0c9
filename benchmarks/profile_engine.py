"""Where the time of `serve`'s engine goes, in-process (no HTTP): the figures behind the serving
section of docs/benchmarks.md.

* **one row**: the median decoding step of one request (ms);
* **32 rows**: the median step of a full batch, and torch's profile of one such step (the
  operators that take the most time);
* **load**: 32 clients each sending 4 requests in turn (32 new tokens, cycling over 4 mixes, as
  ``bench_serve.py``'s load): tokens/s, the share of the time spent in prefill, and how long the
  batch's time axis was and how much of it the rows attend to (the rest is masked work).

Usage::

    python benchmarks/profile_engine.py            # fp32
    python benchmarks/profile_engine.py --int8     # the base's linear layers in int8
    mkdir -p /tmp/old && git archive 1511a10 | tar -x -C /tmp/old
    python benchmarks/profile_engine.py --int8 --root /tmp/old   # the engine of another commit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int8", action="store_true", help="quantize the base's linear layers to int8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--root", type=Path, default=REPO, help="the tree whose lora_arith is measured (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))

    import torch
    from torch.profiler import profile

    from bench_serve import MIXES, prompts
    from lora_arith.model.mixing import PreferenceMixer

    print("lora_arith from", Path(sys.modules["lora_arith.model.mixing"].__file__).parents[2])
    from lora_arith.serving.engine import Engine

    try:
        from lora_arith.serving.protocol import RowRequest
    except ImportError:  # a tree from before RowRequest moved there
        from lora_arith.serving.engine import RowRequest  # type: ignore[attr-defined,no-redef]

    torch.set_num_threads(args.threads)
    adapters = {name: str(REPO / "adapters" / name) for name in ("helpful", "harmless")}
    mixer = PreferenceMixer(None, adapters)
    if args.int8:
        mixer.quantize_int8()
    engine = Engine(mixer).start()
    texts = prompts(32)
    ids = [engine.encode([{"role": "user", "content": text}]) for text in texts]

    def request(index: int, max_tokens: int = 32) -> RowRequest:
        helpful, harmless = MIXES[index % len(MIXES)]
        return RowRequest(list(ids[index % len(ids)]), {"helpful": helpful, "harmless": harmless}, max_tokens=max_tokens)

    steps: list[tuple[int, float]] = []
    prefills: list[float] = []
    axes: list[tuple[int, float]] = []
    profiles: list = []
    profile_next = [False]
    step, prefill = engine._step, engine._prefill

    def timed_step(handle) -> None:
        cache = engine._cache
        rows = len(engine._rows)
        if rows:
            axes.append((cache.length, float(cache.mask[:rows, : cache.length].float().mean())))
        started = time.perf_counter()
        if rows >= 32 and profile_next[0] and not profiles:
            with profile() as recorded:
                step(handle)
            profiles.append(recorded)
        else:
            step(handle)
        steps.append((rows, time.perf_counter() - started))

    def timed_prefill(admitted, handle) -> None:
        started = time.perf_counter()
        prefill(admitted, handle)
        prefills.append(time.perf_counter() - started)

    engine._step, engine._prefill = timed_step, timed_prefill  # the engine's own loop, timed
    try:
        engine.generate([request(0, 4)])  # warm-up
        steps.clear()
        engine.generate([request(0, 64)])
        print(f"one row: median step {1e3 * statistics.median(t for _, t in steps[2:]):.1f} ms")
        steps.clear()
        engine.generate([request(i) for i in range(32)])
        profile_next[0] = True  # the second time: the first full step
        engine.generate([request(i) for i in range(32)])
        full = [t for rows, t in steps if rows >= 32]
        print(f"32 rows: median step {1e3 * statistics.median(full):.1f} ms")
        if profiles:
            print(profiles[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        steps.clear(), prefills.clear(), axes.clear()

        def client(index: int) -> int:
            return sum(engine.generate([request(index + k)])[0].completion_tokens for k in range(4))

        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            tokens = sum(pool.map(client, range(32)))
        wall = time.perf_counter() - started
        print(
            f"load: {tokens / wall:.1f} tokens/s; prefill {sum(prefills) / wall:.0%} of the time, decoding steps "
            f"{sum(t for _, t in steps) / wall:.0%} (mean {statistics.mean(r for r, _ in steps):.1f} rows); time axis "
            f"{statistics.mean(a for a, _ in axes):.0f} columns on average, {statistics.mean(d for _, d in axes):.0%} of it attended"
        )
    finally:
        engine.close()


if __name__ == "__main__":
    main()
