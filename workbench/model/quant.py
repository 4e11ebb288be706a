"""Quantized weights and KV cache: the rule table, the one weight product, the int8 cache.

Every weight product of the model (attention q/k/v/o, MLP gate/up/down, the vocabulary
projection) goes through :func:`einsum`, and the token lookup through :func:`lookup`. A float
weight is an ``nnx.Param`` and takes exactly the path it took before quantization existed (same
program); a quantized one is a :class:`QuantizedWeight` holding integer ``values`` and float32
``scale`` params, made from the float weight by :func:`quantize_model` (the last step of
``Transformer.__init__``) or :func:`quantize_params` (a float pure dict, leaf by leaf).

Modes (``ModelConfig.quantize``):

========  =======================================================================================
``w8``    int8 weights, one float32 scale per output channel; the activations stay in the
          compute dtype (the int8 weights are converted before a float product: it saves
          memory, not time, on XLA:CPU, which does not fuse the convert into the dot).
``w8a8``  ``w8`` plus activations quantized to int8 per token on the fly: int8 x int8 products
          accumulated in int32 (``preferred_element_type``), then both scales applied in f32.
``w4``    int4 weights with one scale per group of :data:`GROUP` input rows; dequantized before a
          float product (an int4 dot does not pay on this jaxlib). The vocabulary projection
          stays ``w8`` (:data:`QUANTIZED_WEIGHTS`).
========  =======================================================================================

Why our own einsum and not qwix 0.1.8: qwix composes with split / merge, but its weight-only
path dequantizes before a float dot (several times slower than the float32 product on
XLA:CPU, ``docs/speed.md``), and the int8 x int8 product it reaches for w8a8 is the few lines
of :meth:`QuantizedWeight.product`; owning them keeps the default float path's program
unchanged and the scales visible as params.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from workbench import trees
from workbench.model import ring
from workbench.model.scan import is_stacked_path

MODES = ("w8", "w8a8", "w4")
KV_CACHE_DTYPES = ("int8",)
GROUP = 32  # w4: input rows that share one scale
INT_MAX = {"w8": 127, "w8a8": 127, "w4": 7}
STORAGE = {"w8": jnp.int8, "w8a8": jnp.int8, "w4": jnp.int4}

# The table of quantized weights, written once: leaf path pattern -> (contracting axes of the
# weight, the mode each requested mode applies to it). The contracting axes are the ones the
# product sums over; the scale has one entry per position of the other (output) axes. A layer's
# path is ``layers/<i>/...`` unrolled or ``layers/...`` stacked (scanned layers, ``model.scan``):
# a stacked weight is quantized layer by layer, its axes counted without the leading ``layers``.
QUANTIZED_WEIGHTS: tuple[tuple[str, tuple[int, ...], dict[str, str]], ...] = (
    (r"layers/(\d+/)?attn/[qkv]", (0,), {"w8": "w8", "w8a8": "w8a8", "w4": "w4"}),  # [D, N|K, H]
    (r"layers/(\d+/)?attn/o", (0, 1), {"w8": "w8", "w8a8": "w8a8", "w4": "w4"}),  # [N, H, D]
    (r"layers/(\d+/)?mlp/(gate|up|down)", (0,), {"w8": "w8", "w8a8": "w8a8", "w4": "w4"}),  # [D, F] / [F, D]
    # The experts of a sparse layer, [E, D, F] / [E, F, D] (``model/moe.py``): a scale per expert
    # and output channel. Under w4 they stay int8 (w4's groups are cut from leading contracting
    # axes); the router stays float: it decides which experts run.
    (r"layers/(\d+/)?mlp/experts/(gate|up|down)", (1,), {"w8": "w8", "w8a8": "w8a8", "w4": "w8"}),
    # The vocabulary projection (tied embedding [V, D] or lm_head [D, V]) stays int8 under w4.
    (r"embed/embedding", (1,), {"w8": "w8", "w8a8": "w8a8", "w4": "w8"}),
    (r"lm_head", (0,), {"w8": "w8", "w8a8": "w8a8", "w4": "w8"}),
)


def check_mode(quantize: str | None) -> None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize must be one of none, {', '.join(MODES)}; got {quantize!r}")


def check_kv_cache_dtype(kv_cache_dtype: str | None) -> None:
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")


def rule(path: str, quantize: str | None) -> tuple[tuple[int, ...], str] | None:
    """(contracting axes, applied mode) for the leaf ``path`` under ``quantize``; None: kept float."""
    if quantize is None:
        return None
    for pattern, contract, modes in QUANTIZED_WEIGHTS:
        if re.fullmatch(pattern, path) and modes.get(quantize):
            return contract, modes[quantize]
    return None


# ---- quantizing a weight -----------------------------------------------------------------------
def quantize_array(w: jax.Array, contract: tuple[int, ...], mode: str) -> tuple[jax.Array, jax.Array]:
    """(values, scale) of the float weight ``w``: symmetric, round to nearest.

    scale [G, *kept]: the output axes (``w``'s axes but ``contract``) with, first, G groups of the
    contracting axes (G = 1 per output channel; for w4 the contracting axes, which lead, are cut
    into blocks of ``GROUP``). values = round(w / scale), so w ~ values * scale.
    """
    if mode != "w4":  # one group: reduce in place, no transposes (XLA:CPU's cost several times the rest)
        scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=contract, keepdims=True) / INT_MAX[mode]
        scale = jnp.where(scale == 0, 1.0, scale)
        # each pass converts w as it reads it: XLA would otherwise keep a float32 copy of the weight
        w, scale = jax.lax.optimization_barrier((w, scale))
        values = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -INT_MAX[mode], INT_MAX[mode])
        return values.astype(STORAGE[mode]), jnp.squeeze(scale, contract)[None]
    w = w.astype(jnp.float32)
    kept = [a for a in range(w.ndim) if a not in contract]
    moved = jnp.transpose(w, (*contract, *kept))  # [C..., kept...]
    kept_shape = moved.shape[len(contract) :]
    size = 1
    for a in contract:
        size *= w.shape[a]
    groups = size // GROUP if mode == "w4" else 1
    if mode == "w4" and (contract != tuple(range(len(contract))) or size % GROUP):
        raise ValueError(f"w4 needs the group size {GROUP} to divide the contracting size {size} of shape {w.shape}")
    blocks = moved.reshape(groups, size // groups, *kept_shape)
    scale = jnp.max(jnp.abs(blocks), axis=1) / INT_MAX[mode]  # [G, *kept]
    scale = jnp.where(scale == 0, 1.0, scale)
    values = jnp.clip(jnp.round(blocks / scale[:, None]), -INT_MAX[mode], INT_MAX[mode])
    values = jnp.transpose(values.reshape(moved.shape), _inverse((*contract, *kept)))
    return values.astype(STORAGE[mode]), scale


def dequantize(values: jax.Array, scale: jax.Array, contract: tuple[int, ...]) -> jax.Array:
    """The float32 weight ``values * scale`` (the inverse of :func:`quantize_array` up to rounding)."""
    kept = [a for a in range(values.ndim) if a not in contract]
    moved = jnp.transpose(values, (*contract, *kept))
    blocks = moved.reshape(scale.shape[0], -1, *scale.shape[1:]).astype(jnp.float32) * scale[:, None]
    return jnp.transpose(blocks.reshape(moved.shape), _inverse((*contract, *kept)))


def quantize_layers(w: jax.Array, contract: tuple[int, ...], mode: str, stacked: bool) -> tuple[jax.Array, jax.Array]:
    """:func:`quantize_array`, layer by layer over a ``stacked`` weight [L, ...]: values [L, ...],
    scale [L, G, *kept], each layer's the numbers its unrolled weight would get."""
    if not stacked:
        return quantize_array(w, contract, mode)
    return jax.vmap(lambda layer: quantize_array(layer, contract, mode))(w)


def dequantize_layers(values: jax.Array, scale: jax.Array, contract: tuple[int, ...], stacked: bool) -> jax.Array:
    """:func:`dequantize`, layer by layer over ``stacked`` values [L, ...] and scales [L, G, ...]."""
    if not stacked:
        return dequantize(values, scale, contract)
    return jax.vmap(lambda v, s: dequantize(v, s, contract))(values, scale)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=lambda i: perm[i]))


