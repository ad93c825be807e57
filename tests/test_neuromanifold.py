"""Tests for flagcore.neuromanifold: the closed forms (Eqs. 7, 14, 16, Theorem 3.9) on held-back
configurations computed by hand below, the hypotheses they refuse, and the generic Jacobian-rank
estimator against independent oracles (reverse-mode autograd, explicit low-rank matrices).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore.lightning import flatten_weights, random_inputs, random_weights, split_parameters, deep_network
from flagcore.neuromanifold import (
    MAX_DOUBLINGS,
    DimensionEstimate,
    attention_jacobian,
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


# --------------------------------------------------------------------------- closed-form tangents and the saturation certificate


def _generic_jacobian(theta, X, d, a, normalized):
    """Oracle: the generic vmapped-jvp Jacobian of the library's own network (deep_network)."""
    return jacobian_forward(lambda p, x: deep_network(x, split_parameters(p, d, a), normalized), theta, X)


@pytest.mark.parametrize(
    "d,a,normalized,t",
    [
        ((3, 3, 3), (2, 2), True, 3),  # Figure 3 at delta = 3
        ((5, 4, 4, 6), (3, 2, 2), False, 3),  # deep bottleneck lightning
        ((4, 3, 5), (2, 3), True, 2),  # a_2 = d_1, d_l > d_0, two tokens
        ((3, 2), (3,), False, 1),  # one token
        ((2, 3), (5,), True, 5),  # a > d, many tokens
        ((3, 4, 2, 3, 2), (1, 2, 2, 1), True, 4),  # depth 4, a = 1 layers
    ],
)
def test_attention_jacobian_matches_generic_forward_mode(gen, d, a, normalized, t):
    theta = flatten_weights(random_weights(d, a, gen))
    X = random_inputs(7, d[0], t, gen, scale=2.0)
    J = attention_jacobian(theta, X, d, a, normalized)
    J0 = _generic_jacobian(theta, X, d, a, normalized)
    assert J.shape == J0.shape == (7 * d[-1] * t, theta.numel())
    assert float((J - J0).abs().max()) < 1e-13 * float(J0.abs().max())
    # negative control: the other activation gives a different Jacobian (the check can fail)
    J1 = _generic_jacobian(theta, X, d, a, not normalized)
    assert float((J - J1).abs().max()) > 1e-3 * float(J0.abs().max())


