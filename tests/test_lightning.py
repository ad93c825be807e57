"""Tests for flagcore.lightning: the layer's three forms, the deep network, virtual weights, the
symmetries (Lemma 3.1, Eq. 9, Eq. 13), Lemma 3.6's recursion and Eq. 12's base-3 product form.

Oracles: explicit double sums over tokens written here with Python loops (Eq. 1 / Eq. 15 read
literally), numpy einsum, and exact algebraic identities. Negative controls: the wrong swap in
Theorem 3.2 case 1, the wrong exponents in Eq. 13, a non-undone GL move, softmax under rescaling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore.lightning import (
    attention_matrix,
    base3_factor_indices,
    deep_network,
    flatten_weights,
    inter_layer_action,
    lightning_layer,
    lightning_layer_av,
    network_from_virtual,
    parameter_count,
    product_form,
    random_inputs,
    random_weights,
    rescale,
    rescale_virtual,
    softmax_layer,
    softmax_layer_av,
    split_parameters,
    virtual_weights,
)

F64 = torch.float64


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def eq1_loops(X, Q, K, V, softmax=False):
    """Eq. (1) / Eq. (15) read literally: token i's output is sum_j w_ij V x_j, tokens = columns of X."""
    d, t = X.shape
    out = torch.zeros(V.shape[0], t, dtype=F64)
    for i in range(t):
        scores = [float((Q @ X[:, i]) @ (K @ X[:, j])) for j in range(t)]
        if softmax:
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            scores = [x / sum(e) for x in e]
        for j in range(t):
            out[:, i] += scores[j] * (V @ X[:, j])
    return out


# --------------------------------------------------------------------------- single layer


@pytest.mark.parametrize("d,dp,a,t", [(3, 2, 2, 4), (4, 4, 6, 3), (2, 5, 1, 2), (5, 3, 3, 1)])
def test_layer_forms_agree_with_eq1(gen, d, dp, a, t):
    X, Q, K, V = randn(gen, d, t), randn(gen, a, d), randn(gen, a, d), randn(gen, dp, d)
    ref = eq1_loops(X, Q, K, V)
    assert rel(lightning_layer(X, Q, K, V), ref) < 1e-13
    A = attention_matrix(Q, K)
    assert rel(lightning_layer_av(X, A, V), ref) < 1e-13
    # numpy oracle of the matrix form V X X^T K^T Q X
    Xn, Qn, Kn, Vn = (M.numpy() for M in (X, Q, K, V))
    assert np.allclose(Vn @ Xn @ Xn.T @ Kn.T @ Qn @ Xn, ref.numpy(), rtol=1e-12, atol=1e-12)
    # the bilinear convention <Q x_i, K x_j> = x_j^T A x_i
    assert abs(float(X[:, 0] @ A @ X[:, -1]) - float((Q @ X[:, -1]) @ (K @ X[:, 0]))) < 1e-12


@pytest.mark.parametrize("d,dp,a,t", [(3, 2, 2, 4), (4, 4, 6, 3), (2, 5, 1, 2)])
def test_softmax_layer_matches_eq15(gen, d, dp, a, t):
    X, Q, K, V = randn(gen, d, t), randn(gen, a, d), randn(gen, a, d), randn(gen, dp, d)
    ref = eq1_loops(X, Q, K, V, softmax=True)
    assert rel(softmax_layer(X, Q, K, V), ref) < 1e-13
    assert rel(softmax_layer_av(X, attention_matrix(Q, K), V), ref) < 1e-13
    # equal tokens: output is V x in every column (step (i) of Theorem 3.9's proof)
    x = randn(gen, d, 1)
    same = softmax_layer(x.expand(d, t), Q, K, V)
    assert rel(same, (V @ x).expand(dp, t)) < 1e-13


