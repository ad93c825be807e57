"""Dimension of neuromanifolds: the closed forms of Henry, Marchetti & Kohn (2025) and a Jacobian-rank estimator.

* :func:`expected_dimension` evaluates Eq. (7) (one lightning layer), Theorem 3.9 (one softmax layer),
  Eq. (14) (deep lightning, Corollary 3.8) and Eq. (16) (deep softmax, Conjecture 3.10), and refuses
  configurations outside the hypotheses (see the book's lightning appendix).
* :func:`jacobian_rank` is generic: the numerical rank of ``params -> f(params, inputs)`` for ANY
  parametrisation ``f``, with forward-mode autodiff (``torch.func.jvp``, vmapped over tangent
  directions), row-normalised Jacobian, an explicit relative tolerance and the singular-value gap at
  the cut, so that a reader can see whether the rank is unambiguous.
* :func:`estimate_dimension` applies it to the attention networks of :mod:`flagcore.lightning` at a
  random parameter on random inputs ("stochastic finite elements" and §8.0), with the
  attention networks' Jacobian propagated in closed form (:func:`attention_jacobian`, checked against
  the generic :func:`jacobian_forward` in the tests) and a **saturation certificate**: the rank is
  recomputed without the last few inputs, and must not change.

Why saturation certifies the number of inputs: let ``K_N`` be the kernel of the Jacobian restricted to
``N`` inputs. ``K_{N+1} <= K_N``, and if ``K_N`` is larger than the kernel on all inputs, some tangent
``v in K_N`` moves the output at some input, so (the output being real-analytic in the input) at almost
every input; a generic new input then removes ``v``, and the rank grows. Hence, for generic inputs,
``rank(N - h) == rank(N)`` for some ``h >= 1`` implies that ``rank(N - h)`` already equals the rank on
all inputs, i.e. the dimension. With too few inputs, the rank still grows from ``N - h`` to ``N``, and
the estimate reports ``saturated = False`` (not certified) instead of silently returning a low rank.

Why this recipe: the authors' public code loops over the ``N t d_l`` outputs with one
backward pass each, in float32, and uses ``matrix_rank``'s default tolerance ``max(m, n) eps_32``;
that tolerance (about 1e-3 at Figure 3 size) is above the true smallest singular values (about 1e-4
relative), which makes it under-estimate at large widths. Here: float64, forward mode (parameters are
far fewer than outputs), ``rtol = 1e-11`` by default, and the gap ``sigma_r / sigma_{r+1}`` reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .lightning import _check_dims, flatten_weights, parameter_count, random_inputs, random_weights

__all__ = [
    "DEFAULT_RTOL",
    "DimensionEstimate",
    "attention_jacobian",
    "estimate_dimension",
    "expected_dimension",
    "jacobian_forward",
    "jacobian_rank",
    "rank_from_jacobian",
]

#: Default relative rank tolerance for float64 Jacobians: four orders of magnitude above their round-off
#: floor (relative singular values ~1e-16 to 1e-15 at the book's sizes), and below the smallest true singular
#: values seen in the book's experiments (~2e-10 relative, for depth-4 lightning networks, whose degree-81
#: outputs are badly scaled; 1e-9 would cut those).
DEFAULT_RTOL = 1e-11

#: A gap sigma_r / sigma_{r+1} below this makes an estimate inconclusive.
CONCLUSIVE_GAP = 1e3


# --------------------------------------------------------------------------- closed forms


def expected_dimension(d: Sequence[int], a: Sequence[int], normalized: bool = False) -> int:
    """Dimension of the neuromanifold ``M_{d,a}`` predicted by the paper, for widths ``d = (d_0, ..., d_l)``
    and query/key widths ``a = (a_1, ..., a_l)`` (the formulas assume ``t >= 2`` tokens, ``t >= 3`` for depth >= 2).

    * ``l = 1``, lightning — Eq. (7), Corollary 3.3: ``abar (2 d - abar) + d d' - 1`` with
      ``abar = min(a, d)``. Hypothesis: ``abar >= 2`` or ``d' >= 2``.
    * ``l = 1``, softmax — Theorem 3.9 (generic fibers are points): ``abar (2 d - abar) + d d'``.
    * ``l >= 2``, lightning — Eq. (14), Corollary 3.8:
      ``sum_i [a_i (2 d_{i-1} - a_i) + d_i d_{i-1}] - (l - 1) delta^2 - l``.
      Hypotheses: bottleneck ``d_1 = ... = d_{l-1} = delta <= min(d_0, d_l)`` and ``2 <= a_i <= d_{i-1}``.
    * ``l >= 2``, softmax — Eq. (16) = Eq. (14) + ``l``; it rests on Conjecture 3.10 (same hypotheses).

    Raises:
        ValueError: non-positive widths, mismatched lengths, or a violated hypothesis (named in the message).
        TypeError: non-integer widths.
    """
    d, a = _check_dims(d, a)
    l = len(a)
    if l == 1:
        d0, d1 = d
        ab = min(a[0], d0)
        base = ab * (2 * d0 - ab) + d0 * d1
        if normalized:
            return base
        if ab < 2 and d1 < 2:
            raise ValueError(
                f"Eq. (7) (Corollary 3.3) assumes min(a, d) >= 2 or d' >= 2; got d = {d0}, d' = {d1}, a = {a[0]} "
                "(then rank-1 fibers of Theorem 3.2 case 1 are not negligible)"
            )
        return base - 1
    hidden = d[1:-1]
    delta = hidden[0]
    if any(h != delta for h in hidden) or delta > d[0] or delta > d[-1]:
        raise ValueError(
            f"Eq. ({16 if normalized else 14}) assumes the bottleneck d_1 = ... = d_(l-1) = delta <= min(d_0, d_l); "
            f"got d = {d}"
        )
    for i in range(l):
        if a[i] > d[i]:
            raise ValueError(
                f"Eq. ({16 if normalized else 14}) (Corollary 3.8) assumes a_i <= d_(i-1); got a_{i + 1} = {a[i]} > d_{i} = {d[i]}"
            )
        if a[i] < 2:
            raise ValueError(
                f"Eq. ({16 if normalized else 14}) (Theorem 3.7 genericity) assumes a_i >= 2 for every layer; got a_{i + 1} = {a[i]}"
            )
    total = sum(a[i] * (2 * d[i] - a[i]) + d[i + 1] * d[i] for i in range(l)) - (l - 1) * delta**2
    return total if normalized else total - l


# --------------------------------------------------------------------------- the estimator


@dataclass(frozen=True)
class DimensionEstimate:
    """The numerical rank of a Jacobian and the evidence for it.

    Attributes:
        rank: number of singular values ``> rtol * sigma_max`` of the row-normalised Jacobian.
        singular_values: all singular values, descending (float64, CPU).
        gap: ``sigma_rank / sigma_{rank+1}`` (``inf`` when no singular value was cut, or the next one is
            exactly 0). A gap of 1e3 or more is read as an unambiguous rank.
        n_params: number of parameters (columns of the Jacobian).
        n_outputs: number of output coordinates (rows).
        rtol: the relative tolerance used.
        samples: number of inputs ``N`` behind the rows (``None`` when the map has no sampled inputs).
        holdout: number of inputs left out for the saturation check (``None``: no check was made).
        holdout_rank: rank of the Jacobian on the first ``samples - holdout`` inputs, same tolerance
            (``None``: no check was made).
    """

    rank: int
    singular_values: Tensor
    gap: float
    n_params: int
    n_outputs: int
    rtol: float
    samples: int | None = None
    holdout: int | None = None
    holdout_rank: int | None = None

    @property
    def conclusive(self) -> bool:
        """``gap >= 1e3``: the cut sits in a clear spectral gap."""
        return self.gap >= CONCLUSIVE_GAP

    @property
    def saturated(self) -> bool | None:
        """``holdout_rank == rank``: leaving the last ``holdout`` inputs out does not lower the rank, so (for
        generic inputs) the inputs already see the whole tangent space; ``None`` when no check was made."""
        if self.holdout_rank is None:
            return None
        return self.holdout_rank == self.rank

    @property
    def certified(self) -> bool:
        """The estimate can be read as the dimension: :attr:`conclusive` (gap >= 1e3) and not shown to be
        unsaturated (:attr:`saturated` is ``True``, or ``None`` for maps without sampled inputs)."""
        return self.conclusive and self.saturated is not False

    @property
    def largest_gap_rank(self) -> int:
        """Tolerance-free cross-check: the cut at the largest ratio ``sigma_k / sigma_{k+1}``, where values
        below the float64 noise floor ``max(m, n) * eps * sigma_max`` are clamped to it and one value at the
        floor is appended (so a full-rank spectrum cuts at its end). Agrees with :attr:`rank` when the
        tolerance sits in the spectrum's widest gap."""
        s = self.singular_values.to(torch.float64)
        if s.numel() == 0 or s[0] == 0:
            return 0
        floor = max(self.n_outputs, self.n_params) * torch.finfo(torch.float64).eps * s[0]
        s = torch.cat([s.clamp(min=floor), floor.reshape(1)])
        return int(torch.argmax(s[:-1] / s[1:])) + 1

    @property
    def relative_singular_values(self) -> Tensor:
        """``sigma / sigma_max``."""
        s = self.singular_values
        return s / s[0] if s.numel() and s[0] > 0 else s


