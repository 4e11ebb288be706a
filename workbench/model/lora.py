"""LoRA adapters served side by side: every loaded adapter's low-rank delta on a projection,
stacked along an adapter axis, and each batch row (decode slot) picking its own.

For a projection ``y = x @ W`` with adapters ``A_i`` [in, r], ``B_i`` [r, out] (PEFT's
``lora_alpha / r`` scale, or ``/ sqrt(r)`` with rslora, folded into ``B_i`` on load: Flax's
``nnx.LoRA`` has no alpha), a row whose adapter index is ``i >= 0`` gets ``y + (x @ A_i) @ B_i``;
a row with index ``-1`` (the base model) gets ``y`` itself, bit for bit. Adapters of lower rank
are zero-padded to the largest rank, and a projection an adapter does not target has zeros there.

The weights are ``nnx.LoRAParam`` (their own collection, apart from the base ``nnx.Param``s):
``a`` [n, in, r] and ``b`` [n, r, out] with logical axes ``adapters``, ``lora_rank`` and the
projection's own, so the rules table shards them like the weights they modify. A model built
without a :class:`LoraSpec` has no LoRA variables and runs no LoRA op.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # PEFT's q_proj ... down_proj


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """How many adapters, their (largest) rank, and the projections any of them targets."""

    num_adapters: int
    rank: int
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}; targets are {', '.join(TARGETS)}")


class LoRA(nnx.Module):
    """Stacked deltas of one projection: ``a`` [n, in, r], ``b`` [n, r, out] (flattened in/out)."""

    def __init__(self, spec: LoraSpec, sizes: tuple[int, int], axes: tuple[str, str], dtype):
        (d_in, d_out), (in_axis, out_axis) = sizes, axes
        n, r = spec.num_adapters, spec.rank
        self.a = nnx.LoRAParam(jnp.zeros((n, d_in, r), dtype), out_sharding=("adapters", in_axis, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((n, r, d_out), dtype), out_sharding=("adapters", "lora_rank", out_axis))

    def __call__(self, x: jax.Array, y: jax.Array, adapters: jax.Array) -> jax.Array:
        """``y`` [B, T, out...] plus each row's delta of ``x`` [B, T, in...]; ``adapters`` [B]."""
        # Every adapter's A on every row, then each row keeps its own: two plain products that
        # read each stacked weight once, where gathering A_i, B_i per row would copy them per slot.
        b, t = x.shape[:2]
        low = jnp.einsum("BTI,NIR->BTNR", x.reshape(b, t, -1), self.a[...].astype(x.dtype))
        chosen = jax.nn.one_hot(adapters, self.a.shape[0], dtype=x.dtype)  # [B, N]; -1 (base): all zero
        low = low * chosen[:, None, :, None]
        delta = jnp.einsum("BTNR,NRO->BTO", low, self.b[...].astype(x.dtype))  # [B, T, out]; 0 on base rows
        # y + delta written as a product, y * 1 + delta * used (used = 0 on a base row: y exactly). XLA:CPU fuses
        # an elementwise combine (a select, an add) into the consumer's loop -- rope's sin and cos, silu --
        # whose code then rounds those by an ulp unlike the engine without adapters; a product's output is
        # never fused into its consumer, which so receives a plain buffer, as it does without adapters.
        used = (adapters >= 0).astype(y.dtype)
        mix = jnp.stack([jnp.ones_like(used), used], axis=1)  # [B, 2]
        both = jnp.stack([y.reshape(b, -1), delta.astype(y.dtype).reshape(b, -1)], axis=1)  # [B, 2, T * out]
        return jnp.einsum("BKX,BK->BX", both, mix).reshape(y.shape)


def projections(config, spec: LoraSpec | None, names: tuple[str, ...]) -> nnx.Dict | None:
    """A ``LoRA`` per targeted projection among ``names`` (None without a spec or targets)."""
    if spec is None or not set(names) & set(spec.targets):
        return None
    shapes = config.projections()  # (in, out) sizes and logical axes, flattened as HF stores them
    wanted = [name for name in names if name in spec.targets]
    return nnx.Dict({name: LoRA(spec, *shapes[name], config.weight_dtype) for name in wanted})


def apply(lora: nnx.Dict | None, name: str, x: jax.Array, y: jax.Array, adapters: jax.Array | None) -> jax.Array:
    """``y`` with projection ``name``'s per-row adapter delta; unchanged without LoRA or adapters."""
    if lora is None or adapters is None or name not in lora:
        return y
    return lora[name](x, y, adapters)


def scale(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling of ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rslora."""
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """Loaded adapters ready for an engine: their names (index i = ``names[i]``), the spec the
    model is built with, and the stacked weights as a pure dict of host arrays shaped like the
    model's LoRA state (``{"layers": {i: {"attn": {"lora": {"q": {"a": ..., "b": ...}}}}}}``)."""

    names: tuple[str, ...]
    spec: LoraSpec
    weights: dict
