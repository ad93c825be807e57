"""Tests for the Section 3–4 theory helpers of flagcore.flags: dimension counts (Prop 3.3, Cor 3.5),
the orbit rank of the infinitesimal GL(d) action (spec Test A.4), the nested parametrisation
(spec Test A.6), the cumulative drift (Cor 3.4, spec A.5), stratum dimensions and the Plücker
embedding (Thm 4.1, spec A.7/A.8).

Oracles: hand-computed closed forms, brute-force counts (dimension of a stabiliser Lie algebra by
numpy rank), numpy/scipy principal angles, Cauchy–Binet, and finite differences.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore.flags import (
    cumulative_drift,
    drift_orthonormal,
    flag_dim,
    flag_dim_blocks,
    gl_action_matrix,
    grassmannian_product_dim,
    nested_flag_bases,
    nested_flag_parameters,
    nested_violation,
    normal_form_pair,
    one_parameter_subgroup,
    orbit_rank,
    parameter_counts,
    plucker_coordinates,
    plucker_distance,
    random_flag,
    random_pair_with_intersection,
    removed_dof,
    stratum_dim,
    stratum_range,
    subspace_drift,
)
from flagcore.subspace import haar_frames, orthonormal_basis

F64 = torch.float64

# (d, ranks, A.1, A.2, N_indep, N_flag): the worked table of spec A.4, checked by hand.
TABLE = [
    (3, (1, 2), 4, 3, 9, 8),
    (4, (1, 2), 7, 5, 12, 10),
    (4, (1, 3), 6, 5, 16, 15),
    (4, (2, 2), 8, 4, 16, 12),
    (4, (1, 2, 3), 10, 6, 24, 20),
    (5, (2, 3), 12, 8, 25, 21),
    (5, (1, 2, 3), 16, 9, 30, 23),
    (6, (2, 4), 16, 12, 36, 32),
    (6, (1, 3, 5), 19, 13, 54, 48),
    (6, (3, 3, 3), 27, 9, 54, 36),
    (8, (2, 4, 6), 40, 24, 96, 80),
    (8, (3, 3, 3), 45, 15, 72, 42),
    (10, (2, 5, 8), 57, 37, 150, 130),
    (16, (4, 8, 12), 160, 96, 384, 320),
    (768, (64,) * 12, 540_672, 45_056, 589_824, 94_208),
]

ranks_strategy = st.integers(2, 9).flatmap(
    lambda d: st.tuples(st.just(d), st.lists(st.integers(1, d), min_size=1, max_size=4).map(sorted))
)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("d,ranks,a1,a2,n_indep,n_flag", TABLE)
def test_worked_table(d, ranks, a1, a2, n_indep, n_flag):
    assert grassmannian_product_dim(d, ranks) == a1
    assert flag_dim(d, ranks) == a2 == flag_dim_blocks(d, ranks)
    assert removed_dof(d, ranks) == a1 - a2
    assert parameter_counts(d, ranks) == (n_flag, n_indep)


def test_anchors():
    assert flag_dim(3, [1, 2]) == 3 and flag_dim(4, [1, 2, 3]) == 6
    assert flag_dim(5, [2]) == grassmannian_product_dim(5, [2]) == 6  # one subspace: a Grassmannian
    assert flag_dim(4, [4]) == 0  # the whole space: a point


@given(ranks_strategy)
def test_dimension_identities(case):
    d, rs = case
    a1, a2 = grassmannian_product_dim(d, rs), flag_dim(d, rs)
    assert a2 == flag_dim_blocks(d, rs)
    assert a1 - a2 == removed_dof(d, rs) >= 0
    # strictly smaller iff some consecutive pair has r_{l-1} >= 1 and r_l < d (always r >= 1 here)
    assert (a1 > a2) == any(b < d for b in rs[1:])
    # the complete flag of R^d has dimension d(d-1)/2
    assert flag_dim(d, list(range(1, d))) == d * (d - 1) // 2 if d > 1 else True


def _stabiliser_dim_bruteforce(d, rs):
    """dim of {X in gl(d): X V_l ⊆ V_l for all l} at the coordinate flag, by counting free entries
    (X_ij may be non-zero iff column j's block index >= row i's block index): block upper triangular."""
    block = [next(i for i, r in enumerate(list(rs) + [d]) if j < r) for j in range(d)]
    return sum(1 for i in range(d) for j in range(d) if block[i] <= block[j])


@given(ranks_strategy)
def test_flag_dim_is_gl_minus_parabolic(case):
    d, rs = case
    assert flag_dim(d, rs) == d * d - _stabiliser_dim_bruteforce(d, rs)


def test_parameter_counts_bruteforce():
    for d, rs in [(7, [2, 3, 5]), (5, [5]), (9, [1, 1, 4])]:
        n_flag, n_indep = parameter_counts(d, rs)
        assert n_indep == sum(d * r for r in rs)
        assert n_flag == sum(p.numel() for p in nested_flag_parameters(d, rs))


@pytest.mark.parametrize(
    "call",
    [
        lambda: flag_dim(4, [2, 1]),  # decreasing
        lambda: flag_dim(4, [0, 2]),  # zero rank
        lambda: flag_dim(4, [2, 5]),  # rank above d
        lambda: flag_dim(0, [1]),
        lambda: flag_dim(4, []),
        lambda: removed_dof(3, [3, 1]),
        lambda: parameter_counts(3, [4]),
        lambda: stratum_dim(6, 4, 4, 1),  # k < r1 + r2 - d
        lambda: stratum_dim(6, 2, 3, 3),  # k > r1
    ],
)
def test_bad_dimensions_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call",
    [lambda: flag_dim(4.0, [1]), lambda: flag_dim(4, [1.5]), lambda: flag_dim(4, "12"), lambda: flag_dim(4, torch.tensor([1, 2]))],
)
def test_bad_kinds_raise_type_error(call):
    with pytest.raises(TypeError):
        call()


def test_grassmannian_product_accepts_any_order():
    assert grassmannian_product_dim(5, [3, 1]) == 3 * 2 + 1 * 4
    with pytest.raises(ValueError, match="non-decreasing"):
        flag_dim(5, [3, 1])


# --------------------------------------------------------------------------- orbit rank (Test A.4)


@pytest.mark.parametrize("d,ranks,a1,a2,n_indep,n_flag", TABLE[:-1])
def test_orbit_rank_of_a_flag_is_flag_dim(gen, d, ranks, a1, a2, n_indep, n_flag):
    res = orbit_rank(random_flag(d, ranks, gen))
    assert res.rank == a2 and res.ambient == a1
    assert res.gap > 1e10 or res.rank == res.ambient  # a clean cut


@pytest.mark.parametrize("d,ranks", [(6, (2, 4)), (8, (2, 4, 6)), (7, (3, 3)), (5, (1, 2, 3))])
def test_orbit_rank_non_nested_is_product_dim(gen, d, ranks):
    """Negative control: independent Haar subspaces span the whole tangent space of the product (A.1)."""
    bases = [haar_frames(d, r, 1, gen)[0] for r in ranks]
    res = orbit_rank(bases)
    assert res.rank == grassmannian_product_dim(d, ranks) > flag_dim(d, ranks)


def test_gl_action_matrix_against_explicit_map(gen):
    """||M vec(X)|| equals the norm of the explicit map X -> ((I - P_l) X P_l)_l for every X (the
    coordinates N^T X Q are orthonormal, whatever bases are chosen), so M has that map's kernel and rank."""
    d, ranks = 6, (2, 4)
    F = random_flag(d, ranks, gen)
    M = gl_action_matrix(F)
    assert M.shape == (grassmannian_product_dim(d, ranks), d * d)
    I = torch.eye(d, dtype=F64)
    for _ in range(5):
        X = torch.randn(d, d, generator=gen, dtype=F64)
        explicit = sum(float(((I - Q @ Q.T) @ X @ Q @ Q.T).square().sum()) for Q in F)
        assert float((M @ X.reshape(-1)).square().sum()) == pytest.approx(explicit, rel=1e-12)
    # a stabiliser element (block upper triangular in the flag's basis) is in the kernel
    B = torch.cat([F[1], torch.linalg.svd(F[1], full_matrices=True)[0][:, 4:]], dim=1)
    B = torch.cat([F[0], orthonormal_basis(F[1] - F[0] @ (F[0].T @ F[1])), B[:, 4:]], dim=1)
    T = torch.triu(torch.randn(d, d, generator=gen, dtype=F64))
    X = B @ T @ B.T
    assert float((M @ X.reshape(-1)).norm()) < 1e-12


