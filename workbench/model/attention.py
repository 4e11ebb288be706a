"""Grouped-query attention with an optional per-layer KV cache held in ``nnx.Cache`` variables.

Positions are absolute and explicit. A query at position ``p`` sees keys at positions ``<= p``
(and ``> p - sliding_window`` when a window is set). With a cache, the new keys and values are
first written at their positions, then the query attends over the cache; cache index ==
absolute position, so every decode slot advances on its own. A position at or past the cache
length marks a padding token: its write is dropped, and nothing else ever lands there.

A sliding layer whose window is shorter than the cache keeps a ring of ``window`` slots instead
(:mod:`workbench.model.ring`): a decode step writes, then reads the ring with the key positions
it records; a prompt chunk's queries read the ring as it was before the chunk together with the
chunk's own keys (a chunk may be longer than the ring), then the chunk's last ``window``
positions are written.

Speed (decode is bound by the bytes it reads): with a cache, attention reads only a prefix of
it -- the shortest of a few static key lengths (:func:`key_buckets`) that covers the furthest
live position, picked on device by ``lax.switch``, so one compiled step serves every length
and a 64-token request in a 1024-position cache reads 128 positions, not 1024. The products
themselves are in :mod:`workbench.model.kernels`: a plain einsum reference (the default) and
the variants tuned for XLA:CPU, chosen by ``attention_kernels``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model import kernels, lora, quant, ring
from workbench.model.config import ModelConfig
from workbench.model.layers import RMSNorm, apply_rope, param, project

CACHE_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")  # of every KV cache [B, S, K, H]
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
    """Keys and values of one layer: two ``[B, S, K, H]`` caches, indexed by absolute position; or,
    with a ``window`` shorter than ``length``, a ring of ``window`` slots with ``held`` [B, W]
    (:mod:`workbench.model.ring`). ``limit``: positions at or past it are never written."""

    def __init__(self, config: ModelConfig, batch: int, length: int, window: int | None = None):
        self.window, self.limit = window, length
        shape = (batch, length if window is None else window, config.num_kv_heads, config.head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, config.compute_dtype), out_sharding=CACHE_AXES)
        self.v = nnx.Cache(jnp.zeros(shape, config.compute_dtype), out_sharding=CACHE_AXES)
        if window is not None:
            self.held = ring.held(batch, window)

    def update(
        self, k: jax.Array, v: jax.Array, positions: jax.Array, rows: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Write ``k, v`` [B, T, K, H] at ``positions`` [B, T]; return the whole cache [B, S, K, H].

        ``rows`` [B, T]: the cache row of each token (packed prompts); default: the token's own row.
        """
        rows = jnp.arange(k.shape[0])[:, None] if rows is None else rows
        index = ring.write_index(self, positions, rows)
        # Out-of-range positions (padding, or a slot that is full) are dropped, never clamped.
        self.k[...] = self.k[...].at[rows, index].set(k.astype(self.k.dtype), mode="drop")
        self.v[...] = self.v[...].at[rows, index].set(v.astype(self.v.dtype), mode="drop")
        return self.k[...], self.v[...]

    def contents(self) -> tuple[jax.Array, jax.Array]:
        """The whole cache as :meth:`update` returns it, without writing."""
        return self.k[...], self.v[...]

    def stored(self, x: jax.Array) -> jax.Array:
        """``x`` [B, T, K, H] as this cache would hand it back after storing it."""
        return x.astype(self.k.dtype)


def kv_cache(config: ModelConfig, batch: int, length: int, window: int | None = None) -> KVCache | quant.Int8KVCache:
    """One layer's KV cache in ``config.kv_cache_dtype``: float (:class:`KVCache`) or int8; a ring
    of ``window`` slots when that is shorter than ``length`` (a sliding layer's)."""
    window = window if window is not None and window < length else None
    if config.kv_cache_dtype == "int8":
        return quant.Int8KVCache(config, batch, length, CACHE_AXES, window)
    return KVCache(config, batch, length, window)


