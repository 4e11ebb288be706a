"""Multisampling: one prefill, ``num_samples`` first tokens drawn independently from its logits.

The prompt is prefilled once; its prefix carries one first token per sample (``token`` [n]),
and ``bulk_insert(prefix, state, slots)`` with ``len(slots) == n`` gives slot ``slots[i]`` the
i-th sample over a shared copy of the prompt's cache. From there each slot samples on its own.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp

from workbench.engine import steps
from workbench.engine.sampling import GREEDY, Sampling, sample
from workbench.engine.types import Prefix, ResultTokens


def prefill_multisampling(
    model: steps.CachedModel, counts: steps.Counts, *inputs, sampling: Sampling, num_samples: int, adapter=None
) -> tuple[Prefix, ResultTokens]:
    """``steps.prefill``'s prefix with ``num_samples`` first tokens: ``token`` [n], ``data`` [n, 3].

    ``inputs``: those of ``steps.prefill`` (params, rest, cache, tokens, start, true_length, key).
    """
    counts["prefill_multisampling"] += 1
    # The plain prefill's own first token is unused, so XLA drops its argmax.
    prefix, _, _ = steps.prefill(model, collections.Counter(), *inputs, sampling=GREEDY, adapter=adapter)
    rows = jnp.broadcast_to(prefix.logits, (num_samples, prefix.logits.shape[0]))  # [n, V]
    first = sample(rows, inputs[-1], sampling)  # inputs[-1]: the key. [n]: each row drawn independently
    return prefix.replace(token=first), steps.first_result(first, rows)
