"""flagcore.training and flagcore.data: determinism, the weight-decay law on a parameter the loss ignores,
hooks that catch the wrong layer, and the real offline data sets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from flagcore import data, models, training
from flagcore.alignment import activation_metric, decay_factor_per_step


def _toy(n: int = 64, d: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def _net(seed: int = 0, activation: str = "relu") -> nn.Sequential:
    return models.mlp(6, 8, 3, 3, activation=activation, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- train


def test_same_seed_same_run_different_seed_different_order():
    X, y = _toy()
    a, b, c = _net(), _net(), _net()
    ha = training.train(a, X, y, epochs=3, batch_size=16, seed=1)
    hb = training.train(b, X, y, epochs=3, batch_size=16, seed=1)
    training.train(c, X, y, epochs=3, batch_size=16, seed=2)
    assert ha.loss == hb.loss
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_training_result_does_not_depend_on_the_thread_count():
    """train() runs on one CPU thread whatever the caller's setting (the callback sees 1), restores the
    caller's setting, and gives bit-identical weights when the caller runs 1 or 2 threads."""
    X, y = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)), torch.arange(512) % 3
    runs, seen = [], []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            net = models.mlp(64, 256, 3, 3, generator=torch.Generator().manual_seed(0))
            training.train(net, X, y, epochs=2, batch_size=64, record_every=4,
                           on_record=lambda m, s: seen.append(torch.get_num_threads()))
            assert torch.get_num_threads() == threads  # restored
            runs.append([p.detach().clone() for p in net.parameters()])
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1}
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_orthogonal_init_does_not_depend_on_the_thread_count():
    """The orthogonal init's QR runs on one thread: the same generator gives the same weights at 1 and 2
    threads (without it, a 784 x 64 QR differs in the last bits between the two on this machine)."""
    nets = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            nets.append(models.mlp(784, 64, 3, 10, init="orthogonal", generator=torch.Generator().manual_seed(0)))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


def test_standardize_and_features_do_not_depend_on_the_thread_count():
    """standardize's statistics and capture_features' forward pass run on one thread: equal at 1 and 2
    threads. (Without it, the standardised 3000 MNIST images differed in the last bits on this machine.)"""
    split = data.balanced_subset(data.load_dataset("mnist", "train"), 300, torch.Generator().manual_seed(0))
    net = models.mlp(784, 64, 3, 10, generator=torch.Generator().manual_seed(0))
    out = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (std,) = data.standardize(split)
            out.append((std.X, training.capture_features(net, std.flat()).H))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_step_count_schedule_and_records():
    X, y = _toy(n=50)
    net = _net()
    h = training.train(net, X, y, epochs=2, batch_size=16, lr=0.1, record_every=3, schedule="cosine")
    steps = math.ceil(2 * 50 / 16)
    assert h.steps == steps == len(h.lr)
    assert h.lr[0] == pytest.approx(0.1) and h.lr[-1] < 0.1 * (1 - math.cos(math.pi / steps))  # cosine to ~0
    assert h.record_steps == [0, 3, 6, 7] and isinstance(h.records[0], dict)
    # records are copies: the first one is the initial state, not the trained one
    assert not torch.equal(h.records[0]["0.weight"], net[0].weight)
    h2 = training.train(_net(), X, y, epochs=1, batch_size=16, schedule="constant", record_every=2,
                        on_record=lambda m, step: (step, m.training, torch.is_grad_enabled()))
    assert all(not train_mode and not grad for _, train_mode, grad in h2.records)
    assert set(h2.lr) == {0.05}


class _WithIdleParameter(nn.Module):
    """A classifier plus a parameter the loss never sees: only weight decay and momentum move it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 3)
        self.idle = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.body(x) + 0.0 * self.idle.sum()  # zero gradient, but a parameter of the optimiser


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_law_on_a_parameter_the_loss_ignores(momentum):
    """Theorem 5.3's mechanism in torch.optim.SGD: a gradient-free direction decays by the heavy-ball root."""
    X, y = _toy()
    net = _WithIdleParameter().double()
    eta, lam, steps = 0.1, 0.05, 40
    training.train(net, X.double(), y, epochs=steps * 16 / 64, batch_size=16, lr=eta, momentum=momentum,
                   weight_decay=lam, schedule="constant")
    # heavy ball on the scalar recursion v <- mu v + lam w, w <- w - eta v, from v = 0
    w, v = 1.0, 0.0
    for _ in range(steps):
        v = momentum * v + lam * w
        w = w - eta * v
    assert torch.allclose(net.idle.detach(), torch.full((4,), w, dtype=torch.float64), rtol=1e-12)
    if momentum == 0.0:
        assert w == pytest.approx(float(decay_factor_per_step(eta, lam)) ** steps, rel=1e-12)
    # negative control: without weight decay the idle parameter does not move
    still = _WithIdleParameter().double()
    training.train(still, X.double(), y, epochs=1, batch_size=16, weight_decay=0.0)
    assert torch.equal(still.idle.detach(), torch.ones(4, dtype=torch.float64))


