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
                  sequence) :func:`block_diagonal` over a whole cache or :func:`sliced_products`
                  over a prefix sliced from a longer one.
================  =============================================================================

Which set an engine runs is chosen per platform in :mod:`workbench.engine.tuning`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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
    # XLA:CPU: a long prompt runs faster stacked; a decode step over a sliced prefix faster as
    # products and sums (a dot would copy the slice), over a whole cache faster block-diagonal.
    # The measurements behind each choice are in docs/speed.md.
    if queries > 1:
        return stacked
    return sliced_products if sliced else block_diagonal


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
    g = q.shape[2]
    # Elementwise products with the identity, not einsums: a dot would pick its own output
    # layout, and XLA would then re-lay-out the o projection's weights on every step.
    eye = jnp.eye(kv, dtype=q.dtype)
    q_blocks = jnp.swapaxes(q, 2, 3)[:, :, :, None, :] * eye[:, None, :, None]  # [B, K, H, J, G]
    q_blocks = q_blocks.reshape(b, kv * h, kv * g)
    scores = jnp.einsum("BSX,BXY->BSY", k.reshape(b, s, kv * h), q_blocks).astype(jnp.float32)  # [B, S, K*G]
    scores = capped(scores, softcap)
    scores = jnp.where(visible[:, :, None], scores, MASKED)
    weights = jax.nn.softmax(scores, axis=1).astype(dtype)
    out = jnp.einsum("BSY,BSX->BYX", weights, v.reshape(b, s, kv * h)).reshape(b, kv, g, kv, h)
    return jnp.sum(out * eye[:, None, :, None], axis=3)[:, None]  # the blocks whose kv heads match


def sliced_products(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, dtype, softcap=None) -> jax.Array:
    """Decode (T == 1) over keys sliced from a longer cache, as products and sums, no dot.

    A dot needs its operands in buffers of their own, so feeding it a cache prefix costs a copy
    of the prefix per step; these reductions fuse with the slice and read the cache in place.
    Over a whole cache (no slice to fuse with) :func:`block_diagonal` is the faster one.
    """
    q, visible = q[:, 0], visible[:, 0]
    scores = jnp.sum(q[:, None] * k[:, :, :, None, :], axis=-1).astype(jnp.float32)  # [B, S, K, G]
    scores = capped(scores, softcap)
    scores = jnp.where(visible[:, :, None, None], scores, MASKED)
    weights = jax.nn.softmax(scores, axis=1).astype(dtype)
    return jnp.sum(weights[..., None] * v[:, :, :, None, :], axis=1)[:, None]  # [B, 1, K, G, H]


VARIANTS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference,
    "stacked": stacked,
    "block_diagonal": block_diagonal,
    "sliced_products": sliced_products,
}
