"""Every option together: scanned layers with w8a8 weights, the int8 KV cache, LoRA adapters per
slot, probes and interventions, packed prompts and multisampling, against the same options on
unrolled layers (the truth: the same numbers in another layout). The walk also checks the
interventions by what the capture shows (a patch lands where it was put, a steer adds what it
was given, on the slot it names), the checkpoints of a quantized model load in either layout,
and the inspectors read the scanned, quantized state."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SHAPE, SMALL, assert_close, lively_arrays, write_hf
from workbench import inspect, probes
from workbench.checkpoints import merge_adapter, save_checkpoint
from workbench.checkpoints.adapters import MODULE, Adapter
from workbench.engine import compiled
from workbench.model import quant
from workbench.model.lora import TARGETS, AdapterStack, LoraSpec
from workbench.model.scan import stack_layers
from workbench.probes.plan import asked_layers
from workbench.trees import leaf_paths, variables

BASE = SMALL.replace(mlp_dim=64)  # w4's group (32) divides every contracting size
CONFIG = BASE.replace(quantize="w8a8", kv_cache_dtype="int8")
MESH = {"data": 1}
SPEC = LoraSpec(num_adapters=2, rank=4, targets=TARGETS)
PROMPTS = ([5, 17, 33, 9, 64, 3], [7, 8, 9], [40, 41, 42, 43, 11])
# Scanned and unrolled run the same per-layer arithmetic (measured: at most 4e-7 of the largest
# logit apart); w8a8 rounds each activation to int8, so an ulp of difference upstream may move a
# rounding by one step: the tolerance leaves room for that, the tokens must still be identical.
RTOL = 1e-4


def abstract(config, **options):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: compiled.model(config, **options))


@pytest.fixture(scope="module")
def float_arrays():
    """Lively float weights of BASE (a pure dict, unrolled) and two random adapters on every projection."""
    params = nnx.split(abstract(BASE), compiled.PARAMS, ...)[1]
    arrays = lively_arrays(types.SimpleNamespace(abstract_params=params))
    rng = np.random.default_rng(1)
    lora = nnx.to_pure_dict(nnx.state(abstract(BASE, lora_spec=SPEC), nnx.LoRAParam))
    weights = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), lora)
    return arrays, AdapterStack(("chat", "code"), SPEC, weights)


def walk(engine, params):
    """Every call with every option: packed prompts (the base model), multisampling with an
    adapter, bulk-inserted, then generate under probes and interventions: a patch on slot 1, a
    steer on slot 0, an ablation. Returns (outputs, each step's capture, the final state, and the
    last step's logits with slot 1 on the base model)."""
    packed = engine.prefill_concat(params=params, prompts=PROMPTS[:2])
    padded, n = engine.pad(PROMPTS[2])
    sampled, first = engine.prefill_multisampling(
        params=params, padded_tokens=padded, true_length=n, num_samples=2, adapter="chat"
    )
    out = [np.asarray(result.logits) for _, result in packed] + [np.asarray(result.data) for _, result in packed]
    out += [np.asarray(first.logits), np.asarray(first.data)]
    state = engine.bulk_insert(sampled, engine.init_decode_state(), [0, 1])
    state = engine.insert(packed[0][0], state, 0)  # slot 0: the base model; slot 1: adapter "chat"
    captures = []
    for step in range(3):
        if step == 2:  # the same step with slot 1 on the base model (data, not a recompile)
            twin = jax.tree.map(jnp.copy, state)  # generate donates its state
            twin = twin.replace(adapters=twin.adapters.at[1].set(-1))
            _, base = engine.generate(params, twin, probes=probes.Capture(), interventions=INTERVENTIONS)
        state, result = engine.generate(params, state, probes=probes.Capture(), interventions=INTERVENTIONS)
        out += [np.asarray(result.logits), np.asarray(result.data)]
        captures.append(result.captured)
    return out, captures, state, np.asarray(base.logits)


PATCH = np.linspace(-1, 1, BASE.embed_dim, dtype=np.float32)
STEER = np.linspace(1, -1, BASE.embed_dim, dtype=np.float32)
INTERVENTIONS = [  # slot 1 is at position len(PROMPTS[2]) on the first step
    probes.Patch(0, "mlp_out", [len(PROMPTS[2])], PATCH[None], slots=[1]),
    probes.Steer(1, STEER, 3.0, slots=[0]),
    probes.Ablate(1, [0, 3], mode="mean", slots=[1]),  # the mean over both slots, on slot 1: slot 0 is its own
]


@pytest.fixture(scope="module")
def walks(devices, float_arrays):
    """The walk on unrolled and on scanned layers, same options, same weights (quantized once)."""
    arrays, adapters = float_arrays
    pure = quant.quantize_params(jax.tree.map(np.array, arrays), CONFIG.quantize)
    runs = {}
    for scan in (False, True):
        engine = workbench.Engine(CONFIG, workbench.make_mesh(MESH), scan_layers=scan, adapters=adapters, **SHAPE)
        params = engine.load_params(pure)  # the unrolled dict: stacked on load for the scanned engine
        runs[scan] = (engine, params, *walk(engine, params))
    return runs, pure


def test_scanned_layers_with_every_option_give_the_unrolled_numbers(walks):
    _, _, expected, expected_captures, expected_state, expected_base = walks[0][False]
    engine, params, actual, captures, state, base = walks[0][True]
    leaves = leaf_paths(params)  # the scanned engine is what it says: stacked, int8, adapters stacked too
    assert leaves["layers/attn/q/values"].dtype == jnp.int8 and leaves["layers/attn/q/values"].shape == (2, 32, 4, 8)
    assert leaves["layers/mlp/down/scale"].shape == (2, 1, 32)
    assert leaf_paths(engine.rest)["layers/attn/lora/q/a"].shape == (2, 2, 32, 4)
    cache = leaf_paths(state.cache)
    assert cache["layers/attn/cache/k"].dtype == jnp.int8 and cache["layers/attn/cache/k_scale"].shape == (2, 2, 32, 2)
    assert len(actual) == len(expected) == 12
    tokens = np.concatenate([data[:, 0] for data in expected if data.dtype.kind == "i"])
    assert len(set(tokens.tolist())) > 3, f"the tokens should vary: {tokens}"
    for want, got in zip(expected, actual):
        if want.dtype.kind == "f":
            assert_close(got, want, RTOL)
        else:  # tokens, valid, lengths: identical
            np.testing.assert_array_equal(got, want)
    for want, got in zip(expected_captures, captures):
        assert got.layers == want.layers and got.sites.keys() == want.sites.keys()
        for name, per_layer in want.sites.items():
            for layer, value in per_layer.items():
                assert_close(got.sites[name][layer], value, RTOL)
        if want.logits is not None:
            assert_close(got.logits, want.logits, RTOL)
    assert_close(base, expected_base, RTOL)
    # under probes each slot still gets its own adapter: slot 1 on the base model changes slot 1 only
    np.testing.assert_array_equal(base[0], actual[-2][0])
    assert np.abs(base[1] - actual[-2][1]).max() > 0.1 * np.abs(base[1]).max()
    for layer in range(BASE.num_layers):  # the int8 caches, dequantized
        want = quant.dequantized_cache(expected_state.layer_cache(layer))
        got = quant.dequantized_cache(state.layer_cache(layer))
        for name in ("k", "v"):
            assert_close(got[name], want[name], RTOL)


def test_interventions_on_scanned_layers_act_on_their_layer_and_slots(walks):
    """A traced layer index selects the right layer's intervention: what the capture shows."""
    captures = walks[0][True][3]
    first = captures[0]
    np.testing.assert_allclose(first.mlp(0)[1, 0], PATCH, atol=1e-6)  # the patched slot holds the patch
    assert np.abs(first.mlp(0)[0, 0] - PATCH).max() > 0.1 and np.abs(first.mlp(1)[1, 0] - PATCH).max() > 0.1
    # the residual after block 1 = the one after block 0 + what attention and the MLP add + the
    # steer, which goes to slot 0 only
    for step in captures:
        assert step.layers == [0, 1]
        added = step.residual(1) - step.residual(0) - step.attn_out(1) - step.mlp(1)  # [slots, 1, D]
        scale = np.abs(step.residual(1)).max()
        np.testing.assert_allclose(added[0, 0], 3.0 * STEER, atol=1e-5 * scale)
        np.testing.assert_allclose(added[1, 0], 0, atol=1e-5 * scale)


def test_inspectors_read_a_scanned_quantized_state(walks):
    """The state report sees every leaf placed where the rules say (stacked scales included);
    the KV-cache report shows the stacked int8 cache per layer, as the unrolled engine's."""
    engine, params, _, _, state, _ = walks[0][True]
    rows = inspect.state(engine, params, state).to_rows()
    by_path = {(row["collection"], row["path"]): row for row in rows}
    assert not any(row["mismatch"] for row in rows)
    scale = next(row for (_, path), row in by_path.items() if path == "layers/attn/q/scale")
    assert scale["axes"][0] == "layers" and scale["shape"] == (2, 1, 4, 8)
    expected = inspect.kv_cache(walks[0][False][4]).to_rows()
    actual = inspect.kv_cache(state).to_rows()
    assert len(actual) == len(expected) > 0
    for want, got in zip(expected, actual):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-3) if isinstance(value, float) else value), key


