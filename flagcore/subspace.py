"""Subspaces of R^d as tensors: bases, projectors, principal angles, intersections, Haar frames.

The geometry core of the book. Every function here is pure, batched over leading dimensions
where the docstring says so, and device/dtype agnostic: it computes in the dtype and on the device
of its input (integer input is promoted to float64, the theory default). A subspace is always
given by *any* spanning matrix ``[..., d, k]`` (its column space); functions that need an
orthonormal basis compute one with a rank-revealing SVD.

Tolerances
----------
Two tolerances appear, both documented and overridable:

* **rank** (``orthonormal_basis``): a singular value counts when ``s > rtol * s_max`` with the
  default ``rtol = max(d, k) * eps(dtype)`` (the convention of ``numpy.linalg.matrix_rank``).
* **angle** (``intersection_dim``, ``alignment_level``): a principal angle counts as zero when
  ``sin(theta) <= rtol`` with the default ``rtol = sqrt(eps(dtype))`` (1.5e-8 in float64,
  3.5e-4 in float32): far above round-off of well-conditioned inputs, far below the angles of
  generic subspaces.

This module depends on nothing else in flagcore (house plan: it is the bottom layer).
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AlignmentLevel",
    "AlignmentReport",
    "alignment_level",
    "alignment_report",
    "angle_tolerance",
    "frobenius_overlap",
    "haar_frames",
    "intersection_dim",
    "orthonormal_basis",
    "principal_angles",
    "projector",
    "rank_tolerance",
]


# --------------------------------------------------------------------------- validation


def _as_real_float(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} is complex; flagcore works with real subspaces of R^d")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return x


def _check_matrix(name: str, x: Tensor, *, batched: bool = True) -> Tensor:
    """Validate a spanning matrix ``[..., d, k]``; return it as a real floating tensor."""
    x = _as_real_float(name, x)
    if x.ndim < 2 or (not batched and x.ndim != 2):
        want = "[..., d, k]" if batched else "[d, k]"
        raise ValueError(f"{name} must have shape {want} (columns span the subspace), got {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name} has ambient dimension d = 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _as_int(name: str, value: object) -> int:
    """An integer argument (Python or numpy int); a TypeError for anything else, bool included."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _check_same_ambient(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(
            f"{a_name} and {b_name} live in different ambient spaces: "
            f"d = {a.shape[-2]} vs d = {b.shape[-2]} (shapes {tuple(a.shape)} and {tuple(b.shape)})"
        )


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _coarsest_dtype(*xs: Tensor) -> torch.dtype:
    """The input dtype with the largest machine epsilon: default tolerances must respect the least
    precise input, or its rounding noise would count as rank or as a non-zero angle."""
    return max((x.dtype for x in xs), key=lambda dt: torch.finfo(dt).eps)


# --------------------------------------------------------------------------- tolerances