def test_layer_is_batched_and_cubic(gen):
    X, Q, K, V = randn(gen, 7, 3, 4), randn(gen, 2, 3), randn(gen, 2, 3), randn(gen, 2, 3)
    out = lightning_layer(X, Q, K, V)
    assert out.shape == (7, 2, 4)
    assert rel(out[5], eq1_loops(X[5], Q, K, V)) < 1e-13
    assert rel(lightning_layer(1.7 * X, Q, K, V), 1.7**3 * out) < 1e-13


def test_theorem_3_2_rank_one_swap_and_control(gen):
    d, dp, t = 3, 2, 4
    u, v, z, w = randn(gen, d), randn(gen, d), randn(gen, d), randn(gen, dp)
    X = randn(gen, 5, d, t)
    phi = lightning_layer_av(X, torch.outer(u, v), torch.outer(w, z))
    swapped = lightning_layer_av(X, torch.outer(z, v), torch.outer(w, u))
    assert rel(swapped, phi) < 1e-13
    wrong = lightning_layer_av(X, torch.outer(u, z), torch.outer(w, v))  # the other swap: NOT in the fiber
    assert rel(wrong, phi) > 1e-2


def test_theorem_3_2_zero_cases_and_skew(gen):
    d, dp = 3, 2
    X = randn(gen, 4, d, 3)
    V = randn(gen, dp, d)
    S = randn(gen, d, d)
    S = S - S.T
    assert float(lightning_layer_av(X, torch.zeros(d, d, dtype=F64), V).abs().max()) == 0.0
    assert float(lightning_layer_av(X, S, torch.zeros(dp, d, dtype=F64)).abs().max()) == 0.0
    assert float(lightning_layer_av(X, S, V).abs().max()) > 1e-3  # t >= 2: skew A is visible
    assert float(lightning_layer_av(X[..., :1], S, V).abs().max()) < 1e-13  # t = 1: it is not


def test_scaling_and_gl_a_symmetry_lemma_3_1(gen):
    d, dp, a = 5, 3, 3
    X, Q, K, V = randn(gen, 6, d, 3), randn(gen, a, d), randn(gen, a, d), randn(gen, dp, d)
    ref = lightning_layer(X, Q, K, V)
    assert rel(lightning_layer(X, 2.5 * Q, K, V / 2.5), ref) < 1e-13
    C = randn(gen, a, a)
    Q2, K2 = C @ Q, torch.linalg.inv(C).T @ K
    assert rel(lightning_layer(X, Q2, K2, V), ref) < 1e-12
    assert rel(attention_matrix(Q2, K2), attention_matrix(Q, K)) < 1e-12
    # Lemma 3.1: C is recovered uniquely from the two factorisations
    C_rec = Q2 @ torch.linalg.pinv(Q)
    assert rel(C_rec, C) < 1e-10
    # control: C applied to both Q and K changes A
    assert rel(attention_matrix(C @ Q, C @ K), attention_matrix(Q, K)) > 1e-2


# --------------------------------------------------------------------------- deep networks


DEEP = [((3, 3, 3), (2, 2)), ((4, 2, 2, 5), (2, 2, 2)), ((3, 3, 3, 3, 3), (2, 2, 2, 2)), ((4, 3), (2,))]


@pytest.mark.parametrize("d,a", DEEP)
def test_virtual_weights_recursion_and_product_form(gen, d, a):
    W = random_weights(d, a, gen)
    X = random_inputs(3, d[0], 3, gen)
    out = deep_network(X, W)
    Abar, Vbar = virtual_weights(W)
    assert Vbar.shape == (d[-1], d[0]) and all(A.shape == (d[0], d[0]) for A in Abar)
    assert rel(network_from_virtual(X, Abar, Vbar), out) < 1e-12
    assert rel(product_form(X, Abar, Vbar), out) < 1e-12
    # layer-by-layer composition oracle
    Y = X
    for Q, K, V in W:
        Y = torch.stack([eq1_loops(Y[n], Q, K, V) for n in range(Y.shape[0])])
    assert rel(out, Y) < 1e-12
    # homogeneous of degree 3^l
    l = len(a)
    assert rel(deep_network(1.1 * X, W), 1.1 ** (3**l) * out) < 1e-12


