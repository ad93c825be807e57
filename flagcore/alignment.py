"""Alignment between adjacent layers and between features and classifier (flag paper, Sections 3, 5, 6).

* Definition 3.1: random layer pairs at a prescribed alignment level (:func:`layer_pair_at_level`);
  the level itself is decided by :mod:`flagcore.subspace`.
* Theorem 5.3 (Level-2 attraction): the ridge minimiser (Eq. 6), the exact gradient flow,
  the orthogonal component ``W P_V⊥`` and its per-step decay factor under GD / heavy-ball momentum,
  and a log-linear rate fit.
* Theorem 5.4 and Appendix C.3: the activation metric ``D²`` (Eq. 8) from
  pre-activations, the geometric-consistency gap, the commutator ``[P_V, D²]`` (dense and the fast
  diagonal formula E.1), the invariance defect, the relative commutator, the
  chart Jacobian of the invariance condition, and the heuristic reduced dynamics of Appendix C.3.
* Proposition 6.1: the weight-decay split of two heads with a fixed sum.

Conventions shared by the feature diagnostics
---------------------------------------------
* The feature subspace ``V ⊆ R^p`` is given either as ``Q_V`` (any spanning matrix ``[..., p, r]``;
  it is orthonormalised with :func:`flagcore.subspace.orthonormal_basis`) or as its projector
  ``P_V`` (``[..., p, p]``, used as given: pass a symmetric idempotent matrix). Exactly one of the two.
* ``D2`` is either the *diagonal* of ``D²`` (``[..., p]``, the case of elementwise activations) or a
  dense symmetric matrix ``[..., p, p]``. Because a batch of ``p`` diagonals ``[p, p]`` looks like one
  dense matrix, the rule is: a tensor whose last two dimensions are both ``p`` is dense, anything
  else is diagonal; pass ``diagonal=True`` / ``False`` to override.
* Everything is batched over leading dimensions (broadcast between ``V`` and ``D2``), runs on the
  input's device and in the promoted dtype of the inputs (float32 stays float32; integers become
  float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .subspace import AlignmentLevel, _as_int, _as_real_float, _check_matrix, haar_frames, orthonormal_basis

__all__ = [
    "activation_metric",
    "commutator",
    "commutator_norm",
    "conformal_split",
    "constrained_head_descent",
    "decay_factor_per_step",
    "decay_path",
    "depth_comparison",
    "fit_decay_rate",
    "geometric_consistency_gap",
    "head_penalty_split",
    "invariance_chart_jacobian",
    "invariance_defect",
    "layer_pair_at_level",
    "orthogonal_residual",
    "project_fixed_sum",
    "relative_commutator",
    "retract_projector",
    "ridge_flow",
    "ridge_minimizer",
    "simulate_residual_dynamics",
    "tangent_projection",
]


def _singular_values(r: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """``r`` descending values in about [0.5, 2] with relative gaps of at least ``0.37 / (r - 1)``.

    Evenly spaced values jittered by a quarter of the spacing: random, bounded away from 0 (ranks are
    unambiguous) and with gaps no tolerance mistakes for a repeated value (Level 3 stays defined,
    even in float32 for r up to ~1000). Uniform draws would give arbitrarily small gaps.
    """
    if r == 1:
        return 0.5 + 1.5 * torch.rand(1, generator=generator, dtype=dtype)
    spacing = 1.5 / (r - 1)
    jitter = (torch.rand(r, generator=generator, dtype=dtype) - 0.5) * (spacing / 2)
    return torch.linspace(2.0, 0.5, r, dtype=dtype) + jitter


def layer_pair_at_level(
    level: AlignmentLevel | int,
    d_mid: int,
    r_prev: int,
    r_next: int | None = None,
    *,
    d_in: int | None = None,
    d_out: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Random adjacent layers ``W_prev [d_mid, d_in]``, ``W_next [d_out, d_mid]`` at exactly ``level``.

    The output subspace ``U`` of ``W_prev`` (rank ``r_prev``) and the input subspace ``V`` of
    ``W_next`` (rank ``r_next``, default ``r_prev``) are placed as the level requires; everything
    else (the other singular subspaces, the singular values) is random:

    * GENERAL: ``U`` and ``V`` independent Haar subspaces, so with probability 1 neither contains
      the other (needs both ranks below ``d_mid``: all of R^d contains everything);
    * FLAG: the smaller of ``U``, ``V`` inside the larger (needs ``r_prev != r_next``);
    * SUBSPACE: ``V = U O`` with a Haar-random rotation ``O`` of the common subspace;
    * STRICT: ``V = U S`` with random signs ``S``.
    """
    level = AlignmentLevel(level)
    r_next = r_prev if r_next is None else r_next
    d_in = d_mid if d_in is None else d_in
    d_out = d_mid if d_out is None else d_out
    if not (1 <= r_prev <= min(d_mid, d_in) and 1 <= r_next <= min(d_mid, d_out)):
        raise ValueError(
            f"ranks must satisfy 1 <= r_prev <= min(d_mid, d_in) and 1 <= r_next <= min(d_mid, d_out); "
            f"got r_prev={r_prev}, r_next={r_next}, d_in={d_in}, d_mid={d_mid}, d_out={d_out}"
        )
    if level == AlignmentLevel.GENERAL and max(r_prev, r_next) == d_mid:
        raise ValueError("Level 0 needs both ranks below d_mid: a full-rank subspace contains the other one")
    if level == AlignmentLevel.FLAG and r_prev == r_next:
        raise ValueError("Level 1 without Level 2 needs r_prev != r_next (equal ranks make containment equality)")
    if level in (AlignmentLevel.SUBSPACE, AlignmentLevel.STRICT) and r_prev != r_next:
        raise ValueError(f"Level {int(level)} needs r_prev == r_next, got {r_prev} and {r_next}")
    if level == AlignmentLevel.SUBSPACE and r_prev == 1:
        raise ValueError("Level 2 without Level 3 needs rank >= 2: the only rotations of a line are ±1, so it is strict")

    frame = haar_frames(d_mid, d_mid, 1, generator, dtype=dtype)[0]
    if level == AlignmentLevel.GENERAL:
        U = haar_frames(d_mid, r_prev, 1, generator, dtype=dtype)[0]
        V = haar_frames(d_mid, r_next, 1, generator, dtype=dtype)[0]
    elif level == AlignmentLevel.FLAG:
        big = frame[:, : max(r_prev, r_next)]
        # The small subspace is a random subspace of the big one, not just its first columns.
        small = big @ haar_frames(big.shape[1], min(r_prev, r_next), 1, generator, dtype=dtype)[0]
        U, V = (small, big) if r_prev < r_next else (big, small)
    else:
        U = frame[:, :r_prev]
        if level == AlignmentLevel.SUBSPACE:
            V = U @ haar_frames(r_prev, r_prev, 1, generator, dtype=dtype)[0]
        else:
            signs = torch.randint(0, 2, (r_prev,), generator=generator).to(dtype) * 2 - 1
            V = U * signs
    W_prev = U @ torch.diag(_singular_values(r_prev, generator, dtype)) @ haar_frames(d_in, r_prev, 1, generator, dtype=dtype)[0].T
    W_next = haar_frames(d_out, r_next, 1, generator, dtype=dtype)[0] @ torch.diag(_singular_values(r_next, generator, dtype)) @ V.T
    return W_prev, W_next


