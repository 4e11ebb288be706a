"""Sampling strategies: greedy, temperature, top-k and top-p, composable in one frozen dataclass.

A ``Sampling`` is hashable and static to jit: each distinct setting compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from workbench.checks import is_int


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """``temperature == 0`` is greedy (argmax); otherwise logits are divided by the temperature,
    cut to the ``top_k`` most likely tokens (0: no cut), then to the smallest set whose
    probability reaches ``top_p`` (1.0: no cut), and a token is drawn from what is left."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def filtered_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits [..., V] divided by the temperature, with the tokens top-k and top-p drop at -inf:
    what a non-greedy ``sample`` draws from (``probabilities`` is their softmax)."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution [..., V] a non-greedy ``sample`` draws each token from."""
    return jax.nn.softmax(filtered_logits(logits, sampling), axis=-1)


def argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first index of the largest logit), in int32.

    As two plain reductions, a max then the smallest index holding it: XLA:CPU runs argmax's
    paired (value, index) reduction element by element, several times slower over a large
    vocabulary (``docs/speed.md``). Unlike ``jnp.argmax``, a row holding a
    NaN gives index 0 (every ``logit < NaN`` is false).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits < top, logits.shape[-1], index), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Token ids [B] from float32 logits [B, V]; deterministic for a given key."""
    if sampling.greedy:
        return argmax(logits)
    return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(jnp.int32)
