"""The engine against its oracle: a full forward pass with no cache over the whole sequence."""

import jax
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import assert_close, prefill, prompt
from workbench import Sampling
from workbench.engine import autotune

SLOTS, PREFILL, TARGET = 4, 32, 64  # the shape of conftest's shared `engine` (data=2 x tensor=4)


def make_engine(mesh, **changes):
    options = dict(decode_batch_size=SLOTS, max_prefill_length=PREFILL, max_target_length=TARGET)
    options.update(changes)
    config = options.pop("config", workbench.ModelConfig.tiny())
    return workbench.Engine(config, workbench.make_mesh(mesh), **options)


def run(engine, params, requests, steps):
    """Prefill and insert each (slot, tokens), then generate; per slot: tokens and logits rows."""
    state = engine.init_decode_state()
    out = {}
    for slot, tokens in requests:
        prefix, _ = prefill(engine, params, tokens)
        state = engine.insert(prefix, state, slot)
        out[slot] = ([int(prefix.token)], [np.asarray(prefix.logits)])
    for _ in range(steps):
        state, result = engine.generate(params, state)
        data, logits = np.asarray(result.data), np.asarray(result.logits)
        for slot, (tokens, rows) in out.items():
            assert data[slot, 1] == 1 and data[slot, 2] == len(tokens) + 1
            tokens.append(int(data[slot, 0]))
            rows.append(logits[slot])
    return out, state


@pytest.mark.parametrize("library", list(autotune.LIBRARIES))
def test_cached_paths_equal_the_uncached_forward(engine, params, library, monkeypatch):
    """Under each library the autotune probe can pick for decode's float32 products (a user's
    engine runs the probe's pick; the suite's fixed choice is Eigen): the shared engine was built
    with the fixed choice, another is built with YNNPACK forced (read when it builds its jits).
    The oracle is the shared engine's forward either way (the forward's program has no library)."""
    decoder, decoder_params = engine, params
    if library != autotune.library(engine.config, SLOTS):
        monkeypatch.setenv(autotune.ENV, library)
        decoder = make_engine({"data": 2, "tensor": 4})
        decoder_params = decoder.load_params(nnx.to_pure_dict(params))
    assert decoder.tune() == library  # the library its generate step is compiled with
    requests = [(0, prompt(3, 0)), (3, prompt(17, 1)), (1, prompt(11, 2)), (2, prompt(29, 3))]
    out, _ = run(decoder, decoder_params, requests, steps=8)
    for slot, tokens in requests:
        generated, rows = out[slot]
        full = np.asarray(engine.forward(params, np.array([tokens + generated[:-1]])))[0]
        expected = full[len(tokens) - 1 :]  # the row each generated token was chosen from
        assert generated == expected.argmax(-1).tolist()
        assert len(set(generated)) > 1, "weights too dull: the comparison would prove little"
        assert_close(np.stack(rows), expected)


def test_chunked_prefill_equals_one_prefill(engine, params):
    tokens = prompt(40, 4)  # longer than max_prefill_length (32): three chunks of at most 16
    whole_engine = make_engine({"data": 2, "tensor": 4}, max_prefill_length=64)
    whole, _ = prefill(whole_engine, params, tokens)
    prefix = None
    for start in range(0, 40, 16):
        prefix, _ = prefill(engine, params, tokens[start : start + 16], existing_prefix=prefix)
    assert int(prefix.length) == int(whole.length) == 40
    assert int(prefix.token) == int(whole.token)
    assert_close(prefix.logits, whole.logits)
    for chunked, one in zip(jax.tree.leaves(prefix.cache), jax.tree.leaves(whole.cache)):
        assert_close(np.asarray(chunked)[:, :40], np.asarray(one)[:, :40])


def test_chunk_continues_with_generate(engine, params):
    tokens = prompt(20, 5)
    first, _ = prefill(engine, params, tokens[:12])
    prefix, _ = prefill(engine, params, tokens[12:], existing_prefix=first)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    generated = [int(prefix.token)]
    for _ in range(4):
        state, result = engine.generate(params, state)
        generated.append(int(result.data[1, 0]))
    full = np.asarray(engine.forward(params, np.array([tokens + generated[:-1]])))[0]
    assert generated == full[len(tokens) - 1 :].argmax(-1).tolist()


