"""Tests for alignment levels (Definition 3.1, spec A.2): alignment_level / alignment_report and
the constructions of flagcore.alignment.layer_pair_at_level.

Independent oracle: ``numpy_level`` below re-implements spec Test A.2 with numpy only
(``||P_U - P_V||_F``, ``||(I - P_larger) Q_smaller||_F``, ``max_i (1 - |<u_i, v_i>|)`` with
distinct singular values). The negative controls perturb aligned pairs by small rotations and
check that the level drops exactly as far as the geometry says.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from flagcore.alignment import layer_pair_at_level
from flagcore.subspace import (
    AlignmentLevel,
    alignment_level,
    alignment_report,
    angle_tolerance,
    haar_frames,
)

F64 = torch.float64
L = AlignmentLevel

# (level, d_mid, r_prev, r_next, d_in, d_out)
LEVEL_CASES = [
    (L.GENERAL, 6, 2, 3, 4, 5),
    (L.GENERAL, 5, 4, 4, 5, 5),  # r_prev + r_next > d_mid: they meet, but neither contains the other
    (L.GENERAL, 8, 3, 3, 3, 3),
    (L.GENERAL, 4, 1, 1, 2, 2),
    (L.FLAG, 6, 2, 4, 5, 7),
    (L.FLAG, 6, 4, 2, 5, 7),
    (L.FLAG, 5, 5, 2, 5, 5),  # U = R^5 contains everything
    (L.FLAG, 5, 1, 5, 3, 6),
    (L.SUBSPACE, 6, 3, 3, 4, 5),
    (L.SUBSPACE, 5, 5, 5, 5, 5),
    (L.SUBSPACE, 7, 2, 2, 9, 3),
    (L.STRICT, 6, 3, 3, 4, 5),
    (L.STRICT, 5, 5, 5, 5, 5),
    (L.STRICT, 7, 1, 1, 2, 3),
    (L.STRICT, 8, 6, 6, 6, 6),
]


def case_id(case):
    level, *dims = case
    return f"{level.name}-" + "x".join(map(str, dims))


def numpy_level(W_prev, W_next, eps: float = 1e-8) -> int:
    """Spec Test A.2 classifier, numpy only."""
    Wp, Wn = np.asarray(W_prev, dtype=np.float64), np.asarray(W_next, dtype=np.float64)
    Up, sp, _ = np.linalg.svd(Wp, full_matrices=False)
    _, sn, Vhn = np.linalg.svd(Wn, full_matrices=False)
    rp, rn = np.linalg.matrix_rank(Wp), np.linalg.matrix_rank(Wn)
    U, V = Up[:, :rp], Vhn[:rn].T
    PU, PV = U @ U.T, V @ V.T
    if rp == rn and np.linalg.norm(PU - PV) < eps:
        distinct = all(np.min(-np.diff(s[:rp]) / s[: rp - 1], initial=1.0) > eps for s in (sp, sn))
        if distinct and np.max(1 - np.abs(np.sum(U * V, axis=0))) < eps:
            return 3
        return 2
    small, P_large = (U, PV) if rp <= rn else (V, PU)
    if np.linalg.norm(small - P_large @ small) < eps:
        return 1
    return 0


def rotation(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """Rotation by t in the plane of orthonormal x, y (identity on its complement): x -> cos t x + sin t y."""
    d = x.numel()
    x, y = x.reshape(d, 1), y.reshape(d, 1)
    eye = torch.eye(d, dtype=x.dtype)
    return eye + math.sin(t) * (y @ x.T - x @ y.T) + (math.cos(t) - 1) * (x @ x.T + y @ y.T)


def right_singular(W: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(W, full_matrices=False)[2][:r].T


def left_singular(W: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(W, full_matrices=False)[0][:, :r]


def complement(Q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of col(Q)^perp (Q with orthonormal columns)."""
    full = torch.linalg.svd(Q, full_matrices=True)[0]
    return full[:, Q.shape[1] :]


# --------------------------------------------------------------------------- each level, exactly


