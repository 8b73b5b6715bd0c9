"""Benchmark the norm of a high-rank LoRA module: lora-arith's blocked inner product against the
plain Gram formula ``Σ (BᵀB) ∘ (AAᵀ)`` (what ``inspect`` did before issue 11) and the dense ``‖BA‖``.

Workload: one module of ``--out`` × ``--in`` (default 576 × 576, a SmolLM2-135M attention
projection) with LoRA rank ``--rank`` (default 8000), random fp32 factors. Each method runs in
its own subprocess (this script re-invokes itself with ``--worker NAME``) and reports its time
and how far its peak resident memory (``VmHWM``) rose above the peak reached once the factors
were built, so one method's memory never pollutes another's. The parent imports only the
standard library.

Usage::

    python benchmarks/bench_norms.py                 # rank 8000 on 576×576
    python benchmarks/bench_norms.py --rank 2000 --out 4096 --in 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MARKER = "@@BENCH-RESULT@@ "
METHODS = ("lora-arith", "gram", "dense")
MiB = 1024**2


def _vm_hwm() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _worker(method: str, rank: int, out_features: int, in_features: int) -> dict:
    import torch

    from lora_arith.lora.factors import LowRankDelta, frobenius_norm, single_threaded

    generator = torch.Generator().manual_seed(0)
    B = torch.randn(out_features, rank, generator=generator) / rank**0.5
    A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    before = _vm_hwm()
    start = time.perf_counter()
    with single_threaded():
        if method == "lora-arith":
            norm = frobenius_norm(LowRankDelta(B, A))
        elif method == "gram":
            norm = float(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum()) ** 0.5
        else:
            norm = float(torch.linalg.matrix_norm(B.double() @ A.double()))
    seconds = time.perf_counter() - start
    factor_bytes = (B.numel() + A.numel()) * 4
    return {"method": method, "norm": norm, "seconds": seconds, "peak_rise": _vm_hwm() - before, "factors": factor_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8000)
    parser.add_argument("--out", dest="out_features", type=int, default=576)
    parser.add_argument("--in", dest="in_features", type=int, default=576)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARKER + json.dumps(_worker(args.worker, args.rank, args.out_features, args.in_features)))
        return

    shape = ["--rank", str(args.rank), "--out", str(args.out_features), "--in", str(args.in_features)]
    results = {}
    for method in METHODS:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", method, *shape], capture_output=True, text=True, check=True
        )
        line = next(line for line in done.stdout.splitlines() if line.startswith(MARKER))
        results[method] = json.loads(line[len(MARKER) :])

    ours = results["lora-arith"]
    print(f"module {args.out_features}×{args.in_features}, rank {args.rank}; factors {ours['factors'] / MiB:.1f} MiB (fp32)")
    print(f"{'method':12} {'time':>10} {'peak rise':>12} {'time ratio':>11} {'memory ratio':>13} {'rel. diff':>10}")
    for method, result in results.items():
        print(
            f"{method:12} {result['seconds'] * 1e3:8.1f} ms {result['peak_rise'] / MiB:8.1f} MiB "
            f"{result['seconds'] / ours['seconds']:10.2f}× {result['peak_rise'] / max(ours['peak_rise'], 1):12.1f}× "
            f"{abs(result['norm'] - ours['norm']) / ours['norm']:10.1e}"
        )


if __name__ == "__main__":
    main()
