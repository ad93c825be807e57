"""Tests for flagcore.neuromanifold: the closed forms (Eqs. 7, 14, 16, Theorem 3.9) on held-back
configurations computed by hand below, the hypotheses they refuse, and the generic Jacobian-rank
estimator against independent oracles (reverse-mode autograd, explicit low-rank matrices).
"""

from __future__ import annotations

import math

import pytest
import torch

from flagcore.lightning import flatten_weights, random_inputs, random_weights, split_parameters, deep_network
from flagcore.neuromanifold import (
    DimensionEstimate,
    estimate_dimension,
    expected_dimension,
    jacobian_forward,
    jacobian_rank,
    rank_from_jacobian,
)

F64 = torch.float64

# Held-back configurations (not in the spec's tables), each worked out by hand:
HAND = [
    # one lightning layer, Eq. (7): abar (2d - abar) + d d' - 1, abar = min(a, d)
    ((5, 4), (3,), False, 3 * (10 - 3) + 20 - 1),  # = 40
    ((6, 2), (4,), False, 4 * (12 - 4) + 12 - 1),  # = 43
    ((2, 3), (5,), False, 2 * (4 - 2) + 6 - 1),  # abar = 2: 9
    ((1, 2), (1,), False, 1 * (2 - 1) + 2 - 1),  # abar = 1 but d' = 2: 2
    # one softmax layer, Theorem 3.9: no -1
    ((5, 4), (3,), True, 41),
    # deep lightning, Eq. (14): layer terms a(2d - a) + d_i d_{i-1}
    # (5,4,4,6; 3,2,2): 21+20 + 12+16 + 12+24 = 105; minus 2*16 = 73; minus l = 70
    ((5, 4, 4, 6), (3, 2, 2), False, 70),
    ((5, 4, 4, 6), (3, 2, 2), True, 73),
    # (6,3,7; 4,3): 32+18 + 9+21 = 80; minus 9 = 71; minus 2 = 69
    ((6, 3, 7), (4, 3), False, 69),
    ((6, 3, 7), (4, 3), True, 71),
]


@pytest.mark.parametrize("d,a,normalized,value", HAND)
def test_expected_dimension_by_hand(d, a, normalized, value):
    assert expected_dimension(list(d), list(a), normalized) == value


@pytest.mark.parametrize("d,a,normalized,value", [h for h in HAND if sum(h[0]) < 20])
def test_estimate_matches_hand_values(d, a, normalized, value):
    est = estimate_dimension(d, a, normalized, seed=3)
    assert est.rank == value and est.conclusive, (est.rank, est.gap)
    assert est.n_params == sum(2 * a[i] * d[i] + d[i + 1] * d[i] for i in range(len(a)))


def test_figure3_endpoint_and_eq14_gap():
    """Figure 3 at delta = 4 (delta^2 + 8 delta - 8 = 40) and the same network without softmax (38)."""
    assert expected_dimension((4, 4, 4), (2, 2), True) == 40
    est = estimate_dimension((4, 4, 4), (2, 2), True, samples=100)
    assert est.rank == 40 and est.gap > 1e6
    assert estimate_dimension((4, 4, 4), (2, 2), False).rank == 38


def test_one_token_negative_control():
    """With t = 1 only sym(A) is visible: (d, d', a) = (3, 2, 3) gives d(d+1)/2 + d d' - 1 = 11, not Eq. (7)'s 14."""
    est = estimate_dimension((3, 2), (3,), tokens=1, samples=40)
    assert expected_dimension((3, 2), (3,)) == 14
    assert est.rank == 3 * 4 // 2 + 6 - 1 and est.conclusive


@pytest.mark.parametrize(
    "d,a,normalized,match",
    [
        ((3, 1), (1,), False, "min\\(a, d\\) >= 2 or d' >= 2"),
        ((3, 4, 3), (2, 2), False, "bottleneck"),
        ((4, 3, 2, 4), (2, 2, 2), True, "bottleneck"),
        ((3, 3, 3), (4, 2), False, "a_i <= d_\\(i-1\\)"),
        ((3, 3, 3), (1, 2), True, "a_i >= 2"),
        ((3, -3), (2,), False, "positive integer"),
        ((3, 3, 3), (2,), False, "one entry per layer"),
        ((3,), (), False, "at least"),
    ],
)
def test_expected_dimension_refuses(d, a, normalized, match):
    with pytest.raises(ValueError, match=match):
        expected_dimension(d, a, normalized)


def test_expected_dimension_types():
    with pytest.raises(TypeError):
        expected_dimension((3, 2.0), (2,))
    with pytest.raises(TypeError):
        expected_dimension(3, (2,))
    with pytest.raises(TypeError):
        expected_dimension((3, True), (2,))


# --------------------------------------------------------------------------- the generic estimator


