"""Fast random init (``model.init``): the model's own initialisers' distributions, drawn on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SHAPE, SMALL, engine_for, pure_numpy
from workbench.engine.compiled import model
from workbench.model import layers
from workbench.model.scan import stack_layers
from workbench.trees import leaf_paths

CONFIG = SMALL.replace(qkv_bias=True, vocab_size=512)  # every kind of leaf: norms, biases, an untied head


@pytest.fixture(scope="module")
def engine(devices):
    return engine_for(CONFIG, {"data": 2, "tensor": 4})


def test_random_params_follow_the_model_initialisers(engine, monkeypatch):
    """Against the model's own initialisers: the model built with every normal draw replaced by
    a marker (``mark`` standard deviations: the real draws would cost a 14 s compile) says which
    leaf is ones, zeros or normal and with what scale; the host draws must agree, leaf by leaf."""
    mark = 10.0
    monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype: jnp.full(shape, mark, dtype))
    truths = leaf_paths(pure_numpy(jax.jit(lambda: nnx.split(model(CONFIG), nnx.Param, ...)[1])()))
    fast = leaf_paths(pure_numpy(engine.load_params(None, seed=0)))
    assert fast.keys() == truths.keys()
    for path, truth in truths.items():
        value = fast[path]
        assert value.shape == truth.shape and value.dtype == truth.dtype, path
        assert np.all(truth == truth.flat[0]), path
        if truth.flat[0] in (0.0, 1.0):  # zeros or ones
            np.testing.assert_array_equal(value, truth, err_msg=path)
        else:  # normal, its standard deviation the marked value over mark
            assert abs(value.std() / (truth.flat[0] / mark) - 1) < 0.1 and abs(value.mean()) < 0.01, path


def test_random_params_are_deterministic_per_seed_on_any_mesh(engine):
    params = pure_numpy(engine.load_params(None, seed=3))
    again = pure_numpy(engine_for(CONFIG, {"data": 1}).load_params(None, seed=3))
    jax.tree.map(np.testing.assert_array_equal, params, again)
    other = pure_numpy(engine.load_params(None, seed=4))
    assert not np.array_equal(params["layers"][0]["attn"]["q"], other["layers"][0]["attn"]["q"])
    assert not np.array_equal(params["layers"][0]["attn"]["q"], params["layers"][1]["attn"]["q"])
    placed = leaf_paths(engine.load_params(None))
    for path, sharding in leaf_paths(engine.param_shardings).items():
        assert placed[path].sharding == sharding, path


def test_random_params_in_bfloat16(devices):
    engine = engine_for(CONFIG.replace(param_dtype="bfloat16"), {"data": 1})
    params = pure_numpy(engine.load_params(None, seed=0))
    q = params["layers"][0]["attn"]["q"]
    assert q.dtype == jnp.bfloat16 and 0.015 < q.astype(np.float32).std() < 0.025


def test_load_params_rejects_a_bad_seed(engine):
    with pytest.raises(TypeError, match="seed must be an int"):
        engine.load_params(None, seed=1.5)


def test_stacked_layers_hold_the_unrolled_draws(engine):
    """A scanned engine's random weights are the unrolled engine's, stacked: the two layouts of
    one seed are the same model."""
    scanned = workbench.Engine(engine.config, engine.mesh, scan_layers=True, **SHAPE)
    expected = stack_layers(pure_numpy(engine.load_params(None, seed=5)))
    jax.tree.map(np.testing.assert_array_equal, pure_numpy(scanned.load_params(None, seed=5)), expected)


def test_param_keys_under_a_trace_are_the_streams_own():
    """``layers._next_key`` (the models' key, cheap under a trace) draws the keys and leaves the
    count that the RNG stream itself does (one jit, as ``nnx.eval_shape`` traces the models)."""

    def draw(next_key):
        rngs = nnx.Rngs(3)
        keys = [jax.random.key_data(next_key(rngs.params)) for _ in range(3)]
        return keys, rngs.params.count[...]

    ours, theirs = jax.jit(lambda: (draw(layers._next_key), draw(lambda stream: stream())))()
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert int(ours[1]) == 3
