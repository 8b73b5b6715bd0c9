"""Exact arithmetic on low-rank deltas, done on the factors alone.

A module's delta is ``ΔW = B @ A`` with ``B`` of shape ``(out, r)`` and ``A`` of shape
``(r, in)``; any adapter scaling is already folded into the factors. Nothing here builds
the dense ``out × in`` matrix except :func:`to_dense`, which exists for checks and tests.

All results are computed in fp32 (the small cores in fp64) and are deterministic,
including the signs of singular vectors.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

__all__ = [
    "LowRankDelta",
    "Compression",
    "weighted_sum",
    "compress",
    "inner",
    "frobenius_norm",
    "cosine",
    "to_dense",
    "subspaces",
    "projected_energy",
    "single_threaded",
]

_F = TypeVar("_F", bound=Callable)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread for the duration.

    The work here is many small LAPACK/BLAS calls (thin QR, r×r SVDs, tall-skinny matmuls).
    Spreading each over threads costs more than it saves, and on a busy machine OpenMP's
    barriers make it dramatically slower (measured: a 14336×32 QR took 0.28 s on two busy
    cores and 3 ms on one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _on_one_thread(function: _F) -> _F:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_threaded():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class LowRankDelta:
    """A weight delta ``B @ A`` kept as its two factors.

    Attributes:
        B: the "up" factor, shape ``(out_features, rank)``.
        A: the "down" factor, shape ``(rank, in_features)``.
    """

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"factors do not chain: B {tuple(self.B.shape)} @ A {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        """The inner dimension of the factors (an upper bound on the true rank)."""
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape ``(out, in)`` of the dense delta."""
        return (self.B.shape[0], self.A.shape[1])

    def __repr__(self) -> str:  # the factors' values would fill a notebook cell
        return f"LowRankDelta(shape={self.shape}, rank={self.rank}, dtype={self.B.dtype})"

    def scaled(self, weight: float) -> "LowRankDelta":
        """Return ``weight · ΔW`` (the weight goes into ``B``; negative weights are fine)."""
        return LowRankDelta(self.B * weight, self.A)

    def __neg__(self) -> "LowRankDelta":
        return self.scaled(-1.0)

    def __add__(self, other: "LowRankDelta") -> "LowRankDelta":
        return weighted_sum([self, other], [1.0, 1.0])

    def __sub__(self, other: "LowRankDelta") -> "LowRankDelta":
        return weighted_sum([self, other], [1.0, -1.0])

    def __mul__(self, weight: float) -> "LowRankDelta":
        return self.scaled(weight)

    __rmul__ = __mul__


@dataclass(frozen=True)
class Compression:
    """The outcome of :func:`compress` for one module.

    Attributes:
        delta: the rank-``rank`` factors.
        rank: the rank that was kept.
        relative_error: ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` (0 for a zero delta).
        singular_values: every singular value of ``ΔW`` (fp64, descending).
    """

    delta: LowRankDelta
    rank: int
    relative_error: float
    singular_values: torch.Tensor


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


@_on_one_thread
def weighted_sum(deltas: Sequence[LowRankDelta], weights: Iterable[float]) -> LowRankDelta:
    """Return ``Σ wᵢ ΔWᵢ`` exactly, by concatenation: ``B = [w₁B₁ | w₂B₂ | …]``, ``A = [A₁; A₂; …]``.

    The rank of the result is the sum of the input ranks; use :func:`compress` to reduce it.
    """
    weights = list(weights)
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("weighted_sum needs one weight per delta and at least one delta")
    shapes = {d.shape for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"deltas have different shapes: {sorted(shapes)}")
    # Scale each B straight into its slice of the result: one pass over the data instead of two.
    B = torch.empty(deltas[0].shape[0], sum(d.rank for d in deltas), dtype=torch.float32)
    start = 0
    for delta, weight in zip(deltas, weights):
        torch.mul(_fp32(delta.B), float(weight), out=B[:, start : start + delta.rank])
        start += delta.rank
    A = torch.cat([_fp32(d.A) for d in deltas], dim=0)
    return LowRankDelta(B, A)


