"""A stored tensor in another layout, placed as one of our params, region by region.

A :class:`Layout` says where our param sits in a stored tensor (the stored dims split into
groups, then permuted); :func:`read_region` reads the stored rows one device's region needs;
:func:`place` turns a tensor into a placed array in our axis order, dtype and sharding: the
transposing transfer, widening on the host or on the device, one scratch buffer reused tensor
after tensor. The Hugging Face reader (``checkpoints/hf.py``) names the layouts and the tensors;
this module knows nothing of Hugging Face's names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.checkpoints.safetensors_files import NUMPY_DTYPES, Scratch, Tensor, aligned_empty

_BAND_BYTES = 32 * 2**20  # rows widened on the host at a time, read into the reused scratch


@dataclass(frozen=True)
class Layout:
    """Where one of our params sits in a stored (Hugging Face) tensor: HF dim ``i`` splits into the sizes
    ``groups[i]`` (say ``N*H -> (N, H)``), and our axis ``j`` is axis ``perm[j]`` of that split.
    ``name`` a tuple: one HF tensor per expert, read as one tensor stacked on a leading expert
    axis (:class:`Stacked`; ``groups[0]`` is ``(E,)``)."""

    name: str | tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.name if isinstance(self.name, tuple) else (self.name,)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(sizes) for sizes in self.groups)


@dataclass(frozen=True)
class Stacked:
    """One HF tensor per expert, read as one tensor [E, ...] (sliceable by HF axes, as a Tensor)."""

    tensors: tuple[Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.tensors), *self.tensors[0].shape)

    @property
    def dtype(self) -> str:
        return self.tensors[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.stack([t[index[1:]] for t in self.tensors[index[0]]])

    def rows(self, index: tuple[slice, ...], allocate: Any = None) -> np.ndarray:
        return self[index]


def read_region(tensor: Any, layout: Layout, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """``ours[index]`` read from the HF ``tensor`` (anything sliceable by HF axes, a ``Tensor``),
    touching only the HF rows and columns that region needs."""
    ranges = [s.indices(size)[:2] for s, size in zip(index, shape)]  # our axis -> (start, stop)
    split_ranges: list[tuple[int, int]] = [(0, 0)] * len(ranges)
    for axis, split_axis in enumerate(layout.perm):
        split_ranges[split_axis] = ranges[axis]
    hf_index, block_shape, within = [], [], []
    axis = 0
    for sizes in layout.groups:
        # An HF dim split into (a, b, ...): the region's a-range is contiguous in HF rows when b...
        # are whole; read that a-range of full rows, then cut b... after the reshape.
        inner = math.prod(sizes[1:])
        start, stop = split_ranges[axis]
        hf_index.append(slice(start * inner, stop * inner))
        block_shape += [stop - start, *sizes[1:]]
        within += [slice(None)] + [slice(*split_ranges[axis + j]) for j in range(1, len(sizes))]
        axis += len(sizes)
    block = np.asarray(tensor[tuple(hf_index)]).reshape(block_shape)
    return block[tuple(within)].transpose(layout.perm)


def place(
    tensor: Tensor | Stacked,
    layout: Layout,
    abstract: Any,
    sharding: jax.sharding.Sharding,
    scratch: Scratch | None = None,
) -> jax.Array:
    """``tensor`` as our param: each device's region read from the file (only the HF rows it
    needs) and handed to JAX as a strided view in our axis order.

    The transfer lays the view out (XLA's host-to-device copy transposes in cache-sized tiles,
    several times faster than a strided numpy copy); a region needing no transpose, read into
    an aligned buffer, becomes the device buffer as it is. A narrowing cast runs on the host
    before the transfer; a widening one (:func:`_widen_on_device`) after it, fused with the
    layout. A region that is copied on the way is read into ``scratch``, reused tensor after
    tensor (no fresh pages to fault in).
    """
    shape, dtype = tuple(abstract.shape), np.dtype(abstract.dtype)
    stored = NUMPY_DTYPES[tensor.dtype]
    if dtype.itemsize > stored.itemsize and scratch is not None:
        if layout.perm == tuple(range(len(layout.perm))):
            return _widen_rows(tensor, layout, shape, dtype, sharding, scratch)
        if isinstance(sharding, NamedSharding):
            return _widen_on_device(tensor, layout, shape, dtype, sharding, scratch)
    moved = stored if dtype.itemsize > stored.itemsize else dtype  # the dtype that goes through the transfer
    # read into the scratch unless the region read is to become the device buffer itself
    copied = scratch is not None and (moved != stored or layout.perm != tuple(range(len(layout.perm))))
    source = _ReadInto(tensor, scratch.take) if copied else tensor
    read: dict[tuple, np.ndarray] = {}  # replicated shards share one read
    if copied:
        scratch.reset()

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in read:
            region = read_region(source, layout, index, shape)
            if region.dtype != moved:
                region = region.astype(moved, order="K")
            elif copied and region.flags.c_contiguous:  # would be adopted, not copied: never the scratch
                region = region.copy()
            read[key] = region
        return read[key]

    array = jax.make_array_from_callback(shape, sharding, shard, dtype=moved)
    if copied:
        array.block_until_ready()  # the transfer has read the scratch before the next tensor reuses it
    return array if moved == dtype else _widen(array, dtype)


def _widen_rows(
    tensor: Tensor,
    layout: Layout,
    shape: tuple[int, ...],
    dtype: np.dtype,
    sharding: jax.sharding.Sharding,
    scratch: Scratch,
) -> jax.Array:
    """``tensor`` (laid out as ours already: the embedding, the norms) in the wider ``dtype``:
    each device's region widened on the host, a band of rows at a time read into ``scratch``,
    into an aligned buffer the array adopts as it is (no compile, no narrow copy on fresh pages)."""
    widened: dict[tuple, np.ndarray] = {}
    band = max(1, _BAND_BYTES // max(1, math.prod(shape[1:]) * NUMPY_DTYPES[tensor.dtype].itemsize))

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in widened:  # replicated shards share one read
            (start, stop, _), rest = key[0], tuple(slice(*k) for k in key[1:])
            out = aligned_empty((stop - start, *(k[1] - k[0] for k in key[1:])), dtype)
            for row in range(start, stop, band):
                scratch.reset()
                rows = (slice(row, min(row + band, stop)), *rest)
                np.copyto(
                    out[row - start : rows[0].stop - start],
                    read_region(_ReadInto(tensor, scratch.take), layout, rows, shape),
                    casting="safe",
                )
            widened[key] = out
        return widened[key]

    return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


def _widen_on_device(
    tensor: Tensor, layout: Layout, shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding, scratch: Scratch
) -> jax.Array:
    """``tensor`` in the wider ``dtype`` (bf16 or f16 -> float32): each device's region read
    into ``scratch`` in the file's own order (HF dims split, ``Layout.groups``), adopted as it
    is, then transposed and widened by one jitted program into a fresh buffer in ``sharding``:
    one pass, and no narrow laid-out copy in between (on these VMs every fresh page costs a
    fault, most of a load's time). The cast is exact, and XLA's equals numpy's bit for bit."""
    split = tuple(size for sizes in layout.groups for size in sizes)
    spec = (*sharding.spec, *(None,) * (len(shape) - len(sharding.spec)))
    split_spec: list = [None] * len(split)
    for ours, axis in enumerate(layout.perm):
        split_spec[axis] = spec[ours]
    as_stored = Layout(layout.name, layout.groups, tuple(range(len(split))))
    source, read = _ReadInto(tensor, scratch.take), {}
    scratch.reset()

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, split))
        if key not in read:  # replicated shards share one read
            read[key] = read_region(source, as_stored, index, split)
        return read[key]

    stored = jax.make_array_from_callback(
        split, NamedSharding(sharding.mesh, P(*split_spec)), shard, dtype=NUMPY_DTYPES[tensor.dtype]
    )
    if tensor.dtype == "F16":  # XLA:CPU fails to build an f16 cast where the CPU lacks F16C (SSE4_2):
        widened = _widen(_lay_out(layout.perm, stored.dtype.name, sharding)(stored), dtype)  # cast on the host
    else:
        widened = _lay_out(layout.perm, dtype.name, sharding)(stored)
    widened.block_until_ready()  # the scratch is read before the next tensor reuses it
    return widened


