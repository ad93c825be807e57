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
as wide as the residual stream (every subspace is all of R^d), a rank-deficient head (its condition
number beyond ``1/(1e3 eps)``), or a model whose attention never reached the probe.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layouts import ROLES, Layout
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


def _dummy_inputs(model, batch: int, generator: torch.Generator) -> dict:
    """Inputs that run ``model`` on ``batch`` sequences of one token (text) or one image/clip."""
    params = inspect.signature(model.forward).parameters
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out: dict = {}
    vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
    if "input_ids" in params and vocab:
        out["input_ids"] = torch.randint(0, vocab, (batch, 1), generator=generator).to(device)
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
) -> LayoutCheck:
    """Check that flagcore's per-head ``q``, ``k``, ``v``, ``o`` subspaces of ``model`` are the ones its
    own forward pass uses (method and tolerances: the module docstring).

    ``model``: a loaded ``transformers`` model (any dtype and device; it is left as it was). ``source``:
    the :class:`~flagcore.weights.WeightSource` to check, built from this model (default:
    ``open_source(model, layout=layout, stack=stack)``; pass a :class:`~flagcore.layouts.Layout` as
    ``layout`` to check one before registering it). ``layers``: default all layers of the stack (one,
    for a shared stack). ``inputs``: keyword arguments for ``model(...)`` when the automatic ones (one
    token per sequence; images/audio of the config's size) do not fit; the batch must then hold at least
    ``2(d+1)`` tokens.
    """
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
    layer_prefixes = [src._prefix + src.spelling.layer.format(layer=g, group=g).rstrip(".") for g in {src._groups[src.layers.index(x)] for x in layers}]
    implementation = _register_probe()
    previous = getattr(model.config, "_attn_implementation", None)
    hooks = []
    saved_eps = _flatten_norms(model, layer_prefixes)
    was_training = model.training
    try:
        model.eval()
        model.set_attn_implementation(implementation)
        input_modules = sorted({n for (layer, role), n in wanted.items() if role != "o"})
        for name in input_modules:
            module = modules[name]
            d_in = module.weight.shape[1] if getattr(module, "weight", None) is not None and module.weight.ndim == 2 else d
            if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores [in, out]
                d_in = module.weight.shape[0]
            hooks.append(module.register_forward_pre_hook(_replace_input(probe, name, d_in), with_kwargs=True))
        for name in sorted({n for (layer, role), n in wanted.items() if role == "o"}):
            hooks.append(modules[name].register_forward_hook(_record_output(probe, name)))
        _ACTIVE.append(probe)
        with torch.no_grad():
            if inputs is None:  # learn the tokens per sequence, then size the batch
                model(**_dummy_inputs(model, 2, generator))
                per_sequence = max(1, min(probe.token_counts.values(), default=2) // 2)
                target = 2 * (d + 1)
                for store in (probe.calls, probe.inputs, probe.outputs, probe.token_counts):
                    store.clear()
                model(**_dummy_inputs(model, math.ceil(target / per_sequence), generator))
            else:
                model(**inputs)
    finally:
        if _ACTIVE and _ACTIVE[-1] is probe:
            _ACTIVE.pop()
        for hook in hooks:
            hook.remove()
        for module, attribute, value in saved_eps:
            setattr(module, attribute, value)
        if previous is not None:
            model.set_attn_implementation(previous)
        model.train(was_training)
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
