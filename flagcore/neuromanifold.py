"""Dimension of neuromanifolds: the closed forms of Henry, Marchetti & Kohn (2025) and a Jacobian-rank estimator.

* :func:`expected_dimension` evaluates Eq. (7) (one lightning layer), Theorem 3.9 (one softmax layer),
  Eq. (14) (deep lightning, Corollary 3.8) and Eq. (16) (deep softmax, Conjecture 3.10), and refuses
  configurations outside the hypotheses (spec lightning.md §4.2, §6.8, §7.3).
* :func:`jacobian_rank` is generic: the numerical rank of ``params -> f(params, inputs)`` for ANY
  parametrisation ``f``, with forward-mode autodiff (``torch.func.jvp``, vmapped over tangent
  directions), row-normalised Jacobian, an explicit relative tolerance and the singular-value gap at
  the cut, so that a reader can see whether the rank is unambiguous.
* :func:`estimate_dimension` applies it to the attention networks of :mod:`flagcore.lightning` at a
  random parameter on random inputs ("stochastic finite elements", spec §7.4 and §8.0).

Why this recipe (spec §9): the authors' public code loops over the ``N t d_l`` outputs with one
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

from .lightning import _check_dims, _network, _network_tokens, flatten_weights, parameter_count, random_inputs, random_weights, split_parameters

__all__ = ["DEFAULT_RTOL", "DimensionEstimate", "estimate_dimension", "expected_dimension", "jacobian_rank"]

#: Default relative rank tolerance for float64 Jacobians: four orders of magnitude above their round-off
#: floor (relative singular values ~1e-16 to 1e-15 at the book's sizes), and below the smallest true singular
#: values seen in the book's experiments (~2e-10 relative, for depth-4 lightning networks, whose degree-81
#: outputs are badly scaled; 1e-9 would cut those).
DEFAULT_RTOL = 1e-11

#: A gap sigma_r / sigma_{r+1} below this makes an estimate inconclusive (spec §8.0).
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
            exactly 0). A gap of 1e3 or more is read as an unambiguous rank (spec §8.0).
        n_params: number of parameters (columns of the Jacobian).
        n_outputs: number of output coordinates (rows).
        rtol: the relative tolerance used.
    """

    rank: int
    singular_values: Tensor
    gap: float
    n_params: int
    n_outputs: int
    rtol: float

    @property
    def conclusive(self) -> bool:
        """``gap >= 1e3``: the cut sits in a clear spectral gap."""
        return self.gap >= CONCLUSIVE_GAP

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


def rank_from_jacobian(J: Tensor, rtol: float | None = None, normalize_rows: bool = True) -> DimensionEstimate:
    """Numerical rank of a Jacobian ``[n_outputs, n_params]`` with its spectral gap (float64 SVD).

    Rows are scaled to unit norm first (rank-preserving; it removes the spread of output magnitudes).
    rank = #{sigma > rtol * sigma_max}; gap = sigma_rank / sigma_{rank+1}.
    """
    rtol = _check_rtol(rtol)
    if not isinstance(J, Tensor) or J.ndim != 2:
        raise ValueError("J must be a 2-D tensor [n_outputs, n_params]")
    if not bool(torch.isfinite(J).all()):
        raise ValueError("the Jacobian contains NaN or Inf (overflow in the parametrisation?)")
    J = J.to(torch.float64)
    m, n = J.shape
    if normalize_rows:
        norms = torch.linalg.vector_norm(J, dim=1, keepdim=True)
        J = J / torch.where(norms > 0, norms, torch.ones_like(norms))
    if J.shape[0] > 2 * J.shape[1]:  # tall: the singular values of R in J = QR are those of J, and cheaper
        J = torch.linalg.qr(J, mode="r")[1]
    s = torch.linalg.svdvals(J).cpu()
    if s.numel() == 0 or s[0] == 0:
        return DimensionEstimate(0, s, math.inf, n, m, rtol)
    rank = int((s > rtol * s[0]).sum())
    if rank == s.numel() or s[rank] == 0:
        gap = math.inf
    else:
        gap = float(s[rank - 1] / s[rank])
    return DimensionEstimate(rank, s, gap, n, m, rtol)


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

    Draws weights with entries ``N(0, 1/d_{i-1})`` and ``samples`` inputs ``[d_0, tokens]`` with entries
    ``N(0, s^2/d_0)`` (``s = input_scale``, default 1 for lightning and 3 for softmax so that the logits
    are O(1); spec §8.0), all in float64 from ``torch.Generator().manual_seed(seed)`` on the CPU, then
    computes the rank of ``theta -> (phi_theta(X^(n)))_n`` with :func:`jacobian_rank`.

    Args:
        d, a: widths ``(d_0, ..., d_l)`` and query/key widths ``(a_1, ..., a_l)``.
        samples: number of inputs ``N``; default ``max(20, ceil(3 P / (t d_l)))`` for lightning and
            ``max(100, ceil(3 P / (t d_l)))`` for softmax (``P`` = parameter count).
        rtol: relative singular-value tolerance (default 1e-11).
        device: where to compute (default CPU).
    """
    d, a = _check_dims(d, a)
    t = int(tokens)
    if isinstance(tokens, bool) or t != tokens or t < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    P = parameter_count(d, a)
    if samples is None:
        samples = max(100 if normalized else 20, math.ceil(3 * P / (t * d[-1])))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if input_scale is None:
        input_scale = 3.0 if normalized else 1.0
    gen = torch.Generator().manual_seed(int(seed))
    theta = flatten_weights(random_weights(d, a, gen))
    X = random_inputs(samples, d[0], t, gen, scale=input_scale)
    dev = torch.device("cpu") if device is None else torch.device(device)
    theta, X = theta.to(dev), X.to(dev)

    forward = _network_tokens if t <= 8 else _network  # same map; the token layout is faster for small t

    def f(params: Tensor, inputs: Tensor) -> Tensor:
        return forward(inputs, split_parameters(params, d, a), normalized)

    return jacobian_rank(f, theta, X, rtol, chunk_size)
