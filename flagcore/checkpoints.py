"""Safetensors checkpoints read by byte range, from local files or over HTTP, and the revisions of a run.

A safetensors file is an 8-byte little-endian header length ``N``, a JSON header of ``N`` bytes giving
each tensor's dtype, shape and byte range, then the data. A diagnostic that needs a model's attention
weights therefore needs only the header and those ranges, not the file: :class:`SafetensorsRanges`
reads exactly those, and :class:`PartialCheckpoint` does it across the shards of a checkpoint, reading
each shard's header once, when a tensor in it is first asked for, and counting what it read.

The bytes come from a :class:`ByteRanges` backend: :class:`LocalFileRanges` (``pread`` on a local
file) or :class:`HttpRanges` (HTTP range requests, ``Range: bytes=a-b`` answered by ``206 Partial
Content``, sent through huggingface_hub's own session, headers and error mapping, so the same code
talks to the Hugging Face Hub, to a mirror named by ``HF_ENDPOINT``, and to a test server on
127.0.0.1). A server that ignores the ``Range`` header is an error, not a silent full download.

Revisions: a Hub repository's branches (Pythia's ``step0`` ... ``step143000``), or the
sub-directories of a local training-run directory, one model directory per revision (what
``save_pretrained(run / "step100")`` writes, and what ``hf download REPO --revision R --local-dir
run/R`` fetches). :func:`revision_order` sorts them by training step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "ByteRanges",
    "HttpRanges",
    "LocalFileRanges",
    "PartialCheckpoint",
    "RangeRequestError",
    "ReadCounter",
    "SafetensorsRanges",
    "TensorDigest",
    "revision_order",
    "revision_step",
]

#: safetensors dtype names -> torch dtypes (the formats' own table; F8 types as torch names them).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

#: The first read of a file asks for this many bytes: most headers fit, so a header usually costs one
#: request (huggingface_hub's own header reader makes the same bet with 100 kB).
HEADER_PROBE_BYTES = 64 * 2**10

#: safetensors' own limit on the header (its Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100 * 2**20


@dataclass
class ReadCounter:
    """What a reader asked for: requests (one per range read) and payload bytes received."""

    requests: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.requests += 1
        self.bytes += nbytes


class ByteRanges(Protocol):
    """A file read by byte ranges; ``size`` in bytes; ``where`` names it in error messages."""

    where: str
    counter: ReadCounter

    @property
    def size(self) -> int: ...

    def read(self, start: int, stop: int, *, short_ok: bool = False) -> bytearray: ...


class LocalFileRanges:
    """Byte ranges of a local file (``os.pread``: no shared file position, safe across threads)."""

    def __init__(self, path: str | os.PathLike, counter: ReadCounter | None = None):
        self.path = Path(path)
        self.where = str(self.path)
        self.counter = counter if counter is not None else ReadCounter()
        self._size = self.path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, start: int, stop: int, *, short_ok: bool = False) -> bytearray:
        stop = min(stop, self._size) if short_ok else stop
        _check_range(self.where, start, stop, self._size)
        out = bytearray(stop - start)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(out), 0
            while done < len(out):
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise OSError(f"{self.where}: file shorter than expected ({start + done} of {stop} bytes)")
                done += n
        finally:
            os.close(fd)
        self.counter.add(len(out))
        return out


class RangeRequestError(OSError):
    """A server's answer to a range request was not the bytes asked for (e.g. it ignored the range)."""


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpRanges:
    """Byte ranges of a file over HTTP: one ``GET`` with ``Range: bytes=a-b`` per read, through
    huggingface_hub's session (redirects followed, as the Hub's resolve URLs need) and its error
    mapping (``hf_raise_for_status``: missing repository, revision or file become its typed errors).

    The answer must be ``206 Partial Content`` with a ``Content-Range`` for exactly the bytes asked for;
    anything else raises ``OSError`` naming the URL (a ``200`` means the server ignored the range and
    would have sent the whole file). ``size`` comes from the first answer's ``Content-Range``, or from a
    ``HEAD`` when nothing was read yet.
    """

    def __init__(self, url: str, headers: Mapping[str, str] | None = None, counter: ReadCounter | None = None,
                 *, timeout: float = 30.0):
        self.url = url
        self.where = url
        self.headers = dict(headers or {})
        self.counter = counter if counter is not None else ReadCounter()
        self.timeout = timeout
        self._size: int | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            from huggingface_hub.utils import get_session, hf_raise_for_status

            # (no redirect argument: requests' and httpx's differ; the Hub's redirect carries X-Linked-Size)
            response = get_session().head(self.url, headers=self.headers, timeout=self.timeout)
            hf_raise_for_status(response)
            length = response.headers.get("x-linked-size") or response.headers.get("content-length")
            if length is None:
                raise OSError(f"{self.url}: the server sent no Content-Length; cannot size the file")
            self._size = int(length)
        return self._size

    def read(self, start: int, stop: int, *, short_ok: bool = False) -> bytearray:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if self._size is not None:
            stop = min(stop, self._size) if short_ok else stop
            _check_range(self.where, start, stop, self._size)
        if stop <= start:
            if stop < start:
                raise ValueError(f"{self.where}: empty or reversed byte range [{start}, {stop})")
            return bytearray()
        headers = {**self.headers, "Range": f"bytes={start}-{stop - 1}"}
        response = get_session().get(self.url, headers=headers, timeout=self.timeout)
        hf_raise_for_status(response)
        if response.status_code != 206:
            raise RangeRequestError(
                f"{self.url}: asked for bytes {start}-{stop - 1}, the server answered HTTP {response.status_code} "
                "instead of 206 Partial Content (it ignores range requests); partial reads need a server that honours them"
            )
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None:
            raise RangeRequestError(f"{self.url}: a 206 answer without a valid Content-Range header")
        first, last, total = int(match[1]), int(match[2]), match[3]
        if total != "*":
            self._size = int(total)
        expected_last = min(stop, self._size) - 1 if (short_ok and self._size is not None) else stop - 1
        data = bytearray(response.content)
        if first != start or last != expected_last or len(data) != last - first + 1:
            raise RangeRequestError(f"{self.url}: asked for bytes {start}-{stop - 1}, received {first}-{last} ({len(data)} bytes)")
        self.counter.add(len(data))
        return data


