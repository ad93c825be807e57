"""Feature-classifier diagnostics of a trained network (flag paper §7.1, App. E.1).

Inputs are plain tensors: the penultimate features ``H [N, p]`` (the activation right before the final
linear layer), the classifier weight ``W [C, p]``, labels ``y [N]``, and the diagonal of the activation
metric ``D² [p]`` (:func:`flagcore.alignment.activation_metric`). Getting those out of a model is
:mod:`flagcore.training`'s job; nothing here touches an ``nn.Module``.

* :func:`feature_subspace`: the smallest ``r`` capturing a fraction (default 99 %) of the squared singular
  values of ``H`` (centred or not: the paper leaves centring unspecified; both are offered and reported).
* :func:`level2_alignment`: ``A = ||Q_Vᵀ Q_W||_F² / r_W`` (fraction of the classifier row space inside
  ``V``) and its z-score against a Haar-random ``r_W``-subspace, with the analytic null
  :func:`haar_level2_null` (mean ``r/p``; variance ``2 r r_W (p−r)(p−r_W) / (p²(p−1)(p+2) r_W²)``).
* :func:`level3_score`: ``S₃ = (1/m) Σ |⟨u_i, v_i⟩|`` between ordered feature directions and classifier
  right singular vectors, with the spectral-gap rule (``Degenerate`` when the feature spectrum has a
  relative gap below ``gap_threshold``: the singular vectors are then not determined) and the Haar
  mean :func:`haar_abs_inner_mean`.
* :func:`e1_diagnostics`: all of the above plus the commutator measures of :mod:`flagcore.alignment` on one
  model, after the E.1.2 sanity checks (the pipeline both training notebooks run).
* :func:`neural_collapse_metrics`: NC1–NC4 in the normalisations of Papyan, Han & Donoho (2020) and
  Zhu et al. (2021), stated in the docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .alignment import commutator_norm, conformal_split, geometric_consistency_gap, relative_commutator
from .subspace import _as_int, _check_matrix, orthonormal_basis

__all__ = [
    "E1Diagnostics",
    "FeatureSubspace",
    "Level2Alignment",
    "Level3Score",
    "NeuralCollapse",
    "feature_subspace",
    "haar_abs_inner_mean",
    "haar_level2_null",
    "level2_alignment",
    "e1_diagnostics",
    "level3_score",
    "neural_collapse_metrics",
]


def _check_features(H: Tensor) -> Tensor:
    H = _check_matrix("H", H, batched=False)
    if H.shape[0] < 2:
        raise ValueError(f"H needs at least 2 samples (rows), got {H.shape[0]}")
    return H


def _check_classifier(W: Tensor, p: int) -> Tensor:
    W = _check_matrix("W", W, batched=False)
    if W.shape[1] != p:
        raise ValueError(f"classifier W must be [C, p] with p = {p} (the feature width), got {tuple(W.shape)}; "
                         "a mismatch usually means the features were taken from the wrong layer")
    return W


# =========================================================================== feature subspace


@dataclass(frozen=True)
class FeatureSubspace:
    """``Q_V [p, r]`` (orthonormal columns: the top right singular vectors of ``H``) and how it was chosen."""

    Q_V: Tensor
    singular_values: Tensor  # all singular values of the (centred) feature matrix, descending
    r: int
    explained: float  # fraction of the squared singular values kept
    centered: bool


def feature_subspace(H: Tensor, *, variance: float = 0.99, centered: bool = True) -> FeatureSubspace:
    """The feature subspace of Appendix E.1: the smallest ``r`` with ``Σ_{i<=r} s_i² / Σ s_i² >= variance``.

    ``centered=True`` subtracts the feature mean first (PCA, "variance" in the literal sense);
    ``centered=False`` uses the raw second moment (then ``V`` contains the mean direction).
    """
    H = _check_features(H)
    variance = float(variance)
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must lie in (0, 1], got {variance}")
    X = H - H.mean(dim=0, keepdim=True) if centered else H
    _, s, Vh = torch.linalg.svd(X, full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total <= 0:
        raise ValueError("the feature matrix is zero (after centring): no feature subspace (all units dead?)")
    cumulative = torch.cumsum(energy, 0) / total
    # smallest r whose cumulative share reaches the target (guard round-off at variance = 1)
    r = int(torch.searchsorted(cumulative, torch.tensor(variance, dtype=cumulative.dtype) - 1e-12).item()) + 1
    r = min(r, s.numel())
    return FeatureSubspace(Vh[:r].mT.contiguous(), s, r, float(cumulative[r - 1]), bool(centered))


# =========================================================================== Level 2


def haar_level2_null(p: int, r: int, r_W: int) -> tuple[float, float]:
    """Mean and standard deviation of ``||Q_Vᵀ Q_W||_F² / r_W`` for ``Q_W`` a Haar-random ``r_W``-frame.

    ``E = r/p`` and ``Var = 2 r r_W (p − r)(p − r_W) / (p² (p − 1)(p + 2) r_W²)`` (RECONSTRUCTED: checked against Monte Carlo in the tests and in the notebook).
    """
    p, r, r_W = _as_int("p", p), _as_int("r", r), _as_int("r_W", r_W)
    if p < 2 or not (1 <= r <= p) or not (1 <= r_W <= p):
        raise ValueError(f"need p >= 2 and 1 <= r, r_W <= p, got p={p}, r={r}, r_W={r_W}")
    var = 2 * r * r_W * (p - r) * (p - r_W) / (p * p * (p - 1) * (p + 2) * r_W * r_W)
    return r / p, math.sqrt(var)


@dataclass(frozen=True)
class Level2Alignment:
    """``A`` (fraction of the classifier row space inside ``V``), the Haar null and the z-score."""

    A: float
    null_mean: float
    null_sd: float
    z: float  # +inf when the null is degenerate (r = p or r_W = p) and A exceeds its mean
    r: int
    r_W: int


def level2_alignment(Q_V: Tensor, W: Tensor, *, rtol: float | None = None) -> Level2Alignment:
    """``A = ||Q_Vᵀ Q_W||_F² / r_W`` with ``Q_W`` an orthonormal basis of ``row(W)`` (``r_W = rank W``).

    ``A = 1`` when ``row(W) ⊆ V`` (Level 2 when ``r_W <= r``); a Haar-random subspace gives ``r/p``.
    ``Q_V`` must have orthonormal columns (as returned by :func:`feature_subspace`).
    """
    Q_V = _check_matrix("Q_V", Q_V, batched=False)
    p, r = Q_V.shape
    W = _check_classifier(W, p)
    Q_V, W = Q_V.to(torch.promote_types(Q_V.dtype, W.dtype)), W.to(torch.promote_types(Q_V.dtype, W.dtype))
    gram_err = (Q_V.mT @ Q_V - torch.eye(r, dtype=Q_V.dtype, device=Q_V.device)).abs().max().item()
    if gram_err > 1e-5:
        raise ValueError(f"Q_V must have orthonormal columns (max |Q_VᵀQ_V − I| = {gram_err:.1e})")
    Q_W = orthonormal_basis(W.mT, rtol=rtol)
    r_W = Q_W.shape[-1]
    if r_W == 0:
        raise ValueError("the classifier W is zero: no row space")
    A = float((Q_V.mT @ Q_W).square().sum() / r_W)
    mean, sd = haar_level2_null(p, r, r_W)
    if sd > 0:
        z = (A - mean) / sd
    else:
        z = 0.0 if abs(A - mean) < 1e-12 else math.copysign(math.inf, A - mean)
    return Level2Alignment(A, mean, sd, z, r, r_W)


# =========================================================================== Level 3


def haar_abs_inner_mean(p: int) -> float:
    """``E|⟨u, v⟩|`` for independent uniform unit vectors in ``R^p``: ``Γ(p/2) / (√π Γ((p+1)/2))``."""
    p = _as_int("p", p)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    return math.exp(math.lgamma(p / 2) - math.lgamma((p + 1) / 2)) / math.sqrt(math.pi)


@dataclass(frozen=True)
class Level3Score:
    """The Level-3 score and whether it is defined."""

    score: float  # (1/m) Σ |<u_i, v_i>|, NaN when degenerate
    haar_mean: float
    excess: float  # score − haar_mean (NaN when degenerate)
    m: int
    feature_gap: float  # min_{i<m} (s_i − s_{i+1}) / s_i over the top m+1 feature singular values
    classifier_gap: float  # the same for W's singular values (reported; the rule uses the feature gap)
    degenerate: bool


def _relative_gap(s: Tensor, m: int) -> float:
    """``min_{i<m} (s_i − s_{i+1}) / s_i`` over the first ``m`` values and their successors."""
    k = min(m, s.numel() - 1)
    if k < 1:
        return math.inf
    head = s[: k + 1]
    return float(((head[:-1] - head[1:]) / head[:-1].clamp_min(torch.finfo(s.dtype).tiny)).min())


def level3_score(H: Tensor, W: Tensor, *, m: int | None = None, gap_threshold: float = 1e-2, centered: bool = True) -> Level3Score:
    """``S₃ = (1/m) Σ_{i<=m} |⟨u_i, v_i⟩|`` with ``u_i`` the right singular vectors of ``H`` and ``v_i`` those of ``W``.

    ``m = min(r_H, rank W)`` unless given. The rule of Appendix E.1 (as reconstructed): if the feature spectrum has a
    relative gap below ``gap_threshold`` among its top ``m`` values (``τ_gap`` is [UNKNOWN] in the paper;
    default 1e-2), the directions are not determined (e.g. exact neural collapse has ``C − 1`` equal
    singular values) and the score is NaN with ``degenerate=True``.
    """
    H = _check_features(H)
    p = H.shape[1]
    W = _check_classifier(W, p)
    dtype = torch.promote_types(H.dtype, W.dtype)
    X = (H - H.mean(dim=0, keepdim=True) if centered else H).to(dtype)
    _, s_H, Vh_H = torch.linalg.svd(X, full_matrices=False)
    _, s_W, Vh_W = torch.linalg.svd(W.to(dtype), full_matrices=False)
    tol = lambda s: s.numel() * torch.finfo(dtype).eps * (s[0] if s.numel() else 0)  # noqa: E731
    r_H, r_W = int((s_H > tol(s_H)).sum()), int((s_W > tol(s_W)).sum())
    m_max = min(r_H, r_W)
    m = m_max if m is None else _as_int("m", m)
    if not 1 <= m <= m_max:
        raise ValueError(f"m must lie in [1, min(rank H, rank W)] = [1, {m_max}], got {m}")
    feature_gap, classifier_gap = _relative_gap(s_H, m), _relative_gap(s_W, m)
    haar = haar_abs_inner_mean(p)
    degenerate = feature_gap < gap_threshold
    if degenerate:
        return Level3Score(math.nan, haar, math.nan, m, feature_gap, classifier_gap, True)
    score = float((Vh_H[:m] * Vh_W[:m]).sum(-1).abs().mean())
    return Level3Score(score, haar, score - haar, m, feature_gap, classifier_gap, False)


# =========================================================================== NC1–NC4


@dataclass(frozen=True)
class NeuralCollapse:
    """The four Neural-Collapse statistics (0 at perfect collapse); see :func:`neural_collapse_metrics`."""

    nc1: float  # within-class variability relative to between-class: tr(Σ_W Σ_B⁺) / C
    nc2_equinorm: float  # coefficient of variation of ||μ_c − μ_G||
    nc2_equiangle: float  # mean |cos(μ̃_c, μ̃_c') + 1/(C−1)| over c ≠ c'
    nc2_etf: float  # || M̃ᵀM̃ / ||M̃ᵀM̃||_F − (I − 11ᵀ/C)/√(C−1) ||_F
    nc3: float  # || Wᵀ/||W||_F − M̃/||M̃||_F ||_F²  (self-duality)
    nc4: float  # fraction of samples where argmax logits ≠ nearest class mean


def _nc1(within: Tensor, M: Tensor) -> float:
    """``tr(Σ_W Σ_B⁺) / C`` from the centred features ``within`` ``[N, p]`` and the class means ``M`` ``[p, C]``.

    With the thin SVD ``M = U S Vᵀ``, ``Σ_B = U (S²/C) Uᵀ``, so the trace is ``Σ_i ||within u_i||² / (N s_i²)``
    over the kept directions: the cutoff of ``pinv(Σ_B, hermitian=True)`` (``s_i² > p·eps·s_1²``). Not
    ``pinv`` of the ``p × p`` matrix ``Σ_B`` itself: it has rank at most ``C − 1``, and LAPACK's
    divide-and-conquer eigensolver failed to converge on such a matrix (width 256, the E.1 scale study).
    """
    N, p = within.shape
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    keep = s.square() > p * torch.finfo(s.dtype).eps * s[0].square()
    if not bool(keep.any()):  # all class means equal: no between-class spread, NC1 undefined (not 0)
        return math.nan
    U, s = U[:, keep], s[keep]
    return float(((within @ U).square().sum(0) / s.square()).sum() / N)


def neural_collapse_metrics(H: Tensor, y: Tensor, W: Tensor, logits: Tensor | None = None) -> NeuralCollapse:
    """NC1–NC4 (Papyan, Han & Donoho 2020), in the normalisation of Zhu et al. (2021):

    * ``μ_c`` class means, ``μ_G`` the mean of the class means, ``M̃ = [μ_c − μ_G]`` (``p × C``);
      ``Σ_W = (1/N) Σ_n (h_n − μ_{y_n})(h_n − μ_{y_n})ᵀ``, ``Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ``.
    * NC1 ``= tr(Σ_W Σ_B⁺)/C``; NC2 three ways (equinorm CV, equiangularity, distance to the simplex
      ETF Gram); NC3 ``= ||Wᵀ/||W||_F − M̃/||M̃||_F||_F²``; NC4 = disagreement between the network's
      prediction (``argmax logits``, or ``argmax H Wᵀ`` when ``logits`` is None: bias ignored) and the
      nearest-class-mean rule.
    """
    H = _check_features(H)
    N, p = H.shape
    W = _check_classifier(W, p)
    if y.ndim != 1 or y.shape[0] != N or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape [{N}], got {tuple(y.shape)} {y.dtype}")
    C = W.shape[0]
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}) (C = rows of W)")
    counts = torch.bincount(y, minlength=C)
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs at least one sample; missing classes {torch.nonzero(counts == 0).flatten().tolist()}")
    dtype = torch.promote_types(H.dtype, torch.float64)
    H, W = H.to(dtype), W.to(dtype)
    onehot = torch.nn.functional.one_hot(y, C).to(dtype)
    mu = (onehot.mT @ H) / counts.to(dtype)[:, None]  # [C, p]
    mu_G = mu.mean(0)
    M = (mu - mu_G).mT  # [p, C]
    within = H - mu[y]
    nc1 = _nc1(within, M)
    norms = M.norm(dim=0)
    nc2_equinorm = float(norms.std() / norms.mean())
    unit = M / norms
    cos = unit.mT @ unit
    off = ~torch.eye(C, dtype=torch.bool, device=H.device)
    nc2_equiangle = float((cos[off] + 1 / (C - 1)).abs().mean())
    G = M.mT @ M
    etf = (torch.eye(C, dtype=dtype, device=H.device) - 1 / C) / math.sqrt(C - 1)
    nc2_etf = float((G / G.norm() - etf).norm())
    nc3 = float((W.mT / W.norm() - M / M.norm()).square().sum())
    scores = logits.to(dtype) if logits is not None else H @ W.mT
    if scores.shape != (N, C):
        raise ValueError(f"logits must be [{N}, {C}], got {tuple(scores.shape)}")
    ncc = torch.cdist(H, mu).argmin(dim=1)
    nc4 = float((scores.argmax(dim=1) != ncc).to(dtype).mean())
    return NeuralCollapse(nc1, nc2_equinorm, nc2_equiangle, nc2_etf, nc3, nc4)


# =========================================================================== the whole E.1 pipeline


@dataclass(frozen=True)
class E1Diagnostics:
    """Everything App. E.1 measures on one model."""

    subspace: FeatureSubspace
    level2: Level2Alignment
    level3: Level3Score
    commutator: float  # ||[P_V, D²]||_F (E.1)
    relative: float  # ||[P_V, D²]||_F / (√r ||D²||_F + ε) (E.2, RECONSTRUCTED)
    by_anisotropy: float  # ||[P_V, D²]||_F / ||D² − cI||_F, NaN when D² is conformal
    gc_gap: float  # δ_gc = ||D² − cI||_F / ||D²||_F
    collapse: NeuralCollapse | None  # NC1–NC4 when labels were given


def e1_diagnostics(
    H: Tensor,
    W: Tensor,
    D2: Tensor,
    *,
    y: Tensor | None = None,
    logits: Tensor | None = None,
    variance: float = 0.99,
    centered: bool = True,
    gap_threshold: float = 1e-2,
) -> E1Diagnostics:
    """The E.1 pipeline on captured features ``H [N, p]``, classifier ``W [C, p]`` and the diagonal ``D2 [p]``.

    Runs the E.1.2 sanity checks first (a ``ValueError`` names the failure): ``D2``, ``H`` and ``W`` must agree
    on the width ``p`` (a mismatch means a hook on the wrong layer) and ``Q_V`` must be orthonormal (to 1e-10 in
    float64, 1e-5 otherwise). NC1–NC4 are computed when ``y`` is given.
    """
    H = _check_features(H)
    p = H.shape[1]
    W = _check_classifier(W, p)
    if D2.ndim != 1 or D2.shape[0] != p:
        raise ValueError(f"D2 must be the diagonal [p] with p = {p} (the feature width), got {tuple(D2.shape)}: "
                         "the activation hook and the classifier hook are on different layers")
    fs = feature_subspace(H, variance=variance, centered=centered)
    tol = 1e-10 if fs.Q_V.dtype == torch.float64 else 1e-5
    err = float((fs.Q_V.mT @ fs.Q_V - torch.eye(fs.r, dtype=fs.Q_V.dtype, device=fs.Q_V.device)).abs().max())
    if err > tol:
        raise ValueError(f"Q_V is not orthonormal: max |Q_VᵀQ_V − I| = {err:.1e} > {tol:.0e}")
    comm = float(commutator_norm(D2, Q_V=fs.Q_V))
    _, delta = conformal_split(D2)
    aniso = float(delta.norm())
    return E1Diagnostics(
        subspace=fs,
        level2=level2_alignment(fs.Q_V, W),
        level3=level3_score(H, W, gap_threshold=gap_threshold, centered=centered),
        commutator=comm,
        relative=float(relative_commutator(D2, Q_V=fs.Q_V)),
        by_anisotropy=comm / aniso if aniso > 0 else math.nan,
        gc_gap=float(geometric_consistency_gap(D2)),
        collapse=neural_collapse_metrics(H, y, W, logits) if y is not None else None,
    )
