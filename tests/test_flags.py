"""Tests for flagcore.flags: strata X_k, random pairs in a stratum, adapted bases, GL(d) transport,
and the normal form / one-parameter degeneration of spec A.8.

Theorem 4.1: each non-empty stratum X_k = {(V, U): dim(V ∩ U) = k} is one GL(d)-orbit, so for
two pairs with the same k there is g with g V1 = V2 and g U1 = U2 (transport_pair), and for
different k there is none. Subspace equalities are checked two independent ways: principal
angles (flagcore) and a numpy rank test, rank [g V1 | V2] == dim V2.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from flagcore.flags import (
    adapted_basis,
    normal_form_pair,
    one_parameter_subgroup,
    random_pair_with_intersection,
    stratum_range,
    transport_pair,
)
from flagcore.subspace import frobenius_overlap, intersection_dim, orthonormal_basis, principal_angles, projector

F64 = torch.float64

CASES = [(6, 2, 3), (7, 3, 4), (5, 3, 3), (8, 4, 2), (4, 2, 2), (6, 1, 5), (5, 5, 3), (9, 4, 5)]


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def np_rank(M, rtol: float = 1e-8) -> int:
    """numpy rank of M after scaling its columns to unit norm, singular values <= rtol * s_max dropped."""
    M = np.asarray(M, dtype=np.float64)
    M = M / np.linalg.norm(M, axis=0, keepdims=True)
    s_max = np.linalg.svd(M, compute_uv=False)[0]
    return int(np.linalg.matrix_rank(M, tol=rtol * s_max))


def same_subspace(X, Y) -> bool:
    """col(X) == col(Y), decided by numpy alone: equal ranks and rank [X | Y] not larger."""
    rX, rY = np_rank(X), np_rank(Y)
    return rX == rY == np_rank(np.concatenate([np.asarray(X), np.asarray(Y)], axis=1))


def dist_to_subspace(x, W) -> float:
    """max over columns of x of ||(I - P_W) x|| / ||x||."""
    P = projector(W)
    r = x - P @ x
    return float((torch.linalg.vector_norm(r, dim=0) / torch.linalg.vector_norm(x, dim=0)).max())


# --------------------------------------------------------------------------- stratum_range


@pytest.mark.parametrize("d", range(1, 8))
def test_stratum_range_is_exactly_the_feasible_ks(d):
    """k is feasible iff 0 <= k <= min(r1, r2) and dim(V + U) = r1 + r2 - k <= d (brute force)."""
    for r1 in range(1, d + 1):
        for r2 in range(1, d + 1):
            expected = [k for k in range(0, min(r1, r2) + 1) if r1 + r2 - k <= d]
            got = stratum_range(d, r1, r2)
            assert isinstance(got, range) and list(got) == expected


@pytest.mark.parametrize("d,r1,r2", [(3, 0, 1), (3, 1, 0), (3, 4, 1), (3, 1, 4), (0, 1, 1)])
def test_stratum_range_rejects_bad_dimensions(d, r1, r2):
    with pytest.raises(ValueError, match="1 <= r1, r2 <= d"):
        stratum_range(d, r1, r2)


# --------------------------------------------------------------------------- random_pair_with_intersection


@pytest.mark.parametrize("d,r1,r2", CASES)
def test_random_pair_has_prescribed_dimensions(d, r1, r2, gen):
    """Shapes [d, r1], [d, r2], full column rank, dim(V ∩ U) = k by the numpy rank oracle."""
    for k in stratum_range(d, r1, r2):
        V, U = random_pair_with_intersection(d, r1, r2, k, gen)
        assert V.shape == (d, r1) and U.shape == (d, r2) and V.dtype == U.dtype == F64
        assert np_rank(V) == r1 and np_rank(U) == r2
        assert r1 + r2 - np_rank(torch.cat([V, U], dim=1)) == k


def test_random_pair_orthonormal_flag(gen):
    """orthonormal=True returns orthonormal bases; the default mixes them (not orthonormal)."""
    V, U = random_pair_with_intersection(7, 3, 4, 2, gen, orthonormal=True)
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=F64), atol=1e-12)
    assert torch.allclose(U.T @ U, torch.eye(4, dtype=F64), atol=1e-12)
    V, U = random_pair_with_intersection(7, 3, 4, 2, gen)
    assert not torch.allclose(V.T @ V, torch.eye(3, dtype=F64), atol=1e-2)
    assert intersection_dim(V, U) == 2


def test_random_pair_reproducible_and_dtype():
    a = random_pair_with_intersection(6, 2, 3, 1, torch.Generator().manual_seed(3))
    b = random_pair_with_intersection(6, 2, 3, 1, torch.Generator().manual_seed(3))
    c = random_pair_with_intersection(6, 2, 3, 1, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    V, U = random_pair_with_intersection(6, 2, 3, 1, torch.Generator().manual_seed(3), dtype=torch.float32)
    assert V.dtype == U.dtype == torch.float32
    assert intersection_dim(V, U) == 1  # float32 default tolerance


@pytest.mark.parametrize("d,r1,r2,k", [(6, 2, 3, 3), (6, 2, 3, -1), (5, 4, 3, 1), (5, 4, 3, 0), (4, 2, 2, 3)])
def test_random_pair_impossible_k_raises(d, r1, r2, k, gen):
    """k outside stratum_range: ValueError that names the feasible range."""
    rng = stratum_range(d, r1, r2)
    with pytest.raises(ValueError, match=f"possible: {rng.start}..{rng.stop - 1}"):
        random_pair_with_intersection(d, r1, r2, k, gen)


def test_random_pair_bad_dimensions_raise(gen):
    with pytest.raises(ValueError):
        random_pair_with_intersection(4, 5, 2, 1, gen)
    with pytest.raises(ValueError):
        random_pair_with_intersection(4, 0, 2, 0, gen)


# --------------------------------------------------------------------------- adapted_basis


@pytest.mark.parametrize("d,r1,r2", CASES)
def test_adapted_basis_block_structure(d, r1, r2, gen):
    """B = [V∩U | V-complement | U-complement | rest], invertible, orthonormal within blocks.

    First k columns lie in both V and U; the first r1 span V; columns 0..k-1 and r1..r1+r2-k-1
    span U; the rest is orthogonal to V + U. Negative controls: the V-complement columns are NOT
    in U and the U-complement columns are NOT in V (distance > 1e-3), so the checks can fail.
    """
    for k in stratum_range(d, r1, r2):
        V, U = random_pair_with_intersection(d, r1, r2, k, gen)
        B, k_got = adapted_basis(V, U)
        s = r1 + r2 - k
        assert k_got == k and B.shape == (d, d)
        assert np.isfinite(np.linalg.cond(B.numpy())) and np_rank(B) == d
        common, v_block, u_block = B[:, :k], B[:, :r1], torch.cat([B[:, :k], B[:, r1:s]], dim=1)
        if k:
            assert dist_to_subspace(common, V) <= 1e-10 and dist_to_subspace(common, U) <= 1e-10
        assert same_subspace(v_block, V) and same_subspace(u_block, U)
        assert principal_angles(v_block, V).max().item() <= 1e-8
        assert principal_angles(u_block, U).max().item() <= 1e-8
        for block in (v_block, u_block, B[:, s:]):
            assert torch.allclose(block.T @ block, torch.eye(block.shape[1], dtype=F64), atol=1e-10)
        if s < d:
            rest = B[:, s:]
            assert (rest.T @ orthonormal_basis(torch.cat([V, U], dim=1))).abs().max().item() <= 1e-10
        if k < r1:
            assert dist_to_subspace(B[:, k:r1], U) > 1e-3
        if k < r2:
            assert dist_to_subspace(B[:, r1:s], V) > 1e-3


def test_adapted_basis_rejects_batched_and_mismatched(gen):
    with pytest.raises(ValueError, match="shape"):
        adapted_basis(randn(gen, 2, 5, 2), randn(gen, 2, 5, 3))
    with pytest.raises(ValueError, match="different ambient spaces"):
        adapted_basis(randn(gen, 5, 2), randn(gen, 6, 2))


# --------------------------------------------------------------------------- transport_pair


@pytest.mark.parametrize("d,r1,r2", CASES)
def test_transport_pair_maps_pair_onto_pair(d, r1, r2, gen):
    """g V1 = V2 and g U1 = U2 as subspaces (angles ~0 AND numpy rank oracle), g invertible.

    Negative control: g does not carry V1 onto an unrelated subspace V3 of the same dimension,
    and an arbitrary h in GL(d) does not carry the pair onto pair 2, so the oracle has teeth.
    """
    for k in stratum_range(d, r1, r2):
        for _ in range(2):
            V1, U1 = random_pair_with_intersection(d, r1, r2, k, gen)
            V2, U2 = random_pair_with_intersection(d, r1, r2, k, gen)
            g = transport_pair(V1, U1, V2, U2)
            assert g.shape == (d, d) and g.dtype == F64
            cond = float(np.linalg.cond(g.numpy()))
            assert np.isfinite(cond) and cond < 1e10
            assert principal_angles(g @ V1, V2).max().item() <= 1e-8
            assert principal_angles(g @ U1, U2).max().item() <= 1e-8
            assert np_rank(torch.cat([g @ V1, V2], dim=1)) == r1
            assert np_rank(torch.cat([g @ U1, U2], dim=1)) == r2
            assert intersection_dim(g @ V1, g @ U1) == k
            # negative controls
            if r1 < d:
                V3 = randn(gen, d, r1)
                assert np_rank(torch.cat([g @ V1, V3], dim=1)) > r1
                h = randn(gen, d, d)
                assert not same_subspace(h @ V1, V2)


def test_transport_pair_of_a_pair_with_itself_fixes_both_subspaces(gen):
    V, U = random_pair_with_intersection(7, 3, 4, 1, gen)
    g = transport_pair(V, U, V @ randn(gen, 3, 3), U)
    assert same_subspace(g @ V, V) and same_subspace(g @ U, U)


def test_transport_pair_spec_A9_overlap_is_not_gl_invariant(gen):
    """Spec A.9 (d=6, r1=2, r2=3, k=1): same stratum, g exists, yet sum cos^2 differs between pairs."""
    V1, U1 = random_pair_with_intersection(6, 2, 3, 1, gen)
    V2, U2 = random_pair_with_intersection(6, 2, 3, 1, gen)
    g = transport_pair(V1, U1, V2, U2)
    assert same_subspace(g @ V1, V2) and same_subspace(g @ U1, U2)
    assert intersection_dim(V1, U1) == intersection_dim(V2, U2) == 1
    o1, o2 = float(frobenius_overlap(V1, U1)), float(frobenius_overlap(V2, U2))
    assert abs(o1 - o2) > 1e-3
    # the overlap of the transported pair is that of pair 2, not of pair 1
    assert float(frobenius_overlap(g @ V1, g @ U1)) == pytest.approx(o2, abs=1e-8)


@pytest.mark.parametrize("d,r1,r2,k1,k2", [(6, 2, 3, 1, 2), (7, 3, 4, 0, 3), (5, 3, 3, 1, 2), (4, 2, 2, 2, 0)])
def test_transport_pair_across_strata_raises(d, r1, r2, k1, k2, gen):
    """Different intersection dimensions: no g exists; the message names both dimensions."""
    V1, U1 = random_pair_with_intersection(d, r1, r2, k1, gen)
    V2, U2 = random_pair_with_intersection(d, r1, r2, k2, gen)
    with pytest.raises(ValueError, match=rf"dim\(V1 ∩ U1\) = {k1} but dim\(V2 ∩ U2\) = {k2}"):
        transport_pair(V1, U1, V2, U2)


def test_transport_pair_rejects_other_mismatches(gen):
    """Different subspace dimensions, ambient dimensions, batched or non-finite input."""
    V1, U1 = random_pair_with_intersection(6, 2, 3, 1, gen)
    V2, U2 = random_pair_with_intersection(6, 3, 2, 1, gen)
    with pytest.raises(ValueError, match="subspace dimensions differ"):
        transport_pair(V1, U1, V2, U2)
    # the dimensions are those of the subspaces, not the column counts
    V3 = torch.cat([V1, V1[:, :1]], dim=1)
    V2b, U2b = random_pair_with_intersection(6, 2, 3, 1, gen)
    assert same_subspace(transport_pair(V3, U1, V2b, U2b) @ V1, V2b)
    with pytest.raises(ValueError, match="different ambient spaces"):
        transport_pair(V1, U1, randn(gen, 7, 2), randn(gen, 7, 3))
    with pytest.raises(ValueError, match="shape"):
        transport_pair(V1[None], U1, V2b, U2b)
    bad = V2b.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        transport_pair(V1, U1, bad, U2b)
    with pytest.raises(TypeError):
        transport_pair(V1.numpy(), U1, V2b, U2b)


# --------------------------------------------------------------------------- normal form and degeneration (A.8)

def plucker(W) -> np.ndarray:
    """Unit Plücker vector of col(W) (all r x r minors, numpy), sign fixed by the largest entry."""
    W = np.asarray(W, dtype=np.float64)
    d, r = W.shape
    p = np.array([np.linalg.det(W[list(rows)]) for rows in combinations(range(d), r)])
    p = p / np.linalg.norm(p)
    return p * np.sign(p[np.argmax(np.abs(p))])


@pytest.mark.parametrize("d,r1,r2", [(7, 3, 4), (6, 2, 3), (5, 2, 2), (8, 3, 5), (4, 1, 4)])
def test_normal_form_pair_is_in_stratum_k_with_angles_0_and_pi_over_4(d, r1, r2):
    """(B.7)/(B.8): dim(V ∩ U) = k (numpy oracle), angles k zeros then s = r1 - k angles of pi/4."""
    for k in stratum_range(d, r1, r2):
        V, U = normal_form_pair(d, r1, r2, k)
        assert V.shape == (d, r1) and U.shape == (d, r2)
        assert intersection_dim(V, U) == k == r1 + r2 - np_rank(torch.cat([V, U], dim=1))
        expected = np.array([0.0] * k + [np.pi / 4] * (r1 - k))
        np.testing.assert_allclose(principal_angles(V, U).numpy(), expected, rtol=0, atol=1e-14)


def test_random_pairs_transport_to_the_normal_form(gen):
    """Theorem 4.1 constructively: every random pair of X_k is carried onto the normal form of X_k."""
    d, r1, r2 = 7, 3, 4
    for k in stratum_range(d, r1, r2):
        V, U = random_pair_with_intersection(d, r1, r2, k, gen)
        Vn, Un = normal_form_pair(d, r1, r2, k)
        g = transport_pair(V, U, Vn, Un)
        assert same_subspace(g @ V, Vn) and same_subspace(g @ U, Un)


@pytest.mark.parametrize("t", [1.0, 0.1, 0.01, 1e-4])
def test_one_parameter_degeneration_spec_A8(t):
    """Spec Test A.8 (d=7, r1=3, r2=4, k=1): lambda(t) fixes U, keeps dim(V∩U)=1, tan(theta) = (0, t, t),
    and the Plücker distance of lambda(t)V to e1∧e2∧e3 is sqrt(2) t / sqrt(1 + t^2)
    (spec: 1.0, 1.41e-1, 1.41e-2, 1.41e-4), computed from numpy minors."""
    d, r1, r2, k = 7, 3, 4, 1
    V, U = normal_form_pair(d, r1, r2, k)
    lam = one_parameter_subgroup(d, r2, t)
    assert torch.equal(torch.diagonal(lam), torch.tensor([1.0] * r2 + [t] * (d - r2), dtype=F64))
    assert same_subspace(lam @ U, U)
    Vt = lam @ V
    assert intersection_dim(Vt, U) == k
    np.testing.assert_allclose(torch.tan(principal_angles(Vt, U)).numpy(), [0.0, t, t], rtol=1e-10, atol=1e-14)
    dist = np.linalg.norm(plucker(Vt) - plucker(torch.eye(d, dtype=F64)[:, :r1]))
    assert dist == pytest.approx(np.sqrt(2) * t / np.sqrt(1 + t * t), rel=1e-10)


def test_one_parameter_degeneration_limit_is_the_flag():
    """At t = 0, lambda is singular (outside GL(d)) and lambda(0)V = span(e1..e_r1) ⊂ U: dim = r1."""
    d, r1, r2 = 7, 3, 4
    V, U = normal_form_pair(d, r1, r2, 1)
    lam0 = one_parameter_subgroup(d, r2, 0.0)
    assert np.linalg.matrix_rank(lam0.numpy()) == r2 < d
    assert intersection_dim(lam0 @ V, U) == r1
    assert same_subspace(lam0 @ V, torch.eye(d, dtype=F64)[:, :r1])


def test_normal_form_and_subgroup_reject_bad_arguments():
    with pytest.raises(ValueError, match="r1 <= r2"):
        normal_form_pair(7, 4, 3, 1)
    with pytest.raises(ValueError, match="possible: 0..3"):
        normal_form_pair(7, 3, 4, 4)
    with pytest.raises(ValueError, match="possible"):
        normal_form_pair(5, 3, 4, 1)  # k >= r1 + r2 - d = 2
    with pytest.raises(ValueError):
        one_parameter_subgroup(5, 6, 0.5)
    with pytest.raises(ValueError):
        one_parameter_subgroup(5, -1, 0.5)