@pytest.mark.parametrize("case", LEVEL_CASES, ids=case_id)
def test_layer_pair_at_level_is_classified_as_that_level(case, gen):
    """alignment_level(layer_pair_at_level(level, ...)) == level, agreeing with the numpy A.2 oracle."""
    level, d_mid, r_prev, r_next, d_in, d_out = case
    for _ in range(4):
        W_prev, W_next = layer_pair_at_level(level, d_mid, r_prev, r_next, d_in=d_in, d_out=d_out, generator=gen)
        assert W_prev.shape == (d_mid, d_in) and W_next.shape == (d_out, d_mid)
        got = alignment_level(W_prev, W_next)
        assert isinstance(got, AlignmentLevel) and got == level
        assert numpy_level(W_prev, W_next) == int(level)
        rep = alignment_report(W_prev, W_next)
        assert rep.level == level
        assert (rep.rank_prev, rep.rank_next) == (r_prev, r_next)
        assert rep.angles.shape == (min(r_prev, r_next),)
        assert rep.strict_defined == (r_prev == r_next)  # random spectra are simple
        assert math.isnan(rep.strict_defect) != rep.strict_defined
        assert rep.rtol == angle_tolerance(F64)
        # the report compares U_prev (left of W_prev) with V_next (right of W_next)
        expected = sl.subspace_angles(left_singular(W_prev, r_prev).numpy(), right_singular(W_next, r_next).numpy())[::-1]
        np.testing.assert_allclose(rep.angles.numpy(), expected, rtol=0, atol=1e-7)  # scipy: ~1.5e-8 at 0


def test_levels_are_nested_integers():
    """Level 3 ⇒ 2 ⇒ 1 ⇒ 0 as an IntEnum ordering."""
    assert [int(x) for x in AlignmentLevel] == [0, 1, 2, 3]
    assert L.GENERAL < L.FLAG < L.SUBSPACE < L.STRICT
    assert AlignmentLevel(2) is L.SUBSPACE


def test_random_independent_layers_are_level_0(gen):
    """Independent Gaussian low-rank layers (ranks below d_mid): Level 0 in every one of 150 draws.

    Negative control: once W_prev has full rank d_mid its output space is all of R^{d_mid}, which
    contains everything, and the same kind of independent draw is Level 1: the classifier does not
    answer 0 regardless.
    """
    shapes = [(6, 2, 3), (5, 4, 4), (10, 5, 5), (4, 1, 3), (7, 6, 6)]
    for i in range(150):
        d_mid, r_prev, r_next = shapes[i % len(shapes)]
        W_prev = torch.randn(d_mid, r_prev, generator=gen, dtype=F64) @ torch.randn(r_prev, 8, generator=gen, dtype=F64)
        W_next = torch.randn(9, r_next, generator=gen, dtype=F64) @ torch.randn(r_next, d_mid, generator=gen, dtype=F64)
        assert alignment_level(W_prev, W_next) == L.GENERAL
        assert alignment_report(W_prev, W_next).angles.min().item() > 1e-6 or r_prev + r_next > d_mid
    for _ in range(10):
        W_prev = torch.randn(5, 7, generator=gen, dtype=F64)  # rank 5 = d_mid
        W_next = torch.randn(9, 2, generator=gen, dtype=F64) @ torch.randn(2, 5, generator=gen, dtype=F64)
        assert alignment_level(W_prev, W_next) == L.FLAG


@pytest.mark.parametrize("case", [c for c in LEVEL_CASES if c[0] == L.GENERAL], ids=case_id)
def test_layer_pair_at_level_general_is_level_0_over_many_draws(case, gen):
    level, d_mid, r_prev, r_next, d_in, d_out = case
    for _ in range(25):
        W_prev, W_next = layer_pair_at_level(level, d_mid, r_prev, r_next, d_in=d_in, d_out=d_out, generator=gen)
        assert alignment_level(W_prev, W_next) == L.GENERAL


# --------------------------------------------------------------------------- perturbations (negative controls)


@pytest.mark.parametrize("d_mid,r", [(6, 3), (8, 2), (5, 4)])
def test_strict_pair_rotated_within_subspace_drops_to_level_2(d_mid, r, gen):
    """Rotate v_1 towards v_2 by 1e-3 inside col(V): same subspace, columns no longer matched.

    Expected: SUBSPACE, strict_defect = max_i sin∠(u_i, v_i) = sin(1e-3). Control: a 1e-10
    rotation stays STRICT.
    """
    for _ in range(3):
        W_prev, W_next = layer_pair_at_level(L.STRICT, d_mid, r, generator=gen)
        assert alignment_level(W_prev, W_next) == L.STRICT
        V = right_singular(W_next, r)
        R = rotation(V[:, 0], V[:, 1], 1e-3)
        rep = alignment_report(W_prev, W_next @ R.T)
        assert rep.level == L.SUBSPACE
        assert rep.strict_defined and rep.strict_defect == pytest.approx(math.sin(1e-3), rel=1e-6)
        assert numpy_level(W_prev, W_next @ R.T) == 2
        assert rep.angles.max().item() <= 1e-12
        assert alignment_level(W_prev, W_next @ rotation(V[:, 0], V[:, 1], 1e-10).T) == L.STRICT