# =========================================================================== shared helpers


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {want}, got {value}")
    return value


def _feature_projector(Q_V: Tensor | None, P_V: Tensor | None) -> Tensor:
    """The projector ``[..., p, p]`` from exactly one of ``Q_V`` (spanning matrix) or ``P_V``."""
    if (Q_V is None) == (P_V is None):
        raise ValueError("pass exactly one of Q_V (a spanning matrix [..., p, r]) or P_V (a projector [..., p, p])")
    if Q_V is not None:
        Q = orthonormal_basis(_check_matrix("Q_V", Q_V))
        return Q @ Q.transpose(-1, -2)
    P = _check_matrix("P_V", P_V)
    if P.shape[-1] != P.shape[-2]:
        raise ValueError(f"P_V must be a square projector [..., p, p], got {tuple(P.shape)}")
    return P


def _is_diagonal_form(D2: Tensor, p: int, diagonal: bool | None) -> bool:
    if diagonal is not None:
        if not isinstance(diagonal, bool):
            raise TypeError(f"diagonal must be True, False or None, got {diagonal!r}")
        return diagonal
    return not (D2.ndim >= 2 and D2.shape[-1] == p and D2.shape[-2] == p)


def _check_metric(D2: Tensor, p: int | None, diagonal: bool | None) -> tuple[Tensor, bool]:
    """Validate ``D2`` (diagonal ``[..., p]`` or dense ``[..., p, p]``); return it and its form."""
    D2 = _as_real_float("D2", D2)
    if D2.ndim == 0:
        raise ValueError("D2 must be a diagonal [..., p] or a dense matrix [..., p, p], got a scalar")
    if not bool(torch.isfinite(D2).all()):
        raise ValueError("D2 contains NaN or Inf")
    if p is None:
        p = D2.shape[-1]
    is_diag = _is_diagonal_form(D2, p, diagonal)
    if is_diag:
        if D2.shape[-1] != p:
            raise ValueError(f"D2 (diagonal form) has {D2.shape[-1]} entries but the feature space has p = {p}")
    else:
        if D2.ndim < 2 or D2.shape[-1] != p or D2.shape[-2] != p:
            raise ValueError(f"D2 (dense form) must be [..., {p}, {p}], got {tuple(D2.shape)}")
    return D2, is_diag


def _promote(*xs: Tensor) -> list[Tensor]:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _frob(X: Tensor) -> Tensor:
    return X.square().sum(dim=(-2, -1)).sqrt()


# =========================================================================== Theorem 5.3


