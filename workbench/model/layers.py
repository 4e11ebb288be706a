"""Building blocks: parameter helper, the weight product, embedding, RMSNorm, rotary embedding,
gated MLP (SwiGLU, or Gemma's GeGLU).

Axis letters in einsums and shape comments: B batch, T query positions, S key positions,
D embed, N query heads, K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.model import lora, quant
from workbench.model.config import ModelConfig, RopeScaling

INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype, init: str = "normal") -> nnx.Param:
    """A parameter with its logical axes (``out_sharding``), normal(0.02), zeros or ones."""
    if init == "normal":
        value = INIT_STD * jax.random.normal(_next_key(rngs.params), tuple(shape), jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes))


def _next_key(stream: nnx.RngStream) -> jax.Array:
    """``stream()``: the same key and count. Under a trace (``nnx.eval_shape``, how the engine
    builds its models) the count is a tracer, and ``stream()`` stores it through a check that asks
    the tracer for its sharding, whose error message walks the whole trace so far: quadratic in
    the model's size, seconds of every engine built at 1B. Set directly, it costs nothing."""
    count = stream.count.get_raw_value()
    if not isinstance(count, jax.core.Tracer):
        return stream()
    key = jax.random.fold_in(stream.key[...], count)
    stream.count.set_raw_value(count + 1)  # checks the trace level, as stream() does
    return key


def project(spec: str, x: jax.Array, module: nnx.Module, name: str, dtype, adapters=None, shape=None) -> jax.Array:
    """A block's weight product: ``x`` times ``module``'s weight ``name`` by ``spec`` in ``dtype``
    (``quant.einsum``: a float or a quantized weight, reshaped to ``shape`` if given), plus each
    row's LoRA delta where ``module.lora`` holds adapters for it (``lora.apply``; ``adapters`` [B])."""
    y = quant.einsum(spec, x, getattr(module, name), dtype, shape)
    return lora.apply(module.lora, name, x, y, adapters)


class Embed(nnx.Module):
    """Token embedding; ``attend`` reuses it as the output projection when embeddings are tied."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), config.weight_dtype)
        self.dtype = config.compute_dtype
        # Gemma: sqrt(D), rounded to the weight dtype as transformers rounds it (34.0, not 33.94, in bf16)
        self.multiplier = float(np.asarray(config.embed_dim**0.5, config.weight_dtype)) if config.embed_scale else None

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        x = quant.lookup(self.embedding, tokens, self.dtype)
        return x if self.multiplier is None else x * jnp.asarray(self.multiplier, x.dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return quant.einsum("BTD,VD->BTV", x, self.embedding, self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis (``dim`` wide, default D), normalized in float32 like
    the reference implementations; with ``config.norm_offset`` (Gemma) times ``1 + scale``, in
    float32 too, and the scale starts at zero."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dim: int | None = None):
        init = "zeros" if config.norm_offset else "ones"
        self.scale = param(rngs, (dim or config.embed_dim,), ("norm",), config.weight_dtype, init=init)
        self.eps = config.norm_eps
        self.offset = config.norm_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return (self.scale[...].astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [H/2], with Llama-3's smooth low/high-frequency rescaling, or a linear
    one, if given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


class Rotary(nnx.Module):
    """Rotary position embedding (the "rotate half" layout of Hugging Face Llama checkpoints).

    The inverse frequencies are a plain ``nnx.Variable``: not a parameter, not a cache, so the
    split puts them in ``rest`` -- the counterpart of HF's ``inv_freq`` buffer.
    """

    def __init__(self, config: ModelConfig, local: bool = False):
        # local: the sliding layers' own rope (config.local_rope_theta, unscaled; Gemma 3)
        theta, scaling = (config.local_rope_theta, None) if local else (config.rope_theta, config.rope_scaling)
        self.inv_freq = nnx.Variable(rope_frequencies(config.head_dim, theta, scaling))

    def __call__(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B, T]
        """(sin, cos) [B, T, 1, H/2] for ``positions``, computed once per forward pass."""
        angles = positions[..., None].astype(jnp.float32) * self.inv_freq[...]
        return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x: jax.Array, sin_cos: tuple[jax.Array, jax.Array]) -> jax.Array:  # [B, T, N, H]
    sin, cos = sin_cos
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU with ``mlp_activation="gelu_tanh"`` (Gemma)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, lora_spec: lora.LoraSpec | None = None):
        d, f, w = config.embed_dim, config.mlp_dim, config.weight_dtype
        self.gate = param(rngs, (d, f), ("embed", "mlp"), w)
        self.up = param(rngs, (d, f), ("embed", "mlp"), w)
        self.down = param(rngs, (f, d), ("mlp", "embed"), w)
        self.dtype = config.compute_dtype
        self.activation = config.mlp_activation
        self.lora = lora.projections(config, lora_spec, ("gate", "up", "down"))  # None: no adapters

    def __call__(self, x: jax.Array, adapters: jax.Array | None = None) -> jax.Array:  # [B, T, D]
        gate = project("BTD,DF->BTF", x, self, "gate", self.dtype, adapters)
        up = project("BTD,DF->BTF", x, self, "up", self.dtype, adapters)
        return project("BTF,FD->BTD", ACTIVATIONS[self.activation](gate) * up, self, "down", self.dtype, adapters)
