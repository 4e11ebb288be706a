"""Sliding layers keep a ring of their window (model/ring.py), and nothing else changes.

Truths: the same engine with full-length caches (``ring_cache=False``) -- every token identical
and every logits row within 1e-5 of the largest -- and the uncached forward pass (greedy
continuations). Prompts are longer than the window, chunks longer than it, several requests go
through fewer slots, and decoding runs far past the window.
"""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SMALL, assert_close, forward_rows, lively_arrays, prefill, prefill_chunks
from workbench import inspect, probes
from workbench.engine import compiled
from workbench.model.attention import Attention
from workbench.model.layers import Rotary
from workbench.model.scan import stack_layers
from workbench.trees import leaf_paths

matplotlib.use("Agg")

WINDOW = 6
CONFIG = SMALL.replace(sliding_window=WINDOW, layer_types=("sliding_attention", "full_attention"))
SHAPE = dict(decode_batch_size=2, max_prefill_length=16, max_target_length=48)
PROMPTS = [np.random.default_rng(n).integers(3, 96, size=n).tolist() for n in (10, 25, 13)]


@pytest.fixture(scope="module")
def pair():
    """(ring engine, full-length engine), the same params on each."""
    mesh = workbench.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    engines = [workbench.Engine(CONFIG, mesh, ring_cache=ring, **SHAPE) for ring in (True, False)]
    arrays = lively_arrays(engines[0])
    return [(engine, engine.load_params(arrays)) for engine in engines]


def serve(engine, params, snapshots=None):
    """Three requests through two slots: A and B (B chunked, its first chunk longer than the
    window) decode 9 steps, then C replaces A in slot 0 and both decode 9 more. Returns each
    request's tokens and logits rows."""
    tokens, rows = {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}
    state = engine.init_decode_state()
    for request, slot in ((0, 0), (1, 1)):
        prefix = prefill_chunks(engine, params, PROMPTS[request])
        tokens[request].append(int(prefix.token))
        rows[request].append(np.asarray(prefix.logits))
        state = engine.insert(prefix, state, slot)
    owner = {0: 0, 1: 1}
    for step in range(18):
        if step == 9:  # over A's ring and cache, no free needed
            prefix, _ = prefill(engine, params, PROMPTS[2])
            tokens[2].append(int(prefix.token))
            rows[2].append(np.asarray(prefix.logits))
            state = engine.insert(prefix, state, 0)
            owner[0] = 2
        if snapshots is not None and step == 16:
            snapshots.append(inspect.snapshot(state))
        state, result = engine.generate(params, state)
        for slot, request in owner.items():
            tokens[request].append(int(result.data[slot, 0]))
            rows[request].append(np.asarray(result.logits[slot]))
        if snapshots is not None and step == 16:
            snapshots.append(inspect.snapshot(state))
    return tokens, {request: np.stack(r) for request, r in rows.items()}


@pytest.fixture(scope="module")
def served(pair):
    snapshots = []
    ring = serve(*pair[0], snapshots)
    return ring, serve(*pair[1]), snapshots


def test_ring_layers_hold_their_window_and_full_layers_every_position(pair):
    (ring, _), (full, _) = pair
    shapes = {path: leaf.shape for path, leaf in leaf_paths(ring.abstract_decode_cache).items()}
    assert shapes == {
        "layers/0/attn/cache/k": (2, WINDOW, 2, 8),
        "layers/0/attn/cache/v": (2, WINDOW, 2, 8),
        "layers/0/attn/cache/held": (2, WINDOW),
        "layers/1/attn/cache/k": (2, 48, 2, 8),
        "layers/1/attn/cache/v": (2, 48, 2, 8),
    }
    assert {leaf.shape for leaf in leaf_paths(full.abstract_decode_cache).values()} == {(2, 48, 2, 8)}


def test_a_gemma3_pattern_keeps_about_a_sixth():
    """Five sliding layers to one global, window 64 of 2048 positions: (5 * 64 + 2048) / (6 * 2048)."""
    config = SMALL.replace(
        num_layers=6, sliding_window=64, layer_types=("sliding_attention",) * 5 + ("full_attention",)
    )

    def cache_bytes(ring):
        model = nnx.eval_shape(lambda: compiled.model(config, (8, 2048, ring)))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Cache)))

    ratio = cache_bytes(True) / cache_bytes(False)
    assert abs(ratio - (5 * 64 + 2048) / (6 * 2048)) < 0.01 and ratio < 0.2


