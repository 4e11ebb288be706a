"""Host-side input handling for the engine: padding prompts to buckets, checking slots and ids.

Kept apart from the jitted steps (as gemma keeps strings and padding apart from its sampling
loop): everything here runs in numpy, before any device work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.checks import check_int, check_token_ids
from workbench.engine.types import DecodeState, Prefix

MIN_BUCKET = 16


def bucket(length: int, max_prefill_length: int) -> int:
    """The padded length for a prompt (chunk) of ``length`` tokens: a power of two >= 16, at most
    ``max_prefill_length`` -- so prefill compiles once per bucket, a handful in all."""
    if length < 1 or length > max_prefill_length:
        raise ValueError(f"prompt length {length} is outside 1..max_prefill_length ({max_prefill_length})")
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_prefill_length)


def pad(tokens: Sequence[int] | np.ndarray, pad_id: int, max_prefill_length: int) -> tuple[np.ndarray, int]:
    """(padded int32 tokens of bucket length, true length), padded with ``pad_id``."""
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    padded = np.full((bucket(len(tokens), max_prefill_length),), pad_id, np.int32)
    padded[: len(tokens)] = tokens
    return padded, len(tokens)


def check_slot(slot: Any, slots: int) -> int:
    slot = check_int("slot", slot)
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is out of range: the engine has slots 0..{slots - 1}")
    return slot


def check_decode_state(decode_state: Any) -> None:
    if not isinstance(decode_state, DecodeState):
        raise TypeError(f"decode_state must be a DecodeState, got {type(decode_state).__name__}")


def check_tokens(padded_tokens: Any, vocab_size: int, max_length: int | None) -> np.ndarray:
    """``padded_tokens`` as int32 [P]: integer ids in the vocabulary, at most ``max_length``."""
    tokens = np.asarray(padded_tokens)
    if tokens.dtype.kind in "iu" and tokens.ndim != 1:
        raise ValueError(f"padded_tokens must be 1-D [padded_length], got shape {tokens.shape}")
    tokens = check_token_ids(tokens, vocab_size, what="padded_tokens")
    if tokens.shape[0] == 0:
        raise ValueError("padded_tokens is empty")
    if max_length is not None and tokens.shape[0] > max_length:
        raise ValueError(
            f"padded prompt of {tokens.shape[0]} tokens exceeds max_prefill_length ({max_length}); "
            "prefill longer prompts in chunks through existing_prefix"
        )
    return tokens


def check_token_rows(tokens: Any, vocab_size: int) -> np.ndarray:
    """``tokens`` as int32 [B, T]: the input of an uncached forward pass, ids in the vocabulary."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [batch, length], got shape {tokens.shape}")
    return check_token_ids(tokens, vocab_size, what="tokens")


def prefix_start(existing_prefix: Any, true_length: int, max_target_length: int) -> int:
    """Where a prefill chunk starts: 0, or the length of ``existing_prefix`` (a Prefix of one
    sample) -- checked, with ``true_length`` more tokens, against ``max_target_length``."""
    if existing_prefix is None:
        start = 0
    elif isinstance(existing_prefix, Prefix):
        if existing_prefix.token.ndim:
            raise ValueError("existing_prefix holds several samples (prefill_multisampling): it cannot be extended")
        start = int(existing_prefix.length)
    else:
        raise TypeError(f"existing_prefix must be a Prefix from prefill, got {type(existing_prefix).__name__}")
    if start + true_length > max_target_length:
        raise ValueError(f"prompt of {start + true_length} tokens exceeds max_target_length ({max_target_length})")
    return start


def check_insert(prefix: Any, decode_state: Any, slots: Sequence[int], num_slots: int) -> list[int]:
    """The slots of a ``bulk_insert``, checked: distinct, in range, one per sample of ``prefix``."""
    if not isinstance(prefix, Prefix):
        raise TypeError(f"prefix must be a Prefix from prefill, got {type(prefix).__name__}")
    check_decode_state(decode_state)
    slots = [check_slot(s, num_slots) for s in slots]
    if not slots or len(set(slots)) != len(slots):
        raise ValueError(f"slots must be a non-empty list of distinct slots, got {slots}")
    if prefix.token.ndim and len(slots) != prefix.token.shape[0]:
        raise ValueError(f"the prefix holds {prefix.token.shape[0]} samples: give as many slots, got {len(slots)}")
    return slots


def check_num_samples(num_samples: Any, num_slots: int) -> int:
    """``num_samples`` of a ``prefill_multisampling``: a positive int, at most one per decode slot."""
    num_samples = check_int("num_samples", num_samples, positive=True)
    if num_samples > num_slots:
        raise ValueError(f"num_samples ({num_samples}) exceeds the engine's {num_slots} decode slots")
    return num_samples
