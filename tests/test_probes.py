"""Probes against independent truths: the uncached forward pass, edited params, another run.

Every test uses conftest's shared tiny ``engine`` (4 slots, prefill 32, target 64) with lively
params; the probe steps compile once per probe setting, so the file keeps the settings few.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SHAPE, SMALL, assert_close, lively_arrays, prefill, prompt
from workbench import inspect, probes, widgets

CAPTURE = probes.Capture()
LAYER, HEAD = 2, 5


def probe_prefill(engine, params, tokens, **probe_args):
    padded, n = engine.pad(tokens)
    return engine.prefill(params=params, padded_tokens=padded, true_length=n, **probe_args)


@pytest.fixture(scope="module")
def mid_step(engine, params):
    """Three live slots at different depths, two plain steps, then one captured step: per slot
    the tokens its cache holds plus the one fed in, and the captured result."""
    state, fed = engine.init_decode_state(), {}
    for slot, tokens in [(0, prompt(5, 10)), (1, prompt(13, 11)), (3, prompt(21, 12))]:
        prefix, _ = prefill(engine, params, tokens)
        state = engine.insert(prefix, state, slot)
        fed[slot] = tokens + [int(prefix.token)]
    for _ in range(2):
        state, result = engine.generate(params, state)
        for slot in fed:
            fed[slot].append(int(result.data[slot, 0]))
    state, result = engine.generate(params, state, probes=CAPTURE)
    return fed, state, result


def zero_head_rows(engine, params, layer, head):
    pure = nnx.to_pure_dict(params)
    pure["layers"][layer]["attn"]["o"] = pure["layers"][layer]["attn"]["o"].at[head].set(0.0)
    return engine.load_params(pure)


def heads_by_hand(engine, weights, values):
    """Each query head's output before ``o`` [rows, T, N, H], from captured weights [rows, N, T, S]
    and cached values [rows, S, K, H]."""
    groups = engine.config.num_heads // engine.config.num_kv_heads
    v = np.repeat(values[:, : weights.shape[-1]], groups, axis=2)  # [rows, S, N, H]
    return np.einsum("bnts,bsnh->btnh", weights, v)


def through_o(params, layer, heads):
    o = np.asarray(nnx.to_pure_dict(params)["layers"][layer]["attn"]["o"])  # [N, H, D]
    return np.einsum("btnh,nhd->btd", heads, o)


def heads_through_o(engine, params, layer, weights, values):
    """attn_out from captured weights [rows, N, T, S] and cached values [rows, S, K, H], by hand."""
    return through_o(params, layer, heads_by_hand(engine, weights, values))


def test_captured_weights_times_values_give_the_attention_output(engine, params, mid_step):
    prefix, result = probe_prefill(engine, params, prompt(12, 13), probes=CAPTURE)
    captured = result.captured
    assert captured.attention(LAYER).shape == (1, engine.config.num_heads, 12, 12)
    values = np.asarray(prefix.layer_cache(LAYER)["v"])
    assert_close(heads_through_o(engine, params, LAYER, captured.attention(LAYER), values), captured.attn_out(LAYER))
    _, state, step = mid_step  # generate: one query per slot over the keys up to the furthest slot
    values = np.asarray(state.layer_cache(LAYER)["v"])
    live = step.captured.live[:, 0]
    expected = heads_through_o(engine, params, LAYER, step.captured.attention(LAYER), values)
    assert_close(expected[live], step.captured.attn_out(LAYER)[live])


def test_generate_capture_equals_the_uncached_forward_mid_sequence(engine, params, mid_step):
    fed, _, result = mid_step
    step = result.captured
    assert step.attention(0).shape == (4, engine.config.num_heads, 1, max(len(t) for t in fed.values()))
    assert step.live[:, 0].tolist() == [True, True, False, True]
    slot, tokens = 1, fed[1]  # a slot in the middle, with a shorter and a longer one beside it
    logits, truth = probes.forward(engine, params, np.array([tokens]), CAPTURE)
    last, keys = len(tokens) - 1, len(tokens)
    assert int(step.positions[slot, 0]) == last
    for layer in range(engine.config.num_layers):
        for site in ("residual", "mlp", "attn_out"):
            assert_close(getattr(step, site)(layer)[slot, 0], getattr(truth, site)(layer)[0, last])
        assert_close(step.attention(layer)[slot, :, 0, :keys], truth.attention(layer)[0, :, last])
        assert np.all(step.attention(layer)[slot, :, 0, keys:] == 0)  # keys past the slot's own
    assert_close(step.logits[slot, 0], np.asarray(logits)[0, last])
    assert_close(result.logits[slot], np.asarray(logits)[0, last])


def test_ablating_a_head_equals_zero_rows_of_o(engine, params):
    tokens = prompt(14, 14)
    _, ablated = probe_prefill(engine, params, tokens, interventions=[probes.Ablate(LAYER, [HEAD])])
    assert ablated.captured is None  # interventions alone capture nothing
    truth = engine.forward(zero_head_rows(engine, params, LAYER, HEAD), np.array([tokens]))
    assert_close(ablated.logits[0], np.asarray(truth)[0, -1])
    plain = engine.forward(params, np.array([tokens]))
    assert np.abs(np.asarray(plain)[0, -1] - ablated.logits[0]).max() > 1e-3  # the head mattered


def test_per_slot_ablation_through_cached_decode(engine, params):
    """A request ablated from its prefill on, in slot 3 only (a slot mask), beside a plain one in
    slot 1: slot 3 follows the forward pass of the edited params, slot 1 the plain one."""
    ablate = probes.Ablate(LAYER, [HEAD])
    state, fed = engine.init_decode_state(), {}
    for slot, tokens, interventions in [(3, prompt(11, 20), [ablate]), (1, prompt(11, 21), None)]:
        prefix, _ = probe_prefill(engine, params, tokens, interventions=interventions)
        state = engine.insert(prefix, state, slot)
        fed[slot] = tokens + [int(prefix.token)]
    for _ in range(3):
        state, result = engine.generate(params, state, interventions=[dataclasses.replace(ablate, slots=[3])])
        for slot in fed:
            fed[slot].append(int(result.data[slot, 0]))
    for slot, weights in [(3, zero_head_rows(engine, params, LAYER, HEAD)), (1, params)]:
        truth = np.asarray(engine.forward(weights, np.array([fed[slot][:-1]])))[0]
        assert fed[slot][-4:] == truth[-4:].argmax(-1).tolist()
        assert_close(result.logits[slot], truth[-1])


def test_mean_ablation_averages_over_the_live_slots(engine, params):
    """Generate replaces the head by its mean over the live slots: with one live slot that is the
    head itself (nothing changes); with two, each slot gets the average of both."""
    one = engine.insert(prefill(engine, params, prompt(5, 23))[0], engine.init_decode_state(), 2)
    two = engine.insert(prefill(engine, params, prompt(8, 24))[0], jax.tree.map(jnp.copy, one), 0)
    mean = [probes.Ablate(LAYER, [HEAD], mode="mean")]
    for state, changes in [(one, False), (two, True)]:
        _, plain = engine.generate(params, jax.tree.map(jnp.copy, state))
        _, ablated = engine.generate(params, state, interventions=mean)
        assert np.allclose(ablated.logits[2], plain.logits[2], rtol=1e-5, atol=1e-5) != changes


def test_mean_ablation_value_is_the_heads_mean_over_the_live_queries(engine, params):
    """The value itself: the ablated head's output before ``o`` (captured weights x cached values,
    by hand) replaced by its mean over the step's live queries -- generate: the live slots (0 and
    2 of 4); prefill: the prompt's 12 tokens, not the 4 pads of its 16-bucket -- gives the
    captured attention output of the ablated step."""
    mean = [probes.Ablate(LAYER, [HEAD], mode="mean")]
    one = engine.insert(prefill(engine, params, prompt(5, 23))[0], engine.init_decode_state(), 2)
    two = engine.insert(prefill(engine, params, prompt(8, 24))[0], one, 0)
    state, step = engine.generate(params, two, probes=CAPTURE, interventions=mean)
    prefix, first = probe_prefill(engine, params, prompt(12, 25), probes=CAPTURE, interventions=mean)
    for captured, values, live in [
        (step.captured, state.layer_cache(LAYER)["v"], [0, 2]),
        (first.captured, prefix.layer_cache(LAYER)["v"], [0]),
    ]:
        heads = heads_by_hand(engine, captured.attention(LAYER), np.asarray(values))[live]  # [rows, T, N, H]
        head = heads[..., HEAD, :]  # [rows, T, H]
        assert np.abs(head - head.mean((0, 1))).max() > 0.1 * np.abs(head).max(), "the mean would change nothing"
        heads[..., HEAD, :] = heads[..., HEAD, :].mean((0, 1))
        assert_close(captured.attn_out(LAYER)[live], through_o(params, LAYER, heads))


def test_patching_all_of_run_b_gives_run_b(engine, params):
    a, b = prompt(10, 15), prompt(10, 16)
    _, run_a = probe_prefill(engine, params, a, probes=CAPTURE)
    _, run_b = probe_prefill(engine, params, b, probes=CAPTURE)
    patch = probes.Patch(1, "residual", range(10), run_b.captured.residual(1)[0])
    _, patched = probe_prefill(engine, params, a, probes=CAPTURE, interventions=[patch])
    assert_close(patched.captured.logits, run_b.captured.logits)
    nothing = probes.Patch(1, "residual", [], np.zeros((0, engine.config.embed_dim)))
    _, untouched = probe_prefill(engine, params, a, probes=CAPTURE, interventions=[nothing])
    assert np.array_equal(untouched.captured.logits, run_a.captured.logits)
    assert np.array_equal(untouched.logits, run_a.logits)


def test_steer_adds_to_the_residual(engine, params):
    tokens = prompt(9, 17)
    vector = np.random.default_rng(0).standard_normal(engine.config.embed_dim).astype(np.float32)
    _, plain = probe_prefill(engine, params, tokens, probes=CAPTURE)
    layer_0 = probes.Capture(layers=[0])
    _, steered = probe_prefill(engine, params, tokens, probes=layer_0, interventions=[probes.Steer(0, vector, 3.0)])
    assert steered.captured.layers == [0]
    with pytest.raises(ValueError, match=r"layer 1 was not captured: .* captured layers are \[0\]"):
        steered.captured.residual(1)
    assert_close(steered.captured.residual(0), plain.captured.residual(0) + 3.0 * vector)
    assert_close(steered.captured.attn_out(0), plain.captured.attn_out(0))  # before the steer
    assert not np.allclose(steered.logits, plain.logits, atol=1e-3)


def test_patch_and_steer_in_generate_equal_the_uncached_forward_with_the_same_edit(engine, params):
    """Through prefill, insert and cached decode: slot 3 steered after block 1 at every position
    (its prefill too), slot 1 patched after block 2 at the position of its second generated token,
    slot 0 untouched, in one batch (slot masks). Each slot's tokens and logits rows are the uncached
    forward's over its whole sequence with its own edit, and each edit changes the plain ones."""

    def forward(sequence, interventions):  # right-padded to one length: one compile per edit (causal)
        padded = np.zeros((1, engine.max_target_length), np.int32)
        padded[0, : len(sequence)] = sequence
        return np.asarray(probes.forward(engine, params, padded, interventions=interventions)[0])[0]

    rng = np.random.default_rng(3)
    d = engine.config.embed_dim
    steer = probes.Steer(1, rng.standard_normal(d).astype(np.float32), 2.0)
    requests = {3: (prompt(9, 26), [steer]), 1: (prompt(12, 27), []), 0: (prompt(7, 28), [])}
    patch = probes.Patch(2, "residual", [12 + 1], 3.0 * rng.standard_normal((1, d)))
    edits = {3: [steer], 1: [patch], 0: [probes.Steer(0, np.zeros(d))]}  # 0: a no-op steer, one compile
    state, fed, rows = engine.init_decode_state(), {}, {}
    for slot, (tokens, interventions) in requests.items():
        prefix, _ = probe_prefill(engine, params, tokens, interventions=interventions)
        state = engine.insert(prefix, state, slot)
        fed[slot], rows[slot] = tokens + [int(prefix.token)], [np.asarray(prefix.logits)]
    in_batch = [dataclasses.replace(steer, slots=[3]), dataclasses.replace(patch, slots=[1])]
    for _ in range(4):
        state, result = engine.generate(params, state, interventions=in_batch)
        for slot in fed:
            fed[slot].append(int(result.data[slot, 0]))
            rows[slot].append(np.asarray(result.logits[slot]))
    for slot, (tokens, _) in requests.items():
        rows_of = slice(len(tokens) - 1, len(fed[slot]) - 1)  # the rows the first token and 4 more came from
        truth = forward(fed[slot][:-1], edits[slot])[rows_of]
        assert fed[slot][len(tokens) :] == truth.argmax(-1).tolist(), f"slot {slot}"
        assert_close(np.stack(rows[slot]), truth)
        plain = forward(fed[slot][:-1], [probes.Steer(0, np.zeros(engine.config.embed_dim))])[rows_of]
        changed = np.abs(plain - truth).max(-1) > 1e-3 * np.abs(truth).max()
        # steered: every row; patched at position 13: its row and later ones (rows 11 to 15 compared)
        assert changed.tolist() == {3: [True] * 5, 1: [False, False, True, True, True], 0: [False] * 5}[slot]