def assert_uncached(pair, prompt, tokens, rows):
    """``tokens`` (the first included) are the uncached forward pass's greedy continuation of
    ``prompt`` and ``rows`` [len(tokens), V] its logits rows."""
    expected = forward_rows(*pair[1], list(prompt) + list(tokens[:-1]))[len(prompt) - 1 :]
    assert list(tokens) == expected.argmax(-1).tolist()
    assert_close(rows, expected)


def test_ring_serves_the_same_tokens_and_logits_as_full_length_caches(pair, served):
    (ring_tokens, ring_rows), (full_tokens, full_rows), _ = served
    assert ring_tokens == full_tokens
    for request, prompt in enumerate(PROMPTS):
        assert len(ring_tokens[request]) > 8
        assert_close(ring_rows[request], full_rows[request])
        assert_uncached(pair, prompt, ring_tokens[request], ring_rows[request])


def test_packed_prompts_and_multisampling_fill_rings(pair):
    engine, params = pair[0]
    prompts = PROMPTS[0][:7], PROMPTS[1][:9]  # each longer than the window, packed in one row
    packed = engine.prefill_concat(params=params, prompts=list(prompts))
    padded, n = engine.pad(PROMPTS[2])
    sampled, _ = engine.prefill_multisampling(params=params, padded_tokens=padded, true_length=n, num_samples=2)
    for prompts, inserts in (
        (prompts, [(p, [s]) for s, (p, _) in enumerate(packed)]),
        ([PROMPTS[2]] * 2, [(sampled, [0, 1])]),
    ):
        state = engine.init_decode_state()
        for prefix, slots in inserts:
            state = engine.bulk_insert(prefix, state, slots)
        tokens = [[int(t)] for t in np.asarray(state.tokens)]
        rows = [[np.asarray(prefix.logits)] for prefix, slots in inserts for _ in slots]
        for _ in range(3):
            state, result = engine.generate(params, state)
            for slot in range(2):
                tokens[slot].append(int(result.data[slot, 0]))
                rows[slot].append(np.asarray(result.logits[slot]))
        for slot, prompt in enumerate(prompts):
            assert_uncached(pair, prompt, tokens[slot], np.stack(rows[slot]))