def _check_rtol(rtol: float | None) -> float:
    if rtol is None:
        return DEFAULT_RTOL
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol}")
    return float(rtol)


def jacobian_forward(f: Callable[[Tensor, Tensor], Tensor], params: Tensor, inputs, chunk_size: int | None = 128) -> Tensor:
    """Jacobian ``[n_outputs, n_params]`` of ``theta -> f(theta, inputs).reshape(-1)`` by forward mode.

    One ``torch.func.jvp`` per parameter direction, vmapped over the directions (in chunks of
    ``chunk_size`` directions at a time, default 128: it bounds memory and, on CPU, keeps the batched
    intermediates in cache; ``None`` = all at once). ``params`` must be a 1-D tensor.
    """
    if not isinstance(params, Tensor):
        raise TypeError(f"params must be a 1-D torch.Tensor, got {type(params).__name__}")
    if params.ndim != 1 or params.numel() == 0:
        raise ValueError(f"params must be a non-empty 1-D tensor, got shape {tuple(params.shape)}")
    if not callable(f):
        raise TypeError("f must be a callable f(params, inputs)")

    def g(theta: Tensor) -> Tensor:
        return f(theta, inputs).reshape(-1)

    def column(tangent: Tensor) -> Tensor:
        return jvp(g, (params,), (tangent,))[1]

    n = params.numel()
    eye = torch.eye(n, dtype=params.dtype, device=params.device)
    step = n if chunk_size is None else max(1, int(chunk_size))
    with warnings.catch_warnings():
        # torch's first forward-mode call scripts its jvp decompositions with the deprecated
        # torch.jit.script (a torch-internal DeprecationWarning, not about this code): silence only that.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        cols = [vmap(column)(eye[k : k + step]) for k in range(0, n, step)]
    return torch.cat(cols, dim=0).transpose(0, 1)


