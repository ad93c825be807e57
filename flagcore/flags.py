"""Flags, relative position of subspaces, and the GL(d) action (flag paper, Sections 3–4, App. B).

A pair ``(V, U)`` in ``Gr(r1, d) x Gr(r2, d)`` is determined up to GL(d) by one number, the
intersection dimension ``k = dim(V ∩ U)``. This module samples pairs in a prescribed stratum
``X_k`` and constructs the group element that carries one pair of a stratum onto another, which
is the constructive content of "GL(d) acts transitively on each stratum".

It also holds the dimension counts of Proposition 3.3 / Corollary 3.5, their
independent numerical check (the rank of the infinitesimal GL(d) action), the
nested parametrisation of a flag, the cumulative drift functional of Corollary 3.4, the orbit dimension of each relative-position stratum and the Plücker embedding used
for the Hilbert–Mumford degeneration.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .subspace import (
    _as_int,
    _check_matrix,
    _check_same_ambient,
    haar_frames,
    intersection_dim,
    orthonormal_basis,
    principal_angles,
    projector,
    rank_tolerance,
)

__all__ = [
    "OrbitRank",
    "adapted_basis",
    "cumulative_drift",
    "drift_orthonormal",
    "flag_dim",
    "flag_dim_blocks",
    "gl_action_matrix",
    "grassmannian_product_dim",
    "nested_flag_bases",
    "nested_flag_parameters",
    "nested_violation",
    "normal_form_pair",
    "one_parameter_subgroup",
    "orbit_rank",
    "parameter_counts",
    "plucker_coordinates",
    "plucker_distance",
    "random_flag",
    "random_pair_with_intersection",
    "removed_dof",
    "stratum_dim",
    "stratum_range",
    "subspace_drift",
    "transport_pair",
]


def stratum_range(d: int, r1: int, r2: int) -> range:
    """Intersection dimensions ``k`` for which the stratum ``X_k`` of Gr(r1,d) x Gr(r2,d) is non-empty.

    ``max(0, r1 + r2 - d) <= k <= min(r1, r2)``: ``V + U`` has dimension ``r1 + r2 - k <= d``.
    """
    d, r1, r2 = _as_int("d", d), _as_int("r1", r1), _as_int("r2", r2)
    if not (1 <= r1 <= d and 1 <= r2 <= d):
        raise ValueError(f"need 1 <= r1, r2 <= d, got r1={r1}, r2={r2}, d={d}")
    return range(max(0, r1 + r2 - d), min(r1, r2) + 1)


def random_pair_with_intersection(
    d: int,
    r1: int,
    r2: int,
    k: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    orthonormal: bool = False,
) -> tuple[Tensor, Tensor]:
    """A random pair ``(V, U)`` with ``dim V = r1``, ``dim U = r2`` and ``dim(V ∩ U) = k`` exactly.

    Built as ``V = span(c, a)`` and ``U = span(c, b)`` from a Gaussian ``d x (r1 + r2 - k)`` matrix
    ``[c | a | b]`` (``c`` has ``k`` columns), which has full column rank with probability 1.
    With ``orthonormal=False`` (default) each basis is further mixed by a random invertible
    matrix, so the returned spanning matrices are not orthonormal, as real weights are not.
    Returns ``V`` ``[d, r1]`` and ``U`` ``[d, r2]``.
    """
    k = _as_int("k", k)
    if k not in stratum_range(d, r1, r2):
        rng = stratum_range(d, r1, r2)
        raise ValueError(f"no pair in Gr({r1},{d}) x Gr({r2},{d}) has intersection dimension {k}; possible: {rng.start}..{rng.stop - 1}")
    G = torch.randn(d, r1 + r2 - k, generator=generator, dtype=dtype)
    common, only_v, only_u = G[:, :k], G[:, k:r1], G[:, r1:]
    V = torch.cat([common, only_v], dim=1)
    U = torch.cat([common, only_u], dim=1)
    if orthonormal:
        return orthonormal_basis(V), orthonormal_basis(U)
    mix_v = torch.randn(r1, r1, generator=generator, dtype=dtype)
    mix_u = torch.randn(r2, r2, generator=generator, dtype=dtype)
    return V @ mix_v, U @ mix_u


def adapted_basis(V: Tensor, U: Tensor, rtol: float | None = None) -> tuple[Tensor, int]:
    """A basis of R^d adapted to the pair ``(V, U)``: ``[ V∩U | V-complement | U-complement | rest ]``.

    Returns ``(B, k)`` with ``B`` an invertible ``[d, d]`` matrix whose first ``k`` columns span
    ``V ∩ U``, the first ``r1`` span ``V``, columns ``0..k-1`` and ``r1..r1+r2-k-1`` span ``U``.
    The blocks are principal vectors, so ``B`` is orthonormal within each block.
    """
    V = _check_matrix("V", V, batched=False)
    U = _check_matrix("U", U, batched=False)
    _check_same_ambient("V", V, "U", U)
    QV, QU = orthonormal_basis(V), orthonormal_basis(U)
    k = intersection_dim(QV, QU, rtol)
    # Principal vectors: SVD of Q_V^T Q_U pairs directions in V with directions in U, most aligned first.
    Y, _, Zh = torch.linalg.svd(QV.T @ QU)
    PV, PU = QV @ Y, QU @ Zh.T
    common = PV[:, :k]
    v_rest, u_rest = PV[:, k:], PU[:, k:]
    spanned = torch.cat([common, v_rest, u_rest], dim=1)
    # Complete to R^d with an orthonormal basis of the orthogonal complement of V + U.
    full = torch.linalg.svd(spanned, full_matrices=True)[0]
    return torch.cat([spanned, full[:, spanned.shape[1]:]], dim=1), k


def transport_pair(V1: Tensor, U1: Tensor, V2: Tensor, U2: Tensor, rtol: float | None = None) -> Tensor:
    """An invertible ``g`` with ``g V1 = V2`` and ``g U1 = U2`` (as subspaces).

    Exists iff the two pairs have the same dimensions and the same intersection dimension
    (Theorem 4.1); otherwise a ``ValueError`` says which invariant differs. ``g = B2 B1^{-1}`` for
    adapted bases ``B1``, ``B2``. Its condition number is finite but can be large: that is the
    point of Corollary 4.2, GL(d) may stretch space as much as it likes.
    """
    shapes = [(n, _check_matrix(n, x, batched=False)) for n, x in (("V1", V1), ("U1", U1), ("V2", V2), ("U2", U2))]
    for name, x in shapes[1:]:
        _check_same_ambient("V1", shapes[0][1], name, x)
    V1, U1, V2, U2 = (x for _, x in shapes)
    dims1 = (orthonormal_basis(V1).shape[1], orthonormal_basis(U1).shape[1])
    dims2 = (orthonormal_basis(V2).shape[1], orthonormal_basis(U2).shape[1])
    if dims1 != dims2:
        raise ValueError(f"subspace dimensions differ: (dim V1, dim U1) = {dims1}, (dim V2, dim U2) = {dims2}")
    B1, k1 = adapted_basis(V1, U1, rtol)
    B2, k2 = adapted_basis(V2, U2, rtol)
    if k1 != k2:
        raise ValueError(
            f"no element of GL(d) maps one pair to the other: dim(V1 ∩ U1) = {k1} but dim(V2 ∩ U2) = {k2} "
            "(the intersection dimension is GL(d)-invariant)"
        )
    return torch.linalg.solve(B1.T, B2.T).T  # B2 @ inv(B1), without forming the inverse


def normal_form_pair(d: int, r1: int, r2: int, k: int, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The normal form (B.7)/(B.8) of a pair in the stratum ``X_k``, ``r1 <= r2``.

    ``U = span(e_1..e_{r2})`` and ``V = span(e_1..e_k, e_{r2+1}+e_{k+1}, ..., e_{r2+s}+e_{k+s})``
    with ``s = r1 - k``; ``dim(V ∩ U) = k``. Returns spanning matrices ``V [d, r1]``, ``U [d, r2]``.
    """
    if not 1 <= r1 <= r2 <= d:
        raise ValueError(f"the normal form needs 1 <= r1 <= r2 <= d, got r1={r1}, r2={r2}, d={d}")
    if k not in stratum_range(d, r1, r2):
        rng = stratum_range(d, r1, r2)
        raise ValueError(f"intersection dimension {k} impossible in Gr({r1},{d}) x Gr({r2},{d}); possible: {rng.start}..{rng.stop - 1}")
    eye = torch.eye(d, dtype=dtype)
    s = r1 - k
    moving = eye[:, r2 : r2 + s] + eye[:, k : k + s]
    return torch.cat([eye[:, :k], moving], dim=1), eye[:, :r2]


