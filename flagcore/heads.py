"""Attention-head subspaces: per-head weights of real models and the head-overlap score R (flag paper §6, §7.2).

Head ``h`` of a layer spans ``S_h = col(W_Q^{(h)})``, a ``d_k``-dimensional subspace of R^d. With ``Q_h`` an orthonormal basis of ``S_h`` and ``P_h = Q_h Q_h^T``, the layer's score is

    R = 1/(H(H-1)) sum_{i != j} tr(P_i P_j) / d_k = 1/(H(H-1)) sum_{i != j} ||Q_i^T Q_j||_F^2 / d_k   (Eq. 10/12)

``R = 0`` iff the heads are mutually orthogonal, ``R = 1`` iff they coincide, and for independent
Haar-random heads ``E[R] = d_k/d`` exactly, with the standard deviation of
:func:`haar_overlap_baseline` (derived there).

Weights come from :mod:`flagcore.weights` in the canonical ``[H, d, d_head]`` layout (raw weights:
no LayerNorm folding, no biases). The arithmetic is batched: one orthonormalisation of all heads,
then one Gram product per layer, no loop over head pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkpoints import TensorDigest, revision_order, revision_step
from .subspace import _as_int, _as_real_float, haar_frames, orthonormal_basis, principal_angles
from .weights import iter_layers, list_revisions, open_source, repeat_kv

__all__ = [
    "HaarBaseline",
    "LATENT_NULL_DRAWS",
    "OverlapProfile",
    "RevisionProfile",
    "cut_linkage",
    "haar_angle_samples",
    "haar_overlap_baseline",
    "haar_overlap_samples",
    "head_overlap",
    "layout_null_samples",
    "key_heads",
    "leaf_order",
    "linkage",
    "output_heads",
    "overlap_matrix",
    "overlap_profile",
    "pair_angles",
    "planted_copies",
    "profile_rows",
    "query_heads",
    "revision_profile",
    "rise_statistics",
    "shared_core_heads",
    "top_pairs",
    "value_heads",
]


# --------------------------------------------------------------------------- per-head weights


def _role_heads(
    role: str, source, layers, dtype, repeat: bool = False, contiguous: bool = True, check_finite: bool = True
) -> Iterator[tuple[int, Tensor]]:
    src = open_source(source)
    for layer, heads in iter_layers(src, layers, (role,), dtype=dtype, contiguous=contiguous, check_finite=check_finite):
        W = heads[role]
        yield layer, (repeat_kv(W, src.dims.n_heads) if repeat else W)


def query_heads(source, layers: Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, Tensor]]:
    """``(layer, W_Q)`` with ``W_Q[h]`` = the ``[d, d_k]`` query matrix of head ``h`` (``q_h = x W_Q[h]``).

    ``source``: a loaded HF model, a directory, a ``.gguf`` file, an alias (``minilm``, ``smollm2``)
    or a Hub id (see :func:`flagcore.weights.open_source`). Layers are read one at a time (streamed
    from safetensors), upcast to ``dtype``. ``H`` = the number of *query* heads (also under GQA).
    Raw weights: no LayerNorm folding, no bias, no RoPE (RoPE permutes columns within a head only).
    """
    return _role_heads("q", source, layers, dtype)


def key_heads(source, layers=None, *, dtype: torch.dtype = torch.float32, repeat: bool = False) -> Iterator[tuple[int, Tensor]]:
    """``(layer, W_K)``, ``[H_kv, d, d_k]`` (``[H, d, d_k]`` with ``repeat=True``: each query head's key head)."""
    return _role_heads("k", source, layers, dtype, repeat)


def value_heads(source, layers=None, *, dtype: torch.dtype = torch.float32, repeat: bool = False) -> Iterator[tuple[int, Tensor]]:
    """``(layer, W_V)``, ``[H_kv, d, d_head]`` (``[H, d, d_head]`` with ``repeat=True``)."""
    return _role_heads("v", source, layers, dtype, repeat)


def output_heads(source, layers=None, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, Tensor]]:
    """``(layer, W_O)``, ``[H, d, d_head]``: TransformerLens' ``W_O[h]`` transposed, so the columns of
    ``W_O[h]`` span the subspace of R^d that head ``h`` writes into (out = sum_h z_h W_O[h]^T)."""
    return _role_heads("o", source, layers, dtype)


# --------------------------------------------------------------------------- the overlap score


def _all_finite(W: Tensor) -> bool:
    """No NaN/Inf in ``W``. One reduction: NaN and Inf propagate into the sum, so a finite sum proves all
    entries finite; only a non-finite sum (which overflow of huge finite entries can also cause) needs the
    element-wise check."""
    return bool(torch.isfinite(W.sum())) or bool(torch.isfinite(W).all())


def _check_heads(W: Tensor) -> Tensor:
    W = _as_real_float("W", W)
    if W.ndim < 3:
        raise ValueError(f"head weights must have shape [..., H, d, d_k], got {tuple(W.shape)}")
    if W.shape[-2] == 0:
        raise ValueError("W has ambient dimension d = 0")
    if W.shape[-3] < 2:
        raise ValueError(f"the overlap needs at least 2 heads, got H = {W.shape[-3]}")
    if not _all_finite(W):
        raise ValueError("W contains NaN or Inf")
    return W


