"""Tests for flagcore.subspace: bases, projectors, principal angles, intersections, Haar frames.

Oracles used here, all independent of flagcore:

* ``scipy.linalg.subspace_angles`` for principal angles. scipy returns them DESCENDING (ours are
  ascending). scipy (checked with 1.17) picks its arcsin/arccos branch with a mask that is in the
  opposite order to the angles, so for some shapes an angle that is exactly zero comes out as
  ``arccos(1 - ulp) ~ 1.5e-8``. Angles that are zero *by dimension count* (the first
  ``rank A + rank B - d`` ones) are therefore set to 0 in the oracle: the test then demands
  more of us than scipy delivers, never less.
* ``numpy.linalg.matrix_rank`` for ranks and intersection dimensions
  (``dim(V ∩ U) = rank V + rank U - rank [V | U]``).
* ``scipy.linalg.orth`` for column spaces.
* Closed forms: subspaces with prescribed principal angles, and the Haar moments of spec A.14.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore.flags import random_pair_with_intersection, stratum_range
from flagcore.subspace import (
    angle_tolerance,
    frobenius_overlap,
    haar_frames,
    intersection_dim,
    orthonormal_basis,
    principal_angles,
    projector,
    rank_tolerance,
)

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


# --------------------------------------------------------------------------- helpers


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def scipy_angles(A, B) -> np.ndarray:
    """Ascending principal angles from scipy, with the dimension-count zeros set exactly to 0."""
    a, b = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    theta = sl.subspace_angles(a, b)[::-1].copy()  # scipy: descending -> ascending
    forced = max(0, np.linalg.matrix_rank(a) + np.linalg.matrix_rank(b) - a.shape[0])
    theta[:forced] = 0.0
    assert np.all(np.diff(theta) >= -1e-12), "oracle not ascending after reversal"
    return theta


def np_rank(M) -> int:
    return int(np.linalg.matrix_rank(np.asarray(M, dtype=np.float64)))


def signed_permutation(d: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix whose entries are exactly 0 or ±1 (no rounding anywhere)."""
    perm = torch.randperm(d, generator=gen)
    signs = torch.randint(0, 2, (d,), generator=gen).to(F64) * 2 - 1
    return torch.eye(d, dtype=F64)[:, perm] * signs


