"""Where a model keeps its attention weights, and how to cut them into heads.

A :class:`Layout` serves one or more ``config.json`` ``model_type`` values and holds one or more
:class:`Stack` objects, one per *attention stack*: a decoder has one (``self``); an encoder–decoder
three (``encoder``, ``decoder`` self-attention, ``cross`` attention); a vision–language model one per
tower (``text``, ``vision``). A stack says

* which keys hold one layer's tensors (``layer`` with ``{layer}`` for the index, ``tensors``: role ->
  key suffix; any leading prefix such as ``model.`` is found automatically, and ``within`` restricts it
  to one tower),
* where its sizes are in the config (``config``: a nested sub-config such as ``text_config``; ``sizes``:
  other key names, e.g. ``encoder_attention_heads``),
* how to cut the tensors into heads (``split``: tensors by role, :class:`Dims` -> ``{role: [n, d,
  d_head]}``), and whether one set of weights serves every layer (``shared``, ALBERT).

Why this shape. The first design had one ``layer`` pattern and one ``tensors`` map per model type, which
cannot express a model with several attention stacks (T5, BART, Whisper: the same suffixes under
``encoder.`` and ``decoder.``, plus cross-attention), sizes kept in nested sub-configs (CLIP, Gemma 3),
one layer reused at every depth (ALBERT), or a query that passes through a low-rank map and a norm
(DeepSeek's latent attention). Several spellings of one stack (several :class:`Stack` objects with the
same ``name``) cover checkpoints whose keys differ from the loaded model's (transformers 5 renames ViT
and Gemma 3 modules on load); the first spelling whose keys are present is used.

Canonical heads (TransformerLens' residual-side convention, raw weights): ``q``, ``k``, ``v`` are
``[n, d, d_head]`` with ``x @ W[h]`` the head's query/key/value for a row vector ``x`` in R^d; ``o`` is
``[H, d, d_head]``, the transpose of TransformerLens' ``W_O[h]``, so that its columns span what head ``h``
writes into. Fused projections are cut exactly as the model's own forward pass cuts them; each built-in
family is checked against that forward pass (:func:`flagcore.layout_check.verify_layout`).

This module depends on nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "Dims",
    "LAYOUTS",
    "Layout",
    "SPLITS",
    "Stack",
    "cols_to_heads",
    "layout_from_dict",
    "register_layout",
    "repeat_kv",
    "rows_to_heads",
]

ROLES = ("q", "k", "v", "o")


# --------------------------------------------------------------------------- canonical slicing


def rows_to_heads(W: Tensor, n_heads: int) -> Tensor:
    """``nn.Linear`` projection weight ``[n*d_head, d]`` (``y = x W^T``) to ``[n, d, d_head]``: head
    ``h`` is ``W[h*d_head:(h+1)*d_head].T``."""
    rows, d = W.shape
    if rows % n_heads:
        raise ValueError(f"a projection with {rows} output rows cannot be split into {n_heads} heads")
    return W.reshape(n_heads, rows // n_heads, d).transpose(1, 2)


def cols_to_heads(W: Tensor, n_heads: int) -> Tensor:
    """Column blocks ``[d, n*d_head]`` to ``[n, d, d_head]``: head ``h`` is ``W[:, h*d_head:(h+1)*d_head]``.
    Used for a ``Conv1D`` projection (``y = x W``) and for an output ``nn.Linear`` weight ``[d, H*d_head]``
    (``out = z W^T``: head ``h`` writes into the span of those columns)."""
    d, cols = W.shape
    if cols % n_heads:
        raise ValueError(f"a weight with {cols} columns cannot be split into {n_heads} heads")
    return W.reshape(d, n_heads, cols // n_heads).transpose(0, 1)


def repeat_kv(W: Tensor, n_heads: int) -> Tensor:
    """Key/value heads ``[H_kv, d, d_head]`` repeated onto the ``H`` query heads (query head ``h`` uses
    key/value head ``h // (H / H_kv)``, the grouping of HF's ``repeat_kv``)."""
    if n_heads % W.shape[0]:
        raise ValueError(f"{n_heads} query heads cannot share {W.shape[0]} key/value heads evenly")
    return W.repeat_interleave(n_heads // W.shape[0], dim=0)


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Dims:
    """Shape of one attention stack: residual width ``d``, ``n_heads`` query heads, ``n_kv_heads``
    key/value heads, ``n_layers``; ``d_head`` is read from the weights. Where the head counts vary
    with depth, ``heads_per_layer`` holds ``(H, H_kv)`` per layer and :meth:`at` gives one layer's sizes
    (``n_heads``/``n_kv_heads`` are then layer 0's). ``config`` is the (sub-)config the sizes came from,
    for split functions that need more (Falcon's variant, DeepSeek's latent ranks)."""

    d: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    heads_per_layer: tuple[tuple[int, int], ...] | None = None
    config: Mapping = field(default_factory=dict, compare=False, repr=False)

    def at(self, layer: int) -> Dims:
        if self.heads_per_layer is None:
            return self
        H, H_kv = self.heads_per_layer[layer]
        return replace(self, n_heads=H, n_kv_heads=H_kv, heads_per_layer=None)


_DIM_KEYS = {
    "d": ("hidden_size", "n_embd", "d_model", "dim", "model_dim"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "num_query_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "n_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_transformer_layers"),
}


def _lookup(config: Mapping, keys: Sequence[str]):
    return next((config[k] for k in keys if config.get(k) is not None), None)


# --------------------------------------------------------------------------- stacks and layouts


def split_linear(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """Separate ``nn.Linear`` q/k/v/o projections (BERT, Llama, OPT, T5, CLIP, ...)."""
    out = {}
    for role, W in t.items():
        if role == "o":
            out["o"] = cols_to_heads(W, dims.n_heads)
        elif role in ("q", "k", "v"):
            out[role] = rows_to_heads(W, dims.n_heads if role == "q" else dims.n_kv_heads)
    return out


def _with_o(out: dict, t: Mapping[str, Tensor], dims: Dims) -> dict:
    if "o" in t:
        out["o"] = cols_to_heads(t["o"], dims.n_heads)
    return out


def split_fused_rows(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """One fused ``nn.Linear`` ``qkv`` ``[(H + 2 H_kv) d_head, d]``: the rows of all query heads, then
    all key heads, then all value heads (Phi-3, GPT-BigCode incl. multi-query, MPT, ModernBERT)."""
    out = {}
    if "qkv" in t:
        W, H, H_kv = t["qkv"], dims.n_heads, dims.n_kv_heads
        if W.shape[0] % (H + 2 * H_kv):
            raise ValueError(f"a fused qkv weight with {W.shape[0]} rows cannot hold {H} + 2 x {H_kv} heads")
        d_head = W.shape[0] // (H + 2 * H_kv)
        q, k, v = W.split([H * d_head, H_kv * d_head, H_kv * d_head])
        out.update(q=rows_to_heads(q, H), k=rows_to_heads(k, H_kv), v=rows_to_heads(v, H_kv))
    return _with_o(out, t, dims)


def split_interleaved(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """One fused ``qkv`` ``[3 H d_head, d]`` interleaved per head: the rows of head ``h`` are
    ``[q_h; k_h; v_h]`` (GPT-NeoX/Pythia, BLOOM, Falcon-RW; HF's ``view(..., H, 3, d_head)``)."""
    out = {}
    if "qkv" in t:
        W, H = t["qkv"], dims.n_heads
        if W.shape[0] % (3 * H):
            raise ValueError(f"a fused qkv weight with {W.shape[0]} rows cannot hold 3 x {H} interleaved heads")
        per = W.reshape(H, 3, W.shape[0] // (3 * H), W.shape[1])
        for i, role in enumerate("qkv"):
            out[role] = per[:, i].transpose(1, 2)
    return _with_o(out, t, dims)


def split_grouped(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """Falcon's fused ``query_key_value``, in the variant its config names: ``new_decoder_architecture``
    (grouped: per key/value group, its ``H/H_kv`` query heads then its key and its value head),
    ``multi_query`` (all query heads, then one key and one value head), else interleaved per head."""
    cfg = dims.config
    if cfg.get("new_decoder_architecture"):
        out = {}
        if "qkv" in t:
            W, H, H_kv = t["qkv"], dims.n_heads, dims.n_kv_heads
            per_group = H // H_kv + 2
            if W.shape[0] % (H_kv * per_group):
                raise ValueError(f"Falcon's grouped qkv with {W.shape[0]} rows cannot hold {H_kv} groups of {per_group}")
            g = W.reshape(H_kv, per_group, W.shape[0] // (H_kv * per_group), W.shape[1])
            out["q"] = g[:, :-2].reshape(H, g.shape[2], W.shape[1]).transpose(1, 2)
            out["k"] = g[:, -2].transpose(1, 2)
            out["v"] = g[:, -1].transpose(1, 2)
        return _with_o(out, t, dims)
    if cfg.get("multi_query", True):
        return split_fused_rows(t, replace(dims, n_kv_heads=1))
    return split_interleaved(t, dims)


def split_codegen(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """CodeGen's ``qkv_proj`` ``[3d, d]``: ``mp_num = 4`` model-parallel chunks of rows, each
    ``[q; v; k]`` (note the order) of ``d/4`` rows; the query heads run over the chunks in order."""
    out = {}
    if "qkv" in t:
        W, H, mp = t["qkv"], dims.n_heads, 4
        if W.shape[0] % (3 * mp) or H % mp:
            raise ValueError(f"CodeGen's qkv_proj with {W.shape[0]} rows and {H} heads cannot be cut into {mp} chunks")
        chunks = W.reshape(mp, 3, W.shape[0] // (3 * mp), W.shape[1])
        for i, role in enumerate("qvk"):
            out[role] = rows_to_heads(chunks[:, i].reshape(-1, W.shape[1]), H)
    return _with_o(out, t, dims)


def split_conv1d(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """GPT-2's ``Conv1D`` (``y = x W``): ``c_attn.weight`` ``[d, 3d]`` = [W_Q | W_K | W_V]; ``c_proj.weight``
    ``[d, d]`` with ``out = z W``, so head ``h`` writes into the span of rows ``h*d_head:(h+1)*d_head``."""
    out = {}
    if "qkv" in t:
        W = t["qkv"]
        if W.shape[1] % 3:
            raise ValueError(f"c_attn.weight must be [d, 3d], got {tuple(W.shape)}")
        for role, block in zip("qkv", W.chunk(3, dim=1)):
            out[role] = cols_to_heads(block, dims.n_heads)
    if "o" in t:
        out["o"] = cols_to_heads(t["o"].T, dims.n_heads)
    return out


def split_latent(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """DeepSeek's multi-head latent attention, as the maps the model applies to the residual stream.

    Query: ``x -> q_b(norm(q_a x))`` (or ``q_proj x`` without ``q_lora_rank``). The RMSNorm only rescales
    each token, so head ``h`` reads from ``col(W_Q^h)`` with ``W_Q^h = q_a^T diag(gamma) q_b_h^T``
    ``[d, d_nope + d_rope]``, a subspace of the ``q_lora_rank``-dimensional row space of ``q_a``. Keys and
    values share the latent ``c = norm(kv_a[:r] x)``: head ``h``'s key is ``[kv_b^{k,h} c ; kv_a[r:] x]``
    (the rotary part is one head shared by all) and its value ``kv_b^{v,h} c``."""
    cfg, H = dims.config, dims.n_heads
    nope, rope, dv = (int(cfg[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    out = {}
    if "q" in t:
        out["q"] = rows_to_heads(t["q"], H)
    elif "q_a" in t:
        out["q"] = rows_to_heads((t["q_b"] * t["q_norm"]) @ t["q_a"], H)
    if "kv_a" in t:
        r = t["kv_norm"].shape[0]
        latent, pe = t["kv_a"][:r], t["kv_a"][r:]
        if pe.shape[0] != rope:
            raise ValueError(f"kv_a_proj_with_mqa has {t['kv_a'].shape[0]} rows, not kv_lora_rank {r} + qk_rope_head_dim {rope}")
        kv_b = t["kv_b"].reshape(H, nope + dv, r) * t["kv_norm"]
        k_nope = kv_b[:, :nope] @ latent  # [H, nope, d]
        out["k"] = torch.cat([k_nope, pe.expand(H, rope, pe.shape[1])], dim=1).transpose(1, 2)
        out["v"] = (kv_b[:, nope:] @ latent).transpose(1, 2)
    return _with_o(out, t, dims)


#: Split functions by name, for layouts written as JSON (:func:`layout_from_dict`, ``--layout FILE``).
SPLITS: dict[str, Callable[[Mapping[str, Tensor], Dims], dict[str, Tensor]]] = {
    "linear": split_linear,
    "fused_rows": split_fused_rows,
    "interleaved": split_interleaved,
    "grouped": split_grouped,
    "codegen": split_codegen,
    "conv1d": split_conv1d,
    "latent": split_latent,
}

#: Head role -> the tensor roles it is computed from, when the layout has no tensor of that role and no
#: fused ``qkv`` (latent attention).
_SOURCES = {
    "q": (("q_a", "q_norm", "q_b"),),
    "k": (("kv_a", "kv_norm", "kv_b"),),
    "v": (("kv_a", "kv_norm", "kv_b"),),
}


@dataclass(frozen=True)
class Stack:
    """One attention stack of a model (see the module docstring).

    Attributes:
        name: ``self`` for a model with one stack; ``encoder``, ``decoder``, ``cross``, ``text``,
            ``vision``, ... otherwise. Several stacks with one name are spellings of the same weights.
        layer: key prefix of one layer, with ``{layer}`` for its index (or ``{group}`` when ``shared``).
        tensors: role -> key suffix inside the layer: ``q``, ``k``, ``v``, ``o``, a fused ``qkv``, or the
            latent roles ``q_a``, ``q_norm``, ``q_b``, ``kv_a``, ``kv_norm``, ``kv_b``.
        split: ``(tensors by role, Dims) -> {role: [n, d, d_head]}``.
        config: key of the sub-config holding this stack's sizes (``text_config``), or ``""``.
        sizes: size name (``d``, ``n_heads``, ``n_kv_heads``, ``n_layers``) -> config keys to try first.
        within: the key prefix must contain one of these (tells a text tower from a vision tower).
        shared: one set of weights for every layer; layer ``l`` of ``L`` uses group
            ``l * G // L`` (``G``: config ``num_hidden_groups``, default 1), ALBERT's rule.
        latent: the heads live in a low-rank space (their random null is not Haar; see
            :func:`flagcore.heads.layout_null_samples`).
        sparse: only some layers have this attention (hybrid models such as Jamba, whose other layers
            are state-space blocks): the stack's layers are the indices found, not ``0..n-1``.
    """

    name: str
    layer: str
    tensors: Mapping[str, str]
    split: Callable[[Mapping[str, Tensor], Dims], dict[str, Tensor]] = split_linear
    config: str = ""
    sizes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    within: tuple[str, ...] = ()
    shared: bool = False
    latent: bool = False
    sparse: bool = False

    def __post_init__(self):
        placeholder = "{group}" if self.shared else "{layer}"
        if placeholder not in self.layer:
            raise ValueError(f"Stack.layer must contain {placeholder!r}, got {self.layer!r}")
        if not self.tensors:
            raise ValueError("Stack.tensors is empty")

    def sources(self, role: str) -> tuple[str, ...]:
        """The tensor roles that head role ``role`` is computed from."""
        if role in self.tensors:
            return (role,)
        if "qkv" in self.tensors and role in ("q", "k", "v"):
            return ("qkv",)
        for option in _SOURCES.get(role, ()):
            if all(r in self.tensors for r in option):
                return option
        raise ValueError(f"stack {self.name!r} has no tensor for role {role!r} (it has {', '.join(self.tensors)})")

    def needed(self, roles: Sequence[str]) -> list[str]:
        """The tensor roles to read for the requested head roles."""
        need: list[str] = []
        for role in roles:
            for r in self.sources(role):
                if r not in need:
                    need.append(r)
        return need

    def dims(self, config: Mapping) -> Dims:
        """This stack's sizes, from ``config`` (the model's whole config as a dict)."""
        sub = config
        if self.config:
            sub = config.get(self.config)
            if not isinstance(sub, Mapping):
                raise ValueError(f"config has no sub-config {self.config!r} for the {self.name!r} stack")
        found = {}
        for size, keys in _DIM_KEYS.items():
            found[size] = _lookup(sub, tuple(self.sizes.get(size, ())) + keys)
        missing = [n for n in ("d", "n_heads") if found[n] is None]
        if missing:
            where = f"config[{self.config!r}]" if self.config else "config"
            looked = {m: tuple(self.sizes.get(m, ())) + _DIM_KEYS[m] for m in missing}
            raise ValueError(f"{where} lacks {missing} (looked for {looked})")
        H_all = found["n_heads"]
        H_kv_all = H_all if found["n_kv_heads"] is None else found["n_kv_heads"]
        varies = isinstance(H_all, (list, tuple)) or isinstance(H_kv_all, (list, tuple))
        n = len(H_all if isinstance(H_all, (list, tuple)) else H_kv_all) if varies else 1
        Hs = list(H_all) if isinstance(H_all, (list, tuple)) else [H_all] * n
        Hkvs = list(H_kv_all) if isinstance(H_kv_all, (list, tuple)) else [H_kv_all] * n
        if len(Hs) != len(Hkvs):
            raise ValueError(f"per-layer head counts of different lengths: {len(Hs)} query, {len(Hkvs)} key/value")
        pairs = tuple((int(a), int(b)) for a, b in zip(Hs, Hkvs))
        for H, H_kv in pairs:
            if H <= 0 or H_kv <= 0 or H % H_kv:
                raise ValueError(
                    f"grouped-query attention needs H_kv to divide H, got H={H} query heads and H_kv={H_kv} key/value heads"
                )
        n_layers = int(found["n_layers"] or (n if varies else 0))
        if varies and n_layers != n:
            raise ValueError(f"per-layer head counts for {n} layers, config says {n_layers} layers")
        H0, H_kv0 = pairs[0]
        per_layer = pairs if varies else None
        return Dims(int(found["d"]), H0, H_kv0, n_layers, per_layer, dict(sub))


@dataclass(frozen=True)
class Layout:
    """An architecture: the ``model_type`` values it serves and its attention stacks.

    The one-stack form needs no :class:`Stack`: ``Layout(name, model_types, layer, tensors, split)``
    builds the stack ``self`` (and then keeps ``layer``/``tensors`` only there, in ``stacks``). ``default`` names the stack read when none is asked for (the first
    stack otherwise)."""

    name: str
    model_types: tuple[str, ...]
    layer: str | None = None
    tensors: Mapping[str, str] | None = None
    split: Callable[[Mapping[str, Tensor], Dims], dict[str, Tensor]] = split_linear
    stacks: tuple[Stack, ...] = ()
    default: str | None = None

    def __post_init__(self):
        if isinstance(self.model_types, str):
            object.__setattr__(self, "model_types", (self.model_types,))
        if not self.stacks:
            if self.layer is None or self.tensors is None:
                raise ValueError("a Layout needs stacks=(...) or layer= and tensors=")
            if "{layer}" not in self.layer:
                raise ValueError(f"Layout.layer must contain '{{layer}}', got {self.layer!r}")
            object.__setattr__(self, "stacks", (Stack("self", self.layer, dict(self.tensors), self.split),))
            # the stack now holds them: one place only, so that dataclasses.replace(stacks=...) works
            object.__setattr__(self, "layer", None)
            object.__setattr__(self, "tensors", None)
        elif self.layer is not None or self.tensors is not None:
            raise ValueError("give a Layout either stacks=(...) or layer= and tensors=, not both")
        if self.default is None:
            object.__setattr__(self, "default", self.stacks[0].name)
        if self.default not in self.stack_names:
            raise ValueError(f"default stack {self.default!r} is not one of {self.stack_names}")

    @property
    def stack_names(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.stacks))

    def spellings(self, stack: str | None = None) -> list[Stack]:
        """The :class:`Stack` objects of one stack name (the default stack when ``None``)."""
        name = self.default if stack is None else stack
        found = [s for s in self.stacks if s.name == name]
        if not found:
            raise ValueError(f"layout {self.name!r} has no stack {name!r}; its stacks: {', '.join(self.stack_names)}")
        return found

    def describe(self) -> list[dict]:
        """One row per stack spelling: name, layer pattern, tensors, split, sizes (for tables and JSON)."""
        return [
            {
                "layout": self.name, "stack": s.name, "default": s.name == self.default, "layer": s.layer,
                "tensors": dict(s.tensors), "split": next((k for k, f in SPLITS.items() if f is s.split), s.split.__name__),
                "config": s.config, "within": list(s.within), "shared": s.shared, "latent": s.latent,
                "sparse": s.sparse,
            }
            for s in self.stacks
        ]


#: model_type -> Layout, the built-in and registered architectures.
LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add an architecture (or replace the layout of its model types). For a Llama-like model whose keys
    read ``blocks.3.attn.wq.weight``::

        from flagcore.weights import Layout, register_layout
        register_layout(Layout(
            name="mymodel", model_types=("mymodel",), layer="blocks.{layer}.attn.",
            tensors={"q": "wq.weight", "k": "wk.weight", "v": "wv.weight", "o": "wo.weight"},
        ))

    (``nn.Linear`` weights are cut by the default split; pass ``split=`` for fused layouts, one of
    :data:`SPLITS` or your own function, and ``stacks=(Stack(...), ...)`` for several attention stacks.)
    Check it against the model's own forward pass with :func:`flagcore.layout_check.verify_layout`.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout takes a Layout, got {type(layout).__name__}")
    for model_type in layout.model_types:
        LAYOUTS[model_type] = layout
    return layout


def layout_from_dict(spec: Mapping) -> Layout:
    """A :class:`Layout` from plain data (a JSON layout file): ``name``, ``model_types``, and either
    ``layer``/``tensors``/``split`` or ``stacks``: a list of objects with the :class:`Stack` fields; a
    ``split`` is a name in :data:`SPLITS`."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a layout must be a JSON object, got {type(spec).__name__}")
    unknown = set(spec) - {"name", "model_types", "layer", "tensors", "split", "stacks", "default"}
    if unknown:
        raise ValueError(f"unknown layout fields {sorted(unknown)}")

    def split_of(name):
        if name is None:
            return split_linear
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        return SPLITS[name]

    if "name" not in spec:
        raise ValueError("a layout needs a 'name'")
    types = tuple(spec.get("model_types", ()))
    if "stacks" in spec:
        stacks = []
        for s in spec["stacks"]:
            s = dict(s)
            s["split"] = split_of(s.get("split"))
            s["within"] = tuple(s.get("within", ()))
            s["sizes"] = {k: tuple(v) for k, v in s.get("sizes", {}).items()}
            stacks.append(Stack(**s))
        return Layout(spec["name"], types, stacks=tuple(stacks), default=spec.get("default"))
    return Layout(spec["name"], types, spec.get("layer"), spec.get("tensors"), split_of(spec.get("split")))


# --------------------------------------------------------------------------- built-in layouts
#
# Only model types whose tiny random model passes the forward-pass check in tests/test_layouts.py are
# listed; other families with the same keys are found by auto-detection (WeightSource), which a loaded
# model confirms by its own forward pass.

_QKV = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight"}
_LLAMA = {**_QKV, "o": "o_proj.weight"}
_BART = {**_QKV, "o": "out_proj.weight"}
_BERT = {"q": "self.query.weight", "k": "self.key.weight", "v": "self.value.weight", "o": "output.dense.weight"}
_T5 = {"q": "q.weight", "k": "k.weight", "v": "v.weight", "o": "o.weight"}
_ENC = {"d": ("d_model",), "n_heads": ("encoder_attention_heads",), "n_layers": ("encoder_layers",)}
_DEC = {"d": ("d_model",), "n_heads": ("decoder_attention_heads",), "n_layers": ("decoder_layers",)}
_LATENT = {
    "q_a": "q_a_proj.weight", "q_norm": "q_a_layernorm.weight", "q_b": "q_b_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight", "kv_norm": "kv_a_layernorm.weight", "kv_b": "kv_b_proj.weight",
    "o": "o_proj.weight",
}

_BUILTIN = [
    Layout("gpt2", ("gpt2",), "h.{layer}.attn.", {"qkv": "c_attn.weight", "o": "c_proj.weight"}, split_conv1d),
    Layout(
        "bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        "encoder.layer.{layer}.attention.", _BERT,
    ),
    Layout(
        "llama",
        (
            "llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
            "mixtral", "qwen2_moe", "qwen3_moe", "stablelm", "cohere", "starcoder2", "granite", "gpt_oss", "phi",
        ),
        stacks=(
            Stack("self", "layers.{layer}.self_attn.", _LLAMA),
            Stack("self", "layers.{layer}.self_attn.", {**_QKV, "o": "dense.weight"}),  # phi
        ),
    ),
    Layout("gpt_neox", ("gpt_neox",), "layers.{layer}.attention.", {"qkv": "query_key_value.weight", "o": "dense.weight"}, split_interleaved),
    Layout("opt", ("opt",), "layers.{layer}.self_attn.", _BART),
    Layout("gptj", ("gptj",), "h.{layer}.attn.", _BART),
    Layout("gpt_neo", ("gpt_neo",), "h.{layer}.attn.attention.", _BART),
    Layout(
        "distilbert", ("distilbert",), "transformer.layer.{layer}.attention.",
        {"q": "q_lin.weight", "k": "k_lin.weight", "v": "v_lin.weight", "o": "out_lin.weight"},
    ),
    Layout(
        "deberta-v2", ("deberta-v2",), "encoder.layer.{layer}.attention.",
        {"q": "self.query_proj.weight", "k": "self.key_proj.weight", "v": "self.value_proj.weight", "o": "output.dense.weight"},
    ),
    Layout(
        "vit", ("vit",),
        stacks=(
            Stack("self", "layer.{layer}.attention.", {"q": "attention.query.weight", "k": "attention.key.weight",
                  "v": "attention.value.weight", "o": "output.dense.weight"}),  # the checkpoint's keys
            Stack("self", "layers.{layer}.attention.", _LLAMA),  # transformers 5's in-memory names
        ),
    ),
    Layout("phi3", ("phi3",), "layers.{layer}.self_attn.", {"qkv": "qkv_proj.weight", "o": "o_proj.weight"}, split_fused_rows),
    Layout("bloom", ("bloom",), "h.{layer}.self_attention.", {"qkv": "query_key_value.weight", "o": "dense.weight"}, split_interleaved),
    Layout("falcon", ("falcon",), "h.{layer}.self_attention.", {"qkv": "query_key_value.weight", "o": "dense.weight"}, split_grouped),
    Layout("gpt_bigcode", ("gpt_bigcode",), "h.{layer}.attn.", {"qkv": "c_attn.weight", "o": "c_proj.weight"}, split_fused_rows),
    Layout("codegen", ("codegen",), "h.{layer}.attn.", {"qkv": "qkv_proj.weight", "o": "out_proj.weight"}, split_codegen),
    Layout("mpt", ("mpt",), "blocks.{layer}.attn.", {"qkv": "Wqkv.weight", "o": "out_proj.weight"}, split_fused_rows),
    Layout("modernbert", ("modernbert",), "layers.{layer}.attn.", {"qkv": "Wqkv.weight", "o": "Wo.weight"}, split_fused_rows),
    Layout(
        "t5", ("t5",),
        stacks=(
            Stack("encoder", "encoder.block.{layer}.layer.0.SelfAttention.", _T5),
            Stack("decoder", "decoder.block.{layer}.layer.0.SelfAttention.", _T5, sizes={"n_layers": ("num_decoder_layers",)}),
            Stack("cross", "decoder.block.{layer}.layer.1.EncDecAttention.", _T5, sizes={"n_layers": ("num_decoder_layers",)}),
        ),
    ),
    Layout(
        "bart", ("bart", "whisper"),
        stacks=(
            Stack("encoder", "encoder.layers.{layer}.self_attn.", _BART, sizes=_ENC),
            Stack("decoder", "decoder.layers.{layer}.self_attn.", _BART, sizes=_DEC),
            Stack("cross", "decoder.layers.{layer}.encoder_attn.", _BART, sizes=_DEC),
        ),
    ),
    Layout(
        "clip", ("clip",),
        stacks=(
            Stack("text", "encoder.layers.{layer}.self_attn.", _BART, config="text_config", within=("text_model",)),
            Stack("vision", "encoder.layers.{layer}.self_attn.", _BART, config="vision_config", within=("vision_model",)),
        ),
    ),
    Layout(
        "gemma3", ("gemma3",),
        stacks=(
            Stack("text", "layers.{layer}.self_attn.", _LLAMA, config="text_config", within=("language_model",)),
            Stack("vision", "encoder.layers.{layer}.self_attn.", _BART, config="vision_config", within=("vision_tower",)),
        ),
    ),
    Layout("jamba", ("jamba",), stacks=(Stack("self", "layers.{layer}.self_attn.", _LLAMA, sparse=True),)),
    Layout(
        "albert", ("albert",),
        stacks=(
            Stack("self", "encoder.albert_layer_groups.{group}.albert_layers.0.attention.",
                  {"q": "query.weight", "k": "key.weight", "v": "value.weight", "o": "dense.weight"}, shared=True),
        ),
    ),
    Layout(
        "deepseek", ("deepseek_v2", "deepseek_v3"),
        stacks=(
            Stack("self", "layers.{layer}.self_attn.", _LATENT, split_latent, sizes={"n_kv_heads": ("num_attention_heads",)}, latent=True),
            Stack("self", "layers.{layer}.self_attn.", {k: v for k, v in _LATENT.items() if not k.startswith("q")} | {"q": "q_proj.weight"},
                  split_latent, sizes={"n_kv_heads": ("num_attention_heads",)}, latent=True),
        ),
    ),
]
for _layout in _BUILTIN:
    register_layout(_layout)
del _layout