def test_orbit_rank_invariant_under_basis_change(gen):
    F = random_flag(7, (2, 5), gen)
    mixed = [Q @ torch.randn(Q.shape[1], Q.shape[1], generator=gen, dtype=F64) for Q in F]
    assert orbit_rank(mixed).rank == orbit_rank(F).rank == flag_dim(7, (2, 5))


def test_orbit_rank_bad_input():
    with pytest.raises(TypeError):
        orbit_rank(torch.eye(3))
    with pytest.raises(ValueError, match="ambient"):
        orbit_rank([torch.eye(3)[:, :1], torch.eye(4)[:, :2]])
    with pytest.raises(ValueError, match="rtol"):
        orbit_rank([torch.eye(3, dtype=F64)[:, :1]], rtol=-1.0)


# --------------------------------------------------------------------------- stratum dimensions


@pytest.mark.parametrize("d,r1,r2", [(6, 2, 3), (5, 3, 3), (7, 3, 4), (4, 2, 2), (6, 1, 5)])
def test_stratum_dim_matches_orbit_rank(gen, d, r1, r2):
    dims = []
    for k in stratum_range(d, r1, r2):
        V, U = random_pair_with_intersection(d, r1, r2, k, gen)
        dims.append(orbit_rank([V, U]).rank)
        assert dims[-1] == stratum_dim(d, r1, r2, k)
    assert dims == sorted(dims, reverse=True) and len(set(dims)) == len(dims)  # strictly smaller as k grows
    assert dims[0] == grassmannian_product_dim(d, [r1, r2])  # the generic stratum is open
    assert dims[-1] == flag_dim(d, sorted([r1, r2]))  # the flag stratum is Fl(r1, r2; d)


