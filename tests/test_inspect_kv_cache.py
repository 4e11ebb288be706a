"""inspect.kv_cache / kv_cache_diff / snapshot: what the engine's prefill, insert and generate wrote."""

import io
import re

import jax
import matplotlib
import numpy as np
import pytest

from workbench import inspect

matplotlib.use("Agg")

SLOTS, LAYERS, KV_HEADS = 4, 4, 4
PROMPTS = {1: [72, 101, 108, 108, 111], 2: list(range(40, 49)), 3: list(range(100, 113))}  # slot -> prompt


def prefill(engine, params, tokens):
    padded, n = engine.pad(tokens)
    return engine.prefill(params=params, padded_tokens=padded, true_length=n)[0]


@pytest.fixture(scope="module")
def prefixes(engine, params):
    return {slot: prefill(engine, params, tokens) for slot, tokens in PROMPTS.items()}


def insert_all(engine, prefixes):
    """A fresh decode state with PROMPTS inserted (slot 0 left empty)."""
    state = engine.init_decode_state()
    for slot, prefix in prefixes.items():
        state = engine.insert(prefix, state, slot)
    return state


@pytest.fixture(scope="module")
def filled(engine, prefixes):
    """A decode state with PROMPTS inserted, and its host snapshot."""
    state = insert_all(engine, prefixes)
    return state, inspect.snapshot(state)


def cache_k(tree, layer):
    return np.asarray(tree.cache["layers"][layer]["attn"]["cache"]["k"])


def test_filled_lengths_equal_the_inserted_prompt_lengths(filled):
    state, _ = filled
    report = inspect.kv_cache(state)
    rows = report.to_rows()
    assert len(rows) == LAYERS * SLOTS
    for row in rows:
        expected = len(PROMPTS.get(row["slot"], []))
        assert row["filled"] == expected and row["next_position"] == expected, row
        assert row["active"] == (row["slot"] in PROMPTS)
        assert (row["nan"], row["inf"]) == (0, 0)
        assert {"path", "shape", "dtype", "bytes"} <= set(row)
    assert sum(r["bytes"] for r in rows) == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.cache))
    assert report.notes == ()  # every active slot's writes agree with its next position
    assert report.to_tree()["layers"]["3"]["attn"]["cache"]["slot 2"]["filled"] == len(PROMPTS[2])


def test_max_abs_matches_the_cache_and_floats_print_rounded(filled):
    _, snap = filled
    report = inspect.kv_cache(snap)
    for row in report.to_rows():
        k = snap.cache["layers"][row["layer"]]["attn"]["cache"]["k"][row["slot"]]
        v = snap.cache["layers"][row["layer"]]["attn"]["cache"]["v"][row["slot"]]
        assert row["max_abs_k"] == pytest.approx(np.abs(k).max()) and row["max_abs_v"] == pytest.approx(np.abs(v).max())
    text = str(report)
    assert text == str(inspect.kv_cache(snap))
    numbers = re.findall(r"\d+\.\d+", text.split("\n", 1)[1])
    assert numbers and all(len(n.replace(".", "").lstrip("0")) <= 4 for n in numbers)


def test_nan_and_inf_are_counted_per_layer_and_slot(filled):
    snap = inspect.snapshot(filled[1])
    snap.cache["layers"][1]["attn"]["cache"]["k"][2, 3, 0, :4] = np.nan
    snap.cache["layers"][3]["attn"]["cache"]["v"][1, 0, 1, :2] = -np.inf
    rows = {(r["layer"], r["slot"]): r for r in inspect.kv_cache(snap).to_rows()}
    assert rows[(1, 2)]["nan"] == 4 and rows[(3, 1)]["inf"] == 2
    assert sum(r["nan"] for r in rows.values()) == 4 and sum(r["inf"] for r in rows.values()) == 2
    assert np.isfinite(rows[(3, 1)]["max_abs_v"])  # the max is over finite values


def test_a_prefix_holds_its_prompt(engine, params):
    report = inspect.kv_cache(prefill(engine, params, PROMPTS[2]))
    rows = [(r["slot"], r["filled"], r["next_position"], r["active"]) for r in report.to_rows()]
    assert rows == [(0, 9, 9, None)] * LAYERS
    assert "KV cache of a prefix" in str(report)


