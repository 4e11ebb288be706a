"""Scanned layers: every block's params and KV cache stacked on a leading ``layers`` axis, run by
one ``jax.lax.scan``, so a program traces and compiles one block whatever the depth.

The stacked model is one ``Block`` whose Variables hold ``[L, ...]`` arrays (logical axes
``("layers", ...)``): ``layers/attn/q`` [L, D, N, H], ``layers/attn/cache/k`` [L, B, S, K, H].
:func:`stack_blocks` builds it from the unrolled model's blocks, so both layouts are made by the
same constructors and hold the same numbers. :func:`stack_layers` / :func:`unstack_layers` move a
pure dict (params or a cache) between ``layers/<i>/...`` and ``layers/...``: checkpoints of
either layout load into either model, and the inspectors show a stacked cache per layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS_AXIS = "layers"


def stack_blocks(blocks: Any) -> nnx.Module:
    """One block whose every Variable stacks the ``blocks``' (each ``[...]`` -> ``[L, ...]``)."""
    splits = [nnx.split(block) for block in blocks]
    graphdef, states = splits[0][0], [state for _, state in splits]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        metadata = dict(variables[0].get_metadata())
        if metadata.get("out_sharding") is not None:
            metadata["out_sharding"] = (LAYERS_AXIS, *metadata["out_sharding"])
        return type(variables[0])(jnp.stack([v[...] for v in variables]), **metadata)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def run_blocks(
    layers: nnx.Module, x: jax.Array, positions: jax.Array, rope: Any, hooks: Any = None, **rows: Any
) -> jax.Array:
    """``x`` through every layer of the stacked block ``layers`` in turn, ``block(x, positions,
    rope, **rows)`` each (rows: the per-row inputs, segments and adapters); the stacked caches
    come back updated.

    The params (quantized ones and LoRA adapters included: every Variable but the caches) are
    scanned over; the caches ride in the carry, layer ``i``'s read out and written back in place,
    so the step touches each layer's cache once rather than copying the stack into the scan's
    outputs. With ``hooks`` (probes, ``model.hooks``) each step gets ``hooks.layer(i)`` for its
    traced index ``i``; what the block records comes out of the scan stacked, ``[L, ...]``, and
    is recorded on ``layers`` (``nnx.capture`` around the model collects it there).
    """
    graphdef, cache, other = nnx.split(layers, nnx.Cache, ...)

    def step(carry, layer):
        x, cache, i = carry
        block = nnx.merge(graphdef, jax.tree.map(lambda c: c[i], cache), layer)
        if hooks is None:
            x, sown = block(x, positions, rope, **rows), {}
        else:  # what the hooks sow into this step's block, as the step's output
            x, sown = nnx.capture(block, nnx.Intermediate)(x, positions, rope, hooks.layer(i), **rows)
            sown = nnx.to_pure_dict(sown)
        written = nnx.state(block, nnx.Cache)
        cache = jax.tree.map(lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, i, 0), cache, written)
        return (x, cache, i + 1), sown

    (x, cache, _), sown = jax.lax.scan(step, (x, cache, jnp.int32(0)), other)
    nnx.update(layers, cache)
    _record(layers, sown)
    return x


def _record(module: nnx.Module, sown: dict) -> None:
    """Sow on ``module`` (and its submodules) what the scan's blocks sowed, stacked ``[L, ...]``."""
    for name, value in sown.items():
        if isinstance(value, tuple):  # one site's sown values (``Module.sow`` appends to a tuple)
            for stacked in value:
                module.sow(nnx.Intermediate, name, stacked)
        else:
            _record(module[name] if isinstance(name, int) else getattr(module, name), value)


def is_stacked(tree: dict) -> bool:
    """Whether a pure dict (params or cache) holds stacked layers (``layers/<name>``)."""
    layers = tree.get("layers", {})
    return bool(layers) and not all(isinstance(k, int) or str(k).isdigit() for k in layers)


def is_stacked_path(path: str) -> bool:
    """Whether a leaf path is a stacked layer leaf (``layers/attn/q`` [L, ...]) rather than one
    layer's (``layers/0/attn/q``) or no layer's (``embed/embedding``)."""
    parts = path.split("/")
    return parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit()


def stack_layers(tree: dict) -> dict:
    """``{"layers": {0: t0, 1: t1, ...}, ...}`` -> ``{"layers": stack(t0, t1, ...), ...}`` (numpy
    or jax arrays); a stacked tree is returned as it is."""
    if is_stacked(tree) or "layers" not in tree:
        return tree
    layers = [tree["layers"][i] for i in sorted(tree["layers"], key=int)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs), *layers)
    return {**tree, "layers": stacked}


def unstack_layers(tree: dict) -> dict:
    """The inverse of :func:`stack_layers`: ``layers/<name>`` [L, ...] -> ``layers/<i>/<name>``."""
    if not is_stacked(tree):
        return tree
    count = len(jax.tree.leaves(tree["layers"])[0])
    layers = {i: jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(count)}
    return {**tree, "layers": layers}
