"""Checkpoints of either layer layout into a model of either: unrolled (``layers/<i>/...``, as
Hugging Face and an unscanned engine store them) or stacked (``layers/...`` [L, ...], a scanned
engine's, see ``model.scan``).

A loader reads into :func:`targets` -- the engine's abstract params and shardings, re-laid out
as the checkpoint stores them (a stacked leaf's sharding less its leading ``layers`` axis, or
plus one) -- so every array still lands straight in its shard; :func:`relayout` then stacks or
slices the layers into the engine's shardings: on the host into buffers the arrays adopt when
everything is on one CPU device, else on device with 16-bit floats moved as their bits.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.checkpoints.safetensors_files import aligned_empty
from workbench.model.scan import stack_layers, stacked_leaves, stacked_period, stacked_place, unstack_layers
from workbench.trees import leaf_paths, nest

_LAYER = re.compile(r"layers/(\d+)/(.+)")


def targets(abstract_params: Any, shardings: Any, *, stacked: bool, period: int = 1) -> tuple[Any, Any]:
    """(abstract params, shardings) in the ``stacked`` layout (of pattern ``period``,
    ``ModelConfig.layer_period``): the engine's own when it already is, else pure dicts of
    ``jax.ShapeDtypeStruct`` and ``NamedSharding`` re-laid out."""
    abstract, placed = leaf_paths(abstract_params), leaf_paths(shardings)
    if stacked == (not any(_LAYER.fullmatch(path) for path in abstract)):  # already in that layout
        return abstract_params, shardings
    want, want_shardings = {}, {}
    if stacked:  # layers/<i>/name -> layers/<stack>/name [rows, ...], unsplit along the rows
        num_layers = len({int(m.group(1)) for m in map(_LAYER.fullmatch, abstract) if m})
        for path, leaf in abstract.items():
            sharding, match = placed[path], _LAYER.fullmatch(path)
            if match is None:
                want[path], want_shardings[path] = leaf, sharding
                continue
            stack, _ = stacked_place(int(match.group(1)), num_layers, period)
            path = "/".join(p for p in ("layers", stack, match.group(2)) if p)
            count = want[path].shape[0] + 1 if path in want else 1
            want[path] = jax.ShapeDtypeStruct((count, *leaf.shape), leaf.dtype)
            want_shardings[path] = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return nest(want), nest(want_shardings)
    stacks = stacked_leaves(
        nnx.to_pure_dict(abstract_params) if isinstance(abstract_params, nnx.State) else abstract_params
    )
    for path, leaf in abstract.items():
        sharding = placed[path]
        if path not in stacks:
            want[path], want_shardings[path] = leaf, sharding
            continue
        name, rows = stacks[path]  # layers/<stack>/name [rows, ...] -> layers/<i>/name
        for i in rows:
            want[f"layers/{i}/{name}"] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            want_shardings[f"layers/{i}/{name}"] = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
    return nest(want), nest(want_shardings)


def relayout(pure: dict, shardings: Any, *, stacked: bool) -> dict:
    """``pure`` (params of either layout) in the layout of ``shardings`` (``stacked`` or not)."""
    out = nest(leaf_paths(shardings))
    period = stacked_period(out) if stacked else 1
    if stacked and _on_one_device(pure, out):  # stacked on the host, into buffers the arrays adopt
        host = stack_layers(pure, period, rows=_host_rows)
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]), host, out)
    change = functools.partial(stack_layers, period=period) if stacked else unstack_layers
    wanted = jax.eval_shape(change, pure)

    def moved(tree: dict) -> dict:
        # 16-bit floats move as their bits: XLA:CPU widens a bf16 (f16) concatenate or slice to
        # float32 and back, which made stacking a 1B model's bf16 layers take 11 s rather than 3
        bits = jax.tree.map(_as_bits, tree)
        back = lambda x, want: x if x.dtype == want.dtype else jax.lax.bitcast_convert_type(x, want.dtype)  # noqa: E731
        return jax.tree.map(back, change(bits), wanted)

    return jax.jit(moved, out_shardings=out)(pure)


def _on_one_device(pure: dict, shardings: dict) -> bool:
    """Whether every array of ``pure`` and every target sharding is on one and the same local device."""
    devices = {d for s in jax.tree.leaves(shardings) for d in s.device_set}
    for x in jax.tree.leaves(pure):
        if not isinstance(x, jax.Array) or not x.is_fully_addressable:
            return False
        devices |= x.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _host_rows(xs: tuple) -> np.ndarray:
    """``xs`` (arrays on the CPU) stacked into fresh pages (``aligned_empty``: no huge-page
    compaction on a fault): at 1B in bf16 this takes 2 s where a jitted stack took 7."""
    out = aligned_empty((len(xs), *xs[0].shape), np.dtype(xs[0].dtype))
    for row, x in enumerate(xs):
        out[row] = np.asarray(x)
    return out


def _as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as the uint16 of its bits; any other as it is."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def saved_layers(path: str | os.PathLike) -> tuple[bool, int] | None:
    """(stacked, number of layers) of the params a workbench checkpoint holds (orbax metadata);
    None when there is no metadata to read (the restore then says what is wrong)."""
    import orbax.checkpoint as ocp

    params = Path(path).absolute() / "params"
    if not (params / "_METADATA").is_file():
        return None
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(params)
    except Exception:  # a corrupt params/: restore_params names it
        return None
    saved = leaf_paths(getattr(metadata, "item_metadata", None) or {})
    indices = {int(m.group(1)) for m in map(_LAYER.fullmatch, saved) if m}
    if indices:
        return False, len(indices)
    stacks = stacked_leaves(nest(saved))
    return (True, 1 + max(max(rows) for _, rows in stacks.values())) if stacks else None