def test_the_diff_after_an_insert_names_exactly_that_slot(engine, params, prefixes):
    state = insert_all(engine, prefixes)
    before = inspect.snapshot(state)
    state = engine.insert(prefill(engine, params, [7, 8, 9]), state, 2)  # over a 9-token prompt
    diff = inspect.kv_cache_diff(before, state)
    assert diff.slots == (2,) and diff.layers == tuple(range(LAYERS))
    assert diff.positions == {2: tuple(range(9))}  # 3 new tokens, 6 stale positions cleared
    assert {(r["slot"], r["layer"]) for r in diff.to_rows()} == {(2, layer) for layer in range(LAYERS)}
    text = str(diff)
    assert "slots changed: 2;" in text and re.search(r"^\s+2\s+0-3\s+0-8\s+9\s+9->3\b", text, re.M), text
    # ... and the mask agrees with a direct comparison of the two caches.
    for layer in range(LAYERS):
        changed = np.any(cache_k(before, layer) != cache_k(state, layer), axis=(2, 3))
        assert not (changed & ~diff.mask[layer]).any()


def test_the_diff_after_generate_names_the_active_slots_at_their_positions(engine, params, prefixes):
    state = insert_all(engine, prefixes)
    before = inspect.snapshot(state)
    state, _ = engine.generate(params, state)
    diff = inspect.kv_cache_diff(before, state)
    assert diff.slots == tuple(sorted(PROMPTS))
    assert diff.positions == {slot: (len(tokens),) for slot, tokens in PROMPTS.items()}
    after = {(r["layer"], r["slot"]): r["filled"] for r in inspect.kv_cache(state).to_rows()}
    assert all(after[(layer, s)] == len(PROMPTS.get(s, [])) + (s in PROMPTS) for layer, s in after)


def test_a_donated_state_is_refused_with_the_snapshot_hint(engine, params):
    state = engine.init_decode_state()
    engine.generate(params, state)
    with pytest.raises(ValueError, match="snapshot"):
        inspect.kv_cache(state)
    with pytest.raises(ValueError, match="snapshot"):
        inspect.kv_cache_diff(state, engine.init_decode_state())
    with pytest.raises(ValueError, match="donated"):
        inspect.snapshot(state)


def test_bad_input_is_named(engine, params, filled):
    with pytest.raises(TypeError, match="must be a DecodeState, a Prefix or a cache dict"):
        inspect.kv_cache([1, 2])
    with pytest.raises(ValueError, match="no per-layer KV cache"):
        inspect.kv_cache({"x": np.zeros(3)})
    with pytest.raises(TypeError, match="same kind"):
        inspect.kv_cache_diff(filled[1], prefill(engine, params, [1]))
    report = inspect.kv_cache(filled[1])
    with pytest.raises(ValueError, match="slot= too"):
        report.plot(layer=0)
    with pytest.raises(ValueError, match="layer must be an int in 0..3"):
        report.plot(layer=4, slot=0)
    with pytest.raises(ValueError, match="pass layer= or slot="):
        report.plot(head=0)
    with pytest.raises(TypeError, match="tokens must be"):
        inspect.kv_cache(filled[1], tokens={1: 5}).plot(slot=1)


def render(fig):
    fig.savefig(io.BytesIO(), format="png")  # draws every artist with the Agg canvas
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_occupancy_map(filled):
    (ax,) = render(inspect.kv_cache(filled[1]).plot())
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("position", "slot")
    image = ax.get_images()[0].get_array()
    assert image.shape == (SLOTS, 14)  # up to slot 3's next position (13) inclusive
    for slot in range(SLOTS):
        n = len(PROMPTS.get(slot, []))
        assert (image[slot, :n] == LAYERS).all() and (image[slot, n:] == 0).all()


def test_slot_view_is_layers_by_positions_with_token_labels(filled):
    labels = "Hello"
    k_ax, v_ax = render(inspect.kv_cache(filled[1], tokens={1: labels}).plot(slot=1))
    assert (k_ax.get_title(), v_ax.get_title()) == ("|K|", "|V|")
    assert k_ax.get_ylabel() == "layer" and v_ax.get_xlabel() == "position"
    assert k_ax.get_images()[0].get_array().shape == (LAYERS, 6)  # 5 prompt positions + the next one
    assert [t.get_text() for t in v_ax.get_xticklabels()] == list(labels) + [""]


