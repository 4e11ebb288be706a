"""The ring KV cache of a sliding-window layer: the index arithmetic, kept out of attention.

A sliding layer's query at position ``p`` sees keys ``p - W + 1 .. p`` only (``W``: its window),
so its cache need hold just the newest ``W`` positions, not ``max_target_length`` of them: a ring
of ``W`` slots, position ``p`` in slot ``p % W``. A Gemma 3-style model (5 sliding layers to 1
global) then keeps about a sixth of the full-length cache.

Beside the keys and values the ring stores ``held`` [B, W] (int32): ``1 +`` the absolute position
each slot holds, 0 for an empty slot (0, not -1, so that the engine's all-zeros empty caches are
empty rings). Keeping it rather than deriving it from the next position makes a ring describe
itself: attention reads its key positions from it (stale and empty slots masked alike), insert
copies it with the keys, and the inspectors map slots to positions without the engine's
bookkeeping.

    positions written: 0 .. 9, W = 4     slot    0  1  2  3
                                         held    9 10  7  8     (positions 8, 9, 6, 7)
                                         the next token (10) goes to slot 2: the write head

Two rules keep a write exact: a position at or past the cache's ``limit`` (``max_target_length``:
padding, or a full slot) is dropped, never wrapped onto the ring; and of the tokens one write
sends to a row, only the last ``W`` positions are written -- an earlier one would land in a slot
a later one overwrites, and a scatter with repeated indices keeps an unspecified one of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

HELD_AXES = ("cache_batch", "cache_seq")  # of ``held`` [B, W]


def held(batch: int, window: int) -> nnx.Cache:
    """An empty ring's ``held`` [B, W]: nothing held anywhere."""
    return nnx.Cache(jnp.zeros((batch, window), jnp.int32), out_sharding=HELD_AXES)


def write_slots(positions: jax.Array, rows: jax.Array, batch: int, window: int, limit: int) -> jax.Array:
    """The ring slot each token [B, T] writes to (its position mod ``window``), or ``window``
    (out of range: the write is dropped) for a position >= ``limit`` or one that a later token of
    the same write to the same cache row (``rows`` [B, T]) overwrites."""
    live = positions < limit
    newest = jnp.full((batch,), -1, positions.dtype).at[rows].max(jnp.where(live, positions, -1))
    kept = live & (positions > newest[rows] - window)
    return jnp.where(kept, positions % window, window)


def write_index(cache: nnx.Module, positions: jax.Array, rows: jax.Array) -> jax.Array:
    """Where a cache with an optional ring (``cache.window``) writes each token [B, T]: its
    absolute position in a full-length cache; in a ring its slot, recording the position in
    ``cache.held``."""
    if cache.window is None:
        return positions
    rows = jnp.broadcast_to(rows, positions.shape)
    index = write_slots(positions, rows, cache.held.shape[0], cache.window, cache.limit)
    cache.held[...] = cache.held[...].at[rows, index].set(positions + 1, mode="drop")
    return index


def key_positions(held: jax.Array) -> jax.Array:
    """The absolute position of each ring slot's key [B, W]; -1 where the slot is empty."""
    return held - 1


def by_position(weights: jax.Array, positions: jax.Array, keys: int) -> jax.Array:
    """Attention weights over ring slots (and chunk keys) [B, N, T, S] re-laid over absolute key
    positions [B, N, T, keys], as a full-length cache's probes record them; ``positions`` [B, S]
    (-1: an empty slot, whose weight is 0, dropped)."""
    positions = jnp.where(positions >= 0, positions, keys)

    def one(w, p):  # [N, T, S], [S]
        return jnp.zeros((*w.shape[:2], keys), w.dtype).at[:, :, p].add(w, mode="drop")

    return jax.vmap(one)(weights, positions)
