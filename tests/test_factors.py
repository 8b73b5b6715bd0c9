"""Exactness of the factor arithmetic against dense computations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_arith.lora.factors import (
    LowRankDelta,
    compress,
    cosine,
    frobenius_norm,
    inner,
    projected_energy,
    subspaces,
    to_dense,
    weighted_sum,
)


def random_delta(out: int, inp: int, rank: int, seed: int) -> LowRankDelta:
    generator = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(out, rank, generator=generator), torch.randn(rank, inp, generator=generator))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(b.norm(), 1e-30))


def test_weighted_sum_is_dense_sum_with_negative_weights():
    deltas = [random_delta(40, 24, r, seed) for seed, r in enumerate((3, 5, 2))]
    weights = [0.8, -1.5, 0.25]
    summed = weighted_sum(deltas, weights)
    expected = sum(w * to_dense(d) for d, w in zip(deltas, weights))
    assert summed.rank == 10
    assert relative(to_dense(summed), expected) < 1e-6


def test_operators_match_weighted_sum():
    a, b = random_delta(12, 9, 2, 0), random_delta(12, 9, 3, 1)
    assert torch.allclose(to_dense(a - b), to_dense(a) - to_dense(b), atol=1e-5)
    assert torch.allclose(to_dense(2.0 * a + b), 2 * to_dense(a) + to_dense(b), atol=1e-5)
    assert torch.allclose(to_dense(-a), -to_dense(a))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_reaches_eckart_young_optimum(k):
    summed = weighted_sum([random_delta(50, 30, 4, 3), random_delta(50, 30, 4, 4)], [1.0, -0.7])
    dense = to_dense(summed).double()
    U, S, Vh = torch.linalg.svd(dense)
    optimum = (U[:, :k] * S[:k]) @ Vh[:k]
    result = compress(summed, rank=k)
    assert result.rank == k and result.delta.rank == k
    assert relative(to_dense(result.delta).double(), optimum) < 1e-5
    expected_error = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
    assert result.relative_error == pytest.approx(expected_error, rel=1e-5, abs=1e-7)
    assert relative(to_dense(result.delta).double(), dense) == pytest.approx(expected_error, rel=1e-4, abs=1e-6)


def test_full_rank_compression_is_exact():
    summed = weighted_sum([random_delta(20, 16, 3, 5), random_delta(20, 16, 3, 6)], [1.0, 1.0])
    result = compress(summed, rank=6)
    assert result.relative_error < 1e-6
    assert relative(to_dense(result.delta), to_dense(summed)) < 1e-5


def test_rank_above_available_rank_keeps_the_exact_rank():
    delta = random_delta(20, 16, 3, 7)
    assert compress(delta, rank=10).rank == 3


def test_rank_above_module_limit_is_refused():
    with pytest.raises(ValueError, match="outside"):
        compress(random_delta(8, 5, 2, 0), rank=6)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_keeps_smallest_rank_reaching_fraction(energy):
    generator = torch.Generator().manual_seed(11)
    # Known spectrum: 8, 4, 2, 1, 0.5 on orthonormal bases.
    U, _ = torch.linalg.qr(torch.randn(30, 5, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(20, 5, generator=generator))
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    delta = LowRankDelta(U * spectrum, V.T)
    energies = spectrum.square() / spectrum.square().sum()
    expected_rank = int((torch.cumsum(energies, 0) < energy - 1e-9).sum()) + 1
    result = compress(delta, energy=energy)
    assert result.rank == expected_rank
    kept = 1 - result.relative_error**2
    assert kept >= energy - 1e-6
    if expected_rank > 1:  # one rank fewer would not have been enough
        assert float(energies[: expected_rank - 1].sum()) < energy


def test_signs_are_deterministic_and_independent_of_input_sign_flips():
    summed = weighted_sum([random_delta(25, 18, 3, 8), random_delta(25, 18, 2, 9)], [1.0, 0.5])
    first = compress(summed, rank=3).delta
    second = compress(summed, rank=3).delta
    assert torch.equal(first.B, second.B) and torch.equal(first.A, second.A)
    # The same dense delta written with flipped factor signs gives the same factors.
    flipped = LowRankDelta(-summed.B, -summed.A)
    third = compress(flipped, rank=3).delta
    assert torch.allclose(first.B, third.B, atol=1e-5) and torch.allclose(first.A, third.A, atol=1e-5)
    column_pivots = first.B.abs().argmax(dim=0)
    assert (first.B[column_pivots, torch.arange(3)] > 0).all()


def test_inner_norm_cosine_match_dense():
    a = weighted_sum([random_delta(33, 21, 4, 12), random_delta(33, 21, 2, 13)], [1.0, 0.3])
    b = random_delta(33, 21, 5, 14)
    dense_a, dense_b = to_dense(a).double(), to_dense(b).double()
    assert inner(a, b) == pytest.approx(float((dense_a * dense_b).sum()), rel=1e-6)
    assert frobenius_norm(a) == pytest.approx(float(dense_a.norm()), rel=1e-6)
    expected = float((dense_a * dense_b).sum() / (dense_a.norm() * dense_b.norm()))
    assert cosine(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        weighted_sum([random_delta(4, 5, 1, 0), random_delta(5, 4, 1, 1)], [1, 1])
    with pytest.raises(ValueError, match="do not chain"):
        LowRankDelta(torch.zeros(4, 2), torch.zeros(3, 5))


# -- property-based identities ------------------------------------------------------------

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(1, 4))
weights = st.floats(-3, 3, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_a_plus_minus_a_compresses_to_zero(shape, seed):
    out, inp, rank = shape
    a = random_delta(out, inp, rank, seed)
    result = compress(a + (-a), rank=min(rank, out, inp))
    scale = frobenius_norm(a)
    assert float(to_dense(result.delta).norm()) <= 1e-5 * max(scale, 1.0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seeds=st.tuples(*[st.integers(0, 10_000)] * 3))
def test_addition_is_associative_and_commutative(shape, seeds):
    out, inp, rank = shape
    a, b, c = (random_delta(out, inp, rank, s) for s in seeds)
    scale = sum(float(to_dense(d).norm()) for d in (a, b, c))
    left, right = to_dense((a + b) + c), to_dense(a + (b + c))
    assert float((left - right).norm()) <= 1e-5 * scale
    assert float((to_dense(a + b) - to_dense(b + a)).norm()) <= 1e-5 * scale


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seeds=st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), w=weights)
def test_scaling_distributes_over_addition(shape, seeds, w):
    out, inp, rank = shape
    a, b = (random_delta(out, inp, rank, s) for s in seeds)
    scale = (float(to_dense(a).norm()) + float(to_dense(b).norm())) * max(abs(w), 1.0)
    left, right = to_dense(w * (a + b)), to_dense(w * a + w * b)
    assert float((left - right).norm()) <= 1e-5 * scale


# ---- subspaces and projected energy (interference) -------------------------------------------


def _dense_bases(matrix: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = int((S > tol * S.max()).sum())
    return U[:, :k], Vh[:k].T


def test_subspaces_span_the_dense_column_and_row_spaces():
    delta = random_delta(30, 20, 4, 3)
    U, V = subspaces(delta)
    dense_U, dense_V = _dense_bases(to_dense(delta))
    assert U.shape == (30, 4) and V.shape == (20, 4)
    assert torch.allclose(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-10)
    # the same spaces: the projectors agree
    assert torch.allclose(U @ U.T, dense_U @ dense_U.T, atol=1e-5)
    assert torch.allclose(V @ V.T, dense_V @ dense_V.T, atol=1e-5)


def test_subspaces_of_rank_deficient_factors_keep_only_the_true_rank():
    generator = torch.Generator().manual_seed(5)
    B = torch.randn(25, 2, generator=generator) @ torch.randn(2, 6, generator=generator)  # rank 2, 6 columns
    delta = LowRankDelta(B, torch.randn(6, 15, generator=generator))
    U, V = subspaces(delta)
    assert U.shape[1] == V.shape[1] == 2
    dense_U, dense_V = _dense_bases(to_dense(delta))
    assert torch.allclose(U @ U.T, dense_U @ dense_U.T, atol=1e-5)
    zero_U, zero_V = subspaces(LowRankDelta(torch.zeros(8, 2), torch.randn(2, 5)))
    assert zero_U.shape == (8, 0) and zero_V.shape == (5, 0)


@pytest.mark.parametrize("side", ["column", "row"])
def test_projected_energy_matches_a_dense_projection(side):
    x, y = random_delta(40, 28, 5, 11), random_delta(40, 28, 3, 12)
    # make x overlap y partly: add a piece of y
    x = weighted_sum([x, y], [1.0, 2.0])
    U, V = subspaces(y)
    dense = to_dense(x).double()
    expected = (U @ U.T @ dense if side == "column" else dense @ V @ V.T).square().sum()
    got = projected_energy(x, U if side == "column" else V, side)
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert 0 < got < frobenius_norm(x) ** 2
    # a delta lies wholly inside its own spaces
    own_U, own_V = subspaces(x)
    assert projected_energy(x, own_U if side == "column" else own_V, side) == pytest.approx(
        frobenius_norm(x) ** 2, rel=1e-6
    )


def test_projected_energy_rejects_wrong_shapes():
    delta = random_delta(10, 6, 2, 0)
    with pytest.raises(ValueError, match="rows"):
        projected_energy(delta, torch.zeros(6, 1), "column")
    with pytest.raises(ValueError, match="side"):
        projected_energy(delta, torch.zeros(10, 1), "left")


# ---- CholeskyQR2 in compress: as accurate as Householder QR, and used only where it is ----------


def conditioned_delta(out: int, inp: int, rank: int, condition: float, seed: int) -> LowRankDelta:
    """A delta ``B A`` whose factor ``B`` has condition number ``condition`` (and ``Aᵀ`` about half of
    it) while ``ΔW`` has the distinct singular values 1 … 0.5, so that its best rank-k is unique."""
    generator = torch.Generator().manual_seed(seed)

    def orthonormal(rows: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))[0]

    left, right, rotation = orthonormal(out), orthonormal(inp), orthonormal(rank)
    factor_spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), rank, dtype=torch.float64)
    spectrum = torch.linspace(1.0, 0.5, rank, dtype=torch.float64)
    B = (left * factor_spectrum) @ rotation.T
    A = (rotation * (spectrum / factor_spectrum)) @ right.T
    return LowRankDelta(B.float(), A.float())


def distance_to_optimum(delta: LowRankDelta, k: int, result: LowRankDelta) -> float:
    """The distance of ``result`` to the optimal rank-``k`` ``ΔW_opt``, relative to ``‖ΔW_opt‖`` (fp64)."""
    dense = delta.B.double() @ delta.A.double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    optimum = (U[:, :k] * S[:k]) @ Vh[:k]
    return relative(result.B.double() @ result.A.double(), optimum)


@pytest.mark.parametrize("condition", [1.0, 10.0, 90.0, 1e4])
@pytest.mark.parametrize("shape", [(600, 200), (120, 700)])
def test_cholesky_qr2_is_as_accurate_as_householder(monkeypatch, shape, condition):
    import lora_arith.lora.factors as factors

    delta = conditioned_delta(*shape, rank=24, condition=condition, seed=int(condition) + shape[0])
    used = []
    original = factors._cholesky_qr2
    monkeypatch.setattr(factors, "_cholesky_qr2", lambda X: used.append(r := original(X)) or r)
    fast = compress(delta, rank=12)
    # Below the threshold both factors go through CholeskyQR2; above it, Householder QR.
    assert all(r is not None for r in used) == (condition <= factors.CHOLESKY_QR_MAX_CONDITION)
    monkeypatch.setattr(factors, "CHOLESKY_QR_MAX_CONDITION", 0.0)  # force Householder QR
    householder = compress(delta, rank=12)
    fast_distance = distance_to_optimum(delta, 12, fast.delta)
    householder_distance = distance_to_optimum(delta, 12, householder.delta)
    assert fast_distance <= 2 * householder_distance + 2e-7
    if condition <= factors.CHOLESKY_QR_MAX_CONDITION:  # (fp32 factors with κ = 1e4 lose more, either way)
        assert fast_distance < 1e-5
    assert torch.allclose(fast.singular_values, householder.singular_values, rtol=1e-5, atol=1e-7 * float(fast.singular_values[0]))
    assert fast.relative_error == pytest.approx(householder.relative_error, rel=1e-5, abs=1e-7)
