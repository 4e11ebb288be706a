"""Scanned layers: every block's params and KV cache stacked on a leading ``layers`` axis, run by
one ``jax.lax.scan``, so a program traces and compiles one block whatever the depth.

Layers all alike (``ModelConfig.layer_period`` 1): the stacked model is one ``Block`` whose
Variables hold ``[L, ...]`` arrays (logical axes ``("layers", ...)``): ``layers/attn/q``
[L, D, N, H], ``layers/attn/cache/k`` [L, B, S, K, H].

Layers in a repeating pattern of ``P`` kinds (Gemma 3: 5 sliding, 1 global; Gemma 2: sliding,
global): :class:`Pattern`, one stacked block per position of the pattern, ``layers/blocks/<j>/...``
[R, ...] (``R = L // P`` repeats: layers ``j, j + P, ...``), and the ``L % P`` leftover layers as
stacks of one, ``layers/tail/<t>/...`` [1, ...] (layer ``R * P + t``). A scan step runs one
repeat of the pattern, its ``P`` blocks unrolled; a sliding position keeps its rings
([R, B, W, K, H]) and a global one its full caches ([R, B, S, K, H]), so stacks never mix shapes.
Every stacked leaf has its layers on axis 0, so insert and packing treat both layouts alike.

:func:`stack_blocks` builds a stack from the unrolled model's blocks, so both layouts are made by
the same constructors and hold the same numbers. :func:`stack_layers` / :func:`unstack_layers`
move a pure dict (params or a cache) between ``layers/<i>/...`` and a stacked layout (a stacked
tree says which layer each row holds: :func:`layer_rows`): checkpoints of either layout load into
either model, and the inspectors show a stacked cache per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.trees import leaf_paths

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


class Pattern(nnx.Module):
    """Scanned layers of a repeating pattern (module docstring): ``blocks[j]`` stacks layers
    ``j, j + P, ...`` of the first ``R * P``; ``tail[t]`` layer ``R * P + t``, a stack of one."""

    def __init__(self, blocks: Sequence[nnx.Module], period: int):
        self.repeats = repeats = len(blocks) // period
        self.blocks = nnx.List([stack_blocks(blocks[j : repeats * period : period]) for j in range(period)])
        self.tail = nnx.List([stack_blocks([block]) for block in blocks[repeats * period :]])


def stack_model_layers(blocks: Sequence[nnx.Module], period: int) -> nnx.Module:
    """The scanned layout of ``blocks`` (the unrolled model's): one stacked block (``period`` 1)
    or a :class:`Pattern`."""
    return stack_blocks(blocks) if period == 1 else Pattern(blocks, period)


def run_layers(
    layers: nnx.Module, x: jax.Array, positions: jax.Array, ropes: Sequence, hooks=None, **rows
) -> jax.Array:
    """``x`` through every layer of a scanned layout (:func:`stack_model_layers`); ``ropes[j]``:
    the rope of the pattern's position ``j``. The caches come back updated; what the hooks sow
    is recorded stacked ``[L, ...]`` in layer order (on ``layers``, or on a pattern's first block)."""
    if not isinstance(layers, Pattern):
        x, sown = run_blocks([layers], x, positions, ropes, hooks, **rows)
        _record(layers, sown[0])
        return x
    period = len(layers.blocks)
    x, sown = run_blocks(list(layers.blocks), x, positions, ropes, hooks, **rows)
    if len(layers.tail):  # the leftover layers: one more step, of the pattern's first positions
        first = layers.repeats * period
        x, tail = run_blocks(list(layers.tail), x, positions, ropes, hooks, first=first, **rows)
        sown = sown + tail
    sown = [_with_every_site(s, sown) for s in sown]
    # [R, ...] per position (then [1, ...] per leftover layer) -> [L, ...] in layer order
    interleaved = jax.tree.map(lambda *xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:]), *sown[:period])
    _record(layers.blocks[0], jax.tree.map(lambda a, *t: jnp.concatenate([a, *t]), interleaved, *sown[period:]))
    return x


