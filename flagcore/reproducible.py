"""Results that do not depend on the machine's core count.

On the CPU, torch splits a reduction or a factorisation over its threads, and the split changes the
order in which numbers are added. Where later steps amplify those last-bit differences (training, or a
QR whose output seeds a training run), the same seed gives another network on a 2-core Colab than in
the book's build. :func:`one_cpu_thread` runs such a step on one thread and restores the caller's
setting afterwards; on a GPU it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_cpu_thread"]


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
