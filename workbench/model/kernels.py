"""Attention kernels: the plain einsum reference, then the variants tuned for XLA:CPU.

Every kernel takes q ``[B, T, K, G, H]`` (scaled; the G query heads of each kv head), k and v
``[B, S, K, H]``, visible ``[B, T, S]`` (bool) and returns ``[B, T, K, G, H]`` in ``dtype``.
Scores and softmax are float32; ``softcap`` (Gemma 2) puts the scores through
``softcap * tanh(scores / softcap)`` before the mask.

The model calls one function, :func:`attention`, and a kernel set picks what runs:

================  =============================================================================
``"reference"``   :func:`reference` for every shape: two einsums, softmax attention as written
                  on paper. The model's default, and the truth every variant must equal
                  (``tests/test_kernels.py``).
``"xla_cpu"``     XLA:CPU tuning: layouts that XLA:CPU runs faster than the reference's einsums
                  (``docs/speed.md``): :func:`stacked` for prefill, and for decode (one query per
                  sequence) :func:`block_diagonal` over a whole cache or :func:`chunked_prefix`
                  over a prefix of a longer one (read in place, chunk by chunk).
================  =============================================================================

Which set an engine runs is chosen per platform in :mod:`workbench.engine.tuning`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from workbench.model.quant import cache_rows

KERNELS = ("reference", "xla_cpu")
MASKED = -1e30  # finite, so a row with nothing visible (a padding query) gives no NaN


def capped(scores: jax.Array, softcap: float | None) -> jax.Array:
    """Float32 scores soft-capped to (-softcap, softcap); unchanged (the same program) without one."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def attention_weights(q: jax.Array, k: jax.Array, visible: jax.Array, softcap: float | None = None) -> jax.Array:
    """The float32 attention weights [B, T, K, G, S] of ``reference`` (probes record them)."""
    scores = capped(jnp.einsum("BTKGH,BSKH->BTKGS", q, k).astype(jnp.float32), softcap)
    scores = jnp.where(visible[:, :, None, None], scores, MASKED)
    return jax.nn.softmax(scores, axis=-1)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, dtype, softcap=None) -> jax.Array:
    """Softmax attention as written on paper: the reference every variant must equal."""
    return jnp.einsum("BTKGS,BSKH->BTKGH", attention_weights(q, k, visible, softcap).astype(dtype), v)


def attention(
    q, k, v, visible, dtype, *, kernels: str = "reference", sliced: bool = False, softcap: float | None = None
) -> jax.Array:
    """Softmax attention by the kernel set ``kernels``; ``sliced``: k and v are a prefix sliced
    from a longer cache (the XLA:CPU set reads those differently)."""
    return choose(kernels, q.shape[1], sliced)(q, k, v, visible, dtype, softcap)


def choose(kernels: str, queries: int, sliced: bool) -> Callable[..., jax.Array]:
    """The kernel of set ``kernels`` for ``queries`` query positions per sequence; ``sliced``:
    k and v are a prefix sliced from a longer cache."""
    if kernels == "reference":
        return reference
    if kernels != "xla_cpu":
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    # XLA:CPU: a long prompt runs faster stacked; a decode step over a whole cache faster
    # block-diagonal, over a prefix of a longer one in chunks (a dot would copy the whole prefix).
    # The measurements behind each choice are in docs/speed.md.
    if queries > 1:
        return stacked
    return chunked_prefix if sliced else block_diagonal


def reads_prefix(kernels: str, queries: int) -> bool:
    """Whether the kernel of set ``kernels`` for ``queries`` query positions, given a sliced
    prefix, reads it from the whole cache itself (:func:`chunked_prefix`): then it is handed
    the whole cache, unsliced, and ``visible`` says how many keys."""
    return choose(kernels, queries, sliced=True) is chunked_prefix


# ---- XLA:CPU tuning: the same attention in layouts XLA:CPU runs faster ---------------------------
def stacked(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, dtype, softcap=None) -> jax.Array:
    """Batched over (B, K) with the G query heads of a kv head stacked on T: one tall product per
    kv head. Left to ``reference``'s einsums, XLA:CPU picks slower layouts for long prompts."""
    b, t, kv, g, h = q.shape
    s = k.shape[1]
    q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
    scores = capped(jnp.einsum("BKMH,BKSH->BKMS", q, k).reshape(b, kv, g, t, s).astype(jnp.float32), softcap)
    scores = jnp.where(visible[:, None, None], scores, MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("BKMS,BKSH->BKMH", weights, v).reshape(b, kv, g, t, h)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]