@functools.lru_cache
def _lay_out(perm: tuple[int, ...], dtype: str, sharding: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """The jitted transpose-and-cast into ``sharding`` (one compile per tensor shape)."""
    return jax.jit(lambda x: jnp.transpose(x, perm).astype(dtype), out_shardings=sharding)


class _ReadInto:
    """``tensor[index]`` read into ``allocate``'d memory (``read_region``'s sliceable)."""

    def __init__(self, tensor: Tensor, allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray]):
        self.tensor, self.allocate = tensor, allocate

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.tensor.rows(index, self.allocate)


def _widen(array: jax.Array, dtype: np.dtype) -> jax.Array:
    """``array`` (placed, laid out) in the wider ``dtype``: each shard cast on the host in memory
    order, a plain pass into a buffer the new array adopts (no compile per shape, as a jitted
    cast would take)."""
    widened = {}
    for shard in array.addressable_shards:
        key = tuple(s.indices(n) for s, n in zip(shard.index, array.shape))
        if key not in widened:  # replicas share one cast
            widened[key] = aligned_empty(shard.data.shape, dtype)
            np.copyto(widened[key], np.asarray(shard.data), casting="safe")

    def shard_of(index: tuple[slice, ...]) -> np.ndarray:
        return widened[tuple(s.indices(n) for s, n in zip(index, array.shape))]

    return jax.make_array_from_callback(array.shape, array.sharding, shard_of, dtype=dtype)
