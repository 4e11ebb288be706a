"""Sliding layers keep a ring of their window (model/ring.py), and nothing else changes.

Truths: the uncached forward pass (every token its greedy continuation, every logits row within
1e-5 of the largest) for the engine and for scanned layers, and a full-length cache (the ring
off) for int8 attention. Prompts are longer than the window, chunks longer than it, several
requests go through fewer slots, and decoding runs far past the window. One engine serves every
engine check, and each model-level check is one jit: each compile costs test time.
"""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SMALL, assert_close, forward_rows, lively_params, prefill, prefill_chunks
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
def served_by():
    """(engine, params): rings for the sliding layer, on a 2x2 mesh."""
    engine = workbench.Engine(CONFIG, workbench.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]), **SHAPE)
    return engine, lively_params(engine)


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
def served(served_by):
    snapshots = []
    return (*serve(*served_by, snapshots), snapshots)


def test_ring_layers_hold_their_window_and_full_layers_every_position(served_by):
    engine = served_by[0]
    shapes = {path: leaf.shape for path, leaf in leaf_paths(engine.abstract_decode_cache).items()}
    assert shapes == {
        "layers/0/attn/cache/k": (2, WINDOW, 2, 8),
        "layers/0/attn/cache/v": (2, WINDOW, 2, 8),
        "layers/0/attn/cache/held": (2, WINDOW),
        "layers/1/attn/cache/k": (2, 48, 2, 8),
        "layers/1/attn/cache/v": (2, 48, 2, 8),
    }
    full = nnx.eval_shape(lambda: compiled.model(CONFIG, (2, 48, False)))  # the ring off
    assert {leaf.shape for leaf in jax.tree.leaves(nnx.state(full, nnx.Cache))} == {(2, 48, 2, 8)}


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


def assert_uncached(served_by, prompt, tokens, rows):
    """``tokens`` (the first included) are the uncached forward pass's greedy continuation of
    ``prompt`` and ``rows`` [len(tokens), V] its logits rows."""
    expected = forward_rows(*served_by, list(prompt) + list(tokens[:-1]))[len(prompt) - 1 :]
    assert list(tokens) == expected.argmax(-1).tolist()
    assert_close(rows, expected)


def test_rings_serve_the_uncached_models_tokens_and_logits(served_by, served):
    tokens, rows, _ = served
    for request, prompt in enumerate(PROMPTS):
        assert len(tokens[request]) > WINDOW
        assert_uncached(served_by, prompt, tokens[request], rows[request])


def test_packed_prompts_and_multisampling_fill_rings(served_by):
    engine, params = served_by
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
            assert_uncached(served_by, prompt, tokens[slot], np.stack(rows[slot]))


def build(config, **options):
    """A Transformer to build inside a jit: its init becomes part of the one compiled program
    (built eagerly, each init op would compile on its own)."""
    with nnx.use_eager_sharding(False):
        return workbench.Transformer(config, rngs=nnx.Rngs(0), **options)


def test_a_scanned_model_of_rings_equals_the_uncached_forward():
    """Mistral-style (every layer sliding) with scanned layers: a chunk of 9 tokens (longer than
    the window), then 8 greedy decode steps (a scan), against the uncached forward pass over the
    tokens they chose -- all in one jit."""
    config, prompt, steps = SMALL.replace(sliding_window=5), jnp.asarray([PROMPTS[1][:9]]), 8
    rng = np.random.default_rng(0)  # lively weights, as helpers.lively_arrays draws them
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(config)), nnx.Param))
    pure = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)
    pure = jax.tree.map(lambda x: 1 + 0.1 * x if x.ndim == 1 else 2 * x / np.sqrt(x.shape[0]), pure)

    @jax.jit
    def run(pure):
        ring, uncached = build(config, cache=(1, 32), scan_layers=True), build(config)
        for model, layout in ((ring, stack_layers(pure)), (uncached, pure)):
            state = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(state, layout)
            nnx.update(model, state)
        graphdef, cache, rest = nnx.split(ring, nnx.Cache, ...)
        first = ring(prompt, jnp.arange(9)[None])[0]  # [9, V]

        def step(carry, position):
            cache, token = carry
            model = nnx.merge(graphdef, cache, rest, copy=True)
            logits = model(token.reshape(1, 1), position.reshape(1, 1))[0, 0]
            return (nnx.state(model, nnx.Cache), jnp.argmax(logits)), logits

        carry = (nnx.state(ring, nnx.Cache), jnp.argmax(first[-1]))
        _, decoded = jax.lax.scan(step, carry, jnp.arange(9, 9 + steps))
        rows = jnp.concatenate([first, decoded])
        tokens = jnp.concatenate([prompt[0], jnp.argmax(rows, -1)[8:-1]])
        return ring.layers.attn.cache.k.shape, rows, uncached(tokens[None])[0]

    shape, rows, expected = run(pure)
    assert shape == (2, 1, 5, 2, 8)
    rows, expected = np.asarray(rows), np.asarray(expected)
    assert rows.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert_close(rows, expected)