def _check_range(where: str, start: int, stop: int, size: int) -> None:
    if not 0 <= start <= stop <= size:
        raise ValueError(f"{where}: byte range [{start}, {stop}) outside the file's {size} bytes")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype, shape and absolute byte range in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


class SafetensorsRanges:
    """One safetensors file read by range: the header once (usually one request, whose bytes past the
    header also serve the tensors that lie wholly inside it), then each other tensor's bytes when asked. The header is validated as safetensors' own reader does (length within the file and its
    limit, known dtypes, byte counts that match the shapes, ranges inside the data section)."""

    def __init__(self, ranges: ByteRanges):
        self.ranges = ranges
        where = ranges.where
        first = ranges.read(0, HEADER_PROBE_BYTES, short_ok=True)
        if len(first) < 8:
            raise ValueError(f"{where}: {len(first)} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", first[:8])
        if n > MAX_HEADER_BYTES or 8 + n > ranges.size:
            raise ValueError(f"{where}: header length {n} is impossible for a {ranges.size}-byte file; not safetensors?")
        raw = first[8:8 + n] if len(first) >= 8 + n else first[8:] + ranges.read(len(first), 8 + n)
        try:
            header = json.loads(bytes(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: the safetensors header is not valid JSON ({exc})") from None
        self.header_bytes = 8 + n
        # the first read often holds small tensors too (or all of a small file): served from it, never fetched twice
        self._prefix = first
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorEntry] = {}
        data_size = ranges.size - self.header_bytes
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as exc:
                raise ValueError(f"{where}: tensor {key!r}: unknown dtype or missing field ({exc})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise ValueError(f"{where}: tensor {key!r}: byte range [{begin}, {end}) does not hold {shape} {info['dtype']}")
            self.entries[key] = TensorEntry(dtype, shape, self.header_bytes + begin, self.header_bytes + end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, key: str) -> bytearray:
        entry = self.entries[key]
        if entry.stop <= len(self._prefix):
            return self._prefix[entry.start:entry.stop]
        return self.ranges.read(entry.start, entry.stop)

    def tensor(self, key: str) -> Tensor:
        entry = self.entries[key]
        data = self.raw(key)
        if not data:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)


class PartialCheckpoint:
    """A safetensors checkpoint, one file or sharded, read tensor by tensor by byte range.

    ``open_file(name)`` returns a :class:`ByteRanges` for a file of the checkpoint (local or remote);
    ``files`` are its safetensors files; ``index`` (the ``weight_map`` of ``*.safetensors.index.json``)
    says which file holds each tensor without opening any; without it every file's header is read up
    front to list the keys. :meth:`stats` counts what was read against the checkpoint's size.
    """

    def __init__(self, open_file: Callable[[str], ByteRanges], files: Sequence[str], index: Mapping[str, str] | None = None):
        self.counter = ReadCounter()
        self._open_file = open_file
        self._ranges: dict[str, ByteRanges] = {}
        self._files: dict[str, SafetensorsRanges] = {}
        if index is not None:
            self.where = dict(index)
            self.files = list(dict.fromkeys([*files, *self.where.values()]))
        else:
            self.files = list(files)
            self.where = {}
            for name in self.files:
                for key in self._file(name).keys():
                    self.where[key] = name

    def _range_file(self, name: str) -> ByteRanges:
        if name not in self._ranges:
            ranges = self._open_file(name)
            ranges.counter = self.counter  # one count for the whole checkpoint
            self._ranges[name] = ranges
        return self._ranges[name]

    def _file(self, name: str) -> SafetensorsRanges:
        if name not in self._files:
            self._files[name] = SafetensorsRanges(self._range_file(name))
        return self._files[name]

    def keys(self) -> list[str]:
        return list(self.where)

    def entry(self, key: str) -> TensorEntry:
        return self._file(self._shard_of(key)).entries[key]

    def _shard_of(self, key: str) -> str:
        try:
            return self.where[key]
        except KeyError:
            raise KeyError(f"no tensor {key!r} in this checkpoint") from None

    def get(self, key: str) -> Tensor:
        shard = self._file(self._shard_of(key))
        if key not in shard.entries:
            raise KeyError(f"the index puts {key!r} in {self.where[key]}, whose header does not list it")
        return shard.tensor(key)

    def stats(self) -> dict:
        """``requests`` and ``bytes_read`` so far; ``checkpoint_bytes``, the size of all its files (a file
        never opened is sized by a ``HEAD`` request for a remote checkpoint, by ``stat`` for a local one);
        ``files`` and ``files_opened``."""
        sizes = [self._range_file(name).size for name in self.files]
        return {"requests": self.counter.requests, "bytes_read": self.counter.bytes, "checkpoint_bytes": sum(sizes),
                "files": len(self.files), "files_opened": len(self._files)}


class TensorDigest:
    """SHA-256 of the tensors a diagnostic read: names, dtypes, shapes and raw bytes, in key order, so
    two revisions with the same digest served byte-identical copies of every tensor read (and two with
    different digests differ in at least one of them). Tensors not read are not covered."""

    def __init__(self):
        self._parts: dict[str, str] = {}

    def add(self, key: str, tensor: Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        payload = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        h = hashlib.sha256(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(payload))
        self._parts[key] = h.hexdigest()

    def __len__(self) -> int:
        return len(self._parts)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self._parts):
            h.update(f"{key}={self._parts[key]}\n".encode())
        return h.hexdigest()


_STEP = re.compile(r"(?:step|checkpoint)[-_]?(\d+)|(\d+)", re.IGNORECASE)


def revision_step(revision: str) -> int | None:
    """The training step a revision's name gives: ``step1000`` (Pythia), ``global_step50``,
    ``checkpoint-500`` (the transformers Trainer) or a bare number; None for other names (``main``,
    ``v1.0``)."""
    match = _STEP.search(revision)
    if match is None or match.end() != len(revision) or (match[2] is not None and match.start() != 0):
        return None
    return int(match[1] or match[2])


def revision_order(revisions: Iterable[str]) -> list[str]:
    """Revisions by training step (numbered names first, in step order), then the others (``main``) by name."""
    revisions = list(dict.fromkeys(revisions))
    numbered = sorted((r for r in revisions if revision_step(r) is not None), key=lambda r: (revision_step(r), r))
    return numbered + sorted(r for r in revisions if revision_step(r) is None)