class QuantizedWeight(nnx.Module):
    """A quantized weight: ``values`` (int8 / int4, the float weight's shape and logical axes) and
    ``scale`` (float32 [G, *output axes]); see :func:`quantize_array`. ``stacked``: a scanned
    model's weight [L, ...], quantized per layer (scale [L, G, ...]); ``contract`` counts the axes
    of one layer, which is what the scan hands each step."""

    def __init__(self, weight: nnx.Param, contract: tuple[int, ...], mode: str, stacked: bool = False):
        values, scale = quantize_layers(weight[...], contract, mode, stacked)
        axes = weight.get_metadata().get("out_sharding") or (None,) * values.ndim
        lead, layer_axes = (axes[:1], axes[1:]) if stacked else ((), axes)
        # The group axis of the scale shards like the first contracting axis (w4's groups are
        # contiguous blocks of it); a size-1 axis is replicated by the rules.
        kept = (layer_axes[a] for a in range(len(layer_axes)) if a not in contract)
        scale_axes = (*lead, layer_axes[contract[0]], *kept)
        self.values = nnx.Param(values, out_sharding=axes)
        self.scale = nnx.Param(scale, out_sharding=scale_axes)
        self.contract = contract
        self.mode = mode

    def dequantized(self, dtype) -> jax.Array:
        return dequantize(self.values[...], self.scale[...], self.contract).astype(dtype)

    def product(self, spec: str, x: jax.Array, dtype, shape: tuple[int, ...] | None) -> jax.Array:
        """``einsum(spec, x, w)`` for this weight; ``shape``: the weight reshaped to it first (its
        contracting axes merged, as the o projection does)."""
        inputs, out = spec.split("->")
        x_letters, w_letters = inputs.split(",")
        if self.mode == "w4":
            w = self.dequantized(dtype)
            return jnp.einsum(spec, x, w if shape is None else w.reshape(shape))
        values = self.values[...] if shape is None else self.values[...].reshape(shape)
        kept = "".join(c for c in w_letters if c in out)
        w_scale = _along(self.scale[0], kept, out)  # per output channel
        if self.mode == "w8":
            return (jnp.einsum(spec, x, values.astype(dtype)) * w_scale).astype(dtype)
        # w8a8: x quantized per token (over the axes the product contracts), int32 accumulation.
        summed = tuple(i for i, c in enumerate(x_letters) if c not in out)
        x32 = x.astype(jnp.float32)
        x_scale = jnp.max(jnp.abs(x32), axis=summed, keepdims=True) / 127
        x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
        xq = jnp.round(x32 / x_scale).astype(jnp.int8)
        acc = jnp.einsum(spec, xq, values, preferred_element_type=jnp.int32)
        x_kept = "".join(c for c in x_letters if c in out)
        x_scale = _along(jnp.squeeze(x_scale, summed), x_kept, out)
        return (acc.astype(jnp.float32) * x_scale * w_scale).astype(dtype)


