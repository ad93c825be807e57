"""flagcore.neural_collapse against independent oracles: numpy SVD, Monte Carlo, closed forms, constructions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagcore import haar_frames
from flagcore import neural_collapse as nc

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- feature subspace


@settings(max_examples=25, deadline=None)
@given(st.integers(5, 40), st.integers(2, 12), st.floats(0.5, 0.999), st.integers(0, 10_000))
def test_feature_subspace_matches_numpy_svd(n, p, variance, seed):
    H = torch.randn(n, p, generator=_gen(seed), dtype=F64) * torch.logspace(0, -2, p, dtype=F64)
    fs = nc.feature_subspace(H, variance=variance, centered=True)
    X = (H - H.mean(0)).numpy()
    s = np.linalg.svd(X, compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    r_ref = int(np.argmax(share >= variance - 1e-12)) + 1
    assert fs.r == r_ref
    assert fs.explained >= variance - 1e-12 and (fs.r == 1 or share[fs.r - 2] < variance)
    assert torch.allclose(fs.Q_V.mT @ fs.Q_V, torch.eye(fs.r, dtype=F64), atol=1e-12)
    # the kept directions are the top right singular vectors: projecting X onto them keeps `explained`
    kept = np.linalg.norm(X @ fs.Q_V.numpy()) ** 2 / np.linalg.norm(X) ** 2
    assert abs(kept - fs.explained) < 1e-10


def test_centring_matters_for_a_shifted_cloud():
    g = _gen(1)
    basis = haar_frames(20, 3, 1, g)[0]
    H = torch.randn(200, 3, generator=g, dtype=F64) @ basis.mT + 50.0 * torch.randn(20, generator=g, dtype=F64)
    assert nc.feature_subspace(H, centered=True).r == 3
    uncentred = nc.feature_subspace(H, centered=False)
    # the big mean dominates the raw second moment: one direction already holds > 99 %
    assert uncentred.r == 1 and not uncentred.centered


def test_feature_subspace_bad_input():
    with pytest.raises(ValueError, match="variance"):
        nc.feature_subspace(torch.randn(5, 3), variance=0.0)
    with pytest.raises(ValueError, match="zero"):
        nc.feature_subspace(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        nc.feature_subspace(torch.randn(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        nc.feature_subspace(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ----------------------------------------------------------------------------- Level 2


@pytest.mark.parametrize("p,r,r_W", [(12, 4, 3), (30, 10, 9), (16, 1, 5), (20, 19, 2)])
def test_haar_level2_null_matches_monte_carlo(p, r, r_W):
    g = _gen(p * 100 + r)
    Q_V = torch.eye(p, r, dtype=F64)  # the null is O(p)-invariant: any fixed V
    trials = 20_000
    Q_W = haar_frames(p, r_W, trials, g)
    A = (Q_V.mT @ Q_W).square().sum((-2, -1)) / r_W
    mean, sd = nc.haar_level2_null(p, r, r_W)
    se_mean = sd / math.sqrt(trials)
    assert abs(A.mean().item() - mean) < 5 * se_mean
    # sample sd is within a few percent at 20k trials; a formula off by a factor (e.g. without the 2) is not
    assert abs(A.std().item() / sd - 1) < 0.05
    assert abs(A.std().item() / (sd / math.sqrt(2)) - 1) > 0.2  # negative control: the factor 2 matters


def test_level2_alignment_extremes():
    p, r = 10, 4
    Q_V = torch.eye(p, r, dtype=F64)
    inside = torch.randn(3, r, generator=_gen(), dtype=F64) @ Q_V.mT  # row(W) inside V
    out = nc.level2_alignment(Q_V, inside)
    assert out.r_W == 3 and abs(out.A - 1) < 1e-12 and out.z > 3
    outside = torch.randn(3, p - r, generator=_gen(), dtype=F64) @ torch.eye(p, dtype=F64)[r:]
    low = nc.level2_alignment(Q_V, outside)
    assert abs(low.A) < 1e-12 and low.z < 0
    mean, sd = nc.haar_level2_null(p, r, 3)
    assert low.null_mean == mean and low.null_sd == sd


def test_level2_alignment_is_a_basis_invariant():
    g = _gen(3)
    Q_V = haar_frames(15, 5, 1, g)[0]
    W = torch.randn(4, 15, generator=g, dtype=F64)
    rot = haar_frames(5, 5, 1, g)[0]
    G = torch.randn(4, 4, generator=g, dtype=F64)  # invertible mixing of the classifier rows
    a = nc.level2_alignment(Q_V, W).A
    assert abs(a - nc.level2_alignment(Q_V @ rot, G @ W).A) < 1e-12


def test_level2_bad_input():
    with pytest.raises(ValueError, match="orthonormal"):
        nc.level2_alignment(torch.ones(5, 2, dtype=F64), torch.randn(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="wrong layer"):
        nc.level2_alignment(torch.eye(5, 2, dtype=F64), torch.randn(3, 6, dtype=F64))
    with pytest.raises(ValueError, match="zero"):
        nc.level2_alignment(torch.eye(5, 2, dtype=F64), torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError):
        nc.haar_level2_null(1, 1, 1)


# ----------------------------------------------------------------------------- Level 3


@pytest.mark.parametrize("p", [1, 2, 3, 10, 64, 500])
def test_haar_abs_inner_mean_closed_form(p):
    value = nc.haar_abs_inner_mean(p)
    ref = math.gamma(p / 2) / (math.sqrt(math.pi) * math.gamma((p + 1) / 2)) if p < 300 else math.sqrt(2 / (math.pi * p))
    assert abs(value - ref) < (1e-12 if p < 300 else 2e-3 * ref)
    if p == 64:
        assert abs(value - 0.10013) < 5e-5  # spec A.15 item 7
    g = _gen(p)
    u, v = haar_frames(p, 1, 20_000, g), haar_frames(p, 1, 20_000, g)
    mc = (u * v).sum((-2, -1)).abs()
    assert abs(mc.mean().item() - value) < 5 * mc.std().item() / math.sqrt(20_000) + 1e-12


def _features_with_directions(V: torch.Tensor, s: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Centred H [n, p] whose right singular vectors are V's columns with singular values s."""
    U = haar_frames(n, len(s), 1, g)[0]
    U = U - U.mean(0)  # keep it centred, then re-orthonormalise
    U, _ = torch.linalg.qr(U)
    return U @ torch.diag(s) @ V.mT