def test_insert_into_another_slot_leaves_slot_0_alone(engine, params):
    alone, _ = run(engine, params, [(0, prompt(9, 6))], steps=6)
    state = engine.init_decode_state()
    prefix, _ = prefill(engine, params, prompt(9, 6))
    state = engine.insert(prefix, state, 0)
    tokens = [int(prefix.token)]
    for step in range(6):
        if step == 3:
            other, _ = prefill(engine, params, prompt(23, 7))
            state = engine.insert(other, state, 2)
        state, result = engine.generate(params, state)
        tokens.append(int(result.data[0, 0]))
    assert tokens == alone[0][0]


def test_bulk_insert_gives_identical_continuations(engine, params):
    prefix, _ = prefill(engine, params, prompt(13, 8))
    state = engine.bulk_insert(prefix, engine.init_decode_state(), [0, 2, 3])
    streams = []
    for _ in range(5):
        state, result = engine.generate(params, state)
        streams.append(np.asarray(result.data))
    data = np.stack(streams)  # [steps, slots, 3]
    assert (data[:, [0, 2, 3], 1] == 1).all() and (data[:, 1, 1] == 0).all()
    assert (data[:, 0, 0] == data[:, 2, 0]).all() and (data[:, 0, 0] == data[:, 3, 0]).all()
    alone, _ = run(engine, params, [(1, prompt(13, 8))], steps=5)
    assert alone[1][0][1:] == data[:, 0, 0].tolist()


def test_one_device_and_eight_devices_agree(engine, params, devices):
    single = make_engine(workbench.make_mesh({"data": 1}, devices[:1]))
    single_params = single.load_params(nnx.to_pure_dict(params))
    assert len(jax.tree.leaves(single_params)[0].sharding.device_set) == 1
    requests = [(0, prompt(5, 9)), (2, prompt(21, 10))]
    eight, _ = run(engine, params, requests, steps=6)
    one, _ = run(single, single_params, requests, steps=6)
    for slot, _ in requests:
        assert eight[slot][0] == one[slot][0]
        assert_close(np.stack(eight[slot][1]), np.stack(one[slot][1]))


