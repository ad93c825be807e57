"""Tests for the Theorem 3.4 (closedness / boundary) helpers in flagcore.lightning:
``quadric_layer``, ``factor_quadric`` and the least-squares fitter ``fit_layer_av``.

Oracles: the cubic map written with explicit Python loops over tokens (numpy), the identity
``quadric_layer(v, w, sym(u z^T)) = phi_{u v^T, w z^T}``, eigenvalues from numpy. Negative controls:
definite and rank-3 quadrics must not factor; a definite quadric map (outside the neuromanifold,
spec lightning.md §5.1) must not be fitted to round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore.lightning import factor_quadric, fit_layer_av, lightning_layer_av, quadric_layer, random_inputs

F64 = torch.float64


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _sym(u, z):
    return 0.5 * (torch.outer(u, z) + torch.outer(z, u))


def test_quadric_layer_matches_loop_oracle(gen):
    d, dp, t = 3, 2, 4
    X, v, w = _randn(gen, 5, d, t), _randn(gen, d), _randn(gen, dp)
    S = _randn(gen, d, d)
    q = S + S.T
    out = quadric_layer(X, v, w, q).numpy()
    Xn, vn, wn, qn = X.numpy(), v.numpy(), w.numpy(), q.numpy()
    for n in range(5):
        energy = sum(Xn[n, :, j] @ qn @ Xn[n, :, j] for j in range(t))
        for i in range(t):
            np.testing.assert_allclose(out[n, :, i], (vn @ Xn[n, :, i]) * wn * energy, rtol=1e-12, atol=1e-12)


@given(d=st.integers(1, 4), dp=st.integers(1, 3), t=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_quadric_layer_of_product_is_a_lightning_layer(d, dp, t, seed):
    gen = torch.Generator().manual_seed(seed)
    X = random_inputs(3, d, t, gen)
    u, z, v, w = _randn(gen, d), _randn(gen, d), _randn(gen, d), _randn(gen, dp)
    lhs = quadric_layer(X, v, w, _sym(u, z))
    rhs = lightning_layer_av(X, torch.outer(u, v), torch.outer(w, z))
    assert torch.allclose(lhs, rhs, rtol=1e-11, atol=1e-12)


@given(d=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["indefinite", "rank1+", "rank1-"]))
def test_factor_quadric_reconstructs_real_products(d, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    u, z = _randn(gen, d), _randn(gen, d)
    if kind == "rank1+":
        z = 0.7 * u
    elif kind == "rank1-":
        z = -1.3 * u
    if kind == "indefinite" and abs(torch.dot(u, z)) > 0.999 * u.norm() * z.norm():
        return  # (numerically) parallel: rank one, covered by the other kinds
    q = _sym(u, z)
    factors = factor_quadric(q)
    assert factors is not None
    a, b = factors
    assert torch.allclose(_sym(a, b), q, atol=1e-10 * q.abs().max())


def test_factor_quadric_refuses_definite_and_rank3(gen):
    u, y, x = _randn(gen, 3), _randn(gen, 3), _randn(gen, 3)
    definite_plane = torch.outer(u, u) + 1e-4 * torch.outer(y, y)
    assert np.all(np.linalg.eigvalsh(definite_plane.numpy())[-2:] > 0)  # oracle: two positive eigenvalues
    assert factor_quadric(definite_plane) is None
    assert factor_quadric(-definite_plane) is None
    indefinite_plane = torch.outer(u, u) - 1e-4 * torch.outer(y, y)
    assert factor_quadric(indefinite_plane) is not None
    rank3 = torch.outer(u, u) - torch.outer(y, y) + torch.outer(x, x)
    assert factor_quadric(rank3) is None
    a, b = factor_quadric(torch.zeros(3, 3, dtype=F64))
    assert a.abs().max() == 0 and b.abs().max() == 0


@pytest.mark.parametrize("d,dp", [(2, 1), (3, 2)])
def test_fit_recovers_layers_to_roundoff_with_balanced_parameters(gen, d, dp):
    X = random_inputs(20, d, 2, gen)
    A, V = _randn(gen, d, d), _randn(gen, dp, d)
    Y = lightning_layer_av(X, 1e3 * A, V / 1e3)  # far out on the rescaling orbit
    Af, Vf, res = fit_layer_av(X, Y, generator=gen)
    assert res < 1e-12
    assert torch.allclose(lightning_layer_av(X, Af, Vf), Y, rtol=1e-10, atol=1e-12 * Y.abs().max())
    assert abs(Af.norm() - Vf.norm()) < 1e-8 * Af.norm()  # balanced: bounded parameters
    # the boundary point u v^T, w u^T (a critical value) is reached too
    u, v, w = _randn(gen, d), _randn(gen, d), _randn(gen, dp)
    Yb = quadric_layer(X, v, w, torch.outer(u, u))
    assert fit_layer_av(X, Yb, generator=gen)[2] < 1e-12


def test_fit_cannot_reach_a_definite_quadric_map(gen):
    # negative control: (v^T x_i) w sum_j [(u^T x_j)^2 + (y^T x_j)^2] is outside M (complex factors)
    d, dp = 2, 1
    X = random_inputs(20, d, 2, gen)
    u, y, v, w = _randn(gen, d), _randn(gen, d), _randn(gen, d), _randn(gen, dp)
    Y = quadric_layer(X, v, w, torch.outer(u, u) + 0.25 * torch.outer(y, y))
    assert fit_layer_av(X, Y, generator=gen, restarts=3, steps=100)[2] > 1e-4
    # same with an indefinite quadric: inside M, reached to round-off
    Y2 = quadric_layer(X, v, w, torch.outer(u, u) - 0.25 * torch.outer(y, y))
    assert fit_layer_av(X, Y2, generator=gen)[2] < 1e-12


def test_fit_zero_target_and_init(gen):
    X = random_inputs(10, 2, 2, gen)
    A, V, res = fit_layer_av(X, torch.zeros(10, 3, 2, dtype=F64))
    assert res == 0.0 and A.shape == (2, 2) and V.shape == (3, 2) and A.abs().max() == 0
    At, Vt = _randn(gen, 2, 2), _randn(gen, 3, 2)
    Y = lightning_layer_av(X, At, Vt)
    Af, Vf, res = fit_layer_av(X, Y, restarts=1, steps=5, init=(At, Vt))  # exact init: already converged
    assert res < 1e-13


def test_bad_input():
    gen = torch.Generator().manual_seed(0)
    X = random_inputs(4, 3, 2, gen)
    v, w = _randn(gen, 3), _randn(gen, 2)
    q = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="symmetric"):
        quadric_layer(X, v, w, torch.triu(torch.ones(3, 3, dtype=F64)))
    with pytest.raises(ValueError, match="length d"):
        quadric_layer(X, _randn(gen, 2), w, q)
    with pytest.raises(ValueError, match=r"\[d, d\]"):
        quadric_layer(X, v, w, torch.eye(2, dtype=F64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quadric_layer(X, [1.0, 2.0, 3.0], w, q)
    with pytest.raises(ValueError, match="vector"):
        quadric_layer(X, v, w[None, :], q)
    with pytest.raises(ValueError, match="rtol"):
        factor_quadric(q, rtol=2.0)
    with pytest.raises(ValueError, match="symmetric"):
        factor_quadric(torch.triu(torch.ones(3, 3, dtype=F64)))
    Y = torch.zeros(5, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="same n and t"):
        fit_layer_av(X, Y)
    with pytest.raises(ValueError, match="positive"):
        fit_layer_av(X, torch.ones(4, 2, 2, dtype=F64), restarts=0)
    with pytest.raises(TypeError, match="pair"):
        fit_layer_av(X, torch.ones(4, 2, 2, dtype=F64), init=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="init must be"):
        fit_layer_av(X, torch.ones(4, 2, 2, dtype=F64), init=(torch.eye(2, dtype=F64), torch.eye(2, dtype=F64)))
