"""Model variants: every cached path equals the uncached forward pass, per family feature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import workbench
from helpers import lively_params
from workbench.model import ModelConfig, RopeScaling
from workbench.model.layers import rope_frequencies

VARIANTS = {
    "gqa-tied": ModelConfig.tiny(),
    "mha-untied": ModelConfig.tiny(num_kv_heads=8, tie_embeddings=False),
    "mqa-qkv-bias": ModelConfig.tiny(num_kv_heads=1, qkv_bias=True),
    "sliding-window": ModelConfig.tiny(sliding_window=5),
    "llama3-rope": ModelConfig.tiny(rope_theta=500_000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_generate_equal_the_uncached_forward(name):
    config = VARIANTS[name]
    engine = workbench.Engine(
        config,
        workbench.make_mesh({"data": 2, "tensor": 4}),
        decode_batch_size=2,
        max_prefill_length=16,
        max_target_length=32,
    )
    params = lively_params(engine, seed=1)
    tokens = np.random.default_rng(2).integers(0, 256, size=12).tolist()
    padded, n = engine.pad(tokens)
    prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    generated, rows = [int(prefix.token)], [np.asarray(prefix.logits)]
    for _ in range(6):  # past the sliding window's reach
        state, result = engine.generate(params, state)
        generated.append(int(result.data[1, 0]))
        rows.append(np.asarray(result.logits[1]))
    full = np.asarray(engine.forward(params, np.array([tokens + generated[:-1]])))[0, n - 1 :]
    assert generated == full.argmax(-1).tolist()
    np.testing.assert_allclose(np.stack(rows), full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_sliding_window_changes_what_is_seen():
    mesh = workbench.make_mesh({"data": 1}, jax.devices()[:1])
    tokens = np.random.default_rng(3).integers(0, 256, size=(1, 12))
    logits = {}
    for window in (None, 4):
        engine = workbench.Engine(
            ModelConfig.tiny(sliding_window=window),
            mesh,
            decode_batch_size=1,
            max_prefill_length=16,
            max_target_length=16,
        )
        logits[window] = np.asarray(engine.forward(lively_params(engine), tokens))[0]
    # Within the window the two models see the same keys; they are different programs, so equal
    # within float rounding rather than bit for bit.
    np.testing.assert_allclose(logits[4][:4], logits[None][:4], rtol=0, atol=1e-5 * np.abs(logits[None]).max())
    assert np.abs(logits[None][4:] - logits[4][4:]).max() > 1e-3


def test_bfloat16_runs_close_to_float32():
    mesh = workbench.make_mesh({"data": 2, "tensor": 4})
    tokens = np.random.default_rng(4).integers(0, 256, size=(2, 10))
    out = {}
    for dtype in ("float32", "bfloat16"):
        engine = workbench.Engine(
            ModelConfig.tiny(dtype=dtype, param_dtype=dtype),
            mesh,
            decode_batch_size=2,
            max_prefill_length=16,
            max_target_length=16,
        )
        params = lively_params(engine)
        assert jax.tree.leaves(params)[0].dtype == jnp.dtype(dtype)
        out[dtype] = np.asarray(engine.forward(params, tokens))
    assert out["bfloat16"].dtype == np.float32
    scale = np.abs(out["float32"]).max()
    assert np.abs(out["bfloat16"] - out["float32"]).max() < 0.1 * scale


def test_llama3_rope_scaling_matches_the_reference_formula():
    # Llama-3 (Meta's reference): low frequencies divided by factor, high kept, smooth in between.
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    base = 1.0 / (500_000.0 ** (np.arange(0, 64, 2) / 64))
    expected = []
    for f in base:
        wavelen = 2 * np.pi / f
        if wavelen < 64 / 4.0:
            expected.append(f)
        elif wavelen > 64 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(rope_frequencies(64, 500_000.0, scaling), expected, rtol=1e-5)


def test_param_count_matches_the_config():
    for config in [*VARIANTS.values(), ModelConfig.llama_56m()]:
        abstract = workbench.Engine(
            config,
            workbench.make_mesh({"data": 1}, jax.devices()[:1]),
            decode_batch_size=1,
            max_prefill_length=8,
            max_target_length=8,
        ).abstract_params
        assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract)) == config.num_params()
    assert 55e6 < ModelConfig.llama_56m().num_params() < 57e6


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"sliding_window": 0}, "sliding_window"),
    ],
)
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**changes)


def test_config_round_trips_through_a_dict():
    config = ModelConfig.llama3_1b()
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig field 'hidden'"):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="unknown preset 'gpt2'"):
        workbench.preset("gpt2")
