"""``probes.attribution_patching``: a first-order estimate of every patch of a
:func:`~workbench.probes.patching_sweep` from one backward pass.

Patching an activation ``a`` of the clean run to its corrupt value ``a'`` changes the metric by
about ``(a' - a) . dmetric/da``, the gradient taken on the clean run. One ``jax.vjp`` through the
uncached forward under probes gives that gradient at every site, layer and position at once:
each site gets a zero ``delta_<site>`` [L, 1, T, W] added to it (:mod:`workbench.model.hooks`),
and the metric's cotangent with respect to those zeros is the gradient. The estimate of a head
is the sum over the patched positions of its slice. It is exact for a metric linear in the
activation and drifts as the downstream path bends (attention's softmax, the norms, the MLP):
compare it with the exact sweep (``Sweep.correlation``) before trusting it on a new model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workbench.probes.interventions import SITES
from workbench.probes.plan import Plan, site_width
from workbench.probes.sweep import Sweep, activations, check_inputs, scalar
from workbench.probes.uncached import _forward


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gradients(graphdef, plan, metric, params, rest, tokens, deltas):
    """d metric(row 0's logits) / d deltas: one forward and one backward pass."""

    def value(deltas):
        logits, _ = _forward(graphdef, plan, params, rest, tokens, deltas, None)
        return metric(logits[0].astype(jnp.float32))

    out, pullback = jax.vjp(value, deltas)
    return pullback(jnp.ones_like(out))[0]


def gradients(engine: Any, params: Any, tokens: np.ndarray, metric: Callable) -> dict[str, np.ndarray]:
    """The gradient of ``metric`` with respect to every site, {site: [L, T, W]}, at every layer
    and position of the run of ``tokens`` [T] (``heads``: W = N * H, the heads' outputs
    flattened). Every site at once: one compiled program per metric serves every sweep."""
    config = engine.config
    L, T = config.num_layers, len(tokens)  # noqa: N806
    deltas = {f"delta_{site}": jnp.zeros((L, 1, T, site_width(site, config)), jnp.float32) for site in SITES}
    rows = jnp.asarray(tokens, jnp.int32)[None]
    grads = _gradients(engine.forward_graphdef, Plan(), metric, params, engine.rest, rows, deltas)
    return {site: np.asarray(grads[f"delta_{site}"])[:, 0] for site in SITES}


def attribution_patching(
    engine: Any,
    params: Any,
    clean: str | Sequence[int],
    corrupt: str | Sequence[int],
    metric: Callable[[Any], Any],
    over: str = "layer_position",
    *,
    site: str = "residual",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Sweep:
    """The estimate of :func:`~workbench.probes.patching_sweep` with the same arguments
    (``metric`` must be differentiable with JAX): ``clean metric + (corrupt - clean) . gradient``
    per cell, a :class:`Sweep` of ``kind="attribution"``."""
    inputs = check_inputs(engine, clean, corrupt, over, site, layers, positions)
    logits, acts = activations(engine, params, inputs)
    base, corrupted = scalar(metric, logits[0]), scalar(metric, logits[1])
    grad = gradients(engine, params, inputs.clean, metric)[inputs.site]
    T, positions = len(inputs.clean), list(inputs.positions)  # noqa: N806
    table = np.zeros((len(inputs.layers), len(inputs.columns)))
    for i, layer in enumerate(inputs.layers):
        change = (acts[layer][1] - acts[layer][0]).reshape(T, -1).astype(np.float64)  # corrupt - clean [T, W]
        along = change * grad[layer]
        if inputs.over == "layer_position":
            table[i] = along[positions].sum(-1)
        else:
            heads = along.reshape(T, engine.config.num_heads, -1)
            table[i] = heads[positions].sum((0, 2))
    return Sweep(base + table, inputs.over, inputs.site, inputs.layers, inputs.columns, inputs.labels, base,
                 corrupted, kind="attribution")  # fmt: skip
