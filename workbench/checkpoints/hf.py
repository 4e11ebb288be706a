"""Hugging Face checkpoints: ``*.safetensors`` -> params on a mesh (the config: ``hf_config``).

One file or several (``model.safetensors.index.json``); float32, bfloat16 or float16 tensors.
A missing tensor, a tensor of the wrong shape, or one the model has no place for (``o_proj.bias``,
say) is an error that names it.

Every tensor goes straight into its target sharding, shard by shard: for each device,
``jax.make_array_from_callback`` asks for the region of our array that device holds, and we
read just the HF rows of that region from the file (``safetensors_files``: no memory map, so no
file pages linger in the process's memory) and hand it over in our axis order (see ``_place``).
A bf16 checkpoint served in bf16 never passes through float32; a quantized load (``transform``)
quantizes each tensor as it is placed. The whole model is never on one device, nor twice on the host.

HF stores a projection as ``[out, in]`` with heads flattened into one axis; we store
``q [D, N, H]``, ``o [N, H, D]``, ``gate [D, F]`` and so on (see ``_layouts``). HF Llama's rope
is the "rotate half" layout, which is ours, so q/k rows need no permutation.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from workbench.checkpoints.hf_config import read_json
from workbench.checkpoints.safetensors_files import (
    NUMPY_DTYPES,
    CorruptFile,
    Scratch,
    Tensor,
    aligned_empty,
    read_header,
    tensors_of,
)
from workbench.model import ModelConfig
from workbench.trees import leaf_paths, nest

PLACE_THREADS = 2  # tensors placed at once (see _placed_in_order)

INDEX_FILE = "model.safetensors.index.json"
TENSOR_DTYPES = ("F32", "BF16", "F16")
PROGRESS_BYTES = 256 * 2**20  # show a progress bar from this checkpoint size on
_BAND_BYTES = 32 * 2**20  # rows widened on the host at a time, read into the reused scratch


# ---- layouts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where one of our params sits in an HF tensor: HF dim ``i`` splits into the sizes
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


def _layouts(config: ModelConfig) -> dict[str, Layout]:
    """Our param path -> its HF tensor and layout, for every param of ``config``."""
    d, n, k, h, f, v = (
        config.embed_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
        config.vocab_size,
    )
    layouts = {
        "embed/embedding": Layout("model.embed_tokens.weight", ((v,), (d,)), (0, 1)),  # [V, D]
        "final_norm/scale": Layout("model.norm.weight", ((d,),), (0,)),
    }
    if not config.tie_embeddings:
        layouts["lm_head"] = Layout("lm_head.weight", ((v,), (d,)), (1, 0))  # [V, D] -> [D, V]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers/{i}"
        # Projections: HF [out, in] -> ours [in, out], heads split out (q: [N*H, D] -> [D, N, H];
        # o: [D, N*H] -> [N, H, D]; gate/up: [F, D] -> [D, F]; down: [D, F] -> [F, D]).
        # Norms: Llama's post_attention_layernorm is the MLP's input norm; Gemma's sandwich calls
        # that one pre_feedforward_layernorm and normalizes both sublayers' outputs.
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
        if config.post_norms:
            norms = {
                "attn_norm": "input_layernorm",
                "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm",
            }
        layouts |= {
            f"{ours}/{mine}/scale": Layout(f"{hf}.{theirs}.weight", ((d,),), (0,)) for mine, theirs in norms.items()
        }
        if config.qk_norm:  # one [H] scale per projection, shared by its heads
            layouts |= {
                f"{ours}/attn/{x}_norm/scale": Layout(f"{hf}.self_attn.{x}_norm.weight", ((h,),), (0,)) for x in "qk"
            }
        layouts |= {
            f"{ours}/attn/q": Layout(f"{hf}.self_attn.q_proj.weight", ((n, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/k": Layout(f"{hf}.self_attn.k_proj.weight", ((k, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/v": Layout(f"{hf}.self_attn.v_proj.weight", ((k, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/o": Layout(f"{hf}.self_attn.o_proj.weight", ((d,), (n, h)), (1, 2, 0)),
        }
        layouts |= (
            _experts(config, i)
            if config.sparse(i)
            else {
                f"{ours}/mlp/gate": Layout(f"{hf}.mlp.gate_proj.weight", ((f,), (d,)), (1, 0)),
                f"{ours}/mlp/up": Layout(f"{hf}.mlp.up_proj.weight", ((f,), (d,)), (1, 0)),
                f"{ours}/mlp/down": Layout(f"{hf}.mlp.down_proj.weight", ((d,), (f,)), (1, 0)),
            }
        )
        if config.qkv_bias:
            layouts |= {
                f"{ours}/attn/q_bias": Layout(f"{hf}.self_attn.q_proj.bias", ((n, h),), (0, 1)),  # [N*H] -> [N, H]
                f"{ours}/attn/k_bias": Layout(f"{hf}.self_attn.k_proj.bias", ((k, h),), (0, 1)),
                f"{ours}/attn/v_bias": Layout(f"{hf}.self_attn.v_proj.bias", ((k, h),), (0, 1)),
            }
    return layouts


def _experts(config: ModelConfig, i: int) -> dict[str, Layout]:
    """A sparse layer's router and experts: Mixtral's ``block_sparse_moe.gate`` and
    ``experts.<j>.w1 / w3 / w2``, or (with q/k norms) Qwen3-MoE's ``mlp.gate`` and
    ``experts.<j>.gate_proj / up_proj / down_proj``; each expert's [out, in] stacked to ours
    [E, in, out]."""
    e, d, f = config.num_experts, config.embed_dim, config.expert_dim
    hf, ours = f"model.layers.{i}", f"layers/{i}/mlp"
    if config.qk_norm:
        block, names = f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        block, names = f"{hf}.block_sparse_moe", ("w1", "w3", "w2")

    def stacked(name: str) -> tuple[str, ...]:
        return tuple(f"{block}.experts.{j}.{name}.weight" for j in range(e))

    return {
        f"{ours}/router": Layout(f"{block}.gate.weight", ((e,), (d,)), (1, 0)),  # [E, D] -> [D, E]
        f"{ours}/experts/gate": Layout(stacked(names[0]), ((e,), (f,), (d,)), (0, 2, 1)),  # E x [F, D] -> [E, D, F]
        f"{ours}/experts/up": Layout(stacked(names[1]), ((e,), (f,), (d,)), (0, 2, 1)),
        f"{ours}/experts/down": Layout(stacked(names[2]), ((e,), (d,), (f,)), (0, 2, 1)),  # E x [D, F] -> [E, F, D]
    }


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


def _tensor(tensors: dict[str, Tensor], layout: Layout) -> Tensor | Stacked:
    return Stacked(tuple(tensors[n] for n in layout.name)) if isinstance(layout.name, tuple) else tensors[layout.name]


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


# ---- tensors -----------------------------------------------------------------------------------
def _tensors(path: Path) -> dict[str, Tensor]:
    """HF tensor name -> the tensor (its file, dtype, shape and offset, read from the headers)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"corrupt Hugging Face checkpoint: {index} has no weight_map")
        tensors: dict[str, Tensor] = {}
        for file in dict.fromkeys(weight_map.values()):
            if not (path / file).is_file():
                held = next(name for name, f in weight_map.items() if f == file)
                raise ValueError(f"corrupt Hugging Face checkpoint: {file} (holding {held}) is missing")
            tensors |= read_header(path / file)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"corrupt Hugging Face checkpoint: {weight_map[missing[0]]} lacks {missing[0]}")
        return tensors
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {other[0]}: only safetensors checkpoints are supported)" if other else ""
        raise ValueError(f"no *.safetensors files in Hugging Face checkpoint {path}{hint}")
    return tensors_of(files)


