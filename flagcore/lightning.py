"""Lightning (and softmax) self-attention in the convention of Henry, Marchetti & Kohn (2025).

Convention (the book's appendix, lightning section), used by every function here:

* An input is a matrix ``X`` of shape ``[..., d, t]`` whose **columns are the tokens**
  ``x_1, ..., x_t`` (leading dimensions are a batch). Code that stores tokens as rows
  (``[N, t, d]``) must transpose first.
* A layer has weights ``W = (Q, K, V)`` with ``Q, K`` of shape ``[a, d]`` (query, key) and ``V`` of
  shape ``[d', d]`` (value). The attention matrix is ``A = K^T Q`` (``[d, d]``), so that the weight with
  which query token ``x_i`` attends to key token ``x_j`` is ``<Q x_i, K x_j> = x_j^T A x_i`` (Eq. 3).
* Lightning layer (Definition 1, Eqs. 1–2): ``phi_W(X)_i = sum_j <Q x_i, K x_j> V x_j``, i.e.
  ``phi_W(X) = V X X^T A X``, evaluated in O(t) as ``(V X (K X)^T)(Q X)``.
* Softmax layer (Eq. 15): ``phi(X)_i = sum_j softmax_j(x_j^T A x_i / tau) V x_j`` (normalized over the
  key index ``j`` for each query ``i``).
* A deep network (Definition 2, Eq. 4) is a list of layers ``[(Q_1, K_1, V_1), ..., (Q_l, K_l, V_l)]``
  with ``Q_i, K_i: [a_i, d_{i-1}]`` and ``V_i: [d_i, d_{i-1}]``.

With the transposed convention ``A = Q^T K`` every ``A`` below becomes ``A^T``; dimensions do not change.

All functions are pure and work on the device/dtype of their inputs (no global state). Nothing here
prints or plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .subspace import _as_int, _check_matrix

__all__ = [
    "attention_matrix",
    "base3_factor_indices",
    "deep_network",
    "inter_layer_action",
    "lightning_layer",
    "lightning_layer_av",
    "network_from_virtual",
    "product_form",
    "random_inputs",
    "random_weights",
    "rescale",
    "rescale_virtual",
    "softmax_layer",
    "softmax_layer_av",
    "split_parameters",
    "flatten_weights",
    "parameter_count",
    "virtual_weights",
    "quadric_layer",
    "factor_quadric",
    "fit_layer_av",
]

Weights = Sequence[tuple[Tensor, Tensor, Tensor]]


# --------------------------------------------------------------------------- validation


def _check_layer(X: Tensor, Q: Tensor, K: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    X = _check_matrix("X", X)
    Q = _check_matrix("Q", Q, batched=False)
    K = _check_matrix("K", K, batched=False)
    V = _check_matrix("V", V, batched=False)
    d = X.shape[-2]
    if Q.shape != K.shape:
        raise ValueError(f"Q and K must have the same shape [a, d], got {tuple(Q.shape)} and {tuple(K.shape)}")
    if Q.shape[-1] != d:
        raise ValueError(f"Q, K must be [a, d] with d = {d} (rows of X = token width), got {tuple(Q.shape)}")
    if V.shape[-1] != d:
        raise ValueError(f"V must be [d', d] with d = {d} (rows of X = token width), got {tuple(V.shape)}")
    return X, Q, K, V


def _check_av(X: Tensor, A: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    X = _check_matrix("X", X)
    A = _check_matrix("A", A, batched=False)
    V = _check_matrix("V", V, batched=False)
    d = X.shape[-2]
    if A.shape != (d, d):
        raise ValueError(f"A must be [d, d] with d = {d} (rows of X), got {tuple(A.shape)}")
    if V.shape[-1] != d:
        raise ValueError(f"V must be [d', d] with d = {d}, got {tuple(V.shape)}")
    return X, A, V


def _check_weights(weights: Weights) -> list[tuple[Tensor, Tensor, Tensor]]:
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError("weights must be a non-empty sequence of (Q, K, V) triples")
    out = []
    for i, layer in enumerate(weights, start=1):
        if not isinstance(layer, Sequence) or len(layer) != 3:
            raise TypeError(f"layer {i} must be a (Q, K, V) triple")
        Q = _check_matrix(f"Q_{i}", layer[0], batched=False)
        K = _check_matrix(f"K_{i}", layer[1], batched=False)
        V = _check_matrix(f"V_{i}", layer[2], batched=False)
        if Q.shape != K.shape or Q.shape[1] != V.shape[1]:
            raise ValueError(
                f"layer {i}: need Q_i, K_i of shape [a_i, d_(i-1)] and V_i of shape [d_i, d_(i-1)], "
                f"got {tuple(Q.shape)}, {tuple(K.shape)}, {tuple(V.shape)}"
            )
        if out and out[-1][2].shape[0] != Q.shape[1]:
            raise ValueError(
                f"layer {i} expects width {Q.shape[1]} but layer {i - 1} outputs width {out[-1][2].shape[0]}"
            )
        out.append((Q, K, V))
    return out


def _check_dims(d: Sequence[int], a: Sequence[int]) -> tuple[list[int], list[int]]:
    """Widths ``d = (d_0, ..., d_l)`` and query/key widths ``a = (a_1, ..., a_l)``, all positive integers."""
    if isinstance(d, (str, bytes)) or not isinstance(d, Sequence):
        raise TypeError(f"d must be a sequence of widths (d_0, ..., d_l), got {d!r}")
    if isinstance(a, (str, bytes)) or not isinstance(a, Sequence):
        raise TypeError(f"a must be a sequence of query/key widths (a_1, ..., a_l), got {a!r}")
    d = [_as_int("d[i]", x) for x in d]
    a = [_as_int("a[i]", x) for x in a]
    if len(d) < 2:
        raise ValueError(f"d must list at least (d_0, d_1), got {d}")
    if len(a) != len(d) - 1:
        raise ValueError(f"a must have one entry per layer: len(d) - 1 = {len(d) - 1}, got {len(a)} (a = {a})")
    if min(d) < 1:
        raise ValueError(f"every width d_i must be a positive integer, got d = {d}")
    if min(a) < 1:
        raise ValueError(f"every query/key width a_i must be a positive integer, got a = {a}")
    return d, a


# --------------------------------------------------------------------------- single layer


def attention_matrix(Q: Tensor, K: Tensor) -> Tensor:
    """``A = K^T Q`` (Eq. 3): ``<Q x_i, K x_j> = x_j^T A x_i``. ``Q, K: [..., a, d]`` -> ``[..., d, d]``."""
    return K.transpose(-1, -2) @ Q


def lightning_layer(X: Tensor, Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
    """Lightning self-attention (Definition 1, Eqs. 1–2 of the paper).

    ``phi_W(X) = V X X^T K^T Q X``; column ``i`` is ``sum_j <Q x_i, K x_j> V x_j``. Tokens are the
    **columns** of ``X``. Evaluated in O(t) as ``(V X (K X)^T)(Q X)``.

    Args:
        X: ``[..., d, t]`` (tokens as columns; leading dims are a batch).
        Q, K: ``[a, d]``; V: ``[d', d]``.

    Returns:
        ``[..., d', t]``.
    """
    X, Q, K, V = _check_layer(X, Q, K, V)
    return _lightning(X, Q, K, V)


def _lightning(X: Tensor, Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
    VX, KX, QX = V @ X, K @ X, Q @ X
    return (VX @ KX.transpose(-1, -2)) @ QX


def lightning_layer_av(X: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """The layer in ``(A, V)`` coordinates, ``phi_{A,V}(X) = V X X^T A X`` (Eq. 2).

    ``X: [..., d, t]`` (tokens as columns), ``A: [d, d]``, ``V: [d', d]`` -> ``[..., d', t]``.
    """
    X, A, V = _check_av(X, A, V)
    return _lightning_av(X, A, V)


def _lightning_av(X: Tensor, A: Tensor, V: Tensor) -> Tensor:
    return (V @ X) @ (X.transpose(-1, -2) @ (A @ X))


def _softmax_av(X: Tensor, A: Tensor, V: Tensor, temperature: float) -> Tensor:
    scores = X.transpose(-1, -2) @ (A @ X)  # [..., t(j), t(i)]: scores[j, i] = x_j^T A x_i
    weights = torch.softmax(scores / temperature, dim=-2)  # normalise over the key index j
    return (V @ X) @ weights


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def softmax_layer(X: Tensor, Q: Tensor, K: Tensor, V: Tensor, temperature: float = 1.0) -> Tensor:
    """Traditional (normalized) self-attention, Eq. (15) with ``S(x) = exp(x / temperature)``.

    ``phi(X)_i = sum_j S(x_j^T A x_i) / sum_k S(x_k^T A x_i) * V x_j`` with ``A = K^T Q``: the softmax
    runs over the key index ``j`` for each query ``i``. Tokens are the columns of ``X: [..., d, t]``.
    Returns ``[..., d', t]``.
    """
    X, Q, K, V = _check_layer(X, Q, K, V)
    return _softmax_av(X, attention_matrix(Q, K), V, _check_temperature(temperature))


def softmax_layer_av(X: Tensor, A: Tensor, V: Tensor, temperature: float = 1.0) -> Tensor:
    """Eq. (15) in ``(A, V)`` coordinates; see :func:`softmax_layer`."""
    X, A, V = _check_av(X, A, V)
    return _softmax_av(X, A, V, _check_temperature(temperature))


# --------------------------------------------------------------------------- deep network


def deep_network(X: Tensor, weights: Weights, normalized: bool = False, temperature: float = 1.0) -> Tensor:
    """``phi_W = phi_{W_l} o ... o phi_{W_1}`` (Definition 2, Eq. 4).

    Args:
        X: ``[..., d_0, t]``, tokens as columns.
        weights: ``[(Q_1, K_1, V_1), ..., (Q_l, K_l, V_l)]`` with ``Q_i, K_i: [a_i, d_{i-1}]``,
            ``V_i: [d_i, d_{i-1}]``.
        normalized: ``False`` = lightning layers (homogeneous of degree ``3^l`` in ``X``);
            ``True`` = softmax layers (Eq. 15).

    Returns:
        ``[..., d_l, t]``.
    """
    layers = _check_weights(weights)
    X = _check_matrix("X", X)
    if X.shape[-2] != layers[0][0].shape[1]:
        raise ValueError(f"X has token width {X.shape[-2]} but layer 1 expects d_0 = {layers[0][0].shape[1]}")
    temperature = _check_temperature(temperature)
    return _network(X, layers, normalized, temperature)


def _network(X: Tensor, layers, normalized: bool, temperature: float = 1.0) -> Tensor:
    for Q, K, V in layers:
        X = _softmax_av(X, attention_matrix(Q, K), V, temperature) if normalized else _lightning(X, Q, K, V)
    return X


def _network_tokens(X: Tensor, layers, normalized: bool, temperature: float = 1.0) -> Tensor:
    """Same map as :func:`_network` for a batch ``X: [N, d_0, t]``, written token by token with each token
    stored as a ``[d, N]`` matrix. For the small ``t`` of the dimension experiments this layout makes
    forward-mode Jacobians (vmapped over parameter directions) about 3x faster than the ``[N, d, t]``
    matrix form, whose tiny batched matmuls dominate. Cost O(t^2) per layer: use only for small ``t``."""
    t = X.shape[-1]
    Z = [X[..., j].transpose(0, 1) for j in range(t)]  # t tensors [d, N]
    for Q, K, V in layers:
        QZ, KZ, VZ = [Q @ z for z in Z], [K @ z for z in Z], [V @ z for z in Z]
        out = []
        for i in range(t):
            s = torch.stack([(KZ[j] * QZ[i]).sum(0) for j in range(t)])  # [t(j), N]: x_j^T A x_i
            if normalized:
                s = torch.softmax(s / temperature, dim=0)
            out.append(sum(VZ[j] * s[j] for j in range(t)))
        Z = out
    return torch.stack(Z, dim=-1).transpose(0, 1)  # [N, d_l, t]


# --------------------------------------------------------------------------- virtual weights, symmetries


def virtual_weights(weights: Weights) -> tuple[list[Tensor], Tensor]:
    """Virtual weights (Eq. 8): ``Abar_i = P_{i-1}^T A_i P_{i-1}``, ``Vbar = P_l``.

    Here ``A_i = K_i^T Q_i`` and ``P_0 = I``, ``P_i = V_i V_{i-1} ... V_1`` (``[d_i, d_0]``). The network
    depends on ``W`` only through ``(Abar_1, ..., Abar_l, Vbar)`` (lightning and softmax alike).

    Returns:
        ``([Abar_1, ..., Abar_l], Vbar)`` with every ``Abar_i: [d_0, d_0]`` and ``Vbar: [d_l, d_0]``.
    """
    layers = _check_weights(weights)
    Q1 = layers[0][0]
    P = torch.eye(Q1.shape[1], dtype=Q1.dtype, device=Q1.device)
    Abar = []
    for Q, K, V in layers:
        Abar.append(P.transpose(-1, -2) @ attention_matrix(Q, K) @ P)
        P = V @ P
    return Abar, P


def _check_virtual(X: Tensor, Abar: Sequence[Tensor], Vbar: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    X = _check_matrix("X", X)
    if isinstance(Abar, Tensor) or not isinstance(Abar, Sequence) or len(Abar) == 0:
        raise TypeError("Abar must be a non-empty sequence of [d_0, d_0] matrices")
    d0 = X.shape[-2]
    Abar = [_check_matrix(f"Abar_{i + 1}", A, batched=False) for i, A in enumerate(Abar)]
    for i, A in enumerate(Abar, start=1):
        if A.shape != (d0, d0):
            raise ValueError(f"Abar_{i} must be [d_0, d_0] = [{d0}, {d0}], got {tuple(A.shape)}")
    Vbar = _check_matrix("Vbar", Vbar, batched=False)
    if Vbar.shape[1] != d0:
        raise ValueError(f"Vbar must be [d_l, d_0] with d_0 = {d0}, got {tuple(Vbar.shape)}")
    return X, Abar, Vbar


def network_from_virtual(X: Tensor, Abar: Sequence[Tensor], Vbar: Tensor) -> Tensor:
    """The lightning network from its virtual weights by the recursion of Lemma 3.6 (Eqs. 10–11).

    With ``G = X X^T`` (symmetric, ``[..., d_0, d_0]``): ``M_1 = Abar_1``,
    ``M_i = M_{i-1} G M_{i-1}^T G Abar_i G M_{i-1}``, and ``phi(X) = Vbar G M_l X``. (The recursion is a
    RECONSTRUCTED equivalent of the paper's Eqs. 10–11: ``Y_i = G M_i X`` satisfies
    ``Y_i = Y_{i-1} Y_{i-1}^T Abar_i Y_{i-1}``.) ``X: [..., d_0, t]`` -> ``[..., d_l, t]``.
    """
    X, Abar, Vbar = _check_virtual(X, Abar, Vbar)
    G = X @ X.transpose(-1, -2)
    M = Abar[0]
    for A in Abar[1:]:
        M = M @ G @ M.transpose(-1, -2) @ G @ A @ G @ M
    return Vbar @ G @ M @ X


def base3_factor_indices(l: int) -> list[tuple[int, bool]]:
    """The factors ``B_1, ..., B_n`` of Eq. (12), ``n = (3^l - 1) / 2``.

    For ``m = 1..n`` let ``r(m)`` be the position (from the right, starting at 1) of the first non-zero
    base-3 digit of ``m``. Then ``B_m = Abar_{r(m)}`` if that digit is 1 and ``Abar_{r(m)}^T`` if it is 2.

    Returns:
        ``[(r(m), transposed), ...]`` for ``m = 1..n`` (layer indices are 1-based).
    """
    l = _as_int("l", l)
    if l < 1:
        raise ValueError(f"the depth l must be a positive integer, got {l}")
    out = []
    for m in range(1, (3**l - 1) // 2 + 1):
        r, q = 1, m
        while q % 3 == 0:
            q //= 3
            r += 1
        out.append((r, q % 3 == 2))
    return out


def product_form(X: Tensor, Abar: Sequence[Tensor], Vbar: Tensor) -> Tensor:
    """The non-recursive form of Eq. (12): ``phi(X) = Vbar G B_1 G B_2 ... G B_n X``, ``G = X X^T``.

    ``B_m`` follows the base-3 rule of :func:`base3_factor_indices`. ``X: [..., d_0, t]`` -> ``[..., d_l, t]``.
    """
    X, Abar, Vbar = _check_virtual(X, Abar, Vbar)
    G = X @ X.transpose(-1, -2)
    out = Vbar
    for r, transposed in base3_factor_indices(len(Abar)):
        B = Abar[r - 1]
        out = out @ G @ (B.transpose(-1, -2) if transposed else B)
    return out @ X


def inter_layer_action(weights: Weights, C: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The inter-layer symmetry of Eq. (9).

    With ``C = [C_1, ..., C_{l-1}]``, ``C_i`` invertible ``[d_i, d_i]`` (and ``C_0 = I``, ``C_l = I``):
    ``Q_i -> Q_i C_{i-1}^{-1}``, ``K_i -> K_i C_{i-1}^{-1}``, ``V_i -> C_i V_i C_{i-1}^{-1}``.
    The virtual weights, hence the network (lightning or softmax), are unchanged.
    """
    layers = _check_weights(weights)
    if isinstance(C, Tensor) or not isinstance(C, Sequence):
        raise TypeError("C must be a sequence of l - 1 invertible matrices")
    if len(C) != len(layers) - 1:
        raise ValueError(f"need l - 1 = {len(layers) - 1} matrices C_1..C_(l-1), got {len(C)}")
    Cs = []
    for i, Ci in enumerate(C, start=1):
        Ci = _check_matrix(f"C_{i}", Ci, batched=False)
        di = layers[i - 1][2].shape[0]
        if Ci.shape != (di, di):
            raise ValueError(f"C_{i} must be [d_{i}, d_{i}] = [{di}, {di}], got {tuple(Ci.shape)}")
        Cs.append(Ci)
    out = []
    for i, (Q, K, V) in enumerate(layers):
        Cinv_prev = torch.linalg.inv(Cs[i - 1]) if i > 0 else None
        if Cinv_prev is not None:
            Q, K, V = Q @ Cinv_prev, K @ Cinv_prev, V @ Cinv_prev
        if i < len(Cs):
            V = Cs[i] @ V
        out.append((Q, K, V))
    return out


def rescale(weights: Weights, c: Sequence[float]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The rescaling symmetry of Eq. (13) on the weights.

    ``Q_i -> c_i Q_i`` (so ``Abar_i -> c_i Abar_i``) and ``V_l -> c V_l`` with
    ``c = prod_i c_i^(-3^(l-i))``, i.e. ``c * prod_i c_i^(3^(l-i)) = 1``. Leaves a **lightning** network
    unchanged; a softmax network is changed (it has no scaling symmetry, Theorem 3.9).
    """
    layers = _check_weights(weights)
    c = _check_scalars(c, len(layers))
    l = len(layers)
    c_out = 1.0
    for i, ci in enumerate(c, start=1):
        c_out *= ci ** (-(3 ** (l - i)))
    out = [(ci * Q, K, V) for ci, (Q, K, V) in zip(c, layers)]
    Q, K, V = out[-1]
    out[-1] = (Q, K, c_out * V)
    return out


def rescale_virtual(Abar: Sequence[Tensor], Vbar: Tensor, c: Sequence[float]) -> tuple[list[Tensor], Tensor]:
    """Eq. (13) on virtual weights: ``Abar_i -> c_i Abar_i``, ``Vbar -> c Vbar``, ``c = prod c_i^(-3^(l-i))``."""
    c = _check_scalars(c, len(Abar))
    l = len(Abar)
    c_out = 1.0
    for i, ci in enumerate(c, start=1):
        c_out *= ci ** (-(3 ** (l - i)))
    return [ci * A for ci, A in zip(c, Abar)], c_out * Vbar


def _check_scalars(c, n: int) -> list[float]:
    if isinstance(c, (str, bytes, Tensor)) or not isinstance(c, Sequence):
        raise TypeError("c must be a sequence of non-zero numbers, one per layer")
    if len(c) != n:
        raise ValueError(f"need one scale per layer (l = {n}), got {len(c)}")
    c = [float(x) for x in c]
    if any(x == 0 for x in c):
        raise ValueError(f"every scale c_i must be non-zero, got {c}")
    return c


# --------------------------------------------------------------------------- parameters and random draws


def parameter_count(d: Sequence[int], a: Sequence[int]) -> int:
    """Raw number of parameters ``sum_i (2 a_i d_{i-1} + d_i d_{i-1})`` (entries of all ``Q_i, K_i, V_i``)."""
    d, a = _check_dims(d, a)
    return sum(2 * a[i] * d[i] + d[i + 1] * d[i] for i in range(len(a)))


def split_parameters(theta: Tensor, d: Sequence[int], a: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Unflatten ``theta`` (1-D, length :func:`parameter_count`) into ``[(Q_i, K_i, V_i)]``, order ``Q_1, K_1, V_1, Q_2, ...``."""
    d, a = _check_dims(d, a)
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    n = parameter_count(d, a)
    if theta.ndim != 1 or theta.shape[0] != n:
        raise ValueError(f"theta must be a 1-D tensor of length {n} for d = {d}, a = {a}, got shape {tuple(theta.shape)}")
    out, k = [], 0
    for i in range(len(a)):
        shapes = [(a[i], d[i]), (a[i], d[i]), (d[i + 1], d[i])]
        mats = []
        for r, s in shapes:
            mats.append(theta[k : k + r * s].reshape(r, s))
            k += r * s
        out.append(tuple(mats))
    return out


def flatten_weights(weights: Weights) -> Tensor:
    """Inverse of :func:`split_parameters`: concatenate ``Q_1, K_1, V_1, Q_2, ...`` row-major."""
    layers = _check_weights(weights)
    return torch.cat([M.reshape(-1) for layer in layers for M in layer])


def random_weights(
    d: Sequence[int],
    a: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Gaussian weights, entries ``N(0, 1/d_{i-1})`` (fan-in scaling), on the CPU."""
    d, a = _check_dims(d, a)
    out = []
    for i in range(len(a)):
        s = d[i] ** -0.5
        out.append(
            tuple(
                s * torch.randn(r, d[i], generator=generator, dtype=dtype)
                for r in (a[i], a[i], d[i + 1])
            )
        )
    return out


def random_inputs(
    n: int,
    d0: int,
    t: int,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``n`` Gaussian inputs ``[n, d0, t]`` (tokens as columns), entries ``N(0, scale^2 / d0)``."""
    n, d0, t = _as_int("n", n), _as_int("d0", d0), _as_int("t", t)
    if min(n, d0, t) < 1:
        raise ValueError(f"n, d0 and t must be positive integers, got n = {n}, d0 = {d0}, t = {t}")
    return (scale / d0**0.5) * torch.randn(n, d0, t, generator=generator, dtype=dtype)


# --------------------------------------------------------------------------- Theorem 3.4: closedness


def _check_vector(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty vector [n], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a real floating tensor, got dtype {x.dtype}")
    return x


def _check_quadric(q: Tensor, d: int, atol: float = 1e-12) -> Tensor:
    q = _check_matrix("q", q, batched=False)
    if q.shape != (d, d):
        raise ValueError(f"q must be a symmetric [d, d] matrix with d = {d}, got {tuple(q.shape)}")
    scale = max(1.0, q.abs().max().item())
    if (q - q.T).abs().max().item() > atol * scale:
        raise ValueError("q must be symmetric (it is the Gram matrix of a quadratic form)")
    return q


def quadric_layer(X: Tensor, v: Tensor, w: Tensor, q: Tensor) -> Tensor:
    """The cubic map ``f(X)_i = (v^T x_i) w sum_j x_j^T q x_j`` (membership criterion).

    ``X: [..., d, t]`` (tokens as columns), ``v: [d]``, ``w: [d']``, ``q: [d, d]`` symmetric -> ``[..., d', t]``.
    For ``q = u u^T`` this is the boundary point ``phi_{u v^T, w u^T}`` of Theorem 3.4(2); for
    ``q = (u z^T + z u^T)/2`` it equals ``phi_{u v^T, w z^T}``. By Prop. A.5 / Cor. A.6 the map
    lies in the single-layer neuromanifold iff ``q`` is a product of two real linear forms (rank <= 1, or
    rank 2 and indefinite); a definite rank-2 ``q`` gives a point of the Zariski closure outside ``M``.
    """
    X = _check_matrix("X", X)
    d = X.shape[-2]
    v, w = _check_vector("v", v), _check_vector("w", w)
    if v.shape[0] != d:
        raise ValueError(f"v must have length d = {d} (rows of X), got {v.shape[0]}")
    q = _check_quadric(q, d)
    energy = torch.einsum("...kj,kl,...lj->...", X, q, X)  # sum_j x_j^T q x_j
    lin = torch.einsum("k,...kt->...t", v, X)  # v^T x_i
    return w[:, None] * (energy[..., None] * lin)[..., None, :]


def factor_quadric(q: Tensor, rtol: float = 1e-10) -> tuple[Tensor, Tensor] | None:
    """Real linear forms ``u, z`` with ``(u z^T + z u^T)/2 = q``, or ``None`` if none exist.

    ``q: [d, d]`` symmetric. Eigenvalues below ``rtol * max|eigenvalue|`` count as zero. A factorisation exists
    iff ``q`` has rank <= 1, or rank 2 with eigenvalues of opposite signs (the membership criterion of
    the membership criterion): for ``q = l1 e1 e1^T - l2 e2 e2^T`` (``l1, l2 > 0``) take
    ``u = sqrt(l1) e1 + sqrt(l2) e2``, ``z = sqrt(l1) e1 - sqrt(l2) e2``; for rank 1, ``q = s l e e^T``,
    take ``u = sqrt(l) e``, ``z = s sqrt(l) e``. Then ``quadric_layer(X, v, w, q) == phi_{u v^T, w z^T}(X)``.
    """
    q = _check_matrix("q", q, batched=False)
    q = _check_quadric(q, q.shape[0], atol=1e-12)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol}")
    evals, evecs = torch.linalg.eigh(q)
    top = evals.abs().max()
    if top == 0:
        z = torch.zeros_like(q[0])
        return z, z.clone()
    big = evals.abs() > rtol * top
    r = int(big.sum())
    if r == 1:
        i = int(torch.nonzero(big)[0])
        e, lam = evecs[:, i], evals[i]
        root = lam.abs().sqrt()
        return root * e, torch.sign(lam) * root * e
    if r == 2:
        i, j = (int(k) for k in torch.nonzero(big).flatten())
        if evals[i] * evals[j] > 0:
            return None  # definite on a plane: the two linear factors are complex conjugate
        if evals[i] < 0:
            i, j = j, i
        a, b = evals[i].sqrt() * evecs[:, i], (-evals[j]).sqrt() * evecs[:, j]
        return a + b, a - b
    return None


def fit_layer_av(
    X: Tensor,
    Y: Tensor,
    restarts: int = 20,
    steps: int = 300,
    generator: torch.Generator | None = None,
    tol: float = 1e-14,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Least-squares fit ``min_{A,V} ||phi_{A,V}(X) - Y|| / ||Y||`` by Levenberg–Marquardt.

    ``X: [n, d, t]`` inputs (tokens as columns), ``Y: [n, d', t]`` target outputs. Parameters are the free
    ``A: [d, d]`` and ``V: [d', d]`` of :func:`lightning_layer_av` (i.e. ``a >= d``). After every step the pair
    is rebalanced along the rescaling orbit ``(cA, V/c)`` (Eq. 13) to ``||A|| = ||V||``, which leaves the
    function unchanged and keeps the fitted parameters bounded. Runs ``restarts`` random starts (Gaussian,
    drawn from ``generator`` on the CPU) of at most ``steps`` damped Gauss–Newton steps each, stopping a
    start once the relative residual is below ``tol``. ``init = (A, V)`` (optional) replaces the first
    random start (continuation along a family of targets). Returns ``(A, V, relative residual)`` of the best
    start. A residual is an upper bound on the distance to the neuromanifold on these inputs, never a
    lower bound (the problem is non-convex).
    """
    X = _check_matrix("X", X)
    Y = _check_matrix("Y", Y)
    if X.ndim != 3 or Y.ndim != 3 or X.shape[0] != Y.shape[0] or X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"X must be [n, d, t] and Y [n, d', t] with the same n and t, got {tuple(X.shape)} and {tuple(Y.shape)}")
    restarts, steps = _as_int("restarts", restarts), _as_int("steps", steps)
    if restarts < 1 or steps < 1:
        raise ValueError(f"restarts and steps must be positive, got {restarts} and {steps}")
    d, dp = X.shape[-2], Y.shape[-2]
    norm = torch.linalg.vector_norm(Y)
    if norm == 0:
        return torch.zeros(d, d, dtype=X.dtype, device=X.device), torch.zeros(dp, d, dtype=X.dtype, device=X.device), 0.0
    target = (Y / norm).reshape(-1)

    def residual(p: Tensor) -> Tensor:
        return _lightning_av(X, p[: d * d].reshape(d, d), p[d * d :].reshape(dp, d)).reshape(-1) - target

    def balance(p: Tensor) -> Tensor:
        a, v = p[: d * d], p[d * d :]
        na, nv = torch.linalg.vector_norm(a), torch.linalg.vector_norm(v)
        if na == 0 or nv == 0:
            return p
        c = (nv / na).sqrt()
        return torch.cat([a * c, v / c])

    if init is not None:
        if not isinstance(init, (tuple, list)) or len(init) != 2:
            raise TypeError("init must be a pair (A, V) of tensors")
        A0 = _check_matrix("init A", init[0], batched=False)
        V0 = _check_matrix("init V", init[1], batched=False)
        if A0.shape != (d, d) or V0.shape != (dp, d):
            raise ValueError(f"init must be (A [{d}, {d}], V [{dp}, {d}]), got {tuple(A0.shape)} and {tuple(V0.shape)}")
        p_init = torch.cat([A0.reshape(-1), V0.reshape(-1)]).to(dtype=X.dtype, device=X.device) / norm.sqrt()

    jac = torch.func.jacfwd(residual)
    best = (None, float("inf"))
    for k in range(restarts):
        if k == 0 and init is not None:
            p = balance(p_init)
        else:
            p = balance(torch.randn(d * d + d * dp, generator=generator, dtype=X.dtype).to(X.device))
        r = residual(p)
        cost = float(r @ r)
        lam = 1e-3
        for _ in range(steps):
            if cost ** 0.5 < tol:
                break
            J = jac(p)
            g = J.T @ r
            H = J.T @ J
            diag = torch.diagonal(H).clamp_min(1e-12)
            while True:
                step = torch.linalg.solve(H + lam * torch.diag(diag), -g)
                p_new = balance(p + step)
                r_new = residual(p_new)
                c_new = float(r_new @ r_new)
                if c_new < cost:
                    p, r, cost, lam = p_new, r_new, c_new, max(lam / 5, 1e-12)
                    break
                lam *= 4
                if lam > 1e12:
                    break
            if lam > 1e12:
                break
        if cost ** 0.5 < best[1]:
            best = (p, cost ** 0.5)
        if best[1] < tol:
            break
    p = best[0]
    A, V = p[: d * d].reshape(d, d), p[d * d :].reshape(dp, d)
    s = norm.sqrt()
    return A * s, V * s, best[1]
