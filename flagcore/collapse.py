"""Rank collapse, LayerNorm, residuals and head channels (Cirrincione 2026, building on Dong et al. 2021).

The formulas are stated, with their provenance, in the book's appendix (Formulas and provenance: rank
collapse). Only the abstract of the rank-collapse paper survived; every
formula here is either Dong, Cordonnier & Loukas (2021) [DONG] or a derived / reconstructed
statement that the tests and notebooks verify numerically.

Conventions: token matrices are ``X [..., n, d]`` (rows are the ``n`` tokens, Dong's notation);
weights act on the right, ``X @ W`` with ``W [d_in, d_out]`` (note: ``torch.nn.Linear.weight`` is
the transpose). Theory code runs in the dtype and on the device of its input.

Contents
--------
* rank: :func:`centering`, :func:`affine_rank` (B.2), :func:`residual`, :func:`composite_norm`,
  :func:`residual_ratio` (B.1, Dong's plotted quantity);
* paths: :func:`path_count`, :func:`path_sum` (Dong's Theorem 2.1 for frozen attention);
* LayerNorm in matrix form: :func:`layer_norm`, :func:`layer_norm_scales` (B.3);
* BERT-style blocks: :class:`BertLayerWeights`, :func:`random_bert_layer`,
  :func:`bert_layers_from_state_dict`, :func:`bert_layers_from_hf`, :func:`attention_probs`,
  :func:`multi_head_attention`, :func:`block_forward`, :func:`stack_forward` (B.1, B.4, B.5);
* attention entropy: :func:`attention_entropy` (B.8);
* head channel: :func:`head_summation_matrix`, :func:`head_kernel_dim`, :func:`head_gauge` (B.6);
* PG-OP: :class:`PositionGatedOutputProjection`, :func:`pgop_overhead` (B.7).

This module never loads files: real weights are passed in as a state dict or a loaded model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from .subspace import _as_int, _as_real_float, _check_matrix

__all__ = [
    "ARCHITECTURES",
    "BertLayerWeights",
    "PositionGatedOutputProjection",
    "affine_rank",
    "attention_entropy",
    "attention_probs",
    "bert_layers_from_hf",
    "bert_layers_from_state_dict",
    "block_forward",
    "centering",
    "composite_norm",
    "head_gauge",
    "head_kernel_dim",
    "head_summation_matrix",
    "layer_norm",
    "layer_norm_scales",
    "multi_head_attention",
    "path_count",
    "path_sum",
    "pgop_overhead",
    "random_bert_layer",
    "reachable_span",
    "residual",
    "residual_ratio",
    "stack_forward",
]


# --------------------------------------------------------------------------- rank and residuals


def centering(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The centring projector ``C_n = I_n - (1/n) 1 1^T``, ``[n, n]``."""
    n = _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.eye(n, dtype=dtype, device=device) - torch.full((n, n), 1.0 / n, dtype=dtype, device=device)


def _check_tokens(name: str, X: Tensor) -> Tensor:
    X = _check_matrix(name, X)
    if X.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(X.shape)}")
    return X


def affine_rank(X: Tensor, rtol: float | None = None) -> int | Tensor:
    """Affine rank of the token set: ``dim aff{x_1..x_n} = rank(C_n X) = rank[X 1] - 1``.

    Numerically: the number of singular values of ``C_n X`` above ``rtol * ||X||_2``. The threshold is
    relative to the spectral norm of ``X`` itself, **not** of ``C_n X``: a collapsed matrix
    ``1 x^T + noise`` has a tiny ``C_n X`` whose own largest singular value would otherwise count.

    Args:
        X: ``[..., n, d]`` tokens as rows.
        rtol: default ``max(n, d) * eps(dtype)`` (numpy.linalg.matrix_rank's convention).

    Returns:
        a Python ``int`` for a single matrix, an integer tensor ``[...]`` for a batch.
        ``affine_rank(X) == 0`` iff ``X = 1 x^T`` (Dong's rank collapse).
    """
    X = _check_tokens("X", X)
    n, d = X.shape[-2], X.shape[-1]
    if rtol is None:
        rtol = max(n, d) * torch.finfo(X.dtype).eps
    if not rtol >= 0:
        raise ValueError(f"rtol must be non-negative, got {rtol}")
    scale = torch.linalg.matrix_norm(X, ord=2)
    s = torch.linalg.svdvals(X - X.mean(dim=-2, keepdim=True))
    ranks = (s > rtol * scale.unsqueeze(-1)).sum(dim=-1)
    return int(ranks) if ranks.ndim == 0 else ranks