def test_strict_tolerance_is_on_the_sine_like_the_subspace_tolerance(gen):
    """Level 3 uses sin∠(u_i, v_i) <= rtol, the same units as Level 2's sin(theta) <= rtol.

    A within-subspace rotation by 1e-7 (sin 1e-7 > 1.5e-8, although 1 - cos = 5e-15 is tiny) is
    not STRICT; by 1e-9 it is. With rtol=1e-6 the 1e-7 rotation is STRICT again.
    """
    W_prev, W_next = layer_pair_at_level(L.STRICT, 6, 3, generator=gen)
    V = right_singular(W_next, 3)
    tilted = W_next @ rotation(V[:, 0], V[:, 2], 1e-7).T
    rep = alignment_report(W_prev, tilted)
    assert rep.level == L.SUBSPACE and rep.strict_defect == pytest.approx(1e-7, rel=1e-4)
    assert alignment_level(W_prev, W_next @ rotation(V[:, 0], V[:, 2], 1e-9).T) == L.STRICT
    assert alignment_level(W_prev, tilted, rtol=1e-6) == L.STRICT


@pytest.mark.parametrize(
    "level,d_mid,r",
    [(L.STRICT, 6, 3), (L.STRICT, 8, 2), (L.STRICT, 5, 4), (L.STRICT, 4, 1), (L.SUBSPACE, 6, 3), (L.SUBSPACE, 8, 2), (L.SUBSPACE, 5, 4)],
)
def test_aligned_pair_rotated_out_of_subspace_drops_to_level_0(level, d_mid, r, gen):
    """Rotate v_1 out of col(U) by 1e-3: one principal angle of exactly 1e-3 appears, level GENERAL.

    Control: the same rotation by 1e-10 (below sqrt(eps) = 1.5e-8) keeps the level.
    """
    for _ in range(3):
        W_prev, W_next = layer_pair_at_level(level, d_mid, r, generator=gen)
        V = right_singular(W_next, r)
        w = complement(V)[:, 0]
        rep = alignment_report(W_prev, W_next @ rotation(V[:, 0], w, 1e-3).T)
        assert rep.level == L.GENERAL
        assert rep.angles.max().item() == pytest.approx(1e-3, rel=1e-6)
        assert alignment_level(W_prev, W_next @ rotation(V[:, 0], w, 1e-10).T) == level


@pytest.mark.parametrize("d_mid,r_prev,r_next", [(7, 2, 4), (7, 4, 2), (6, 1, 3)])
def test_flag_pair_rotated_out_of_the_larger_subspace_drops_to_level_0(d_mid, r_prev, r_next, gen):
    """Tilt the smaller subspace out of the larger one by 1e-3: containment is lost, GENERAL."""
    for _ in range(3):
        W_prev, W_next = layer_pair_at_level(L.FLAG, d_mid, r_prev, r_next, generator=gen)
        U, V = left_singular(W_prev, r_prev), right_singular(W_next, r_next)
        large = V if r_prev < r_next else U
        w = complement(large)[:, 0]
        if r_prev < r_next:  # U ⊂ V: rotate the output of W_prev
            R = rotation(U[:, 0], w, 1e-3)
            pert = (R @ W_prev, W_next)
        else:  # V ⊂ U: rotate the input of W_next
            R = rotation(V[:, 0], w, 1e-3)
            pert = (W_prev, W_next @ R.T)
        rep = alignment_report(*pert)
        assert rep.level == L.GENERAL and numpy_level(*pert) == 0
        assert rep.angles.max().item() == pytest.approx(1e-3, rel=1e-6)


def test_perturbation_threshold_depends_on_dtype(gen):
    """A 1e-4 tilt is an alignment failure in float64 (rtol 1.5e-8) but not in float32 (rtol 3.5e-4)."""
    W_prev, W_next = layer_pair_at_level(L.SUBSPACE, 6, 3, generator=gen)
    V = right_singular(W_next, 3)
    W_tilt = W_next @ rotation(V[:, 0], complement(V)[:, 0], 1e-4).T
    assert alignment_level(W_prev, W_tilt) == L.GENERAL
    assert alignment_level(W_prev.float(), W_tilt.float()) == L.SUBSPACE
    W_big = W_next @ rotation(V[:, 0], complement(V)[:, 0], 1e-2).T
    assert alignment_level(W_prev.float(), W_big.float()) == L.GENERAL
    assert alignment_level(W_prev, W_tilt, rtol=1e-3) == L.SUBSPACE  # explicit rtol overrides