def block_diagonal(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, dtype, softcap=None) -> jax.Array:
    """Decode (T == 1) over a whole cache.

    As einsums batched over (B, K), XLA would copy the cache into a [B, K, S, H] transpose on
    every step. Here both products contract the cache's contiguous (K, H) minor dims instead,
    against a block-diagonal query ([K*H, K*G], zero where the kv heads differ): K times the
    multiply-adds of a small product, but one pass over the cache and no copy of it.
    """
    q, visible = q[:, 0], visible[:, 0]  # [B, K, G, H], [B, S]
    b, s, kv, h = k.shape
    q_blocks = _query_blocks(q)
    scores = jnp.einsum("BSX,BXY->BSY", k.reshape(b, s, kv * h), q_blocks).astype(jnp.float32)  # [B, S, K*G]
    scores = capped(scores, softcap)
    scores = jnp.where(visible[:, :, None], scores, MASKED)
    weights = jax.nn.softmax(scores, axis=1).astype(dtype)
    return _own_blocks(jnp.einsum("BSY,BSX->BYX", weights, v.reshape(b, s, kv * h)), q)


def _query_blocks(q: jax.Array) -> jax.Array:
    """The block-diagonal query [B, K*H, K*G] of q [B, K, G, H]: kv head j's G queries in rows
    j*H..(j+1)*H and columns j*G..(j+1)*G, zero elsewhere. Elementwise products with the
    identity, not einsums: a dot would pick its own output layout, and XLA would then re-lay-out
    the o projection's weights on every step."""
    b, kv, g, h = q.shape
    eye = jnp.eye(kv, dtype=q.dtype)
    return (jnp.swapaxes(q, 2, 3)[:, :, :, None, :] * eye[:, None, :, None]).reshape(b, kv * h, kv * g)


def _own_blocks(out: jax.Array, q: jax.Array) -> jax.Array:
    """Of a block product ``out`` [B, K*G, K*H] of :func:`_query_blocks` ``(q)``, the blocks
    whose kv heads match: [B, 1, K, G, H]."""
    b, kv, g, h = q.shape
    eye = jnp.eye(kv, dtype=q.dtype)
    return jnp.sum(out.reshape(b, kv, g, kv, h) * eye[:, None, :, None], axis=3)[:, None]


CHUNK = 256  # keys per step of chunked_prefix's loop


def chunked_prefix(q: jax.Array, k, v, visible: jax.Array, dtype, softcap=None) -> jax.Array:
    """Decode (T == 1) over the first ``n = visible.shape[-1]`` keys of a cache that may hold more
    (``k``, ``v`` [B, S >= n, K, H], passed whole; an int8 cache as ``quant.Int8Rows``):
    :func:`block_diagonal`'s products over chunks of :data:`CHUNK` keys, taken by a loop.

    Slicing the prefix first would make XLA:CPU copy all n keys into a fresh buffer for the dot
    on every step (on these VMs fresh pages fault, and the copy cost twice the dot); a loop's
    dynamic slice copies one chunk into the same small buffer each turn, hot in the cache (an int8
    chunk dequantized there: the n keys are never converted into a buffer of their own).
    Scores of all n keys are kept (float32, [B, n, K*G]) for one exact softmax, then a second
    loop sums the values' chunks by their weights.
    """
    q, visible = q[:, 0], visible[:, 0]  # [B, K, G, H], [B, n]
    b, _, kv, h = k.shape
    n, g = visible.shape[-1], q.shape[2]
    chunk = min(CHUNK, n)
    full, tail = divmod(n, chunk)
    q_blocks = _query_blocks(q)

    def keys(cache, start, size: int) -> jax.Array:  # [B, size, K*H]
        return cache_rows(cache, start, size, dtype).reshape(b, size, kv * h)

    def score(start, size: int) -> jax.Array:  # [B, size, K*G]
        return jnp.einsum("BSX,BXY->BSY", keys(k, start, size), q_blocks).astype(jnp.float32)

    def scored(i, scores):
        return jax.lax.dynamic_update_slice_in_dim(scores, score(i * chunk, chunk), i * chunk, axis=1)

    scores = jax.lax.fori_loop(0, full, scored, jnp.zeros((b, n, kv * g), jnp.float32))
    if tail:
        scores = jax.lax.dynamic_update_slice_in_dim(scores, score(full * chunk, tail), full * chunk, axis=1)
    scores = jnp.where(visible[:, :, None], capped(scores, softcap), MASKED)
    weights = jax.nn.softmax(scores, axis=1).astype(dtype)

    def mix(start, size: int) -> jax.Array:  # [B, K*G, K*H]
        part = jax.lax.dynamic_slice_in_dim(weights, start, size, axis=1)
        return jnp.einsum("BSY,BSX->BYX", part, keys(v, start, size))

    out = jax.lax.fori_loop(0, full, lambda i, acc: acc + mix(i * chunk, chunk), jnp.zeros((b, kv * g, kv * h), dtype))
    if tail:
        out = out + mix(full * chunk, tail)
    return _own_blocks(out, q)


VARIANTS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference,
    "stacked": stacked,
    "block_diagonal": block_diagonal,
    "chunked_prefix": chunked_prefix,
}
