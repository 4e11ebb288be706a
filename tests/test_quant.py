"""Quantized weights and the int8 KV cache (``workbench.model.quant``), against independent truths:
a float32 forward over the dequantized weights (w8, w4), a numpy statement of the quantize-multiply-
scale arithmetic (w8a8), the uncached float forward (int8 cache), and the default model's
held-out loss in float32 (accuracy)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import workbench
from helpers import SHAPE, SMALL, assert_close, engine_for, lively_arrays, prefill, prompt, write_hf
from workbench import checkpoints, train, trees
from workbench.checkpoints import hf
from workbench.cli import main
from workbench.engine import steps
from workbench.model import quant


def ids(length, seed):  # token ids of SMALL's vocabulary
    return [t % SMALL.vocab_size for t in prompt(length, seed)]


def quantized_engine(config, mesh=None):
    return engine_for(config, mesh or {"data": 1, "tensor": 2})


@pytest.fixture(scope="module")
def float_arrays():
    return lively_arrays(engine_for(SMALL, {"data": 1}))


@pytest.fixture(scope="module")
def reference():
    """The float32 engine of SMALL: its forward over TOKENS compiles once for the module."""
    return quantized_engine(SMALL)


MATRICES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
TOKENS = np.asarray([[t % SMALL.vocab_size for t in prompt(12, seed)] for seed in (0, 1)])


def quantize(pure, mode, engine):
    copy = jax.tree.map(lambda x: x, pure)
    return engine.load_params(quant.quantize_params(copy, mode))


@pytest.mark.parametrize("mode", ["w8", "w4"])
def test_weight_only_modes_equal_a_float_forward_over_their_dequantized_weights(float_arrays, reference, mode):
    """w8 and w4 convert their integer weights before a float product: the float32 model over the
    dequantized weights (``quant.dequantize_params``) computes the same logits, up to the order of
    the scale's multiply. w4 on a model whose contracting sizes the group (32) divides; its
    vocabulary projection stays int8 (``quant.RULES``)."""
    if mode == "w4":
        config = SMALL.replace(mlp_dim=64)
        reference = quantized_engine(config)
        float_arrays = lively_arrays(engine_for(config, {"data": 1}))
    else:
        config = SMALL
    engine = quantized_engine(config.replace(quantize=mode))
    params = quantize(float_arrays, mode, engine)
    leaves = trees.leaf_paths(params)
    storage = {"w8": jnp.int8, "w4": jnp.int4}[mode]
    assert {leaves[f"layers/{i}/{m}/values"].dtype for i in range(2) for m in MATRICES} == {np.dtype(storage)}
    assert leaves["embed/embedding/values"].dtype == jnp.int8 and leaves["embed/embedding/scale"].dtype == jnp.float32
    assert not any(p.endswith(m) for p in leaves for m in MATRICES), "a weight left in float"
    if mode == "w4":  # one scale per group of 32 input rows: mlp/down contracts 64 rows, so 2 groups
        assert leaves["layers/0/mlp/down/scale"].shape == (2, 32)
    expected = reference.forward(reference.load_params(quant.dequantize_params(params)), TOKENS)
    assert_close(engine.forward(params, TOKENS), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "spec, w_shape, contract, shape",
    [("BTD,DNH->BTNH", (32, 4, 8), (0,), None), ("BTX,XD->BTD", (4, 8, 32), (0, 1), (32, -1)),
     ("BTD,VD->BTV", (96, 32), (1,), None)],
)  # fmt: skip
def test_w8a8_equals_numpy_quantize_multiply_scale(spec, w_shape, contract, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    with nnx.use_eager_sharding(False):
        weight = quant.QuantizedWeight(nnx.Param(jnp.asarray(w), out_sharding=(None,) * w.ndim), contract, "w8a8")
    got = np.asarray(quant.einsum(spec, jnp.asarray(x), weight, jnp.float32, shape=shape))
    values = np.asarray(weight.values[...]).astype(np.int64)
    w_scale = np.asarray(weight.scale[...])[0]  # per output channel
    if shape is not None:
        values = values.reshape(shape)
    # numpy: per-token int8 activations, an integer product, then both scales in float
    x_scale = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / 127
    xq = np.round(x / x_scale).astype(np.int64)
    acc = np.einsum(spec, xq, values)
    out_letters = spec.split("->")[1]
    w_letters = spec.split("->")[0].split(",")[1]
    kept = [c for c in w_letters if c in out_letters]
    w_scale = w_scale.reshape([w_scale.shape[kept.index(c)] if c in kept else 1 for c in out_letters])
    expected = acc * x_scale.reshape(x_scale.shape[:2] + (1,) * (acc.ndim - 2)) * w_scale
    assert_close(got, expected, rtol=1e-6)
    # the weight's own quantization: values within the int8 range, scale = max |w| / 127 per channel
    assert np.abs(values).max() == 127
    assert_close(quant.dequantize(weight.values[...], weight.scale[...], contract), w, rtol=1 / 254)


def test_bad_modes_are_one_line_errors():
    with pytest.raises(ValueError, match="quantize must be one of none, w8, w8a8, w4; got 'int3'"):
        SMALL.replace(quantize="int3")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8; got 'fp8'"):
        workbench.load(config=SMALL, kv_cache_dtype="fp8")
    # SMALL's MLP width 48 is no multiple of the w4 group (32)
    with pytest.raises(ValueError, match="w4 needs the group size 32 to divide the contracting size 48"):
        quantized_engine(SMALL.replace(quantize="w4"))


@pytest.mark.parametrize(
    "args, message",
    [(["--quantize", "w2"], "error: argument --quantize: invalid choice: 'w2'"),
     (["--kv-cache-dtype", "int4"], "error: argument --kv-cache-dtype: invalid choice: 'int4'")],
)  # fmt: skip
def test_cli_rejects_an_unknown_mode(capsys, args, message):
    assert main(["generate", *args, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_int8_kv_cache_follows_the_uncached_forward(float_arrays):
    # 160 positions: key buckets 128 and 160, so attention reads (and dequantizes) a sliced prefix
    mesh = workbench.make_mesh({"data": 1, "tensor": 2})
    engine = workbench.Engine(SMALL.replace(kv_cache_dtype="int8"), mesh, **dict(SHAPE, max_target_length=160))
    params = engine.load_params(float_arrays)
    tokens = ids(12, 3)
    prefix, first = prefill(engine, params, tokens)
    cache = trees.leaf_paths(prefix.cache)
    assert cache["layers/0/attn/cache/k"].dtype == jnp.int8
    assert cache["layers/0/attn/cache/k_scale"].shape == (1, 160, 2)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    state, result = engine.generate(params, state)
    oracle = engine.forward(params, np.asarray([tokens + [int(first.data[0, 0])]]))[0]
    # int8 keys and values (one scale per position and kv head) move the logits by a few percent
    # (measured 1.6% and 2.0% here, with this CPU's vectors and under SSE4_2)
    assert_close(prefix.logits, oracle[len(tokens) - 1], rtol=0.05)
    assert_close(result.logits[1], oracle[len(tokens)], rtol=0.05)
    # packed prompts (prefill_concat) write int8 rows too: layer 0's equal the prompt's prefilled
    # alone (later layers differ by the int8 noise: packed prompts attend their float keys)
    packed, _ = engine.prefill_concat(params=params, prompts=[ids(4, 4), tokens])[1]
    for name, leaf in trees.leaf_paths(packed.cache).items():
        assert leaf.dtype == cache[name].dtype and leaf.shape == cache[name].shape
        if name.startswith("layers/0/"):
            np.testing.assert_array_equal(leaf, cache[name], err_msg=name)


# ---- accuracy on the default model's held-out text ---------------------------------------------
@pytest.fixture(scope="module")
def held_out():
    return train.held_out_windows(8)  # [8, 129]: the same text on every Python (not the running stdlib's)


def nats_per_byte(logits, windows) -> float:
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean())


def cached_logits(engine, params, windows):
    """Logits of every window through the prefill model: keys and values written to the KV cache
    and read back from it (in int8, with ``kv_cache_dtype="int8"``)."""
    model = steps.CachedModel(engine.prefill_graphdef, engine.abstract_prefill_cache, engine.max_target_length)
    run = jax.jit(lambda p, r, t: model.merge(p, steps.zeros(engine.abstract_prefill_cache), r)(t[None])[0])
    return np.stack([run(params, engine.rest, jnp.asarray(w[:-1])) for w in windows])


ONE_WINDOW = dict(mesh={"data": 1}, max_prefill_length=128, max_target_length=128, decode_batch_size=1)


@pytest.fixture(scope="module")
def float_loss(held_out):
    engine, params = workbench.load(**ONE_WINDOW)
    return nats_per_byte(engine.forward(params, held_out[:, :-1]), held_out)


# Relative change of the held-out loss, about 3x the larger of two measurements (this CPU's
# vectors, and XLA_FLAGS=--xla_cpu_max_isa=SSE4_2): w8 8.5e-4 / 8.5e-4, w8a8 9.9e-4 / 1.13e-3,
# int8 KV 1.6e-6 / 7.1e-6 (one scale per position and kv head: nearly lossless here).
@pytest.mark.parametrize("mode, kv, tolerance", [("w8", None, 2.5e-3), ("w8a8", None, 3.5e-3), (None, "int8", 2e-5)])
def test_accuracy_on_held_out_text(held_out, float_loss, mode, kv, tolerance):
    engine, params = workbench.load(quantize=mode, kv_cache_dtype=kv, **ONE_WINDOW)
    leaves, cache = trees.leaf_paths(params), trees.leaf_paths(engine.abstract_prefill_cache)
    layers = range(engine.config.num_layers)
    weights = [leaves.get(f"layers/{i}/{m}/values", leaves.get(f"layers/{i}/{m}")) for i in layers for m in MATRICES]
    assert {w.dtype for w in weights} == {np.dtype(np.int8 if mode else np.float32)}  # really quantized
    kv_rows = {cache[f"layers/{i}/attn/cache/{name}"].dtype for i in layers for name in "kv"}
    assert kv_rows == {np.dtype(np.int8 if kv else np.float32)}  # the cache really int8
    logits = cached_logits(engine, params, held_out) if kv else engine.forward(params, held_out[:, :-1])
    loss = nats_per_byte(logits, held_out)
    assert abs(loss - float_loss) <= tolerance * float_loss, (loss, float_loss)


# ---- quantized checkpoints ---------------------------------------------------------------------
def test_a_quantized_checkpoint_restores_as_saved(tmp_path):
    """int4 values (the narrowest storage) and their group scales, saved and restored bit for bit
    onto another mesh, without re-quantizing; another mode is refused."""
    config = SMALL.replace(mlp_dim=64)  # 64: a multiple of the group
    engine = quantized_engine(config.replace(quantize="w4"))
    params = quantize(lively_arrays(engine_for(config, {"data": 1})), "w4", engine)  # (seeded init compiles slowly)
    path = checkpoints.save_checkpoint(tmp_path / "q", engine.config, params)
    assert checkpoints.read_manifest(path)["model"]["quantize"] == "w4"
    loaded, restored = workbench.load(path, mesh={"data": 1, "tensor": 4}, **SHAPE)
    assert loaded.config.quantize == "w4"
    saved = trees.leaf_paths(params)
    assert saved["layers/0/mlp/up/values"].dtype == jnp.int4 and saved["layers/0/mlp/up/scale"].shape == (1, 64)
    for name, leaf in trees.leaf_paths(restored).items():
        assert leaf.dtype == saved[name].dtype, name
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.asarray(saved[name], np.float32), err_msg=name)
    with pytest.raises(ValueError, match="is quantized w4: load it with quantize=None or 'w4', not 'w8'"):
        workbench.load(path, quantize="w8", **SHAPE)


def test_a_hugging_face_import_quantizes_each_weight_as_it_is_placed(tmp_path, float_arrays, monkeypatch):
    """w8 from a float32 HF checkpoint: after each weight is placed, the float32 arrays of a weight's
    shape that the load made (``jax.live_arrays``) never add up to more than the largest weight --
    never a float copy of the model; and the int8 values dequantize to the checkpoint's weights."""
    path = write_hf(tmp_path / "hf", SMALL, float_arrays)
    weights = {p: np.shape(x) for p, x in trees.leaf_paths(float_arrays).items() if quant.rule(p, "w8")}
    before = jax.live_arrays()  # held: their ids stay theirs
    known = {id(a) for a in before}
    alive, place = [], hf.place

    def placing(*args):
        array = place(*args)
        made = [a for a in jax.live_arrays() if id(a) not in known and a.dtype == jnp.float32]
        alive.append(sum(a.nbytes for a in made if a.shape in weights.values()))
        return array

    monkeypatch.setattr(hf, "place", placing)
    engine, params = workbench.load(path, quantize="w8", mesh={"data": 1, "tensor": 2}, **SHAPE)
    assert len(alive) == len(trees.leaf_paths(float_arrays)) and len(weights) == 16
    assert max(alive) == max(4 * np.prod(shape) for shape in weights.values()), alive
    loaded, shardings = trees.leaf_paths(params), trees.leaf_paths(engine.param_shardings)
    assert loaded["layers/1/mlp/up/values"].dtype == jnp.int8
    assert all(leaf.sharding == shardings[name] for name, leaf in loaded.items())
    for name, leaf in trees.leaf_paths(quant.dequantize_params(params)).items():  # rounding: half a step
        assert_close(leaf, trees.leaf_paths(float_arrays)[name], rtol=1 / 254)


