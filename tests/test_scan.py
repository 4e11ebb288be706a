"""Scanned layers (``scan_layers=True``) against the unrolled model on the same weights: the same
greedy tokens and logits through prefill, insert / bulk_insert, generate and free, on 8 devices
(on 1, with every other option too: test_combinations); checkpoints of either layout load into
either; the stacked cache reads per layer."""

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import (
    SHAPE,
    SMALL,
    assert_close,
    engine_for,
    host_arrays,
    lively_arrays,
    prefill,
    uncached_forward,
    write_hf,
)
from workbench import inspect
from workbench.checkpoints import export_hf, save_checkpoint
from workbench.checkpoints.layout import saved_layers
from workbench.model import RopeScaling
from workbench.model.config import sliding_pattern
from workbench.model.scan import stack_layers, unstack_layers
from workbench.trees import leaf_paths


def ids(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, SMALL.vocab_size, length).tolist()


def run(engine, params, steps=5):
    """Every engine call, on a stacked or an unrolled engine: the logits and tokens along the
    way, the final state's cache per layer (numpy), and what the inspectors make of the state:
    the KV-cache report's rows, and the diff of the last generate step."""
    out = [np.asarray(engine.forward(params, np.asarray([ids(20, 7)])))]
    state = engine.init_decode_state()
    for slot, length in ((0, 9), (1, 14)):
        prefix, first = prefill(engine, params, ids(length, slot))
        out.append(np.asarray(first.logits))
        state = engine.insert(prefix, state, slot) if slot == 0 else engine.bulk_insert(prefix, state, [slot])
    for step in range(steps):
        if step == 3:
            state = engine.free_resource(1, state)
        before = inspect.snapshot(state)
        state, result = engine.generate(params, state)
        out += [np.asarray(result.logits), np.asarray(result.data)]
    layers = [jax.tree.map(np.asarray, state.layer_cache(i)) for i in range(engine.config.num_layers)]
    reports = (inspect.kv_cache(state).to_rows(), inspect.kv_cache_diff(before, state).to_rows())
    return out, layers, reports


@pytest.fixture(scope="module")
def unrolled(devices):
    """The truth: the unrolled model's walk on data=2 x tensor=4 (1 device == 8 devices for the
    unrolled model is test_engine's), with its params as a pure dict."""
    engine = engine_for(SMALL, {"data": 2, "tensor": 4})
    arrays = lively_arrays(engine)
    return run(engine, engine.load_params(arrays)), arrays


def test_scanned_layers_give_the_unrolled_numbers(unrolled):
    """On the truth's own mesh the scan must not move a number past 1e-6 (it moves none here).
    Scanned layers on one device, with every option together, are test_combinations'."""
    rtol = 1e-6
    (expected, expected_layers, expected_reports), arrays = unrolled
    scanned = workbench.Engine(SMALL, workbench.make_mesh({"data": 2, "tensor": 4}), scan_layers=True, **SHAPE)
    stacked = scanned.load_params(stack_layers(arrays))
    assert stacked["layers"]["attn"]["q"][...].shape[0] == SMALL.num_layers
    actual, actual_layers, actual_reports = run(scanned, stacked)
    assert expected[-1][1, 1] == 0 and len(actual) == len(expected)  # slot 1 was freed; every step ran
    for want, got in zip(expected, actual):
        if want.dtype.kind == "f":
            assert_close(got, want, rtol)
        else:  # token, valid, length: identical
            np.testing.assert_array_equal(got, want)
    for want, got in zip(expected_layers, actual_layers):
        for name in ("k", "v"):
            assert_close(got[name], want[name], rtol)
    # the inspectors show the stacked cache per layer, as they show the unrolled one
    for want, got in zip(expected_reports, actual_reports):
        assert [r.keys() for r in got] == [r.keys() for r in want] and len(got) == len(want) > 0
        for row_want, row_got in zip(want, got):
            for key, value in row_want.items():
                assert row_got[key] == (pytest.approx(value, rel=10 * rtol) if isinstance(value, float) else value), key


# Gemma 3-style: a pattern of 3 (sliding, sliding, global; Gemma 3's is 5 + 1) over 7 layers -- two
# scan steps and one leftover layer -- with rings shorter than the prompts, a local rope beside a
# linearly scaled global one, q/k norms and sandwich norms.
# fmt: off
PATTERNED = SMALL.replace(
    num_layers=7, layer_types=sliding_pattern(7, 3), sliding_window=4, local_rope_theta=100.0,
    rope_scaling=RopeScaling(factor=4.0, rope_type="linear"), qk_norm=True, norm_offset=1.0, post_norms=True,
    embed_scale=True, mlp_activation="gelu_tanh",
)
# fmt: on