def _normalized(J: Tensor, normalize_rows: bool) -> Tensor:
    if not isinstance(J, Tensor) or J.ndim != 2:
        raise ValueError("J must be a 2-D tensor [n_outputs, n_params]")
    if not bool(torch.isfinite(J).all()):
        raise ValueError("the Jacobian contains NaN or Inf (overflow in the parametrisation?)")
    J = J.to(torch.float64)
    if normalize_rows:
        norms = torch.linalg.vector_norm(J, dim=1, keepdim=True)
        J = J / torch.where(norms > 0, norms, torch.ones_like(norms))
    return J


def _reduce(J: Tensor) -> Tensor:
    """A matrix with the singular values of ``J`` and at most ``n`` rows: ``R`` of ``J = Q R`` when tall."""
    if J.shape[0] > J.shape[1]:
        return torch.linalg.qr(J, mode="r")[1]
    return J


def _from_spectrum(s: Tensor, rtol: float, n: int, m: int, **extra) -> DimensionEstimate:
    if s.numel() == 0 or s[0] == 0:
        return DimensionEstimate(0, s, math.inf, n, m, rtol, **extra)
    rank = int((s > rtol * s[0]).sum())
    if rank == s.numel() or s[rank] == 0:
        gap = math.inf
    else:
        gap = float(s[rank - 1] / s[rank])
    return DimensionEstimate(rank, s, gap, n, m, rtol, **extra)