def run_blocks(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    positions: jax.Array,
    ropes: Sequence,
    hooks=None,
    first: int = 0,
    **rows,
) -> tuple[jax.Array, list[dict]]:
    """``x`` through stacked blocks of one leading length ``R``: scan step ``r`` runs ``blocks[j]``'s
    row ``r`` for each ``j`` in turn (layer ``first + r * len(blocks) + j``), ``block(x, positions,
    ropes[j], **rows)`` each (rows: the per-row inputs, segments and adapters); the stacked caches
    come back updated, and what each block sowed, ``[R, ...]`` per block.

    The params (quantized ones and LoRA adapters included: every Variable but the caches) ride
    in the carry behind an optimization barrier, row ``r`` sliced out in the step (see ``step``);
    the caches ride in the carry too, row ``r``'s read out and written back in place, so the step
    touches each layer's cache once rather than copying the stack into the scan's outputs. With
    ``hooks`` (probes, ``model.hooks``) each block gets ``hooks.layer(i)`` for its traced index ``i``.
    """
    splits = [nnx.split(block, nnx.Cache, ...) for block in blocks]
    graphdefs = [graphdef for graphdef, _, _ in splits]
    period = len(blocks)

    def step(carry, _):
        x, caches, r, stacks = carry
        # The stacks ride through an optimization barrier: to XLA they change every step, so it
        # cannot hoist a whole-stack transform out of the loop (XLA:CPU widens a bf16 dynamic-slice
        # to f32, then moves the convert of every layer's weights before the loop: a f32 copy of
        # the model written and read on every call, 4-5x the unrolled decode step at 1B in bf16).
        stacks = jax.lax.optimization_barrier(stacks)
        layer = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, r, keepdims=False), stacks)
        caches, sowns = list(caches), []
        for j, (graphdef, params) in enumerate(zip(graphdefs, layer)):
            block = nnx.merge(graphdef, jax.tree.map(lambda c: c[r], caches[j]), params)
            if hooks is None:
                x, sown = block(x, positions, ropes[j], **rows), {}
            else:  # what the hooks sow into this step's block, as the step's output
                probed = hooks.layer(first + r * period + j)
                x, sown = nnx.capture(block, nnx.Intermediate)(x, positions, ropes[j], probed, **rows)
                sown = nnx.to_pure_dict(sown)
            written = nnx.state(block, nnx.Cache)
            caches[j] = jax.tree.map(
                lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, r, 0), caches[j], written
            )
            sowns.append(sown)
        return (x, caches, r + 1, stacks), sowns

    caches, params = [cache for _, cache, _ in splits], [other for _, _, other in splits]
    length = jax.tree.leaves(params)[0].shape[0]
    (x, caches, _, _), sown = jax.lax.scan(step, (x, caches, jnp.int32(0), params), length=length)
    for block, cache in zip(blocks, caches):
        nnx.update(block, cache)
    return x, sown


def _with_every_site(sown: dict, others: Sequence[dict]) -> dict:
    """``sown`` with the sites only other pattern positions have (a mixture of experts' routing,
    beside a dense layer) as rows of NaN (integers: -1): one record ``[L, ...]`` per site.
    ``probes.recorded`` drops a dense layer's routing rows by their ids (-1: no expert)."""
    out = dict(sown)
    for other in others:
        for name, value in other.items():
            if name not in out:
                out[name] = jax.tree.map(_absent, value)
            elif isinstance(value, dict):
                out[name] = _with_every_site(out[name], [value])
    return out


def _absent(like: jax.Array) -> jax.Array:
    return jnp.full_like(like, jnp.nan if jnp.issubdtype(like.dtype, jnp.inexact) else -1)


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
    """Whether a leaf path is a stacked layer leaf (``layers/attn/q`` [L, ...], ``layers/blocks/0/
    attn/q`` [R, ...]) rather than one layer's (``layers/0/attn/q``) or no layer's (``embed/embedding``)."""
    parts = path.split("/")
    return parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit()


def _numbered(tree: dict) -> list:
    """The keys of a dict of numbered entries (ints, or digit strings after an untargeted restore), in order."""
    return sorted(tree, key=int)