def greedy_walk(engine, params, prompt: list[int], slot: int, steps: int) -> tuple[list, list[int], object]:
    """``prompt`` prefilled and inserted into ``slot``, then ``steps`` greedy steps: the logits row
    each token came from, the tokens, and the final decode state."""
    prefix, first = prefill(engine, params, prompt)
    rows, tokens = [np.asarray(first.logits)[0]], [int(first.data[0, 0])]
    state = engine.insert(prefix, engine.init_decode_state(), slot)
    for _ in range(steps):
        state, result = engine.generate(params, state)
        rows.append(np.asarray(result.logits)[slot])
        tokens.append(int(result.data[slot, 0]))
    return rows, tokens, state


def uncached_rows(config, arrays, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The uncached forward's logits rows that chose ``tokens`` after ``prompt``."""
    return uncached_forward(config, arrays, [prompt + tokens[:-1]])[0, len(prompt) - 1 :]


def test_a_layer_pattern_scans_in_blocks_to_the_uncached_numbers(tmp_path):
    """Gemma 3-style layers exported for transformers, loaded into a scanned engine on one device
    (stacked by the pattern: rings and full caches in stacks of their own, the leftover layer a
    stack of one), a prompt longer than the window through prefill, insert and four greedy
    steps: every logits row within 1e-5 of the unrolled model's uncached forward over the tokens
    it chose, and the caches read per layer as by hand (a ring holds the last 4 positions)."""
    arrays = host_arrays(PATTERNED, seed=3)
    hf = SimpleNamespace(config=PATTERNED, adapters=(), tokenizer=None, max_target_length=32)
    export_hf(hf, arrays, tmp_path)
    engine, params = workbench.load(tmp_path, mesh={"data": 1}, scan_layers=True, kernels="reference", **SHAPE)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    assert leaf_paths(pure).keys() == leaf_paths(stack_layers(arrays, period=3)).keys()
    jax.tree.map(np.testing.assert_array_equal, pure, stack_layers(arrays, period=3))
    save_checkpoint(tmp_path / "saved", PATTERNED, pure, tokenizer=None)
    assert saved_layers(tmp_path / "saved") == (True, 7)  # a pattern's stacks count 7 layers

    prompt = ids(14, 1)
    rows, tokens, state = greedy_walk(engine, params, prompt, slot=1, steps=4)
    truth = uncached_rows(PATTERNED, arrays, prompt, tokens)
    assert len(set(tokens)) > 2, "greedy tokens barely vary"
    np.testing.assert_array_equal(tokens, truth.argmax(-1))
    for want, got in zip(truth, rows, strict=True):
        assert_close(got, want, 1e-5)

    cache = state.cache["layers"]
    ring, full = (2, 2, 4, 2, 8), (2, 2, 32, 2, 8)  # [R, B, W or S, K, H]
    assert [cache["blocks"][j]["attn"]["cache"]["k"].shape for j in range(3)] == [ring, ring, full]
    assert cache["tail"][0]["attn"]["cache"]["k"].shape == (1, *ring[1:])  # layer 6: a ring
    report = inspect.kv_cache(state).to_rows()
    for layer in range(PATTERNED.num_layers):
        kv = jax.tree.map(np.asarray, state.layer_cache(layer))
        sliding = PATTERNED.window(layer) is not None
        assert ("held" in kv) == sliding
        if sliding:  # positions 0 .. 17 written: the ring holds 14 .. 17 (held: 1 + each)
            assert sorted(kv["held"][1]) == [15, 16, 17, 18] and not kv["held"][0].any()
        row = next(r for r in report if r["layer"] == layer and r["slot"] == 1)
        assert row["filled"] == (4 if sliding else 18), row


# Gemma 2-style: sliding and global layers alternating (a pattern of 2) over 4 layers, with the
# attention scores and the logits soft-capped (caps small enough to bend them).
# fmt: off
ALTERNATING = SMALL.replace(
    num_layers=4, layer_types=sliding_pattern(4, 2), sliding_window=4, norm_offset=1.0, post_norms=True,
    embed_scale=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=16, attn_logit_softcap=5.0,
    final_logit_softcap=8.0,
)
# fmt: on


def test_alternating_soft_capped_layers_scan_to_the_uncached_numbers():
    """Gemma 2's shape of model scanned in pairs (a ring and a full cache per scan step), a prompt
    longer than the window, prefill and three greedy steps: within 1e-5 of the uncached forward."""
    arrays = host_arrays(ALTERNATING, seed=3)
    engine = workbench.Engine(ALTERNATING, workbench.make_mesh({"data": 1}), scan_layers=True, **SHAPE)
    params = engine.load_params(stack_layers(arrays, period=2))
    prompt = ids(11, 2)
    rows, tokens, _ = greedy_walk(engine, params, prompt, slot=0, steps=3)
    truth = uncached_rows(ALTERNATING, arrays, prompt, tokens)
    assert np.abs(truth).max() > 0.5 * ALTERNATING.final_logit_softcap, "the logits never reach the cap's bend"
    np.testing.assert_array_equal(tokens, truth.argmax(-1))
    for want, got in zip(truth, rows, strict=True):
        assert_close(got, want, 1e-5)


def test_stacked_params_and_caches_carry_the_layers_axis(devices):
    scanned = workbench.Engine(SMALL, workbench.make_mesh({"data": 2, "tensor": 2}), scan_layers=True, **SHAPE)
    for path, variable in leaf_paths(scanned.abstract_params).items():
        if path.startswith("layers/"):
            assert variable.shape[0] == SMALL.num_layers, path
    k = scanned.init_decode_state().cache["layers"]["attn"]["cache"]["k"]
    assert k.shape == (SMALL.num_layers, 2, 32, 2, 8)
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "data", None, "tensor")
    assert ("layers", None) in workbench.RULES