def _rank(s: Tensor, rtol: float) -> int:
    return 0 if s.numel() == 0 or s[0] == 0 else int((s > rtol * s[0]).sum())


def rank_from_jacobian(J: Tensor, rtol: float | None = None, normalize_rows: bool = True) -> DimensionEstimate:
    """Numerical rank of a Jacobian ``[n_outputs, n_params]`` with its spectral gap (float64 SVD).

    Rows are scaled to unit norm first (rank-preserving; it removes the spread of output magnitudes).
    rank = #{sigma > rtol * sigma_max}; gap = sigma_rank / sigma_{rank+1}.
    """
    rtol = _check_rtol(rtol)
    J = _normalized(J, normalize_rows)
    m, n = J.shape
    s = torch.linalg.svdvals(_reduce(J)).cpu()
    return _from_spectrum(s, rtol, n, m)


def _rank_with_holdout(J: Tensor, rows_kept: int, rtol: float, samples: int, holdout: int) -> DimensionEstimate:
    """:func:`rank_from_jacobian` of ``J`` (rows normalised) plus the rank of its first ``rows_kept`` rows
    (the Jacobian on the first ``samples - holdout`` inputs). The QR factor of the kept block is reused:
    ``J = [J_1; J_2]`` has the singular values of ``[R_1; J_2]``."""
    J = _normalized(J, True)
    m, n = J.shape
    R1 = _reduce(J[:rows_kept])
    s1 = torch.linalg.svdvals(R1).cpu() if rows_kept > 0 else J.new_zeros(0).cpu()
    s = torch.linalg.svdvals(_reduce(torch.cat([R1, J[rows_kept:]]))).cpu()
    return _from_spectrum(s, rtol, n, m, samples=samples, holdout=holdout, holdout_rank=_rank(s1, rtol))


def jacobian_rank(
    f: Callable[[Tensor, Tensor], Tensor],
    params: Tensor,
    inputs,
    rtol: float | None = None,
    chunk_size: int | None = 128,
) -> DimensionEstimate:
    """Rank of the differential of ``theta -> f(theta, inputs)`` at ``params``, for ANY parametrisation.

    ``f(params, inputs)`` returns a tensor of any shape (flattened); ``params`` is 1-D. The Jacobian is
    computed by forward mode (:func:`jacobian_forward`), rows normalised, and ranked with
    ``rtol`` (default :data:`DEFAULT_RTOL` = 1e-11, meant for float64) by :func:`rank_from_jacobian`.
    At a generic parameter and with enough generic inputs this rank is the dimension of the image
    ("neuromanifold") restricted to those inputs.
    """
    return rank_from_jacobian(jacobian_forward(f, params, inputs, chunk_size), rtol)


