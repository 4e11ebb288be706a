"""Mixture of experts: a router scores the experts per token, each token runs its k best, and
their outputs are summed by the router's weights (Mixtral, Qwen3-MoE). Every token gets its k
experts: no capacity factor, nothing dropped.

Axis letters as in ``layers.py``, plus E experts, K the k chosen per token, N tokens (B*T).
The experts' weights are stacked ``gate, up [E, D, F]``, ``down [E, F, D]`` on the logical
``expert`` axis (``sharding.py``): a mesh with an ``expert`` axis holds a share of the experts
on each device (expert parallelism); without one, ``mlp`` shards each expert by ``tensor``.

Routing is the small pure function :func:`route`, whose ids and weights are what
``probes.Capture(router=True)`` records and what ``probes.Ablate(layer, experts=...)`` changes
(an ablated expert's logit is -inf: the router picks among the rest).

Two ways to run the chosen experts, equal up to rounding (``tests/test_moe.py``), picked by the
kernel set (``model.kernels``, per platform in ``engine.tuning``):

=================  ==========================================================================
``"reference"``    :func:`grouped`: the N*K (token, expert) pairs sorted by expert, and the
                   three products over them as grouped products (``jax.lax.ragged_dot``):
                   each token meets only its k experts' weights.
``"xla_cpu"``      :func:`dense`: every expert on every token, the unchosen ones weighted 0.
                   XLA:CPU lowers ``ragged_dot`` to no cheaper a product than the dense one,
                   and gathering each token's experts' weights costs a batched product XLA:CPU
                   runs slowly, so at the sizes measured the dense products win
                   (``docs/speed.md``).
=================  ==========================================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model import quant
from workbench.model.config import ModelConfig
from workbench.model.layers import ACTIVATIONS, param


def route(logits: jax.Array, k: int, scheme: str, norm_topk_prob: bool = True) -> tuple[jax.Array, jax.Array]:
    """Router logits [..., E] -> (expert ids [..., K] int32, weights [..., K] float32), the ids
    in descending order of weight. ``scheme``: "softmax_topk" (softmax over the k largest
    logits, Mixtral) or "topk_softmax" (softmax over all, the k largest kept, renormalized when
    ``norm_topk_prob``, Qwen3-MoE)."""
    logits = logits.astype(jnp.float32)
    if scheme == "softmax_topk":
        top, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


class Experts(nnx.Module):
    """The E experts' gated MLPs, stacked: gate, up [E, D, F] and down [E, F, D]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f, w = config.num_experts, config.embed_dim, config.expert_dim, config.weight_dtype
        self.gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), w)
        self.up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), w)
        self.down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), w)


class MoE(nnx.Module):
    """A sparse MLP layer: ``router`` [D, E] (HF's ``gate``) and the :class:`Experts`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, kernels: str = "reference"):
        self.router = param(rngs, (config.embed_dim, config.num_experts), ("embed", None), config.weight_dtype)
        self.experts = Experts(config, rngs=rngs)
        self.k, self.scheme, self.norm = config.num_experts_per_tok, config.router, config.norm_topk_prob
        self.num_experts = config.num_experts
        self.dtype = config.compute_dtype
        self.activation = config.mlp_activation
        self.run = dense if kernels == "xla_cpu" else grouped

    def __call__(self, x: jax.Array, adapters: jax.Array | None = None, hooks=None) -> jax.Array:  # [B, T, D]
        logits = quant.einsum("BTD,DE->BTE", x, self.router, self.dtype)
        if hooks is not None:  # probes: ablated experts' logits at -inf
            logits = hooks.router_logits(logits)
        ids, weights = route(logits, self.k, self.scheme, self.norm)  # [B, T, K] each
        if hooks is not None:
            hooks.routed(self, ids, weights)
        b, t, d = x.shape
        out = self.run(x.reshape(b * t, d), ids.reshape(b * t, -1), weights.reshape(b * t, -1), self)
        return out.reshape(b, t, d)


def dense(x: jax.Array, ids: jax.Array, weights: jax.Array, moe: MoE) -> jax.Array:
    """Every expert on every token [N, D], summed by ``weights`` [N, K] scattered to [N, E]
    (zero for the experts a token did not choose)."""
    experts = moe.experts
    combine = jnp.sum(jax.nn.one_hot(ids, moe.num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    # E the products' batch axis (the tokens broadcast to every expert): each expert's weights
    # are read in place. "ND,EDF->NEF" instead has XLA:CPU lay the weights out anew every call,
    # 4-7x slower at the mixtral-1b shape (docs/speed.md).
    xe = jnp.broadcast_to(x, (moe.num_experts, *x.shape))  # [E, N, D]
    gate = quant.einsum("END,EDF->ENF", xe, experts.gate, moe.dtype)
    up = quant.einsum("END,EDF->ENF", xe, experts.up, moe.dtype)
    out = quant.einsum("ENF,EFD->END", ACTIVATIONS[moe.activation](gate) * up, experts.down, moe.dtype)
    return jnp.einsum("END,NE->ND", out.astype(jnp.float32), combine).astype(x.dtype)


def grouped(x: jax.Array, ids: jax.Array, weights: jax.Array, moe: MoE) -> jax.Array:
    """The (token, expert) pairs sorted by expert, each expert's rows one group of the grouped
    products (``jax.lax.ragged_dot``), then each row times its weight, added back to its token."""
    experts = moe.experts
    n, k = ids.shape
    flat = ids.reshape(-1)  # [N*K]
    order = jnp.argsort(flat, stable=True)
    tokens, chosen = order // k, flat[order]  # each sorted row's token and expert
    sizes = jnp.bincount(flat, length=moe.num_experts).astype(jnp.int32)  # [E] rows per expert
    rows = x[tokens]  # [N*K, D]
    gate = grouped_product(rows, experts.gate, sizes, chosen, moe.dtype)
    up = grouped_product(rows, experts.up, sizes, chosen, moe.dtype)
    out = grouped_product(ACTIVATIONS[moe.activation](gate) * up, experts.down, sizes, chosen, moe.dtype)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[tokens].add(out).astype(x.dtype)


def grouped_product(rows: jax.Array, w, sizes: jax.Array, chosen: jax.Array, dtype) -> jax.Array:
    """``rows`` [M, C] (sorted by expert, ``sizes`` [E] of each) times their expert's weight
    [E, C, O] -> [M, O]: a float weight, or a quantized one (``quant.QuantizedWeight``, its scale
    [1, E, O] applied per row by ``chosen`` [M], each row's expert)."""
    if not isinstance(w, quant.QuantizedWeight):
        w = w[...]
        if jnp.dtype(w.dtype).itemsize < jnp.dtype(dtype).itemsize:  # bf16 weights: the fast mix
            return jax.lax.ragged_dot(rows.astype(w.dtype), w, sizes, preferred_element_type=dtype)
        return jax.lax.ragged_dot(rows, w.astype(dtype), sizes)
    scale = w.scale[...][0][chosen]  # [M, O]
    if w.mode != "w8a8":
        return (jax.lax.ragged_dot(rows, w.values[...].astype(dtype), sizes) * scale).astype(dtype)
    xq, x_scale = quant.quantize_rows(rows)  # int8 per row, as the dense products quantize tokens
    acc = jax.lax.ragged_dot(xq, w.values[...], sizes, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale[:, None] * scale).astype(dtype)