def ridge_minimizer(H: Tensor, Y: Tensor, lam: float, *, form: str = "primal") -> Tensor:
    """The minimiser of ``½||WH − Y||_F² + (λ/2)||W||_F²`` (Eq. 5), by Eq. (6) / (C.4).

    ``W* = Y Hᵀ (H Hᵀ + λ I_p)⁻¹`` (``form="primal"``, a p×p solve) ``= Y (Hᵀ H + λ I_N)⁻¹ Hᵀ``
    (``form="dual"``, an N×N solve). Its rows lie in ``V = col(H)``: ``W* P_V⊥ = 0``.

    Args:
        H: features ``[..., p, N]`` (columns are samples).
        Y: targets ``[..., C, N]``.
        lam: ``λ > 0``. (With a ``1/(2N)`` data term, pass ``N λ``.)

    Returns:
        ``W* [..., C, p]``.
    """
    H = _check_matrix("H", H)
    Y = _check_matrix("Y", Y)
    lam = _check_positive("lam", lam)
    if H.shape[-1] != Y.shape[-1]:
        raise ValueError(f"H [..., p, N] and Y [..., C, N] disagree on N: {H.shape[-1]} vs {Y.shape[-1]}")
    H, Y = _promote(H, Y)
    Ht = H.transpose(-1, -2)
    if form == "primal":
        p = H.shape[-2]
        A = H @ Ht + lam * torch.eye(p, dtype=H.dtype, device=H.device)
        return torch.linalg.solve(A, H @ Y.transpose(-1, -2)).transpose(-1, -2)
    if form == "dual":
        N = H.shape[-1]
        A = Ht @ H + lam * torch.eye(N, dtype=H.dtype, device=H.device)
        return Y @ torch.linalg.solve(A, Ht)
    raise ValueError(f"form must be 'primal' or 'dual', got {form!r}")


def ridge_flow(W0: Tensor, H: Tensor, Y: Tensor, lam: float, t: float | Tensor) -> Tensor:
    """The exact gradient flow of Eq. (5): ``W(t) = W* + (W0 − W*) exp(−(H Hᵀ + λI) t)`` (C.1–C.3).

    It solves ``Ẇ = −(WH − Y)Hᵀ − λW``, with ``torch.linalg.matrix_exp``.

    Args:
        W0: ``[..., C, p]`` initial classifier.
        H, Y, lam: as in :func:`ridge_minimizer`.
        t: a time ``>= 0`` (float or 0-dim tensor), or a tensor of times ``[T]``.

    Returns:
        ``[..., C, p]`` for a scalar time; ``[T, ..., C, p]`` for ``T`` times.
    """
    W0 = _check_matrix("W0", W0)
    W_star = ridge_minimizer(H, Y, lam)
    H = _check_matrix("H", H)
    if W0.shape[-1] != H.shape[-2]:
        raise ValueError(f"W0 [..., C, p] has p = {W0.shape[-1]} but H [..., p, N] has p = {H.shape[-2]}")
    W0, W_star, H = _promote(W0, W_star, H)
    t = torch.as_tensor(t, dtype=W0.dtype, device=W0.device)
    if t.ndim > 1 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError("t must be a finite time >= 0 or a 1-D tensor of such times")
    M = H @ H.transpose(-1, -2) + lam * torch.eye(H.shape[-2], dtype=H.dtype, device=H.device)
    tt = t.reshape(t.shape + (1,) * M.ndim)
    return W_star + (W0 - W_star) @ torch.linalg.matrix_exp(-tt * M)


def orthogonal_residual(W: Tensor, *, Q_V: Tensor | None = None, P_V: Tensor | None = None) -> Tensor:
    """``W P_V⊥ = W (I − P_V)``, the part of the classifier's rows outside ``V`` (Eq. 7): ``[..., C, p]``.

    Its Frobenius norm is the quantity that Theorem 5.3 says decays as ``e^{−λt}``.
    """
    W = _check_matrix("W", W)
    P = _feature_projector(Q_V, P_V)
    if W.shape[-1] != P.shape[-1]:
        raise ValueError(f"W [..., C, p] has p = {W.shape[-1]} but the feature space has p = {P.shape[-1]}")
    W, P = _promote(W, P)
    return W - W @ P


