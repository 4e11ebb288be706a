"""Every attention variant equals the plain einsum reference (``model.kernels``), in float32 and
bfloat16, over whole caches and sliced prefixes, with padding queries and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import lively_params
from workbench.model import kernels, quant

B, S, K, G, H = 3, 40, 2, 3, 8
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def inputs(t: int, dtype: str, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, t, K, G, H)).astype(dtype) * H**-0.5
    k = jax.random.normal(keys[1], (B, S, K, H)).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, H)).astype(dtype)
    # row 0 ends at the last position, row 1 early, row 2 is padding (past the cache)
    query_positions = jnp.array([[S - t + i for i in range(t)], [5 + i for i in range(t)], [S + 1] * t])
    visible = jnp.arange(S)[None, None, :] <= query_positions[:, :, None]
    visible &= jnp.arange(S)[None, None, :] > query_positions[:, :, None] - 24  # a window
    return q, k, v, visible


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,queries", [("stacked", 7), ("stacked", 1), ("block_diagonal", 1), ("chunked_prefix", 1)])
def test_every_variant_equals_the_reference(name, queries, dtype):
    q, k, v, visible = inputs(queries, dtype)
    want = jax.jit(kernels.reference, static_argnums=4)(
        q, k, v, visible, jnp.dtype(dtype)
    )  # one compile, not an op's each
    got = jax.jit(kernels.VARIANTS[name], static_argnums=4)(q, k, v, visible, jnp.dtype(dtype))
    assert got.shape == want.shape == (B, queries, K, G, H) and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
# chunks of 8: four; three and a tail; a tail alone. An int8 cache (three and a tail): dequantized chunk by chunk
@pytest.mark.parametrize("prefix,cache", [(32, "float"), (31, "float"), (7, "float"), (31, "int8")])
def test_chunked_prefix_reads_the_prefix_of_a_longer_cache(prefix, cache, dtype, monkeypatch):
    """Given the whole cache and ``visible`` over its first keys, the chunked kernel equals the
    reference over those keys alone, whatever lies past them (here: keys ten times larger)."""
    monkeypatch.setattr(kernels, "CHUNK", 8)
    q, k, v, visible = inputs(1, dtype)
    loud = jnp.arange(S)[None, :, None, None] >= prefix  # what the kernel must not read
    k, v = jnp.where(loud, 10 * k, k), jnp.where(loud, 10 * v, v)
    if cache == "int8":  # the reference reads the same rows, dequantized as the cache defines them
        k, v = quant.Int8Rows(*quant.quantize_rows(k)), quant.Int8Rows(*quant.quantize_rows(v))
        prefix_k, prefix_v = (quant.cache_prefix(x, prefix, jnp.dtype(dtype)) for x in (k, v))
    else:
        prefix_k, prefix_v = k[:, :prefix], v[:, :prefix]
    want = jax.jit(kernels.reference, static_argnums=4)(q, prefix_k, prefix_v, visible[..., :prefix], jnp.dtype(dtype))
    got = jax.jit(kernels.chunked_prefix, static_argnums=4)(q, k, v, visible[..., :prefix], jnp.dtype(dtype))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOLERANCE[dtype])


def test_the_switch_picks_a_variant_per_shape():
    assert kernels.choose("reference", 1, sliced=True) is kernels.reference
    assert kernels.choose("xla_cpu", 5, sliced=False) is kernels.stacked
    assert kernels.choose("xla_cpu", 1, sliced=False) is kernels.block_diagonal
    assert kernels.choose("xla_cpu", 1, sliced=True) is kernels.chunked_prefix
    assert kernels.reads_prefix("xla_cpu", 1) and not kernels.reads_prefix("xla_cpu", 5)
    assert not kernels.reads_prefix("reference", 1)
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.choose("gpu", 1, sliced=False)


def test_a_reference_model_gives_the_tuned_models_logits(engine):
    """The whole model with the reference kernels (its default) against the XLA:CPU ones, cached
    and uncached."""
    params = lively_params(engine)
    tokens = np.random.default_rng(0).integers(0, engine.config.vocab_size, size=(2, 20))

    def logits(kind: str):
        with nnx.use_eager_sharding(False):
            # a cache of 200: key buckets 128 and 200, so decode reads a sliced prefix
            model = workbench.Transformer(engine.config, rngs=nnx.Rngs(0), cache=(2, 200), attention_kernels=kind)
        nnx.update(model, jax.device_get(params))
        forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions))  # compiled: eager is slow
        positions = np.broadcast_to(np.arange(20), (2, 20))
        prompt = forward(model, tokens[:, :19], positions[:, :19])
        step = forward(model, tokens[:, 19:], positions[:, 19:])  # one query per row against the cache
        return np.asarray(prompt), np.asarray(step)

    for want, got in zip(logits("reference"), logits("xla_cpu")):
        np.testing.assert_allclose(got, want, atol=1e-4)