def test_base3_rule_by_hand():
    assert base3_factor_indices(1) == [(1, False)]
    assert base3_factor_indices(2) == [(1, False), (1, True), (2, False), (1, False)]
    l3 = base3_factor_indices(3)
    expected = "1 1T 2 1 1T 2T 1 1T 3 1 1T 2 1".split()
    assert [f"{r}{'T' if tr else ''}" for r, tr in l3] == expected
    for l in range(1, 6):
        counts = [sum(1 for r, _ in base3_factor_indices(l) if r == i) for i in range(1, l + 1)]
        assert counts == [3 ** (l - i) for i in range(1, l + 1)]
        assert len(base3_factor_indices(l)) == (3**l - 1) // 2


def test_product_form_needs_the_transposes(gen):
    """Negative control: Eq. (12) without the transposes (digit-2 factors) is a different map."""
    d, a = (3, 3, 3), (2, 2)
    W = random_weights(d, a, gen)
    X = random_inputs(2, 3, 3, gen)
    Abar, Vbar = virtual_weights(W)
    G = X @ X.transpose(-1, -2)
    wrong = Vbar
    for r, _ in base3_factor_indices(2):
        wrong = wrong @ G @ Abar[r - 1]
    assert rel(wrong @ X, deep_network(X, W)) > 1e-3


@pytest.mark.parametrize("normalized", [False, True])
def test_inter_layer_symmetry_eq9(gen, normalized):
    d, a = (4, 3, 3, 5), (2, 3, 2)
    W = random_weights(d, a, gen)
    X = random_inputs(4, 4, 3, gen, scale=2.0)
    C = [torch.eye(3, dtype=F64) + 0.5 * randn(gen, 3, 3) for _ in range(2)]
    W2 = inter_layer_action(W, C)
    (A1, V1), (A2, V2) = virtual_weights(W), virtual_weights(W2)
    assert max(rel(x, y) for x, y in zip(A2, A1)) < 1e-12 and rel(V2, V1) < 1e-12
    assert rel(deep_network(X, W2, normalized), deep_network(X, W, normalized)) < 1e-12
    # control: transform the output of layer 1 without undoing it in layer 2
    Q, K, V = W[0]
    broken = [(Q, K, C[0] @ V), *W[1:]]
    assert rel(deep_network(X, broken, normalized), deep_network(X, W, normalized)) > 1e-3


def test_rescaling_eq13_exponents(gen):
    d, a = (3, 3, 3, 3), (2, 2, 2)
    W = random_weights(d, a, gen)
    X = random_inputs(4, 3, 3, gen)
    c = [1.3, 0.7, -1.9]
    ref = deep_network(X, W)
    assert rel(deep_network(X, rescale(W, c)), ref) < 1e-12
    Abar, Vbar = virtual_weights(W)
    A2, V2 = rescale_virtual(Abar, Vbar, c)
    assert rel(product_form(X, A2, V2), ref) < 1e-12
    # control 1: the naive exponents c = prod c_i^-1 do not give a symmetry
    Q, K, V = W[-1]
    naive = [(ci * Qi, Ki, Vi) for ci, (Qi, Ki, Vi) in zip(c, W)]
    naive[-1] = (naive[-1][0], K, V / math.prod(c))
    assert rel(deep_network(X, naive), ref) > 1e-2
    # control 2: softmax networks have no scaling symmetry (Theorem 3.9 / Conjecture 3.10)
    ref_s = deep_network(X, W, normalized=True)
    assert rel(deep_network(X, rescale(W, c), normalized=True), ref_s) > 1e-2