def pair_with_angles(Q: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = Q[:, :k]``, ``b_i = cos t_i q_i + sin t_i q_{k+i}``: principal angles exactly ``t``."""
    k = t.numel()
    return Q[:, :k], torch.cos(t) * Q[:, :k] + torch.sin(t) * Q[:, k : 2 * k]


def naive_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The textbook formula arccos(svd(Q_a^T Q_b)) on orthonormal a, b: the negative control."""
    return torch.arccos(torch.linalg.svdvals(a.T @ b).clamp(-1.0, 1.0)).sort().values


def random_gl(gen: torch.Generator, n: int) -> torch.Tensor:
    """A random invertible matrix (Gaussian) that is neither orthogonal nor near-singular."""
    M = randn(gen, n, n)
    assert torch.linalg.cond(M) < 1e6
    return M


# --------------------------------------------------------------------------- principal angles vs scipy

SHAPES = [(5, 2, 2), (6, 1, 4), (8, 3, 5), (7, 4, 4), (10, 6, 8), (4, 6, 2), (3, 3, 3), (9, 9, 2), (12, 5, 5), (2, 1, 1)]


@pytest.mark.parametrize("d,kA,kB", SHAPES)
def test_principal_angles_match_scipy_on_non_orthonormal_inputs(d, kA, kB, gen):
    """Random spanning matrices with unequal column scales (and kA != kB, k > d): angles == scipy to 1e-10."""
    for _ in range(8):
        A = randn(gen, d, kA) * torch.logspace(-1, 1, kA, dtype=F64)
        B = randn(gen, d, kB) @ randn(gen, kB, kB)
        theta = principal_angles(A, B)
        expected = scipy_angles(A, B)
        assert theta.dtype == F64
        assert theta.shape == (min(np_rank(A), np_rank(B)),)
        np.testing.assert_allclose(theta.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("d,k,extra", [(6, 2, 1), (8, 3, 3), (5, 4, 2), (10, 5, 4)])
def test_principal_angles_detect_rank_of_duplicated_columns(d, k, extra, gen):
    """Duplicated / scaled / combined columns do not add dimensions: one angle per true dimension."""
    for _ in range(6):
        X = randn(gen, d, k)
        A = torch.cat([X, 3.0 * X[:, :1], X @ randn(gen, k, extra)], dim=1)  # rank k, k + 1 + extra columns
        B = randn(gen, d, k + 1)
        B = torch.cat([B, B[:, -1:], -B[:, :1]], dim=1)  # rank k + 1
        rA, rB = np_rank(A), np_rank(B)
        assert (rA, rB) == (k, min(k + 1, d))
        theta = principal_angles(A, B)
        assert theta.shape == (min(rA, rB),)
        np.testing.assert_allclose(theta.numpy(), scipy_angles(A, B), rtol=0, atol=1e-10)
        assert orthonormal_basis(A).shape[-1] == rA


def test_principal_angles_of_low_rank_products(gen):
    """``W = X Y`` with inner dimension r < number of columns: rank r detected, angles == scipy."""
    for d, r, k in [(9, 2, 5), (7, 3, 6), (12, 4, 10)]:
        A = randn(gen, d, r) @ randn(gen, r, k)
        B = randn(gen, d, 3)
        theta = principal_angles(A, B)
        assert theta.shape == (min(r, 3),)
        np.testing.assert_allclose(theta.numpy(), scipy_angles(A, B), rtol=0, atol=1e-10)


def test_principal_angles_batched_leading_dims_itemwise(gen):
    """Leading dims [3, 2] on both inputs: every item equals scipy on that item."""
    d, kA, kB = 7, 3, 5
    A = randn(gen, 3, 2, d, kA)
    B = randn(gen, 3, 2, d, kB)
    theta = principal_angles(A, B)
    assert theta.shape == (3, 2, 3)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(theta[i, j].numpy(), scipy_angles(A[i, j], B[i, j]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kA,kB", [(2, 4), (4, 2), (3, 3)])
def test_principal_angles_broadcast_single_subspace_against_batch(kA, kB, gen):
    """A batch [5, d, kA] against one B [d, kB] (both orders, both size orders): item by item vs scipy."""
    d = 8
    A = randn(gen, 5, d, kA)
    B = randn(gen, d, kB)
    for theta in (principal_angles(A, B), principal_angles(B, A)):
        assert theta.shape == (5, min(kA, kB))
        for i in range(5):
            np.testing.assert_allclose(theta[i].numpy(), scipy_angles(A[i], B), rtol=0, atol=1e-10)


def test_principal_angles_broadcast_two_batch_shapes(gen):
    """[3, 1, d, k] with [1, 4, d, k] broadcasts to [3, 4, k]; entry (i, j) pairs A[i] with B[j]."""
    d = 6
    A = randn(gen, 3, 1, d, 2)
    B = randn(gen, 1, 4, d, 3)
    theta = principal_angles(A, B)
    assert theta.shape == (3, 4, 2)
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(theta[i, j].numpy(), scipy_angles(A[i, 0], B[0, j]), rtol=0, atol=1e-10)


def test_principal_angles_dtype_handling(gen):
    """Integer input is promoted to float64; float32 stays float32; mixed promotes to float64."""
    A_int = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 2]])
    B = randn(gen, 4, 2)
    theta = principal_angles(A_int, B)
    assert theta.dtype == F64
    np.testing.assert_allclose(theta.numpy(), scipy_angles(A_int.numpy(), B), rtol=0, atol=1e-10)
    theta32 = principal_angles(B.float(), B.float() + 0.1 * randn(gen, 4, 2).float())
    assert theta32.dtype == torch.float32
    assert principal_angles(B.float(), B).dtype == F64


# --------------------------------------------------------------------------- accuracy near 0


@pytest.mark.parametrize("t", [1e-2, 1e-4, 1e-6, 1e-8, 1e-9, 1e-10, 1e-12, 1e-14])
@pytest.mark.parametrize("basis", ["signed_permutation", "dense_haar"])
def test_small_known_angles_are_accurate_and_naive_arccos_is_not(t, basis, gen):
    """Subspaces with known angles t, 2t, 3t; a = Q[:, :3], b_i = cos t_i q_i + sin t_i q_{3+i}.

    Ours: absolute error <= 4 eps at every t (so relative <= 1e-6 for t >= 1e-9, and <= 1e-3 at
    t = 1e-12). Negative control on the very same inputs: arccos of the singular values of
    Q_a^T Q_b misses that tolerance tenfold for t <= 1e-6 and is >= 50% wrong for t <= 1e-9 (cos t
    rounds to 1 or 1 - ulp), so the test really exercises the stable sine formula.

    Relative 1e-6 *at t = 1e-12* is not demanded: re-orthonormalising the input (any backward-
    stable SVD/QR, scipy.linalg.subspace_angles included) perturbs the subspace by O(eps)
    absolute, which at t = 1e-12 is ~1e-4 relative even for exactly representable inputs.
    """
    ts = t * torch.arange(1, 4, dtype=F64)
    for d in (7, 8, 11, 12):
        Q = signed_permutation(d, gen) if basis == "signed_permutation" else haar_frames(d, d, 1, gen)[0]
        a, b = pair_with_angles(Q, ts)
        # also: reversed order, and the larger subspace first with a non-orthonormal spanning set
        for A, B in [(a, b), (b, a), (torch.cat([b, Q[:, 6:7]], dim=1), 2.0 * a)]:
            err = (principal_angles(A, B) - ts).abs().max().item()
            assert err <= 4 * EPS64
            if t >= 1e-9:
                assert err / t <= 1e-6
            if t >= 1e-12:
                assert err / t <= 1e-3
        naive_err = (naive_angles(a, b) - ts).abs().max().item()
        if t <= 1e-6:
            assert naive_err > 10 * (4 * EPS64), "negative control: the naive formula should fail here"
        if t <= 1e-9:  # arccos(1 - ulp) ~ 1.5e-8 is the naive formula's first non-zero value
            assert naive_err > 0.5 * t


def test_known_angles_over_the_whole_range(gen):
    """Angles 0, tiny, pi/4 ± 1e-9 (the branch switch), near pi/2 and pi/2: error <= a few ulp.

    (Near pi/2 only the cosine formula is this accurate; arcsin there would be off by ~1e-13.)
    """
    ts = torch.tensor(
        [0.0, 1e-15, 1e-8, 0.3, math.pi / 4 - 1e-9, math.pi / 4, math.pi / 4 + 1e-9, 1.2, 1.57, math.pi / 2 - 1e-9, math.pi / 2],
        dtype=F64,
    )
    Q = signed_permutation(2 * ts.numel() + 1, gen)
    a, b = pair_with_angles(Q, ts)
    # the exact angle of the rounded inputs is atan2(sin t, cos t), accurate to 1 ulp
    exact = torch.atan2(torch.sin(ts), torch.cos(ts).clamp(min=0))
    theta = principal_angles(a, b)
    assert (theta - exact).abs().max().item() <= 8 * EPS64


def test_orthogonal_subspaces_give_right_angles(gen):
    """col(A) ⊥ col(B): every angle is pi/2 and the overlap is 0."""
    Q = haar_frames(9, 9, 1, gen)[0]
    A, B = Q[:, :3] @ random_gl(gen, 3), Q[:, 3:7] @ random_gl(gen, 4)
    np.testing.assert_allclose(principal_angles(A, B).numpy(), np.full(3, math.pi / 2), rtol=0, atol=1e-12)
    assert abs(float(frobenius_overlap(A, B))) <= 1e-20


# --------------------------------------------------------------------------- invariances (Cor. 4.2)


@pytest.mark.parametrize("d,r1,r2", [(6, 2, 3), (8, 4, 4), (5, 3, 4)])
def test_angles_and_overlap_invariant_under_right_GL_r(d, r1, r2, gen):
    """Changing the spanning matrices (A -> A R, R in GL(r)) does not change the subspaces."""
    for _ in range(5):
        A, B = randn(gen, d, r1), randn(gen, d, r2)
        A2, B2 = A @ random_gl(gen, r1), B @ random_gl(gen, r2)
        np.testing.assert_allclose(principal_angles(A2, B2).numpy(), principal_angles(A, B).numpy(), rtol=0, atol=1e-9)
        assert abs(float(frobenius_overlap(A2, B2) - frobenius_overlap(A, B))) <= 1e-9


@pytest.mark.parametrize("d,r1,r2", [(6, 2, 3), (8, 4, 4), (5, 3, 4)])
def test_angles_and_overlap_invariant_under_common_O_d(d, r1, r2, gen):
    """(A, B) -> (O A, O B) with O in O(d): angles and overlap unchanged (they are O(d)-invariants)."""
    for _ in range(5):
        A, B = randn(gen, d, r1), randn(gen, d, r2)
        O = haar_frames(d, d, 1, gen)[0]
        np.testing.assert_allclose(principal_angles(O @ A, O @ B).numpy(), principal_angles(A, B).numpy(), rtol=0, atol=1e-10)
        assert abs(float(frobenius_overlap(O @ A, O @ B) - frobenius_overlap(A, B))) <= 1e-10


@pytest.mark.parametrize("d,r1,r2", [(7, 3, 4), (6, 2, 3), (8, 4, 4), (5, 3, 3)])
def test_general_GL_d_changes_angles_and_overlap_but_not_intersection_dim(d, r1, r2, gen):
    """Theorem 4.1 / Cor. 4.2: under g in GL(d), dim(V ∩ U) is invariant, angles and overlap are not.

    For every stratum k the intersection dimension survives every g; whenever k < min(r1, r2) (so
    some angle is free to move) the angles and the overlap change by more than 1e-3 under at least
    one of three random g (one random g may, by coincidence, leave the scalar overlap almost fixed).
    """
    for k in stratum_range(d, r1, r2):
        for _ in range(3):
            V, U = random_pair_with_intersection(d, r1, r2, k, gen)
            theta, overlap = principal_angles(V, U), float(frobenius_overlap(V, U))
            d_theta, d_overlap = [], []
            for g in (random_gl(gen, d) for _ in range(3)):
                assert intersection_dim(g @ V, g @ U) == intersection_dim(V, U) == k
                d_theta.append((principal_angles(g @ V, g @ U) - theta).abs().max().item())
                d_overlap.append(abs(float(frobenius_overlap(g @ V, g @ U)) - overlap))
            if k < min(r1, r2):
                assert max(d_theta) > 1e-3 and max(d_overlap) > 1e-3
            else:  # flag stratum: all angles are 0 for every g, overlap = min(r1, r2)
                assert max(d_theta) <= 1e-7 and max(d_overlap) <= 1e-10
                assert overlap == pytest.approx(min(r1, r2), abs=1e-10)


# --------------------------------------------------------------------------- intersection_dim

INTERSECTION_CASES = [(6, 2, 3), (7, 3, 4), (5, 5, 2), (8, 4, 4), (4, 3, 3), (9, 1, 9), (3, 2, 2), (10, 6, 7)]


@pytest.mark.parametrize("d,r1,r2", INTERSECTION_CASES)
def test_intersection_dim_every_stratum_vs_numpy_rank(d, r1, r2, gen):
    """For each k in stratum_range: intersection_dim == k == r1 + r2 - rank([V | U]) (numpy)."""
    for k in stratum_range(d, r1, r2):
        for orthonormal in (False, True):
            V, U = random_pair_with_intersection(d, r1, r2, k, gen, orthonormal=orthonormal)
            oracle = np_rank(V) + np_rank(U) - np_rank(torch.cat([V, U], dim=1))
            got = intersection_dim(V, U)
            assert got == k == oracle
            assert intersection_dim(U, V) == k


def test_intersection_dim_with_redundant_columns(gen):
    """Redundant spanning columns change neither the subspaces nor the intersection dimension."""
    V, U = random_pair_with_intersection(8, 3, 4, 2, gen)
    V2 = torch.cat([V, V @ randn(gen, 3, 2)], dim=1)
    U2 = torch.cat([U[:, :1], U, U[:, 2:3] * -7.0], dim=1)
    assert intersection_dim(V2, U2) == 2
    assert np_rank(V2) + np_rank(U2) - np_rank(torch.cat([V2, U2], dim=1)) == 2


def test_intersection_dim_unbatched_returns_python_int(gen):
    V, U = random_pair_with_intersection(6, 3, 3, 1, gen)
    got = intersection_dim(V, U)
    assert type(got) is int and got == 1


def test_intersection_dim_batched_returns_int64_tensor(gen):
    """A batch [2, 3] of pairs in different strata: an int64 tensor of the right per-item values."""
    d, r1, r2 = 7, 3, 4
    ks = torch.tensor([[0, 1, 2], [3, 2, 0]])
    pairs = [[random_pair_with_intersection(d, r1, r2, int(k), gen) for k in row] for row in ks]
    V = torch.stack([torch.stack([p[0] for p in row]) for row in pairs])
    U = torch.stack([torch.stack([p[1] for p in row]) for row in pairs])
    got = intersection_dim(V, U)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == (2, 3)
    assert torch.equal(got, ks)
    one = intersection_dim(V[:1, :1], U[:1, :1])  # a batch of one is still a tensor
    assert isinstance(one, torch.Tensor) and one.shape == (1, 1) and int(one) == 0
    broadcast = intersection_dim(V[0], U[0, 1])  # [3, d, r1] against one [d, r2]
    assert broadcast.shape == (3,)


def test_intersection_dim_rtol(gen):
    """The count is of angles with sin <= rtol; default rtol = sqrt(eps) (1.5e-8 in float64)."""
    Q = signed_permutation(8, gen)
    for t, default_count in [(1e-6, 0), (1e-7, 0), (1e-9, 1), (0.0, 1)]:
        a, b = pair_with_angles(Q, torch.tensor([t], dtype=F64))
        assert intersection_dim(a, b) == default_count
        assert intersection_dim(a, b, rtol=10 * t + 1e-300) == 1
        if t > 0:
            assert intersection_dim(a, b, rtol=t / 10) == 0
    assert angle_tolerance(F64) == pytest.approx(math.sqrt(EPS64))
    with pytest.raises(ValueError, match="rtol"):
        intersection_dim(a, b, rtol=-1.0)


# --------------------------------------------------------------------------- orthonormal_basis and projector


@pytest.mark.parametrize("d,k,r", [(6, 3, 3), (8, 5, 2), (4, 7, 4), (10, 10, 6), (5, 1, 1)])
def test_orthonormal_basis_orthonormal_and_same_column_space_as_scipy_orth(d, k, r, gen):
    """Q^T Q = I_r, r = numpy rank, and Q Q^T equals the projector built from scipy.linalg.orth."""
    for _ in range(4):
        W = randn(gen, d, r) @ randn(gen, r, k)
        Q = orthonormal_basis(W)
        assert Q.shape == (d, np_rank(W)) == (d, r)
        np.testing.assert_allclose((Q.T @ Q).numpy(), np.eye(r), rtol=0, atol=1e-12)
        O = sl.orth(W.numpy())
        np.testing.assert_allclose((Q @ Q.T).numpy(), O @ O.T, rtol=0, atol=1e-10)


def test_orthonormal_basis_is_ordered_by_decreasing_singular_value(gen):
    """Column i of Q is the i-th left singular vector: ||W^T q_i|| = s_i (numpy), descending."""
    W = randn(gen, 7, 4) * torch.tensor([5.0, 0.1, 2.0, 1.0], dtype=F64)
    Q = orthonormal_basis(W)
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    np.testing.assert_allclose(torch.linalg.vector_norm(W.T @ Q, dim=0).numpy(), s, rtol=1e-12)


def test_orthonormal_basis_rank_detection_with_rtol(gen):
    """Singular values (1, 1e-3, 1e-9, 0): rank 3 by default, 2 with rtol=1e-6, 1 with rtol=1e-2."""
    d, k = 6, 4
    L = haar_frames(d, k, 1, gen)[0]
    R = haar_frames(k, k, 1, gen)[0]
    W = L @ torch.diag(torch.tensor([1.0, 1e-3, 1e-9, 0.0], dtype=F64)) @ R.T
    assert rank_tolerance(W.shape, F64) == pytest.approx(6 * EPS64)
    assert orthonormal_basis(W).shape == (d, 3) and np_rank(W) == 3
    assert orthonormal_basis(W, rtol=1e-6).shape == (d, 2)
    assert orthonormal_basis(W, rtol=1e-2).shape == (d, 1)
    assert orthonormal_basis(W, rtol=1e-12).shape == (d, 3)
    P2 = projector(W, rtol=1e-6)
    np.testing.assert_allclose(P2.numpy(), (L[:, :2] @ L[:, :2].T).numpy(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rtol"):
        orthonormal_basis(W, rtol=-1e-3)


def test_orthonormal_basis_batched(gen):
    """A batch of equal-rank matrices gives [n, d, r] with each item's column space right."""
    W = randn(gen, 4, 9, 2) @ randn(gen, 4, 2, 5)  # rank 2 each
    Q = orthonormal_basis(W)
    assert Q.shape == (4, 9, 2)
    for i in range(4):
        O = sl.orth(W[i].numpy())
        np.testing.assert_allclose((Q[i] @ Q[i].T).numpy(), O @ O.T, rtol=0, atol=1e-10)


def test_orthonormal_basis_batch_with_different_ranks_raises(gen):
    W = randn(gen, 3, 6, 3)
    W[1, :, 2] = W[1, :, 0] + W[1, :, 1]  # item 1 has rank 2, the others 3
    with pytest.raises(ValueError, match="differs across the batch"):
        orthonormal_basis(W)
    with pytest.raises(ValueError, match="differs across the batch"):
        principal_angles(W, randn(gen, 6, 2))
    assert orthonormal_basis(W[1]).shape == (6, 2)  # item by item is fine


@pytest.mark.parametrize("d,k,r", [(5, 2, 2), (8, 6, 3), (4, 4, 4), (7, 9, 5)])
def test_projector_idempotent_symmetric_trace_rank(d, k, r, gen):
    """P^2 = P, P^T = P, tr P = rank, P W = W (batched)."""
    W = randn(gen, 3, d, r) @ randn(gen, 3, r, k)
    P = projector(W)
    assert P.shape == (3, d, d)
    np.testing.assert_allclose((P @ P).numpy(), P.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(P.transpose(-1, -2).numpy(), P.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(torch.diagonal(P, dim1=-2, dim2=-1).sum(-1).numpy(), np.full(3, r), rtol=0, atol=1e-12)
    np.testing.assert_allclose((P @ W).numpy(), W.numpy(), rtol=0, atol=1e-10 * float(W.abs().max()))
    # negative control: a vector orthogonal to col(W) is annihilated, not preserved
    x = randn(gen, d)
    x_perp = x - P[0] @ x
    if r < d:
        assert torch.linalg.vector_norm(P[0] @ x_perp) <= 1e-12 < torch.linalg.vector_norm(x_perp)


# --------------------------------------------------------------------------- haar_frames


@pytest.mark.parametrize("d,k,n", [(5, 2, 3), (7, 7, 2), (1, 1, 4), (12, 3, 1), (6, 1, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_haar_frames_shape_dtype_orthonormal(d, k, n, dtype, gen):
    Q = haar_frames(d, k, n, gen, dtype=dtype)
    assert Q.shape == (n, d, k) and Q.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    eye = torch.eye(k, dtype=dtype).expand(n, k, k)
    assert torch.allclose(Q.transpose(-1, -2) @ Q, eye, atol=tol, rtol=0)


def test_haar_frames_reproducible_with_generator():
    """Same seed, same frames; another seed (or the next draw) gives different frames."""
    a = haar_frames(6, 3, 5, torch.Generator().manual_seed(7))
    b = haar_frames(6, 3, 5, torch.Generator().manual_seed(7))
    c = haar_frames(6, 3, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g = torch.Generator().manual_seed(7)
    first, second = haar_frames(6, 3, 5, g), haar_frames(6, 3, 5, g)
    assert torch.equal(first, a) and not torch.allclose(first, second)


def _pair_overlap_stats(d: int, k: int):
    mean = k * k / d
    var = 2 * k * k * (d - k) ** 2 / (d * d * (d - 1) * (d + 2))  # spec A.14, one pair
    return mean, var


def test_haar_frames_mean_pairwise_overlap_matches_k2_over_d(gen):
    """E ||Q_i^T Q_j||_F^2 = k^2/d for independent Haar frames (d=20, k=4, 4000 disjoint pairs).

    Mean within 4 standard errors (exact per-pair variance), sample variance within 15 %.
    Negative control: the k-column blocks of ONE orthogonal matrix overlap exactly 0, which the
    same statistic rejects by > 100 standard errors, so the test separates independent from
    dependent frames.
    """
    d, k, n_pairs = 20, 4, 4000
    mean, var = _pair_overlap_stats(d, k)
    se = math.sqrt(var / n_pairs)
    Q = haar_frames(d, k, 2 * n_pairs, gen)
    overlaps = (Q[0::2].transpose(-1, -2) @ Q[1::2]).square().sum(dim=(-2, -1))
    assert abs(overlaps.mean().item() - mean) <= 4 * se
    assert overlaps.var().item() == pytest.approx(var, rel=0.15)
    np.testing.assert_allclose(frobenius_overlap(Q[0::2][:50], Q[1::2][:50]).numpy(), overlaps[:50].numpy(), rtol=1e-12)

    blocks = haar_frames(d, d, n_pairs // 5, gen).reshape(-1, d, d // k, k).permute(0, 2, 1, 3)  # [m, 5, d, k]
    dep = (blocks[:, :-1].transpose(-1, -2) @ blocks[:, 1:]).square().sum(dim=(-2, -1))
    assert dep.abs().max().item() <= 1e-25
    assert abs(dep.mean().item() - mean) > 100 * se


def test_haar_frames_mean_projector_is_isotropic(gen):
    """E[Q Q^T] = (k/d) I (n = 6000 frames, d=20, k=4), entrywise within 6 standard errors.

    Negative control: frames of an anisotropic Gaussian (first coordinate scaled by 2) fail it.
    """
    d, k, n = 20, 4, 6000
    P = lambda Q: (Q @ Q.transpose(-1, -2)).mean(0)
    # variance of a diagonal entry (Beta(k/2, (d-k)/2)); off-diagonal entries have a smaller one
    sd_diag = math.sqrt((k / d) * (1 - k / d) / (d / 2 + 1))
    tol = 6 * sd_diag / math.sqrt(n)
    dev = (P(haar_frames(d, k, n, gen)) - (k / d) * torch.eye(d, dtype=F64)).abs().max().item()
    assert dev <= tol
    scale = torch.ones(d, 1, dtype=F64)
    scale[0] = 2.0
    skewed = torch.linalg.qr(randn(gen, n, d, k) * scale).Q
    assert (P(skewed) - (k / d) * torch.eye(d, dtype=F64)).abs().max().item() > 5 * tol


def test_haar_frames_are_haar_on_the_stiefel_manifold(gen):
    """E[Q] = 0 entrywise (the sign fix of Mezzadri 2007). Negative control: raw QR is biased."""
    d, k, n = 20, 4, 8000
    se = 1 / math.sqrt(d * n)  # each entry has variance 1/d
    Q = haar_frames(d, k, n, gen)
    assert Q.mean(0).abs().max().item() <= 5 * se
    raw = torch.linalg.qr(randn(gen, n, d, k)).Q  # LAPACK's sign convention, not Haar
    assert raw.mean(0).abs().max().item() > 20 * se


# --------------------------------------------------------------------------- bad input

PAIR_FUNCS = [principal_angles, frobenius_overlap, intersection_dim]
SINGLE_FUNCS = [orthonormal_basis, projector]


ALL_AS_SINGLE = [pytest.param(lambda x, f=f: f(x, x), id=f.__name__) for f in PAIR_FUNCS] + [
    pytest.param(lambda x, f=f: f(x), id=f.__name__) for f in SINGLE_FUNCS
]


@pytest.mark.parametrize("call", ALL_AS_SINGLE)
def test_bad_shapes_raise_value_error(call):
    """1-D, 0-D, and ambient dimension 0 are rejected with ValueError."""
    with pytest.raises(ValueError, match="shape"):
        call(torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        call(torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="d = 0"):
        call(torch.ones(0, 3, dtype=F64))


@pytest.mark.parametrize("call", ALL_AS_SINGLE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_raise_value_error(call, bad):
    x = torch.ones(4, 2, dtype=F64)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(x)


@pytest.mark.parametrize("call", ALL_AS_SINGLE)
def test_complex_raises_value_error(call):
    with pytest.raises(ValueError, match="complex"):
        call(torch.ones(4, 2, dtype=torch.complex128))


@pytest.mark.parametrize("call", ALL_AS_SINGLE)
@pytest.mark.parametrize("bad", [np.ones((4, 2)), [[1.0, 0.0], [0.0, 1.0]], None])
def test_non_tensor_raises_type_error(call, bad):
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(bad)


@pytest.mark.parametrize("f", PAIR_FUNCS)
def test_mismatched_ambient_dimension_raises(f, gen):
    with pytest.raises(ValueError, match="different ambient spaces"):
        f(randn(gen, 5, 2), randn(gen, 6, 2))
    with pytest.raises(ValueError, match="different ambient spaces"):
        f(randn(gen, 3, 5, 2), randn(gen, 4, 2))


@pytest.mark.parametrize("f", PAIR_FUNCS)
def test_second_argument_validated_too(f, gen):
    """Validation applies to B as well as to A (a check on A alone would pass this by accident)."""
    good = randn(gen, 4, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(good, torch.full((4, 2), float("nan"), dtype=F64))
    with pytest.raises(TypeError):
        f(good, good.numpy())
    with pytest.raises(ValueError, match="complex"):
        f(good, good.to(torch.complex128))


@pytest.mark.parametrize("args", [(3, 4, 1), (3, 0, 1), (0, 0, 1), (3, 2, -1)])
def test_haar_frames_bad_sizes(args):
    """k > d, k < 1 and n < 0 raise ValueError."""
    with pytest.raises(ValueError):
        haar_frames(*args)


@pytest.mark.parametrize("args", [(3.0, 2, 1), (3, 2.0, 1), (True, 1, 1), ("3", 2, 1)])
def test_haar_frames_non_integer_sizes(args):
    """Floats, bools and strings are TypeErrors (the wrong kind of value, not a bad value)."""
    with pytest.raises(TypeError, match="integer"):
        haar_frames(*args)


def test_haar_frames_accepts_numpy_integers():
    assert haar_frames(np.int64(5), np.int32(2), np.int64(3)).shape == (3, 5, 2)


def test_mixed_precision_ranks_each_input_at_its_own_precision(gen):
    """A rank-3 float32 matrix stays rank 3 next to a float64 one (its rounding is not extra rank)."""
    A32 = (randn(gen, 20, 3) @ randn(gen, 3, 8)).to(torch.float32)
    B64 = randn(gen, 20, 4)
    assert principal_angles(A32, B64).shape == (3,)
    assert principal_angles(A32, B64).dtype == F64
    # The shared direction is found with the float32 tolerance, not float64's.
    shared = torch.cat([A32.to(F64)[:, :1], B64[:, 1:]], 1)
    assert intersection_dim(A32, shared) == 1


# --------------------------------------------------------------------------- property tests


@st.composite
def stratified_pairs(draw):
    d = draw(st.integers(1, 9))
    r1 = draw(st.integers(1, d))
    r2 = draw(st.integers(1, d))
    k = draw(st.sampled_from(list(stratum_range(d, r1, r2))))
    seed = draw(st.integers(0, 2**32 - 1))
    orthonormal = draw(st.booleans())
    V, U = random_pair_with_intersection(d, r1, r2, k, torch.Generator().manual_seed(seed), orthonormal=orthonormal)
    return d, r1, r2, k, V, U


@given(stratified_pairs())
def test_property_angles_on_constructed_pairs(case):
    """Range [0, pi/2], ascending, symmetric, length min(r1, r2), sum cos^2 = overlap, k zeros."""
    d, r1, r2, k, V, U = case
    theta = principal_angles(V, U)
    assert theta.shape == (min(r1, r2),)
    assert bool((theta >= 0).all()) and bool((theta <= math.pi / 2).all())
    assert bool((theta[1:] >= theta[:-1]).all())
    np.testing.assert_allclose(principal_angles(U, V).numpy(), theta.numpy(), rtol=0, atol=1e-12)
    overlap = float(frobenius_overlap(V, U))
    assert overlap == pytest.approx(float(torch.cos(theta).square().sum()), abs=1e-10)
    assert overlap == pytest.approx(float(frobenius_overlap(U, V)), abs=1e-12)
    assert intersection_dim(V, U) == intersection_dim(U, V) == k
    if k:
        assert theta[:k].max().item() <= 1e-7  # the k common directions


@given(
    d=st.integers(1, 10),
    kA=st.integers(1, 12),
    kB=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_angles_on_arbitrary_spanning_matrices(d, kA, kB, seed):
    """Any Gaussian spanning matrices: properties as above plus agreement with scipy to 1e-10."""
    g = torch.Generator().manual_seed(seed)
    A, B = randn(g, d, kA), randn(g, d, kB)
    theta = principal_angles(A, B)
    assert bool((theta >= 0).all()) and bool((theta <= math.pi / 2).all())
    assert bool((theta[1:] >= theta[:-1]).all())
    np.testing.assert_allclose(theta.numpy(), scipy_angles(A, B), rtol=0, atol=1e-10)
    np.testing.assert_allclose(principal_angles(B, A).numpy(), theta.numpy(), rtol=0, atol=1e-12)
    assert float(frobenius_overlap(A, B)) == pytest.approx(float(torch.cos(theta).square().sum()), abs=1e-10)
    assert intersection_dim(A, B) == np_rank(A) + np_rank(B) - np_rank(torch.cat([A, B], dim=1))


def test_principal_angles_in_chunks_equal_scipy_per_item(monkeypatch):
    """A batch of large matrices runs in chunks (cache-sized); broadcast batch shapes and the result match scipy
    item by item, and a rank that changes between chunks is refused as in one call."""
    import flagcore.subspace as subspace

    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 1, 12, 3, generator=g, dtype=torch.float64)
    B = torch.randn(1, 4, 12, 2, generator=g, dtype=torch.float64)
    whole = principal_angles(A, B)
    monkeypatch.setattr(subspace, "_CHUNK_BYTES", 12 * 3 * 8 * 2)  # two items per chunk: six chunks
    chunked = principal_angles(A, B)
    assert chunked.shape == whole.shape == (3, 4, 2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    for i in range(3):
        for j in range(4):
            ref = np.sort(sl.subspace_angles(A[i, 0].numpy(), B[0, j].numpy()))
            np.testing.assert_allclose(chunked[i, j].numpy(), ref, atol=1e-12)
    A_bad = A.expand(3, 4, 12, 3).clone()
    A_bad[2, 3, :, 2] = A_bad[2, 3, :, 0]  # the last item has rank 2: its chunk gives 2 angles, the others 3
    B3 = torch.randn(12, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank differs"):
        principal_angles(A_bad, B3)
