"""Results that do not depend on the machine's core count.

On the CPU, torch splits a reduction or a factorisation over its threads, and the split changes the
order in which numbers are added. Where later steps amplify those last-bit differences (training, or a
QR whose output seeds a training run), the same seed gives another network on a 2-core Colab than in
the book's build. :func:`one_cpu_thread` runs such a step on one thread and restores the caller's
setting afterwards; on a GPU it changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["on_one_cpu_thread", "one_cpu_thread"]

T = TypeVar("T")


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on one torch thread when ``device`` is the CPU, restoring the count after.

    Costs up to the speed-up of the extra cores, for the block only; a no-op for other devices.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_one_cpu_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function whose first argument is a model: it runs under :func:`one_cpu_thread` for the
    device of the model's parameters (so on one thread on the CPU, unchanged on a GPU)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        with one_cpu_thread(first.device if first is not None else "cpu"):
            return fn(model, *args, **kwargs)

    return wrapper