def rank_tolerance(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> float:
    """Default relative rank tolerance ``max(d, k) * eps`` (numpy.linalg.matrix_rank's convention)."""
    return max(int(shape[-2]), int(shape[-1]), 1) * torch.finfo(dtype).eps


def angle_tolerance(dtype: torch.dtype) -> float:
    """Default tolerance on ``sin(theta)`` below which a principal angle counts as zero: ``sqrt(eps)``."""
    return math.sqrt(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- bases and projectors


def orthonormal_basis(W: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis of the column space of ``W``.

    Args:
        W: ``[..., d, k]`` spanning matrix (any rank; need not be orthonormal).
        rtol: singular values ``s <= rtol * s_max`` are treated as zero. Default
            ``max(d, k) * eps(dtype)`` (see :func:`rank_tolerance`).

    Returns:
        ``[..., d, r]`` with orthonormal columns, ``r`` the numerical rank; the leading left singular
        vectors, so the basis is ordered by decreasing singular value.

    Raises:
        ValueError: bad shape, NaN/Inf, or (batched input) a rank that differs across the batch,
            since the result must be one rectangular tensor.
    """
    W = _check_matrix("W", W)
    if rtol is None:
        rtol = rank_tolerance(W.shape, W.dtype)
    if rtol < 0:
        raise ValueError(f"rtol must be non-negative, got {rtol}")
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    if S.shape[-1] == 0:
        return U[..., :0]
    threshold = rtol * S[..., :1]
    ranks = (S > threshold).sum(dim=-1)
    r = int(ranks.reshape(-1)[0]) if ranks.numel() else 0
    if ranks.numel() and not bool((ranks == r).all()):
        raise ValueError(
            f"the numerical rank differs across the batch (min {int(ranks.min())}, max {int(ranks.max())}); "
            "call orthonormal_basis on each item separately"
        )
    return U[..., :r]


def projector(A: Tensor, rtol: float | None = None) -> Tensor:
    """Orthogonal projector ``Q Q^T`` onto col(A), ``[..., d, d]``."""
    Q = orthonormal_basis(A, rtol)
    return Q @ Q.transpose(-1, -2)


# --------------------------------------------------------------------------- angles and overlaps


def _bases(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    A = _check_matrix("A", A)
    B = _check_matrix("B", B)
    _check_same_ambient("A", A, "B", B)
    # Rank each input at its own precision, then compute in the common (wider) dtype.
    return _common_dtype(orthonormal_basis(A), orthonormal_basis(B))


#: A batch of large matrices is processed in chunks of about this many bytes per input: each stage
#: (SVD, products, SVD of the residual) of a whole batch of 768 x 64 matrices streams tens of MB
#: through memory, and lost to a loop over the items, whose one item stays in cache (issue 15).
_CHUNK_BYTES = 4 * 2**20


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles between col(A) and col(B), in radians, ascending.

    ``A`` and ``B`` are any spanning matrices ``[..., d, kA]``, ``[..., d, kB]`` (leading dims
    broadcast). Returns ``[..., min(rA, rB)]`` with ``rA``, ``rB`` the numerical ranks.

    Small angles are computed from sines, large ones from cosines (Björck & Golub 1973, the rule
    of ``scipy.linalg.subspace_angles``): ``arccos`` of a singular value near 1 loses half the
    digits, so an angle of 1e-10 would come out as 0 or ~1e-8.
    """
    A = _check_matrix("A", A)
    B = _check_matrix("B", B)
    _check_same_ambient("A", A, "B", B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    n = math.prod(batch)
    step = max(1, _CHUNK_BYTES // (A.shape[-2] * max(A.shape[-1], B.shape[-1], 1) * A.element_size()))
    if n <= step:
        return _principal_angles(A, B)
    A = A.expand(*batch, *A.shape[-2:]).reshape(n, *A.shape[-2:])
    B = B.expand(*batch, *B.shape[-2:]).reshape(n, *B.shape[-2:])
    parts = [_principal_angles(A[i : i + step], B[i : i + step]) for i in range(0, n, step)]
    if len({part.shape[-1] for part in parts}) > 1:
        raise ValueError("the numerical rank differs across the batch; call principal_angles on each item separately")
    return torch.cat(parts).reshape(*batch, -1)


def _principal_angles(A: Tensor, B: Tensor) -> Tensor:
    QA, QB = _bases(A, B)
    if QA.shape[-1] < QB.shape[-1]:  # the sine formula needs the larger subspace first
        QA, QB = QB, QA
    M = QA.transpose(-1, -2) @ QB  # [..., rA, rB], rA >= rB
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # descending: smallest angle first
    residual = QB - QA @ M  # (I - P_A) Q_B; its singular values are the sines
    sin = torch.linalg.svdvals(residual).clamp(0.0, 1.0).flip(-1)  # rB values (rB <= d), ascending
    from_cos = torch.arccos(cos)
    from_sin = torch.arcsin(sin)
    return torch.where(from_cos < math.pi / 4, from_sin, from_cos)


def frobenius_overlap(A: Tensor, B: Tensor) -> Tensor:
    """``||Q_A^T Q_B||_F^2 = tr(P_A P_B) = sum_i cos^2(theta_i)``, batched; 0-dim tensor for one pair.

    Only O(d)-invariant (Corollary 4.2): a general GL(d) change of coordinates changes it.
    """
    QA, QB = _bases(A, B)
    return (QA.transpose(-1, -2) @ QB).square().sum(dim=(-2, -1))


def intersection_dim(A: Tensor, B: Tensor, rtol: float | None = None) -> int | Tensor:
    """``dim(col(A) ∩ col(B))``: the number of principal angles with ``sin(theta) <= rtol``.

    Args:
        rtol: default ``sqrt(eps)`` of the less precise input (:func:`angle_tolerance`). It is a
            relative tolerance: ``sin(theta) = ||(I - P_A) b|| / ||b||`` for the principal vector ``b``.

    Returns:
        ``int`` for a single pair of 2-D inputs; an ``int64`` tensor ``[...]`` for batched input.

    This is the GL(d)-invariant of a pair of subspaces (Theorem 4.1): it is unchanged by any
    invertible change of coordinates, unlike the angles themselves.
    """
    theta = principal_angles(A, B)
    tol = angle_tolerance(_coarsest_dtype(_as_real_float("A", A), _as_real_float("B", B))) if rtol is None else rtol
    if tol < 0:
        raise ValueError(f"rtol must be non-negative, got {tol}")
    count = (torch.sin(theta) <= tol).sum(dim=-1)
    return int(count) if count.ndim == 0 else count


# --------------------------------------------------------------------------- random subspaces


def haar_frames(
    d: int,
    k: int,
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` independent Haar-distributed orthonormal ``k``-frames in R^d: ``[n, d, k]``.

    QR of a Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri 2007), which
    makes the frame exactly Haar on the Stiefel manifold, hence its span Haar on Gr(k, d).
    Independent frames, not blocks of one orthogonal matrix: blocks would be mutually orthogonal.
    """
    d, k, n = (_as_int(name, value) for name, value in (("d", d), ("k", k), ("n", n)))
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d, got k={k}, d={d}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if generator is not None and device is None:
        device = generator.device
    G = torch.randn(n, d, k, generator=generator, dtype=dtype, device=device)
    Q, R = torch.linalg.qr(G, mode="reduced")
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


# --------------------------------------------------------------------------- alignment levels


class AlignmentLevel(enum.IntEnum):
    """Definition 3.1: the alignment of adjacent layers, nested (3 ⇒ 2 ⇒ 1 ⇒ 0)."""

    GENERAL = 0  #: no relation between U_l and V_{l+1}
    FLAG = 1  #: one subspace contains the other
    SUBSPACE = 2  #: U_l = V_{l+1} as subspaces (equal ranks)
    STRICT = 3  #: U_l = V_{l+1} S column by column, S a diagonal sign matrix


@dataclass(frozen=True)
class AlignmentReport:
    """What :func:`alignment_level` decided and the numbers it decided on."""

    level: AlignmentLevel
    rank_prev: int  #: r_l = rank W_l
    rank_next: int  #: r_{l+1} = rank W_{l+1}
    angles: Tensor  #: principal angles between U_l and V_{l+1}, ascending
    strict_defined: bool  #: both spectra simple, so "column by column" has a meaning
    strict_defect: float  #: max_i sin∠(u_i, v_i); nan when not strict_defined or ranks differ
    rtol: float  #: the tolerance used


def _simple_spectrum(s: Tensor, rtol: float) -> bool:
    """Distinct singular values: every relative gap (s_i - s_{i+1}) / s_i exceeds rtol.

    The angle tolerance doubles as the gap tolerance: by the Davis–Kahan bound a singular vector is
    determined to about eps / gap, so a relative gap below rtol leaves its angle undetermined at rtol.
    """
    if s.numel() < 2:
        return True
    gaps = (s[:-1] - s[1:]) / s[:-1]
    return bool((gaps > rtol).all())


def alignment_report(W_prev: Tensor, W_next: Tensor, rtol: float | None = None) -> AlignmentReport:
    """Alignment of two adjacent layers, with the evidence. See :func:`alignment_level`."""
    W_prev = _check_matrix("W_prev", W_prev, batched=False)
    W_next = _check_matrix("W_next", W_next, batched=False)
    if W_prev.shape[0] != W_next.shape[1]:
        raise ValueError(
            "layers do not compose: W_prev maps into R^{%d} but W_next takes R^{%d} "
            "(expected W_prev [d_l, d_{l-1}] and W_next [d_{l+1}, d_l])" % (W_prev.shape[0], W_next.shape[1])
        )
    tol = angle_tolerance(_coarsest_dtype(W_prev, W_next)) if rtol is None else rtol
    if tol < 0:
        raise ValueError(f"rtol must be non-negative, got {tol}")

    # Compact SVDs: U_l = left singular subspace of W_l, V_{l+1} = right singular subspace of W_{l+1}.
    # Each layer is ranked at its own precision, then both are compared in the common dtype.
    U_prev, s_prev, _ = torch.linalg.svd(W_prev, full_matrices=False)
    _, s_next, Vh_next = torch.linalg.svd(W_next, full_matrices=False)
    r_prev = int((s_prev > rank_tolerance(W_prev.shape, W_prev.dtype) * s_prev[:1]).sum()) if s_prev.numel() else 0
    r_next = int((s_next > rank_tolerance(W_next.shape, W_next.dtype) * s_next[:1]).sum()) if s_next.numel() else 0
    dtype = torch.promote_types(W_prev.dtype, W_next.dtype)
    U_prev, s_prev, s_next, Vh_next = U_prev.to(dtype), s_prev.to(dtype), s_next.to(dtype), Vh_next.to(dtype)
    if r_prev == 0 or r_next == 0:
        raise ValueError("a zero weight matrix has no singular subspace; alignment is undefined")
    U = U_prev[:, :r_prev]
    V = Vh_next[:r_next].transpose(0, 1)

    angles = principal_angles(U, V)
    nested = bool((torch.sin(angles) <= tol).all())
    level = AlignmentLevel.GENERAL
    if nested:
        level = AlignmentLevel.FLAG
        if r_prev == r_next:
            level = AlignmentLevel.SUBSPACE
    strict_defined = r_prev == r_next and _simple_spectrum(s_prev[:r_prev], tol) and _simple_spectrum(s_next[:r_next], tol)
    strict_defect = float("nan")
    if strict_defined:
        # sin of the angle between u_i and v_i, as ||v_i - <u_i, v_i> u_i|| (stable near 0, unlike
        # 1 - |<u_i, v_i>|, which is quadratic in the angle and would need a different tolerance).
        cosines = (U * V).sum(dim=0)
        strict_defect = float((V - U * cosines).norm(dim=0).max())
        if level == AlignmentLevel.SUBSPACE and strict_defect <= tol:
            level = AlignmentLevel.STRICT
    return AlignmentReport(level, r_prev, r_next, angles, strict_defined, strict_defect, tol)


def alignment_level(W_prev: Tensor, W_next: Tensor, rtol: float | None = None) -> AlignmentLevel:
    """Alignment level (Definition 3.1) between layer ``W_prev = W_l`` and ``W_next = W_{l+1}``.

    ``W_prev`` is ``[d_l, d_{l-1}]`` and ``W_next`` is ``[d_{l+1}, d_l]`` (so ``W_next @ W_prev``
    is defined). With compact SVDs ``W_l = U_l S_l V_l^T``, the levels compare the output
    subspace ``col(U_l)`` of one layer with the input subspace ``col(V_{l+1})`` of the next:

    * 1 (FLAG): one contains the other (all principal angles zero);
    * 2 (SUBSPACE): they are equal (and so are the ranks);
    * 3 (STRICT): ``U_l = V_{l+1} S`` column by column, ``S = diag(±1)`` (the SVD sign gauge):
      every ``sin∠(u_i, v_i) <= rtol``.

    Level 3 is decided only when both spectra are simple; with a repeated singular value the
    singular bases are not unique, "column by column" has no meaning, and at most Level 2 is
    returned (``alignment_report(...).strict_defined`` is then False). An angle counts as zero when
    its sine is ``<= rtol`` (default ``sqrt(eps)``). Returns an :class:`AlignmentLevel` (an int).
    """
    return alignment_report(W_prev, W_next, rtol).level
