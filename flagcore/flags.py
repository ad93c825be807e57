"""Relative position of two subspaces, and the GL(d) action on pairs (flag paper, Thm 4.1, Cor 4.2).

A pair ``(V, U)`` in ``Gr(r1, d) x Gr(r2, d)`` is determined up to GL(d) by one number, the
intersection dimension ``k = dim(V ∩ U)``. This module samples pairs in a prescribed stratum
``X_k`` and constructs the group element that carries one pair of a stratum onto another, which
is the constructive content of "GL(d) acts transitively on each stratum".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subspace import _as_int, _check_matrix, _check_same_ambient, intersection_dim, orthonormal_basis

__all__ = [
    "adapted_basis",
    "normal_form_pair",
    "one_parameter_subgroup",
    "random_pair_with_intersection",
    "stratum_range",
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