def test_train_bad_input_and_divergence():
    X, y = _toy()
    with pytest.raises(ValueError, match="same positive number"):
        training.train(_net(), X[:10], y, epochs=1)
    with pytest.raises(ValueError, match="integer class labels"):
        training.train(_net(), X, y.float(), epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        training.train(_net(), X, y, epochs=1, schedule="step")
    with pytest.raises(ValueError, match="epochs"):
        training.train(_net(), X, y, epochs=0)
    with pytest.raises(ValueError, match="NaN"):
        training.train(_net(), X.masked_fill(X > 2, float("nan")), y, epochs=1)
    with pytest.raises(FloatingPointError, match="diverged"):
        training.train(_net(), X * 1e30, y, epochs=5, lr=1e3)


# ----------------------------------------------------------------------------- capture_features


def test_capture_features_matches_a_manual_forward():
    X, _ = _toy()
    net = _net(seed=3).double()
    f = training.capture_features(net, X.double(), batch_size=10)
    with torch.no_grad():
        Z = net[2](net[1](net[0](X.double())))
        H = torch.relu(Z)
    assert torch.equal(f.Z, Z) and torch.equal(f.H, H)
    assert torch.equal(f.W, net[4].weight) and f.logits.shape == (64, 3)
    assert isinstance(f.activation, nn.ReLU)
    assert torch.allclose(training.activation_metric_of(f), (Z > 0).double().mean(0))
    with torch.no_grad():
        net[4].weight.add_(1.0)  # the captured W is a copy, not a view of the live weight
    assert not torch.equal(f.W, net[4].weight)


def test_inplace_activation_keeps_the_pre_activations():
    X, _ = _toy()
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    f = training.capture_features(net, X.double())
    with torch.no_grad():
        Z = net[0](X.double())
    assert torch.equal(f.Z, Z) and bool((f.Z < 0).any())


def test_smooth_activation_metric_uses_the_module():
    X, _ = _toy()
    net = _net(activation="gelu").double()
    f = training.capture_features(net, X.double())
    assert torch.allclose(training.activation_metric_of(f), activation_metric(f.Z, "gelu"), atol=1e-12)


def test_linear_network_has_identity_metric_and_no_hook():
    X, _ = _toy()
    net = _net(activation="linear")
    f = training.capture_features(net, X)
    assert f.Z is None and f.activation is None
    assert torch.equal(training.activation_metric_of(f), torch.ones(8, dtype=torch.float64))


def test_hook_on_the_wrong_layer_is_an_error():
    X, _ = _toy()
    pooled = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="LayerNorm"):
        training.capture_features(pooled, X)
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Linear(6, 8), shared, nn.Linear(8, 8), shared, nn.Linear(8, 3))
    with pytest.raises(ValueError, match="more than once"):
        training.capture_features(twice, X)
    # negative control: a Dropout between activation and classifier is value-preserving in eval mode
    dropout = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    assert training.capture_features(dropout, X).H.shape == (64, 8)


# ----------------------------------------------------------------------------- models


def test_mlp_layout_and_init():
    net = models.mlp(10, 16, 5, 4, activation="relu", init="orthogonal", generator=torch.Generator().manual_seed(0))
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert len(linears) == 5 and isinstance(net[-1], nn.Linear) and isinstance(net[-2], nn.ReLU)
    W = linears[1].weight.detach()
    assert torch.allclose(W @ W.mT, 2.0 * torch.eye(16), atol=1e-5)  # orthogonal with the ReLU gain √2
    assert all(m.bias.abs().max() == 0 for m in linears)
    lin = models.mlp(10, 16, 5, 4, activation="linear")
    assert all(isinstance(m, nn.Linear) for m in lin)
    with pytest.raises(ValueError, match="activation"):
        models.mlp(10, 16, 5, 4, activation="swish2")
    with pytest.raises(ValueError, match="init"):
        models.mlp(10, 16, 5, 4, init="he")
    with pytest.raises(ValueError, match="depth"):
        models.mlp(10, 16, 1, 4)


# ----------------------------------------------------------------------------- data


def test_mnist_is_real_and_balanced_subset_is_balanced():
    test = data.load_dataset("mnist", "test")
    assert test.X.shape == (10_000, 1, 28, 28) and test.X.dtype == torch.float32
    assert 0.0 <= float(test.X.min()) and float(test.X.max()) <= 1.0
    counts = torch.bincount(test.y, minlength=10)
    assert counts.sum() == 10_000 and counts.min() > 800  # the real test set: 892..1135 per class
    sub = data.balanced_subset(test, 7, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(sub.y, minlength=10), torch.full((10,), 7))
    train, test2 = data.standardize(data.balanced_subset(data.load_dataset("mnist", "train"), 50, torch.Generator()), test)
    assert abs(float(train.X.mean())) < 1e-5 and abs(float(train.X.std()) - 1) < 1e-2
    assert test2.X.shape == test.X.shape and train.flat().shape == (500, 784)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists() and not os.environ.get("FLAGCORE_FASHION_MNIST"),
                    reason="Debian dataset-fashion-mnist not installed (.ci/run installs it)")
def test_fashion_mnist_idx_files_parse():
    train = data.load_dataset("fashion-mnist", "train")
    assert train.X.shape == (60_000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.y, minlength=10), torch.full((10,), 6000))  # exactly balanced
