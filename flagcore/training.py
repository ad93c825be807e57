"""Small, deterministic training runs and the feature extraction of App. E.1.

* :func:`train`: minibatch SGD with momentum and weight decay (``torch.optim.SGD``: decoupled from
  nothing, i.e. ``λW`` added to the gradient, the convention of Theorem 5.3), a cosine or constant
  learning rate, data order drawn from an explicit seed, an optional tqdm bar, and in-memory
  checkpoints (CPU copies of the state dict) or a callback every ``record_every`` steps.
* :func:`capture_features`: forward hooks on the final ``nn.Linear`` (its input = the penultimate
  features ``H``) and on the activation module executed right before it (its input = the
  pre-activations ``Z``), with the E.1.2 sanity checks: the classifier's input must *be* the
  activation's output, and the widths must agree — otherwise a clear error says the hook landed on
  the wrong layer. A network whose last hidden layer is linear has ``D² = I`` and no activation hook.
* :func:`activation_metric_of`: ``D²`` (diagonal) from captured features, using the activation module.

Nothing here prints; progress bars go to stderr and are off unless asked for.

Reproducibility: on the CPU a training run is carried out on one torch thread
(:func:`flagcore.reproducible.one_cpu_thread`, re-exported here). A sum split over more threads is
added in another order, and training amplifies those last-bit differences into different networks, so
the same seed would give a different result on a 2-core Colab than in the book's build. On a GPU the
thread count plays no role and nothing is changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm  # the text bar: tqdm.auto warns in kernels without ipywidgets (papermill, CI)

from .alignment import activation_metric
from .reproducible import on_one_cpu_thread, one_cpu_thread
from .subspace import _as_int

__all__ = ["Features", "TrainHistory", "accuracy", "activation_metric_of", "capture_features", "one_cpu_thread", "train"]

# Modules that act elementwise and so can produce the penultimate features (D² is diagonal).
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.LeakyReLU, nn.Mish, nn.SiLU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.ELU)
# Modules that do nothing to the values at evaluation time and may sit between activation and classifier.
_TRANSPARENT = (nn.Dropout, nn.Identity, nn.Flatten)


@dataclass
class TrainHistory:
    """What :func:`train` recorded: per-step loss and learning rate, and the requested records."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    record_steps: list[int] = field(default_factory=list)
    records: list[object] = field(default_factory=list)  # state dicts (CPU) or callback values

    @property
    def steps(self) -> int:
        return len(self.loss)


def _check_data(X: Tensor, y: Tensor) -> None:
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise TypeError("X and y must be tensors")
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"X and y must hold the same positive number of samples, got {X.shape[0]} and {y.shape[0]}")
    if y.is_floating_point() or y.ndim != 1:
        raise ValueError("y must be a 1-D tensor of integer class labels")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or Inf")


@on_one_cpu_thread
def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    epochs: float,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    seed: int = 0,
    record_every: int | None = None,
    on_record: Callable[[nn.Module, int], object] | None = None,
    grad_clip: float | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``(X, y)`` with cross-entropy and ``torch.optim.SGD``.

    Args:
        epochs: passes over the data (fractions allowed: ``steps = ceil(epochs * N / batch_size)``).
        schedule: ``"cosine"`` (to 0 over the run, per step) or ``"constant"``.
        seed: fixes the minibatch order (the model's initial weights are the caller's business).
        record_every: every this many steps (and at step 0 and at the end) store a record: the value of
            ``on_record(model, step)`` if given (model in eval mode, no grad), else a CPU copy of the
            state dict.
        grad_clip: clip the global gradient norm to this value (deep plain networks need it early on).
        progress: show a tqdm bar (stderr).

    The data stay on their device; the model is used where its parameters live. A non-finite loss
    raises (the run diverged: lower ``lr``) instead of training on garbage. On the CPU the run uses
    one thread (:func:`one_cpu_thread`), so its result does not depend on the machine's core count.
    """
    _check_data(X, y)
    batch_size = _as_int("batch_size", batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"epochs must be positive, got {epochs}")
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got {lr}, {weight_decay}, {momentum}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be positive, got {grad_clip}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if record_every is not None and _as_int("record_every", record_every) < 1:
        raise ValueError("record_every must be >= 1")
    device = next(model.parameters()).device
    N = X.shape[0]
    steps = math.ceil(epochs * N / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda k: 0.5 * (1 + math.cos(math.pi * k / steps))) if schedule == "cosine" else (lambda k: 1.0)
    )
    order_gen = torch.Generator().manual_seed(seed)
    history = TrainHistory()

    def record(step: int) -> None:
        history.record_steps.append(step)
        if on_record is None:
            history.records.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            history.records.append(on_record(model, step))
        model.train(was_training)

    if record_every is not None:
        record(0)
    model.train()
    perm, cursor = torch.randperm(N, generator=order_gen), 0
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        if cursor + batch_size > N:  # new epoch: reshuffle (the last partial batch is dropped)
            perm, cursor = torch.randperm(N, generator=order_gen), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        xb, yb = X[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(model(xb), yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: the run diverged (lower lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        history.lr.append(scheduler.get_last_lr()[0])
        scheduler.step()
        history.loss.append(loss.item())
        if record_every is not None and (step % record_every == 0 or step == steps) and history.record_steps[-1] != step:
            record(step)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 2048) -> float:
    """Fraction of correct argmax predictions (model in eval mode)."""
    _check_data(X, y)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, X.shape[0], batch_size):
        logits = model(X[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size].cpu()).sum())
    return correct / X.shape[0]


@dataclass(frozen=True)
class Features:
    """Penultimate features and what produced them (3, 4)."""

    H: Tensor  # [N, p] the classifier's input (the last activation's output)
    Z: Tensor | None  # [N, p] pre-activations, None for a linear last hidden layer
    logits: Tensor  # [N, C]
    W: Tensor  # [C, p] classifier weight
    b: Tensor | None  # [C] classifier bias
    activation: nn.Module | None  # the activation module hooked, None when linear


def _leaf_order(model: nn.Module, x: Tensor) -> list[nn.Module]:
    """Leaf modules in the order the forward pass calls them (one probe batch)."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: order.append(mod))
               for m in model.modules() if len(list(m.children())) == 0]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
