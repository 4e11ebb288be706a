"""Trees at the bottom of the house: leaf paths, nesting, and matching a tree against the model.

Every layer names a leaf the same way: ``"layers/0/attn/q"``, the keys of its path joined by
``/`` (an ``nnx.Variable`` counts as its value). :func:`nest` is the inverse, with list indices
as ints as ``nnx.to_pure_dict`` gives them. :func:`check_matches` is the one check that a tree
(params, a cache) has exactly the leaves and shapes of the model's abstract tree.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def _path_string(path: tuple) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "/".join(k for k in keys if k != "value")


def leaf_paths(tree: Any) -> dict[str, Any]:
    """``{"layers/0/attn/q": leaf, ...}`` for a pure dict or State (Variables unwrapped)."""
    return {_path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """``{"layers/0/attn/q": Variable}``: like :func:`leaf_paths`, keeping the Variables (their
    type and metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {_path_string(path): leaf for path, leaf in flat}


def nest(flat: dict[str, Any]) -> dict:
    """``{"layers/0/attn/q": x}`` -> ``{"layers": {0: {"attn": {"q": x}}}}``: the inverse of
    :func:`leaf_paths` for a pure dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def check_matches(what: str, abstract: Any, tree: Any) -> None:
    """ValueError unless ``tree`` has exactly the leaves of ``abstract`` (the model's abstract
    state, or anything with the same paths), each of the same shape. ``what`` names the tree in
    the message: ``"params do not match the model: layers/0/attn/q has shape ..."``."""
    want, got = leaf_paths(abstract), leaf_paths(tree)
    for path, expected in want.items():
        if path not in got:
            raise ValueError(
                f"{what} do not match the model: {path} is missing (expected shape {tuple(expected.shape)})"
            )
        shape = tuple(np.shape(got[path]))
        if shape != tuple(expected.shape):
            raise ValueError(
                f"{what} do not match the model: {path} has shape {shape} but the model expects {tuple(expected.shape)}"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{what} do not match the model: unexpected entry {extra[0]}")


def fill(template: nnx.State, pure: dict) -> nnx.State:
    """A fresh State shaped like ``template`` holding the arrays of the pure dict ``pure``."""
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def placed_shapes(abstract: Any, shardings: Any) -> dict:
    """A pure dict of ``jax.ShapeDtypeStruct`` with shardings: the arrays ``abstract`` describes
    (a State or pure dict of shapes) placed in ``shardings`` (alike) -- an orbax restore target,
    or the params a jit is lowered for before any weight exists."""

    def pure(tree: Any) -> Any:
        return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree

    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure(abstract), pure(shardings)
    )


def buffer_pointers(tree: Any) -> list[int]:
    """The device buffer of every shard of every array in ``tree``: equal lists before and after
    a call mean the call updated the arrays in place (donation worked)."""
    return [shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards]