def attention_jacobian(theta: Tensor, X: Tensor, d: Sequence[int], a: Sequence[int], normalized: bool = False) -> Tensor:
    """Jacobian ``[N d_l t, P]`` of ``theta -> deep_network(X, split_parameters(theta, d, a), normalized)``
    (flattened row-major from ``[N, d_l, t]``; columns in :func:`~flagcore.lightning.flatten_weights` order),
    by forward mode written out for the attention layers: all ``P`` tangents are pushed through the
    network at once as one tensor, layer by layer, with the product rule

    * ``d(M Z) = Mdot Z + M dZ`` for ``M = Q, K, V`` (``Mdot`` a unit matrix for the layer's own entries),
    * ``dS = d(KZ)^T QZ + (KZ)^T d(QZ)`` for the scores ``S[j, i] = <Q z_i, K z_j>``,
    * ``dW = W * (dS - sum_j W dS)`` through the softmax over the key index ``j`` (``dW = dS`` without it),
    * ``d(out) = d(VZ) W + VZ dW``.

    Same numbers as :func:`jacobian_forward` on that map (to round-off), without per-operation autodiff
    overhead: the tangents of layer ``i``'s own entries start at layer ``i``. Memory: about ten tensors of
    ``max(d) * P * N * t`` entries. ``X: [N, d_0, t]`` and ``theta`` (1-D) share dtype and device.
    """
    d, a = _check_dims(d, a)
    if not isinstance(X, Tensor) or X.ndim != 3 or X.shape[1] != d[0]:
        raise ValueError(f"X must be a tensor [N, d_0 = {d[0]}, t], got {getattr(X, 'shape', type(X).__name__)}")
    if not isinstance(theta, Tensor) or theta.ndim != 1 or theta.numel() != parameter_count(d, a):
        raise ValueError(f"theta must be a 1-D tensor of length {parameter_count(d, a)}")
    N, _, t = X.shape
    kw = {"dtype": X.dtype, "device": X.device}
    Z = X  # activations [N, d, t]
    T = X.new_zeros((N, d[0], 0, t))  # tangents [N, d, p, t]: no direction moves the input
    k = 0
    for i in range(len(a)):
        di, do, ai = d[i], d[i + 1], a[i]
        Q = theta[k : k + ai * di].reshape(ai, di)
        K = theta[k + ai * di : k + 2 * ai * di].reshape(ai, di)
        V = theta[k + 2 * ai * di : k + 2 * ai * di + do * di].reshape(do, di)
        k += 2 * ai * di + do * di
        p0 = T.shape[2]
        QZ, KZ, VZ = Q @ Z, K @ Z, V @ Z  # [N, ., t]
        KZt = KZ.transpose(1, 2)  # [N, t(j), a]
        S = KZt @ QZ  # scores [N, t(j), t(i)] = <Q z_i, K z_j>
        W = torch.softmax(S, dim=1) if normalized else S
        # dS [N, t(j), p', t(i)] for the earlier layers' directions, then this layer's Q and K entries E_rc
        parts = []
        if p0:
            Tf = T.reshape(N, di, p0 * t)
            dQZ, dKZ = Q @ Tf, K @ Tf  # [N, a, p0 t]
            first = (dKZ.transpose(1, 2) @ QZ).view(N, p0, t, t).transpose(1, 2)  # d(KZ)^T QZ
            parts.append((KZt @ dQZ).view(N, t, p0, t) + first)  # + (KZ)^T d(QZ)
        parts.append((KZt[:, :, :, None, None] * Z[:, None, None, :, :]).reshape(N, t, ai * di, t))  # K z_j . E_rc z_i
        parts.append((Z.transpose(1, 2)[:, :, None, :, None] * QZ[:, None, :, None, :]).reshape(N, t, ai * di, t))
        dS = torch.cat(parts, 2)
        if normalized:  # softmax over the key index j
            Wb = W[:, :, None, :]
            dW = Wb * (dS - (Wb * dS).sum(1, keepdim=True))
        else:
            dW = dS
        pq = dS.shape[2]
        Tn = (VZ @ dW.view(N, t, pq * t)).view(N, do, pq, t)  # VZ dW
        if p0:
            Tn[:, :, :p0] += ((V @ Tf).view(N, do * p0, t) @ W).view(N, do, p0, t)  # + d(VZ) W
        ZW = Z @ W  # this layer's V entries E_rc: E_rc Z W
        own_v = (torch.eye(do, **kw)[None, :, :, None, None] * ZW[:, None, None, :, :]).reshape(N, do, do * di, t)
        T = torch.cat([Tn, own_v], 2)
        Z = VZ @ W
    return T.permute(0, 1, 3, 2).reshape(N * d[-1] * t, T.shape[2])  # rows (n, k, i), like [N, d_l, t]