def _along(scale: jax.Array, letters: str, out: str) -> jax.Array:
    """``scale`` over the axes ``letters`` shaped to broadcast against an array of axes ``out``."""
    order = sorted(range(len(letters)), key=lambda i: out.index(letters[i]))
    scale = jnp.transpose(scale, order)
    dims = iter(scale.shape)
    return scale.reshape([next(dims) if c in letters else 1 for c in out])


# ---- the call sites' functions -----------------------------------------------------------------
def einsum(spec: str, x: jax.Array, w: nnx.Param | QuantizedWeight, dtype, shape=None) -> jax.Array:
    """The one weight product: ``jnp.einsum(spec, x, w)`` in ``dtype``, ``w`` reshaped to ``shape``
    first if given. A float param in the compute dtype takes the plain einsum (the program of the
    unquantized model). Narrower float weights (bfloat16 params, float32 compute) multiply the
    activations rounded to their dtype with a float32 result: XLA:CPU runs that mix fast, where
    converting the weights to float32 before the dot is several times slower (``docs/speed.md``)."""
    if isinstance(w, QuantizedWeight):
        return w.product(spec, x, dtype, shape)
    if jnp.dtype(w.dtype).itemsize < jnp.dtype(dtype).itemsize:  # bf16 weights, f32 compute: the fast mix
        w = w[...] if shape is None else w[...].reshape(shape)
        return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=dtype)
    w = w[...].astype(dtype)
    return jnp.einsum(spec, x, w if shape is None else w.reshape(shape))