def test_level3_score_is_one_when_directions_match_in_order():
    g = _gen(5)
    p, m = 12, 4
    V = haar_frames(p, m, 1, g)[0]
    H = _features_with_directions(V, torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64), 100, g)
    W = torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=F64)) @ V.mT  # same order of directions
    out = nc.level3_score(H, W)
    assert not out.degenerate and out.m == m and abs(out.score - 1) < 1e-10
    swapped = torch.diag(torch.tensor([1.0, 3.0, 2.0, 5.0], dtype=F64)) @ V.mT  # same row space, order broken
    assert abs(nc.level3_score(H, swapped).score - 0.5) < 1e-10


def test_level3_degenerate_at_exact_collapse():
    g = _gen(6)
    C, p = 5, 20
    V = haar_frames(p, C - 1, 1, g)[0]
    H = _features_with_directions(V, torch.ones(C - 1, dtype=F64), 200, g)  # C-1 equal singular values
    W = torch.randn(C, p, generator=g, dtype=F64)
    out = nc.level3_score(H, W)
    assert out.degenerate and math.isnan(out.score) and out.feature_gap < 1e-10
    # negative control: split the spectrum and the same data become well defined
    H2 = _features_with_directions(V, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64), 200, g)
    assert not nc.level3_score(H2, W).degenerate


def test_level3_bad_input():
    H = torch.randn(30, 6, dtype=F64)
    with pytest.raises(ValueError, match="m must"):
        nc.level3_score(H, torch.randn(3, 6, dtype=F64), m=4)
    with pytest.raises(ValueError, match="wrong layer"):
        nc.level3_score(H, torch.randn(3, 7, dtype=F64))


# ----------------------------------------------------------------------------- NC1-NC4


def _collapsed(C: int, p: int, per_class: int, noise: float, g: torch.Generator):
    etf = (torch.eye(C, dtype=F64) - 1 / C) * math.sqrt(C / (C - 1))  # rows: simplex ETF, unit norm
    M = haar_frames(p, C, 1, g)[0] @ etf  # [p, C], centred columns
    y = torch.arange(C).repeat_interleave(per_class)
    H = M.mT[y] + noise * torch.randn(C * per_class, p, generator=g, dtype=F64)
    return H, y, M.mT.clone()


def test_neural_collapse_metrics_vanish_at_exact_collapse():
    H, y, W = _collapsed(C=6, p=16, per_class=10, noise=0.0, g=_gen(7))
    out = nc.neural_collapse_metrics(H, y, W)
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_etf", "nc3", "nc4"):
        assert abs(getattr(out, name)) < 1e-10, name