def test_jacobian_forward_matches_reverse_mode(gen):
    d, a = (3, 2, 4), (2, 2)
    theta = flatten_weights(random_weights(d, a, gen))
    X = random_inputs(5, 3, 3, gen)

    def f(p, x):
        return deep_network(x, split_parameters(p, d, a), normalized=True)

    J = jacobian_forward(f, theta, X)
    J_rev = torch.autograd.functional.jacobian(lambda p: f(p, X).reshape(-1), theta)
    assert J.shape == (5 * 4 * 3, theta.numel())
    assert float((J - J_rev).abs().max()) < 1e-12 * float(J_rev.abs().max())
    # chunking changes nothing
    assert torch.allclose(jacobian_forward(f, theta, X, chunk_size=7), J, rtol=0, atol=1e-14)
    # central finite differences on one column
    h, k = 1e-6, 11
    e = torch.zeros_like(theta)
    e[k] = h
    fd = (f(theta + e, X) - f(theta - e, X)).reshape(-1) / (2 * h)
    assert float((fd - J[:, k]).abs().max()) < 1e-6 * float(J[:, k].abs().max())


@pytest.mark.parametrize("r", [0, 1, 4, 9])
def test_rank_of_a_known_low_rank_map(gen, r):
    """f(theta, M) = M theta with rank(M) = r: the estimator must return r, with an infinite or huge gap."""
    M = torch.randn(40, r, generator=gen, dtype=F64) @ torch.randn(r, 12, generator=gen, dtype=F64)
    est = jacobian_rank(lambda p, m: m @ p, torch.randn(12, generator=gen, dtype=F64), M)
    assert isinstance(est, DimensionEstimate)
    assert est.rank == r and est.gap > 1e9 and est.n_params == 12 and est.n_outputs == 40
    assert est.singular_values.shape == (12,)


@pytest.mark.parametrize("d,a", [(5, 2), (3, 5), (4, 1), (6, 6)])
def test_matrix_multiplication_rank_lemma_3_1(gen, d, a):
    """(Q, K) -> K^T Q has image dimension abar (2 d - abar): fibers GL(a) (Lemma 3.1)."""
    ab = min(a, d)

    def f(p, _):
        Q, K = p[: a * d].reshape(a, d), p[a * d :].reshape(a, d)
        return K.T @ Q

    est = jacobian_rank(f, torch.randn(2 * a * d, generator=gen, dtype=F64), None)
    assert est.rank == ab * (2 * d - ab)


def test_tolerance_controls_the_cut():
    """A spectrum with a planted 1e-6 singular value: rtol below it counts it, above it does not."""
    U, _ = torch.linalg.qr(torch.randn(30, 5, dtype=F64, generator=torch.Generator().manual_seed(1)))
    J = U @ torch.diag(torch.tensor([1.0, 0.5, 0.2, 1e-6, 1e-16], dtype=F64))
    lo = rank_from_jacobian(J, rtol=1e-9, normalize_rows=False)
    hi = rank_from_jacobian(J, rtol=1e-3, normalize_rows=False)
    assert (lo.rank, hi.rank) == (4, 3)
    assert math.isclose(lo.gap, 1e10, rel_tol=1e-3) and math.isclose(hi.gap, 2e5, rel_tol=1e-3)


def test_estimator_bad_input():
    with pytest.raises(ValueError, match="rtol"):
        rank_from_jacobian(torch.eye(3, dtype=F64), rtol=0.0)
    with pytest.raises(TypeError):
        rank_from_jacobian(torch.eye(3, dtype=F64), rtol="1e-9")
    with pytest.raises(ValueError, match="NaN"):
        rank_from_jacobian(torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="1-D"):
        jacobian_rank(lambda p, x: p, torch.zeros(2, 2, dtype=F64), None)
    with pytest.raises(TypeError):
        jacobian_rank("not callable", torch.zeros(2, dtype=F64), None)
    with pytest.raises(ValueError, match="samples"):
        estimate_dimension((3, 2), (2,), samples=0)
    with pytest.raises(ValueError, match="tokens"):
        estimate_dimension((3, 2), (2,), tokens=0)
    with pytest.raises(ValueError, match="positive integer"):
        estimate_dimension((0, 2), (2,))


def test_largest_gap_rank_cross_check():
    U, _ = torch.linalg.qr(torch.randn(30, 6, dtype=F64, generator=torch.Generator().manual_seed(2)))
    spectrum = torch.tensor([1.0, 0.3, 1e-3, 1e-4, 1e-15, 1e-16], dtype=F64)
    est = rank_from_jacobian(U @ torch.diag(spectrum), normalize_rows=False)
    assert est.rank == 4 and est.largest_gap_rank == 4
    # a full-rank, well-conditioned spectrum cuts at its end
    full = rank_from_jacobian(U @ torch.diag(torch.linspace(1, 0.1, 6, dtype=F64)), normalize_rows=False)
    assert full.rank == full.largest_gap_rank == 6 and math.isinf(full.gap)
