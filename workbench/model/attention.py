"""Grouped-query attention with an optional per-layer KV cache held in ``nnx.Cache`` variables.

Positions are absolute and explicit. A query at position ``p`` sees keys at positions ``<= p``
(and ``> p - sliding_window`` when a window is set). With a cache, the new keys and values are
first written at their positions, then the query attends over the cache; cache index ==
absolute position, so every decode slot advances on its own. A position at or past the cache
length marks a padding token: its write is dropped, and nothing else ever lands there.

Speed (decode is bound by the bytes it reads): with a cache, attention reads only a prefix of
it -- the shortest of a few static key lengths (:func:`key_buckets`) that covers the furthest
live position, picked on device by ``lax.switch``, so one compiled step serves every length
and a 64-token request in a 1024-position cache reads 128 positions, not 1024. A single query
per sequence (decode) reads the ``[B, S, K, H]`` cache as it lies: a prefix of it through
elementwise products and sums that XLA fuses with the slice (``_attend_one_fused``), the whole
cache through two dots (``_attend_one``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model.config import ModelConfig
from workbench.model.layers import apply_rope, param

CACHE_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")
_MASKED = -1e30  # finite, so a row with nothing visible (a padding query) gives no NaN
MIN_KEY_BUCKET = 128


def key_buckets(cache_length: int) -> tuple[int, ...]:
    """The key lengths attention over a cache may read: 128, 256, ... doubling, then the whole cache.

    Doubling keeps the branches few (compile time) while reading at most twice what is live.
    """
    buckets, size = [], MIN_KEY_BUCKET
    while size < cache_length:
        buckets.append(size)
        size *= 2
    return (*buckets, cache_length)


class KVCache(nnx.Module):
    """Keys and values of one layer: two ``[B, S, K, H]`` caches, indexed by absolute position."""

    def __init__(self, config: ModelConfig, batch: int, length: int):
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, config.compute_dtype), out_sharding=CACHE_AXES)
        self.v = nnx.Cache(jnp.zeros(shape, config.compute_dtype), out_sharding=CACHE_AXES)

    def update(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Write ``k, v`` [B, T, K, H] at ``positions`` [B, T]; return the whole cache [B, S, K, H]."""
        rows = jnp.arange(k.shape[0])[:, None]
        # Out-of-range positions (padding, or a slot that is full) are dropped, never clamped.
        self.k[...] = self.k[...].at[rows, positions].set(k.astype(self.k.dtype), mode="drop")
        self.v[...] = self.v[...].at[rows, positions].set(v.astype(self.v.dtype), mode="drop")
        return self.k[...], self.v[...]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, cache: tuple[int, int] | None = None):
        d, n, k, h, w = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim, config.weight_dtype
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), w)
        self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), w)
        self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), w)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), w)
        if config.qkv_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), w, init="zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), w, init="zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), w, init="zeros")
        self.cache = KVCache(config, *cache) if cache is not None else None
        self.qkv_bias = config.qkv_bias
        self.window = config.sliding_window
        self.groups = n // k
        self.dtype = config.compute_dtype

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        out = jnp.einsum("BTD,DNH->BTNH", x, getattr(self, name)[...].astype(self.dtype))
        if self.qkv_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return out

    def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        # x [B, T, D], positions [B, T], rope: (sin, cos) for those positions
        q = apply_rope(self._project(x, "q"), rope)  # [B, T, N, H]
        k = apply_rope(self._project(x, "k"), rope)  # [B, T, K, H]
        v = self._project(x, "v")
        b, t, n, h = q.shape
        q = q.reshape(b, t, n // self.groups, self.groups, h) * (h**-0.5)  # [B, T, K, G, H]
        if self.cache is None:
            out = self._attend(q, k, v, positions, positions)
        else:
            k, v = self.cache.update(k, v, positions)  # [B, S, K, H]
            out = self._attend_cache(q, k, v, positions)
        # One contracting dim (N*H): given "BTNH,NHD", XLA orders the two as (H, N) and transposes
        # the o weights into that order on every call.
        o = self.o[...].astype(self.dtype).reshape(n * h, -1)
        return jnp.einsum("BTX,XD->BTD", out.reshape(b, t, n * h), o)

    def _attend_cache(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
        """Attention over the first L cache positions, L the smallest bucket covering every live query."""
        cache_length = k.shape[1]
        buckets = key_buckets(cache_length)

        def attend_prefix(length: int, q, k, v, positions):
            key_positions = jnp.broadcast_to(jnp.arange(length), (k.shape[0], length))
            sliced = length < cache_length
            return self._attend(q, k[:, :length], v[:, :length], positions, key_positions, sliced=sliced)

        if len(buckets) == 1:
            return attend_prefix(cache_length, q, k, v, positions)
        # Keys a live query can see: 0 .. its position. Padding (position >= S) needs none.
        needed = jnp.max(jnp.where(positions < cache_length, positions + 1, 0))
        branch = jnp.searchsorted(jnp.asarray(buckets), needed)  # the first bucket >= needed
        branches = [functools.partial(attend_prefix, length) for length in buckets]
        return jax.lax.switch(branch, branches, q, k, v, positions)

    def _attend(self, q, k, v, query_positions, key_positions, sliced: bool = False) -> jax.Array:
        """Softmax attention: q [B, T, K, G, H] (scaled), k, v [B, S, K, H] -> [B, T, K, G, H].

        ``sliced``: k and v are a prefix sliced from a longer cache.
        """
        visible = key_positions[:, None, :] <= query_positions[:, :, None]  # [B, T, S]
        if self.window is not None:
            visible &= key_positions[:, None, :] > query_positions[:, :, None] - self.window
        if q.shape[1] == 1:
            attend_one = self._attend_one_fused if sliced else self._attend_one
            return attend_one(q[:, 0], k, v, visible[:, 0])[:, None]
        # Batched over (B, K) with the G query heads of a kv head stacked on T: one tall product
        # per kv head. Left to "BTKGH,BSKH->BKGTS", XLA picks slower layouts (1024 tokens on
        # 2 CPU cores: 145 against 104 ms a layer).
        b, t, kv, g, h = q.shape
        s = k.shape[1]
        q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
        scores = jnp.einsum("BKMH,BKSH->BKMS", q, k).reshape(b, kv, g, t, s).astype(jnp.float32)
        scores = jnp.where(visible[:, None, None], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, kv, g * t, s)
        out = jnp.einsum("BKMS,BKSH->BKMH", weights, v).reshape(b, kv, g, t, h)
        return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]

    def _attend_one(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
        """One query per sequence (decode): q [B, K, G, H], k, v [B, S, K, H], visible [B, S] -> [B, K, G, H].

        As einsums batched over (B, K), XLA would copy the cache into a [B, K, S, H] transpose on
        every step. Here both products contract the cache's contiguous (K, H) minor dims instead,
        against a block-diagonal query ([K*H, K*G], zero where the kv heads differ): K times the
        multiply-adds of a small product, but one pass over the cache and no copy of it.
        """
        b, s, kv, h = k.shape
        g = q.shape[2]
        # Elementwise products with the identity, not einsums: a dot would pick its own output
        # layout, and XLA would then re-lay-out the o projection's weights on every step.
        eye = jnp.eye(kv, dtype=q.dtype)
        q_blocks = jnp.swapaxes(q, 2, 3)[:, :, :, None, :] * eye[:, None, :, None]  # [B, K, H, J, G]
        q_blocks = q_blocks.reshape(b, kv * h, kv * g)
        scores = jnp.einsum("BSX,BXY->BSY", k.reshape(b, s, kv * h), q_blocks).astype(jnp.float32)  # [B, S, K*G]
        scores = jnp.where(visible[:, :, None], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=1).astype(self.dtype)
        out = jnp.einsum("BSY,BSX->BYX", weights, v.reshape(b, s, kv * h)).reshape(b, kv, g, kv, h)
        return jnp.sum(out * eye[:, None, :, None], axis=3)  # the blocks whose kv heads match

    def _attend_one_fused(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
        """``_attend_one`` for keys sliced from a longer cache, as products and sums, no dot.

        A dot needs its operands in buffers of their own, so feeding it a cache prefix costs a
        copy of the prefix per step; these reductions fuse with the slice and read the cache in
        place. On 2 CPU cores, 8 layers, batch 8, a 128-position prefix of a 1024 cache: 3.7 ms
        against 7.9 ms for the dots; the whole cache, which needs no slice: 35 ms against 22 ms.
        """
        scores = jnp.sum(q[:, None] * k[:, :, :, None, :], axis=-1).astype(jnp.float32)  # [B, S, K, G]
        scores = jnp.where(visible[:, :, None, None], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=1).astype(self.dtype)
        return jnp.sum(weights[..., None] * v[:, :, :, None, :], axis=1)  # [B, K, G, H]
