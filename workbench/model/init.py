"""Seeded random weights drawn on the host: no compile, so a model of any depth starts in seconds.

Jitting the model's own initialisers (``Transformer(config, rngs=nnx.Rngs(seed))`` under
``jax.jit``) costs a compile that grows with the model, most of it threefry unrolled once per
weight (``docs/speed.md`` has a figure). Here numpy draws every leaf instead (the same
distributions as :func:`workbench.model.layers.param`: RMSNorm scales ones, biases zeros, every
other weight normal with std ``INIT_STD``), one generator per leaf seeded by ``(seed, path)``,
so a leaf's values depend on the seed and its name only -- not on the mesh, the order of leaves,
or whether the layers are stacked (a stacked leaf ``layers/attn/q`` [L, ...] holds the draws of
``layers/0/attn/q``, ``layers/1/attn/q``, ...). Each array goes straight into its sharding.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.model.layers import INIT_STD
from workbench.model.scan import stacked_leaves
from workbench.trees import fill, leaf_paths, nest


def init_kind(path: str) -> str:
    """``"ones"``, ``"zeros"`` or ``"normal"``: how :func:`workbench.model.layers.param` makes the leaf."""
    name = path.rsplit("/", 1)[-1]
    if path.endswith("norm/scale"):
        return "ones"
    if name.endswith("_bias"):
        return "zeros"
    return "normal"


def draw(path: str, shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    """The leaf ``path`` of seed ``seed``, on the host, as ``dtype``."""
    kind = init_kind(path)
    if kind != "normal":
        return np.full(shape, 1.0 if kind == "ones" else 0.0, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= INIT_STD
    return values.astype(dtype, copy=False)


def random_params(abstract_params: nnx.State, shardings: nnx.State, seed: int) -> nnx.State:
    """Seeded random params shaped like ``abstract_params``, placed in ``shardings``. A stacked
    leaf stacks the draws of ``layers/<i>/<name>`` of its rows' layers, so stacked and unstacked
    models of one seed hold the same weights."""
    abstract, placements = leaf_paths(abstract_params), leaf_paths(shardings)
    stacked = stacked_leaves(nnx.to_pure_dict(abstract_params))
    flat = {}
    for path, leaf in abstract.items():
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"no random initialiser for {path} of dtype {dtype}")
        if path in stacked:
            name, rows = stacked[path]
            values = np.stack([draw(f"layers/{i}/{name}", shape[1:], dtype, seed) for i in rows])
        else:
            values = draw(path, shape, dtype, seed)
        flat[path] = jax.make_array_from_callback(shape, placements[path], lambda index, v=values: v[index])
    return fill(abstract_params, nest(flat))