def layer_rows(layers: dict) -> list[tuple[tuple, list[int]]]:
    """The stacks of a stacked ``layers`` tree: each one's keys under ``layers`` (``()``, or
    ``("blocks", j)`` / ``("tail", t)`` for a :class:`Pattern`) and the layer each of its rows holds."""
    if "blocks" not in layers:
        return [((), list(range(jax.tree.leaves(layers)[0].shape[0])))]
    blocks, tail = layers["blocks"], layers.get("tail", {})
    period, repeats = len(blocks), jax.tree.leaves(blocks)[0].shape[0]
    out = [(("blocks", j), [r * period + i for r in range(repeats)]) for i, j in enumerate(_numbered(blocks))]
    return out + [(("tail", t), [repeats * period + i]) for i, t in enumerate(_numbered(tail))]


def stacked_leaves(tree: dict) -> dict[str, tuple[str, list[int]]]:
    """Each stacked leaf path of a pure dict (arrays or shapes): (its name within one layer, the
    layer each of its rows holds); ``{}`` for an unrolled tree."""
    if not is_stacked(tree):
        return {}
    out = {}
    for keys, rows in layer_rows(tree["layers"]):
        prefix = "/".join(["layers", *map(str, keys)])
        for name in leaf_paths(_at(tree["layers"], keys)):
            out[f"{prefix}/{name}"] = (name, rows)
    return out


def stacked_place(layer: int, num_layers: int, period: int) -> tuple[str, int]:
    """Where layer ``layer``'s leaves go in the stacked layout of pattern ``period``: the stack's
    path under ``layers`` ("" for one stack of every layer) and the row."""
    if period == 1:
        return "", layer
    repeats = num_layers // period
    if layer < repeats * period:
        return f"blocks/{layer % period}", layer // period
    return f"tail/{layer - repeats * period}", 0


def _at(tree: dict, keys: tuple) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def stacked_period(tree: dict) -> int:
    """The pattern period of a stacked tree's layout (1: one stack of every layer)."""
    layers = tree["layers"]
    return len(layers["blocks"]) if "blocks" in layers else 1


def stack_layers(tree: dict, period: int = 1, rows: Any = None) -> dict:
    """``{"layers": {0: t0, 1: t1, ...}, ...}`` -> the stacked layout of pattern ``period``
    (``ModelConfig.layer_period``; numpy or jax arrays); a stacked tree is returned as it is.
    ``rows``: a function of the leaves to stack (a tuple) that stacks them (default: ``np.stack``
    for numpy, ``jnp.stack`` for jax arrays)."""
    if is_stacked(tree) or "layers" not in tree:
        return tree
    layers = [tree["layers"][i] for i in _numbered(tree["layers"])]
    default = lambda xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)  # noqa: E731
    rows = rows or default

    def stack(group: list) -> Any:
        return jax.tree.map(lambda *xs: rows(xs), *group)

    if period == 1:
        return {**tree, "layers": stack(layers)}
    repeats = len(layers) // period
    stacked = {"blocks": {j: stack(layers[j : repeats * period : period]) for j in range(period)}}
    if len(layers) % period:
        stacked["tail"] = {t: stack([layer]) for t, layer in enumerate(layers[repeats * period :])}
    return {**tree, "layers": stacked}


def unstack_layers(tree: dict) -> dict:
    """The inverse of :func:`stack_layers`: each stacked row back to ``layers/<i>/<name>``."""
    if not is_stacked(tree):
        return tree
    layers = {}
    for keys, rows in layer_rows(tree["layers"]):
        stack = _at(tree["layers"], keys)
        for row, i in enumerate(rows):
            layers[i] = jax.tree.map(lambda x, row=row: x[row], stack)
    return {**tree, "layers": dict(sorted(layers.items()))}


def layer_slice(layers: dict, layer: int) -> dict:
    """Layer ``layer``'s subtree of a stacked ``layers`` tree (row views of the stacks, in numpy)."""
    for keys, rows in layer_rows(layers):
        if layer in rows:
            return jax.tree.map(lambda x: x[rows.index(layer)], _at(layers, keys))
    raise IndexError(f"layer {layer} out of range")