def _signed_columns(transposed: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: flip row pairs of ``transposed`` (``B'ᵀ``, k × out, contiguous) and
    ``rows`` (``A'``, k × in) in place so that each left singular vector (a row of ``transposed``, a
    column of ``B'``) has its largest-magnitude entry positive. Returns ``(B', A')``.

    Working on ``B'ᵀ`` keeps the per-vector maximum a reduction along contiguous memory (down the
    columns of a row-major ``out × k`` matrix it is much slower), and the flip happens only where needed."""
    if transposed.numel():
        flip = transposed.amax(dim=1) < -transposed.amin(dim=1)
        if bool(flip.any()):
            signs = 1.0 - 2.0 * flip.to(transposed.dtype)
            transposed.mul_(signs[:, None])
            rows.mul_(signs[:, None])
    return transposed.T, rows


def _rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    energies = singular_values.square()
    total = energies.sum()
    if total <= 0:
        return 0
    kept = torch.cumsum(energies, 0) / total
    # Tolerate round-off: a rank whose kept fraction is within 1e-12 of the target qualifies.
    return int((kept < energy - 1e-12).sum().item()) + 1


CHOLESKY_QR_MAX_CONDITION = 100.0
"""The largest condition number of a factor that :func:`compress` reduces by CholeskyQR2.

CholeskyQR2 (two rounds of Cholesky-QR) is as accurate as Householder QR while the first round's
Gram matrix is well conditioned, which in fp32 holds comfortably up to this κ (κ² u₃₂ ≈ 6e-4);
beyond it, or for a rank-deficient factor, Householder QR is used."""


def _cholesky_qr2(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Q₁, T, R)`` with ``X = Q₁ T⁻¹ · R`` (``Q = Q₁ T⁻¹`` orthonormal, ``R`` upper triangular, fp64)
    by CholeskyQR2 on the fp32 ``m × r`` matrix ``X``, or ``None`` when ``X`` is too ill conditioned
    (see :data:`CHOLESKY_QR_MAX_CONDITION`) for it.

    Round 1: ``XᵀX = R₁ᵀR₁`` (Cholesky in fp64 of the fp32 Gram matrix), ``Q₁ = X R₁⁻¹``. Round 2:
    ``Q₁ᵀQ₁ = TᵀT`` and ``R = T R₁``. ``Q₁`` is orthonormal up to the first round's error only, which
    ``T`` (close to the identity) removes; ``Q₁ T⁻¹`` is never formed, the caller applies ``T⁻¹`` to its small factors.
    """
    m, r = X.shape
    if r > m:
        return None
    gram = (X.T @ X).double()
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending; κ(X)² = λ_max / λ_min
    if not eigenvalues[0] > eigenvalues[-1] / CHOLESKY_QR_MAX_CONDITION**2:
        return None
    L1, info = torch.linalg.cholesky_ex(gram)
    if info:
        return None
    R1 = L1.T
    Q1 = X @ torch.linalg.solve_triangular(R1, torch.eye(r, dtype=torch.float64), upper=True).float()
    L2, info = torch.linalg.cholesky_ex((Q1.T @ Q1).double())
    if info:
        return None
    T = L2.T
    return Q1, T, T @ R1


def _householder_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, I, R)`` by Householder QR, in the form of :func:`_cholesky_qr2` (``T`` = identity)."""
    Q, R = torch.linalg.qr(X)
    return Q, torch.eye(R.shape[0], dtype=torch.float64), R.double()


@_on_one_thread
def compress(
    delta: LowRankDelta,
    rank: int | None = None,
    energy: float | None = None,
) -> Compression:
    """Return the optimal (Eckart–Young) low-rank approximation of ``delta`` without forming ``ΔW``.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` are reduced by QR; the small core ``R_B R_Aᵀ`` is
    decomposed by SVD, ``U S Vᵀ``; the result is ``B' = Q_B U_k √S_k`` and ``A' = √S_k V_kᵀ Q_Aᵀ``.

    Args:
        delta: the delta to compress.
        rank: keep exactly this many singular values (capped at the exact rank of the factors).
            Must not exceed ``min(out, in)``.
        energy: instead of ``rank``, keep the smallest rank whose singular values hold at least
            this fraction of ``‖ΔW‖_F²`` (0 < energy ≤ 1).

    Exactly one of ``rank`` and ``energy`` must be given. The kept rank is at least 1, so that
    the result is a valid LoRA module even for a zero delta.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    out_features, in_features = delta.shape
    if rank is not None and not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"rank {rank} is outside 1..{min(out_features, in_features)} for a {out_features}×{in_features} module"
        )
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")

    B, A = _fp32(delta.B), _fp32(delta.A)
    B_qr, A_qr = _cholesky_qr2(B), _cholesky_qr2(A.T)
    if B_qr is None or A_qr is None:  # ill conditioned or rank deficient: Householder QR
        B_qr, A_qr = _householder_qr(B), _householder_qr(A.T)
    (Q_B, T_B, R_B), (Q_A, T_A, R_A) = B_qr, A_qr
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)

    k = rank if rank is not None else _rank_for_energy(S, energy)
    k = max(1, min(k, S.numel()))
    root = S[:k].sqrt()
    # Q = Q₁ T⁻¹: the last triangular factor and √S are applied to the small r×k matrices, so that
    # each factor is read once more, by one product (B' is computed as B'ᵀ, see _signed_columns).
    left_small = torch.linalg.solve_triangular(T_B, U[:, :k] * root, upper=True).float()
    right_small = torch.linalg.solve_triangular(T_A, Vh[:k].T * root, upper=True).float()
    B_k, A_k = _signed_columns(left_small.T @ Q_B.T, right_small.T @ Q_A.T)

    total = S.square().sum()
    dropped = S[k:].square().sum()
    relative_error = float((dropped / total).sqrt()) if total > 0 else 0.0
    return Compression(LowRankDelta(B_k, A_k), k, relative_error, S)


_MIN_BLOCK_ELEMENTS = 1 << 16


@_on_one_thread
def inner(a: LowRankDelta, b: LowRankDelta) -> float:
    """Frobenius inner product ``⟨B₁A₁, B₂A₂⟩``, from the factors (fp64).

    Computed as ``Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ)``, which costs ``(out + in)·r₁·r₂``, or, when that is
    dearer, as ``Σ (B₁A₁) ∘ (B₂A₂)`` over blocks of rows, which costs ``out·in·(r₁ + r₂)``.
    Either way the work is split into blocks so that no temporary is larger than the factors
    themselves: memory stays bounded by the module's size, also for ranks in the thousands
    (whose ``r₁×r₂`` Gram matrices would otherwise take gigabytes).
    """
    if a.shape != b.shape:
        raise ValueError(f"deltas have different shapes: {a.shape} and {b.shape}")
    out_features, in_features = a.shape
    r1, r2 = a.rank, b.rank
    B1, A1 = a.B.double(), a.A.double()
    B2, A2 = (B1, A1) if b is a else (b.B.double(), b.A.double())
    budget = max((out_features + in_features) * max(r1, r2), _MIN_BLOCK_ELEMENTS)
    total = torch.zeros((), dtype=torch.float64)
    if out_features * in_features * (r1 + r2) < (out_features + in_features) * r1 * r2:
        rows = max(1, budget // (2 * max(in_features, 1)))
        for start in range(0, out_features, rows):
            stop = start + rows
            left = B1[start:stop] @ A1
            total += (left * (left if b is a else B2[start:stop] @ A2)).sum()
        return float(total)
    step1 = max(1, min(r1, budget // max(r2, 1)))
    step2 = max(1, min(r2, budget // step1))
    for i in range(0, r1, step1):
        for j in range(0, r2, step2):
            left = B1[:, i : i + step1].T @ B2[:, j : j + step2]
            right = A1[i : i + step1] @ A2[j : j + step2].T
            total += (left * right).sum()
    return float(total)


def frobenius_norm(delta: LowRankDelta) -> float:
    """``‖B A‖_F`` from the factors."""
    return max(inner(delta, delta), 0.0) ** 0.5


def cosine(a: LowRankDelta, b: LowRankDelta) -> float:
    """Cosine similarity of two deltas as flattened matrices (0 if either is zero)."""
    denominator = frobenius_norm(a) * frobenius_norm(b)
    return inner(a, b) / denominator if denominator > 0 else 0.0


@_on_one_thread
def subspaces(delta: LowRankDelta, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases ``(U, V)`` of the column space (``out × k``) and row space (``in × k``)
    of ``ΔW = B A``, from the factors.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` by QR, then the small core ``R_B R_Aᵀ = U_c S V_cᵀ`` by
    SVD; ``U = Q_B U_c`` and ``V = Q_A V_c``, keeping the ``k`` singular values above
    ``rtol · S_max`` (so a rank-deficient factor adds no spurious directions). Both are fp64;
    a zero delta gives empty bases.
    """
    Q_B, R_B = torch.linalg.qr(delta.B.double())
    Q_A, R_A = torch.linalg.qr(delta.A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    k = int((S > rtol * S.max()).sum()) if S.numel() and S.max() > 0 else 0
    return Q_B @ U[:, :k], Q_A @ Vh[:k].T


@_on_one_thread
def projected_energy(delta: LowRankDelta, basis: torch.Tensor, side: str) -> float:
    """``‖P ΔW‖_F²`` (``side="column"``) or ``‖ΔW P‖_F²`` (``side="row"``), where ``P = basis basisᵀ``
    projects onto the span of ``basis``'s orthonormal columns; from the factors (fp64).

    ``‖Uᵀ B A‖² = Σ (CᵀC) ∘ (A Aᵀ)`` with ``C = Uᵀ B`` (and symmetrically for the row side), so no
    ``out × in`` matrix is formed. Divide by ``frobenius_norm(delta) ** 2`` for the share of energy.
    """
    B, A, basis = delta.B.double(), delta.A.double(), basis.double()
    if side == "column":
        if basis.shape[0] != B.shape[0]:
            raise ValueError(f"a column basis needs {B.shape[0]} rows, got {basis.shape[0]}")
        C = basis.T @ B
        return float(((C.T @ C) * (A @ A.T)).sum())
    if side == "row":
        if basis.shape[0] != A.shape[1]:
            raise ValueError(f"a row basis needs {A.shape[1]} rows, got {basis.shape[0]}")
        C = A @ basis
        return float(((B.T @ B) * (C @ C.T)).sum())
    raise ValueError(f"side must be 'column' or 'row', got {side!r}")


def to_dense(delta: LowRankDelta) -> torch.Tensor:
    """The dense ``out × in`` matrix ``B @ A`` in fp32. For checks and small modules only."""
    return _fp32(delta.B) @ _fp32(delta.A)
