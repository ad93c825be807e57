"""flagcore.models' image models (small CNN, ViT, MLP-Mixer): the head layout capture_features needs,
determinism by generator, every activation name, trainability, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flagcore import models, training

BUILDERS = {"cnn": models.small_cnn, "vit": models.small_vit, "mixer": models.mlp_mixer}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "leakyrelu": nn.LeakyReLU,
               "mish": nn.Mish, "silu": nn.SiLU, "softplus": nn.Softplus}
_ELEMENTWISE = tuple(ACTIVATIONS.values()) + (nn.Tanh,)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 6, shape=(1, 28, 28), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=_gen(seed))


def _build(kind: str, shape=(1, 28, 28), classes: int = 10, width: int = 12, seed: int = 0, **kw) -> nn.Sequential:
    if kind in ("vit", "mixer") and shape[-1] % 7:
        kw.setdefault("patch", 4)
    return BUILDERS[kind](shape, classes, width, generator=_gen(seed), **kw)


# ----------------------------------------------------------------------------- layout and shapes


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_shape_and_head_layout(kind, shape):
    net = _build(kind, shape=shape, classes=7, width=9)
    out = net(_images(5, shape))
    assert out.shape == (5, 7) and torch.isfinite(out).all()
    children = list(net.children())
    assert isinstance(children[-1], nn.Linear) and (children[-1].in_features, children[-1].out_features) == (9, 7)
    assert isinstance(children[-2], _ELEMENTWISE)
    assert isinstance(children[-3], nn.Linear) and children[-3].out_features == 9


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_is_used_throughout_and_captured(kind, name):
    net = _build(kind, activation=name)
    acts = [m for m in net.modules() if isinstance(m, _ELEMENTWISE)]
    assert len(acts) >= 2 and all(type(m) is ACTIVATIONS[name] for m in acts)  # hidden layers swap too
    assert len({id(m) for m in acts}) == len(acts)  # distinct instances: the head's is called once per pass
    X = _images(8)
    f = training.capture_features(net, X)
    assert f.activation is net.activation
    assert f.H.shape == (8, 12) and f.Z.shape == (8, 12) and f.W.shape == (10, 12)
    # H is the activation's output, computed independently from the pre-activations
    torch.testing.assert_close(f.H, ACTIVATIONS[name]().double()(f.Z) if name != "leakyrelu" else nn.LeakyReLU(0.01)(f.Z))
    torch.testing.assert_close(f.logits, net(X).double(), rtol=1e-5, atol=1e-5)
    D2 = training.activation_metric_of(f)
    assert D2.shape == (12,) and bool((D2 >= 0).all()) and bool((D2 <= 1.2).all())


def test_capture_rejects_a_head_without_activation_before_classifier():
    net = _build("vit")
    net.activation = nn.LayerNorm(12)  # negative control: features are no longer an activation's output
    with pytest.raises(ValueError, match="elementwise activation"):
        training.capture_features(net, _images(4))


# ----------------------------------------------------------------------------- determinism and initialisation


@pytest.mark.parametrize("kind", BUILDERS)
def test_generator_fixes_the_weights_and_global_rng_does_not(kind):
    torch.manual_seed(1)
    a = _build(kind, seed=3)
    torch.manual_seed(2)
    b = _build(kind, seed=3)
    c = _build(kind, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    X = _images(3)
    assert torch.equal(a(X), b(X))
    same = {k for k in sa if torch.equal(sa[k], sc[k])}
    # every randomly drawn tensor differs under another seed; only the norm layers' constants (1, 0) agree
    norm_keys = {f"{name}.{p}" for name, m in a.named_modules()
                 if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for p in ("weight", "bias")}
    assert norm_keys and same == norm_keys


@pytest.mark.parametrize("kind", BUILDERS)
@torch.no_grad()
def test_initialisation_follows_the_default_scheme(kind):
    net = _build(kind, seed=5)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound = m.weight[0].numel() ** -0.5
            assert float(m.weight.abs().max()) <= bound and float(m.weight.abs().max()) > 0.5 * bound
            assert float(m.bias.abs().max()) <= bound
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    if kind == "vit":
        pos = net.backbone.pos
        assert 0.01 < float(pos.std()) < 0.03  # normal(0, 0.02)


def test_parameter_counts_are_tiny():
    for kind in BUILDERS:
        assert sum(p.numel() for p in _build(kind, width=64).parameters()) < 50_000


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", BUILDERS)
def test_each_model_fits_a_small_batch(kind):
    torch.set_num_threads(1)
    # a learnable task: class c has a bright quadrant c on noise
    y = torch.arange(32) % 4
    X = 0.3 * _images(32, seed=1)
    for i, c in enumerate(y.tolist()):
        X[i, :, 14 * (c // 2) : 14 * (c // 2) + 14, 14 * (c % 2) : 14 * (c % 2) + 14] += 1.0
    net = _build(kind, classes=4, seed=2)
    h = training.train(net, X, y, epochs=60, batch_size=32, lr=0.1, weight_decay=0.0, schedule="constant", seed=0, grad_clip=1.0)
    assert h.loss[-1] < 0.5 * h.loss[0]
    assert training.accuracy(net, X, y) > 0.6


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", BUILDERS)
def test_bad_input(kind):
    b = BUILDERS[kind]
    with pytest.raises(ValueError, match="unknown activation"):
        b((1, 28, 28), 10, 8, activation="swish2")
    with pytest.raises(TypeError):
        b((1, 28, 28), 10, 8, activation=nn.ReLU)
    with pytest.raises(ValueError):
        b((28, 28), 10, 8)
    with pytest.raises(ValueError):
        b((1, 28, 28), 1, 8)
    with pytest.raises(ValueError):
        b((1, 28, 28), 10, 0)
    with pytest.raises(TypeError):
        b((1, 28, 28), 10, True)
    with pytest.raises(TypeError):
        b((1, 28, 28), 10, 8.0)


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="too small"):
        models.small_cnn((1, 6, 6), 10, 8)
    with pytest.raises(ValueError):
        models.small_cnn((1, 28, 28), 10, 8, channels=())
    with pytest.raises(ValueError):
        models.small_cnn((1, 28, 28), 10, 8, stem_stride=0)
    with pytest.raises(ValueError, match="divide"):
        models.small_vit((3, 32, 32), 10, 8, patch=7)
    with pytest.raises(ValueError, match="divide"):
        models.mlp_mixer((1, 28, 28), 10, 8, patch=5)
    with pytest.raises(ValueError):
        models.small_vit((1, 28, 28), 10, 8, dim=30, heads=4)
    with pytest.raises(ValueError):
        models.mlp_mixer((1, 28, 28), 10, 8, depth=0)