def _check_tensors(tensors: dict[str, Tensor], layouts: dict[str, Layout], config: ModelConfig) -> None:
    wanted = {name for layout in layouts.values() for name in layout.names}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"Hugging Face checkpoint lacks tensor {missing[0]} ({len(missing)} missing in all)")
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()  # some tied checkpoints store it anyway
    unexpected = sorted(n for n in set(tensors) - wanted - ignored if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(
            f"unsupported Hugging Face checkpoint: unexpected tensor {unexpected[0]} "
            f"({len(unexpected)} in all) -- a feature this loader does not implement"
        )
    for layout in layouts.values():
        stacked = isinstance(layout.name, tuple)
        for name in layout.names:
            tensor, shape = tensors[name], layout.hf_shape[1:] if stacked else layout.hf_shape
            if tensor.shape != shape:
                raise ValueError(f"Hugging Face tensor {name} has shape {tensor.shape} but config.json implies {shape}")
            if tensor.dtype not in TENSOR_DTYPES:
                raise ValueError(f"unsupported dtype {tensor.dtype} of tensor {name}")
        if stacked and len({tensors[n].dtype for n in layout.names}) > 1:
            raise ValueError(f"the experts of {layout.names[0]} are stored in different dtypes")


def load_hf_params(
    path: str | os.PathLike,
    abstract_params: Any,
    shardings: Any,
    *,
    config: ModelConfig | None = None,
    progress: bool | None = None,
    transform: Callable[[str, jax.Array], dict[str, jax.Array]] | None = None,
) -> dict:
    """The HF checkpoint's weights as a pure dict of arrays placed in ``shardings``, shaped and
    typed like ``abstract_params`` (say, an engine's ``abstract_params`` and ``param_shardings``).

    ``config``: the model the params belong to (default: the checkpoint's ``config.json``; pass
    it when the abstract params use another dtype). ``progress``: a tqdm bar on stderr (None:
    only for large checkpoints). ``transform``: ``(path, array) -> {path: array, ...}``, called
    on each array as soon as it is placed, its result kept instead (say, ``quant.quantize_leaf``:
    then only one full-precision weight is ever alive).
    """
    path = Path(path)
    if config is None:
        from workbench.checkpoints.hf_config import read_hf_config

        config = read_hf_config(path)
    layouts = _layouts(config)
    abstract = leaf_paths(abstract_params)
    shardings = leaf_paths(shardings)
    if set(layouts) != set(abstract):
        raise ValueError(f"no HF layout for params {sorted(set(abstract) ^ set(layouts))}")
    scratches = threading.local()  # one Scratch per placing thread

    def place(ours: str) -> jax.Array:
        if not hasattr(scratches, "scratch"):
            scratches.scratch = Scratch()
        tensor = _tensor(tensors, layouts[ours])
        return _place(tensor, layouts[ours], abstract[ours], shardings[ours], scratches.scratch)

    try:
        tensors = _tensors(path)
        _check_tensors(tensors, layouts, config)
        total = sum(_tensor(tensors, layout).nbytes for layout in layouts.values())
        flat = {}
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"loading {path.name}",
            file=sys.stderr,
            disable=not (total >= PROGRESS_BYTES if progress is None else progress),
        ) as bar:
            for ours, placed in _placed_in_order(list(layouts), place):
                array = placed.result()
                flat.update({ours: array} if transform is None else transform(ours, array))
                del array, placed  # transformed: the placed array is let go before the next is read
                bar.update(_tensor(tensors, layouts[ours]).nbytes)
    except (CorruptFile, OSError) as error:  # a malformed or truncated file, one that vanished mid-way
        raise ValueError(f"corrupt Hugging Face checkpoint {path}: {error}") from None
    return nest(flat)


def _placed_in_order(names: list[str], place: Callable[[str], jax.Array]) -> Iterator[tuple[str, Future]]:
    """``(name, future of place(name))`` in order, with ``PLACE_THREADS`` tensors in flight: reads
    and transfers release the GIL, so one tensor's page faults and copies overlap another's (a 1B
    bf16 load on 2 cores: 3.3 s -> 2.75 s). A transform applied as each is taken still sees one
    full-precision weight at a time, beside those being read."""
    # One at a time over several processes: each must run its programs (a widening's transpose)
    # in the same order as the others.
    threads = PLACE_THREADS if jax.process_count() == 1 else 1
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        for name in names:
            pending.append((name, pool.submit(place, name)))
            if len(pending) == threads:
                yield pending.popleft()
        yield from pending


def _place(
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