# --------------------------------------------------------------------------- degenerate spectra


@pytest.mark.parametrize(
    "s_prev,s_next",
    [((2.0, 1.0, 1.0), (1.5, 0.7, 0.3)), ((2.0, 1.0, 0.5), (1.5, 1.5, 0.3)), ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))],
)
def test_repeated_singular_values_make_strict_undefined(s_prev, s_next, gen):
    """U_l = V_{l+1} S exactly, but a repeated singular value: strict_defined False, level SUBSPACE.

    Negative control: the identical construction with a simple spectrum is STRICT, so it is the
    degeneracy, not the construction, that caps the level.
    """
    d_mid, r = 6, 3

    def build(sp, sn):
        U = haar_frames(d_mid, r, 1, gen)[0]
        X = haar_frames(5, r, 1, gen)[0]
        Y = haar_frames(7, r, 1, gen)[0]
        signs = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
        W_prev = U @ torch.diag(torch.tensor(sp, dtype=F64)) @ X.T
        W_next = Y @ torch.diag(torch.tensor(sn, dtype=F64)) @ (U * signs).T
        return W_prev, W_next

    for _ in range(3):
        rep = alignment_report(*build(s_prev, s_next))
        assert rep.strict_defined is False and math.isnan(rep.strict_defect)
        assert rep.level == L.SUBSPACE <= L.SUBSPACE
        assert alignment_level(*build(s_prev, s_next)) <= L.SUBSPACE
    control = alignment_report(*build((2.0, 1.0, 0.5), (1.5, 0.7, 0.3)))
    assert control.strict_defined and control.level == L.STRICT


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize("case", LEVEL_CASES[::2], ids=case_id)
def test_float32_layers_with_float32_default_tolerance(case, gen):
    """float32 inputs: computed in float32 with rtol = sqrt(eps32) ≈ 3.45e-4, level still exact."""
    level, d_mid, r_prev, r_next, d_in, d_out = case
    for _ in range(3):
        W_prev, W_next = layer_pair_at_level(
            level, d_mid, r_prev, r_next, d_in=d_in, d_out=d_out, generator=gen, dtype=torch.float32
        )
        assert W_prev.dtype == W_next.dtype == torch.float32
        rep = alignment_report(W_prev, W_next)
        assert rep.rtol == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps)) == pytest.approx(3.4527e-4, rel=1e-4)
        assert rep.angles.dtype == torch.float32
        assert rep.level == level


def test_float32_strict_construction_is_always_strict():
    """layer_pair_at_level promises 'exactly level': in float32, 300 seeded STRICT draws are all STRICT.

    Regression test: with uniformly drawn singular values, ~1.7% of these draws (seeds 106, 146,
    170, 172, 274) had a relative gap below the float32 rtol 3.45e-4, so strict_defined was False.
    """
    bad = []
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        W_prev, W_next = layer_pair_at_level(L.STRICT, 5, 5, generator=g, dtype=torch.float32)
        if alignment_level(W_prev, W_next) != L.STRICT:
            bad.append(seed)
    assert bad == []


def test_subspace_level_with_rank_one_is_not_silently_strict(gen):
    """Rank 1: Level 2 without Level 3 is impossible; the constructor must refuse, not return Level 3.

    Regression test: it used to return V = U O with a 1x1 "rotation" O = ±1, i.e. a STRICT pair.
    """
    with pytest.raises(ValueError, match="rank >= 2"):
        layer_pair_at_level(L.SUBSPACE, 5, 1, generator=gen)


# --------------------------------------------------------------------------- bad input


def test_alignment_rejects_non_composable_shapes(gen):
    """W_prev [d_l, d_{l-1}] and W_next [d_{l+1}, d_l] must share d_l."""
    W_prev = torch.randn(4, 3, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="do not compose"):
        alignment_level(W_prev, torch.randn(5, 6, generator=gen, dtype=F64))
    with pytest.raises(ValueError, match="do not compose"):
        alignment_report(W_prev, torch.randn(4, 5, generator=gen, dtype=F64))  # transposed W_next
    assert alignment_level(W_prev, torch.randn(5, 4, generator=gen, dtype=F64)) in set(AlignmentLevel)


