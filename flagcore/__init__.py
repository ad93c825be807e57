"""flagcore: the geometry of alignment in deep networks, as small batched torch functions.

The library behind the flag-geometry book. Theory code computes in float64 by default and on
whatever device its inputs live on; nothing here prints, plots (except :mod:`flagcore.plotting`)
or changes global torch state.
"""

from __future__ import annotations

import torch

from .subspace import (
    AlignmentLevel,
    alignment_level,
    frobenius_overlap,
    haar_frames,
    intersection_dim,
    orthonormal_basis,
    principal_angles,
    projector,
)

__version__ = "0.1.0"

__all__ = [
    "AlignmentLevel",
    "__version__",
    "alignment_level",
    "default_device",
    "frobenius_overlap",
    "haar_frames",
    "intersection_dim",
    "orthonormal_basis",
    "principal_angles",
    "projector",
    "resolve_device",
]


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a notebook's ``device`` parameter (``"auto"``, ``"cpu"``, ``"cuda"``, ...) into a device.

    ``"auto"``/``None`` means :func:`default_device`; asking for CUDA without a GPU is an error
    rather than a silent fall-back, so a paper-scale run never quietly runs on the CPU.
    """
    if device is None or device == "auto":
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no GPU is visible; use device='auto' or 'cpu'")
    return device