# --------------------------------------------------------------------------- nested parametrisation (Test A.6)


@pytest.mark.parametrize("d,ranks", [(10, (2, 5, 8)), (8, (3, 3, 3)), (6, (1, 2, 3, 4, 5)), (4, (4,))])
def test_nested_parametrisation(gen, d, ranks):
    params = nested_flag_parameters(d, ranks, gen)
    assert sum(p.numel() for p in params) == parameter_counts(d, ranks)[0]
    Qs = nested_flag_bases(params)
    assert [Q.shape for Q in Qs] == [(d, r) for r in ranks]
    for Q in Qs:
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1], dtype=F64), atol=1e-12)
    assert float(nested_violation(Qs)) < 1e-10
    assert orbit_rank(Qs).rank == flag_dim(d, ranks)


def test_nested_violation_negative_control(gen):
    bases = [haar_frames(8, r, 1, gen)[0] for r in (2, 4, 6)]
    assert float(nested_violation(bases)) > 0.1


def test_nested_flag_bases_bad_input(gen):
    with pytest.raises(TypeError):
        nested_flag_bases(torch.eye(3))
    with pytest.raises(ValueError, match="coefficient"):
        nested_flag_bases([torch.randn(6, 3, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)])


# --------------------------------------------------------------------------- drift (Cor 3.4)