def run_model(model, chunks, steps):
    """Logits rows of ``chunks`` prefilled one after another (batch 1), then ``steps`` greedy
    steps: one jit, the decode steps in a scan."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        model, rows, start = nnx.merge(graphdef, state, copy=True), [], 0
        for chunk in chunks:
            rows.append(model(jnp.asarray([chunk]), jnp.arange(start, start + len(chunk))[None])[0])
            start += len(chunk)

        def step(carry, position):
            state, token = carry
            model = nnx.merge(graphdef, state, copy=True)
            logits = model(token.reshape(1, 1), position.reshape(1, 1))[0, 0]
            return (nnx.state(model), jnp.argmax(logits)), logits

        carry = (nnx.state(model), jnp.argmax(rows[-1][-1]))
        _, decoded = jax.lax.scan(step, carry, jnp.arange(start, start + steps))
        return jnp.concatenate([*rows, decoded])

    return np.asarray(run(state))


def test_a_scanned_model_of_rings_equals_the_uncached_forward():
    """Mistral-style (every layer sliding) with scanned layers: chunks of 9 and 3 tokens (longer
    and shorter than the window), then 12 greedy decode steps."""
    config = SMALL.replace(sliding_window=5)
    with nnx.use_eager_sharding(False):
        ring = workbench.Transformer(config, rngs=nnx.Rngs(0), cache=(1, 32), scan_layers=True)
        uncached = workbench.Transformer(config, rngs=nnx.Rngs(0))
    assert nnx.state(ring, nnx.Cache)["layers"]["attn"]["cache"]["k"].shape == (2, 1, 5, 2, 8)
    rng = np.random.default_rng(0)  # lively weights, as helpers.lively_arrays draws them
    draw = lambda x: (
        1 + 0.1 * rng.standard_normal(x.shape)
        if x.ndim == 1
        else 2 * rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
    ).astype(np.float32)  # noqa: E731
    pure = jax.tree.map(draw, nnx.to_pure_dict(nnx.state(uncached, nnx.Param)))
    for model, layout in ((uncached, pure), (ring, stack_layers(pure))):
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, layout)
        nnx.update(model, state)
    chunks = [PROMPTS[1][:9], PROMPTS[1][9:12]]
    rows = run_model(ring, chunks, 12)
    tokens = [*chunks[0], *chunks[1], *rows.argmax(-1)[11:-1]]
    expected = np.asarray(jax.jit(lambda m, t: m(t))(uncached, jnp.asarray([tokens]))[0])
    assert rows.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert_close(rows, expected)


def test_an_int8_ring_equals_full_length_int8_caches():
    """One sliding attention layer with int8 keys and values: chunks of 9 and 3 positions, then 12
    single positions, the ring against a full-length int8 cache."""
    config = CONFIG.replace(kv_cache_dtype="int8")
    x = jnp.asarray(10 * np.random.default_rng(1).standard_normal((1, 24, config.embed_dim)), jnp.float32)
    spans = [(0, 9), (9, 12)] + [(p, p + 1) for p in range(12, 24)]
    out = []
    for ring in (True, False):
        with nnx.use_eager_sharding(False):
            attention, rotary = Attention(config, rngs=nnx.Rngs(0), cache=(1, 32, ring)), Rotary(config)

        @jax.jit
        def run(attention):
            positions = [jnp.arange(a, b)[None] for a, b in spans]
            return jnp.concatenate([attention(x[:, a:b], p, rotary(p))[0] for (a, b), p in zip(spans, positions)])

        out.append(np.asarray(run(attention)))
    assert_close(out[0], out[1])


def test_probes_see_ring_keys_at_their_absolute_positions(pair):
    weights = []
    for engine, params in pair:
        prefix = prefill_chunks(engine, params, PROMPTS[1][:16])
        padded, n = engine.pad(PROMPTS[1][16:25])  # a second chunk: the ring as it was + its own keys
        _, first = engine.prefill(
            params=params, existing_prefix=prefix, padded_tokens=padded, true_length=n, probes=probes.Capture()
        )
        weights.append(first.captured.attention(0))
    assert weights[0].shape == weights[1].shape == (1, 4, 9, 25)
    assert_close(weights[0], weights[1])
    assert not weights[0][0, :, -1, : 25 - WINDOW].any()  # nothing outside the window


def test_kv_cache_report_reads_the_ring(pair, served):
    engine, _ = pair[0]
    before, after = served[2]
    report = inspect.kv_cache(after)
    nexts = np.asarray(after.positions)  # slot 0: request C, slot 1: request B
    rows = {(r["layer"], r["slot"]): r for r in report.to_rows()}
    for slot, next_position in enumerate(nexts):
        ring = rows[(0, slot)]
        assert ring["window"] == WINDOW and ring["head"] == next_position % WINDOW
        assert ring["holds"] == f"{next_position - WINDOW}-{next_position - 1}" and ring["filled"] == WINDOW
        assert rows[(1, slot)]["filled"] == next_position and "window" not in rows[(1, slot)]
    assert report.notes == ()
    assert "sliding layers 0 keep rings of 6 slots" in str(report) and "holds" in str(report)
    view = report.ring(0, 1)
    # an independent statement of the ring: slot s holds the newest position = s (mod W) below next
    expected = [max(p for p in range(nexts[1]) if p % WINDOW == s) for s in range(WINDOW)]
    assert [r["position"] for r in view.rows] == expected
    assert [r["head"] for r in view.rows] == [s == nexts[1] % WINDOW for s in range(WINDOW)]
    assert f"write head is at slot {nexts[1] % WINDOW}" in str(view)
    with pytest.raises(ValueError, match="layer 1 is not a ring"):
        report.ring(1, 0)
    for figure in (report.plot(), report.plot(slot=1), report.plot(layer=0, slot=1), view.plot()):
        assert figure.axes
    diff = inspect.kv_cache_diff(before, after)  # one generate step: each slot's next position
    assert diff.positions == {slot: (int(p) - 1,) for slot, p in enumerate(nexts)}
    assert diff.layers == (0, 1)
    assert inspect.state(engine, pair[0][1], engine.init_decode_state()).ring_saving == {
        "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(after.cache)),
        "full_length_bytes": 2 * 2 * (2 * 48 * 2 * 8 * 4),
    }
