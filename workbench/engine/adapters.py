"""The engine's LoRA adapter bookkeeping: names to indices, checked, and the stacked weights placed.

An engine built with adapters (``workbench.load(..., adapters=...)``) serves them side by side
(``model/lora.py``): a request names one (None: the base model), prefill carries its index into
the prefix, insert into the slot's entry of ``DecodeState.adapters``, and generate applies each
slot's own. Index i is ``names[i]``; -1 is the base model. An engine without adapters passes no
index at all (None), so its programs hold no LoRA op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench import trees
from workbench.engine.types import Prefix
from workbench.model.scan import is_stacked, stack_layers, stacked_period


def index(names: tuple[str, ...], adapter: str | None) -> jax.Array | None:
    """The int32 index of ``adapter`` among the loaded ``names`` (-1 for None: the base model);
    None on an engine without adapters. ValueError naming the loaded ones for an unknown name."""
    if adapter is not None and adapter not in names:
        loaded = ", ".join(names) or "none are loaded"
        raise ValueError(f"unknown adapter {adapter!r} (loaded: {loaded})")
    if not names:
        return None
    return jnp.int32(-1 if adapter is None else names.index(adapter))


def rows(names: tuple[str, ...], adapter: str | None, batch: int) -> jax.Array | None:
    """``adapter``'s index for every one of ``batch`` rows (the uncached forward pass); None for
    the base model, which then runs no LoRA op."""
    chosen = index(names, adapter)
    return None if adapter is None else jnp.full((batch,), chosen, jnp.int32)


def chunk_index(names: tuple[str, ...], existing_prefix: Prefix | None, adapter: str | None) -> jax.Array | None:
    """The adapter index of a prefill; a later chunk must keep the earlier chunks' adapter."""
    chosen = index(names, adapter)
    if chosen is not None and isinstance(existing_prefix, Prefix) and existing_prefix.adapter is not None:
        if int(existing_prefix.adapter) != int(chosen):
            raise ValueError(f"existing_prefix was prefilled with another adapter than {adapter or 'base'!r}")
    return chosen


def place(rest: nnx.State, weights: dict, abstract_rest: nnx.State, shardings: nnx.State) -> nnx.State:
    """``rest`` with the stacked adapters' LoRA ``weights`` (a pure dict of host arrays shaped like
    the model's LoRA state), checked against the model and placed by the rules table. A model of
    scanned layers gets them stacked on its ``layers`` axis (``model.scan``)."""
    abstract = nnx.to_pure_dict(abstract_rest)
    if is_stacked(abstract):
        weights = stack_layers(weights, stacked_period(abstract))
    current = trees.leaf_paths(nnx.to_pure_dict(rest))
    lora = trees.leaf_paths(weights)
    unknown = sorted(set(lora) - set(current))
    if unknown:
        raise ValueError(f"adapter weights do not match the model: unexpected entry {unknown[0]}")
    pure = trees.nest(current | lora)
    trees.check_matches("adapter weights", abstract_rest, pure)
    cast = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), pure, nnx.to_pure_dict(abstract_rest))
    return jax.device_put(trees.fill(abstract_rest, cast), shardings)
