"""The engine's jitted bodies as pure functions: arrays in, arrays out.

``engine/compiled.py`` binds the static half of each (the model's ``CachedModel``, the compile
counter) with ``functools.partial`` and jits the rest. Caches cross the jit boundary as plain
dicts; each body re-forms its model with ``nnx.merge(..., copy=True)`` and hands the cache back
as a plain dict. ``counts[name] += 1`` runs once per trace, so the counter counts compiles.

Probes (:mod:`workbench.probes`) are one static argument of prefill and generate: with a
``plan``, the body runs the model through ``probes.run`` and returns the raw capture as its
third output; without one it runs the model plainly and that output is ``{}`` (no array, so the
program is the plain step's).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from workbench import probes, trees
from workbench.engine.sampling import Sampling, sample
from workbench.engine.types import Cache, DecodeState, Prefix, ResultTokens
from workbench.model import Transformer

Counts = collections.Counter


@dataclasses.dataclass(frozen=True)
class CachedModel:
    """One split model with a KV cache: its graphdef, its abstract cache, its cache length."""

    graphdef: nnx.GraphDef
    abstract_cache: nnx.State
    length: int  # max_target_length: a position here or past it writes nothing

    def merge(self, params: nnx.State, cache: Cache, rest: nnx.State) -> Transformer:
        return nnx.merge(self.graphdef, params, trees.fill(self.abstract_cache, cache), rest, copy=True)


def first_result(token: jax.Array, logits: jax.Array) -> ResultTokens:
    """The result of a prefill: ``token`` [] (or [n] samples) as ``data`` [n, 3] = (token, valid
    1, length 1), the first generated token of each; ``logits`` [n, V] the rows they came from."""
    ones = jnp.ones_like(token)
    return ResultTokens(data=jnp.stack([token, ones, ones], axis=-1).reshape(-1, 3), logits=logits)


def forward(graphdef: nnx.GraphDef, params, rest, tokens, adapters=None) -> jax.Array:
    """The uncached forward pass: float32 logits [B, T, V] of ``tokens`` [B, T] (the oracle)."""
    return nnx.merge(graphdef, params, rest, copy=True)(tokens, adapters=adapters)


def zeros(abstract: nnx.State) -> Cache:
    """An empty cache (a pure dict of zeros) shaped like ``abstract``."""
    return nnx.to_pure_dict(jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), abstract))


def init_decode_state(abstract_cache: nnx.State, slots: int, key: jax.Array, adapters: bool = False) -> DecodeState:
    empty = jnp.zeros((slots,), jnp.int32)
    return DecodeState(
        cache=zeros(abstract_cache),
        positions=empty,
        tokens=empty,
        lengths=empty,
        active=jnp.zeros((slots,), bool),
        rng=key,
        adapters=jnp.full((slots,), -1, jnp.int32) if adapters else None,  # -1: the base model
    )


def prefill(
    model: CachedModel,
    counts: Counts,
    params,
    rest,
    cache: Cache,
    tokens,
    start,
    true_length,
    key,
    probe_data=None,
    *,
    sampling: Sampling,
    plan: probes.Plan | None = None,
    adapter=None,
) -> tuple[Prefix, ResultTokens, dict]:
    """``tokens`` [P] (``true_length`` real, then padding) written after ``start`` cached ones;
    ``adapter``: int32 [] LoRA adapter index (-1: none), on engines with adapters.
    The third output: the raw capture of a probe ``plan`` (static) and its ``probe_data``, else {}."""
    counts["prefill" if plan is None else "prefill+probes"] += 1
    merged = model.merge(params, cache, rest)
    steps = jnp.arange(tokens.shape[0])
    # Padding goes to position S (past the cache): its K/V writes are dropped.
    positions = jnp.where(steps < true_length, start + steps, model.length)
    raw = {}
    adapters = None if adapter is None else adapter[None]
    if plan is None:
        last = merged(tokens[None], positions[None], logits_at=(true_length - 1)[None], adapters=adapters)[0]  # [V]
    else:
        live, at = (steps < true_length)[None], (true_length - 1)[None]
        last, raw = probes.run(merged, plan, probe_data, tokens[None], positions[None], live, at, adapters)
        last = last[0]
    token = sample(last[None], key, sampling)[0]
    cache = nnx.to_pure_dict(nnx.state(merged, nnx.Cache))
    prefix = Prefix(cache=cache, length=start + true_length, token=token, logits=last, adapter=adapter)
    return prefix, first_result(token, last[None]), raw


def insert(counts: Counts, prefix: Prefix, state: DecodeState, slots: jax.Array, slot_axis: int = 0) -> DecodeState:
    """``prefix`` copied into the rows ``slots`` [n] of every cache and slot array. ``slot_axis``:
    the caches' batch axis (1 for stacked layers, [L, B, S, K, H])."""
    counts["insert"] += 1
    n = slots.shape[0]
    index = (slice(None),) * slot_axis + (slots,)

    def put(rows: jax.Array, value: jax.Array) -> jax.Array:
        shape = (*value.shape[:slot_axis], n, *value.shape[slot_axis + 1 :])
        return rows.at[index].set(jnp.broadcast_to(value.astype(rows.dtype), shape))

    return state.replace(
        cache=jax.tree.map(put, state.cache, prefix.cache),
        positions=state.positions.at[slots].set(prefix.length),
        tokens=state.tokens.at[slots].set(prefix.token),
        lengths=state.lengths.at[slots].set(1),
        active=state.active.at[slots].set(True),
        adapters=None if state.adapters is None else state.adapters.at[slots].set(prefix.adapter),
    )


def generate(
    model: CachedModel,
    counts: Counts,
    params,
    rest,
    state: DecodeState,
    probe_data=None,
    *,
    sampling: Sampling,
    plan: probes.Plan | None = None,
) -> tuple[DecodeState, ResultTokens, dict]:
    """One token for every live slot (holding a request, with room in its cache); the third
    output as :func:`prefill`'s."""
    counts["generate" if plan is None else "generate+probes"] += 1
    live = state.active & (state.positions < model.length)  # [B]
    positions = jnp.where(live, state.positions, model.length)  # dead slots write nothing
    merged = model.merge(params, state.cache, rest)
    raw = {}
    if plan is None:
        logits = merged(state.tokens[:, None], positions[:, None], adapters=state.adapters)[:, 0]  # [B, V]
    else:
        inputs = (state.tokens[:, None], positions[:, None], live[:, None])
        logits, raw = probes.run(merged, plan, probe_data, *inputs, adapters=state.adapters)
        logits = logits[:, 0]
    rng, key = jax.random.split(state.rng)
    tokens = jnp.where(live, sample(logits, key, sampling), state.tokens)
    lengths = state.lengths + live
    new_state = state.replace(
        cache=nnx.to_pure_dict(nnx.state(merged, nnx.Cache)),
        positions=state.positions + live,
        tokens=tokens,
        lengths=lengths,
        rng=rng,
    )
    data = jnp.stack([tokens, live.astype(jnp.int32), lengths], axis=-1)
    return new_state, ResultTokens(data=data, logits=logits), raw


def free(state: DecodeState, slot: jax.Array) -> DecodeState:
    return state.replace(active=state.active.at[slot].set(False))
