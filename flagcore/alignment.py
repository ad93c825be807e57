"""Alignment between adjacent layers (flag paper, Definition 3.1): constructions at each level.

The classifier/feature diagnostics of Section 5 (Level-2 attraction, the commutator obstruction)
will live here too; they build on :mod:`flagcore.subspace`, which decides the level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subspace import AlignmentLevel, haar_frames

__all__ = ["layer_pair_at_level"]


def _singular_values(r: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """``r`` descending values in about [0.5, 2] with relative gaps of at least ``0.37 / (r - 1)``.

    Evenly spaced values jittered by a quarter of the spacing: random, bounded away from 0 (ranks are
    unambiguous) and with gaps no tolerance mistakes for a repeated value (Level 3 stays defined,
    even in float32 for r up to ~1000). Uniform draws would give arbitrarily small gaps.
    """
    if r == 1:
        return 0.5 + 1.5 * torch.rand(1, generator=generator, dtype=dtype)
    spacing = 1.5 / (r - 1)
    jitter = (torch.rand(r, generator=generator, dtype=dtype) - 0.5) * (spacing / 2)
    return torch.linspace(2.0, 0.5, r, dtype=dtype) + jitter


def layer_pair_at_level(
    level: AlignmentLevel | int,
    d_mid: int,
    r_prev: int,
    r_next: int | None = None,
    *,
    d_in: int | None = None,
    d_out: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Random adjacent layers ``W_prev [d_mid, d_in]``, ``W_next [d_out, d_mid]`` at exactly ``level``.

    The output subspace ``U`` of ``W_prev`` (rank ``r_prev``) and the input subspace ``V`` of
    ``W_next`` (rank ``r_next``, default ``r_prev``) are placed as the level requires; everything
    else (the other singular subspaces, the singular values) is random:

    * GENERAL: ``U`` and ``V`` independent Haar subspaces, so with probability 1 neither contains
      the other (needs both ranks below ``d_mid``: all of R^d contains everything);
    * FLAG: the smaller of ``U``, ``V`` inside the larger (needs ``r_prev != r_next``);
    * SUBSPACE: ``V = U O`` with a Haar-random rotation ``O`` of the common subspace;
    * STRICT: ``V = U S`` with random signs ``S``.
    """
    level = AlignmentLevel(level)
    r_next = r_prev if r_next is None else r_next
    d_in = d_mid if d_in is None else d_in
    d_out = d_mid if d_out is None else d_out
    if not (1 <= r_prev <= min(d_mid, d_in) and 1 <= r_next <= min(d_mid, d_out)):
        raise ValueError(
            f"ranks must satisfy 1 <= r_prev <= min(d_mid, d_in) and 1 <= r_next <= min(d_mid, d_out); "
            f"got r_prev={r_prev}, r_next={r_next}, d_in={d_in}, d_mid={d_mid}, d_out={d_out}"
        )
    if level == AlignmentLevel.GENERAL and max(r_prev, r_next) == d_mid:
        raise ValueError("Level 0 needs both ranks below d_mid: a full-rank subspace contains the other one")
    if level == AlignmentLevel.FLAG and r_prev == r_next:
        raise ValueError("Level 1 without Level 2 needs r_prev != r_next (equal ranks make containment equality)")
    if level in (AlignmentLevel.SUBSPACE, AlignmentLevel.STRICT) and r_prev != r_next:
        raise ValueError(f"Level {int(level)} needs r_prev == r_next, got {r_prev} and {r_next}")
    if level == AlignmentLevel.SUBSPACE and r_prev == 1:
        raise ValueError("Level 2 without Level 3 needs rank >= 2: the only rotations of a line are ±1, so it is strict")

    frame = haar_frames(d_mid, d_mid, 1, generator, dtype=dtype)[0]
    if level == AlignmentLevel.GENERAL:
        U = haar_frames(d_mid, r_prev, 1, generator, dtype=dtype)[0]
        V = haar_frames(d_mid, r_next, 1, generator, dtype=dtype)[0]
    elif level == AlignmentLevel.FLAG:
        big = frame[:, : max(r_prev, r_next)]
        # The small subspace is a random subspace of the big one, not just its first columns.
        small = big @ haar_frames(big.shape[1], min(r_prev, r_next), 1, generator, dtype=dtype)[0]
        U, V = (small, big) if r_prev < r_next else (big, small)
    else:
        U = frame[:, :r_prev]
        if level == AlignmentLevel.SUBSPACE:
            V = U @ haar_frames(r_prev, r_prev, 1, generator, dtype=dtype)[0]
        else:
            signs = torch.randint(0, 2, (r_prev,), generator=generator).to(dtype) * 2 - 1
            V = U * signs
    W_prev = U @ torch.diag(_singular_values(r_prev, generator, dtype)) @ haar_frames(d_in, r_prev, 1, generator, dtype=dtype)[0].T
    W_next = haar_frames(d_out, r_next, 1, generator, dtype=dtype)[0] @ torch.diag(_singular_values(r_next, generator, dtype)) @ V.T
    return W_prev, W_next