def _float_dtype(W: Tensor) -> torch.dtype:
    """The dtype of a result for input ``W``: its own floating dtype (integers were promoted to float64)."""
    return W.dtype if W.is_floating_point() else torch.float64


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype (float32, bf16, fp16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Cholesky QR is used for heads whose condition number is at most this (as before: ``cond(W_h^T W_h) <= 1e8``);
#: worse-conditioned or rank-deficient heads take the SVD route of :func:`flagcore.subspace.orthonormal_basis`.
_MAX_COND = 1e4


def _orthonormality_tol(dtype: torch.dtype) -> float:
    """Largest accepted ``max |Q_h^T Q_h - I|`` in the final Gram: 1e-12 in float64, 1e-5 in float32
    (about 100 ulps of float32, well above the rounding of a float32 Gram of orthonormal columns)."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def _diagonal_blocks(G: Tensor, H: int, k: int) -> Tensor:
    """``[..., H, k, k]``: the blocks ``G_hh`` of an ``[..., H*k, H*k]`` matrix."""
    return torch.diagonal(G.reshape(*G.shape[:-2], H, k, H, k), dim1=-4, dim2=-2).movedim(-1, -3)


def _whiten_blocks(G: Tensor, M: Tensor) -> Tensor:
    """``[..., H*k, H*k]`` with block (i, j) = ``M_i G_ij M_j^T``, for ``M`` ``[..., H, k, k]``: two batched products."""
    *batch, H, k, _ = M.shape
    n = H * k
    left = (M @ G.reshape(*batch, H, k, n)).reshape(*batch, n, n)  # block rows: M_i G_ij
    return (M @ left.transpose(-1, -2).reshape(*batch, H, k, n)).reshape(*batch, n, n).transpose(-1, -2)


def _gram_groups(H: int) -> int:
    """How many groups of heads :func:`_grouped_gram` splits ``H`` heads into: the largest divisor of ``H``
    up to 8. ``G`` groups cost ``(G + 1) / (2G)`` of the full Gram product's arithmetic (the products below
    the block diagonal are the transposes of those above) in ``G`` matrix products; beyond 8 the saving
    (at most 1/16 more) no longer pays for the extra calls at the head shapes of real models."""
    return max(g for g in range(1, min(H, 8) + 1) if H % g == 0)


def _grouped_gram(rows: Tensor, groups: int) -> Tensor:
    """``[..., G, n/G, n/G]``: the diagonal blocks of ``rows @ rows^T`` for ``G`` equal groups of rows."""
    *batch, n, d = rows.shape
    grouped = rows.reshape(*batch, groups, n // groups, d)
    return grouped @ grouped.transpose(-1, -2)


def _cross_group_squares(rows: Tensor, groups: int) -> Tensor:
    """``sum_{a<b} ||R_a R_b^T||_F^2`` over the ``G`` equal groups ``R_a`` of ``rows`` ``[..., n, d]``: ``[...]``.

    One product per group, with all the groups after it (contiguous row slices, no copy): half of the
    off-diagonal part of the Gram product, which is symmetric. The products are written side by side
    into one buffer, so the sum of squares is two operations, not two per group. A batch gets one batched
    product per group instead (a batched product cannot write into such a buffer without a slow copy)."""
    *batch, n, _ = rows.shape
    size = n // groups
    if batch:
        total = rows.new_zeros(batch)
        for a in range(groups - 1):
            block = rows[..., a * size:(a + 1) * size, :] @ rows[..., (a + 1) * size:, :].transpose(-1, -2)
            total = total + block.square().sum(dim=(-2, -1))
        return total
    widths = [n - (a + 1) * size for a in range(groups - 1)]
    if not widths:
        return rows.new_zeros(())
    buffer = rows.new_empty(size * sum(widths))
    start = 0
    for a, width in enumerate(widths):
        out = buffer[start:start + size * width].view(size, width)
        torch.mm(rows[a * size:(a + 1) * size], rows[(a + 1) * size:].T, out=out)
        start += size * width
    return buffer.square().sum()


def _cholesky_guard(grams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(L, L^{-1}, info, certified)`` for per-head Grams ``W_h^T W_h`` ``[..., k, k]``, factorised in float64.

    ``certified`` (``[...]``, bool): Cholesky succeeded and the cheap bound
    ``||L_h||_F ||L_h^{-1}||_F >= cond(L_h) = cond(W_h)`` is at most ``_MAX_COND``. Computed even where Cholesky
    failed (``info > 0``: ``L`` is then partial, ``L^{-1}`` and the bound may be inf/NaN, as they are for NaN/Inf
    weights, and the comparison is False), so that the common case needs a single host synchronisation.
    """
    L, info = torch.linalg.cholesky_ex(grams.to(torch.float64))
    eye = torch.eye(L.shape[-1], dtype=torch.float64, device=L.device)
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    cond_bound = torch.linalg.matrix_norm(L) * torch.linalg.matrix_norm(Linv)
    return L, Linv, info, (info == 0) & (cond_bound <= _MAX_COND)