class Attention(nnx.Module):
    # cache: (batch, length), (batch, length, ring) or None -- ring (default True): a sliding
    # layer keeps a ring of its window rather than a full-length cache; attention_kernels: a
    # kernel set of model.kernels; lora_spec: a model.lora.LoraSpec, or None for no adapters;
    # layer: this layer's index (its window: config.window(layer))
    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        cache=None,
        attention_kernels: str = "reference",
        lora_spec=None,
        layer: int = 0,
    ):
        d, n, k, h, w = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim, config.weight_dtype
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), w)
        self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), w)
        self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), w)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), w)
        if config.qkv_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), w, init="zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), w, init="zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), w, init="zeros")
        if config.qk_norm:  # one RMSNorm over each head's H, shared by the heads (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(config, rngs=rngs, dim=h)
            self.k_norm = RMSNorm(config, rngs=rngs, dim=h)
        self.qk_norm = config.qk_norm
        self.query_scale = (config.query_pre_attn_scalar or h) ** -0.5
        self.softcap = config.attn_logit_softcap
        self.window = config.window(layer)
        ringed = cache is not None and (len(cache) < 3 or cache[2])
        self.cache = None if cache is None else kv_cache(config, *cache[:2], self.window if ringed else None)
        self.qkv_bias = config.qkv_bias
        self.groups = n // k
        self.dtype = config.compute_dtype
        self.attention_kernels = attention_kernels
        self.lora = lora.projections(config, lora_spec, ("q", "k", "v", "o"))  # None: no adapters

    def _project(self, x: jax.Array, name: str, adapters: jax.Array | None = None) -> jax.Array:
        out = project("BTD,DNH->BTNH", x, self, name, self.dtype, adapters)
        if self.qkv_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return out

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        hooks=None,
        segments: jax.Array | None = None,
        adapters: jax.Array | None = None,
    ) -> jax.Array:
        # x [B, T, D], positions [B, T], rope: (sin, cos) for those positions; hooks: model.hooks;
        # segments [B, T]: packed prompts (engine/packing.py), each one's tokens written to its own
        # cache row; adapters [B]: each row's LoRA adapter (-1: none; model/lora.py)
        q = self._project(x, "q", adapters)  # [B, T, N, H]
        k = self._project(x, "k", adapters)  # [B, T, K, H]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        v = self._project(x, "v", adapters)
        b, t, n, h = q.shape
        q = q.reshape(b, t, n // self.groups, self.groups, h) * self.query_scale  # [B, T, K, G, H]
        if self.cache is None:
            out = self._attend(q, k, v, positions, positions, hooks=hooks, keys=t)
        elif segments is not None:  # fresh packed prompts: each sees its own keys, none cached before
            self.cache.update(k, v, positions, rows=segments)
            out = self._attend(q, k, v, positions, positions, segments=segments, hooks=hooks, keys=t)
        elif self.cache.window is not None:
            out = self._attend_ring(q, k, v, positions, hooks)
        else:
            k, v = self.cache.update(k, v, positions)  # [B, S, K, H] (int8: quant.Int8Rows)
            out = self._attend_cache(q, k, v, positions, hooks)
        if hooks is not None:  # probes: record the weights, ablate heads
            if hooks.weights:
                out, weights = out
                hooks.record(self, "weights", weights)
            out = hooks.heads(out.reshape(b, t, n, h), self)
        # One contracting dim (N*H): given "BTNH,NHD", XLA orders the two as (H, N) and transposes
        # the o weights into that order on every call.
        out = out.reshape(b, t, n * h)
        return project("BTX,XD->BTD", out, self, "o", self.dtype, adapters, shape=(n * h, -1))

    def _attend_cache(self, q: jax.Array, k, v, positions: jax.Array, hooks=None) -> jax.Array:
        """Attention over the first L cache positions, L the smallest bucket covering every live query.

        ``k, v``: the whole cache [B, S, K, H], float or ``quant.Int8Rows`` (dequantized after the
        slice, or chunk by chunk: a decode step converts the L positions it reads, not the S it holds)."""
        cache_length = k.shape[1]
        buckets = key_buckets(cache_length)

        # A kernel that reads a prefix in place (kernels.reads_prefix) gets the whole cache, int8
        # or float; else the prefix is sliced (an int8 one dequantized), as probes' weights need.
        weights = hooks is not None and hooks.weights
        in_place = kernels.reads_prefix(self.attention_kernels, q.shape[1]) and not weights

        def attend_prefix(length: int, q, k, v, positions):
            key_positions = jnp.broadcast_to(jnp.arange(length), (k.shape[0], length))
            sliced = length < cache_length
            if not (sliced and in_place):
                k, v = quant.cache_prefix(k, length, self.dtype), quant.cache_prefix(v, length, self.dtype)
            return self._attend(q, k, v, positions, key_positions, sliced=sliced, hooks=hooks, keys=cache_length)

        if len(buckets) == 1:
            return attend_prefix(cache_length, q, k, v, positions)
        # Keys a live query can see: 0 .. its position. Padding (position >= S) needs none.
        needed = jnp.max(jnp.where(positions < cache_length, positions + 1, 0))
        branch = jnp.searchsorted(jnp.asarray(buckets), needed)  # the first bucket >= needed
        branches = [functools.partial(attend_prefix, length) for length in buckets]
        return jax.lax.switch(branch, branches, q, k, v, positions)

    def _attend_ring(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, hooks=None):
        """Attention of a sliding layer over its ring (:mod:`workbench.model.ring`), keys placed by
        the positions the ring records; probes' weights come back over absolute positions."""
        cache = self.cache
        read = lambda x: quant.cache_prefix(x, x.shape[1], self.dtype)  # noqa: E731 (int8: dequantized)
        if q.shape[1] == 1:  # one token per row (decode): write it, then read the ring
            keys, values = cache.update(k, v, positions)
            keys, values, key_positions = read(keys), read(values), ring.key_positions(cache.held[...])
        else:  # a chunk, maybe longer than the ring: the ring as it was, then the chunk's own keys
            old_k, old_v = cache.contents()
            keys = jnp.concatenate([read(old_k), read(cache.stored(k))], axis=1)  # [B, W + T, K, H]
            values = jnp.concatenate([read(old_v), read(cache.stored(v))], axis=1)
            key_positions = jnp.concatenate([ring.key_positions(cache.held[...]), positions], axis=1)
            cache.update(k, v, positions)
        out = self._attend(q, keys, values, positions, key_positions, hooks=hooks, keys=keys.shape[1])
        if hooks is not None and hooks.weights:
            out, weights = out
            out = out, ring.by_position(weights, key_positions, cache.limit)
        return out

    def _attend(
        self, q, k, v, query_positions, key_positions, sliced: bool = False, hooks=None, keys=0, segments=None
    ) -> jax.Array:
        """Softmax attention: q [B, T, K, G, H] (scaled), k, v [B, S, K, H] -> [B, T, K, G, H].

        ``sliced``: k and v are a prefix of a longer cache (sliced, or whole when the kernel reads
        the prefix itself: :func:`kernels.reads_prefix`; ``key_positions`` says how many keys).
        ``segments`` [B, T] (queries and keys alike): a query sees only keys of its own segment.
        """
        # [B, T, S]; a key position < 0 is an empty ring slot
        visible = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= query_positions[:, :, None])
        if segments is not None:
            visible &= segments[:, None, :] == segments[:, :, None]
        if self.window is not None:
            visible &= key_positions[:, None, :] > query_positions[:, :, None] - self.window
        if hooks is not None and hooks.weights:  # probes: the weights too, padded to ``keys`` keys
            return hooks.attend(q, k, v, visible, self.dtype, keys, softcap=self.softcap)
        kernel_set, softcap = self.attention_kernels, self.softcap
        return kernels.attention(q, k, v, visible, self.dtype, kernels=kernel_set, sliced=sliced, softcap=softcap)