@pytest.mark.parametrize("fn", [alignment_level, alignment_report])
def test_alignment_rejects_bad_input(fn, gen):
    good = torch.randn(4, 4, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="shape"):
        fn(torch.ones(4, dtype=F64), good)
    with pytest.raises(ValueError, match="shape"):
        fn(good, good[None])  # batched input is not supported here
    with pytest.raises(ValueError, match="zero weight matrix"):
        fn(torch.zeros(4, 4, dtype=F64), good)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(good, good * float("inf"))
    with pytest.raises(ValueError, match="complex"):
        fn(good.to(torch.complex128), good)
    with pytest.raises(TypeError):
        fn(good.numpy(), good)
    with pytest.raises(ValueError, match="rtol"):
        fn(good, good, rtol=-1e-3)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((L.FLAG, 6, 3, 3), {}, "r_prev != r_next"),
        ((L.SUBSPACE, 6, 3, 2), {}, "r_prev == r_next"),
        ((L.STRICT, 6, 2, 3), {}, "r_prev == r_next"),
        ((L.GENERAL, 5, 5, 2), {}, "below d_mid"),
        ((L.GENERAL, 5, 2, 5), {}, "below d_mid"),
        ((L.STRICT, 6, 4, 4), {"d_in": 3}, "ranks must satisfy"),
        ((L.STRICT, 6, 4, 4), {"d_out": 3}, "ranks must satisfy"),
        ((L.STRICT, 6, 0, 0), {}, "ranks must satisfy"),
        ((L.STRICT, 6, 7, 7), {}, "ranks must satisfy"),
        ((7, 6, 2, 2), {}, "AlignmentLevel"),
    ],
)
def test_layer_pair_at_level_rejects_impossible_requests(args, kwargs, match, gen):
    with pytest.raises(ValueError, match=match):
        layer_pair_at_level(*args, generator=gen, **kwargs)


# ----------------------------------------------------------------------------- decay_path (Theorem 5.3, discrete)


def test_decay_path_closed_form_and_optimizer():
    from flagcore.alignment import decay_factor_per_step, decay_path

    eta, lam = 0.1, 0.3
    k = torch.arange(51, dtype=torch.float64)
    assert torch.allclose(decay_path(eta, lam, 0.0, 50), (1 - eta * lam) ** k, rtol=1e-13, atol=0)
    # heavy ball: the same numbers torch.optim.SGD produces on a parameter that only weight decay moves
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=eta, momentum=0.9, weight_decay=lam)
    path = [1.0]
    for _ in range(60):
        opt.zero_grad()
        w.grad = torch.zeros_like(w)
        opt.step()
        path.append(w.item())
    # absolute: the under-damped path crosses zero, and SGD adds its terms in another order (round-off ~1e-16 per step)
    assert (decay_path(eta, lam, 0.9, 60) - torch.tensor(path, dtype=torch.float64)).abs().max() < 1e-13
    # over-damped heavy ball: late ratios approach the asymptotic factor; the momentum-free factor is wrong there
    x = decay_path(0.01, 0.1, 0.5, 400)
    assert abs(float(x[-1] / x[-2]) - float(decay_factor_per_step(0.01, 0.1, 0.5))) < 1e-10
    assert abs(float(x[-1] / x[-2]) - (1 - 0.01 * 0.1)) > 1e-4
    with pytest.raises(ValueError):
        decay_path(0.1, 0.1, 1.0, 5)
    with pytest.raises(ValueError):
        decay_path(0.1, 0.1, 0.0, 0)


def test_depth_comparison_is_the_coefficient_of_variation_rule():
    from flagcore.alignment import depth_comparison

    got = depth_comparison((0.45, 0.01), (0.30, 0.05))
    assert got["larger"] and got["more_stable"]
    assert got["cv_deep"] == pytest.approx(0.01 / 0.45) and got["cv_shallow"] == pytest.approx(0.05 / 0.30)
    # larger but less stable: a bigger sd can outweigh a bigger mean
    got = depth_comparison((0.45, 0.164), (0.30, 0.05))
    assert got["larger"] and not got["more_stable"]
    # negative control: smaller and less stable
    got = depth_comparison((0.2, 0.1), (0.3, 0.05))
    assert not got["larger"] and not got["more_stable"]
    with pytest.raises(ValueError, match="positive"):
        depth_comparison((0.0, 0.1), (0.3, 0.05))
    with pytest.raises(ValueError, match="finite"):
        depth_comparison((math.nan, 0.1), (0.3, 0.05))
