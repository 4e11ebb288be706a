"""Hook sites of the model for ``workbench.probes``: what a probed step does inside each block.

The model's modules take ``hooks=None``; given one (a :class:`Hooks`, built by ``probes.run``
inside a jitted step) they call it at each site: attention may return its weights
(:meth:`LayerHooks.attend`), query heads may be ablated (:meth:`LayerHooks.heads`), and the
outputs of attention, the MLP and the block may be patched, steered and recorded
(:meth:`LayerHooks.site`). Recording is ``Module.sow(nnx.Intermediate, ...)``, collected by
``nnx.capture``. Without hooks none of this is traced.

A site's data arrays: ``patch_<site>`` (positions [L, P], row masks [L, P, B], values [L, P, W])
replaces the activation at those positions; ``delta_<site>`` [L, B, T, W] is added to it (zeros:
the point ``probes.attribution`` differentiates at, so the gradient reaches every site). W is the
site's width: D, or N * H for ``heads`` (the query heads' outputs before ``o``, flattened).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model import kernels


class Hooks:
    """A step's probe setting at trace time: the model calls ``hooks.layer(i)`` per block and
    ``hooks.record`` for the logits. ``positions`` [B, T] are the queries' absolute positions,
    ``live`` [B, T] marks real queries (not padding, not an empty slot)."""

    def __init__(self, plan: Any, data: dict[str, Any], positions: jax.Array, live: jax.Array):
        self.plan, self.data, self.positions, self.live = plan, data, positions, live
        self.capture = plan.capture

    def layer(self, i: int | jax.Array) -> LayerHooks:
        """Block ``i``'s hooks: a Python int (unrolled layers) or the traced index of a scan step
        (scanned layers, ``model.scan``); the interventions' arrays are indexed by it either way."""
        return LayerHooks(self, i)

    def record(self, module: nnx.Module, name: str, value: jax.Array) -> None:
        module.sow(nnx.Intermediate, name, value)


class LayerHooks:
    def __init__(self, hooks: Hooks, layer: int | jax.Array):
        self.hooks, self.index = hooks, layer
        capture = hooks.capture
        # A traced index (one scanned block for every layer) records every layer, stacked [L, ...]:
        # which layers to record is static, the index is not. ``probes.run`` keeps those asked.
        traced = isinstance(layer, jax.Array)
        self.records = capture is not None and (traced or capture.records(layer))
        self.weights = self.records and capture.attention

    def wants(self, site: str) -> bool:
        if not self.records:
            return False
        capture = self.hooks.capture
        return {"attn_out": capture.attention, "mlp_out": capture.mlp, "residual": capture.residual}[site]

    def record(self, module: nnx.Module, name: str, value: jax.Array) -> None:
        self.hooks.record(module, name, value)

    def heads(self, out: jax.Array, module: nnx.Module | None = None) -> jax.Array:
        """Ablation of query heads: ``out`` [B, T, N, H], the heads' outputs before ``o``; with
        ``Capture(heads=True)`` what flows on is recorded as ``heads`` (per-head logit attribution)."""
        if self.hooks.plan.ablate:
            out = self._ablate(out)
        b, t, n, h = out.shape
        out = self._write("heads", out.reshape(b, t, n * h)).reshape(b, t, n, h)
        if module is not None and self.records and self.hooks.capture.heads:
            self.record(module, "heads", out)
        return out

    def _ablate(self, out: jax.Array) -> jax.Array:
        keep = self.hooks.data["keep"][self.index][:, None, :, None]  # [B, 1, N, 1]
        mean = self.hooks.data["mean"][self.index][:, None, :, None]
        live = self.hooks.live[:, :, None, None].astype(out.dtype)
        average = jnp.sum(out * live, axis=(0, 1)) / jnp.maximum(jnp.sum(live), 1)  # [N, H]
        return out * keep.astype(out.dtype) + average * mean.astype(out.dtype)

    def router_logits(self, logits: jax.Array) -> jax.Array:
        """A sparse layer's router logits [B, T, E], the ablated experts' (``probes.Ablate(layer,
        experts=...)``) at -inf: the router then picks among the rest."""
        if not self.hooks.plan.experts:
            return logits
        keep = self.hooks.data["expert_keep"][self.index][:, None, :]  # [B, 1, E]
        return jnp.where(keep, logits, -jnp.inf)

    def routed(self, module: nnx.Module, ids: jax.Array, weights: jax.Array) -> None:
        """With ``Capture(router=True)``: each token's expert ids and weights [B, T, K]."""
        if self.records and self.hooks.capture.router:
            self.record(module, "router_ids", ids)
            self.record(module, "router_weights", weights)

    def site(self, module: nnx.Module, site: str, x: jax.Array) -> jax.Array:
        """Patch (and, on the residual, steer) ``x`` [B, T, D] at ``site``; record what flows on."""
        hooks = self.hooks
        x = self._write(site, x)
        if site == "residual" and hooks.plan.steer:
            x = x + hooks.data["steer"][self.index][:, None, :].astype(x.dtype)
        if site == "residual" and hooks.plan.clamp:
            x = self._clamp(x)
        if self.wants(site):
            self.record(module, site, x)
        return x

    def _write(self, site: str, x: jax.Array) -> jax.Array:
        """``x`` [B, T, W] with the site's patches written in and its ``delta`` added."""
        hooks = self.hooks
        if f"patch_{site}" in hooks.data:
            positions, masks, values = (a[self.index] for a in hooks.data[f"patch_{site}"])  # [P], [P, B], [P, W]
            hit = (hooks.positions[:, :, None] == positions) & masks.T[:, None, :] & (positions >= 0)  # [B, T, P]
            patched = jnp.einsum("BTP,PW->BTW", hit.astype(jnp.float32), values).astype(x.dtype)
            x = jnp.where(jnp.any(hit, axis=-1, keepdims=True), patched, x)
        if f"delta_{site}" in hooks.data:
            x = x + hooks.data[f"delta_{site}"][self.index].astype(x.dtype)
        return x

    def _clamp(self, x: jax.Array) -> jax.Array:
        """``probes.SteerFeature(mode="clamp")``: one SAE feature per row set to its value, what
        the SAE does not explain kept: ``x + (value - f(x)) * decoder row``, f JumpReLU (ReLU: 0 threshold)."""
        c = {name: a[self.index] for name, a in self.hooks.data["clamp"].items()}  # [B, D] or [B]
        pre = jnp.einsum("BTD,BD->BT", x.astype(jnp.float32), c["enc"]) + c["bias"][:, None]
        active = jnp.where(pre > c["threshold"][:, None], jnp.maximum(pre, 0.0), 0.0)
        delta = jnp.where(c["on"][:, None], c["value"][:, None] - active, 0.0)  # [B, T]
        return (x.astype(jnp.float32) + delta[..., None] * c["dec"][:, None, :]).astype(x.dtype)

    def attend(self, q, k, v, visible, dtype, keys: int, softcap=None) -> tuple[jax.Array, jax.Array]:
        """Attention that also returns its weights: q [B, T, K, G, H] (scaled), k, v [B, S, K, H],
        visible [B, T, S] -> (out [B, T, K, G, H], weights [B, N, T, keys], zero past S)."""
        weights = kernels.attention_weights(q, k, visible, softcap)  # [B, T, K, G, S]
        out = jnp.einsum("BTKGS,BSKH->BTKGH", weights.astype(dtype), v)
        b, t, kv, g, s = weights.shape
        weights = jnp.transpose(weights.reshape(b, t, kv * g, s), (0, 2, 1, 3))
        return out, jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, keys - s)))
