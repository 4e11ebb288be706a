"""safetensors files read and written tensor by tensor, without a memory map.

The format (huggingface/safetensors): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
tensors' bytes, each C-ordered, the offsets counted from the end of the header.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a read touches stays
in the process's resident memory until the file is closed, so a loader that reads a whole
checkpoint through it ends up holding the checkpoint's bytes once more beside the params it
made. Here a read is ``os.preadv`` into a fresh buffer: the process holds what it keeps, no more.
Buffers are page-aligned (past the 64 bytes at which XLA:CPU adopts a host buffer as a device
buffer without copying it), each on pages of its own (:func:`aligned_empty`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
ALIGN = 64
Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray] | None
_CHUNK = 1 << 30  # one preadv at most this many bytes (Linux caps a read near 2 GiB)


class CorruptFile(ValueError):
    """A file that is not a well-formed safetensors file (the message names the file and the fault)."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-ordered array on fresh pages of its own (page-aligned), returned to the
    system when the array goes.

    Not ``np.empty``: numpy advises the kernel to back large arrays with huge pages, and where
    that advice is honoured on demand (``transparent_hugepage=madvise``, these VMs) a fault may
    first compact memory; a float32 1B load spent 8-10 s of 12-15 faulting its params in so.
    Faulted in at once (``MAP_POPULATE``: every caller writes the whole array), one call instead
    of a fault per page: 2.5 GB in 1.0-1.1 s against 2.0-2.4 s touched page by page on these VMs;
    a float32 1B load 0.6-1.4 s faster (3 pairs).
    """
    dtype, count = np.dtype(dtype), math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # Linux only
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=flags)
    return np.frombuffer(pages, dtype, count).reshape(shape)


class Scratch:
    """A host buffer reused read after read: memory a process has touched before costs nothing
    to fill again, fresh memory a page fault per page (on a VM, most of a read's time). Only for
    a read whose array is copied before the next :meth:`reset` (a transfer that transposes)."""

    def __init__(self) -> None:
        self.buffer, self.used = aligned_empty((0,), np.uint8), 0

    def reset(self) -> None:
        self.used = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised aligned array of the buffer (grown when full: arrays taken before
        keep the old one alive)."""
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if self.used + size > self.buffer.size:
            self.buffer, self.used = aligned_empty((max(2 * self.buffer.size, size),), np.uint8), 0
        array = self.buffer[self.used : self.used + size].view(dtype).reshape(shape)
        self.used += -(-size // ALIGN) * ALIGN
        return array


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file, read on demand: ``tensor[rows, ...]`` reads only the
    file's bytes of those rows (the first axis' slice; later axes are cut after the read)."""

    name: str
    file: Path
    dtype: str  # the safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPES[self.dtype].itemsize

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.rows(index)

    def rows(self, index: tuple[slice, ...], allocate: Allocate = None) -> np.ndarray:
        """``tensor[index]``, the rows read into ``allocate(shape, dtype)`` (default: a new aligned array)."""
        first = index[0] if index else slice(None)
        start, stop, step = first.indices(self.shape[0] if self.shape else 1)
        if step != 1:
            raise ValueError(f"{self.name}: only contiguous row ranges can be read")  # a caller's bug
        rows = self.read(start, stop, allocate)
        return rows[(slice(None), *index[1:])] if len(index) > 1 else rows

    def read(self, start: int = 0, stop: int | None = None, allocate: Allocate = None) -> np.ndarray:
        """Rows ``start:stop`` of the first axis (all of them by default) into ``allocate(shape,
        dtype)`` (default: a new aligned array)."""
        if self.dtype not in NUMPY_DTYPES:
            raise CorruptFile(f"unsupported dtype {self.dtype} of tensor {self.name}")
        stop = (self.shape[0] if self.shape else 1) if stop is None else stop
        inner = self.shape[1:]
        out = (allocate or aligned_empty)((stop - start, *inner) if self.shape else (), NUMPY_DTYPES[self.dtype])
        row_bytes = math.prod(inner) * out.dtype.itemsize
        read_into(self.file, out, self.offset + start * row_bytes)
        return out


def read_into(file: Path, out: np.ndarray, offset: int) -> None:
    """Fill ``out`` (C-contiguous) with the bytes of ``file`` from ``offset`` on."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
            if count == 0:
                raise CorruptFile(f"{file.name} is truncated")
            done += count
    finally:
        os.close(fd)


def read_header(file: Path) -> dict[str, Tensor]:
    """Every tensor of ``file`` by name; :class:`CorruptFile` naming what is wrong otherwise."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if length > size - 8:
            raise CorruptFile(f"{file.name} is not a safetensors file (its header runs past the end)")
        try:
            header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            tensors = {}
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                tensors[name] = Tensor(name, file, entry["dtype"], tuple(entry["shape"]), 8 + length + begin)
                if 8 + length + end > size:
                    raise CorruptFile(f"{file.name} is truncated: tensor {name} ends past the end of the file")
                if entry["dtype"] in NUMPY_DTYPES and end - begin != tensors[name].nbytes:
                    raise CorruptFile(f"{file.name}: tensor {name} has {end - begin} bytes for shape {entry['shape']}")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, CorruptFile):
                raise
            raise CorruptFile(f"{file.name}: unreadable safetensors header ({error!r})") from None
    return tensors


def write_tensors(
    file: Path, shapes: dict[str, tuple[int, ...]], dtype: str, produce: Callable[[str], np.ndarray]
) -> None:
    """Write the tensors ``shapes`` names, all of safetensors dtype ``dtype``, one at a time:
    ``produce(name)`` gives each (cast to ``dtype`` here) just before it is written, so only one
    is ever in memory."""
    itemsize = NUMPY_DTYPES[dtype].itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            array = np.ascontiguousarray(produce(name), dtype=NUMPY_DTYPES[dtype])
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {array.shape}, expected {tuple(shape)}")
            handle.write(array.reshape(-1).view(np.uint8).data)


def tensors_of(files: Iterable[Path]) -> dict[str, Tensor]:
    """Every tensor of several files by name (a sharded checkpoint's)."""
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors |= read_header(file)
    return tensors