# ---- inspectors --------------------------------------------------------------------------------
def test_inspectors_show_quantized_leaves_and_read_an_int8_cache(float_arrays):
    engine = quantized_engine(SMALL.replace(quantize="w8", kv_cache_dtype="int8"))
    params = quantize(float_arrays, "w8", engine)
    rows = {(r["collection"], r["path"]): r for r in workbench.inspect.state(engine, params).to_rows()}
    values, scale = rows[("params", "layers/0/mlp/up/values")], rows[("params", "layers/0/mlp/up/scale")]
    assert (values["dtype"], values["shape"], values["bytes"]) == ("int8", (32, 48), 32 * 48)
    assert (scale["dtype"], scale["shape"]) == ("float32", (1, 48))
    assert sum(values["bytes_per_device"].values()) == 32 * 48  # the mlp axis split over tensor=2
    assert rows[("cache", "layers/0/attn/cache/k_scale")]["dtype"] == "float32"
    prefix, _ = prefill(engine, params, ids(9, 4))
    stats = workbench.inspect.kv_cache(prefix).stats
    assert (np.asarray(stats["filled"]) == 9).all()
    # the report reads the cache dequantized: the largest |k| is a float, not an int8 count
    layer = trees.leaf_paths(prefix.cache)
    expected = np.abs(
        np.asarray(layer["layers/0/attn/cache/k"], np.float32)
        * np.asarray(layer["layers/0/attn/cache/k_scale"])[..., None]
    ).max()
    np.testing.assert_allclose(np.asarray(stats["max_abs_k"])[0].max(), expected, rtol=1e-6)


def test_bfloat16_weights_with_float32_compute(float_arrays, reference):
    """The fast bfloat16 mix: bf16 weights, f32 activations, products with a f32 result; equal to
    the float32 model over the same bf16-rounded weights, up to the activations' rounding (measured
    7.3e-3 of the logits, with this CPU's vectors and under SSE4_2: held at about 3x)."""
    mixed = quantized_engine(SMALL.replace(param_dtype="bfloat16"))
    params = mixed.load_params(float_arrays)
    assert trees.leaf_paths(params)["layers/0/mlp/up"].dtype == jnp.bfloat16
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), float_arrays)
    assert_close(mixed.forward(params, TOKENS), reference.forward(reference.load_params(rounded), TOKENS), rtol=0.02)