def lookup(table: nnx.Param | QuantizedWeight, tokens: jax.Array, dtype) -> jax.Array:
    """Rows ``tokens`` of an embedding table [V, D], float or quantized (one scale per row)."""
    if isinstance(table, QuantizedWeight):
        rows = jnp.take(table.values[...], tokens, axis=0).astype(jnp.float32)
        return (rows * jnp.take(table.scale[0], tokens, axis=0)[..., None]).astype(dtype)
    return jnp.take(table[...], tokens, axis=0).astype(dtype)


# ---- quantizing a model or its params ----------------------------------------------------------
def quantize_model(model: nnx.Module, quantize: str | None) -> None:
    """Replace, in place, every float param of ``model`` the rules name by a QuantizedWeight."""
    if quantize is None:
        return
    for path, param in trees.variables(nnx.state(model, nnx.Param)).items():
        if (applied := rule(path, quantize)) is not None:
            *parents, name = [int(k) if k.isdigit() else k for k in path.split("/")]
            parent = model
            for key in parents:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            setattr(parent, name, QuantizedWeight(param, *applied, stacked=is_stacked_path(path)))


def quantize_params(pure: dict, quantize: str | None, shardings: dict | None = None) -> dict:
    """A float pure dict of params -> the quantized model's pure dict, leaf by leaf
    (:func:`quantize_leaf`). ``pure`` is consumed (emptied): each float leaf is let go as soon as
    its quantized form exists, so the model is never held twice in full precision.
    ``shardings``: the quantized model's pure dict of shardings, or None."""
    flat = trees.leaf_paths(pure)
    pure.clear()
    targets = trees.leaf_paths(shardings) if shardings is not None else {}
    out = {}
    for path in list(flat):
        out.update(quantize_leaf(path, flat.pop(path), quantize, targets))
    return trees.nest(out)


def dequantize_params(params) -> dict:
    """A quantized model's params (pure dict or State) -> the float model's pure dict: every
    ``{path/values, path/scale}`` pair becomes the float32 weight ``values * scale`` at ``path``
    (:func:`dequantize`), every other leaf is kept. The inverse of :func:`quantize_params` up to
    rounding: the float forward over it is the oracle of a quantized weight-only forward."""
    flat = trees.leaf_paths(params)
    out = {}
    for path, leaf in flat.items():
        owner = path.removesuffix("/values")
        if owner != path and f"{owner}/scale" in flat:
            # the contracting axes depend on the weight, not on the mode: any mode's rule names them
            contract = rule(owner, MODES[0])[0]
            out[owner] = dequantize_layers(leaf, flat[f"{owner}/scale"], contract, is_stacked_path(owner))
        elif not (path.endswith("/scale") and f"{path.removesuffix('/scale')}/values" in flat):
            out[path] = leaf
    return trees.nest(out)


def quantize_leaf(path: str, leaf: jax.Array, quantize: str | None, shardings: dict | None = None) -> dict:
    """One float leaf of the params -> its entries in the quantized model's flat params:
    ``{path: leaf}`` where the rules keep it float, else ``{path/values, path/scale}``, placed in
    ``shardings`` (the quantized model's ``{leaf path: sharding}``) when given. A loader calls it
    on each leaf as it reads it, so only one float weight is alive at a time."""
    applied = rule(path, quantize)
    if applied is None:
        return {path: leaf}
    placed = (shardings.get(f"{path}/values"), shardings.get(f"{path}/scale")) if shardings else None
    values, scale = _jitted_quantize(placed)(leaf, *applied, is_stacked_path(path))
    return {f"{path}/values": values, f"{path}/scale": scale}


@functools.lru_cache
def _jitted_quantize(placed: tuple | None):  # one jit per output sharding: layers share compiles
    return jax.jit(quantize_layers, static_argnums=(1, 2, 3), out_shardings=placed)


