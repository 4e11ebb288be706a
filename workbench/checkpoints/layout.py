"""Checkpoints of either layer layout into a model of either: unrolled (``layers/<i>/...``, as
Hugging Face and an unscanned engine store them) or stacked (``layers/...`` [L, ...], a scanned
engine's, see ``model.scan``).

A loader reads into :func:`targets` -- the engine's abstract params and shardings, re-laid out
as the checkpoint stores them (a stacked leaf's sharding less its leading ``layers`` axis, or
plus one) -- so every array still lands straight in its shard; :func:`relayout` then stacks or
slices the layers on device, into the engine's shardings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.model.scan import stack_layers, unstack_layers
from workbench.trees import leaf_paths, nest

_LAYER = re.compile(r"layers/(\d+)/(.+)")


def targets(abstract_params: Any, shardings: Any, *, stacked: bool) -> tuple[Any, Any]:
    """(abstract params, shardings) in the ``stacked`` layout: the engine's own when it already
    is, else pure dicts of ``jax.ShapeDtypeStruct`` and ``NamedSharding`` re-laid out."""
    abstract, placed = leaf_paths(abstract_params), leaf_paths(shardings)
    if stacked == (not any(_LAYER.fullmatch(path) for path in abstract)):  # already in that layout
        return abstract_params, shardings
    want, want_shardings = {}, {}
    for path, leaf in abstract.items():
        sharding = placed[path]
        if stacked:  # layers/<i>/name -> layers/name [L, ...], unsplit along L
            match = _LAYER.fullmatch(path)
            if match is None:
                want[path], want_shardings[path] = leaf, sharding
                continue
            path = f"layers/{match.group(2)}"
            count = want[path].shape[0] + 1 if path in want else 1
            spec = P(None, *sharding.spec)
            want[path] = jax.ShapeDtypeStruct((count, *leaf.shape), leaf.dtype)
            want_shardings[path] = NamedSharding(sharding.mesh, spec)
        elif path.startswith("layers/"):  # layers/name [L, ...] -> layers/<i>/name
            spec = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
            for i in range(leaf.shape[0]):
                want[f"layers/{i}/{path[7:]}"] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
                want_shardings[f"layers/{i}/{path[7:]}"] = spec
        else:
            want[path], want_shardings[path] = leaf, sharding
    return nest(want), nest(want_shardings)


def relayout(pure: dict, shardings: Any, *, stacked: bool) -> dict:
    """``pure`` (params of either layout) in the ``stacked`` layout, placed in ``shardings``."""
    change = stack_layers if stacked else unstack_layers
    out = nest(leaf_paths(shardings))
    return jax.jit(change, out_shardings=out)(pure)


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
    stacked = [leaf.shape[0] for name, leaf in saved.items() if name.startswith("layers/")]
    return (True, stacked[0]) if stacked else None