def _drift_scipy(A, B):
    theta = scipy.linalg.subspace_angles(np.asarray(A), np.asarray(B))
    return float(np.sum(np.sin(theta) ** 2))


def test_drift_against_scipy_and_closed_forms(gen):
    for r, rp in [(2, 4), (3, 3), (5, 2)]:
        A = torch.randn(9, r, generator=gen, dtype=F64)
        B = torch.randn(9, rp, generator=gen, dtype=F64)
        got = float(subspace_drift(A, B))
        assert got == pytest.approx(_drift_scipy(A, B), abs=1e-12)
        QA, QB = orthonormal_basis(A), orthonormal_basis(B)
        assert got == pytest.approx(float(drift_orthonormal(QA, QB)), abs=1e-12)
        small, big = (QA, QB) if r <= rp else (QB, QA)
        assert got == pytest.approx(float((small - big @ (big.T @ small)).square().sum()), abs=1e-12)
        proj = float(cumulative_drift([A, B], variant="projector"))
        assert proj == pytest.approx(abs(r - rp) + 2 * got, abs=1e-12)


def test_drift_zero_exactly_on_flags(gen):
    F = random_flag(8, (2, 4, 6), gen)
    assert float(cumulative_drift(F)) < 1e-28  # sines, not cancellation
    assert float(cumulative_drift(F, "projector")) == pytest.approx(4.0, abs=1e-12)
    H = [haar_frames(8, r, 1, gen)[0] for r in (2, 4, 6)]  # negative control
    assert float(cumulative_drift(H)) > 0.1


@given(st.integers(0, 10_000))
def test_drift_is_sum_of_pairs_and_nonnegative(seed):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(6, r, generator=g, dtype=F64) for r in (1, 3, 3, 5)]
    D = float(cumulative_drift(bases))
    assert D >= 0
    assert D == pytest.approx(sum(_drift_scipy(a, b) for a, b in zip(bases, bases[1:])), abs=1e-12)


def test_drift_batched(gen):
    A = haar_frames(7, 2, 5, gen)
    B = haar_frames(7, 3, 5, gen)
    D = cumulative_drift([A, B])
    assert D.shape == (5,)
    for i in range(5):
        assert float(D[i]) == pytest.approx(float(subspace_drift(A[i], B[i])), abs=1e-13)


def test_drift_quadratic_under_rotation(gen):
    """D(exp(tK) V_1, V_2, ...) = t^2 ||(I - P_2) K Q_1||_F^2 + O(t^3) (finite-difference oracle)."""
    F = random_flag(7, (2, 4), gen)
    K = torch.randn(7, 7, generator=gen, dtype=F64)
    K = K - K.T
    Q1, Q2 = F
    c = float(((torch.eye(7, dtype=F64) - Q2 @ Q2.T) @ K @ Q1).square().sum())
    errs = []
    for t in (1e-2, 1e-3):
        D = float(cumulative_drift([torch.linalg.matrix_exp(t * K) @ Q1, Q2]))
        errs.append(abs(D / t**2 - c))
    assert errs[1] < 0.2 * errs[0] and errs[1] < 1e-2 * c


def test_drift_orthonormal_is_differentiable(gen):
    A = torch.randn(6, 2, generator=gen, dtype=F64, requires_grad=True)
    QU = haar_frames(6, 3, 1, gen)[0]
    loss = drift_orthonormal(torch.linalg.qr(A).Q, QU)
    loss.backward()
    assert A.grad is not None and torch.isfinite(A.grad).all() and float(A.grad.norm()) > 0