# ---- the int8 KV cache -------------------------------------------------------------------------
def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (int8 [..., H], float32 scale [...]): one scale per row (position, kv head)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.round(x32 / scale[..., None]).astype(jnp.int8), scale


def dequantized_cache(layer: dict) -> dict:
    """``{"k", "v"}`` of one layer's cache dict as float32, dequantized when it holds int8 and scales."""
    if "k_scale" not in layer:
        return layer
    return {name: Int8Rows(layer[name], layer[f"{name}_scale"]).dequantized() for name in ("k", "v")}


class Int8Rows(NamedTuple):
    """An int8 cache as attention reads it: ``values`` [B, S, K, H] and ``scale`` [B, S, K], kept
    apart until :func:`cache_prefix` has sliced the positions attention reads."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantized(self, dtype=jnp.float32) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale[..., None]).astype(dtype)


def cache_rows(cache: jax.Array | Int8Rows, start, size: int, dtype) -> jax.Array:
    """Positions ``start .. start + size - 1`` of a cache [B, S, K, H] (``start`` may be traced):
    a float cache sliced; an int8 one sliced, then dequantized to ``dtype`` -- only the positions
    read are converted."""
    if isinstance(cache, Int8Rows):
        return Int8Rows(*(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in cache)).dequantized(dtype)
    return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=1)


def cache_prefix(cache: jax.Array | Int8Rows, length: int, dtype) -> jax.Array:
    """The first ``length`` positions of a cache (:func:`cache_rows`)."""
    return cache_rows(cache, 0, length, dtype)


class Int8KVCache(nnx.Module):
    """``attention.KVCache`` stored as int8 with a float32 scale per (position, kv head): keys and
    values are quantized on write and handed to attention as :class:`Int8Rows`, which it
    dequantizes after slicing the prefix it reads (:func:`cache_prefix`). With a ``window``, a
    ring of that many slots, as ``attention.KVCache``'s (``model/ring.py``)."""

    def __init__(self, config, batch: int, length: int, axes: tuple[str, ...], window: int | None = None):
        # axes: the logical axes of a [B, S, K, H] cache (attention.CACHE_AXES); the scales drop H
        self.window, self.limit = window, length
        shape = (batch, length if window is None else window, config.num_kv_heads, config.head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, jnp.int8), out_sharding=axes)
        self.v = nnx.Cache(jnp.zeros(shape, jnp.int8), out_sharding=axes)
        self.k_scale = nnx.Cache(jnp.zeros(shape[:3], jnp.float32), out_sharding=axes[:3])
        self.v_scale = nnx.Cache(jnp.zeros(shape[:3], jnp.float32), out_sharding=axes[:3])
        if window is not None:
            self.held = ring.held(batch, window)

    def update(
        self, k: jax.Array, v: jax.Array, positions: jax.Array, rows: jax.Array | None = None
    ) -> tuple[Int8Rows, Int8Rows]:
        """Write ``k, v`` [B, T, K, H] at ``positions`` [B, T] (of cache ``rows`` [B, T], packed
        prompts; default: the token's own row); return the whole cache, int8."""
        rows = jnp.arange(k.shape[0])[:, None] if rows is None else rows
        index = ring.write_index(self, positions, rows)
        for name, new in (("k", k), ("v", v)):
            values, scale = quantize_rows(new)
            cache, scales = getattr(self, name), getattr(self, f"{name}_scale")
            cache[...] = cache[...].at[rows, index].set(values, mode="drop")
            scales[...] = scales[...].at[rows, index].set(scale, mode="drop")
        return self.contents()

    def contents(self) -> tuple[Int8Rows, Int8Rows]:
        """The whole cache as :meth:`update` returns it, without writing."""
        return Int8Rows(self.k[...], self.k_scale[...]), Int8Rows(self.v[...], self.v_scale[...])

    def stored(self, x: jax.Array) -> Int8Rows:
        """``x`` [B, T, K, H] as this cache would hand it back after storing it (rounded to int8)."""
        return Int8Rows(*quantize_rows(x))