def test_default_steps_keep_their_compile_counts(engine, params):
    tokens = prompt(6, 18)
    state = engine.insert(prefill(engine, params, tokens)[0], engine.init_decode_state(), 0)
    state, _ = engine.generate(params, state)  # the default programs, compiled by now
    before = dict(engine.compile_counts)
    _, first = probe_prefill(engine, params, tokens, probes=CAPTURE)
    assert engine.compile_counts["prefill+probes"] >= 1
    for heads in ([1], [2, 3]):  # another head, another layer, another slot: data, not a compile
        for layer in (0, 3):
            state, _ = engine.generate(params, state, interventions=[probes.Ablate(layer, heads, slots=[0])])
    patched = engine.compile_counts["prefill+probes"]
    for n in (3, 4):  # patches of 3 and 4 positions share a program (room for 4)
        patch = probes.Patch(0, "mlp_out", range(n), np.zeros((n, engine.config.embed_dim)))
        probe_prefill(engine, params, tokens, interventions=[patch])
    assert engine.compile_counts["prefill+probes"] == patched + 1
    state, plain = engine.generate(params, state)
    prefix, again = prefill(engine, params, tokens)
    assert engine.compile_counts["prefill"] == before["prefill"]
    assert engine.compile_counts["generate"] == before["generate"]
    assert engine.compile_counts["generate+probes"] - before.get("generate+probes", 0) <= 1
    assert plain.captured is None and again.captured is None
    assert int(again.data[0, 0]) == int(first.data[0, 0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: probes.Ablate(4, [0]), "Ablate: layer 4 is out of range: the model has layers 0..3"),
        (lambda: probes.Ablate(0, [8]), "Ablate: head 8 is out of range: layer 0 has heads 0..7"),
        (lambda: probes.Ablate(0, [1], mode="max"), "Ablate: mode must be one of"),
        (lambda: probes.Patch(0, "residual", [0, 1], np.zeros((2, 5))), r"Patch: values have shape \(2, 5\)"),
        (lambda: probes.Patch(0, "q", [0], np.zeros((1, 128))), "Patch: site must be one of"),
        (lambda: probes.Steer(0, np.zeros(3)), r"Steer: values have shape \(3,\), but the site takes \(128,\)"),
        (lambda: probes.Ablate(0, [1], slots=[7]), "Ablate: slots must be indices in 0..0"),
        (lambda: probes.Ablate(0, 1), "Ablate: heads must be a list of head indices, got 1"),
    ],
)
def test_bad_interventions_fail_in_one_line(engine, params, call, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        probe_prefill(engine, params, prompt(4, 19), interventions=[call()])
    assert "\n" not in str(error.value)


def test_overlapping_patches_fail_in_one_line(engine, params):
    first, second = np.zeros((2, 128)), np.zeros((1, 128))
    twice = [probes.Patch(1, "residual", [2, 3], first), probes.Patch(1, "residual", [3], second)]
    with pytest.raises(ValueError, match="Patch: residual of layer 1 at position 3 is patched twice"):
        probe_prefill(engine, params, prompt(4, 19), interventions=twice)


def test_bad_probes_fail_in_one_line(engine, params, mid_step):
    with pytest.raises(ValueError, match="Capture: layer 9 is out of range: the model has layers 0..3"):
        probe_prefill(engine, params, prompt(4, 19), probes=probes.Capture(layers=[9]))
    with pytest.raises(TypeError, match="probes must be a workbench.probes.Capture"):
        probe_prefill(engine, params, prompt(4, 19), probes="attention")
    _, plain = prefill(engine, params, prompt(4, 19))
    with pytest.raises(ValueError, match="this result was not captured: pass probes="):
        probes.captured(plain)
    with pytest.raises(ValueError, match="layer 9 was not captured"):
        mid_step[2].captured.residual(9)
    only_logits = dataclasses.replace(mid_step[2].captured, sites={})
    with pytest.raises(ValueError, match=r"mlp_out was not captured: pass .* with mlp=True"):
        only_logits.mlp(0)


def hand_capture(weights, tokens):
    """A Captured of one prefill row with the given attention weights [N, T, T] at layer 0."""
    t = weights.shape[1]
    positions = np.arange(t)[None]
    sites = {"attention": {0: weights[None]}}
    return probes.Captured(CAPTURE, np.asarray(tokens)[None], positions, np.ones((1, t), bool), sites, None)


def test_attention_report_summaries_by_hand():
    text = ["a", "(", "\n", "b", "c", "\n", "d"]
    previous = np.eye(7, k=-1)
    previous[0, 0] = 1.0
    first = np.zeros((7, 7))
    first[:, 0] = 1.0
    line = np.zeros((7, 7))
    for q, start in enumerate([0, 0, 0, 3, 3, 3, 6]):
        line[q, start] = 1.0
    spread = np.tril(np.ones((7, 7))) / np.arange(1, 8)[:, None]
    report = inspect.attention(hand_capture(np.stack([previous, first, line, spread]), range(7)), tokens=text)
    rows = report.to_rows()
    assert [r["role"] for r in rows] == ["previous", "first", "line start", "-"]
    assert rows[0]["previous"] == 1.0 and rows[0]["entropy"] == 0.0
    assert rows[2]["line_start"] == 1.0 and rows[1]["line_start"] == 0.0
    assert np.isclose(rows[3]["entropy"], np.mean(np.log(np.arange(1, 8))))
    np.testing.assert_allclose(report.pattern(0, 3), spread, rtol=1e-6)
    assert "layer  head  entropy  previous  first  line start  role" in str(report)
    assert "<table" in report._repr_html_()
    report.plot(), report.plot(0, 1)
    ids_only = inspect.attention(hand_capture(np.stack([previous] * 4), range(7)))
    assert ids_only.to_rows()[0]["line_start"] is None  # no text, no lines


def test_attention_over_prefill_and_generate_steps(engine, params):
    tokens = prompt(6, 22)
    prefix, first = probe_prefill(engine, params, tokens, probes=CAPTURE)
    state = engine.insert(prefix, engine.init_decode_state(), 2)
    state, step = engine.generate(params, state, probes=CAPTURE)
    report = inspect.attention([first, step], slot=2)
    assert report.positions == list(range(7))
    np.testing.assert_array_equal(report.pattern(1, 4)[6], step.captured.attention(1)[2, 4, 0])
    np.testing.assert_array_equal(report.pattern(1, 4)[:6, :6], first.captured.attention(1)[0, 4])
    assert np.allclose(report.pattern(1, 4).sum(-1), 1, atol=1e-5)
    # the logit lens's last layer is the model's own last step: its logits, read independently
    lens = inspect.logit_lens(first, engine, params, positions=[0, 5])
    final = first.captured.logits[0]
    expected = np.exp(final - final.max(-1, keepdims=True))
    assert_close(lens.probabilities[-1], expected / expected.sum(-1, keepdims=True))
    assert [r["position"] for r in lens.to_rows()] == [0, 5] * engine.config.num_layers
    lens.plot()
    with pytest.raises(ValueError, match="this result was not captured: pass probes="):
        inspect.attention(prefill(engine, params, tokens)[1])
    with pytest.raises(ValueError, match="position 9 was not captured"):
        inspect.logit_lens(first, engine, params, positions=[9])


def test_attention_explorer_steps_through_a_generation():
    previous = np.eye(7, k=-1)
    previous[0, 0] = 1.0
    whole = hand_capture(np.stack([previous] * 4), [97, 40, 10, 98, 99, 10, 100])
    prompt_step = dataclasses.replace(
        whole, tokens=whole.tokens[:, :6], positions=whole.positions[:, :6], live=whole.live[:, :6],
        sites={"attention": {0: whole.attention(0)[:, :, :6, :6]}},
    )  # fmt: skip
    generate_step = dataclasses.replace(
        whole, tokens=whole.tokens[:, 6:], positions=whole.positions[:, 6:], live=whole.live[:, 6:],
        sites={"attention": {0: whole.attention(0)[:, :, 6:]}},
    )  # fmt: skip
    explorer = widgets.AttentionExplorer([prompt_step, generate_step], tokens=list("a(\nbc\nd"))
    assert (explorer.step.max, explorer.step_positions) == (1, [5, 6])
    assert "query at position 6 ('d') read" in explorer.static_text()
    assert "head 0: 5 '\\n' 1.00" in explorer.static_text()
    explorer.step.value = 0
    assert "query at position 5 ('\\n') read" in explorer.static_text()
    assert "head 3: 4 'c' 1.00" in explorer.static_text()
    assert bytes(explorer.pattern_view.value).startswith(b"\x89PNG")
    bundle = explorer._repr_mimebundle_()
    assert bundle["text/plain"] == explorer.static_text() and "<pre>" in bundle["text/html"]


def test_a_scanned_capture_keeps_a_layer_of_nan():
    """Scanned layers record every layer stacked, and fill the routing rows of a pattern's dense
    layers (NaN weights, -1 ids) for the recorder to drop. A layer whose activations really are
    NaN (a step that overflowed) is captured as NaN, not dropped as a site it lacks."""
    engine = workbench.Engine(SMALL, workbench.make_mesh({"data": 1}), scan_layers=True, **SHAPE)
    arrays = lively_arrays(engine)
    arrays["layers"]["attn"]["o"][1] = np.nan  # the last layer's attention output, every value
    params = engine.load_params(arrays)
    seen = probes.captured(probe_prefill(engine, params, [5, 17, 33, 40, 61, 90], probes=probes.Capture())[1])
    assert seen.layers == [0, 1]
    assert np.isfinite(seen.residual(0)).all() and np.isnan(seen.attn_out(1)).all() and np.isnan(seen.residual(1)).all()
