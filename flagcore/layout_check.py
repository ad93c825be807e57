"""Check a layout against the model's own forward pass.

A layout (:mod:`flagcore.layouts`) says how a checkpoint's tensors are cut into per-head query, key,
value and output maps. Reading the same tensors a second time cannot check that; the model can.
:func:`verify_layout` runs a ``transformers`` model once with three interventions:

1. **inputs**: each layer's query/key/value projection modules receive random Gaussian inputs ``X``
   (a forward pre-hook replaces what the previous layer sent), ``N >= 2(d+1)`` tokens in all;
2. **attention**: the model's attention function (transformers' ``AttentionInterface``, which every
   supported family calls with per-head tensors ``[batch, heads, tokens, d_head]``) is replaced by a
   probe that records the query, key and value heads the model computed and returns random per-head
   outputs ``Z`` instead of attending;
3. **normalisations inside the attention** (Qwen 3's and OLMo 2's query/key norms, DeepSeek's latent
   norms) get an epsilon of 1e30 for the duration, which makes them a constant rescaling: they change
   each head's map by a scale per column at most, never its column space.

Sequences are one token long (positions 0), so rotary embeddings act as the identity. For each head the
map the model applied is then *recovered* by affine least squares, ``Y_h = [X 1] A_h`` for queries, keys
and values and ``out = [Z 1] B`` for the output projection (head ``h``'s block of rows of ``B``), and
compared with flagcore's ``W[h]`` by the largest principal angle between ``col(A_h)`` and
``col(W[h])``: the per-head subspaces every overlap in the book is computed from. Biases, the 1/sqrt(d)
scaling some models fold into the query, and per-column norm weights change neither.

The tolerance on ``sin`` of that angle is derived from the problem: the recovered map carries the
rounding error of the model's arithmetic, about ``eps * sqrt(d)`` relative (``eps`` of the model's dtype,
and never below float32's: transformers computes rotary embeddings and norms in float32), amplified by the condition
number of ``[X 1]`` (least squares) and by that of ``W[h]`` (Wedin's bound on the angle), times a
safety factor of 100. A check on degenerate input is reported as ``not run``, never as verified: a head
as wide as the residual stream (every subspace is all of R^d), or a rank-deficient head (its condition
number beyond ``1/(1e3 eps)``).

**The functional form**, for models that write their attention out instead of calling the interface
(GPT-Neo, DeBERTa-v2, BLOOM, MPT in transformers 5): sequences of two tokens, the same injected inputs,
and inside each layer's attention module the first softmax is captured (logits and probabilities).
Per head and unmasked slot ``(i, j)`` the logit must be an affine function of the layout's bilinear form
``(x_i W_Q^h)(x_j W_K^h)^T`` and of ``x_i`` and ``x_j`` (biases, scalings, ALiBi and relative-position
terms are such functions); and the output projection's output must be
``sum_h sum_j P_h[i, j] x_j W_V^h W_O^h^T`` with the model's own probabilities, up to a constant. The
relative residuals must be below ``100 eps sqrt(d) kappa``. Rows are reported as roles ``qk`` and ``vo``:
the per-head maps as the computation uses them (the separate query and key subspaces are not
identifiable from logits alone). It assumes logits whose position dependence is an affine term per
slot, which rotary embeddings break, so it is used only when the interface probe is never reached.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layouts import ROLES, Layout, repeat_kv
from .subspace import principal_angles
from .weights import WeightSource, layer_heads, open_source

__all__ = ["LayoutCheck", "RoleCheck", "verify_layout", "SAFETY"]

#: Safety factor on the derived rounding bound (see the module docstring).
SAFETY = 100.0
_NORM_EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")
_FLAT_EPS = 1e30


@dataclass
class RoleCheck:
    """One role of one layer: the largest ``sin`` principal angle over its heads, and its tolerance."""

    layer: int
    role: str
    heads: int
    sin_max: float
    tol: float
    status: str  # "verified", "failed" or "not run"
    reason: str = ""


@dataclass
class LayoutCheck:
    """The result of :func:`verify_layout`. ``status``: ``verified`` when every checked role of every
    checked layer matched; ``failed`` when one did not; ``not run`` when nothing could be checked."""

    model: str
    layout: str
    stack: str
    n_tokens: int
    rows: list[RoleCheck] = field(default_factory=list)
    reason: str = ""

    @property
    def status(self) -> str:
        if any(r.status == "failed" for r in self.rows):
            return "failed"
        if self.rows and all(r.status == "verified" for r in self.rows):
            return "verified"
        return "not run"

    @property
    def sin_max(self) -> float:
        values = [r.sin_max for r in self.rows if r.status != "not run"]
        return max(values) if values else math.nan

    @property
    def margin(self) -> float:
        """min over checked roles of tol / sin_max: how far inside its tolerance the worst role is."""
        values = [r.tol / max(r.sin_max, 1e-300) for r in self.rows if r.status != "not run"]
        return min(values) if values else math.nan

    def to_dict(self) -> dict:
        return {
            "model": self.model, "layout": self.layout, "stack": self.stack, "status": self.status,
            "n_tokens": self.n_tokens, "sin_max": self.sin_max, "reason": self.reason,
            "rows": [r.__dict__.copy() for r in self.rows],
        }


class _Probe:
    """What one verification run records."""

    def __init__(self, names: Mapping[int, str], generator: torch.Generator):
        self.names = names
        self.generator = generator
        self.calls: dict[str, dict[str, Tensor]] = {}
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.token_counts: dict[str, int] = {}

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        name = self.names.get(id(module), f"<{type(module).__name__}>")
        B, _, T, _ = query.shape
        Z = torch.randn(B, T, query.shape[1], value.shape[-1], generator=self.generator, dtype=torch.float64)
        Z = Z.to(device=value.device, dtype=value.dtype)
        if name not in self.calls:  # a shared layer (ALBERT) is called once per depth: keep the first
            self.calls[name] = {"q": query.detach(), "k": key.detach(), "v": value.detach(), "z": Z}
        return Z, None


_ACTIVE: list[_Probe] = []


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    if not _ACTIVE:
        raise RuntimeError("flagcore_probe attention called outside verify_layout")
    return _ACTIVE[-1].attention(module, query, key, value, attention_mask, **kwargs)


def _register_probe() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register("flagcore_probe", _probe_attention)
    return "flagcore_probe"


def _dummy_inputs(model, batch: int, generator: torch.Generator, tokens: int = 1) -> dict:
    """Inputs that run ``model`` on ``batch`` sequences of ``tokens`` tokens (text) or one image/clip."""
    params = inspect.signature(model.forward).parameters
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out: dict = {}
    vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
    if "input_ids" in params and vocab:
        out["input_ids"] = torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)
    if "decoder_input_ids" in params and getattr(cfg, "is_encoder_decoder", False) and vocab:
        out["decoder_input_ids"] = torch.randint(0, vocab, (batch, 1), generator=generator).to(device)
    image_tokens = any(getattr(cfg, a, None) is not None for a in ("image_token_id", "image_token_index"))
    if "pixel_values" in params and not image_tokens:
        vision = getattr(cfg, "vision_config", None) or cfg
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        channels = getattr(vision, "num_channels", 3)
        out["pixel_values"] = torch.randn(batch, channels, size, size, generator=generator).to(device, dtype)
    if "input_features" in params:
        frames = 2 * cfg.max_source_positions
        out["input_features"] = torch.randn(batch, cfg.num_mel_bins, frames, generator=generator).to(device, dtype)
    if "use_cache" in params:
        out["use_cache"] = False
    if not out or not any(k != "use_cache" for k in out):
        raise ValueError(f"cannot build inputs for {type(model).__name__}: pass inputs= to verify_layout")
    return out


def _replace_input(probe: _Probe, name: str, d_in: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        if name not in probe.inputs:
            X = torch.randn(*x.shape[:-1], d_in, generator=probe.generator, dtype=torch.float64)
            probe.inputs[name] = X
            probe.token_counts[name] = int(math.prod(x.shape[:-1]))
        X = probe.inputs[name]
        if X.shape[:-1] != x.shape[:-1]:  # a later call of a shared module with another shape
            X = torch.randn(*x.shape[:-1], d_in, generator=probe.generator, dtype=torch.float64)
        X = X.to(device=x.device, dtype=x.dtype)
        if args:
            return (X, *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: X}

    return hook


def _record_output(probe: _Probe, name: str):
    def hook(module, args, output):
        if name not in probe.outputs:
            probe.outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()

    return hook


def _flatten_norms(model: torch.nn.Module, prefixes: Sequence[str]) -> list[tuple[object, str, float]]:
    """Set epsilon 1e30 on the normalisations inside the attention modules; returns what to restore."""
    saved = []
    for name, module in model.named_modules():
        if not any(name.startswith(p + ".") for p in prefixes) or "norm" not in type(module).__name__.lower():
            continue
        for attribute in _NORM_EPS_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float):
                saved.append((module, attribute, value))
                setattr(module, attribute, _FLAT_EPS)
    return saved


def _sin_max(A: Tensor, W: Tensor) -> Tensor:
    """Largest sin principal angle between col(A[h]) and col(W[h]) per head (float64)."""
    return torch.sin(principal_angles(A, W).amax(dim=-1))


def _fit(inputs: Tensor, outputs: Tensor) -> tuple[Tensor, float]:
    """Affine least squares ``outputs ~ [inputs 1] A`` in float64; returns (A without the bias row,
    the condition number of ``[inputs 1]``)."""
    X = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1)
    A = torch.linalg.lstsq(X, outputs, driver="gelsd").solution
    s = torch.linalg.svdvals(X)
    return A[:-1], (s[0] / s[-1]).item()


def _input_width(module, d: int) -> int:
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores [in, out]
        return weight.shape[0]
    return weight.shape[1] if weight is not None and weight.ndim == 2 else d


class _SoftmaxCapture(torch.overrides.TorchFunctionMode):
    """Inside one module's forward: the input and output of the first softmax (the attention logits and
    probabilities of a model that writes its attention out instead of calling the interface)."""

    def __init__(self):
        super().__init__()
        self.logits: Tensor | None = None
        self.probs: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.logits is None and func in (torch.nn.functional.softmax, torch.softmax, Tensor.softmax):
            self.logits, self.probs = args[0].detach(), out.detach()
        return out


def _capture_softmax(capture: _SoftmaxCapture, active: list):
    def enter(module, args, kwargs):
        if capture.logits is None and not active:
            capture.__enter__()
            active.append(capture)

    def leave(module, args, kwargs, output):
        if active and active[-1] is capture:
            active.pop()
            capture.__exit__(None, None, None)

    return enter, leave


def _run(model, probe, modules, wanted, layer_prefixes, inputs, d, tokens, attention):
    """One instrumented forward pass (see the module docstring); ``attention``: module name ->
    :class:`_SoftmaxCapture` for the functional check, empty for the interface probe."""
    previous = getattr(model.config, "_attn_implementation", None)
    hooks, active = [], []
    saved_eps = _flatten_norms(model, layer_prefixes) if not attention else []
    was_training = model.training
    try:
        model.eval()
        if not attention:
            model.set_attn_implementation(_register_probe())
        for name in sorted({n for (layer, role), n in wanted.items() if role != "o"}):
            hook = _replace_input(probe, name, _input_width(modules[name], d))
            hooks.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        for name in sorted({n for (layer, role), n in wanted.items() if role == "o"}):
            hooks.append(modules[name].register_forward_hook(_record_output(probe, name)))
        for name, capture in attention.items():
            enter, leave = _capture_softmax(capture, active)
            hooks.append(modules[name].register_forward_pre_hook(enter, with_kwargs=True))
            hooks.append(modules[name].register_forward_hook(leave, with_kwargs=True))
        _ACTIVE.append(probe)
        with torch.no_grad():
            if inputs is None:  # learn the tokens per sequence, then size the batch
                model(**_dummy_inputs(model, 2, probe.generator, tokens))
                per_sequence = max(1, min(probe.token_counts.values(), default=2) // 2)
                target = 2 * (d + 1) if not attention else 4 * (d + 1) * tokens
                for store in (probe.calls, probe.inputs, probe.outputs, probe.token_counts):
                    store.clear()
                for capture in attention.values():
                    capture.logits = capture.probs = None
                model(**_dummy_inputs(model, math.ceil(target / per_sequence), probe.generator, tokens))
            else:
                model(**inputs)
    finally:
        while active:
            active.pop().__exit__(None, None, None)
        if _ACTIVE and _ACTIVE[-1] is probe:
            _ACTIVE.pop()
        for hook in hooks:
            hook.remove()
        for module, attribute, value in saved_eps:
            setattr(module, attribute, value)
        if previous is not None and not attention:
            model.set_attn_implementation(previous)
        model.train(was_training)


def _relative_residual(target: Tensor, features: Tensor) -> tuple[float, float]:
    """||target - [features 1] beta|| / ||target - mean|| by least squares (float64), and the condition
    number of the centred features."""
    centred_t = target - target.mean(0)
    F = features - features.mean(0)
    beta = torch.linalg.lstsq(F, centred_t, driver="gelsd").solution
    spread = centred_t.norm().item()
    s = torch.linalg.svdvals(F)
    cond = (s[0] / s[-1]).item() if s[-1] > 0 else math.inf
    return ((centred_t - F @ beta).norm().item() / spread if spread > 0 else math.inf), cond


def _verify_functional(model, src, layers, modules, wanted, layer_prefixes, d, seed, check) -> LayoutCheck:
    """For a model whose attention never reached the interface probe: the functional check.

    Sequences of two tokens (random inputs injected into the projections as before); inside each layer's
    attention module the first softmax is captured (logits and probabilities). Per head ``h`` and
    unmasked slot ``(i, j)``, the logit must be an affine function of the layout's bilinear form
    ``(x_i W_Q^h)(x_j W_K^h)^T`` and of ``x_i``, ``x_j`` (biases, scalings, ALiBi and relative-position
    terms are such functions); and the output projection's output at token ``i`` must be the layout's
    ``sum_h sum_j P_h[i, j] x_j W_V^h W_O^h^T`` (with the model's own probabilities ``P``) up to a
    constant. Roles are reported as ``qk`` and ``vo``: the per-head maps as the computation uses them.
    """
    generator = torch.Generator().manual_seed(seed)
    probe = _Probe({id(m): n for n, m in modules.items()}, generator)
    owners = {}
    for layer in layers:
        parents = {wanted[(layer, r)].rsplit(".", 1)[0] for r in ("q", "k", "v")}
        owner = parents.pop() if len(parents) == 1 else _common_module(parents)
        owners[layer] = owner
    captures = {name: _SoftmaxCapture() for name in set(owners.values())}
    _run(model, probe, modules, wanted, layer_prefixes, None, d, tokens=2, attention=captures)
    eps = max(torch.finfo(next(model.parameters()).dtype).eps, torch.finfo(torch.float32).eps)
    check.n_tokens = min(probe.token_counts.values(), default=0)
    check.reason = "functional check: the model's attention does not go through transformers' attention interface"
    for layer in layers:
        capture = captures[owners[layer]]
        heads = layer_heads(src, layer, ROLES, dtype=torch.float64)
        H = heads["q"].shape[0]
        rows = {name: RoleCheck(layer, name, H, math.nan, math.nan, "not run") for name in ("qk", "vo")}
        check.rows += list(rows.values())
        if capture.logits is None or capture.logits.ndim != 4 or capture.logits.shape[1] != H:
            shape = None if capture.logits is None else tuple(capture.logits.shape)
            for row in rows.values():
                row.reason = f"no [batch, {H} heads, tokens, tokens] softmax found in {owners[layer]!r} (got {shape})"
            continue
        L, P = capture.logits.to(torch.float64).cpu(), capture.probs.to(torch.float64).cpu()
        Xq, Xk, Xv = (probe.inputs[wanted[(layer, r)]].to(torch.float64).cpu() for r in ("q", "k", "v"))
        same_qk = wanted[(layer, "q")] == wanted[(layer, "k")]
        Wq = heads["q"]
        Wk = repeat_kv(heads["k"], H)
        Wv, Wo = repeat_kv(heads["v"], H), heads["o"]
        s = torch.linalg.svdvals(torch.cat([Wq, Wk, Wv, Wo]))
        cond_w = (s[:, 0] / s[:, -1]).max().item()
        T = L.shape[-1]
        worst, tol_qk = 0.0, math.inf
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    logit = L[:, h, i, j]
                    if not bool(torch.isfinite(logit).all()) or logit.abs().max() > 1e20:
                        continue  # a masked slot
                    g = ((Xq[:, i] @ Wq[h]) * (Xk[:, j] @ Wk[h])).sum(-1, keepdim=True)
                    parts = [g, Xq[:, i]] + ([] if same_qk and i == j else [Xk[:, j]])
                    r, cond = _relative_residual(logit[:, None], torch.cat(parts, dim=1))
                    worst = max(worst, r)
                    tol_qk = min(tol_qk, SAFETY * eps * math.sqrt(d) * cond * cond_w)
        if math.isfinite(tol_qk):
            rows["qk"].sin_max, rows["qk"].tol = worst, tol_qk
            rows["qk"].status = "verified" if worst <= tol_qk else "failed"
            rows["qk"].reason = "logit = affine in the layout's q.k form and the inputs"
        out_name = wanted[(layer, "o")]
        if out_name in probe.outputs:
            Y = probe.outputs[out_name].to(torch.float64).cpu().reshape(Xv.shape[0], T, -1)
            M = torch.einsum("hdk,hek->hde", Wv, Wo)  # per-head V-O map [H, d, d]
            pred = torch.einsum("bhij,bjd,hde->bie", P, Xv, M)
            worst = 0.0
            for i in range(T):
                diff = Y[:, i] - pred[:, i]
                diff = diff - diff.mean(0)
                spread = (Y[:, i] - Y[:, i].mean(0)).norm().item()
                worst = max(worst, diff.norm().item() / spread if spread > 0 else math.inf)
            rows["vo"].sin_max, rows["vo"].tol = worst, SAFETY * eps * math.sqrt(d) * cond_w
            rows["vo"].status = "verified" if worst <= rows["vo"].tol else "failed"
            rows["vo"].reason = "output = sum over heads of P x W_V W_O^T, with the model's P"
        else:
            rows["vo"].reason = f"the output projection {out_name!r} was not called"
    return check


def _common_module(names) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def verify_layout(
    model: torch.nn.Module,
    source: WeightSource | None = None,
    *,
    layout: Layout | str | None = None,
    stack: str | None = None,
    layers: Sequence[int] | None = None,
    roles: Sequence[str] = ROLES,
    seed: int = 0,
    inputs: dict | None = None,
    method: str = "auto",
) -> LayoutCheck:
    """Check that flagcore's per-head ``q``, ``k``, ``v``, ``o`` subspaces of ``model`` are the ones its
    own forward pass uses (method and tolerances: the module docstring).

    ``model``: a loaded ``transformers`` model (any dtype and device; it is left as it was). ``source``:
    the :class:`~flagcore.weights.WeightSource` to check, built from this model (default:
    ``open_source(model, layout=layout, stack=stack)``; pass a :class:`~flagcore.layouts.Layout` as
    ``layout`` to check one before registering it). ``layers``: default all layers of the stack (one,
    for a shared stack). ``inputs``: keyword arguments for ``model(...)`` when the automatic ones (one
    token per sequence; images/audio of the config's size) do not fit; the batch must then hold at least
    ``2(d+1)`` tokens. ``method``: ``"interface"`` (the per-head q, k, v, o maps through transformers'
    attention interface), ``"functional"`` (the per-head q.k and v-o maps from the captured softmax, for
    models that write their attention out; it needs position-independent logits up to a per-slot affine
    term, so not rotary embeddings), or ``"auto"``: the first, and the second when the model's attention
    never reaches the interface.
    """
    if method not in ("auto", "interface", "functional"):
        raise ValueError(f"method must be 'auto', 'interface' or 'functional', got {method!r}")
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise TypeError("verify_layout needs a loaded transformers model (an nn.Module with a config)")
    src = source if source is not None else open_source(model, layout=layout, stack=stack)
    if layers is None:
        layers = src.layers[:1] if src.shared else src.layers
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if layer not in src.layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{len(src.layers) - 1}")
    check = LayoutCheck(src.name, src.layout.name, src.stack, 0)
    d = src.dims.d
    modules = dict(model.named_modules())
    wanted = {}
    for layer in layers:
        for role in roles:
            tensor_role = "o" if role == "o" else src.spelling.sources(role)[0]
            name = src.module_name(layer, tensor_role)
            if name not in modules:
                raise ValueError(
                    f"{src.name}: module {name!r} (role {role!r}, layer {layer}) is not in the model; the source "
                    "must be read from this model (open_source(model, ...)), not from its checkpoint"
                )
            wanted[(layer, role)] = name
    generator = torch.Generator().manual_seed(seed)
    probe = _Probe({id(m): n for n, m in modules.items()}, generator)
    groups = {src._groups[src.layers.index(x)] for x in layers}
    layer_prefixes = [src._prefix + src.spelling.layer.format(layer=g, group=g).rstrip(".") for g in groups]
    functional_ok = inputs is None and all(r in roles for r in ROLES)
    if method == "functional":
        if not functional_ok:
            raise ValueError("the functional check needs all four roles and the automatic inputs")
        return _verify_functional(model, src, layers, modules, wanted, layer_prefixes, d, seed, check)
    _run(model, probe, modules, wanted, layer_prefixes, inputs, d, tokens=1, attention={})
    probed = any(any(n.startswith(c + ".") for c in probe.calls) for n in wanted.values())
    if not probed and method == "auto" and functional_ok:
        return _verify_functional(model, src, layers, modules, wanted, layer_prefixes, d, seed, check)
    # transformers computes rotary embeddings and norms in float32 even in a float64 model: the
    # arithmetic is never finer than float32
    eps = max(torch.finfo(next(model.parameters()).dtype).eps, torch.finfo(torch.float32).eps)
    check.n_tokens = min(probe.token_counts.values(), default=0)
    for layer in layers:
        q_module = wanted.get((layer, "q")) or next(n for (lay, _), n in wanted.items() if lay == layer)
        owners = [name for name in probe.calls if q_module.startswith(name + ".")]
        call = probe.calls[max(owners, key=len)] if owners else None
        heads = layer_heads(src, layer, roles, dtype=torch.float64)
        for role in roles:
            W = heads[role]
            n, _, d_head = W.shape
            row = RoleCheck(layer, role, n, math.nan, math.nan, "not run")
            check.rows.append(row)
            if call is None:
                row.reason = "the model's attention did not reach transformers' attention interface (no probe call)"
                continue
            if d_head >= d:
                row.reason = f"d_head = {d_head} >= d = {d}: every head spans R^d, nothing to tell apart"
                continue
            s = torch.linalg.svdvals(W)
            cond = (s[:, 0] / s[:, -1]).max().item()
            if not math.isfinite(cond) or cond > 1 / (1e3 * eps):
                row.reason = f"a rank-deficient head (condition number {cond:.1e})"
                continue
            if role == "o":
                out_name = wanted[(layer, "o")]
                if out_name not in probe.outputs:
                    row.reason = f"the output projection {out_name!r} was not called"
                    continue
                Z = call["z"].to(torch.float64)
                Zf = Z.reshape(-1, Z.shape[-2] * Z.shape[-1]).cpu()
                Y = probe.outputs[out_name].to(torch.float64).reshape(Zf.shape[0], -1).cpu()
                if Zf.shape[0] < Zf.shape[1] + 1:
                    row.reason = f"{Zf.shape[0]} tokens for a {Zf.shape[1]}-dimensional fit"
                    continue
                B, cond_x = _fit(Zf, Y)
                A = B.reshape(Z.shape[-2], Z.shape[-1], -1).transpose(1, 2)  # head h: [d, d_head]
            else:
                X = probe.inputs[wanted[(layer, role)]].reshape(-1, probe.inputs[wanted[(layer, role)]].shape[-1])
                Yr = call[role].to(torch.float64)  # [B, n, T, d_head]
                if Yr.shape[1] != n:
                    row.status, row.reason = "failed", f"the model computed {Yr.shape[1]} {role} heads, the layout {n}"
                    row.sin_max = 1.0
                    continue
                Y = Yr.transpose(1, 2).reshape(-1, n * Yr.shape[-1]).cpu()
                if X.shape[0] != Y.shape[0] or X.shape[0] < X.shape[1] + 1:
                    row.reason = f"{X.shape[0]} inputs for {Y.shape[0]} outputs of a {X.shape[1]}-dimensional map"
                    continue
                if Yr.shape[-1] != d_head:
                    row.status, row.reason = "failed", f"the model's {role} heads have d_head = {Yr.shape[-1]}, the layout's {d_head}"
                    row.sin_max = 1.0
                    continue
                A_all, cond_x = _fit(X, Y)
                A = A_all.reshape(X.shape[1], n, d_head).transpose(0, 1)
            if A.shape[1] != d:
                row.status, row.reason, row.sin_max = "failed", f"the model's {role} map acts on dimension {A.shape[1]}, not d = {d}", 1.0
                continue
            row.sin_max = _sin_max(A, W).max().item()
            row.tol = SAFETY * eps * math.sqrt(d) * cond_x * cond
            row.status = "verified" if row.sin_max <= row.tol else "failed"
    if not check.rows:
        check.reason = "no layer or role selected"
    return check