def test_quantized_checkpoints_load_in_either_layout(walks, float_arrays, tmp_path):
    """A scanned engine's quantized params saved stacked load into unrolled layers as the same
    integers and scales; a float Hugging Face checkpoint loads into scanned layers quantized as
    the unrolled layers are, each leaf placed by the rules (the stacked scales too)."""
    runs, quantized = walks
    stacked = jax.tree.map(np.asarray, nnx.to_pure_dict(runs[True][1]))
    save_checkpoint(tmp_path / "quantized", CONFIG, stacked, tokenizer=None)
    _, params = workbench.load(tmp_path / "quantized", mesh=MESH, **SHAPE)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), quantized)
    write_hf(tmp_path / "float", BASE, float_arrays[0])  # read layer by layer, quantized, then stacked
    mesh = {"data": 2, "tensor": 2}
    engine, params = workbench.load(tmp_path / "float", mesh=mesh, quantize="w8a8", scan_layers=True, **SHAPE)
    got, expected = leaf_paths(params), leaf_paths(stack_layers(quantized))
    assert got.keys() == expected.keys()
    for path, sharding in leaf_paths(engine.param_shardings).items():
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
        assert got[path].sharding == sharding, path


def test_w4_on_scanned_layers(float_arrays):
    """A scanned model's weight [L, ...] quantizes as its layers do one by one (w4: a scale per
    group of 32 rows, its axes led by ``layers``), and the scanned w4 model computes the unrolled
    one's logits. (w8a8 runs every step of the walk above; w8 shares its quantization and runs
    the product w4 runs after dequantizing.)"""
    config = BASE.replace(quantize="w4")
    unrolled = variables(nnx.state(abstract(config), nnx.Param))
    stacked = variables(nnx.state(abstract(config, scan_layers=True), nnx.Param))
    for name in ("attn/q", "attn/o", "mlp/down"):
        for part in ("values", "scale"):
            one, both = unrolled[f"layers/0/{name}/{part}"], stacked[f"layers/{name}/{part}"]
            assert both.shape == (BASE.num_layers, *one.shape) and both.dtype == one.dtype, (name, part)
            assert both.get_metadata()["out_sharding"] == ("layers", *one.get_metadata()["out_sharding"])

    def forward(pure, tokens, scan):
        model = compiled.model(config, scan_layers=scan)  # its random init is pruned: every param is replaced
        state = nnx.state(model, compiled.PARAMS)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
        return model(tokens)

    @jax.jit  # one compile for both layouts
    def both_layouts(arrays, tokens):
        unrolled = quant.quantize_params(jax.tree.map(lambda x: x, arrays), "w4")  # (it empties its input)
        down = jnp.stack([layer["mlp"]["down"] for layer in arrays["layers"].values()])  # [L, F, D]
        per_layer = quant.quantize_layers(down, (0,), "w4", stacked=True)
        stacked = stack_layers(unrolled)
        return stacked, per_layer, forward(stacked, tokens, True), forward(unrolled, tokens, False)

    tokens = jnp.asarray([PROMPTS[0] + PROMPTS[2]])
    stacked, per_layer, scanned, expected = both_layouts(float_arrays[0], tokens)
    assert per_layer[1].shape == (2, 2, 32)  # [L, G, D]: two groups of 32 rows per layer
    np.testing.assert_array_equal(per_layer[0], stacked["layers"]["mlp"]["down"]["values"])
    np.testing.assert_array_equal(per_layer[1], stacked["layers"]["mlp"]["down"]["scale"])
    assert_close(scanned, expected, 1e-5)
    np.testing.assert_array_equal(np.argmax(scanned, -1), np.argmax(expected, -1))