def one_parameter_subgroup(d: int, r2: int, t: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``lambda(t) = diag(1, ..., 1, t, ..., t)`` (B.9): identity on the first ``r2`` coordinates, ``t`` after.

    It fixes ``U = span(e_1..e_{r2})``; applied to the normal-form ``V`` it turns each moving
    basis vector into ``e_{k+j} + t e_{r2+j}``, so ``tan(theta_j) = t`` and, as ``t -> 0``, the pair
    degenerates onto the flag locus ``V ⊂ U`` (B.10–B.12). For ``t = 0`` the matrix is singular:
    the limit point lies outside the orbit.
    """
    if not 0 <= r2 <= d:
        raise ValueError(f"need 0 <= r2 <= d, got r2={r2}, d={d}")
    diag = torch.ones(d, dtype=dtype)
    diag[r2:] = t
    return torch.diag(diag)


# =========================================================================== dimension counts (Prop 3.3, Cor 3.5)


def _check_ranks(d: int, ranks: Sequence[int], *, nested: bool = True) -> tuple[int, list[int]]:
    """Validate ``d`` and a rank sequence; ``nested`` requires ``r_1 <= ... <= r_L`` (weak inequalities)."""
    d = _as_int("d", d)
    if isinstance(ranks, Tensor) or not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise TypeError(f"ranks must be a sequence of integers (r_1, ..., r_L), got {type(ranks).__name__}")
    rs = [_as_int(f"ranks[{i}]", r) for i, r in enumerate(ranks)]
    if d < 1:
        raise ValueError(f"need an ambient dimension d >= 1, got d={d}")
    if not rs:
        raise ValueError("ranks is empty: need at least one subspace dimension r_1")
    if any(not 1 <= r <= d for r in rs):
        raise ValueError(f"every subspace dimension must satisfy 1 <= r_l <= d={d}, got {rs}")
    if nested and any(a > b for a, b in zip(rs, rs[1:])):
        raise ValueError(f"a flag needs non-decreasing dimensions r_1 <= ... <= r_L, got {rs}")
    return d, rs


def grassmannian_product_dim(d: int, ranks: Sequence[int]) -> int:
    """``dim prod_l Gr(r_l, d) = sum_l r_l (d - r_l)`` (Eq. A.1). Ranks in any order."""
    d, rs = _check_ranks(d, ranks, nested=False)
    return sum(r * (d - r) for r in rs)


def flag_dim(d: int, ranks: Sequence[int]) -> int:
    """``dim Fl(r_1, ..., r_L; d) = sum_l (r_l - r_{l-1}) (d - r_l)``, ``r_0 = 0`` (Eq. A.2, first form).

    Weak inequalities ``r_l = r_{l+1}`` are allowed (the nesting then forces ``V_l = V_{l+1}`` and the
    term vanishes). Sanity anchors: ``flag_dim(3, [1, 2]) == 3``, ``flag_dim(4, [1, 2, 3]) == 6``.
    """
    d, rs = _check_ranks(d, ranks)
    prev = [0] + rs[:-1]
    return sum((r - p) * (d - r) for r, p in zip(rs, prev))


def flag_dim_blocks(d: int, ranks: Sequence[int]) -> int:
    """``dim Fl = sum_{i<j} n_i n_j`` over the block sizes ``n_i = r_i - r_{i-1}``, ``n_{L+1} = d - r_L``.

    The second form of Eq. (A.2): ``dim GL(d) - dim P`` for the parabolic ``P`` of block-upper-
    triangular matrices with diagonal blocks of sizes ``n_1, ..., n_{L+1}``.
    """
    d, rs = _check_ranks(d, ranks)
    n = [b - a for a, b in zip([0] + rs, rs + [d])]
    return sum(n[i] * n[j] for i in range(len(n)) for j in range(i + 1, len(n)))


def removed_dof(d: int, ranks: Sequence[int]) -> int:
    """Degrees of freedom removed by nesting: ``(A.1) - (A.2) = sum_{l=2}^L r_{l-1} (d - r_l)``."""
    d, rs = _check_ranks(d, ranks)
    return sum(a * (d - b) for a, b in zip(rs, rs[1:]))


def parameter_counts(d: int, ranks: Sequence[int]) -> tuple[int, int]:
    """Raw coefficient counts of Corollary 3.5: ``(N_flag, N_indep)``.

    ``N_flag = d r_L + sum_{l<L} r_l r_{l+1}`` (a ``d x r_L`` basis of ``V_L`` and, for each ``l < L``,
    the ``r_{l+1} x r_l`` coefficients of ``V_l`` in the basis of ``V_{l+1}``); ``N_indep = d sum_l r_l``
    (an independent ``d x r_l`` basis per subspace). The intrinsic counts (up to the gauge
    ``GL(r_l)`` of each basis) are :func:`flag_dim` vs :func:`grassmannian_product_dim`.
    """
    d, rs = _check_ranks(d, ranks)
    return d * rs[-1] + sum(a * b for a, b in zip(rs, rs[1:])), d * sum(rs)


# =========================================================================== flags as tensors


def random_flag(
    d: int,
    ranks: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> list[Tensor]:
    """A random flag ``V_1 ⊆ ... ⊆ V_L``: ``V_l`` = first ``r_l`` columns of one Haar orthogonal ``B``.

    Returns orthonormal bases ``[d, r_l]`` (the construction of the cumulative-drift notebook).
    """
    d, rs = _check_ranks(d, ranks)
    B = haar_frames(d, d, 1, generator, dtype=dtype)[0]
    return [B[:, :r].clone() for r in rs]


def nested_flag_parameters(
    d: int,
    ranks: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> list[Tensor]:
    """Raw parameters of the nested parametrisation, Gaussian.

    ``[B_L, C_{L-1}, ..., C_1]`` with ``B_L`` ``[d, r_L]`` and ``C_l`` ``[r_{l+1}, r_l]``; their total
    ``numel`` is ``N_flag`` of :func:`parameter_counts`. Map them to bases with :func:`nested_flag_bases`.
    """
    d, rs = _check_ranks(d, ranks)
    params = [torch.randn(d, rs[-1], generator=generator, dtype=dtype)]
    for lo, hi in zip(reversed(rs[:-1]), reversed(rs[1:])):
        params.append(torch.randn(hi, lo, generator=generator, dtype=dtype))
    return params


def nested_flag_bases(params: Sequence[Tensor]) -> list[Tensor]:
    """Orthonormal bases ``[Q_1, ..., Q_L]`` of the flag encoded by ``[B_L, C_{L-1}, ..., C_1]``.

    ``Q_L = qr(B_L)``, ``Q_l = qr(Q_{l+1} C_l)``, so ``col(Q_l) ⊆ col(Q_{l+1})`` by
    construction. Differentiable (reduced QR); the parameters must have full column rank.
    """
    if isinstance(params, Tensor) or not isinstance(params, Sequence) or not params:
        raise TypeError("params must be a non-empty sequence [B_L, C_{L-1}, ..., C_1] of tensors")
    B = _check_matrix("B_L", params[0], batched=False)
    Q = torch.linalg.qr(B).Q
    out = [Q]
    for i, C in enumerate(params[1:]):
        C = _check_matrix(f"C[{i}]", C, batched=False)
        if C.shape[0] != Q.shape[1] or C.shape[1] > C.shape[0]:
            raise ValueError(
                f"coefficient matrix {i} has shape {tuple(C.shape)}; expected [r_(l+1), r_l] = [{Q.shape[1]}, r] with r <= {Q.shape[1]}"
            )
        Q = torch.linalg.qr(Q @ C.to(Q.dtype)).Q
        out.append(Q)
    return out[::-1]


def nested_violation(bases: Sequence[Tensor]) -> Tensor:
    """``max_l ||(I - P_{l+1}) Q_l||_F`` over consecutive orthonormal bases: 0 exactly on flags (A.3, A.4)."""
    Qs = _check_bases(bases)
    if len(Qs) < 2:
        return torch.zeros((), dtype=Qs[0].dtype, device=Qs[0].device)
    return torch.stack([(a - b @ (b.T @ a)).norm() for a, b in zip(Qs, Qs[1:])]).max()


def _check_bases(bases: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(bases, Tensor) or not isinstance(bases, Sequence) or not bases:
        raise TypeError("bases must be a non-empty sequence of [d, r_l] tensors (one per subspace)")
    Qs = [_check_matrix(f"bases[{i}]", b, batched=False) for i, b in enumerate(bases)]
    for i, b in enumerate(Qs[1:], start=1):
        _check_same_ambient("bases[0]", Qs[0], f"bases[{i}]", b)
    return Qs


# =========================================================================== orbit dimension


def gl_action_matrix(bases: Sequence[Tensor]) -> Tensor:
    """Matrix of the infinitesimal GL(d) action at ``(V_1, ..., V_L)`` on ``prod_l Gr(r_l, d)``.

    The map ``gl(d) ∋ X -> ((I - P_l) X P_l)_l`` written in the coordinates
    ``N_l^T X Q_l`` of ``T_{V_l} Gr = Hom(V_l, V_l^⊥)``, with ``Q_l`` an orthonormal basis of ``V_l``
    and ``N_l`` one of its orthogonal complement (``(I - P_l) X P_l = N_l (N_l^T X Q_l) Q_l^T``, same
    rank). With row-major ``vec``, ``vec(N^T X Q) = (N^T ⊗ Q^T) vec(X)``. Returns
    ``[sum_l r_l (d - r_l), d^2]``: the rows span the tangent space of the product (Eq. A.1), and the
    rank is the dimension of the GL(d)-orbit through the point. Any subspaces, nested or not.
    """
    Qs = [orthonormal_basis(b) for b in _check_bases(bases)]
    blocks = []
    for Q in Qs:
        d, r = Q.shape
        N = torch.linalg.svd(Q, full_matrices=True)[0][:, r:]  # orthonormal complement, [d, d - r]
        blocks.append(torch.kron(N.T.contiguous(), Q.T.contiguous()))  # [(d - r) r, d^2]
    return torch.cat(blocks, dim=0)


@dataclass(frozen=True)
class OrbitRank:
    """What :func:`orbit_rank` decided and the evidence."""

    rank: int  #: numerical rank of the action matrix = orbit dimension
    singular_values: Tensor  #: all singular values, descending
    threshold: float  #: singular values above it count
    gap: float  #: s_rank / s_(rank+1): the jump at the cut (inf when nothing is cut)
    ambient: int  #: number of rows = dim of the product of Grassmannians (A.1)


def orbit_rank(bases: Sequence[Tensor], rtol: float | None = None) -> OrbitRank:
    """Dimension of the GL(d)-orbit through ``(V_1, ..., V_L)``: the numerical rank of :func:`gl_action_matrix`.

    A singular value counts when ``s > rtol * s_max``, default ``rtol = max(m, n) * eps``
    (:func:`flagcore.subspace.rank_tolerance`). The returned ``gap`` (largest kept over largest
    dropped singular value) shows whether the cut is clear: for orthonormal flags the kept values
    are O(1) and the dropped ones O(eps), so gaps of ~1e14 in float64.
    """
    M = gl_action_matrix(bases)
    if rtol is None:
        rtol = rank_tolerance(M.shape, M.dtype)
    if rtol < 0:
        raise ValueError(f"rtol must be non-negative, got {rtol}")
    s = torch.linalg.svdvals(M)
    threshold = float(rtol * s[0]) if s.numel() else 0.0
    rank = int((s > threshold).sum())
    if rank == 0 or rank >= s.numel():
        gap = math.inf
    else:
        gap = float(s[rank - 1] / s[rank]) if float(s[rank]) > 0 else math.inf
    return OrbitRank(rank, s, threshold, gap, M.shape[0])


def stratum_dim(d: int, r1: int, r2: int, k: int) -> int:
    """``dim X_k = r1(d - r1) + r2(d - r2) - k(d - r1 - r2 + k)`` for the stratum ``dim(V ∩ U) = k``.

    The codimension ``k(d - r1 - r2 + k)`` is that of the Schubert condition ``dim(V ∩ U) >= k`` for a
    fixed ``U``; it is 0 for the generic ``k = max(0, r1 + r2 - d)`` and, at ``k = min(r1, r2)``, gives
    the flag variety ``Fl(r1, r2; d)`` (:func:`flag_dim`). [DERIVED; verified by :func:`orbit_rank`.]
    """
    k = _as_int("k", k)
    rng = stratum_range(d, r1, r2)
    if k not in rng:
        raise ValueError(f"the stratum dim(V ∩ U) = {k} is empty in Gr({r1},{d}) x Gr({r2},{d}); possible: {rng.start}..{rng.stop - 1}")
    return r1 * (d - r1) + r2 * (d - r2) - k * (d - r1 - r2 + k)


# =========================================================================== cumulative drift (Cor 3.4)


def subspace_drift(V: Tensor, U: Tensor) -> Tensor:
    """``delta(V, U) = sum_i sin^2 theta_i(V, U)`` over the ``min(r, r')`` principal angles (Eq. A.3).

    Equals ``min(r, r') - ||Q_V^T Q_U||_F^2`` and ``||(I - P_U) Q_V||_F^2`` for ``r <= r'``, but is
    computed from the sines of :func:`flagcore.subspace.principal_angles`, so it is ~eps^2 (not ~eps)
    at nested pairs. Batched over leading dimensions; returns ``[...]``. Zero iff the smaller subspace
    lies in the larger one.
    """
    return torch.sin(principal_angles(V, U)).square().sum(dim=-1)


def cumulative_drift(bases: Sequence[Tensor], variant: str = "angles") -> Tensor:
    """``D(V_1, ..., V_L) = sum_{l<L} delta(V_l, V_{l+1})`` (Eq. 2 of Corollary 3.4).

    ``variant="angles"``: ``delta`` of :func:`subspace_drift` (minimum 0, attained iff
    ``V_l ⊆ V_{l+1}`` for all ``l`` when ``r_l <= r_{l+1}``). ``variant="projector"``:
    ``||P_{V_l} - P_{V_{l+1}}||_F^2 = |r_l - r_{l+1}| + 2 sum_i sin^2 theta_i``, computed directly from
    the projectors (minimum ``sum_l |r_{l+1} - r_l|``, same minimisers). Each entry of ``bases`` is a
    spanning matrix ``[..., d, r_l]`` (leading dims broadcast). Returns ``[...]``.
    """
    if variant not in ("angles", "projector"):
        raise ValueError(f"variant must be 'angles' or 'projector', got {variant!r}")
    if isinstance(bases, Tensor) or not isinstance(bases, Sequence) or not bases:
        raise TypeError("bases must be a non-empty sequence of [..., d, r_l] tensors (one per subspace)")
    Xs = [_check_matrix(f"bases[{i}]", b) for i, b in enumerate(bases)]
    for i, b in enumerate(Xs[1:], start=1):
        _check_same_ambient("bases[0]", Xs[0], f"bases[{i}]", b)
    terms = []
    for a, b in zip(Xs, Xs[1:]):
        if variant == "angles":
            terms.append(subspace_drift(a, b))
        else:
            terms.append((projector(a) - projector(b)).square().sum(dim=(-2, -1)))
    if not terms:
        return torch.zeros(Xs[0].shape[:-2], dtype=Xs[0].dtype, device=Xs[0].device)
    return torch.stack(torch.broadcast_tensors(*terms)).sum(dim=0)


def drift_orthonormal(QV: Tensor, QU: Tensor) -> Tensor:
    """``min(r, r') - ||Q_V^T Q_U||_F^2`` for bases that are ALREADY orthonormal (Eq. A.3, second form).

    Smooth in the bases (no SVD), hence usable with autograd, e.g. on ``Q = qr(A).Q`` of unconstrained
    ``A``; unlike :func:`subspace_drift` it suffers cancellation (~eps, not ~eps^2, near 0). Orthonormality
    is the caller's contract and is not checked. Batched ``[..., d, r]``, ``[..., d, r']`` -> ``[...]``.
    """
    QV, QU = _check_matrix("QV", QV), _check_matrix("QU", QU)
    _check_same_ambient("QV", QV, "QU", QU)
    return min(QV.shape[-1], QU.shape[-1]) - (QV.transpose(-1, -2) @ QU).square().sum(dim=(-2, -1))


# =========================================================================== Plücker embedding

_MAX_MINORS = 2_000_000


def plucker_coordinates(A: Tensor, *, normalize: bool = True) -> Tensor:
    """Plücker coordinates of ``col(A)``: all ``r x r`` minors of ``A`` ``[..., d, r]``, rows in lexicographic order.

    Returns ``[..., C(d, r)]``. With ``normalize=True`` (default) the vector is divided by its norm, so
    it depends on the subspace only up to sign (a change of basis ``A -> A M`` multiplies every minor by
    ``det M``). By Cauchy–Binet, ``<p(A), p(B)> = det(A^T B)``, so for orthonormal bases
    ``|<p_V, p_U>| = prod_i cos theta_i``. ``normalize=False`` returns the raw minors of ``A`` as given
    (used for the Hilbert–Mumford weights). Raises for rank-deficient ``A`` when normalising, and when
    ``C(d, r)`` exceeds 2e6 minors.
    """
    A = _check_matrix("A", A)
    d, r = A.shape[-2], A.shape[-1]
    if not 1 <= r <= d:
        raise ValueError(f"need 1 <= r <= d columns, got A of shape {tuple(A.shape)}")
    n = math.comb(d, r)
    if n > _MAX_MINORS:
        raise ValueError(f"Gr({r},{d}) has C({d},{r}) = {n} Plücker coordinates, more than the limit {_MAX_MINORS}")
    idx = torch.tensor(list(itertools.combinations(range(d), r)), dtype=torch.long, device=A.device)  # [n, r]
    minors = torch.linalg.det(A[..., idx, :])  # [..., n, r, r] -> [..., n]
    if not normalize:
        return minors
    norm = minors.norm(dim=-1, keepdim=True)
    if bool((norm <= rank_tolerance(A.shape, A.dtype) * A.abs().amax(dim=(-2, -1)).unsqueeze(-1) ** r).any()):
        raise ValueError("A does not have full column rank: its Plücker vector is zero")
    return minors / norm


def plucker_distance(A: Tensor, B: Tensor) -> Tensor:
    """Sign-invariant chordal distance ``min(||p_A - p_B||, ||p_A + p_B||)`` of normalised Plücker vectors.

    Equals ``sqrt(2 - 2 prod_i cos theta_i)`` with ``theta_i`` the principal angles (``r_A = r_B``),
    a metric on ``Gr(r, d)`` seen inside the projective space ``P(Λ^r R^d)``. Batched ``[...]``.
    """
    A, B = _check_matrix("A", A), _check_matrix("B", B)
    _check_same_ambient("A", A, "B", B)
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"Plücker vectors compare subspaces of equal dimension, got r = {A.shape[-1]} and {B.shape[-1]}")
    pa, pb = plucker_coordinates(A), plucker_coordinates(B)
    return torch.minimum((pa - pb).norm(dim=-1), (pa + pb).norm(dim=-1))
