"""Tests for the Section 5–6 diagnostics of flagcore.alignment (spec A.10–A.14).

Independent oracles: numpy/scipy (augmented least squares for the ridge minimiser, scipy.linalg.expm
for the flow, numpy.roots for the momentum factor), brute-force recursions, finite differences
(the flow's ODE and the chart Jacobian), autograd of torch's own activations (for the closed-form
derivatives), and block formulas in an adapted basis. Negative controls: subspaces that are not
invariant, features with a component outside V, a shared eigenvalue across V and V⊥.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from flagcore.alignment import (
    activation_metric,
    commutator,
    commutator_norm,
    conformal_split,
    constrained_head_descent,
    decay_factor_per_step,
    fit_decay_rate,
    geometric_consistency_gap,
    head_penalty_split,
    invariance_chart_jacobian,
    invariance_defect,
    orthogonal_residual,
    project_fixed_sum,
    relative_commutator,
    retract_projector,
    ridge_flow,
    ridge_minimizer,
    simulate_residual_dynamics,
    tangent_projection,
)
from flagcore.subspace import haar_frames, projector

F64 = torch.float64


def low_rank_features(p, r, N, gen):
    Q = haar_frames(p, r, 1, gen)[0]
    return Q, Q @ torch.randn(r, N, generator=gen, dtype=F64)


# --------------------------------------------------------------------------- Theorem 5.3


@pytest.mark.parametrize("p,r,N,C,lam", [(20, 6, 50, 4, 0.3), (8, 8, 5, 3, 1.0), (12, 3, 40, 5, 1e-2)])
def test_ridge_minimizer_against_augmented_least_squares(gen, p, r, N, C, lam):
    Q, H = low_rank_features(p, r, N, gen)
    Y = torch.randn(C, N, generator=gen, dtype=F64)
    primal, dual = ridge_minimizer(H, Y, lam), ridge_minimizer(H, Y, lam, form="dual")
    # oracle: min ||[H^T; sqrt(lam) I] W^T - [Y^T; 0]||, by numpy least squares
    A = np.vstack([H.numpy().T, math.sqrt(lam) * np.eye(p)])
    b = np.vstack([Y.numpy().T, np.zeros((p, C))])
    oracle = np.linalg.lstsq(A, b, rcond=None)[0].T
    np.testing.assert_allclose(primal.numpy(), oracle, atol=1e-10)
    np.testing.assert_allclose(dual.numpy(), oracle, atol=1e-10)
    assert orthogonal_residual(primal, Q_V=Q).norm() < 1e-12  # row(W*) ⊆ V
    grad = (primal @ H - Y) @ H.T + lam * primal
    assert grad.norm() < 1e-10


def test_ridge_minimizer_bad_input(gen):
    H, Y = torch.randn(5, 7, generator=gen, dtype=F64), torch.randn(2, 7, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="lam"):
        ridge_minimizer(H, Y, 0.0)
    with pytest.raises(TypeError, match="lam"):
        ridge_minimizer(H, Y, "0.1")
    with pytest.raises(ValueError, match="disagree on N"):
        ridge_minimizer(H, Y[:, :6], 0.1)
    with pytest.raises(ValueError, match="form"):
        ridge_minimizer(H, Y, 0.1, form="normal")
    with pytest.raises(ValueError, match="NaN"):
        ridge_minimizer(H * float("nan"), Y, 0.1)


def test_ridge_flow_solves_the_ode_and_decays_at_lambda(gen):
    p, r, N, C, lam = 10, 3, 15, 4, 0.3
    Q, H = low_rank_features(p, r, N, gen)
    Y = torch.randn(C, N, generator=gen, dtype=F64)
    W0 = torch.randn(C, p, generator=gen, dtype=F64)
    assert (ridge_flow(W0, H, Y, lam, 0.0) - W0).abs().max() < 1e-13
    # scipy oracle at t = 1.7
    Ws = ridge_minimizer(H, Y, lam).numpy()
    M = H.numpy() @ H.numpy().T + lam * np.eye(p)
    oracle = Ws + (W0.numpy() - Ws) @ sl.expm(-1.7 * M)
    np.testing.assert_allclose(ridge_flow(W0, H, Y, lam, 1.7).numpy(), oracle, atol=1e-12)
    # finite-difference ODE check: dW/dt = -(WH - Y)H^T - lam W
    t, h = 0.8, 1e-5
    Wm, W, Wp = ridge_flow(W0, H, Y, lam, torch.tensor([t - h, t, t + h], dtype=F64))
    rhs = -(W @ H - Y) @ H.T - lam * W
    assert ((Wp - Wm) / (2 * h) - rhs).abs().max() < 1e-6
    # Eq. (7) and the spec's numbers
    ts = torch.tensor([1.0, 5.0, 10.0], dtype=F64)
    ratio = orthogonal_residual(ridge_flow(W0, H, Y, lam, ts), Q_V=Q).norm(dim=(-2, -1)) / orthogonal_residual(W0, Q_V=Q).norm()
    np.testing.assert_allclose(ratio.numpy(), np.exp(-lam * ts.numpy()), rtol=1e-9)
    # negative control: the V-component does NOT follow e^{-lam t} (it converges faster, to W*)
    PV = projector(Q)
    v_part = ((ridge_flow(W0, H, Y, lam, 5.0) - torch.as_tensor(Ws)) @ PV).norm() / ((W0 - torch.as_tensor(Ws)) @ PV).norm()
    assert v_part < 0.5 * math.exp(-5 * lam)
    with pytest.raises(ValueError, match="t must be"):
        ridge_flow(W0, H, Y, lam, -1.0)
    with pytest.raises(ValueError, match="p ="):
        ridge_flow(W0[:, :-1], H, Y, lam, 1.0)


def test_orthogonal_residual_accepts_basis_or_projector(gen):
    Q = haar_frames(9, 4, 1, gen)[0]
    W = torch.randn(3, 9, generator=gen, dtype=F64)
    a = orthogonal_residual(W, Q_V=Q @ torch.randn(4, 4, generator=gen, dtype=F64))  # any spanning matrix
    b = orthogonal_residual(W, P_V=Q @ Q.T)
    assert (a - b).abs().max() < 1e-12
    assert (a @ Q).abs().max() < 1e-12  # no component left in V
    assert orthogonal_residual(torch.randn(3, 4, generator=gen, dtype=F64) @ Q.T, Q_V=Q).norm() < 1e-13
    with pytest.raises(ValueError, match="exactly one"):
        orthogonal_residual(W)
    with pytest.raises(ValueError, match="exactly one"):
        orthogonal_residual(W, Q_V=Q, P_V=Q @ Q.T)
    with pytest.raises(ValueError, match="square"):
        orthogonal_residual(W, P_V=Q)
    with pytest.raises(ValueError, match="p = "):
        orthogonal_residual(W[:, :5], Q_V=Q)


@pytest.mark.parametrize("eta,lam,mu", [(0.01, 0.3, 0.0), (1e-3, 0.3, 0.9), (0.05, 2.0, 0.9), (0.1, 0.5, 0.5), (0.3, 1.0, 0.0)])
def test_decay_factor_against_roots_and_brute_force(eta, lam, mu):
    got = float(decay_factor_per_step(eta, lam, mu))
    roots = np.roots([1.0, -(1 + mu - eta * lam), mu])
    assert abs(got - np.abs(roots).max()) < 1e-14
    if mu == 0:
        assert abs(got - abs(1 - eta * lam)) < 1e-15
    # brute force: PyTorch's heavy-ball recursion on the V-perp component (data gradient = 0)
    x, v = 1.0, 0.0
    xs = []
    for _ in range(4000):
        v = mu * v + lam * x
        x = x - eta * v
        xs.append(abs(x))
    # asymptotic factor from the envelope over the last 1000 steps
    tail = np.array(xs[-1000:])
    if tail.max() > 1e-250:
        envelope = (np.max(tail[-100:]) / np.max(tail[:100])) ** (1 / 900)
        assert abs(envelope - got) < 2e-3


def test_decay_factor_regimes_and_bad_input():
    eta, mu = torch.tensor([1e-4, 1e-1]), 0.9
    f = decay_factor_per_step(eta, 1.0, mu)
    assert abs(-math.log(f[0]) / (1e-4 / (1 - mu)) - 1) < 0.02  # non-oscillatory: ≈ ηλ/(1-μ) (first order)
    assert abs(f[1] - math.sqrt(mu)) < 1e-14  # oscillatory: √μ
    assert decay_factor_per_step(0.1, 1.0).dtype == F64
    with pytest.raises(ValueError, match="mu"):
        decay_factor_per_step(0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match="eta"):
        decay_factor_per_step(-0.1, 1.0)
    with pytest.raises(TypeError, match="real"):
        decay_factor_per_step(0.1, 1j)


def test_fit_decay_rate():
    t = torch.arange(0, 200, dtype=F64)
    rates = torch.tensor([0.01, 0.1, 0.3], dtype=F64)
    values = 3.0 * torch.exp(-rates[:, None] * t)
    assert (fit_decay_rate(values, t) - rates).abs().max() < 1e-12
    # the floor: a decay that flattens at 1e-15 is fitted only above it, by default
    floored = torch.clamp(torch.exp(-0.3 * t), min=1e-15)
    assert abs(float(fit_decay_rate(floored, t)) - 0.3) < 1e-9
    assert abs(float(fit_decay_rate(floored, t, floor=0.0)) - 0.3) > 0.05  # negative control: no floor
    assert math.isnan(float(fit_decay_rate(torch.tensor([1.0, 0.0, 0.0]), torch.arange(3.0))))
    with pytest.raises(ValueError, match="same T"):
        fit_decay_rate(values, t[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        fit_decay_rate(-values, t)


# --------------------------------------------------------------------------- activation metric, δ_gc


@pytest.mark.parametrize(
    "name,fn",
    [("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("softplus", F.softplus), ("silu", F.silu), ("gelu", F.gelu), ("linear", lambda z: z)],
)
def test_activation_metric_closed_forms_match_autograd(gen, name, fn):
    z = 2 * torch.randn(3, 500, 7, generator=gen, dtype=F64)
    closed, auto = activation_metric(z, name), activation_metric(z, fn)
    assert closed.shape == (3, 7)
    assert (closed - auto).abs().max() < 1e-12


def test_activation_metric_relu_and_linear(gen):
    z = torch.randn(1000, 6, generator=gen, dtype=F64) + torch.linspace(-1, 1, 6, dtype=F64)
    d = activation_metric(z, "relu")
    assert torch.equal(d, (z > 0).to(F64).mean(0))  # Pr(z_i > 0), spec E.1.2
    assert torch.equal(activation_metric(z, "identity"), torch.ones(6, dtype=F64))
    assert activation_metric(z.float(), "relu").dtype == torch.float32
    # Monte-Carlo oracle: z ~ N(0,1), GELU: E[σ'(z)²] by fine quadrature
    zs = np.linspace(-12, 12, 200001)
    phi = np.exp(-zs**2 / 2) / math.sqrt(2 * math.pi)
    gp = 0.5 * (1 + sl.special.erf(zs / math.sqrt(2))) if hasattr(sl, "special") else None
    import scipy.special as ss

    gp = 0.5 * (1 + ss.erf(zs / math.sqrt(2))) + zs * phi
    exact = np.trapezoid(gp**2 * phi, zs) if hasattr(np, "trapezoid") else np.trapz(gp**2 * phi, zs)
    mc = activation_metric(torch.randn(400000, 1, generator=gen, dtype=F64), "gelu")
    assert abs(float(mc) - exact) < 5e-3


def test_activation_metric_bad_input(gen):
    z = torch.randn(10, 4, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="unknown activation"):
        activation_metric(z, "swish2")
    with pytest.raises(TypeError, match="callable"):
        activation_metric(z, 3)
    with pytest.raises(ValueError, match="elementwise"):
        activation_metric(z, lambda x: x.sum(0))
    with pytest.raises(ValueError, match="shape"):
        activation_metric(torch.randn(5, dtype=F64), "relu")


def test_conformal_split_and_gap(gen):
    delta = torch.rand(4, 9, generator=gen, dtype=F64)
    c, Delta = conformal_split(delta)
    assert (c - delta.mean(-1)).abs().max() < 1e-15 and Delta.sum(-1).abs().max() < 1e-14
    gap = geometric_consistency_gap(delta)
    # ReLU note of spec A.10: δ_gc = std(π)/rms(π) (population std)
    pi = delta.numpy()
    np.testing.assert_allclose(gap.numpy(), pi.std(-1) / np.sqrt((pi**2).mean(-1)), rtol=1e-12)
    dense = torch.diag_embed(delta) + 0.0
    assert (geometric_consistency_gap(dense) - gap).abs().max() < 1e-14
    assert geometric_consistency_gap(0.7 * torch.ones(5, dtype=F64)) == 0  # conformal
    assert math.isnan(float(geometric_consistency_gap(torch.zeros(5, dtype=F64))))  # dead layer
    # a batch of p diagonals looks dense; diagonal=True disambiguates
    sq = torch.rand(9, 9, generator=gen, dtype=F64)
    assert geometric_consistency_gap(sq, diagonal=True).shape == (9,)
    assert geometric_consistency_gap(sq).shape == ()
    with pytest.raises(ValueError, match="NaN"):
        geometric_consistency_gap(torch.tensor([1.0, float("inf")]))


# --------------------------------------------------------------------------- Theorem 5.4


def random_metric(p, gen):
    return 0.1 + 0.8 * torch.rand(p, generator=gen, dtype=F64)


def test_commutator_diag_formula_matches_dense_and_C9(gen):
    p, r = 12, 4
    d = random_metric(p, gen)
    Q = haar_frames(p, r, 5, gen)
    dense = commutator_norm(torch.diag(d), Q_V=Q)
    fast = commutator_norm(d, Q_V=Q)
    assert dense.shape == (5,) and (dense - fast).abs().max() < 1e-14
    assert (commutator(d, Q_V=Q) - commutator(torch.diag(d), Q_V=Q)).abs().max() < 1e-15
    # C.9
    assert (fast.square() - 2 * invariance_defect(d, Q_V=Q).square()).abs().max() < 1e-14
    assert (invariance_defect(torch.diag(d), Q_V=Q) - invariance_defect(d, Q_V=Q)).abs().max() < 1e-15
    # conformal split: [P, D²] = [P, D² - cI]
    _, Delta = conformal_split(d)
    assert (commutator(d, Q_V=Q) - commutator(Delta, Q_V=Q)).abs().max() < 1e-15
    # block form in an adapted basis: [P, D²] = [[0, B], [-Bᵀ, 0]]
    full, _ = torch.linalg.qr(torch.cat([Q[0], torch.randn(p, p - r, generator=gen, dtype=F64)], 1))
    block = full.T @ commutator(d, Q_V=Q[0]) @ full
    B = full[:, :r].T @ torch.diag(d) @ full[:, r:]
    assert (block[:r, r:] - B).abs().max() < 1e-14 and (block[r:, :r] + B.T).abs().max() < 1e-14
    assert block[:r, :r].abs().max() < 1e-14 and block[r:, r:].abs().max() < 1e-14


@pytest.mark.parametrize("p,r", [(6, 2), (12, 4), (30, 7)])
def test_invariant_subspaces_give_zero_and_generic_ones_do_not(gen, p, r):
    d = random_metric(p, gen)
    coords = torch.eye(p, dtype=F64)[:, torch.randperm(p, generator=gen)[:r]]
    assert commutator_norm(d, Q_V=coords) < 1e-15
    assert commutator_norm(torch.ones(p, dtype=F64), Q_V=haar_frames(p, r, 1, gen)[0]) < 1e-14  # D² = I
    # a dense SPD D² and a span of its eigenvectors
    A = torch.randn(p, p, generator=gen, dtype=F64)
    D = A @ A.T
    _, vecs = torch.linalg.eigh(D)
    assert commutator_norm(D, Q_V=vecs[:, [0, p - 1]]) < 1e-10 * torch.linalg.matrix_norm(D)
    # negative control: Haar-random V is not invariant
    assert commutator_norm(d, Q_V=haar_frames(p, r, 20, gen)).min() > 1e-3


def test_commutator_forms_batches_and_dtypes(gen):
    p, r = 7, 3
    Q = haar_frames(p, r, 4, gen)
    D = torch.rand(4, p, generator=gen, dtype=F64)  # one diagonal per subspace
    per_item = torch.stack([commutator_norm(D[i], Q_V=Q[i]) for i in range(4)])
    assert (commutator_norm(D, Q_V=Q) - per_item).abs().max() < 1e-15
    sq = torch.rand(p, p, generator=gen, dtype=F64)  # p diagonals, one per subspace below
    Qp = haar_frames(p, r, p, gen)
    as_diag = commutator_norm(sq, Q_V=Qp, diagonal=True)
    assert as_diag.shape == (p,)
    assert (as_diag - commutator_norm(torch.diag_embed(sq), Q_V=Qp)).abs().max() < 1e-14
    f32 = commutator_norm(D.float(), P_V=(Q @ Q.mT).float())
    assert f32.dtype == torch.float32 and (f32.double() - per_item).abs().max() < 1e-5
    with pytest.raises(ValueError, match="p = 7"):
        commutator_norm(torch.rand(6, dtype=F64), Q_V=Q)
    with pytest.raises(ValueError, match="dense form"):
        commutator_norm(torch.rand(7, 6, dtype=F64), Q_V=Q, diagonal=False)
    with pytest.raises(TypeError, match="diagonal"):
        commutator_norm(D, Q_V=Q, diagonal="yes")


@given(p=st.integers(2, 9), data=st.data())
def test_commutator_identities_property(p, data):
    r = data.draw(st.integers(1, p))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(p, generator=gen, dtype=F64)
    Q = haar_frames(p, r, 1, gen)[0]
    n = commutator_norm(d, Q_V=Q)
    # E.1 written out with numpy as an oracle
    P = (Q @ Q.T).numpy()
    dn = d.numpy()
    oracle = math.sqrt(((P**2) * (dn[:, None] - dn[None, :]) ** 2).sum())
    assert abs(float(n) - oracle) < 1e-12
    assert abs(float(n) ** 2 - 2 * float(invariance_defect(d, Q_V=Q)) ** 2) < 1e-12
    rho = relative_commutator(d, Q_V=Q)
    assert 0 <= float(rho) <= math.sqrt(2) + 1e-12
    assert abs(float(relative_commutator(5 * d, Q_V=Q, eps=0.0)) - float(relative_commutator(d, Q_V=Q, eps=0.0))) < 1e-12
    if r == p:
        assert float(n) < 1e-12  # V = R^p is invariant


def test_relative_commutator_value_and_bad_input(gen):
    p, r = 10, 3
    d, Q = random_metric(p, gen), haar_frames(p, r, 1, gen)[0]
    expect = commutator_norm(d, Q_V=Q) / (math.sqrt(r) * d.norm() + 1e-12)
    assert abs(float(relative_commutator(d, Q_V=Q)) - float(expect)) < 1e-15
    assert float(relative_commutator(torch.zeros(p, dtype=F64), Q_V=Q)) == 0.0
    with pytest.raises(ValueError, match="eps"):
        relative_commutator(d, Q_V=Q, eps=-1.0)


@pytest.mark.parametrize("p,r", [(6, 2), (7, 3), (9, 1), (8, 4)])
def test_chart_jacobian_rank_and_singular_values(gen, p, r):
    a = torch.linspace(0.2, 1.0, p, dtype=F64)[torch.randperm(p, generator=gen)]
    O = haar_frames(p, p, 1, gen)[0]  # hide the eigenbasis
    D = O @ torch.diag(a) @ O.T
    Q = O[:, :r]  # an invariant subspace
    Q_perp = O[:, r:]
    J = invariance_chart_jacobian(Q, D, Q_perp=Q_perp)
    assert J.shape == (p * p, (p - r) * r)
    s = torch.linalg.svdvals(J)
    expect = torch.sort((math.sqrt(2) * (a[r:, None] - a[None, :r]).abs()).reshape(-1), descending=True).values
    assert (s - expect).abs().max() < 1e-10
    assert int((s > 1e-8).sum()) == r * (p - r)  # codimension = dim Gr(r, p)
    # finite-difference oracle along a random chart direction
    Bdir = torch.randn((p - r) * r, generator=gen, dtype=F64)
    h = 1e-6

    def F_(B):
        M = Q + Q_perp @ B.reshape(p - r, r)
        P = M @ torch.linalg.solve(M.T @ M, M.T)
        return (P @ D - D @ P).reshape(-1)

    fd = (F_(h * Bdir) - F_(-h * Bdir)) / (2 * h)
    assert (fd - J @ Bdir).abs().max() < 1e-7
    # the default complement gives the same singular values
    assert (torch.linalg.svdvals(invariance_chart_jacobian(Q, D)) - s).abs().max() < 1e-10


def test_chart_jacobian_negative_controls(gen):
    p, r = 6, 2
    # shared eigenvalue across V and V⊥: one direction of the chart keeps invariance → rank drops by 1
    a = torch.tensor([0.3, 0.5, 0.5, 0.7, 0.9, 1.1], dtype=F64)
    Q = torch.eye(p, dtype=F64)[:, :2]
    s = torch.linalg.svdvals(invariance_chart_jacobian(Q, a))
    assert int((s > 1e-8).sum()) == r * (p - r) - 1
    assert invariance_chart_jacobian(Q, torch.full((p,), 0.4, dtype=F64)).abs().max() < 1e-15  # D² = cI
    with pytest.raises(ValueError, match="dim V < p"):
        invariance_chart_jacobian(torch.eye(p, dtype=F64), a)
    with pytest.raises(ValueError, match="orthonormal basis of the orthogonal complement"):
        invariance_chart_jacobian(Q, a, Q_perp=torch.eye(p, dtype=F64)[:, 1:5])
    with pytest.raises(ValueError, match="one D2"):
        invariance_chart_jacobian(Q, a.expand(3, p))


# --------------------------------------------------------------------------- Appendix C.3


def test_tangent_projection_and_retraction(gen):
    p, r = 8, 3
    Q = haar_frames(p, r, 1, gen)[0]
    P = Q @ Q.T
    X = torch.randn(p, p, generator=gen, dtype=F64)
    X = X + X.T
    T = tangent_projection(P, X)
    assert (tangent_projection(P, T) - T).abs().max() < 1e-13  # a projection
    assert (P @ T @ P).abs().max() < 1e-13  # tangent vectors are off-diagonal blocks
    DP = X @ P - P @ X
    assert (T - (DP @ P - P @ DP)).abs().max() < 1e-13  # T_P(D) = [[D, P], P]
    assert (retract_projector(P, r) - P).abs().max() < 1e-13
    R = retract_projector(P + 0.01 * T, r)
    assert (R @ R - R).abs().max() < 1e-13 and abs(float(torch.trace(R)) - r) < 1e-12
    with pytest.raises(ValueError, match="1 <= r <= p"):
        retract_projector(P, 0)
    with pytest.raises(ValueError, match="square"):
        tangent_projection(P, X[:, :3])


def test_residual_dynamics(gen):
    p, r = 10, 3
    QV, QW = haar_frames(p, r, 2, gen)
    PV, PW = QV @ QV.T, QW @ QW.T
    # isotropic D²: P_V frozen, commutator 0, error decays ≈ e^{-γt} near equilibrium
    X = torch.randn(p, p, generator=gen, dtype=F64)
    near = retract_projector(PV + 0.05 * tangent_projection(PV, X + X.T), r)
    t, err, comm = simulate_residual_dynamics(near, PV, torch.full((p,), 0.5, dtype=F64), gamma=1.0, kappa=0.2, dt=1e-2, steps=300)
    assert comm.abs().max() < 1e-12
    late = fit_decay_rate(err[100:], t[100:])
    assert abs(float(late) - 1.0) < 0.02
    # anisotropic D²: the forcing keeps a residual that scales like κ
    d = torch.linspace(0.2, 1.0, p, dtype=F64)
    _, e1, c1 = simulate_residual_dynamics(PV, PV, d, gamma=1.0, kappa=0.05, dt=1e-2, steps=200)
    _, e2, _ = simulate_residual_dynamics(PV, PV, d, gamma=1.0, kappa=0.1, dt=1e-2, steps=200)
    assert e1[0] == 0 and e1[-1] > 1e-3 and c1[0] > 0
    assert 1.5 < float(e2[50] / e1[50]) < 2.5
    # κ = 0 negative control: P_V never moves, so its commutator is constant
    _, _, c0 = simulate_residual_dynamics(PW, PV, d, gamma=1.0, kappa=0.0, dt=1e-2, steps=20)
    assert (c0 - c0[0]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="gamma"):
        simulate_residual_dynamics(PW, PV, d, gamma=0.0, kappa=0.1, dt=1e-2, steps=2)
    with pytest.raises(ValueError, match="steps"):
        simulate_residual_dynamics(PW, PV, d, gamma=1.0, kappa=0.1, dt=1e-2, steps=-1)


# --------------------------------------------------------------------------- Proposition 6.1


@pytest.mark.parametrize("d,dk", [(16, 4), (64, 8), (10, 10)])
def test_head_penalty_split(gen, d, dk):
    W1, W2 = torch.randn(2, 5, d, dk, generator=gen, dtype=F64)
    total, shared, dis = head_penalty_split(W1, W2)
    n1, n2 = np.linalg.norm(W1.numpy(), axis=(-2, -1)), np.linalg.norm(W2.numpy(), axis=(-2, -1))
    np.testing.assert_allclose(total.numpy(), n1**2 + n2**2, rtol=1e-13)
    assert ((total - shared - dis).abs() / total).max() < 1e-13  # D.2
    assert (total >= shared).all()  # (11)
    S = W1 + W2
    t_half, s_half, d_half = head_penalty_split(S / 2, S / 2)
    assert (t_half - s_half).abs().max() < 1e-12 and d_half.abs().max() == 0  # equality at S/2
    with pytest.raises(ValueError, match="same shape"):
        head_penalty_split(W1, W2[..., :-1])


def test_project_fixed_sum_and_descent(gen):
    d, dk, lam, eta, steps = 12, 3, 0.5, 0.01, 400
    W1, W2, S = torch.randn(3, d, dk, generator=gen, dtype=F64)
    A, B = project_fixed_sum(W1, W2, S)
    assert (A + B - S).abs().max() < 1e-14
    # orthogonal projection: the correction is normal to {A + B = const}, i.e. equal on both heads
    assert ((W1 - A) - (W2 - B)).abs().max() < 1e-14
    A2, B2 = project_fixed_sum(A, B, S)
    assert (A2 - A).abs().max() < 1e-15
    F1, F2, diff = constrained_head_descent(A, B, lam=lam, eta=eta, steps=steps)
    assert (F1 + F2 - S).abs().max() < 1e-12
    k = torch.arange(steps + 1, dtype=F64)
    assert ((diff / diff[0]) - (1 - eta * lam) ** k).abs().max() < 1e-12
    F1, F2, _ = constrained_head_descent(A, B, lam=lam, eta=0.1, steps=2000)
    assert (F1 - S / 2).abs().max() < 1e-10 and (F2 - S / 2).abs().max() < 1e-10
    with pytest.raises(ValueError, match="lam"):
        constrained_head_descent(A, B, lam=-1.0, eta=0.1, steps=3)
    with pytest.raises(ValueError, match="S must"):
        project_fixed_sum(W1, W2, S[:, :2])
