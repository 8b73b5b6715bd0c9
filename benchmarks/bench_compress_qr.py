"""CPU time of ``factors.compress`` on one Llama-3-8B layer: CholeskyQR2 (the default for
well-conditioned factors) against Householder QR (forced), side by side, with the ratio.

The workload is the one of ``bench_combine.py``: the exact sum of two random rank-16 adapters
(rank 32) on the seven projections of one decoder layer, compressed to rank 16. CPU time
(``time.process_time``, best of ``--repeats``) on one thread, as ``compress`` runs.

Usage::

    python benchmarks/bench_compress_qr.py --repeats 5
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import lora_arith.lora.factors as factors
from lora_arith.lora.factors import LowRankDelta, compress

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
"""(out, in) of q, k, v, o, gate, up, down in Llama-3-8B."""


def layer(rank: int, seed: int = 0) -> list[LowRankDelta]:
    """One layer's summed deltas (``B ~ N(0, 0.01²)``, ``A ~ N(0, 1/in)``, rank ``2 · rank``)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        LowRankDelta(torch.randn(out, 2 * rank, generator=generator) * 0.01,
                     torch.randn(2 * rank, inp, generator=generator) / math.sqrt(inp))
        for out, inp in SHAPES
    ]


def best_cpu_seconds(deltas: list[LowRankDelta], rank: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for delta in deltas:
            compress(delta, rank=rank)
        best = min(best, time.process_time() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="input and output rank (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant; the best counts (default 5)")
    args = parser.parse_args()
    deltas = layer(args.rank)
    compress(deltas[0], rank=args.rank)  # warm-up
    cholesky = best_cpu_seconds(deltas, args.rank, args.repeats)
    default_threshold = factors.CHOLESKY_QR_MAX_CONDITION
    factors.CHOLESKY_QR_MAX_CONDITION = 0.0  # every factor takes the Householder path
    try:
        householder = best_cpu_seconds(deltas, args.rank, args.repeats)
    finally:
        factors.CHOLESKY_QR_MAX_CONDITION = default_threshold
    print(f"compress, one 8B layer (7 modules, rank {2 * args.rank} → {args.rank}), CPU, best of {args.repeats}:")
    print(f"  CholeskyQR2 {cholesky * 1e3:.1f} ms, Householder QR {householder * 1e3:.1f} ms, "
          f"ratio Householder / CholeskyQR2 {householder / cholesky:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
