"""Grouped-query attention with an optional per-layer KV cache held in ``nnx.Cache`` variables.

Positions are absolute and explicit. A query at position ``p`` sees keys at positions ``<= p``
(and ``> p - sliding_window`` when a window is set). With a cache, the new keys and values are
first written at their positions, then the query attends over the whole cache; cache index ==
absolute position, so every decode slot advances on its own. A position at or past the cache
length marks a padding token: its write is dropped, and nothing else ever lands there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model.config import ModelConfig
from workbench.model.layers import apply_rope, param

CACHE_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")
_MASKED = -1e30  # finite, so a row with nothing visible (a padding query) gives no NaN


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
        if self.cache is None:
            key_positions = positions  # [B, S=T]
        else:
            k, v = self.cache.update(k, v, positions)  # [B, S, K, H]
            key_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])

        visible = key_positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
        if self.window is not None:
            visible &= key_positions[:, None, :] > positions[:, :, None] - self.window

        b, t, n, h = q.shape
        q = q.reshape(b, t, n // self.groups, self.groups, h) * (h**-0.5)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32)
        scores = jnp.where(visible[:, None, None], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", weights, v).reshape(b, t, n, h)
        return jnp.einsum("BTNH,NHD->BTD", out, self.o[...].astype(self.dtype))