@given(
    l=st.integers(1, 3),
    widths=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    qk=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    t=st.integers(1, 4),
    n=st.integers(1, 4),
    normalized=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_jacobian_property(l, widths, qk, t, n, normalized, seed):
    """Any widths, depth, token count and batch: closed-form tangents == generic forward mode."""
    d, a = widths[: l + 1], qk[:l]
    g = torch.Generator().manual_seed(seed)
    theta = flatten_weights(random_weights(d, a, g))
    X = random_inputs(n, d[0], t, g)
    J = attention_jacobian(theta, X, d, a, normalized)
    J0 = _generic_jacobian(theta, X, d, a, normalized)
    assert torch.allclose(J, J0, rtol=0, atol=1e-13 * max(1.0, float(J0.abs().max())))


def test_attention_jacobian_bad_input(gen):
    theta = flatten_weights(random_weights((3, 2), (2,), gen))
    with pytest.raises(ValueError, match="X must be"):
        attention_jacobian(theta, torch.zeros(4, 2, 3, dtype=F64), (3, 2), (2,))
    with pytest.raises(ValueError, match="theta"):
        attention_jacobian(theta[:-1], torch.zeros(4, 3, 3, dtype=F64), (3, 2), (2,))


def test_explicit_samples_is_the_generic_rank_on_the_same_draws():
    """samples=N ranks exactly the Jacobian of the documented draws (weights, then N inputs, one generator)."""
    d, a, N = (4, 3, 4), (2, 2), 30
    est = estimate_dimension(d, a, normalized=True, samples=N, seed=5)
    g = torch.Generator().manual_seed(5)
    theta = flatten_weights(random_weights(d, a, g))
    X = random_inputs(N, d[0], 3, g, scale=3.0)
    ref = rank_from_jacobian(_generic_jacobian(theta, X, d, a, True))
    assert est.rank == ref.rank and est.n_outputs == ref.n_outputs == N * 4 * 3 and est.samples == N
    assert torch.allclose(est.singular_values, ref.singular_values, rtol=1e-10, atol=1e-13 * float(ref.singular_values[0]))
    # chunking over inputs changes nothing
    chunked = estimate_dimension(d, a, normalized=True, samples=N, seed=5, chunk_size=7)
    assert torch.allclose(chunked.singular_values, est.singular_values, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "d,a,normalized",
    [
        ((10, 10, 10), (2, 2), True),  # Figure 3, delta = 10
        ((6, 6, 6), (2, 2), True),  # Figure 3, delta = 6
        ((5, 3, 3, 4), (2, 2, 3), True),  # deep softmax bottleneck, Eq. (16)
        ((5, 3, 3, 4), (2, 2, 3), False),  # deep lightning, Eq. (14)
        ((4, 4, 4), (2, 2), False),
        ((5, 4), (3,), False),  # one layer, Eq. (7)
    ],
)
def test_adaptive_samples_are_certified(d, a, normalized):
    """Default (adaptive) N: far fewer rows than Figure 3's N = 250, the formula's rank, a wide gap at the
    cut, and the rank unchanged without the last eighth of the inputs."""
    est = estimate_dimension(d, a, normalized, seed=1)
    assert est.rank == expected_dimension(d, a, normalized)
    assert est.gap > 1e6 and est.saturated is True and est.certified
    assert est.holdout == max(1, math.ceil(est.samples / 8)) and est.holdout_rank == est.rank
    assert est.n_outputs == est.samples * 3 * d[-1] >= 2 * est.n_params


@pytest.mark.parametrize("delta,needed", [(6, 7), (10, 12)])
def test_too_few_samples_are_detected(delta, needed):
    """Negative control: below saturation (N < 7 at delta = 6, N < 12 at delta = 10 for seed 0; the rank
    grows by a few per input) the rank is low AND reported as not saturated / not certified, never as a
    certified low rank; at and above it the estimate is certified and right."""
    d, expected = (delta,) * 3, delta**2 + 8 * delta - 8
    for n in range(1, needed + 4):
        est = estimate_dimension(d, (2, 2), normalized=True, samples=n)
        if est.rank < expected:
            assert est.saturated is False and not est.certified and est.holdout_rank < est.rank, (n, est.rank)
        else:
            assert est.rank == expected
    low = estimate_dimension(d, (2, 2), normalized=True, samples=needed - 2)
    assert low.rank < expected and low.gap > 1e3 and not low.certified  # a clean gap alone would mislead
    assert estimate_dimension(d, (2, 2), normalized=True, samples=2 * needed).certified


def test_adaptive_gives_up_loudly():
    """No certifiable cut (rtol = 0.5 falls inside the continuous spectrum): adaptive sampling must raise
    after MAX_DOUBLINGS doublings, not return an uncertified rank."""
    with pytest.raises(RuntimeError, match="no certified rank"):
        estimate_dimension((3, 2), (2,), rtol=0.5)
    assert MAX_DOUBLINGS >= 3


def test_certificate_fields_on_generic_maps(gen):
    """jacobian_rank has no sampled inputs: no saturation check (None), certified = conclusive."""
    est = jacobian_rank(lambda p, _: p[:3] * p[3:], torch.randn(6, generator=gen, dtype=F64), None)
    assert est.saturated is None and est.samples is None and est.certified == est.conclusive
    with pytest.raises(ValueError, match="samples"):
        estimate_dimension((3, 2), (2,), samples=True)
    with pytest.raises(ValueError, match="chunk_size"):
        estimate_dimension((3, 2), (2,), chunk_size=0)