def _orthonormal_heads(W: Tensor, assume_orthonormal: bool, groups: int, *, checked: bool = False) -> tuple[Tensor, Tensor, int]:
    """The heads' orthonormal bases as rows, ``[..., H*r, d]`` (head ``h``: rows ``h*r`` to ``(h+1)*r - 1``), in the
    working precision (float64 for float64 ``W``, else float32); the diagonal blocks of their Gram matrix for
    ``groups`` equal groups of heads (:func:`_grouped_gram`; ``groups=1``: the whole Gram, block (i, j) =
    ``Q_i^T Q_j``); and the rank ``r``. ``checked=True`` skips the validation of ``W`` (for callers that
    validated it already, e.g. :func:`overlap_profile`, whose weights :mod:`flagcore.weights` checked for
    shape and finiteness).

    Fast path (Cholesky QR, the least arithmetic beyond the Gram product): per head,
    ``W_h^T W_h = L_h L_h^T`` (the small ``d_k x d_k`` Cholesky factorisation always in float64) and
    ``Q_h^T = L_h^{-1} W_h^T``, orthonormal columns spanning ``col(W_h)`` (about ``2/H`` of the Gram
    product's arithmetic). Orthonormalising *before* the big product keeps that product perfectly
    conditioned, so a float32 product loses no digits to ``cond(W_h)^2`` (whitening a raw float32 Gram
    afterwards would).

    Guards: Cholesky must succeed and every head must have ``cond(W_h) <= 1e4`` (certified by the cheap
    bound ``||L_h||_F ||L_h^{-1}||_F >= cond(L_h) = cond(W_h)``, else checked exactly by eigenvalues);
    otherwise the heads are rank-deficient or ill-conditioned and go through SVD bases
    (:func:`flagcore.subspace.orthonormal_basis`, whose numerical rank decides ``r``). A posteriori, the
    blocks ``Q_h^T Q_h`` (inside the grouped Gram) must equal ``I`` to 1e-12 (float64) or 1e-5 (float32);
    the float32 rows lose orthogonality like ``eps32 cond(W_h)^2`` (the rounding of the float32 head Grams,
    amplified by the whitening), and when they did (3 of SmolLM2's 30 layers, whose heads have ``cond(W_h)``
    up to ~110), a second Cholesky pass re-orthonormalises the rows and whitens
    the group Grams already formed (CholeskyQR2: orthonormal to rounding for ``cond <= 1e4``).
    """
    if not checked:
        W = _check_heads(W)
    *batch, H, d, k = W.shape
    work = _work_dtype(W.dtype)
    if assume_orthonormal:
        rows = W.to(work).transpose(-1, -2).reshape(*batch, H * k, d)
        return rows, _grouped_gram(rows, groups), k
    Wt = W.transpose(-1, -2).to(work)  # [..., H, k, d]: W_h^T
    L, Linv, info, certified = _cholesky_guard(Wt @ Wt.transpose(-1, -2))
    eye = torch.eye(k, dtype=torch.float64, device=W.device)
    fast = bool(certified.all())
    if not fast and bool((info == 0).all()):  # Cholesky succeeded everywhere but the cheap bound is loose: exact check
        eig = torch.linalg.eigvalsh(L @ L.transpose(-1, -2))
        fast = bool((eig[..., 0] > eig[..., -1] / _MAX_COND**2).all())
    if fast:
        heads = Linv.to(work) @ Wt  # [..., H, k, d]: each head's orthonormal basis vectors as rows
        rows = heads.reshape(*batch, H * k, d)
        gram = _grouped_gram(rows, groups)
        blocks = _diagonal_blocks(gram, H // groups, k)
        if bool((blocks - eye.to(work)).abs_().amax() > _orthonormality_tol(work)):  # CholeskyQR2
            L2 = torch.linalg.cholesky(blocks.to(torch.float64))  # [..., G, H/G, k, k]
            M = torch.linalg.solve_triangular(L2, eye.expand_as(L2), upper=False).to(work)
            # the rows (for the products between groups, formed later) and the group Grams (already formed:
            # whitened, not formed again) both get the second pass
            rows = (M.reshape(*batch, H, k, k) @ heads).reshape(*batch, H * k, d)
            gram = _whiten_blocks(gram, M)
        return rows, gram, k
    Q = orthonormal_basis(W).to(work)
    r = Q.shape[-1]
    rows = Q.transpose(-1, -2).reshape(*batch, H * r, d)
    return rows, _grouped_gram(rows, groups), r


def overlap_matrix(W: Tensor, *, assume_orthonormal: bool = False) -> Tensor:
    """``[..., H, H]`` matrix ``O_ij = ||Q_i^T Q_j||_F^2 / r = tr(P_i P_j) / r`` (Eq. 12).

    ``W``: ``[..., H, d, d_k]`` spanning matrices of the heads (any scaling; rank ``r`` = ``d_k``
    generically; rank-deficient heads are orthonormalised with :func:`flagcore.subspace.orthonormal_basis`,
    and a rank that differs between heads is an error). One Gram product per batch item, see
    :func:`_orthonormal_heads`. ``O`` is symmetric with unit diagonal and entries in [0, 1].
    """
    _, gram, r = _orthonormal_heads(W, assume_orthonormal, groups=1)
    *batch, _, n, _ = gram.shape
    H = n // r
    return (gram.reshape(*batch, H, r, H, r).square().sum(dim=(-3, -1)) / r).to(_float_dtype(W))


def head_overlap(W: Tensor, *, assume_orthonormal: bool = False) -> Tensor:
    """``R`` of Eq. (10)/(12) for heads ``W`` ``[..., H, d, d_k]``; returns ``[...]`` (0-dim for one layer).

    No loop over pairs: with ``F = [Q_1 | ... | Q_H]``, ``sum_{i,j} ||Q_i^T Q_j||_F^2 = ||F^T F||_F^2``, and
    the diagonal terms are ``||Q_i^T Q_i||_F^2`` (``= r``), so
    ``R = (||F^T F||_F^2 - sum_i ||Q_i^T Q_i||_F^2) / (r H (H-1))``. ``F^T F`` is one Gram product of the
    heads' Cholesky-QR bases (:func:`_orthonormal_heads`), formed block-triangle only (it is symmetric);
    float64 input: float64 throughout (R agrees with SVD bases to ~1e-15 for well-conditioned heads); other
    dtypes: the Gram product in float32 (R to ~1e-7).
    """
    return _head_overlap(W, assume_orthonormal)


def _head_overlap(W: Tensor, assume_orthonormal: bool = False, *, checked: bool = False) -> Tensor:
    if not checked:
        W = _check_heads(W)
    groups = _gram_groups(W.shape[-3])
    rows, gram, r = _orthonormal_heads(W, assume_orthonormal, groups, checked=True)
    H = rows.shape[-2] // r
    # (square().sum, not linalg.vector_norm: its float32 reduction is biased, ~1e-5 relative)
    within = gram.square().sum(dim=(-3, -2, -1)) - _diagonal_blocks(gram, H // groups, r).square().sum(dim=(-4, -3, -2, -1))
    off_diagonal = within + 2 * _cross_group_squares(rows, groups)
    return (off_diagonal / (r * H * (H - 1))).to(_float_dtype(W))


#: :func:`overlap_profile` computes consecutive layers of equal shape together while their query weights (in the
#: working precision) total at most this: a small model's layers share one set of small operations (the
#: Cholesky guards, checks and reductions, which cost as much as the products at MiniLM's size), a large
#: model's layer (16 MB at Llama-3.2-1B's shape) still streams alone, so the peak memory stays ~ one layer.
_LAYER_CHUNK_BYTES = 8 * 2**20


def _overlap_of_layers(Ws: Sequence[Tensor], *, exact_gram: bool = False) -> list[float]:
    """``R`` of each layer in ``Ws`` (each ``[H, d, d_k]``, one shape; shapes checked by the caller, finiteness
    not: a NaN or Inf fails the Cholesky guard below, and such a layer goes through :func:`_head_overlap`,
    which raises).

    The method of :func:`_head_overlap` (Cholesky QR of each head, then the block upper triangle of the Gram
    product of the orthonormal rows), organised for a profile of many small layers: the products run one
    layer at a time (no copy of the weights into a batch), while everything small runs once for all the
    layers (the per-head Grams are written into one tensor, factorised and certified together; the checks
    and reductions read shared buffers). At MiniLM's size those small operations cost as much as the
    products, so doing them once per chunk instead of once per layer is most of the saving.

    A layer that fails a guard is redone alone, so each keeps the guarantees of :func:`_head_overlap`:
    well-conditioned heads whose float32 rows missed orthonormality (float32 rounding of the head Grams,
    ~eps32 cond(W_h)^2) once more with float64 head Grams (``exact_gram``); ill-conditioned or
    rank-deficient heads, and NaN/Inf, through :func:`_head_overlap` itself (SVD bases, or the error).
    """
    H, d, k = Ws[0].shape
    work = _work_dtype(Ws[0].dtype)
    n, groups = H * k, _gram_groups(H)
    size = n // groups
    Wts = [W.transpose(-1, -2).to(work) for W in Ws]  # [H, k, d]: W_h^T
    # float64 head Grams (exact_gram): Cholesky QR then loses ~eps32 cond(W_h), not eps32 cond(W_h)^2
    gram_dtype = torch.float64 if exact_gram else work
    grams = Wts[0].new_empty(len(Ws), H, k, k, dtype=gram_dtype)
    for Wt, out in zip(Wts, grams):
        Wt = Wt.to(gram_dtype)
        torch.matmul(Wt, Wt.transpose(-1, -2), out=out)
    _, Linv, _, certified = _cholesky_guard(grams)
    fast = certified.all(dim=-1).tolist()  # per layer (a head that fails sends its layer to _head_overlap)
    Linv = Linv.to(work)
    eye = torch.eye(k, dtype=work, device=Linv.device)
    # One layer's upper block triangle, group row a holding rows_a @ rows_{a..}^T: the group's Gram and its products
    # with the groups after it, written by one product per group. Zeroed once, so the block lower triangle (never
    # written) adds nothing to its sum of squares; reused by every layer (it stays in cache, allocated once).
    upper = Wts[0].new_zeros(groups, size, n)
    group_diagonal = torch.diagonal(upper.view(groups, size, groups, size), dim1=0, dim2=2).movedim(-1, 0)  # [G, s, s]
    group_grams = Wts[0].new_empty(len(Ws), groups, size, size)  # (entries of a layer off the fast path: unused)
    upper_squares = Wts[0].new_zeros(len(Ws))
    for i, Wt in enumerate(Wts):
        if not fast[i]:
            continue
        rows = (Linv[i] @ Wt).reshape(n, d)  # each head's orthonormal basis vectors as rows
        for a in range(groups):
            torch.mm(rows[a * size:(a + 1) * size], rows[a * size:].T, out=upper[a, :, a * size:])
        group_grams[i].copy_(group_diagonal)
        torch.sum(upper.square_(), dim=(0, 1, 2), out=upper_squares[i])
    blocks = _diagonal_blocks(group_grams, H // groups, k)  # [L, G, H/G, k, k]: Q_h^T Q_h
    orthonormal = ((blocks - eye).abs_().amax(dim=(-4, -3, -2, -1)) <= _orthonormality_tol(work)).tolist()
    # sum over ordered pairs of distinct heads = twice the block upper triangle's squares, less the group Grams
    # (counted once) and the heads' own blocks
    group_squares = group_grams.square().sum(dim=(-3, -2, -1))
    off_diagonal = 2 * upper_squares - group_squares - blocks.square().sum(dim=(-4, -3, -2, -1))
    R = (off_diagonal / (k * H * (H - 1))).tolist()
    out = []
    for i, W in enumerate(Ws):
        if fast[i] and orthonormal[i]:
            out.append(R[i])
        elif fast[i] and not exact_gram and work != torch.float64:
            out += _overlap_of_layers([W], exact_gram=True)  # well-conditioned but float32 rounding showed: once more
        else:
            out.append(float(_head_overlap(W)))  # ill-conditioned, rank-deficient, NaN/Inf: the guarded path (raises)
    return out


# --------------------------------------------------------------------------- Haar baseline


@dataclass(frozen=True)
class HaarBaseline:
    """``E[R] = d_k/d`` and ``sd(R) = 2 (d - d_k) / (d sqrt(H(H-1)(d-1)(d+2)))`` for independent Haar heads."""

    d: int
    d_k: int
    H: int
    mean: float
    sd: float

    def z(self, R: float) -> float:
        """Standard score of an observed ``R`` against the baseline."""
        return (float(R) - self.mean) / self.sd if self.sd > 0 else math.inf * (float(R) - self.mean)


def haar_overlap_baseline(d: int, d_k: int, H: int) -> HaarBaseline:
    """Exact mean and standard deviation of ``R`` for ``H`` independent Haar ``d_k``-planes in R^d.

    Mean: ``E[P_i] = (d_k/d) I`` by O(d)-invariance, so ``E tr(P_i P_j) = d_k^2/d`` and ``E[R] = d_k/d``.
    Variance: ``Var tr(P_i P_j) = 2 d_k^2 (d-d_k)^2 / (d^2 (d-1)(d+2))``; the ordered pairs are
    uncorrelated (``E[tr P_i P_j | P_i]`` is constant), and each unordered pair appears twice, so
    ``Var R = 4 (d-d_k)^2 / (H(H-1) d^2 (d-1)(d+2))``.
    """
    d, d_k, H = (_as_int(n, v) for n, v in (("d", d), ("d_k", d_k), ("H", H)))
    if not 1 <= d_k <= d:
        raise ValueError(f"need 1 <= d_k <= d, got d_k={d_k}, d={d}")
    if H < 2:
        raise ValueError(f"the overlap needs at least 2 heads, got H={H}")
    if d == 1:
        return HaarBaseline(d, d_k, H, 1.0, 0.0)
    var = 4 * (d - d_k) ** 2 / (H * (H - 1) * d**2 * (d - 1) * (d + 2))
    return HaarBaseline(d, d_k, H, d_k / d, math.sqrt(var))


def haar_overlap_samples(
    d: int, d_k: int, H: int, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``[n]`` independent draws of ``R`` for ``H`` independent Haar heads (the paper's empirical baseline),
    from :func:`flagcore.subspace.haar_frames`.

    The frames are drawn in chunks of about 64 MB, so memory stays bounded at any ``n`` (5000 draws of
    SmolLM2's shape in one piece were 13 GB of frames; issue 15)."""
    H, n = _as_int("H", H), _as_int("n", n)
    d, d_k = _as_int("d", d), _as_int("d_k", d_k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def draw(m: int) -> Tensor:
        frames = haar_frames(d, d_k, m * H, generator, dtype=dtype).reshape(m, H, d, d_k)
        return head_overlap(frames, assume_orthonormal=True)

    return _in_chunks(n, H * d * d_k * _itemsize(dtype), draw)


#: Bytes of Haar frames drawn at once by the Monte-Carlo samplers (:func:`haar_overlap_samples`,
#: :func:`haar_angle_samples`).
_SAMPLE_CHUNK_BYTES = 64 * 2**20


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _in_chunks(n: int, bytes_per_draw: int, draw: Callable[[int], Tensor]) -> Tensor:
    """``draw(m)`` for consecutive chunks of ``m`` draws adding up to ``n``, each about ``_SAMPLE_CHUNK_BYTES``
    of frames, concatenated along the first dimension."""
    step = max(1, _SAMPLE_CHUNK_BYTES // bytes_per_draw)
    return torch.cat([draw(min(step, n - start)) for start in range(0, n, step)])


def layout_null_samples(
    source,
    layer: int,
    role: str = "q",
    n: int = 200,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``n`` draws of ``R`` for the heads that ``source``'s layout cuts from *random* weights of the
    layer's own shapes: i.i.d. Gaussian matrices, norm weights 1 (their initialisation).

    For a layout whose heads are plain row blocks this is the Haar law (:func:`haar_overlap_baseline`);
    where the heads live in a low-rank space (DeepSeek's latent attention: every query head inside the
    ``q_lora_rank``-dimensional row space of ``q_a``) it is the null that fits the factorisation, and
    ``d_k/d`` is not. Of ``source``'s weights only the shapes are used.
    """
    src = open_source(source)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    spelling = src.spelling
    shapes = {r: tuple(src.get(src.key(layer, r)).shape) for r in spelling.needed((role,))}
    dims = src.dims.at(layer)
    values = []
    for _ in range(n):
        raw = {
            r: torch.ones(shape, dtype=dtype) if r.endswith("norm") else torch.randn(shape, generator=generator, dtype=dtype)
            for r, shape in shapes.items()
        }
        values.append(head_overlap(spelling.split(raw, dims)[role]))
    return torch.stack(values)


# --------------------------------------------------------------------------- a model's profile


@dataclass
class OverlapProfile:
    """``R`` per layer of one model, with the Haar baseline of its shape."""

    model: str
    d: int
    H: int
    H_kv: int
    d_k: int
    baseline: HaarBaseline
    layers: list[int] = field(default_factory=list)
    R: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.R) / len(self.R) if self.R else math.nan

    def to_dict(self) -> dict:
        b = self.baseline
        return {
            "model": self.model,
            "d": self.d,
            "H": self.H,
            "H_kv": self.H_kv,
            "d_k": self.d_k,
            "baseline": b.mean,
            "baseline_sd": b.sd,
            "mean_R": self.mean,
            "layers": [
                {"layer": layer, "R": R, "excess": R - b.mean, "z": b.z(R)} for layer, R in zip(self.layers, self.R)
            ],
        }


def overlap_profile(
    source,
    layers: Sequence[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> OverlapProfile:
    """``R(layer)`` of a model's query heads, streamed: layers are read one at a time and computed in runs of
    consecutive layers holding up to 8 MB of query weights (:func:`_overlap_of_layers`), so the peak memory
    is about one layer for a large model (Llama-3.2-1B: 16 MB per layer, one layer per run) and 8 MB for a
    small one.

    ``dtype``: the precision of the weights and of the arithmetic (float32: R to ~1e-6). ``progress``:
    optional wrapper of the layer iterator (e.g. ``tqdm``).
    """
    src = open_source(source)
    # views of the read tensor (no copy); finiteness is left to the Cholesky guard of _overlap_of_layers (no extra pass)
    it = _role_heads("q", src, layers, dtype, contiguous=False, check_finite=False)
    if progress is not None:
        it = progress(it)
    profile = None
    chunk: list[tuple[int, Tensor]] = []

    def flush() -> None:
        try:
            profile.R.extend(_overlap_of_layers([W for _, W in chunk]))
        except ValueError as err:
            if "NaN or Inf" not in str(err):
                raise
            for layer, W in chunk:  # name the layer, as flagcore.weights.layer_heads would have
                if not _all_finite(W):
                    key = src.key(layer, src.spelling.sources("q")[0])
                    raise ValueError(f"{src.name}: {key} (layer {layer}) contains NaN or Inf") from None
            raise
        chunk.clear()

    for layer, W in it:
        if profile is None:
            profile = OverlapProfile(
                src.name, src.dims.d, src.dims.n_heads, src.dims.n_kv_heads, W.shape[-1],
                haar_overlap_baseline(src.dims.d, W.shape[-1], src.dims.n_heads),
            )
        profile.layers.append(layer)
        # W was validated by flagcore.weights.layer_heads (a matrix, [H, d, d_head]): check only what it does not
        if W.shape[-3] < 2:
            raise ValueError(f"the overlap needs at least 2 heads, got H = {W.shape[-3]}")
        if chunk and (W.shape != chunk[0][1].shape or (len(chunk) + 1) * _chunk_bytes(W) > _LAYER_CHUNK_BYTES):
            flush()
        chunk.append((layer, W))
    if profile is None:
        raise ValueError("no layers selected")
    flush()
    return profile


def _chunk_bytes(W: Tensor) -> int:
    return W.numel() * torch.finfo(_work_dtype(W.dtype)).bits // 8


# --------------------------------------------------------------------------- beyond R: structure of the overlaps
#
# R (Eq. 10/12) is the mean of the off-diagonal entries of the overlap matrix O, so it cannot tell a few
# identical heads (a block of ones in O, the rest near d_k/d) from many partially overlapping ones (every
# entry near R): the paper's limitation 3. The functions below keep the information R averages away: the
# pairs' principal angles, against their Haar law, and a hierarchical clustering of the heads on 1 - O.

_LINKAGES = ("single", "complete", "average")


def top_pairs(O: Tensor, n: int) -> Tensor:
    """The ``n`` most overlapping head pairs ``(i, j)``, ``i < j``, by ``O_ij`` descending: ``[n, 2]`` int64.

    ``O``: an ``[H, H]`` overlap matrix (:func:`overlap_matrix`). Ties are broken by the flat index
    (row-major), so the order is deterministic.
    """
    O = _check_square("O", O)
    n = _as_int("n", n)
    H = O.shape[-1]
    if not 1 <= n <= H * (H - 1) // 2:
        raise ValueError(f"n must be in [1, H(H-1)/2] = [1, {H * (H - 1) // 2}], got {n}")
    i, j = torch.triu_indices(H, H, offset=1, device=O.device)
    values = O[i, j]
    order = torch.sort(-values, stable=True).indices[:n]
    return torch.stack([i[order], j[order]], dim=-1)


def pair_angles(W: Tensor, pairs: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between heads ``W[i]`` and ``W[j]`` for each row ``(i, j)`` of
    ``pairs``: ``[P, r]`` from ``W`` ``[H, d, d_k]`` and ``pairs`` ``[P, 2]``.

    One batched call of :func:`flagcore.subspace.principal_angles` (``O_ij = sum_a cos^2 theta_a / r``).
    """
    W = _check_heads(W)
    if W.ndim != 3:
        raise ValueError(f"W must have shape [H, d, d_k], got {tuple(W.shape)}")
    if not isinstance(pairs, Tensor) or pairs.dtype not in (torch.int32, torch.int64):
        raise TypeError("pairs must be an integer torch.Tensor of shape [P, 2]")
    if pairs.ndim != 2 or pairs.shape[-1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs must have shape [P, 2] with P >= 1, got {tuple(pairs.shape)}")
    H = W.shape[0]
    if bool((pairs < 0).any()) or bool((pairs >= H).any()):
        raise ValueError(f"pair indices must lie in [0, H) = [0, {H}), got {pairs.tolist()}")
    pairs = pairs.to(device=W.device, dtype=torch.int64)
    return principal_angles(W[pairs[:, 0]], W[pairs[:, 1]])


def haar_angle_samples(
    d: int, d_k: int, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``[n, d_k]`` principal angles (ascending) between ``n`` independent pairs of Haar ``d_k``-planes in R^d.

    The Monte-Carlo null for :func:`pair_angles` (its quantiles per angle index are the Haar band of the
    angle spectrum). Exact check: ``E sum_a cos^2 theta_a = d_k^2 / d``. Drawn in chunks of about 64 MB
    of frames (5000 pairs at d = 2048, d_k = 64 are 10 GB in one piece).
    """
    d, d_k, n = (_as_int(k, v) for k, v in (("d", d), ("d_k", d_k), ("n", n)))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def draw(m: int) -> Tensor:
        frames = haar_frames(d, d_k, 2 * m, generator, dtype=dtype).reshape(m, 2, d, d_k)
        return principal_angles(frames[:, 0], frames[:, 1])

    return _in_chunks(n, 2 * d * d_k * _itemsize(dtype), draw)


def _check_square(name: str, D: Tensor) -> Tensor:
    if not isinstance(D, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(D).__name__}")
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 2:
        raise ValueError(f"{name} must be a square [H, H] matrix with H >= 2, got {tuple(D.shape)}")
    if D.is_complex():
        raise ValueError(f"{name} must be real")
    D = D.to(torch.float64) if not D.is_floating_point() else D
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return D


def linkage(D: Tensor, method: str = "average", *, atol: float = 1e-10) -> Tensor:
    """Agglomerative (hierarchical) clustering of a distance matrix, in scipy's ``linkage`` format.

    ``D``: ``[n, n]`` symmetric, non-negative, zero diagonal (checked to ``atol``), e.g. ``1 - O`` for an
    overlap matrix. ``method``: ``single`` (min), ``complete`` (max) or ``average`` (UPGMA: the mean of
    the pairwise distances between the two clusters), by the Lance-Williams updates. Returns
    ``Z`` ``[n-1, 4]`` float64: row ``t`` merges clusters ``Z[t,0] < Z[t,1]`` (ids < n are points, id
    ``n + s`` is the cluster formed at row ``s``) at height ``Z[t,2]`` into a cluster of ``Z[t,3]`` points,
    exactly as ``scipy.cluster.hierarchy.linkage(squareform(D), method)``. The naive O(n^3) greedy
    algorithm (always merge the closest pair; ties by the lowest flat index), pure torch: meant for head
    counts (n of order 10-100). All three methods are monotone, so the heights are non-decreasing.
    """
    D = _check_square("D", D)
    if method not in _LINKAGES:
        raise ValueError(f"method must be one of {_LINKAGES}, got {method!r}")
    if not torch.allclose(D, D.T, atol=atol, rtol=0):
        raise ValueError(f"D must be symmetric (to atol={atol})")
    if bool((D < -atol).any()) or bool((torch.diagonal(D).abs() > atol).any()):
        raise ValueError(f"D must be non-negative with a zero diagonal (to atol={atol})")
    n = D.shape[0]
    dist = ((D + D.T) / 2).to(torch.float64).clamp_min(0.0).clone()
    inf = torch.tensor(math.inf, dtype=dist.dtype, device=dist.device)
    dist.fill_diagonal_(math.inf)
    size = [1.0] * n
    ids = list(range(n))
    active = torch.ones(n, dtype=torch.bool, device=dist.device)
    Z = torch.empty(n - 1, 4, dtype=torch.float64)
    for step in range(n - 1):
        masked = torch.where(active[:, None] & active[None, :], dist, inf)
        flat = int(torch.argmin(masked))
        a, b = divmod(flat, n)
        a, b = min(a, b), max(a, b)
        height = float(dist[a, b])
        Z[step] = torch.tensor([min(ids[a], ids[b]), max(ids[a], ids[b]), height, size[a] + size[b]], dtype=torch.float64)
        if method == "single":
            new = torch.minimum(dist[a], dist[b])
        elif method == "complete":
            new = torch.maximum(dist[a], dist[b])
        else:
            new = (size[a] * dist[a] + size[b] * dist[b]) / (size[a] + size[b])
        dist[a, :] = new
        dist[:, a] = new
        dist[a, a] = math.inf
        size[a] += size[b]
        ids[a] = n + step
        active[b] = False
    return Z


def _check_linkage(Z: Tensor) -> int:
    if not isinstance(Z, Tensor):
        raise TypeError(f"Z must be a torch.Tensor, got {type(Z).__name__}")
    if Z.ndim != 2 or Z.shape[-1] != 4 or Z.shape[0] < 1:
        raise ValueError(f"Z must be a linkage matrix [n-1, 4] (see flagcore.heads.linkage), got {tuple(Z.shape)}")
    return Z.shape[0] + 1


def cut_linkage(Z: Tensor, threshold: float) -> Tensor:
    """Flat clusters: apply the merges of ``Z`` with height ``<= threshold``; ``[n]`` int64 labels ``0, 1, ...``
    numbered by first appearance (point 0 is in cluster 0). Same partition as
    ``scipy.cluster.hierarchy.fcluster(Z, threshold, criterion="distance")`` for monotone linkages.
    """
    n = _check_linkage(Z)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rep = list(range(n)) + [0] * (n - 1)  # a representative point of every cluster id
    for t in range(n - 1):
        a, b, h = int(Z[t, 0]), int(Z[t, 1]), float(Z[t, 2])
        if not (0 <= a < n + t and 0 <= b < n + t):
            raise ValueError(f"Z row {t} merges ids ({a}, {b}); only ids < {n + t} exist at that step")
        rep[n + t] = rep[a]
        if h <= threshold:
            parent[find(rep[a])] = find(rep[b])
    labels, seen = [], {}
    for i in range(n):
        labels.append(seen.setdefault(find(i), len(seen)))
    return torch.tensor(labels, dtype=torch.int64)


def leaf_order(Z: Tensor) -> Tensor:
    """The dendrogram's left-to-right leaf order (``scipy.cluster.hierarchy.leaves_list``): ``[n]`` int64.
    Use it to permute an overlap matrix so that clusters appear as diagonal blocks."""
    n = _check_linkage(Z)
    order, stack = [], [2 * n - 2]
    while stack:
        node = stack.pop()
        if node < n:
            order.append(node)
        else:
            t = node - n
            stack.append(int(Z[t, 1]))  # right child popped after the left one
            stack.append(int(Z[t, 0]))
    return torch.tensor(order, dtype=torch.int64)


# --------------------------------------------------------------------------- synthetic heads with a chosen R


def planted_copies(
    H: int, d: int, d_k: int, copies: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``[H, d, d_k]`` heads: the first ``copies`` span one common Haar plane (each with its own random
    basis of it, so the weights differ), the other ``H - copies`` are independent Haar planes.

    Overlap matrix: a ``copies x copies`` block of ones, the rest ``~ d_k/d``; so
    ``E[R] = [c(c-1) + (H(H-1) - c(c-1)) d_k/d] / (H(H-1))`` with ``c = copies``.
    """
    H, d, d_k, copies = (_as_int(k, v) for k, v in (("H", H), ("d", d), ("d_k", d_k), ("copies", copies)))
    if H < 2 or not 2 <= copies <= H:
        raise ValueError(f"need H >= 2 and 2 <= copies <= H, got H={H}, copies={copies}")
    frames = haar_frames(d, d_k, H - copies + 1, generator, dtype=dtype)
    mix = haar_frames(d_k, d_k, copies, generator, dtype=dtype)  # random in-plane bases
    shared = frames[0] @ mix  # [copies, d, d_k], one span
    return torch.cat([shared, frames[1:]], dim=0)


def shared_core_heads(
    H: int,
    d: int,
    d_k: int,
    R: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-12,
) -> Tensor:
    """``[H, d, d_k]`` heads that all partially overlap, with head overlap exactly ``R`` (to ``tol``).

    Head ``h`` spans ``U + s G_h``: one common Haar frame ``U`` plus its own Gaussian perturbation ``G_h``
    (entries N(0, 1/d)); ``s`` is found by bisection on ``log s`` so that :func:`head_overlap` equals
    ``R``. Every pair then has about the same overlap ``O_ij ~ R`` and no two heads share a direction.
    ``R`` must lie strictly between the value at the largest scale tried (``s = 1e4``, about ``d_k/d``)
    and 1.
    """
    H, d, d_k = (_as_int(k, v) for k, v in (("H", H), ("d", d), ("d_k", d_k)))
    R = float(R)
    U = haar_frames(d, d_k, 1, generator, dtype=dtype)[0]
    G = torch.randn(H, d, d_k, generator=generator, dtype=dtype, device=U.device) / math.sqrt(d)

    def r_of(log_s: float) -> float:
        return float(head_overlap(U + math.exp(log_s) * G))

    lo, hi = math.log(1e-6), math.log(1e4)  # r_of(lo) ~ 1, r_of(hi) ~ d_k/d
    r_lo, r_hi = r_of(lo), r_of(hi)
    if not r_hi < R < r_lo:
        raise ValueError(f"R must lie in ({r_hi:.6f}, {r_lo:.6f}) for d={d}, d_k={d_k}, H={H}; got {R}")
    for _ in range(200):
        mid = (lo + hi) / 2
        r_mid = r_of(mid)
        if abs(r_mid - R) <= tol:
            break
        if r_mid > R:
            lo = mid
        else:
            hi = mid
    return U + math.exp(mid) * G


# --------------------------------------------------------------------------- profiles of real models and of training runs

#: Monte-Carlo draws of the null of a latent stack's heads (its sd estimate is good to 1/sqrt(2n) = 5 %).
LATENT_NULL_DRAWS = 200


def profile_rows(
    source,
    layers: Sequence[int] | None = None,
    roles: Sequence[str] = ("q",),
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable | None = None,
) -> list[dict]:
    """One row per (layer, role) of a model: ``R`` of that role's heads, its null, the excess ``R - null``
    and the z-score, in one pass over the layers (``progress`` wraps the layer iterator, e.g. tqdm).

    The null is Haar's closed form (:func:`haar_overlap_baseline`), or for a latent stack, whose heads live
    in a low-rank space, Monte Carlo over random weights of the layer's shapes cut by the same layout
    (:func:`layout_null_samples`, :data:`LATENT_NULL_DRAWS` draws, seed 0). A role with fewer than two heads
    is a row with ``status`` "not run: fewer than 2 heads" and no numbers."""
    src = open_source(source)
    baselines: dict = {}
    generator = torch.Generator().manual_seed(0)

    def null(role, n, d, d_k, layer):
        if not src.spelling.latent:
            return baselines.setdefault((n, d, d_k), haar_overlap_baseline(d, d_k, n))
        if (role, n, d, d_k) not in baselines:
            draws = layout_null_samples(src, layer, role, LATENT_NULL_DRAWS, generator)
            baselines[(role, n, d, d_k)] = HaarBaseline(d, d_k, n, draws.mean().item(), draws.std().item())
        return baselines[(role, n, d, d_k)]

    rows = []
    layer_iter = iter_layers(src, layers, roles, dtype=dtype, contiguous=False)
    for layer, heads in (progress(layer_iter) if progress is not None else layer_iter):
        for role in roles:
            W = heads[role]
            n, d, d_k = W.shape
            if n < 2:
                rows.append({"layer": layer, "role": role, "heads": n, "d_k": d_k, "R": None, "baseline": None,
                             "baseline_sd": None, "excess": None, "z": None, "status": "not run: fewer than 2 heads"})
                continue
            b = null(role, n, d, d_k, layer)
            R = float(head_overlap(W))
            rows.append({"layer": layer, "role": role, "heads": n, "d_k": d_k, "R": R, "baseline": b.mean,
                         "baseline_sd": b.sd, "excess": R - b.mean, "z": b.z(R), "status": "measured"})
    return rows


def rise_statistics(steps, values) -> dict[str, float]:
    """How monotonically ``values`` (e.g. ``R`` at the checkpoints of a run) rise with ``steps``.

    ``up``: the share of consecutive intervals (in step order) on which the value rose strictly (1 for a
    strictly increasing series); ``rho``: Spearman's rank correlation of value and step (1 for any
    increasing series; NaN when either is constant); ``drop``: the largest fall below the running maximum,
    ``max_t [max_{s<=t} v(s) - v(t)]`` (0 for a non-decreasing series). Ties are ranked in order of
    appearance (distinct real measurements have none). Float64 throughout; 1-d inputs of one length >= 2.
    """
    t = torch.as_tensor(steps, dtype=torch.float64).flatten()
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() != v.numel() or t.numel() < 2:
        raise ValueError(f"need steps and values of one length >= 2, got {t.numel()} and {v.numel()}")
    if not (torch.isfinite(t).all() and torch.isfinite(v).all()):
        raise ValueError("steps and values must be finite")
    order = t.argsort(stable=True)
    t, v = t[order], v[order]
    ranks = [x.argsort(stable=True).argsort(stable=True).to(torch.float64) for x in (t, v)]
    rt, rv = (r - r.mean() for r in ranks)
    norm = rt.norm() * rv.norm()
    constant = bool((t == t[0]).all() or (v == v[0]).all())
    return {"up": float((v[1:] > v[:-1]).double().mean()),
            "rho": math.nan if constant else float((rt * rv).sum() / norm),
            "drop": float((torch.cummax(v, 0).values - v).max())}


@dataclass
class RevisionProfile:
    """:func:`revision_profile`'s result.

    ``rows``: one per (revision, layer, role), the columns of :func:`profile_rows` plus ``revision``,
    ``step`` and ``duplicate_of``. ``revisions``: one per revision, in the order read: ``revision``,
    ``step`` (from its name, else None), ``commit`` (Hub), ``digest`` (:class:`TensorDigest` of every
    tensor read), ``duplicate_of`` (the first earlier revision with the same digest, else None),
    ``tensors`` (how many were read), and the reader's ``requests``, ``bytes_read`` and
    ``checkpoint_bytes`` (None for a source that is not safetensors).
    """

    rows: list[dict]
    revisions: list[dict]

    def duplicates(self) -> dict[str, str]:
        """``{revision: earlier revision with byte-identical tensors}``."""
        return {r["revision"]: r["duplicate_of"] for r in self.revisions if r["duplicate_of"] is not None}

    def measured(self) -> list[dict]:
        """The rows that are data: measured, and not a byte-identical copy of an earlier revision."""
        return [row for row in self.rows if row["status"] == "measured" and row["duplicate_of"] is None]


def revision_profile(
    source,
    revisions: Sequence[str] | None = None,
    roles: Sequence[str] = ("q",),
    layers: Sequence[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: Callable | None = None,
) -> RevisionProfile:
    """Head overlap of every layer and role across the revisions (checkpoints) of a training run.

    ``source``: a Hub id (its branches, e.g. Pythia's ``step0`` ... ``step143000``) or a local run
    directory (one model directory per revision, :func:`flagcore.weights.list_revisions`).
    ``revisions``: which, read in this order (default: all, in training order). Each revision is opened
    on its own (for the Hub: pinned to its commit, only the attention tensors' byte ranges read) and
    profiled by :func:`profile_rows`. ``progress`` wraps the iterator over revisions.

    Integrity: a digest of every tensor read (:class:`flagcore.checkpoints.TensorDigest`) is kept per
    revision; a revision whose digest equals an earlier one's is a byte-identical copy (Pythia's
    ``main`` is ``step143000``; some step branches serve other revisions' files), and its rows say
    ``duplicate_of`` so that it is never counted or plotted as a new measurement
    (:meth:`RevisionProfile.measured`).
    """
    order = revision_order(list_revisions(source)) if revisions is None else list(revisions)
    if not order:
        raise ValueError("no revisions to profile")
    if len(set(order)) != len(order):
        raise ValueError(f"revisions listed twice: {sorted({r for r in order if order.count(r) > 1})}")
    rows, infos, first_of = [], [], {}
    for revision in (progress(order) if progress is not None else order):
        src = open_source(source, revision=revision)
        digest = TensorDigest()
        src.on_read = digest.add
        try:
            measured = profile_rows(src, layers, roles, dtype=dtype)
        finally:
            src.on_read = None
        key = digest.hexdigest()
        duplicate_of = first_of.setdefault(key, revision)
        duplicate_of = None if duplicate_of == revision else duplicate_of
        stats = src.checkpoint.stats() if src.checkpoint is not None else {}
        step = revision_step(revision)
        infos.append({"revision": revision, "step": step, "commit": src.commit, "digest": key,
                      "duplicate_of": duplicate_of, "tensors": len(digest), "requests": stats.get("requests"),
                      "bytes_read": stats.get("bytes_read"), "checkpoint_bytes": stats.get("checkpoint_bytes")})
        rows += [{"revision": revision, "step": step, "duplicate_of": duplicate_of, **row} for row in measured]
    return RevisionProfile(rows, infos)
