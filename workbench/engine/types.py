"""The typed pytrees that cross the engine API: Prefix, DecodeState, ResultTokens, SlotData.

Caches inside them are plain nested dicts (``nnx.to_pure_dict`` of the model's ``nnx.Cache``
state: ``{"layers": {i: {"attn": {"cache": {"k": [B, S, K, H], "v": ...}}}}}``), so insert and
bulk_insert are tree functions over arrays. A sliding layer's cache is a ring of its window
(``model/ring.py``): ``k``, ``v`` [B, W, K, H] and ``held`` [B, W], the positions its slots hold.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

from workbench.model.scan import is_stacked, layer_slice

Cache = dict[str, Any]


def layer_cache(cache: Cache, layer: int) -> dict[str, Any]:
    """Layer ``layer``'s ``{"k": [B, S, K, H], "v": [B, S, K, H]}`` in a cache dict: the one place
    that spells the path ``layers/<i>/attn/cache`` (the model's module names). The arrays are the
    cache's own, so a snapshot (numpy) can be edited through it. A stacked cache (scanned layers,
    ``layers/attn/cache`` [L, B, S, K, H], or a pattern's stacks, ``model/scan.py``) gives layer
    ``layer``'s slice (a view, in numpy)."""
    if is_stacked(cache):
        return layer_slice(cache["layers"], layer)["attn"]["cache"]
    return cache["layers"][layer]["attn"]["cache"]


@struct.dataclass
class Prefix:
    """The result of prefill: a batch-1 KV cache over ``max_target_length`` positions.

    ``length`` tokens are in the cache (positions ``0 .. length-1``); ``token`` is the first
    generated token, sampled from ``logits`` (float32 [V], the last prompt position's logits).
    """

    cache: Cache  # per layer k, v: [1, S, K, H]
    length: jax.Array  # int32 []
    token: jax.Array  # int32 []
    logits: jax.Array  # float32 [V]
    adapter: jax.Array | None = None  # int32 []: its LoRA adapter (-1: none), on engines with adapters

    def layer_cache(self, layer: int) -> dict[str, Any]:
        """``{"k": [1, S, K, H], "v": ...}`` of one layer."""
        return layer_cache(self.cache, layer)


@struct.dataclass
class DecodeState:
    """Everything generate needs, one row per decode slot.

    ``positions[b]`` is where slot b's next token goes (== tokens in its cache); ``tokens[b]``
    is that next input token; ``lengths[b]`` counts the tokens generated for the slot (the
    prefill's first token included); ``active[b]`` says whether a request holds the slot.
    """

    cache: Cache  # per layer k, v: [B, S, K, H]
    positions: jax.Array  # int32 [B]
    tokens: jax.Array  # int32 [B]
    lengths: jax.Array  # int32 [B]
    active: jax.Array  # bool [B]
    rng: jax.Array  # key, split once per generate step
    adapters: jax.Array | None = None  # int32 [B]: each slot's LoRA adapter (-1: none); engines with adapters

    def layer_cache(self, layer: int) -> dict[str, Any]:
        """``{"k": [B, S, K, H], "v": ...}`` of one layer, every slot."""
        return layer_cache(self.cache, layer)


@struct.dataclass
class SlotData:
    """One slot's share of a ResultTokens (JetStream's layout): tokens [1], valid [1], lengths []."""

    tokens: jax.Array | np.ndarray
    valid: jax.Array | np.ndarray
    lengths: jax.Array | np.ndarray


@struct.dataclass
class ResultTokens:
    """JetStream's result layout: ``data`` int32 [slots, 3] = (token, valid, length) per slot.

    Packed into one array so a step's results reach the host in one copy. ``logits`` (float32
    [slots, V]) are the rows each token was chosen from; they stay on device unless read, and
    ``logprobs(k)`` reduces them there to log-probabilities.
    """

    data: jax.Array  # int32 [slots, 3]
    logits: jax.Array  # float32 [slots, V]
    tokens_idx: tuple[int, int] = struct.field(pytree_node=False, default=(0, 1))
    valid_idx: tuple[int, int] = struct.field(pytree_node=False, default=(1, 2))
    length_idx: tuple[int, int] = struct.field(pytree_node=False, default=(2, 3))
    samples_per_slot: int = struct.field(pytree_node=False, default=1)
    # A ``workbench.probes.Captured`` when the step was asked for probes, else None.
    captured: Any = struct.field(pytree_node=False, default=None)

    def get_result_at_slot(self, slot: int) -> SlotData:
        return SlotData(
            tokens=self.data[slot, self.tokens_idx[0] : self.tokens_idx[1]],
            valid=self.data[slot, self.valid_idx[0] : self.valid_idx[1]],
            lengths=self.data[slot, self.length_idx[0] : self.length_idx[1]][0],
        )

    def logprobs(self, k: int) -> list:
        """Each slot's token as a ``TokenLogprobs`` (``engine/logprobs.py``): its log-probability
        under the model's own distribution (the log-softmax of its ``logits`` row, before any
        temperature or top-k/top-p) and the ``k`` most likely (id, log-probability), best first.
        Reduced on device; an invalid slot's entry is meaningless (check ``valid``)."""
        from workbench.engine.logprobs import check_k, top_logprobs  # it imports this module

        k = check_k(k, self.logits.shape[-1])
        return top_logprobs(self.logits, self.data[:, self.tokens_idx[0]], k)

    def convert_to_numpy(self) -> "ResultTokens":
        """The same result on the host (one transfer of ``data``; logits stay where they are)."""
        return self.replace(data=np.asarray(self.data))