def decay_factor_per_step(eta: float | Tensor, lam: float | Tensor, mu: float | Tensor = 0.0) -> Tensor:
    """Per-step contraction factor of ``W P_V⊥`` under GD / heavy-ball momentum with coupled L2.

    PyTorch's SGD convention ``g = ∇L + λW; v ← μv + g; W ← W − ηv``: on ``V⊥`` the data gradient
    vanishes, so ``x_{k+1} = (1 + μ − ηλ) x_k − μ x_{k−1}``, and the asymptotic factor is the largest
    root modulus of ``z² − (1 + μ − ηλ) z + μ``. For ``μ = 0`` it is ``|1 − ηλ|`` exactly. In the
    non-oscillatory regime (``ηλ ≪ (1 − √μ)²``), ``−log`` of it is ``≈ ηλ / (1 − μ)``; in the
    oscillatory regime it is ``√μ``.

    All arguments broadcast (floats or tensors); returns a float64 tensor.
    """
    args = []
    for name, a in zip(("eta", "lam", "mu"), (eta, lam, mu)):
        if isinstance(a, bool) or not isinstance(a, (int, float, Tensor)):
            raise TypeError(f"{name} must be real (a float or a real tensor), got {a!r}")
        args.append(a if isinstance(a, Tensor) else torch.tensor(float(a), dtype=torch.float64))
    for name, a in zip(("eta", "lam", "mu"), args):
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must be real")
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
    if bool((args[2] >= 1).any()):
        raise ValueError("mu must be < 1 (heavy-ball momentum)")
    eta, lam, mu = (a.to(torch.float64) for a in args)
    b = 1 + mu - eta * lam
    disc = (b * b - 4 * mu).to(torch.complex128)
    root = torch.sqrt(disc)
    z1, z2 = (b + root) / 2, (b - root) / 2
    return torch.maximum(z1.abs(), z2.abs())