@pytest.fixture(scope="module")
def small_arrays(devices):
    return lively_arrays(engine_for(SMALL, {"data": 1}), seed=2)


@pytest.mark.parametrize("saved_as", ["unrolled", "stacked", "hugging face"])
@pytest.mark.parametrize("load_as", ["unrolled", "stacked"])
def test_checkpoints_of_either_layout_load_into_either(small_arrays, tmp_path, saved_as, load_as):
    path = tmp_path / "ckpt"
    if saved_as == "hugging face":
        write_hf(path, SMALL, small_arrays)
    else:
        saved = stack_layers(small_arrays) if saved_as == "stacked" else small_arrays
        save_checkpoint(path, SMALL, saved, tokenizer=None)
    mesh = {"data": 2, "tensor": 2}
    engine, params = workbench.load(path, mesh=mesh, scan_layers=load_as == "stacked", **SHAPE)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    expected = stack_layers(small_arrays) if load_as == "stacked" else small_arrays
    assert leaf_paths(pure).keys() == leaf_paths(expected).keys()
    jax.tree.map(np.testing.assert_array_equal, pure, expected)
    for path, sharding in leaf_paths(engine.param_shardings).items():  # placed by the rules
        assert leaf_paths(params)[path].sharding == sharding, path


def test_a_layer_count_that_differs_from_the_config_is_one_error(small_arrays, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", SMALL, stack_layers(small_arrays), tokenizer=None)
    manifest = json.loads((path / "workbench.json").read_text())
    manifest["model"]["num_layers"] = 3
    (path / "workbench.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"cannot restore params \(2 layers saved, the config says 3\)"):
        workbench.load(path, scan_layers=True, **SHAPE)


def test_stack_and_unstack_are_inverse(small_arrays):
    stacked = stack_layers(small_arrays)
    assert stacked["layers"]["mlp"]["up"].shape == (2, 32, 48)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), small_arrays)
    assert stack_layers(stacked) is stacked and unstack_layers(small_arrays) is small_arrays


def test_the_command_line_flags_reach_load(monkeypatch):
    """``--scan-layers`` reaches ``workbench.load``; ``--no-compile-cache`` keeps the cache off."""
    import argparse

    from workbench.cli.common import add_engine_arguments, load_engine

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    seen = {}
    monkeypatch.setattr(workbench, "load", lambda checkpoint, **options: seen.update(options))
    load_engine(parser.parse_args(["--scan-layers"]))
    assert seen["scan_layers"] is True
    seen.clear()
    load_engine(parser.parse_args([]))
    assert "scan_layers" not in seen  # a default run calls load exactly as before
    args = parser.parse_args(["--no-compile-cache"])
    assert args.compile_cache is False and parser.parse_args([]).compile_cache is True
