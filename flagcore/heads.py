"""Attention-head subspaces: per-head weights of real models and the head-overlap score R (flag paper §6, §7.2).

Head ``h`` of a layer spans ``S_h = col(W_Q^{(h)})``, a ``d_k``-dimensional subspace of R^d (spec
A.14). With ``Q_h`` an orthonormal basis of ``S_h`` and ``P_h = Q_h Q_h^T``, the layer's score is

    R = 1/(H(H-1)) sum_{i != j} tr(P_i P_j) / d_k = 1/(H(H-1)) sum_{i != j} ||Q_i^T Q_j||_F^2 / d_k   (Eq. 10/12)

``R = 0`` iff the heads are mutually orthogonal, ``R = 1`` iff they coincide, and for independent
Haar-random heads ``E[R] = d_k/d`` exactly, with the standard deviation of
:func:`haar_overlap_baseline` (spec A.14, derived there).

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

from .subspace import _as_int, _check_matrix, haar_frames, orthonormal_basis
from .weights import iter_layers, open_source, repeat_kv

__all__ = [
    "HaarBaseline",
    "OverlapProfile",
    "haar_overlap_baseline",
    "haar_overlap_samples",
    "head_overlap",
    "key_heads",
    "output_heads",
    "overlap_matrix",
    "overlap_profile",
    "query_heads",
    "value_heads",
]


# --------------------------------------------------------------------------- per-head weights


def _role_heads(role: str, source, layers, dtype, repeat: bool = False) -> Iterator[tuple[int, Tensor]]:
    src = open_source(source)
    for layer, heads in iter_layers(src, layers, (role,), dtype=dtype):
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


def _check_heads(W: Tensor) -> Tensor:
    W = _check_matrix("W", W)
    if W.ndim < 3:
        raise ValueError(f"head weights must have shape [..., H, d, d_k], got {tuple(W.shape)}")
    if W.shape[-3] < 2:
        raise ValueError(f"the overlap needs at least 2 heads, got H = {W.shape[-3]}")
    return W


def _normalised_gram(W: Tensor, assume_orthonormal: bool) -> tuple[Tensor, int]:
    """The Gram matrix of the heads' orthonormal bases, ``[..., H*r, H*r]`` with block (i, j) = ``Q_i^T Q_j``.

    Fast path (least arithmetic): one raw Gram product ``G = F^T F`` of the stacked weights
    ``F = [W_1 | ... | W_H]``, then whitening by the Cholesky factors of its diagonal blocks,
    ``Q_i^T Q_j = L_i^{-1} G_ij L_j^{-T}`` with ``G_ii = L_i L_i^T``. This is exact for full-rank heads and
    needs no orthonormalisation of the ``d x d_k`` weights. It runs in float64 (the Gram squares the
    condition number, so float32 would lose digits), and falls back to SVD bases
    (:func:`flagcore.subspace.orthonormal_basis`) when a head is rank-deficient or too ill-conditioned for
    the Cholesky route (``cond(G_ii) > 1e8``).
    """
    W = _check_heads(W)
    *batch, H, d, k = W.shape
    if assume_orthonormal:
        Q = W
    else:
        F = W.to(torch.float64).transpose(-3, -2).reshape(*batch, d, H * k)
        G = F.transpose(-1, -2) @ F  # the one Gram product
        blocks = torch.diagonal(G.reshape(*batch, H, k, H, k), dim1=-4, dim2=-2).movedim(-1, -3)  # [..., H, k, k]
        L, info = torch.linalg.cholesky_ex(blocks)
        eig = torch.linalg.eigvalsh(blocks)
        well_conditioned = bool((info == 0).all()) and bool((eig[..., 0] > 1e-8 * eig[..., -1]).all())
        if well_conditioned:
            eye = torch.eye(k, dtype=G.dtype, device=G.device)
            Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)  # [..., H, k, k]
            Gb = G.reshape(*batch, H, k, H, k)
            # block (i, j) -> Linv_i @ G_ij @ Linv_j^T
            Gw = torch.einsum("...iab,...ibjc,...jdc->...iajd", Linv, Gb, Linv)
            return Gw.reshape(*batch, H * k, H * k).to(W.dtype), k
        Q = orthonormal_basis(W)
    *batch, H, d, r = Q.shape
    flat = Q.transpose(-3, -2).reshape(*batch, d, H * r)  # [..., d, H*r]: head bases side by side
    return flat.transpose(-1, -2) @ flat, r


def overlap_matrix(W: Tensor, *, assume_orthonormal: bool = False) -> Tensor:
    """``[..., H, H]`` matrix ``O_ij = ||Q_i^T Q_j||_F^2 / r = tr(P_i P_j) / r`` (spec A.14, Eq. 12).

    ``W``: ``[..., H, d, d_k]`` spanning matrices of the heads (any scaling; rank ``r`` = ``d_k``
    generically; rank-deficient heads are orthonormalised with :func:`flagcore.subspace.orthonormal_basis`,
    and a rank that differs between heads is an error). One Gram product per batch item, see
    :func:`_normalised_gram`. ``O`` is symmetric with unit diagonal and entries in [0, 1].
    """
    gram, r = _normalised_gram(W, assume_orthonormal)
    *batch, n, _ = gram.shape
    H = n // r
    return gram.reshape(*batch, H, r, H, r).square().sum(dim=(-3, -1)) / r


def head_overlap(W: Tensor, *, assume_orthonormal: bool = False) -> Tensor:
    """``R`` of Eq. (10)/(12) for heads ``W`` ``[..., H, d, d_k]``; returns ``[...]`` (0-dim for one layer).

    No loop over pairs: with ``F = [Q_1 | ... | Q_H]``, ``sum_{i,j} ||Q_i^T Q_j||_F^2 = ||F^T F||_F^2``, and
    the diagonal terms are ``||Q_i^T Q_i||_F^2 = r`` each, so ``R = (||F^T F||_F^2 - H r) / (r H (H-1))``.
    ``F^T F`` comes from one raw Gram product, whitened per head (:func:`_normalised_gram`).
    """
    gram, r = _normalised_gram(W, assume_orthonormal)
    H = gram.shape[-1] // r
    total = gram.square().sum(dim=(-2, -1))
    return (total - H * r) / (r * H * (H - 1))


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
    """Exact mean and standard deviation of ``R`` for ``H`` independent Haar ``d_k``-planes in R^d (spec A.14).

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
    """``[n]`` independent draws of ``R`` for ``H`` independent Haar heads (the empirical baseline of spec
    A.16), from :func:`flagcore.subspace.haar_frames`."""
    H, n = _as_int("H", H), _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    frames = haar_frames(d, d_k, n * H, generator, dtype=dtype).reshape(n, H, d, d_k)
    return head_overlap(frames, assume_orthonormal=True)


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
    """``R(layer)`` of a model's query heads, streamed one layer at a time (peak memory ~ one layer).

    ``dtype``: the precision of the weights and of the arithmetic (float32: R to ~1e-6). ``progress``:
    optional wrapper of the layer iterator (e.g. ``tqdm``).
    """
    src = open_source(source)
    it = query_heads(src, layers, dtype=dtype)
    if progress is not None:
        it = progress(it)
    profile = None
    for layer, W in it:
        if profile is None:
            profile = OverlapProfile(
                src.name, src.dims.d, src.dims.n_heads, src.dims.n_kv_heads, W.shape[-1],
                haar_overlap_baseline(src.dims.d, W.shape[-1], src.dims.n_heads),
            )
        profile.layers.append(layer)
        profile.R.append(float(head_overlap(W)))
    if profile is None:
        raise ValueError("no layers selected")
    return profile