def decay_path(eta: float, lam: float, mu: float = 0.0, steps: int = 1, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The exact path ``x_0 … x_steps`` of ``||W_k P_V⊥|| / ||W_0 P_V⊥||`` under PyTorch's SGD with coupled L2.

    ``x_0 = 1``, ``x_1 = 1 − ηλ`` (the momentum buffer starts at zero), ``x_{k+1} = (1 + μ − ηλ) x_k − μ x_{k−1}``:
    exact whenever the data gradient has no component on ``V⊥`` (fixed features spanning ``V``). Signed (the
    path oscillates in the under-damped regime); its asymptotic factor is :func:`decay_factor_per_step`.
    Returns ``[steps + 1]``.
    """
    steps = _as_int("steps", steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    decay_factor_per_step(eta, lam, mu)  # validates eta, lam >= 0 and 0 <= mu < 1
    eta, lam, mu = float(eta), float(lam), float(mu)
    x = [1.0, 1.0 - eta * lam]
    for _ in range(steps - 1):
        x.append((1 + mu - eta * lam) * x[-1] - mu * x[-2])
    return torch.tensor(x, dtype=dtype)


def fit_decay_rate(values: Tensor, times: Tensor, *, floor: float | None = None) -> Tensor:
    """Least-squares rate ``k`` in ``values ≈ A e^{−k t}``: minus the slope of ``log(values)`` vs ``times``.

    Points with ``values <= floor`` are left out (the machine-precision floor
    pitfall); the default floor is ``1e3 · eps(dtype) · values[..., 0]``, i.e. relative to the start.

    Args:
        values: ``[..., T]`` positive magnitudes (e.g. ``||W_k P_V⊥||_F``).
        times: ``[T]`` (steps or continuous times), broadcast against ``values``.

    Returns:
        ``[...]`` fitted rates (per unit of ``times``); NaN where fewer than 2 points survive the floor.
    """
    values = _as_real_float("values", values)
    times = _as_real_float("times", times)
    if values.ndim == 0 or times.ndim != 1 or values.shape[-1] != times.shape[-1]:
        raise ValueError(f"values must be [..., T] and times [T] with the same T, got {tuple(values.shape)} and {tuple(times.shape)}")
    values, times = _promote(values, times)
    if bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
        raise ValueError("values must be finite and non-negative (they are norms)")
    if floor is None:
        thr = 1e3 * torch.finfo(values.dtype).eps * values[..., :1]
    else:
        thr = torch.as_tensor(_check_positive("floor", floor, allow_zero=True), dtype=values.dtype, device=values.device)
    w = (values > thr).to(values.dtype)
    y = torch.log(torch.where(w > 0, values, torch.ones_like(values)))
    n = w.sum(-1)
    t_mean = (w * times).sum(-1) / n.clamp(min=1)
    y_mean = (w * y).sum(-1) / n.clamp(min=1)
    dt = times - t_mean.unsqueeze(-1)
    sxx = (w * dt * dt).sum(-1)
    sxy = (w * dt * (y - y_mean.unsqueeze(-1))).sum(-1)
    slope = sxy / sxx
    return torch.where((n >= 2) & (sxx > 0), -slope, torch.full_like(slope, float("nan")))


# =========================================================================== activation metric


def _gelu_prime(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _silu_prime(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_DERIVATIVES: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "linear": torch.ones_like,
    "identity": torch.ones_like,
    "tanh": lambda z: 1 - torch.tanh(z).square(),
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "softplus": torch.sigmoid,
    "silu": _silu_prime,
    "gelu": _gelu_prime,
}


def activation_metric(z: Tensor, activation: str | Callable[[Tensor], Tensor]) -> Tensor:
    """The diagonal of the activation metric ``D² = E_x[J_σᵀ J_σ] = diag(E[σ'(z_i)²])`` (Eq. 8).

    Args:
        z: pre-activations ``[..., N, p]`` (samples × channels; the expectation is the mean over N).
        activation: a name with a closed-form derivative — ``"relu"`` (``σ'² = 1[z > 0]``, so
            ``D²_ii = Pr(z_i > 0)``), ``"linear"``/``"identity"`` (``D² = I`` exactly),
            ``"tanh"``, ``"sigmoid"``, ``"softplus"``, ``"silu"``, ``"gelu"`` (exact erf form) — or any
            *elementwise* callable ``σ``, differentiated with autograd (e.g. ``torch.nn.functional.mish``).

    Returns:
        ``[..., p]``, the diagonal of ``D²`` (``torch.diag_embed`` gives the dense matrix), in ``z``'s dtype.
    """
    z = _check_matrix("z", z)
    if z.shape[-2] == 0:
        raise ValueError("z has no samples (N = 0)")
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _DERIVATIVES:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_DERIVATIVES)} or a callable")
        return _DERIVATIVES[key](z).square().mean(dim=-2)
    if not callable(activation):
        raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        out = activation(zz)
        if not isinstance(out, Tensor) or out.shape != zz.shape:
            raise ValueError("activation must be elementwise: it must return a tensor of the input's shape")
        (grad,) = torch.autograd.grad(out.sum(), zz)
    return grad.detach().square().mean(dim=-2)


def conformal_split(D2: Tensor, *, diagonal: bool | None = None) -> tuple[Tensor, Tensor]:
    """``D² = c I + Δ`` with ``c = tr(D²)/p`` (Eq. 4): returns ``(c [...], Δ)``, ``Δ`` in ``D2``'s form."""
    D2, is_diag = _check_metric(D2, None, diagonal)
    if is_diag:
        c = D2.mean(-1)
        return c, D2 - c.unsqueeze(-1)
    p = D2.shape[-1]
    c = torch.diagonal(D2, dim1=-2, dim2=-1).sum(-1) / p
    return c, D2 - c[..., None, None] * torch.eye(p, dtype=D2.dtype, device=D2.device)


def geometric_consistency_gap(D2: Tensor, *, diagonal: bool | None = None) -> Tensor:
    """``δ_gc = ||D² − cI||_F / ||D²||_F`` with ``c = tr(D²)/p``: the relative size of ``Δ`` in Eq. (4).

    RECONSTRUCTED (medium confidence): the paper's formula and its threshold ``τ_gc`` were
    lost. For ReLU it is ``std(π)/rms(π)`` with ``π_i = Pr(z_i > 0)``. ``δ_gc = 0`` iff ``D²`` is
    conformal (``cI``); NaN where ``D² = 0`` (all channels dead). Returns ``[...]``.
    """
    _, delta = conformal_split(D2, diagonal=diagonal)
    D2, is_diag = _check_metric(D2, None, diagonal)
    if is_diag:
        num, den = delta.norm(dim=-1), D2.norm(dim=-1)
    else:
        num, den = _frob(delta), _frob(D2)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


# =========================================================================== Theorem 5.4


def commutator(D2: Tensor, *, Q_V: Tensor | None = None, P_V: Tensor | None = None, diagonal: bool | None = None) -> Tensor:
    """The dense commutator ``[P_V, D²] = P_V D² − D² P_V``, ``[..., p, p]`` (Theorem 5.4).

    For diagonal ``D² = diag(δ)`` it is formed entrywise, ``([P, D²])_ij = P_ij (δ_j − δ_i)`` (E.1).
    """
    P = _feature_projector(Q_V, P_V)
    D2, is_diag = _check_metric(D2, P.shape[-1], diagonal)
    P, D2 = _promote(P, D2)
    if is_diag:
        return P * (D2.unsqueeze(-2) - D2.unsqueeze(-1))
    return P @ D2 - D2 @ P


def commutator_norm(D2: Tensor, *, Q_V: Tensor | None = None, P_V: Tensor | None = None, diagonal: bool | None = None) -> Tensor:
    """``||[P_V, D²]||_F``, batched: ``[...]``. Zero iff ``V`` is ``D²``-invariant (Theorem 5.4).

    Diagonal ``D² = diag(δ)``: the fast formula (E.1) ``sqrt(Σ_ij P_ij² (δ_i − δ_j)²)``, by
    broadcasting, without forming the commutator. Dense ``D²``: the Frobenius norm of
    ``P D² − D² P``.
    """
    P = _feature_projector(Q_V, P_V)
    D2, is_diag = _check_metric(D2, P.shape[-1], diagonal)
    P, D2 = _promote(P, D2)
    if is_diag:
        gaps = (D2.unsqueeze(-1) - D2.unsqueeze(-2)).square()
        return (P.square() * gaps).sum(dim=(-2, -1)).sqrt()
    return _frob(P @ D2 - D2 @ P)


def invariance_defect(D2: Tensor, *, Q_V: Tensor | None = None, P_V: Tensor | None = None, diagonal: bool | None = None) -> Tensor:
    """``||P_V D² (I − P_V)||_F`` (the off-diagonal block ``B`` of C.8), ``[...]``.

    Identity (C.9): ``||[P_V, D²]||_F² = 2 ||P_V D² (I − P_V)||_F²`` for symmetric ``D²``.
    """
    P = _feature_projector(Q_V, P_V)
    D2, is_diag = _check_metric(D2, P.shape[-1], diagonal)
    P, D2 = _promote(P, D2)
    PD = P * D2.unsqueeze(-2) if is_diag else P @ D2
    return _frob(PD - PD @ P)


def relative_commutator(
    D2: Tensor,
    *,
    Q_V: Tensor | None = None,
    P_V: Tensor | None = None,
    diagonal: bool | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """``ρ = ||[P_V, D²]||_F / (||P_V||_F ||D²||_F + ε)`` (RECONSTRUCTED, low-medium).

    ``||P_V||_F = √r``. Scale-free in ``D²`` (up to ``ε``) and ``<= √2`` always (``||[P, D]||_F <=
    √2 ||D||_F`` for a projector ``P``); ``ε`` (default ``1e-12``, value [UNKNOWN] in the paper)
    guards ``D² = 0``. Returns ``[...]``.
    """
    eps = _check_positive("eps", eps, allow_zero=True)
    num = commutator_norm(D2, Q_V=Q_V, P_V=P_V, diagonal=diagonal)
    P = _feature_projector(Q_V, P_V)
    D2c, is_diag = _check_metric(D2, P.shape[-1], diagonal)
    d_norm = D2c.norm(dim=-1) if is_diag else _frob(D2c)
    return num / (_frob(P).to(num.dtype) * d_norm.to(num.dtype) + eps)


def invariance_chart_jacobian(
    Q_V: Tensor, D2: Tensor, *, diagonal: bool | None = None, Q_perp: Tensor | None = None
) -> Tensor:
    """Jacobian at ``B = 0`` of ``B ↦ [P(B), D²]`` in the standard chart of ``Gr(r, p)`` at ``V``.

    The chart is ``P(B) = `` projector onto ``col(Q_V + Q_⊥ B)``, ``B ∈ R^{(p−r)×r}``, with ``Q_⊥`` an
    orthonormal basis of ``V⊥``. At a ``D²``-invariant ``V`` its rank is the codimension of the
    invariant locus; for ``D²`` with simple spectrum it is ``r(p − r) = dim Gr(r, p)`` (invariant
    subspaces are isolated). In an eigenbasis (``D² = diag(a) ⊕ diag(c)`` on ``V ⊕ V⊥``) its
    singular values are ``√2 |c_i − a_j|``.

    Args:
        Q_V: spanning matrix ``[p, r]`` (single subspace, ``1 <= r < p``); used as given when it is
            orthonormal (to ``sqrt(eps)``), orthonormalised otherwise.
        D2: diagonal ``[p]`` or dense ``[p, p]``.
        Q_perp: optional orthonormal basis ``[p, p − r]`` of ``V⊥`` fixing the chart's coordinates
            (default: from a QR completion). The rank and singular values do not depend on it.

    Returns:
        ``[p·p, (p − r)·r]``: row-major flattening of ``[P, D²]`` against row-major flattening of ``B``.
    """
    Q = _check_matrix("Q_V", Q_V, batched=False)
    eye_r = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    if float((Q.T @ Q - eye_r).abs().max()) > math.sqrt(torch.finfo(Q.dtype).eps):
        Q = orthonormal_basis(Q)  # an orthonormal Q_V is used as given: it fixes the chart's coordinates
    p, r = Q.shape
    if not 1 <= r < p:
        raise ValueError(f"need 1 <= dim V < p for a chart of Gr(r, p), got r = {r}, p = {p}")
    D2, is_diag = _check_metric(D2, p, diagonal)
    if D2.ndim != (1 if is_diag else 2):
        raise ValueError(f"invariance_chart_jacobian takes one D2 ([p] or [p, p]), got {tuple(D2.shape)}")
    Q, D2 = _promote(Q, D2)
    D = torch.diag(D2) if is_diag else D2
    if Q_perp is None:
        full, _ = torch.linalg.qr(torch.cat([Q, torch.eye(p, dtype=Q.dtype, device=Q.device)], dim=1))
        Q_perp = full[:, r:p]
        Q_perp = Q_perp - Q @ (Q.T @ Q_perp)  # re-orthogonalise against V
        Q_perp, _ = torch.linalg.qr(Q_perp)
    else:
        Q_perp = _check_matrix("Q_perp", Q_perp, batched=False).to(Q.dtype)
        if Q_perp.shape != (p, p - r):
            raise ValueError(f"Q_perp must be [p, p - r] = [{p}, {p - r}], got {tuple(Q_perp.shape)}")
        gram = torch.cat([Q, Q_perp], 1)
        if float((gram.T @ gram - torch.eye(p, dtype=Q.dtype, device=Q.device)).abs().max()) > math.sqrt(torch.finfo(Q.dtype).eps):
            raise ValueError("Q_perp must be an orthonormal basis of the orthogonal complement of col(Q_V)")

    def comm(Bflat: Tensor) -> Tensor:
        M = Q + Q_perp @ Bflat.reshape(p - r, r)
        P = M @ torch.linalg.solve(M.T @ M, M.T)
        return (P @ D - D @ P).reshape(-1)

    B0 = torch.zeros((p - r) * r, dtype=Q.dtype, device=Q.device)
    return torch.autograd.functional.jacobian(comm, B0)


# =========================================================================== Appendix C.3


def tangent_projection(P: Tensor, X: Tensor) -> Tensor:
    """``T_P(X) = P X (I − P) + (I − P) X P``: projection of symmetric ``X`` onto the tangent space of the
    Grassmannian (as projectors) at ``P`` (C.10/C.13). Batched ``[..., p, p]``."""
    P = _check_matrix("P", P)
    X = _check_matrix("X", X)
    if P.shape[-1] != P.shape[-2] or X.shape[-2:] != P.shape[-2:]:
        raise ValueError(f"P and X must both be square [..., p, p] of the same p, got {tuple(P.shape)} and {tuple(X.shape)}")
    P, X = _promote(P, X)
    PX = P @ X
    XP = X @ P
    return PX - PX @ P + XP - P @ XP


def retract_projector(X: Tensor, r: int) -> Tensor:
    """The rank-``r`` projector onto the top-``r`` eigenvectors of ``sym(X)``: the retraction of Appendix C.3.

    ``X`` is ``[..., p, p]``; returns ``[..., p, p]``. Exact for a projector perturbed by a small step.
    """
    X = _check_matrix("X", X)
    r = _as_int("r", r)
    p = X.shape[-1]
    if X.shape[-2] != p:
        raise ValueError(f"X must be square [..., p, p], got {tuple(X.shape)}")
    if not 1 <= r <= p:
        raise ValueError(f"need 1 <= r <= p, got r = {r}, p = {p}")
    _, vecs = torch.linalg.eigh((X + X.transpose(-1, -2)) / 2)
    top = vecs[..., -r:]
    return top @ top.transpose(-1, -2)


def simulate_residual_dynamics(
    P_W0: Tensor,
    P_V0: Tensor,
    D2: Tensor,
    *,
    gamma: float,
    kappa: float,
    dt: float,
    steps: int,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit Euler with retraction for the HEURISTIC reduced dynamics of Appendix C.3:

    ``Ṗ_W = −γ T_{P_W}(P_W − P_V)`` (gradient flow of ``½||P_W − P_V||_F²``) and
    ``Ṗ_V = κ [[D², P_V], P_V] = κ T_{P_V}(D²)`` (activation-induced drift); after every step each
    projector is retracted to its rank by :func:`retract_projector`.

    Args:
        P_W0, P_V0: rank-``r_W`` and rank-``r`` projectors ``[..., p, p]``.
        D2: diagonal ``[..., p]`` or dense ``[..., p, p]``.
        gamma, kappa: ``γ > 0``, ``κ >= 0``; dt > 0; steps >= 0.

    Returns:
        ``(times [steps+1], ||P_W − P_V||_F [..., steps+1], ||[P_V, D²]||_F [..., steps+1])``.
    """
    P_W = _check_matrix("P_W0", P_W0)
    P_V = _check_matrix("P_V0", P_V0)
    gamma = _check_positive("gamma", gamma)
    kappa = _check_positive("kappa", kappa, allow_zero=True)
    dt = _check_positive("dt", dt)
    steps = _as_int("steps", steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    p = P_V.shape[-1]
    if P_W.shape[-2:] != (p, p) or P_V.shape[-2] != p:
        raise ValueError(f"P_W0 and P_V0 must be square projectors of the same p, got {tuple(P_W.shape)} and {tuple(P_V.shape)}")
    D2, is_diag = _check_metric(D2, p, diagonal)
    P_W, P_V, D2 = _promote(P_W, P_V, D2)
    D = torch.diag_embed(D2) if is_diag else D2
    batch = torch.broadcast_shapes(P_W.shape[:-2], P_V.shape[:-2], D.shape[:-2])
    P_W, P_V, D = (X.expand(batch + (p, p)) for X in (P_W, P_V, D))
    r_W = round(float(torch.diagonal(P_W, dim1=-2, dim2=-1).sum(-1).reshape(-1)[0]))
    r_V = round(float(torch.diagonal(P_V, dim1=-2, dim2=-1).sum(-1).reshape(-1)[0]))
    errs, comms = [_frob(P_W - P_V)], [_frob(P_V @ D - D @ P_V)]
    for _ in range(steps):
        P_W_new = retract_projector(P_W - dt * gamma * tangent_projection(P_W, P_W - P_V), r_W)
        P_V = retract_projector(P_V + dt * kappa * tangent_projection(P_V, D), r_V)
        P_W = P_W_new
        errs.append(_frob(P_W - P_V))
        comms.append(_frob(P_V @ D - D @ P_V))
    times = dt * torch.arange(steps + 1, dtype=P_V.dtype, device=P_V.device)
    return times, torch.stack(errs, -1), torch.stack(comms, -1)


# =========================================================================== Proposition 6.1


def _check_heads(W1: Tensor, W2: Tensor) -> tuple[Tensor, Tensor]:
    W1 = _check_matrix("W1", W1)
    W2 = _check_matrix("W2", W2)
    if W1.shape[-2:] != W2.shape[-2:]:
        raise ValueError(f"the two heads must have the same shape [d, d_k], got {tuple(W1.shape)} and {tuple(W2.shape)}")
    return tuple(_promote(W1, W2))


def head_penalty_split(W1: Tensor, W2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The split (D.2) behind Proposition 6.1: ``||W1||² + ||W2||² = ½||S||² + ½||W1 − W2||²``, ``S = W1 + W2``.

    Returns ``(total, shared, disagreement)`` = ``(||W1||_F² + ||W2||_F², ½||S||_F², ½||W1 − W2||_F²)``,
    each ``[...]``. Multiplying by ``λ/2`` gives the penalty decomposition (D.4); since ``shared`` is
    fixed by ``S``, weight decay penalises only the disagreement, and (11) ``total >= shared`` holds
    with equality iff ``W1 = W2 = S/2``.
    """
    W1, W2 = _check_heads(W1, W2)
    sq = lambda X: X.square().sum(dim=(-2, -1))  # noqa: E731
    return sq(W1) + sq(W2), 0.5 * sq(W1 + W2), 0.5 * sq(W1 - W2)


def project_fixed_sum(W1: Tensor, W2: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal projection of ``(W1, W2)`` onto ``{W1 + W2 = S}``: ``W_i ← W_i − ½(W1 + W2 − S)``."""
    W1, W2 = _check_heads(W1, W2)
    S = _check_matrix("S", S)
    if S.shape[-2:] != W1.shape[-2:]:
        raise ValueError(f"S must have the heads' shape {tuple(W1.shape[-2:])}, got {tuple(S.shape)}")
    W1, W2, S = _promote(W1, W2, S)
    excess = 0.5 * (W1 + W2 - S)
    return W1 - excess, W2 - excess


def constrained_head_descent(
    W1: Tensor, W2: Tensor, *, lam: float, eta: float, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Projected gradient descent on ``(λ/2)(||W1||² + ||W2||²)`` with ``W1 + W2 = S`` fixed (Prop. 6.1).

    ``S`` is the sum of the starting heads (they are first projected onto it, a no-op). Each step is
    ``W_i ← W_i − ηλ W_i`` followed by :func:`project_fixed_sum`; the difference ``W1 − W2`` is then
    multiplied by exactly ``(1 − ηλ)`` per step, the Euler discretisation of ``e^{−λt}``.

    Returns:
        ``(W1, W2, diff)`` with the final heads and ``diff = ||W1 − W2||_F`` along the way ``[..., steps+1]``.
    """
    W1, W2 = _check_heads(W1, W2)
    lam = _check_positive("lam", lam)
    eta = _check_positive("eta", eta)
    steps = _as_int("steps", steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    S = W1 + W2
    diffs = [_frob(W1 - W2)]
    for _ in range(steps):
        W1, W2 = project_fixed_sum(W1 - eta * lam * W1, W2 - eta * lam * W2, S)
        diffs.append(_frob(W1 - W2))
    return W1, W2, torch.stack(diffs, -1)


def depth_comparison(deep: tuple[float, float], shallow: tuple[float, float]) -> dict:
    """The paper's depth claim (§7.1) on two ``(mean, sd)`` summaries over seeds of the commutator: is the deeper
    model's obstruction ``larger`` (a larger mean) and ``more_stable`` (a smaller coefficient of variation
    ``sd / mean``)? Returns both verdicts and both coefficients (``cv_deep``, ``cv_shallow``). Means must be
    positive (the commutator is a norm, and a zero mean leaves the coefficient undefined)."""
    (m_deep, s_deep), (m_shallow, s_shallow) = (tuple(float(x) for x in pair) for pair in (deep, shallow))
    if not all(math.isfinite(x) for x in (m_deep, s_deep, m_shallow, s_shallow)):
        raise ValueError("means and standard deviations must be finite")
    if m_deep <= 0 or m_shallow <= 0 or s_deep < 0 or s_shallow < 0:
        raise ValueError(f"need positive means and non-negative sds, got {deep} and {shallow}")
    cv_deep, cv_shallow = s_deep / m_deep, s_shallow / m_shallow
    return {"larger": m_deep > m_shallow, "more_stable": cv_deep < cv_shallow, "cv_deep": cv_deep, "cv_shallow": cv_shallow}