@given(
    l=st.integers(1, 3),
    d0=st.integers(1, 4),
    delta=st.integers(1, 4),
    dl=st.integers(1, 4),
    a=st.integers(1, 4),
    t=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forms_agree(l, d0, delta, dl, a, t, seed):
    gen = torch.Generator().manual_seed(seed)
    d = (d0,) + (delta,) * (l - 1) + (dl,)
    W = random_weights(d, (a,) * l, gen)
    X = random_inputs(2, d0, t, gen)
    out = deep_network(X, W)
    Abar, Vbar = virtual_weights(W)
    scale = float(torch.linalg.vector_norm(out)) + 1e-300
    assert float(torch.linalg.vector_norm(product_form(X, Abar, Vbar) - out)) <= 1e-11 * scale + 1e-300
    assert float(torch.linalg.vector_norm(network_from_virtual(X, Abar, Vbar) - out)) <= 1e-11 * scale + 1e-300
    theta = flatten_weights(W)
    assert theta.numel() == parameter_count(d, (a,) * l)
    assert all(torch.equal(x, y) for L1, L2 in zip(split_parameters(theta, d, (a,) * l), W) for x, y in zip(L1, L2))


# --------------------------------------------------------------------------- bad input


def test_bad_input(gen):
    X, Q, K, V = randn(gen, 3, 2), randn(gen, 2, 3), randn(gen, 2, 3), randn(gen, 2, 3)
    with pytest.raises(ValueError, match="Q and K"):
        lightning_layer(X, Q, randn(gen, 1, 3), V)
    with pytest.raises(ValueError, match="rows of X"):
        lightning_layer(randn(gen, 4, 2), Q, K, V)
    with pytest.raises(ValueError, match="V must be"):
        lightning_layer(X, Q, K, randn(gen, 2, 4))
    with pytest.raises(TypeError):
        lightning_layer(X.numpy(), Q, K, V)
    with pytest.raises(ValueError, match="NaN"):
        lightning_layer(X * float("nan"), Q, K, V)
    with pytest.raises(ValueError, match="A must be"):
        lightning_layer_av(X, randn(gen, 3, 2), V)
    with pytest.raises(ValueError, match="temperature"):
        softmax_layer(X, Q, K, V, temperature=0.0)
    W = random_weights((3, 2, 3), (2, 2), gen)
    with pytest.raises(ValueError, match="layer 2 expects width"):
        deep_network(X, [W[0], W[0]])
    with pytest.raises(TypeError):
        deep_network(X, (Q, K, V))
    with pytest.raises(ValueError, match="l - 1 = 1"):
        inter_layer_action(W, [])
    with pytest.raises(ValueError, match=r"C_1 must be \[d_1, d_1\]"):
        inter_layer_action(W, [torch.eye(3, dtype=F64)])
    with pytest.raises(ValueError, match="non-zero"):
        rescale(W, [1.0, 0.0])
    with pytest.raises(ValueError, match="one scale per layer"):
        rescale(W, [1.0])
    with pytest.raises(ValueError, match="positive integer"):
        random_weights((3, -1), (2,))
    with pytest.raises(ValueError, match="one entry per layer"):
        random_weights((3, 3, 3), (2,))
    with pytest.raises(TypeError):
        random_weights((3, 2.5), (2,))
    with pytest.raises(ValueError, match="length"):
        split_parameters(torch.zeros(5, dtype=F64), (3, 2), (2,))
    with pytest.raises(ValueError, match="depth"):
        base3_factor_indices(0)


@pytest.mark.parametrize("normalized", [False, True])
def test_token_layout_matches_matrix_form(gen, normalized):
    """The token-by-token evaluation used by the dimension estimator is the same map as deep_network."""
    from flagcore.lightning import _network_tokens

    d, a = (4, 3, 5), (2, 3)
    W = random_weights(d, a, gen)
    X = random_inputs(6, 4, 3, gen, scale=2.0)
    assert rel(_network_tokens(X, W, normalized), deep_network(X, W, normalized)) < 1e-13
