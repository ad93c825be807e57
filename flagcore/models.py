"""Small networks for the training experiments, each ending in an activation then one ``nn.Linear`` classifier.

Every builder returns an ``nn.Sequential``-like module whose *last* child is the final linear layer
(``classifier``) and whose second-to-last child is the activation that produces the penultimate
features (``None``-free: a linear network simply has no activation there). That is the layout
:func:`flagcore.training.capture_features` relies on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .reproducible import one_cpu_thread
from .subspace import _as_int

__all__ = ["ACTIVATIONS", "INITS", "make_activation", "mlp", "mlp_mixer", "small_cnn", "small_vit"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "mish": nn.Mish,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}

INITS = ("xavier", "orthogonal", "default")


def make_activation(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``gelu``, ``leakyrelu``, ``mish``, ``silu``, ``softplus``, ``tanh``)."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} or 'linear'")
    return ACTIVATIONS[key]()


def _init_linear(layer: nn.Linear, init: str, generator: torch.Generator, gain: float = 1.0) -> None:
    with torch.no_grad():
        if init == "xavier":
            nn.init.xavier_uniform_(layer.weight, generator=generator)
        elif init == "orthogonal":
            with one_cpu_thread():  # its QR, split over threads, would give another basis on another machine
                nn.init.orthogonal_(layer.weight, gain=gain, generator=generator)
        else:  # PyTorch's default (Kaiming-uniform), redrawn from the generator for determinism
            bound = 1 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()


def _gain(activation: str) -> float:
    key = activation.lower().replace("_", "").replace("-", "")
    if key in ("relu", "tanh"):
        return nn.init.calculate_gain(key)
    if key == "leakyrelu":
        return nn.init.calculate_gain("leaky_relu", 0.01)
    return 1.0  # smooth activations: PyTorch has no gain for GELU/SiLU/Mish/Softplus


def mlp(
    in_features: int,
    width: int,
    depth: int,
    classes: int,
    *,
    activation: str = "relu",
    init: str = "xavier",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A ``depth``-layer fully connected network: ``depth − 1`` hidden layers of ``width`` plus the classifier.

    ``activation="linear"`` gives a deep linear network (no activation modules at all). ``init`` is
    ``"xavier"`` (uniform, gain 1: the textbook recipe, under which a deep ReLU stack halves its signal's
    second moment per layer), ``"orthogonal"`` (with the activation's gain, ``nn.init.calculate_gain``:
    √2 for ReLU, which keeps the second moment constant with depth) or ``"default"``; biases start at 0. Weights are drawn from
    ``generator`` so that a seed fixes the network.
    """
    in_features, width, depth, classes = (_as_int(n, v) for n, v in
                                          (("in_features", in_features), ("width", width), ("depth", depth), ("classes", classes)))
    if min(in_features, width, classes) < 1 or depth < 2:
        raise ValueError(f"need positive sizes and depth >= 2, got in={in_features}, width={width}, depth={depth}, classes={classes}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    linear = activation.lower() in ("linear", "identity", "none")
    gain = 1.0 if linear else _gain(activation)
    layers: list[nn.Module] = []
    for i in range(depth - 1):
        layer = nn.Linear(in_features if i == 0 else width, width)
        _init_linear(layer, init, generator, gain)
        layers.append(layer)
        if not linear:
            layers.append(make_activation(activation))
    classifier = nn.Linear(width, classes)
    _init_linear(classifier, init, generator)
    layers.append(classifier)
    return nn.Sequential(*layers)



# =========================================================================== small image models (E.1.5–E.1.6)
#
# Tiny stand-ins for the paper's ResNet / ViT-Tiny / MLP-Mixer, sized for CI on one CPU thread. Each is an
# ``nn.Sequential(backbone, nn.Linear(d, p), activation, nn.Linear(p, classes))``: the backbone maps images
# ``[N, C, H, W]`` to a pooled vector ``[N, d]``, and the last three children are the head whose activation
# output ``H [N, p]`` is what :func:`flagcore.training.capture_features` hooks. Every hidden nonlinearity
# uses the same activation as the head (the paper swaps the activation throughout the network), each its
# own module instance. All parameters are drawn from ``generator``: the global RNG plays no part.


def _check_image_model_args(image_shape: object, classes: object, width: object) -> tuple[tuple[int, int, int], int, int]:
    if not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3:
        raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
    shape = tuple(_as_int("image_shape", v) for v in image_shape)
    classes, width = _as_int("classes", classes), _as_int("width", width)
    if min(shape) < 1 or classes < 2 or width < 1:
        raise ValueError(f"need positive image sizes, classes >= 2 and width >= 1; got {shape}, {classes}, {width}")
    return shape, classes, width  # type: ignore[return-value]


def _check_activation_name(activation: str) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name (str), got {type(activation).__name__}")
    make_activation(activation)  # raises ValueError for unknown names
    return activation


@torch.no_grad()
def _reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter from ``generator`` in PyTorch's default scheme (module order is fixed).

    ``nn.Linear`` / ``nn.Conv2d``: weight and bias uniform on ``±1/√fan_in`` (PyTorch's default
    Kaiming-uniform with ``a = √5``); norm layers: weight 1, bias 0; free tensors (class token, position
    embeddings): normal with sd 0.02 (the ViT convention).
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            bound = 1 / fan_in**0.5
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
                continue
            param.normal_(0.0, 0.02, generator=generator)


def _head(
    backbone: nn.Module, d: int, width: int, classes: int, activation: str, generator: torch.Generator | None
) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("penultimate", nn.Linear(d, width))
    model.add_module("activation", make_activation(activation))
    model.add_module("classifier", nn.Linear(width, classes))
    _reset_parameters(model, generator if generator is not None else torch.Generator().manual_seed(0))
    return model


class _CNNBackbone(nn.Module):
    """``[conv 3×3 → GroupNorm → σ → max-pool 2]`` × len(channels), then global average pooling."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], activation: str, stem_stride: int):
        super().__init__()
        blocks = []
        for i, (c_in, c_out) in enumerate(zip((in_channels, *channels[:-1]), channels)):
            stride = stem_stride if i == 0 else 1
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(1, c_out),
                       make_activation(activation), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(-2, -1))


def small_cnn(
    image_shape: tuple[int, int, int],
    classes: int,
    width: int,
    *,
    activation: str = "relu",
    channels: tuple[int, ...] = (16, 32),
    stem_stride: int = 2,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A small convolutional network: a ResNet stand-in for CI.

    ``len(channels)`` blocks of 3×3 convolution (the first with stride ``stem_stride``), GroupNorm (one
    group: batch-independent, so training and evaluation agree), ``activation`` and 2×2 max-pooling,
    then global average pooling to ``channels[-1]`` numbers, then the head ``nn.Linear(channels[-1],
    width) → activation → nn.Linear(width, classes)``. Needs images at least
    ``stem_stride · 2**len(channels)`` pixels on each side.
    """
    (c, h, w), classes, width = _check_image_model_args(image_shape, classes, width)
    _check_activation_name(activation)
    if not isinstance(channels, (tuple, list)) or not channels:
        raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
    channels = tuple(_as_int("channels", v) for v in channels)
    if min(channels) < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    stem_stride = _as_int("stem_stride", stem_stride)
    if stem_stride < 1:
        raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
    if min(h, w) < stem_stride * 2 ** len(channels):
        raise ValueError(f"images of {h}×{w} are too small for a stride-{stem_stride} stem and {len(channels)} pooling stages")
    return _head(_CNNBackbone(c, channels, activation, stem_stride), channels[-1], width, classes, activation, generator)


def _patch_grid(image_shape: tuple[int, int, int], patch: int) -> tuple[int, int]:
    c, h, w = image_shape
    patch = _as_int("patch", patch)
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch size {patch} must divide the image sides {h}×{w}")
    return (h // patch) * (w // patch), c * patch * patch


def _patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, (H/P)(W/P), C·P·P]`` non-overlapping patches, row-major."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // patch) * (w // patch), c * patch * patch)


class _Attention(nn.Module):
    """Multi-head self-attention with explicit ``nn.Linear`` projections (hooks see every layer)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), make_activation(activation), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, activation: str):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _MLP(dim, mlp_ratio * dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViTBackbone(nn.Module):
    """Patch embedding + class token + learnt positions, pre-LN blocks, final LayerNorm, class-token output."""

    def __init__(
        self, image_shape: tuple[int, int, int], patch: int, dim: int, depth: int, heads: int, mlp_ratio: int, activation: str
    ):
        super().__init__()
        tokens, patch_dim = _patch_grid(image_shape, patch)
        self.patch = patch
        self.embed = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(_ViTBlock(dim, heads, mlp_ratio, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(_patchify(x, self.patch))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens))[:, 0]


def small_vit(
    image_shape: tuple[int, int, int],
    classes: int,
    width: int,
    *,
    activation: str = "gelu",
    patch: int = 7,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    mlp_ratio: int = 2,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A tiny Vision Transformer: a ViT-Tiny stand-in for CI.

    ``patch × patch`` patches embedded to ``dim``, a class token and learnt position embeddings,
    ``depth`` pre-LayerNorm blocks (``heads``-head self-attention, an MLP of width ``mlp_ratio·dim``
    with ``activation``), a final LayerNorm, the class token's vector, then the head
    ``nn.Linear(dim, width) → activation → nn.Linear(width, classes)``.
    """
    shape, classes, width = _check_image_model_args(image_shape, classes, width)
    _check_activation_name(activation)
    _patch_grid(shape, patch)
    dim, depth, heads, mlp_ratio = (_as_int(n, v) for n, v in
                                    (("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)))
    if min(dim, depth, heads, mlp_ratio) < 1 or dim % heads:
        raise ValueError(f"need positive dim, depth, heads, mlp_ratio with heads dividing dim; "
                         f"got {dim}, {depth}, {heads}, {mlp_ratio}")
    return _head(_ViTBackbone(shape, patch, dim, depth, heads, mlp_ratio, activation), dim, width, classes, activation, generator)


class _MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, activation: str):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), _MLP(tokens, token_hidden, activation)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), _MLP(dim, channel_hidden, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class _MixerBackbone(nn.Module):
    def __init__(
        self, image_shape: tuple[int, int, int], patch: int, dim: int, depth: int,
        token_hidden: int, channel_hidden: int, activation: str,
    ):
        super().__init__()
        tokens, patch_dim = _patch_grid(image_shape, patch)
        self.patch = patch
        self.embed = nn.Linear(patch_dim, dim)
        self.blocks = nn.Sequential(*(_MixerBlock(tokens, dim, token_hidden, channel_hidden, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(_patchify(x, self.patch)))).mean(dim=1)


def mlp_mixer(
    image_shape: tuple[int, int, int],
    classes: int,
    width: int,
    *,
    activation: str = "gelu",
    patch: int = 7,
    dim: int = 32,
    depth: int = 2,
    token_hidden: int = 32,
    channel_hidden: int = 64,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A tiny MLP-Mixer: an MLP-Mixer-B16 stand-in for CI.

    ``patch × patch`` patches embedded to ``dim``, ``depth`` blocks of token mixing (an MLP of width
    ``token_hidden`` across patches) and channel mixing (width ``channel_hidden``), each pre-LayerNorm
    with a residual, a final LayerNorm, mean over patches, then the head ``nn.Linear(dim, width) →
    activation → nn.Linear(width, classes)``.
    """
    shape, classes, width = _check_image_model_args(image_shape, classes, width)
    _check_activation_name(activation)
    _patch_grid(shape, patch)
    names = (("dim", dim), ("depth", depth), ("token_hidden", token_hidden), ("channel_hidden", channel_hidden))
    dim, depth, token_hidden, channel_hidden = (_as_int(n, v) for n, v in names)
    if min(dim, depth, token_hidden, channel_hidden) < 1:
        raise ValueError(f"need positive dim, depth and hidden widths; got {dim}, {depth}, {token_hidden}, {channel_hidden}")
    backbone = _MixerBackbone(shape, patch, dim, depth, token_hidden, channel_hidden, activation)
    return _head(backbone, dim, width, classes, activation, generator)