@on_one_cpu_thread
def capture_features(
    model: nn.Module,
    X: Tensor,
    *,
    classifier: nn.Linear | None = None,
    batch_size: int = 2048,
    dtype: torch.dtype = torch.float64,
) -> Features:
    """Hook the final linear layer and the activation right before it; return ``H``, ``Z``, logits, ``W``.

    ``classifier`` defaults to the last ``nn.Linear`` the forward pass calls. The activation is the last
    leaf module called before it, skipping only value-preserving modules (Dropout in eval, Identity,
    Flatten); if that module is a ``nn.Linear`` the last hidden layer is linear (``D² = I``). Anything
    else there (pooling, a norm layer, an unknown module) is an error: the features would not be the
    activation's output, and ``D²`` of that activation would describe another space.
    Results are on the CPU in ``dtype`` (float64 by default: the diagnostics are theory checks). On the
    CPU the forward pass runs on one thread, so the features (and the dead units, ranks and verdicts
    derived from them) do not depend on the core count.
    """
    if X.shape[0] == 0:
        raise ValueError("X has no samples")
    model.eval()
    device = next(model.parameters()).device
    order = _leaf_order(model, X[:2].to(device))
    linears = [i for i, m in enumerate(order) if isinstance(m, nn.Linear)]
    if classifier is None:
        if not linears:
            raise ValueError("the model has no nn.Linear layer: pass classifier= explicitly")
        cls_pos = linears[-1]
        classifier = order[cls_pos]
    else:
        if classifier not in order:
            raise ValueError("classifier is not called by the model's forward pass")
        cls_pos = max(i for i, m in enumerate(order) if m is classifier)
    before = [m for m in order[:cls_pos] if not isinstance(m, _TRANSPARENT)]
    act = before[-1] if before else None
    if act is not None and not isinstance(act, (nn.Linear, *_ELEMENTWISE)):
        raise ValueError(f"the module right before the classifier is {type(act).__name__}, not an elementwise activation "
                         "or a linear layer: the penultimate features would not be an activation's output. "
                         "Put the activation directly before the final nn.Linear, or pass classifier=.")
    is_linear = act is None or isinstance(act, nn.Linear)
    store: dict[str, list[Tensor]] = {"H": [], "Z": [], "H_act": []}
    handles = [classifier.register_forward_hook(lambda m, inp, out: store["H"].append(inp[0].detach()))]
    if not is_linear:
        # Z is copied *before* the call: an in-place activation (ReLU(inplace=True)) overwrites its input.
        # Both hooks return None: a hook that returns a value replaces the module's input or output.
        def keep_input(module: nn.Module, inp: tuple[Tensor, ...]) -> None:
            store["Z"].append(inp[0].detach().clone())

        def keep_output(module: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            store["H_act"].append(out.detach())

        handles += [act.register_forward_pre_hook(keep_input), act.register_forward_hook(keep_output)]
    logits = []
    try:
        for start in range(0, X.shape[0], batch_size):
            n_before = len(store["H_act"])
            logits.append(model(X[start : start + batch_size].to(device)).detach())
            if not is_linear and len(store["H_act"]) - n_before != 1:
                raise ValueError("the activation before the classifier is called more than once per forward pass "
                                 "(a shared module instance): give the last activation its own module")
    finally:
        for h in handles:
            h.remove()
    H = torch.cat(store["H"]).reshape(X.shape[0], -1)
    p = classifier.in_features
    if H.shape[1] != p:
        raise ValueError(f"classifier input width {H.shape[1]} != in_features {p}")
    Z = None
    if not is_linear:
        Z, H_act = torch.cat(store["Z"]), torch.cat(store["H_act"])
        if Z.shape != H.shape or not torch.equal(H_act.reshape(H.shape), H):
            raise ValueError(f"hook on the wrong layer: the activation's output {tuple(H_act.shape)} is not the classifier's "
                             f"input {tuple(H.shape)} (Appendix E.1.2 sanity check)")
        Z = Z.to("cpu", dtype)
    # copies: a recorded W must not track the live weight when the model already is CPU float64
    W = classifier.weight.detach().to("cpu", dtype, copy=True)
    b = classifier.bias.detach().to("cpu", dtype, copy=True) if classifier.bias is not None else None
    return Features(H.to("cpu", dtype), Z, torch.cat(logits).to("cpu", dtype), W, b, None if is_linear else act)


def activation_metric_of(features: Features) -> Tensor:
    """The diagonal of ``D²`` (Eq. 8) for captured features: ``Pr(z_i > 0)`` for ReLU, ``E[σ'(z_i)²]``
    for a smooth activation (autograd through the hooked module itself), all ones for a linear last layer."""
    if features.activation is None:
        return torch.ones(features.H.shape[1], dtype=features.H.dtype)
    if isinstance(features.activation, nn.ReLU):
        return activation_metric(features.Z, "relu")
    module = copy.deepcopy(features.activation).to(features.Z.dtype)
    return activation_metric(features.Z, module)
