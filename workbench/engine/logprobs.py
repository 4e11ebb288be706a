"""Log-probabilities of chosen tokens, and the K most likely, from logits rows left on device.

Every step already returns the float32 logits rows its tokens were chosen from (``ResultTokens.
logits`` [n, V], ``Prefix.logits`` [V]); they stay on device unless read. :func:`top_logprobs`
reduces them there, in one small jit per K, to the chosen token's log-probability and the K best
(id, log-probability) pairs: [n, 1 + 2K] numbers cross to the host instead of [n, V], and the
generate step itself is unchanged (no recompile, nothing computed when nobody asks).

A prompt's log-probabilities (:func:`prompt_logprobs`) come from the engine's uncached forward
pass over the whole prompt, right-padded to a power of two (causal: padding changes no earlier
row), reduced on device to log p(token | tokens before it). Not from prefill: prefill returns the
last position's row only, a prompt the prefix cache holds is not prefilled at all, and a prefill
that kept every row would be a second program per bucket for every caller. The forward pass is
one more pass over the prompt, paid only by the requests that ask; it has no chunk limit, so a
prompt of any length up to ``max_target_length`` is scored in one call.

The distribution is the model's: the log-softmax of the raw logits, before temperature, top-k
or top-p (as vLLM reports by default), so a sampled run scores its tokens the way a greedy one
and an evaluation harness would.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from workbench.checks import check_token_ids


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its id, its log-probability, the ``top`` K (id, log-probability)
    pairs, best first (the JSON entry of ``generate --logprobs K``)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]

    def to_json(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "top": [list(pair) for pair in self.top]}


def check_k(k, vocab_size: int, name: str = "logprobs") -> int:
    """K as an int in 1..vocab_size, else a one-line TypeError / ValueError."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int (how many top tokens to report), got {k!r}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"{name} must be in 1..{vocab_size} (the vocabulary), got {k}")
    return int(k)


@functools.partial(jax.jit, static_argnames=("k",))
def _reduce(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [n, V]
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(logp, k)  # best first
    return chosen, ids, values


def top_logprobs(logits: jax.Array, tokens, k: int) -> list[TokenLogprobs]:
    """The :class:`TokenLogprobs` of ``tokens`` [n] under the rows ``logits`` [n, V] (one row [V]
    serves every token: the samples a prefill drew), reduced on device; one host copy."""
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens, jnp.int32).reshape(-1)
    if logits.ndim == 1:
        logits = jnp.broadcast_to(logits, (tokens.shape[0], logits.shape[0]))
    chosen, ids, values = jax.device_get(_reduce(logits, tokens, k))
    return [
        TokenLogprobs(int(t), float(c), [(int(i), float(v)) for i, v in zip(row_ids, row_values)])
        for t, c, row_ids, row_values in zip(np.asarray(tokens), chosen, ids, values)
    ]


@jax.jit
def _prompt_rows(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1, from the forward's logits [B, T, V]: float32 [B, T - 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def prompt_logprobs(engine, params, tokens, *, adapter: str | None = None) -> np.ndarray:
    """float32 [n - 1]: log p(tokens[t] | tokens[:t]) for t = 1 .. n-1 of the token ids ``tokens``
    [n], from the engine's uncached forward pass (``adapter``: a loaded LoRA adapter, None: base)."""
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token ids to score must be a non-empty list, got shape {ids.shape}")
    ids = check_token_ids(ids, engine.config.vocab_size, what="tokens to score")
    if ids.size > engine.max_target_length:
        raise ValueError(
            f"{ids.size} tokens to score exceed the engine's max_target_length ({engine.max_target_length})"
        )
    length = min(max(16, 1 << (ids.size - 1).bit_length()), engine.max_target_length)  # one compile per power of 2
    padded = np.full((1, max(length, ids.size)), engine.config.pad_id, np.int32)
    padded[0, : ids.size] = ids
    # the engine's own compiled forward (its shardings and compiler options, one program with the
    # callers of engine.forward); the logits stay on device and only [T - 1] numbers come back
    logits = engine.forward(params, padded, adapter=adapter)
    return np.asarray(_prompt_rows(logits, jnp.asarray(padded)))[0, : ids.size - 1]
