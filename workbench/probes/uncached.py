"""The uncached forward pass under probes (the oracle of the probed cached steps), and the logit
lens built on it (:func:`unembed`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.checks import check_token_ids
from workbench.probes.interventions import Capture, Patch
from workbench.probes.plan import prepare, run
from workbench.probes.recorded import Captured, captured_from


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, plan, params, rest, tokens, data, adapters):
    model = nnx.merge(graphdef, params, rest, copy=True)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return run(model, plan, data, tokens, positions, jnp.ones(tokens.shape, bool), adapters=adapters)


def forward(
    engine: Any,
    params: Any,
    tokens: Any,
    capture: Capture | None = None,
    interventions: Sequence[Any] | None = None,
    *,
    adapter: str | None = None,
) -> tuple[jax.Array, Captured | None]:
    """The uncached forward pass (``engine.forward``'s oracle) under probes: (logits [B, T, V],
    Captured). ``adapter``: a loaded LoRA adapter applied to every row (None: the base model)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [batch, length], got shape {tokens.shape}")
    plan, data = prepare(capture, interventions, engine.config, tokens.shape[0])
    if plan is None:
        return engine.forward(params, tokens, adapter=adapter), None
    check_token_ids(tokens, engine.config.vocab_size)
    index = engine.adapter_index(adapter)  # checks the name; None on an engine without adapters
    rows = None if adapter is None else jnp.full((tokens.shape[0],), index, jnp.int32)
    arrays = (params, engine.rest, jnp.asarray(tokens, jnp.int32), data, rows)
    logits, raw = _forward(engine.forward_graphdef, plan, *arrays)
    return logits, None if capture is None else captured_from(raw, capture)


def unembed(engine: Any, params: Any, vectors: Any) -> np.ndarray:
    """Float32 logits [R, V] of residual-stream vectors [R, D] through the model's own final norm
    and unembedding (the logit lens): a one-token forward per row whose last block's output is
    patched to the vector, so no second copy of the model's tail exists to drift from it."""
    vectors = np.asarray(vectors, np.float32)
    last = engine.config.num_layers - 1
    patches = [Patch(last, "residual", [0], v[None], slots=[r]) for r, v in enumerate(vectors)]
    logits, _ = forward(engine, params, np.zeros((len(vectors), 1), np.int32), None, patches)
    return np.asarray(logits)[:, 0]