#: Adaptive sampling (``samples=None``): at most this many doublings of the number of inputs.
MAX_DOUBLINGS = 5


def _holdout(n: int) -> int:
    """Inputs left out for the saturation check: an eighth of them, at least one."""
    return max(1, math.ceil(n / 8))


def estimate_dimension(
    d: Sequence[int],
    a: Sequence[int],
    normalized: bool = False,
    tokens: int = 3,
    samples: int | None = None,
    seed: int = 0,
    rtol: float | None = None,
    input_scale: float | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = 128,
) -> DimensionEstimate:
    """Estimate ``dim M_{d,a}`` (lightning, or softmax with ``normalized=True``) by a Jacobian rank.

    Draws weights with entries ``N(0, 1/d_{i-1})``, then inputs ``[d_0, tokens]`` with entries
    ``N(0, s^2/d_0)`` (``s = input_scale``, default 1 for lightning and 3 for softmax so that the logits
    are O(1)), all in float64 from ``torch.Generator().manual_seed(seed)`` on the CPU, and
    ranks the row-normalised Jacobian of ``theta -> (phi_theta(X^(n)))_n`` (:func:`attention_jacobian`,
    float64 SVD, relative tolerance ``rtol``, gap at the cut) as :func:`jacobian_rank` does.

    Saturation certificate (see the module docstring): the rank is also computed without the last
    ``holdout = max(1, ceil(N / 8))`` inputs; the result's :attr:`~DimensionEstimate.saturated` says
    whether it stayed the same, and :attr:`~DimensionEstimate.certified` combines it with the gap.

    Args:
        d, a: widths ``(d_0, ..., d_l)`` and query/key widths ``(a_1, ..., a_l)``.
        samples: number of inputs ``N``, used as given (a too-small ``N`` is reported as not saturated).
            ``None`` (default): adaptive. Start with ``ceil(2 P / (t d_l))`` inputs plus the holdout
            (twice as many Jacobian rows as parameters ``P``), and double ``N`` (new inputs from the
            same generator) until the estimate is certified, at most ``MAX_DOUBLINGS`` times; raises
            ``RuntimeError`` if it never is.
        rtol: relative singular-value tolerance (default 1e-11).
        device: where to compute (default CPU).
        chunk_size: inputs per Jacobian block (bounds memory; ``None`` = all at once).
    """
    d, a = _check_dims(d, a)
    t = int(tokens)
    if isinstance(tokens, bool) or t != tokens or t < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive integer or None, got {samples!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    rtol = _check_rtol(rtol)
    P = parameter_count(d, a)
    if input_scale is None:
        input_scale = 3.0 if normalized else 1.0
    gen = torch.Generator().manual_seed(int(seed))
    dev = torch.device("cpu") if device is None else torch.device(device)
    theta = flatten_weights(random_weights(d, a, gen)).to(dev)
    rows_per_input = t * d[-1]

    def block(n: int) -> Tensor:
        X = random_inputs(n, d[0], t, gen, scale=input_scale).to(dev)
        step = n if chunk_size is None else chunk_size
        return torch.cat([attention_jacobian(theta, X[k : k + step], d, a, normalized) for k in range(0, n, step)])

    def estimate(J: Tensor, n: int) -> DimensionEstimate:
        h = _holdout(n)
        return _rank_with_holdout(J, (n - h) * rows_per_input, rtol, n, h)

    if samples is not None:
        return estimate(block(samples), samples)
    n = math.ceil(2 * P / rows_per_input)
    n += _holdout(n)
    J = block(n)
    for attempt in range(MAX_DOUBLINGS + 1):
        est = estimate(J, n)
        if est.certified:
            return est
        if attempt < MAX_DOUBLINGS:
            J = torch.cat([J, block(n)])
            n *= 2
    raise RuntimeError(
        f"estimate_dimension: no certified rank for d = {d}, a = {a} with up to {est.samples} inputs "
        f"(rank {est.rank}, rank without the last {est.holdout} inputs {est.holdout_rank}, gap {est.gap:.2e}); "
        "pass samples= explicitly to inspect the spectrum"
    )
