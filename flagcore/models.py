"""Small networks for the training experiments, each ending in an activation then one ``nn.Linear`` classifier.

Every builder returns an ``nn.Sequential``-like module whose *last* child is the final linear layer
(``classifier``) and whose second-to-last child is the activation that produces the penultimate
features (``None``-free: a linear network simply has no activation there). That is the layout
:func:`flagcore.training.capture_features` relies on (spec A.15, E.1.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .subspace import _as_int

__all__ = ["ACTIVATIONS", "INITS", "make_activation", "mlp"]

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