def test_drift_bad_input():
    with pytest.raises(ValueError, match="variant"):
        cumulative_drift([torch.eye(3)], variant="chordal")
    with pytest.raises(TypeError):
        cumulative_drift(torch.eye(3))
    with pytest.raises(ValueError, match="ambient"):
        cumulative_drift([torch.eye(3)[:, :1], torch.eye(4)[:, :2]])
    with pytest.raises(ValueError, match="NaN"):
        subspace_drift(torch.full((3, 1), float("nan")), torch.eye(3))
    assert float(cumulative_drift([torch.eye(3, dtype=F64)[:, :1]])) == 0.0  # one subspace: empty sum


# --------------------------------------------------------------------------- Plücker embedding


def test_plucker_gr24_relation_and_cauchy_binet(gen):
    A = torch.randn(4, 2, generator=gen, dtype=F64)
    p = plucker_coordinates(A, normalize=False)
    assert p.shape == (6,)  # order 12, 13, 14, 23, 24, 34
    p12, p13, p14, p23, p24, p34 = p.tolist()
    assert abs(p12 * p34 - p13 * p24 + p14 * p23) < 1e-12
    # Cauchy–Binet: sum of squared minors = det(A^T A); <p(A), p(B)> = det(A^T B)
    B = torch.randn(4, 2, generator=gen, dtype=F64)
    assert float(p.square().sum()) == pytest.approx(float(torch.linalg.det(A.T @ A)), rel=1e-12)
    assert float(p @ plucker_coordinates(B, normalize=False)) == pytest.approx(float(torch.linalg.det(A.T @ B)), rel=1e-10)
    # explicit minor by hand
    assert p13 == pytest.approx(float(A[0, 0] * A[2, 1] - A[2, 0] * A[0, 1]), rel=1e-12)


def test_plucker_distance_closed_form_and_gauge(gen):
    for d, r in [(5, 2), (7, 3), (6, 6)]:
        A = torch.randn(d, r, generator=gen, dtype=F64)
        B = torch.randn(d, r, generator=gen, dtype=F64)
        theta = scipy.linalg.subspace_angles(np.asarray(A), np.asarray(B))
        expected = math.sqrt(max(0.0, 2 - 2 * float(np.prod(np.cos(theta)))))
        assert float(plucker_distance(A, B)) == pytest.approx(expected, abs=1e-10)
        M = torch.randn(r, r, generator=gen, dtype=F64)  # det may be negative: sign invariance
        assert float(plucker_distance(A @ M, A)) < 1e-12


def test_plucker_degeneration_spec_a8():
    """Spec Test A.8: distance of lambda(t) V to span(e_1..e_r1) is sqrt(2 - 2 (1+t^2)^(-s/2)) ~ sqrt(s) t."""
    d, r1, r2, k = 7, 3, 4, 1
    V, _ = normal_form_pair(d, r1, r2, k)
    E = torch.eye(d, dtype=F64)[:, :r1]
    for t in (1.0, 0.1, 0.01, 1e-4):
        dist = float(plucker_distance(one_parameter_subgroup(d, r2, t) @ V, E))
        s = r1 - k
        exact = math.sqrt(2 - 2 * (1 + t * t) ** (-s / 2)) if t > 1e-3 else math.sqrt(s) * t
        assert dist == pytest.approx(exact, rel=1e-6)


def test_plucker_bad_input():
    with pytest.raises(ValueError, match="full column rank"):
        plucker_coordinates(torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="equal dimension"):
        plucker_distance(torch.eye(4)[:, :1], torch.eye(4)[:, :2])
    with pytest.raises(ValueError, match="limit"):
        plucker_coordinates(torch.zeros(60, 30, dtype=F64))
    with pytest.raises(TypeError):
        plucker_coordinates(np.eye(3))
    assert plucker_coordinates(torch.eye(5, dtype=F64)[None, :, :2].expand(3, 5, 2)).shape == (3, 10)


def test_random_flag_is_nested_and_orthonormal(gen):
    F = random_flag(9, (2, 2, 7), gen)
    for Q in F:
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1], dtype=F64), atol=1e-12)
    assert float(nested_violation(F)) < 1e-14
    assert torch.equal(F[0], F[1])