@pytest.mark.parametrize("mesh", [{"data": 1, "tensor": 8}, {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_other_meshes_agree(engine, params, mesh):
    other = make_engine(mesh)
    requests = [(1, prompt(7, 11)), (3, prompt(15, 12))]
    expected, _ = run(engine, params, requests, steps=4)
    actual, _ = run(other, other.load_params(nnx.to_pure_dict(params)), requests, steps=4)
    assert {s: t for s, (t, _) in actual.items()} == {s: t for s, (t, _) in expected.items()}


def test_generate_compiles_once_with_inserts_in_between(params):
    engine = make_engine({"data": 2, "tensor": 4})
    params = engine.load_params(nnx.to_pure_dict(params))
    state = engine.init_decode_state()
    for step in range(20):
        if step % 5 == 0:
            prefix, _ = prefill(engine, params, prompt([3, 9, 20, 30][step // 5], step))
            state = engine.insert(prefix, state, step // 5)
        state, _ = engine.generate(params, state)
    assert engine.compile_counts["generate"] == 1
    assert engine.compile_counts["insert"] == 1
    assert engine.compile_counts["prefill"] == 2  # buckets 16 and 32


def test_decode_state_is_donated(engine, params):
    state = engine.init_decode_state()
    prefix, _ = prefill(engine, params, prompt(5, 13))
    inserted = engine.insert(prefix, state, 0)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.cache))
    stepped, _ = engine.generate(params, inserted)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(inserted.cache))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(prefix.cache)), "a prefix can be inserted again"


def test_empty_slots_are_invalid_and_full_slots_stop(params):
    engine = make_engine({"data": 2, "tensor": 4}, max_target_length=24, max_prefill_length=16)
    params = engine.load_params(nnx.to_pure_dict(params))
    state, result = engine.generate(params, engine.init_decode_state())
    assert (np.asarray(result.data)[:, 1] == 0).all()
    tokens = prompt(20, 14)
    prefix, _ = prefill(engine, params, tokens[:16])
    prefix, _ = prefill(engine, params, tokens[16:], existing_prefix=prefix)
    state = engine.insert(prefix, state, 1)
    valid = []
    for _ in range(6):
        state, result = engine.generate(params, state)
        valid.append(int(result.data[1, 1]))
    assert valid == [1, 1, 1, 1, 0, 0]  # positions 20..23 fit; then the slot is full
    assert int(state.positions[1]) == 24  # stopped at the end of the cache, not wrapped to 0


def test_free_resource_empties_the_slot(engine, params):
    prefix, _ = prefill(engine, params, prompt(6, 15))
    state = engine.bulk_insert(prefix, engine.init_decode_state(), [0, 1])
    state = engine.free_resource(0, state)
    state, result = engine.generate(params, state)
    assert np.asarray(result.data)[:, 1].tolist() == [0, 1, 0, 0]
    assert engine.free_resource(3) is None


def test_sampling_is_deterministic_for_a_key(engine, params):
    prefix, _ = prefill(engine, params, prompt(8, 16))
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95)

    def stream(seed):
        state = engine.bulk_insert(prefix, engine.init_decode_state(seed), [0, 1, 2, 3])
        out = []
        for _ in range(6):
            state, result = engine.generate(params, state, sampling=sampling)
            out.append(np.asarray(result.data)[:, 0])
        return np.stack(out)

    a, b, c = stream(1), stream(1), stream(2)
    assert (a == b).all()
    assert (a != c).any()
    assert len({tuple(col) for col in a.T}) > 1, "slots draw different samples"


# ---- bad input ---------------------------------------------------------------------------------


def test_prompt_beyond_limits(engine, params):
    with pytest.raises(ValueError, match="max_prefill_length"):
        engine.prefill(params=params, padded_tokens=np.zeros(PREFILL + 1, np.int32), true_length=3)
    prefix = None
    for _ in range(2):
        prefix, _ = prefill(engine, params, prompt(30, 17), existing_prefix=prefix)
    with pytest.raises(ValueError, match="max_target_length"):
        prefill(engine, params, prompt(5, 18), existing_prefix=prefix)
    with pytest.raises(ValueError, match="max_prefill_length"):
        engine.pad(prompt(PREFILL + 1, 19))


@pytest.mark.parametrize("true_length", [0, -1, 17])
def test_bad_true_length(engine, params, true_length):
    with pytest.raises(ValueError, match="true_length"):
        engine.prefill(params=params, padded_tokens=np.zeros(16, np.int32), true_length=true_length)


@pytest.mark.parametrize("slot", [-1, SLOTS, 100])
def test_slot_out_of_range(engine, params, slot):
    prefix, _ = prefill(engine, params, prompt(4, 20))
    with pytest.raises(ValueError, match=f"slot {slot} is out of range"):
        engine.insert(prefix, engine.init_decode_state(), slot)
    with pytest.raises(ValueError, match="out of range"):
        engine.free_resource(slot)


@pytest.mark.parametrize("bad_id", [-1, 384, 10**6])
def test_token_outside_vocabulary(engine, params, bad_id):
    tokens = np.array([1, 2, bad_id] + [0] * 13, np.int32)
    with pytest.raises(ValueError, match=f"token id {bad_id} is outside the vocabulary"):
        engine.prefill(params=params, padded_tokens=tokens, true_length=3)


def test_bad_types(engine, params):
    with pytest.raises(TypeError, match="integer token ids"):
        engine.prefill(params=params, padded_tokens=np.zeros(16, np.float32), true_length=3)
    with pytest.raises(TypeError, match="true_length"):
        engine.prefill(params=params, padded_tokens=np.zeros(16, np.int32), true_length=3.0)
    with pytest.raises(TypeError, match="existing_prefix"):
        engine.prefill(params=params, existing_prefix={}, padded_tokens=np.zeros(16, np.int32), true_length=3)


def test_params_that_do_not_match(engine, params):
    pure = nnx.to_pure_dict(params)
    pure["layers"][1]["mlp"]["up"] = np.zeros((128, 100), np.float32)
    with pytest.raises(ValueError, match=r"layers/1/mlp/up has shape \(128, 100\) but the model expects \(128, 384\)"):
        engine.load_params(pure)
    del pure["layers"][1]["mlp"]["up"]
    with pytest.raises(ValueError, match="layers/1/mlp/up is missing"):
        engine.load_params(pure)


def test_mesh_whose_tensor_axis_does_not_divide_the_heads():
    with pytest.raises(ValueError, match="tensor axis \\(3\\) does not divide the model's 8 heads"):
        make_engine({"tensor": 3})
    with pytest.raises(ValueError, match="needs 16 devices"):
        workbench.make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        workbench.make_mesh({"model": 2})


def test_layer_cache_names_one_layers_keys_and_values(engine, params):
    prefix, _ = prefill(engine, params, prompt(5, 0))
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    for layer in range(engine.config.num_layers):
        kv = state.layer_cache(layer)
        assert set(kv) == {"k", "v"} and kv["k"].shape == (SLOTS, TARGET, engine.config.num_kv_heads, 16)
        assert np.array_equal(np.asarray(kv["k"][1]), np.asarray(prefix.layer_cache(layer)["k"][0]))
        assert kv is workbench.engine.layer_cache(state.cache, layer)