def test_neural_collapse_metrics_grow_with_noise_and_match_a_brute_force_nc1():
    g = _gen(8)
    H, y, W = _collapsed(C=4, p=10, per_class=30, noise=0.3, g=g)
    out = nc.neural_collapse_metrics(H, y, W)
    Hn, yn = H.numpy(), y.numpy()
    mus = np.stack([Hn[yn == c].mean(0) for c in range(4)])
    mu_g = mus.mean(0)
    Sw = sum(np.outer(h - mus[c], h - mus[c]) for h, c in zip(Hn, yn)) / len(Hn)
    Sb = sum(np.outer(m - mu_g, m - mu_g) for m in mus) / 4
    assert abs(out.nc1 - np.trace(Sw @ np.linalg.pinv(Sb)) / 4) < 1e-8
    clean = nc.neural_collapse_metrics(*_collapsed(C=4, p=10, per_class=30, noise=0.0, g=_gen(8)))
    assert out.nc1 > 1e-3 > clean.nc1
    # NC3 is scale-free in W; a random classifier is far from self-dual
    assert abs(nc.neural_collapse_metrics(H, y, 7.0 * W).nc3 - out.nc3) < 1e-12
    assert nc.neural_collapse_metrics(H, y, torch.randn(4, 10, generator=g, dtype=F64)).nc3 > 0.5


def test_neural_collapse_bad_input():
    H, y, W = _collapsed(C=3, p=5, per_class=4, noise=0.1, g=_gen(9))
    with pytest.raises(ValueError, match="missing classes"):
        nc.neural_collapse_metrics(H[y != 1], y[y != 1], W)
    with pytest.raises(ValueError, match="labels"):
        nc.neural_collapse_metrics(H, y + 5, W)
    with pytest.raises(ValueError, match="integer labels"):
        nc.neural_collapse_metrics(H, y.double(), W)
    with pytest.raises(ValueError, match="logits"):
        nc.neural_collapse_metrics(H, y, W, logits=torch.zeros(len(y), 4))


# ----------------------------------------------------------------------------- the E.1 pipeline


def test_e1_diagnostics_agrees_with_its_parts_and_checks_the_layer():
    from flagcore.alignment import commutator_norm

    g = _gen(11)
    H, y, W = _collapsed(C=4, p=12, per_class=25, noise=0.3, g=g)
    D2 = torch.rand(12, generator=g, dtype=F64)
    out = nc.e1_diagnostics(H, W, D2, y=y)
    fs = nc.feature_subspace(H)
    assert out.subspace.r == fs.r
    assert out.commutator == pytest.approx(float(commutator_norm(D2, Q_V=fs.Q_V)), rel=1e-12)
    assert out.level2 == nc.level2_alignment(fs.Q_V, W) and out.collapse == nc.neural_collapse_metrics(H, y, W)
    assert out.commutator > 0
    # negative control: a conformal metric has no obstruction and no anisotropy
    flat = nc.e1_diagnostics(H, W, torch.full((12,), 0.5, dtype=F64))  # 0.5: its mean is exact
    assert flat.commutator == 0.0 and flat.gc_gap == 0.0 and math.isnan(flat.by_anisotropy) and flat.collapse is None
    with pytest.raises(ValueError, match="wrong layer|different layers"):
        nc.e1_diagnostics(H, W, torch.rand(13, dtype=F64))
    with pytest.raises(ValueError, match="wrong layer"):
        nc.e1_diagnostics(H, torch.randn(4, 13, dtype=F64), D2)


def test_nc1_matches_a_pseudoinverse_oracle_at_width_256_and_is_undefined_when_the_means_coincide():
    """NC1 from the class means' SVD (not an eigensolver on the rank-(C-1) p x p Sigma_B, which LAPACK's
    divide-and-conquer once failed to converge on at width 256): against scipy's pinvh of Sigma_B, on
    features far wider than C, at two feature scales (the cutoff is relative)."""
    import scipy.linalg

    for scale in (1.0, 1e-6):
        H, y, W = _collapsed(C=10, p=256, per_class=40, noise=0.5, g=_gen(11))
        H = H * scale
        Hn, yn = H.numpy(), y.numpy()
        mus = np.stack([Hn[yn == c].mean(0) for c in range(10)])
        centred = Hn - mus[yn]
        Sw = centred.T @ centred / len(Hn)
        Sb = (mus - mus.mean(0)).T @ (mus - mus.mean(0)) / 10
        oracle = np.trace(Sw @ scipy.linalg.pinvh(Sb)) / 10
        out = nc.neural_collapse_metrics(H, y, W).nc1
        assert abs(out - oracle) < 1e-9 * oracle, (scale, out, oracle)
    # every class with the same mean: no between-class spread, so NC1 is undefined, never a perfect 0
    # (every class holds the same 30 feature vectors, so the class means are equal bit for bit)
    H, y, W = _collapsed(C=4, p=10, per_class=30, noise=0.3, g=_gen(12))
    same = H[:30].repeat(4, 1)
    assert math.isnan(nc.neural_collapse_metrics(same, y, W).nc1)
    assert nc.neural_collapse_metrics(H, y, W).nc1 > 0  # control: the same features with distinct means