def test_an_int8_ring_equals_full_length_int8_caches():
    """One sliding attention layer with int8 keys and values: chunks of 9 and 3 positions, then a
    single position (the ring wraps), against a full-length int8 cache (one jit for both, the
    layers built inside it over the same weights). Float rings meet the uncached forward above."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 14, CONFIG.embed_dim)), jnp.float32)
    with nnx.use_eager_sharding(False):
        abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Attention(CONFIG, rngs=nnx.Rngs(0))), nnx.Param))
    weights = {
        name: rng.standard_normal(a.shape).astype(np.float32) / np.sqrt(a.shape[0]) for name, a in abstract.items()
    }
    spans = [(0, 9), (9, 12), (12, 13)]

    @jax.jit
    def run(x, weights):
        out = {}
        with nnx.use_eager_sharding(False):
            rotary = Rotary(CONFIG)
            for ring in (True, False):
                layer = Attention(CONFIG.replace(kv_cache_dtype="int8"), rngs=nnx.Rngs(0), cache=(1, 32, ring))
                state = nnx.state(layer, nnx.Param)  # the init is dead code: no RNG compiled
                nnx.replace_by_pure_dict(state, weights)
                nnx.update(layer, state)
                rows = []
                for a, b in spans:
                    positions = jnp.arange(a, b)[None]
                    rows.append(layer(x[:, a:b], positions, rotary(positions))[0])
                out[ring] = jnp.concatenate(rows)
        return out

    out = run(x, weights)
    assert_close(out[True], out[False])


def test_probes_see_ring_keys_at_their_absolute_positions(served_by):
    engine, params = served_by
    capture = probes.Capture(residual=False, mlp=False, logits=False, layers=(0,))
    prefix = prefill_chunks(engine, params, PROMPTS[1][:16])
    padded, n = engine.pad(PROMPTS[1][16:25])  # a second chunk: the ring as it was + its own keys
    _, first = engine.prefill(
        params=params, existing_prefix=prefix, padded_tokens=padded, true_length=n, probes=capture
    )
    weights = first.captured.attention(0)
    _, uncached = probes.forward(engine, params, np.asarray([PROMPTS[1]]), capture)
    assert weights.shape == (1, 4, 9, 25)
    assert_close(weights, uncached.attention(0)[:, :, 16:25, :25])
    assert not weights[0, :, -1, : 25 - WINDOW].any()  # nothing outside the window


def test_kv_cache_report_reads_the_ring(served_by, served):
    engine, params = served_by
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
    # the head slot holds the position the next write replaces, outside the next query's window
    assert [r["live"] for r in view.rows] == [s != nexts[1] % WINDOW for s in range(WINDOW)]
    assert f"write head is at slot {nexts[1] % WINDOW}" in str(view)
    with pytest.raises(ValueError, match="layer 1 is not a ring"):
        report.ring(1, 0)
    for figure in (report.plot(), report.plot(layer=0, slot=1), view.plot()):
        assert figure.axes
    diff = inspect.kv_cache_diff(before, after)  # one generate step: each slot's next position
    assert diff.positions == {slot: (int(p) - 1,) for slot, p in enumerate(nexts)}
    assert diff.layers == (0, 1)
    assert inspect.state(engine, params, engine.init_decode_state()).ring_saving == {
        "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(after.cache)),
        "full_length_bytes": 2 * 2 * (2 * 48 * 2 * 8 * 4),
    }