def test_merge_adapter_takes_either_layout(float_arrays, walks):
    """Folding an adapter into stacked params gives the unrolled fold, stacked; into quantized
    weights it is a one-line error (their sum would be rounded again)."""
    arrays, stack = float_arrays
    weights = leaf_paths(stack.weights)
    adapter = Adapter(
        rank=SPEC.rank,
        weights={
            (layer, target): (weights[f"layers/{layer}/{module}/lora/{target}/a"][0].reshape(-1, SPEC.rank),
                              weights[f"layers/{layer}/{module}/lora/{target}/b"][0].reshape(SPEC.rank, -1))
            for layer in range(BASE.num_layers) for target, module in MODULE.items()
        },
    )  # fmt: skip
    merged = merge_adapter(arrays, adapter, BASE)
    assert np.abs(merged["layers"][1]["mlp"]["up"] - arrays["layers"][1]["mlp"]["up"]).max() > 0.1
    jax.tree.map(
        np.testing.assert_array_equal, merge_adapter(stack_layers(arrays), adapter, BASE), stack_layers(merged)
    )
    with pytest.raises(ValueError, match="merge_adapter needs float weights; layers/0/attn/q is quantized"):
        merge_adapter(walks[1], adapter, BASE)


def test_a_scanned_capture_keeps_the_layers_asked_for():
    """Scanned layers record every layer, stacked; only the layers ``Capture.layers`` names leave
    the step (``probes.run``), and each comes back under its own index."""
    stacked = np.arange(3 * 1 * 2 * 4, dtype=np.float32).reshape(3, 1, 2, 4)  # [L, rows, T, D]
    capture = probes.Capture(attention=False, mlp=False, logits=False, layers=(2, 0, 2))
    sown = asked_layers({"layers": {"residual": (jnp.asarray(stacked),)}}, capture)
    assert sown["layers"]["residual"][0].shape == (2, 1, 2, 4)  # layers 0 and 2 of 3
    raw = {"sown": sown, "tokens": np.zeros((1, 2)), "positions": np.arange(2)[None], "live": np.ones((1, 2), bool)}
    captured = probes.captured_from(raw, capture)
    assert captured.layers == [0, 2]
    np.testing.assert_array_equal(captured.residual(0), stacked[0])
    np.testing.assert_array_equal(captured.residual(2), stacked[2])
