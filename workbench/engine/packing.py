"""Packed prefill (``Engine.prefill_concat``): several short prompts in one padded row, one call.

Host side, :func:`pack` lays the prompts end to end: each token gets its prompt's index (its
segment) and its position within its own prompt (restarting at 0), so a prompt's keys, values
and logits are those of a separate prefill. In the model a token attends only to keys of its own
segment and writes its K/V to cache row ``segment`` of an ``[n, S, K, H]`` cache; row ``i`` is
then prompt ``i``'s prefix, batch 1 like any other, and inserts like any other.

    tokens    a0 a1 a2 b0 b1 c0 c1 c2 c3 pad pad ...
    segments   0  0  0  1  1  2  2  2  2   0   0
    positions  0  1  2  0  1  0  1  2  3   S   S    (S: past the cache, the write is dropped)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.checks import check_token_ids
from workbench.engine import steps
from workbench.engine.inputs import bucket
from workbench.engine.sampling import Sampling, sample
from workbench.engine.types import Prefix, ResultTokens
from workbench.model.scan import is_stacked


@dataclasses.dataclass(frozen=True)
class Packed:
    """``n`` prompts laid out in one row of ``P`` tokens (host arrays, int32)."""

    tokens: np.ndarray  # [P]
    positions: np.ndarray  # [P]: within each prompt; padding at the cache length
    segments: np.ndarray  # [P]: the prompt each token belongs to; padding 0
    lengths: np.ndarray  # [n]

    @property
    def last(self) -> np.ndarray:  # [n]: the index in the row of each prompt's last token
        return (np.cumsum(self.lengths) - 1).astype(np.int32)


def pack(
    prompts: Sequence[Sequence[int]], *, pad_id: int, vocab_size: int, max_prefill_length: int, cache_length: int
) -> Packed:
    """The prompts end to end, padded to a bucket; ValueError when they do not fit one row."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (lists of token ids)")
    ids = []
    for index, prompt in enumerate(prompts):
        array = np.asarray(prompt)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"prompt {index} must be a non-empty list of token ids, got shape {array.shape}")
        ids.append(check_token_ids(array, vocab_size, what=f"prompt {index}"))
    lengths = np.array([len(p) for p in ids], np.int32)
    total = int(lengths.sum())
    if total > max_prefill_length:
        raise ValueError(
            f"{len(ids)} prompts of {total} tokens in all do not fit one packed row of max_prefill_length "
            f"({max_prefill_length}) tokens: pack fewer"
        )
    size = bucket(total, max_prefill_length)
    tokens = np.full((size,), pad_id, np.int32)
    positions = np.full((size,), cache_length, np.int32)
    segments = np.zeros((size,), np.int32)
    tokens[:total] = np.concatenate(ids)
    positions[:total] = np.concatenate([np.arange(n) for n in lengths])
    segments[:total] = np.repeat(np.arange(len(ids)), lengths)
    return Packed(tokens, positions, segments, lengths)


def prefill_concat(
    model: steps.CachedModel,
    counts: steps.Counts,
    params,
    rest,
    tokens,
    positions,
    segments,
    last,
    lengths,
    key,
    *,
    sampling: Sampling,
    adapter=None,
) -> list[tuple[Prefix, ResultTokens]]:
    """The packed row [P] through the prefill model; one (prefix, first result) per prompt.
    ``adapter``: -1 on engines with LoRA adapters (packed prompts run on the base model)."""
    counts["prefill_concat"] += 1
    n = lengths.shape[0]
    abstract = nnx.to_pure_dict(model.abstract_cache)
    axis = 1 if is_stacked(abstract) else 0  # the cache rows' axis: 1 under scanned layers, [L, B, ...]
    row = lambda i: (slice(None),) * axis + (slice(i, i + 1),)  # noqa: E731 (prompt i's cache row)
    empty = jax.tree.map(lambda a: jnp.zeros((*a.shape[:axis], n, *a.shape[axis + 1 :]), a.dtype), abstract)
    merged = model.merge(params, empty, rest)
    logits = merged(tokens[None], positions[None], logits_at=last[None], segments=segments[None])[0]  # [n, V]
    first = sample(logits, key, sampling)  # [n]
    cache = nnx.to_pure_dict(nnx.state(merged, nnx.Cache))  # rows [n, S, K, H] ([L, n, ...]): one per prompt
    return [
        (
            Prefix(
                cache=jax.tree.map(lambda c, i=i: c[row(i)], cache),
                length=lengths[i],
                token=first[i],
                logits=logits[i],
                adapter=adapter,
            ),
            steps.first_result(first[i], logits[i][None]),
        )
        for i in range(n)
    ]