def residual(X: Tensor, center: str = "mean") -> Tensor:
    """Dong's residual ``res(X) = X - 1 x^T``, ``[..., n, d]``.

    * ``center="mean"``: ``x`` = token mean, so ``res(X) = C_n X`` (Dong's plotting code). It is also the
      exact minimiser of ``||X - 1x^T||_F``.
    * ``center="median"``: ``x`` = column-wise median, the exact minimiser of Dong's
      ``||.||_1`` (max column sum), since each column's l1 deviation is minimised by its median.

    For the composite ``||.||_{1,inf}`` the mean is optimal up to a factor below 2: for every ``x``,
    ``||C_n X||_{1,inf} <= 2(1 - 1/n) ||X - 1 x^T||_{1,inf}`` (``C_n X = C_n (X - 1x^T)`` and the induced
    1- and inf-norms of ``C_n`` equal ``2(1-1/n)``), so ratios plotted on a log scale are unaffected.
    """
    X = _check_tokens("X", X)
    if center == "mean":
        x = X.mean(dim=-2, keepdim=True)
    elif center == "median":
        # torch.median returns the lower median for even n; use the true midpoint of the two middles
        srt = X.sort(dim=-2).values
        n = X.shape[-2]
        x = 0.5 * (srt[..., (n - 1) // 2 : (n - 1) // 2 + 1, :] + srt[..., n // 2 : n // 2 + 1, :])
    else:
        raise ValueError(f"center must be 'mean' or 'median', got {center!r}")
    return X - x


def composite_norm(X: Tensor) -> Tensor:
    """Dong's composite quantity ``||X||_{1,inf} = sqrt(||X||_1 ||X||_inf)`` (repo ``utils.py``).

    ``||X||_1`` = max column sum of ``|X|``, ``||X||_inf`` = max row sum. Square-root version (the older
    ``functions.py`` omits the root). Not a norm: it violates the triangle inequality. ``[...]``.
    """
    X = _check_tokens("X", X)
    one = X.abs().sum(dim=-2).amax(dim=-1)
    inf = X.abs().sum(dim=-1).amax(dim=-1)
    return torch.sqrt(one * inf)


def residual_ratio(X: Tensor, center: str = "mean", norm: str = "1,inf") -> Tensor:
    """``||res(X)|| / ||X||`` (Dong's per-layer plot); ``norm`` in ``{"1,inf", "fro", "2"}``. ``[...]``.

    Zero when the tokens have collapsed to one point; ``0/0`` (``X = 0``) raises.
    """
    X = _check_tokens("X", X)
    R = residual(X, center)
    if norm == "1,inf":
        num, den = composite_norm(R), composite_norm(X)
    elif norm == "fro":
        num, den = torch.linalg.matrix_norm(R), torch.linalg.matrix_norm(X)
    elif norm == "2":
        num, den = torch.linalg.matrix_norm(R, ord=2), torch.linalg.matrix_norm(X, ord=2)
    else:
        raise ValueError(f"norm must be '1,inf', 'fro' or '2', got {norm!r}")
    if bool((den == 0).any()):
        raise ValueError("X is the zero matrix: the residual ratio is 0/0")
    return num / den


# --------------------------------------------------------------------------- path decomposition


def path_count(L: int, H: int, k: int | None = None, skip: bool = True) -> int:
    """Number of paths in Dong's decomposition (Thm 2.1).

    With skips a path picks, per layer, the identity or one of ``H`` heads: ``C(L, k) H^k`` paths of
    length ``k`` (``k`` non-skipped layers), ``(1 + H)^L`` in all (``k=None``). Without skips every
    path has length ``L``: ``H^L`` (and 0 for ``k != L``).
    """
    L, H = _as_int("L", L), _as_int("H", H)
    if L < 0 or H < 1:
        raise ValueError(f"need L >= 0 and H >= 1, got L={L}, H={H}")
    if k is None:
        return (1 + H) ** L if skip else H**L
    k = _as_int("k", k)
    if not 0 <= k <= L:
        raise ValueError(f"path length k must be in [0, L={L}], got {k}")
    if not skip:
        return H**L if k == L else 0
    return math.comb(L, k) * H**k


def path_sum(X: Tensor, P: Tensor, W: Tensor, skip: bool = True) -> tuple[Tensor, dict[int, int]]:
    """Evaluate a linear (frozen-attention) SAN by summing Dong's paths explicitly (Thm 2.1).

    The network is ``X_{l+1} = [X_l +] sum_h P[l,h] X_l W[l,h]`` (no biases). Each path chooses per layer
    a head ``h_l`` or (with ``skip``) the identity; its term is ``P_path X W_path`` with
    ``P_path = P^L_{h_L} ... P^1_{h_1}`` and ``W_path = W^1_{h_1} ... W^L_{h_L}``.

    Args:
        X: ``[n, d]``; P: ``[L, H, n, n]``; W: ``[L, H, d, d]``.

    Returns:
        ``(sum over all paths [n, d], {length k: number of paths enumerated})``. Enumerates
        ``(1+H)^L`` paths: meant for small ``L, H`` as an independent oracle.
    """
    X = _check_tokens("X", X)
    P, W = _as_real_float("P", P), _as_real_float("W", W)
    n, d = X.shape
    if P.ndim != 4 or P.shape[2:] != (n, n) or W.ndim != 4 or W.shape[2:] != (d, d) or P.shape[:2] != W.shape[:2]:
        raise ValueError(f"expected P [L, H, {n}, {n}] and W [L, H, {d}, {d}] with the same L, H; got {tuple(P.shape)}, {tuple(W.shape)}")
    L, H = P.shape[:2]
    choices = ([-1] if skip else []) + list(range(H))
    total = torch.zeros_like(X)
    counts: dict[int, int] = {}
    for path in itertools.product(choices, repeat=L):
        Pp = torch.eye(n, dtype=X.dtype, device=X.device)
        Wp = torch.eye(d, dtype=X.dtype, device=X.device)
        for layer, h in enumerate(path):
            if h >= 0:
                Pp = P[layer, h] @ Pp
                Wp = Wp @ W[layer, h]
        total = total + Pp @ X @ Wp
        k = sum(h >= 0 for h in path)
        counts[k] = counts.get(k, 0) + 1
    return total, counts


# --------------------------------------------------------------------------- LayerNorm in matrix form


def layer_norm_scales(X: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-token scales ``s_i = sqrt(||C_d x_i||^2 / d + eps)``, ``[..., n]``."""
    X = _check_tokens("X", X)
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    Xc = X - X.mean(dim=-1, keepdim=True)
    return torch.sqrt((Xc * Xc).mean(dim=-1) + eps)


def layer_norm(X: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """LayerNorm per token in matrix form ``LN(X) = D^{-1} X C_d Gamma + 1 beta^T``.

    ``D = diag(s_i)`` (:func:`layer_norm_scales`), ``C_d`` the feature-centring projector,
    ``Gamma = diag(gamma)``. Equals ``torch.nn.functional.layer_norm(X, (d,), gamma, beta, eps)``.
    ``eps = 0`` on a token with ``C_d x_i = 0`` is 0/0 and raises. Shapes ``[..., n, d] -> [..., n, d]``.
    """
    X = _check_tokens("X", X)
    d = X.shape[-1]
    gamma = torch.ones(d, dtype=X.dtype, device=X.device) if gamma is None else _as_real_float("gamma", gamma)
    beta = torch.zeros(d, dtype=X.dtype, device=X.device) if beta is None else _as_real_float("beta", beta)
    if gamma.shape != (d,) or beta.shape != (d,):
        raise ValueError(f"gamma and beta must have shape ({d},), got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    s = layer_norm_scales(X, eps)
    if bool((s == 0).any()):
        raise ValueError("a token is constant across features and eps = 0: LayerNorm is 0/0 there")
    Cd = centering(d, dtype=X.dtype, device=X.device)
    return (X @ Cd) / s.unsqueeze(-1) * gamma.to(X.dtype) + beta.to(X.dtype)


# --------------------------------------------------------------------------- BERT-style blocks

#: named architectures for :func:`block_forward`: (skip, mlp, ln)
ARCHITECTURES = {
    "san": (False, False, False),
    "san+skip": (True, False, False),
    "san+ln": (False, False, True),
    "san+skip+ln": (True, False, True),
    "san+mlp": (False, True, False),
    "san+skip+mlp": (True, True, False),
    "san+mlp+ln": (False, True, True),
    "full": (True, True, True),
}


@dataclass(frozen=True)
class BertLayerWeights:
    """One BERT encoder layer, weights acting on the right (``X @ W``).

    ``Wq, Wk, Wv [d, H*d_k]``, ``Wo [H*d_k, d]`` (rows ``h*d_k:(h+1)*d_k`` are ``W_O^h``), ``W1 [d, d_ff]``,
    ``W2 [d_ff, d]``; biases ``[out]``; ``ln1`` after attention, ``ln2`` after the MLP (post-LN, as BERT).
    """

    Wq: Tensor
    bq: Tensor
    Wk: Tensor
    bk: Tensor
    Wv: Tensor
    bv: Tensor
    Wo: Tensor
    bo: Tensor
    ln1_gamma: Tensor
    ln1_beta: Tensor
    W1: Tensor
    b1: Tensor
    W2: Tensor
    b2: Tensor
    ln2_gamma: Tensor
    ln2_beta: Tensor
    heads: int
    eps: float = 1e-12

    def __post_init__(self) -> None:
        d, hd = self.Wq.shape
        H = _as_int("heads", self.heads)
        if H < 1 or hd % H:
            raise ValueError(f"the query width {hd} must be a positive multiple of heads={H}")
        d_ff = self.W1.shape[1]
        want = dict(
            Wq=(d, hd), bq=(hd,), Wk=(d, hd), bk=(hd,), Wv=(d, hd), bv=(hd,), Wo=(hd, d), bo=(d,),
            ln1_gamma=(d,), ln1_beta=(d,), W1=(d, d_ff), b1=(d_ff,), W2=(d_ff, d), b2=(d,), ln2_gamma=(d,), ln2_beta=(d,),
        )
        for name, shape in want.items():
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")

    @property
    def d(self) -> int:
        return self.Wq.shape[0]

    @property
    def d_k(self) -> int:
        return self.Wq.shape[1] // self.heads

    def to(self, *args, **kwargs) -> BertLayerWeights:
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        return replace(self, **{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def with_(self, **changes) -> BertLayerWeights:
        """A copy with some tensors replaced (e.g. ``Wo=0`` for the B.4 witness)."""
        return replace(self, **changes)


def random_bert_layer(
    d: int = 768,
    heads: int = 12,
    d_ff: int | None = None,
    std: float = 0.02,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    eps: float = 1e-12,
) -> BertLayerWeights:
    """A BERT layer at initialisation: weights i.i.d. ``N(0, std^2)``, zero biases, ``gamma=1, beta=0``.

    ``std=0.02`` is BERT's ``initializer_range``; ``std=1/sqrt(d)`` the variance-preserving scale used in
    the book's rank-collapse test. ``d_ff`` defaults to ``4 d`` (BERT-base: 3072). Sampled on the CPU generator.
    """
    d, heads = _as_int("d", d), _as_int("heads", heads)
    d_ff = 4 * d if d_ff is None else _as_int("d_ff", d_ff)
    if d < 1 or heads < 1 or d % heads or d_ff < 1:
        raise ValueError(f"need d divisible by heads and positive sizes; got d={d}, heads={heads}, d_ff={d_ff}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")

    def w(*shape):
        return std * torch.randn(*shape, generator=generator, dtype=dtype)

    z = lambda k: torch.zeros(k, dtype=dtype)  # noqa: E731
    return BertLayerWeights(
        Wq=w(d, d), bq=z(d), Wk=w(d, d), bk=z(d), Wv=w(d, d), bv=z(d), Wo=w(d, d), bo=z(d),
        ln1_gamma=torch.ones(d, dtype=dtype), ln1_beta=z(d), W1=w(d, d_ff), b1=z(d_ff), W2=w(d_ff, d), b2=z(d),
        ln2_gamma=torch.ones(d, dtype=dtype), ln2_beta=z(d), heads=heads, eps=eps,
    )


def bert_layers_from_state_dict(
    state_dict: dict[str, Tensor], heads: int, eps: float = 1e-12, prefix: str | None = None, dtype: torch.dtype = torch.float64
) -> list[BertLayerWeights]:
    """All encoder layers of a HF BERT state dict (``...encoder.layer.{i}.attention.self.query.weight`` ...).

    ``prefix`` defaults to whatever precedes ``encoder.layer.0.`` in the keys (``""`` or ``"bert."``).
    ``nn.Linear`` weights are transposed to act on the right. Cast to ``dtype`` (float64 by default).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if prefix is None:
        hits = [k[: k.index("encoder.layer.0.")] for k in state_dict if "encoder.layer.0." in k]
        if not hits:
            raise ValueError("no key contains 'encoder.layer.0.': not a BERT encoder state dict")
        prefix = hits[0]
    layers = []
    for i in itertools.count():
        p = f"{prefix}encoder.layer.{i}."
        if p + "attention.self.query.weight" not in state_dict:
            break

        def g(name, transpose=False):
            key = p + name
            if key not in state_dict:
                raise ValueError(f"missing key {key!r}")
            t = state_dict[key].detach().to(dtype)
            return t.T.contiguous() if transpose else t

        layers.append(
            BertLayerWeights(
                Wq=g("attention.self.query.weight", True), bq=g("attention.self.query.bias"),
                Wk=g("attention.self.key.weight", True), bk=g("attention.self.key.bias"),
                Wv=g("attention.self.value.weight", True), bv=g("attention.self.value.bias"),
                Wo=g("attention.output.dense.weight", True), bo=g("attention.output.dense.bias"),
                ln1_gamma=g("attention.output.LayerNorm.weight"), ln1_beta=g("attention.output.LayerNorm.bias"),
                W1=g("intermediate.dense.weight", True), b1=g("intermediate.dense.bias"),
                W2=g("output.dense.weight", True), b2=g("output.dense.bias"),
                ln2_gamma=g("output.LayerNorm.weight"), ln2_beta=g("output.LayerNorm.bias"),
                heads=heads, eps=eps,
            )
        )
    if not layers:
        raise ValueError(f"no encoder layers found under prefix {prefix!r}")
    return layers


def bert_layers_from_hf(model: nn.Module, dtype: torch.dtype = torch.float64) -> list[BertLayerWeights]:
    """The encoder layers of an already-loaded HF ``BertModel`` (uses its ``config`` for heads and eps)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "state_dict"):
        raise TypeError(f"model must be a loaded transformers BertModel, got {type(model).__name__}")
    return bert_layers_from_state_dict(
        model.state_dict(), heads=config.num_attention_heads, eps=config.layer_norm_eps, dtype=dtype
    )


def _check_layer_input(X: Tensor, layer: BertLayerWeights) -> Tensor:
    if not isinstance(layer, BertLayerWeights):
        raise TypeError(f"layer must be a BertLayerWeights, got {type(layer).__name__}")
    X = _check_tokens("X", X)
    if X.shape[-1] != layer.d:
        raise ValueError(f"X has {X.shape[-1]} features but the layer expects d = {layer.d}")
    return X


def attention_probs(X: Tensor, layer: BertLayerWeights) -> Tensor:
    """Per-head attention ``P_h = softmax_row((X Wq_h + bq_h)(X Wk_h + bk_h)^T / sqrt(d_k))``.

    ``[..., n, d] -> [..., H, n, n]``; every row is a probability vector. No mask (one unpadded sequence).
    """
    X = _check_layer_input(X, layer)
    H, dk = layer.heads, layer.d_k
    q = (X @ layer.Wq + layer.bq).unflatten(-1, (H, dk)).transpose(-3, -2)
    k = (X @ layer.Wk + layer.bk).unflatten(-1, (H, dk)).transpose(-3, -2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dk), dim=-1)


def multi_head_attention(X: Tensor, layer: BertLayerWeights, return_heads: bool = False):
    """``MHA(X) = sum_h P_h (X Wv_h + bv_h) Wo^h + 1 bo^T``, ``[..., n, d]``.

    With ``return_heads`` also the per-head signals ``Z_h = P_h (X Wv_h + bv_h)``, ``[..., H, n, d_k]``,
    so that ``MHA(X) = concat_h(Z_h) Wo + bo``.
    """
    X = _check_layer_input(X, layer)
    H, dk = layer.heads, layer.d_k
    P = attention_probs(X, layer)
    v = (X @ layer.Wv + layer.bv).unflatten(-1, (H, dk)).transpose(-3, -2)
    Z = P @ v
    out = Z.transpose(-3, -2).flatten(-2) @ layer.Wo + layer.bo
    return (out, Z) if return_heads else out


def _gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x)  # exact erf GELU, as BERT's hidden_act="gelu"


def block_forward(X: Tensor, layer: BertLayerWeights, arch: str = "full") -> Tensor:
    """One BERT-style block with parts switched on or off.

    ``h = MHA(X)``; ``skip``: ``h = X + h``; ``ln``: ``h = LN1(h)``; then if ``mlp``:
    ``m = GELU(h W1 + b1) W2 + b2``, ``skip``: ``m = h + m``, ``ln``: ``m = LN2(m)``. ``arch`` is a key of
    :data:`ARCHITECTURES`; ``"full"`` is exactly HF ``BertLayer`` (post-LN) in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    skip, mlp, ln = ARCHITECTURES[arch]
    h = multi_head_attention(X, layer)
    if skip:
        h = X + h
    if ln:
        h = layer_norm(h, layer.ln1_gamma, layer.ln1_beta, layer.eps)
    if not mlp:
        return h
    m = _gelu(h @ layer.W1 + layer.b1) @ layer.W2 + layer.b2
    if skip:
        m = h + m
    if ln:
        m = layer_norm(m, layer.ln2_gamma, layer.ln2_beta, layer.eps)
    return m


def stack_forward(X: Tensor, layers: list[BertLayerWeights], arch: str = "full") -> list[Tensor]:
    """Hidden states ``[X_0, X_1, ..., X_L]`` of a stack of :func:`block_forward` blocks."""
    if not layers:
        raise ValueError("layers must be a non-empty list of BertLayerWeights")
    states = [_check_tokens("X", X)]
    for layer in layers:
        states.append(block_forward(states[-1], layer, arch))
    return states


# --------------------------------------------------------------------------- attention-reachable span (B.5)


def reachable_span(S0: Tensor, layers: list[BertLayerWeights], arch: str = "san+skip+ln", rtol: float = 1e-10) -> Tensor:
    """Orthonormal basis ``[d, r]`` of the attention-reachable span ``K_L(S_0)`` (RECONSTRUCTED).

    Every output row of an attention-only stack (``arch`` without ``mlp``; any heads, skips, post-LN,
    any biases) whose input rows lie in ``S_0 = col(S0)`` lies in ``K_L``, built layer by layer:
    ``K <- span(K [skip], K Wv_h Wo^h (h = 1..H), b_attn)``, then with LN ``K <- K C_d Gamma + span(beta)``,
    where ``b_attn = sum_h bv_h Wo^h + bo`` (attention rows are convex combinations, so value biases pass
    through unchanged; query/key biases only change ``P``). ``K_L`` depends on the input only through ``S_0``.

    Args:
        S0: ``[d, k]`` spanning matrix of the input row space. rtol: rank cut-off of each basis, relative
            to the largest singular value of the (column-normalised) spanning set.
    """
    if arch not in ARCHITECTURES or ARCHITECTURES[arch][1]:
        raise ValueError(f"arch must be an attention-only architecture {[a for a, v in ARCHITECTURES.items() if not v[1]]}, got {arch!r}")
    if not layers:
        raise ValueError("layers must be a non-empty list of BertLayerWeights")
    skip, _, ln = ARCHITECTURES[arch]
    S0 = _check_matrix("S0", S0, batched=False)
    if S0.shape[0] != layers[0].d:
        raise ValueError(f"S0 lives in R^{S0.shape[0]} but the layers have d = {layers[0].d}")

    def span(cols: list[Tensor]) -> Tensor:
        M = torch.cat(cols, dim=1)
        norms = torch.linalg.vector_norm(M, dim=0)
        M = M[:, norms > 0] / norms[norms > 0]
        if M.shape[1] == 0:
            return M
        U, s, _ = torch.linalg.svd(M, full_matrices=False)
        return U[:, : int((s > rtol * s[0]).sum())]

    K = span([S0])
    for layer in layers:
        H, dk = layer.heads, layer.d_k
        cols = [K] if skip else []
        for h in range(H):
            Wvo = layer.Wv[:, h * dk : (h + 1) * dk] @ layer.Wo[h * dk : (h + 1) * dk]
            cols.append((K.T @ Wvo).T)
        b_attn = layer.bv @ layer.Wo + layer.bo
        cols.append(b_attn[:, None])
        K = span(cols)
        if ln:
            Cd = centering(layer.d, dtype=K.dtype, device=K.device)
            K = span([((K.T @ Cd) * layer.ln1_gamma).T, layer.ln1_beta[:, None]])
    return K


# --------------------------------------------------------------------------- entropy


def attention_entropy(P: Tensor, atol: float = 1e-6) -> Tensor:
    """Row entropies ``Ent(P_i) = -sum_j P_ij log P_ij`` in nats, with ``0 log 0 = 0``, ``[..., n]``.

    ``P [..., n, m]`` must be row-stochastic: entries ``>= -atol`` and rows summing to 1 within ``atol``.
    Values lie in ``[0, log m]``.
    """
    P = _check_tokens("P", P)
    if bool((P < -atol).any()) or bool(((P.sum(dim=-1) - 1).abs() > atol).any()):
        raise ValueError(f"P must be row-stochastic (non-negative rows summing to 1 within atol={atol})")
    P = P.clamp_min(0)
    return -torch.where(P > 0, P * torch.log(torch.where(P > 0, P, 1.0)), 0.0).sum(dim=-1)


# --------------------------------------------------------------------------- head channel (B.6)


def _check_wo(Wo: Tensor, heads: int) -> tuple[Tensor, int, int]:
    Wo = _check_matrix("Wo", Wo, batched=False)
    heads = _as_int("heads", heads)
    if heads < 1 or Wo.shape[0] % heads:
        raise ValueError(f"Wo must have H*d_k rows with H = heads = {heads}; got shape {tuple(Wo.shape)}")
    return Wo, heads, Wo.shape[0] // heads


def head_summation_matrix(Wo: Tensor, heads: int, n: int) -> Tensor:
    """The explicit matrix of ``Phi: (Z_1..Z_H) -> sum_h Z_h Wo^h`` on row-major ``vec``.

    Input coordinates: ``n * H * d_k`` (the concatenation ``Z = [Z_1 ... Z_H] [n, H*d_k]``, vectorised by rows),
    output ``n * d``. Equal to ``kron(I_n, Wo^T)``. A brute-force oracle for :func:`head_kernel_dim`.
    """
    Wo, heads, _ = _check_wo(Wo, heads)
    n = _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.kron(torch.eye(n, dtype=Wo.dtype, device=Wo.device), Wo.T.contiguous())


def head_kernel_dim(Wo: Tensor, heads: int, n: int, rtol: float | None = None) -> int:
    """``dim ker Phi = n (H d_k - rank Wo)`` (DERIVED): the head signals invisible downstream.

    Equals the abstract's ``n (H-1) d_k`` exactly when ``rank Wo = d_k`` (one shared channel, e.g. all
    ``Wo^h`` equal); 0 when ``Wo`` has full row rank ``H d_k`` (generic BERT-base: ``H d_k = d``).
    ``rtol`` as in :func:`flagcore.subspace.orthonormal_basis` (default ``max(shape) * eps``).
    """
    Wo, heads, dk = _check_wo(Wo, heads)
    n = _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    s = torch.linalg.svdvals(Wo)
    if rtol is None:
        rtol = max(Wo.shape) * torch.finfo(Wo.dtype).eps
    r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return n * (heads * dk - r)


def head_gauge(Wo: Tensor, heads: int, n: int, generator: torch.Generator | None = None, rtol: float | None = None) -> Tensor:
    """A random gauge perturbation ``Delta [H, n, d_k]`` with ``sum_h Delta_h Wo^h = 0``.

    Each row of ``[Delta_1 ... Delta_H]`` is a random combination of an orthonormal basis of the left null
    space of ``Wo`` (zero when ``Wo`` has full row rank). Adding it to the head signals changes every
    head's output and leaves the layer's output unchanged.
    """
    Wo, heads, dk = _check_wo(Wo, heads)
    n = _as_int("n", n)
    U, s, _ = torch.linalg.svd(Wo, full_matrices=True)
    if rtol is None:
        rtol = max(Wo.shape) * torch.finfo(Wo.dtype).eps
    r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    N = U[:, r:]  # [H d_k, H d_k - r]
    coeff = torch.randn(n, N.shape[1], generator=generator, dtype=Wo.dtype).to(Wo.device)
    return (coeff @ N.T).reshape(n, heads, dk).transpose(0, 1)


# --------------------------------------------------------------------------- PG-OP (B.7)


class PositionGatedOutputProjection(nn.Module):
    """PG-OP, reconstructed: ``O_i = sum_h g_h(i) z_{h,i} Wo^h + bo``, ``g(i) = 2 sigmoid(u_i Wg + bg)``.

    ``out_proj = nn.Linear(H d_k, d)`` is the standard output projection; ``gate = nn.Linear(d, H)`` maps the
    position embedding (or the token's layer input) ``u_i`` to one gate per head. The gate is
    zero-initialised, so ``g = 1`` and the module equals the plain output projection at init.
    Parameter overhead ``(d+1)H / ((H d_k + 1) d)``, i.e. ``1/d_k`` when ``H d_k = d`` (:func:`pgop_overhead`).

    ``forward(z, u)``: ``z [..., n, H*d_k]`` the concatenated head signals, ``u [..., n, d]``.
    """

    def __init__(self, d: int, heads: int, d_k: int | None = None, bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        d, heads = _as_int("d", d), _as_int("heads", heads)
        if d_k is None:
            if heads < 1 or d % heads:
                raise ValueError(f"d={d} must be divisible by heads={heads} (or pass d_k)")
            d_k = d // heads
        d_k = _as_int("d_k", d_k)
        if min(d, heads, d_k) < 1:
            raise ValueError(f"sizes must be positive, got d={d}, heads={heads}, d_k={d_k}")
        self.d, self.heads, self.d_k = d, heads, d_k
        self.out_proj = nn.Linear(heads * d_k, d, bias=bias, dtype=dtype)
        self.gate = nn.Linear(d, heads, bias=bias, dtype=dtype)
        nn.init.zeros_(self.gate.weight)
        if bias:
            nn.init.zeros_(self.gate.bias)

    def gates(self, u: Tensor) -> Tensor:
        """``g(u) = 2 sigmoid(u Wg + bg)``, ``[..., n, H]`` in ``(0, 2)``."""
        return 2 * torch.sigmoid(self.gate(u))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        if z.shape[-1] != self.heads * self.d_k or u.shape[-1] != self.d or z.shape[:-1] != u.shape[:-1]:
            raise ValueError(
                f"expected z [..., n, {self.heads * self.d_k}] and u [..., n, {self.d}] with equal leading shape; "
                f"got {tuple(z.shape)} and {tuple(u.shape)}"
            )
        g = self.gates(u)
        zg = (z.unflatten(-1, (self.heads, self.d_k)) * g.unsqueeze(-1)).flatten(-2)
        return self.out_proj(zg)

    def overhead(self) -> float:
        """Counted: gate parameters / output-projection parameters."""
        return sum(p.numel() for p in self.gate.parameters()) / sum(p.numel() for p in self.out_proj.parameters())


def pgop_overhead(d: int, heads: int, bias: bool = True) -> float:
    """Closed form of PG-OP's overhead: ``(d+1)H / ((d+1)d) = H/d = 1/d_k`` with biases,
    ``dH / d^2`` without; both ``12/768 = 1.5625 %`` for BERT-base."""
    d, heads = _as_int("d", d), _as_int("heads", heads)
    if d < 1 or heads < 1:
        raise ValueError(f"sizes must be positive, got d={d}, heads={heads}")
    return ((d + 1) * heads) / ((d + 1) * d) if bias else (d * heads) / (d * d)