def test_layer_view_is_kv_heads_by_positions(filled):
    _, snap = filled
    k_ax, v_ax = render(inspect.kv_cache(snap, tokens=PROMPTS[3]).plot(layer=2, slot=3))
    assert k_ax.get_ylabel() == "kv head" and v_ax.get_xlabel() == "position"
    expected = np.linalg.norm(cache_k(snap, 2)[3, :14], axis=-1).T  # [kv heads, positions]
    np.testing.assert_allclose(k_ax.get_images()[0].get_array(), expected, rtol=1e-5)
    assert [t.get_text() for t in v_ax.get_xticklabels()] == [str(t) for t in PROMPTS[3]] + [""]
    head_k, _ = render(inspect.kv_cache(snap).plot(layer=2, slot=3, head=1))
    assert head_k.get_ylabel() == "head dim"
    np.testing.assert_allclose(head_k.get_images()[0].get_array(), cache_k(snap, 2)[3, :14, 1].T, rtol=1e-6)
    assert KV_HEADS == cache_k(snap, 2).shape[2]


def test_a_snapshot_survives_donation(engine, params, prefixes):
    state = insert_all(engine, prefixes)
    expected = np.array(cache_k(state, 0), copy=True)
    snap = inspect.snapshot(state)
    engine.generate(params, state)  # donates every array of state
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(snap))
    np.testing.assert_array_equal(cache_k(snap, 0), expected)
    assert snap.rng.dtype == np.uint32  # raw key data: numpy has no key type


def test_a_note_flags_writes_that_disagree_with_the_next_position(filled):
    snap = inspect.snapshot(filled[1])
    for name in ("k", "v"):
        snap.cache["layers"][0]["attn"]["cache"][name][2, 4] = 0  # erase one position of slot 2
    assert inspect.kv_cache(snap).notes == ("layer 0 slot 2: 8 positions filled, next position 9",)


def test_diff_tolerance_counts_only_rows_off_by_more_than_atol():
    # Two layers of [2 slots, 8 positions, 2 kv heads, 4 dims], changed by hand: the truth is the list below.
    before = {
        "layers": {
            i: {"attn": {"cache": {"k": np.zeros((2, 8, 2, 4), np.float32), "v": np.zeros((2, 8, 2, 4), np.float32)}}}
            for i in range(2)
        }
    }
    before["layers"][0]["attn"]["cache"]["k"][1, 2, 0, 0] = np.nan  # NaN in both: not a change
    before["layers"][1]["attn"]["cache"]["v"][0, 6, 1, 3] = np.inf  # inf in both: not a change
    after = jax.tree.map(np.copy, before)
    after["layers"][0]["attn"]["cache"]["k"][0, 3, 1, 2] += 1e-6  # rounding noise
    after["layers"][1]["attn"]["cache"]["v"][1, 5, 0, 0] += 1e-3  # a real change
    after["layers"][1]["attn"]["cache"]["k"][0, 7, 0, 1] = np.nan  # a value became NaN
    exact, tolerant = inspect.kv_cache_diff(before, after), inspect.kv_cache_diff(before, after, atol=1e-5)
    assert set(zip(*np.nonzero(exact.mask))) == {(0, 0, 3), (1, 1, 5), (1, 0, 7)}
    assert set(zip(*np.nonzero(tolerant.mask))) == {(1, 1, 5), (1, 0, 7)}
    assert (exact.atol, tolerant.atol) == (0.0, 1e-5)
    assert "3 K/V rows changed (any bit)" in str(exact)
    assert "2 K/V rows changed (by more than 1e-05)" in str(tolerant)
    assert tolerant.positions == {0: (7,), 1: (5,)}
    for bad in (-1.0, "1e-5", True, float("nan")):
        with pytest.raises(ValueError, match="atol must be a non-negative number"):
            inspect.kv_cache_diff(before, after, atol=bad)


def test_diff_with_tolerance_ignores_rounding_between_buckets(engine, params):
    # The same prompt prefilled in two buckets: different programs, equal in theory. Keys and values
    # reach about 5 in size here, and on some CPUs (CI's, under jax 0.12) a row differed by just over
    # 1e-5 between the buckets: the tolerance is 1e-4, still far below any real change.
    tokens = list(range(60, 73))
    small = engine.prefill(params=params, padded_tokens=engine.pad(tokens)[0], true_length=len(tokens))[0]
    padded = np.full(32, engine.config.pad_id, np.int32)
    padded[: len(tokens)] = tokens
    large = engine.prefill(params=params, padded_tokens=padded, true_length=len(tokens))[0]
    assert not inspect.kv_cache_diff(small, large, atol=1e-4).mask.any()
