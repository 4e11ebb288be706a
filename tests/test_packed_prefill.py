"""Packed prefill: several prompts in one row, kept apart by segment ids. Each packed prefix must
equal its own separate prefill (cache rows and logits within 1e-5, the same first token), and
generation from it must equal the uncached forward pass; the scheduler packs on request."""

import jax
import numpy as np
import pytest

import workbench
from helpers import SMALL, assert_close, assert_greedy_continuation, forward_rows, lively_params, prefill, prompt
from workbench.engine.packing import pack
from workbench.engine.scheduler import Scheduler

PROMPTS = [prompt(5, 10), prompt(9, 11), prompt(3, 12), prompt(12, 13)]  # 29 tokens: one row of 32


@pytest.fixture(scope="module")
def packed(engine, params):
    return engine.prefill_concat(params=params, prompts=PROMPTS)


def test_each_packed_prefix_equals_its_own_prefill(engine, params, packed):
    for tokens, (prefix, result) in zip(PROMPTS, packed):
        alone, _ = prefill(engine, params, tokens)
        assert int(prefix.length) == len(tokens) and int(prefix.token) == int(alone.token)
        assert np.asarray(result.data).tolist() == [[int(alone.token), 1, 1]]
        assert_close(prefix.logits, alone.logits)
        for ours, theirs in zip(jax.tree.leaves(prefix.cache), jax.tree.leaves(alone.cache)):
            assert ours.shape == theirs.shape and ours.sharding == theirs.sharding
            assert_close(ours, theirs)  # rows past the prompt are zero in both
    assert engine.compile_counts["prefill_concat"] == 1


def test_generation_from_packed_prefixes_equals_the_forward(engine, params, packed):
    state = engine.init_decode_state()
    for slot, (prefix, _) in enumerate(packed):
        state = engine.insert(prefix, state, slot)
    generated = [[int(prefix.token)] for prefix, _ in packed]
    for _ in range(4):
        state, result = engine.generate(params, state)
        for slot, tokens in enumerate(generated):
            tokens.append(int(result.data[slot, 0]))
    for tokens, continuation in zip(PROMPTS, generated):
        assert_greedy_continuation(engine, params, tokens, continuation)


def test_segments_restart_positions_and_pad_past_the_cache():
    layout = pack([[4, 5, 6], [7, 8]], pad_id=0, vocab_size=10, max_prefill_length=32, cache_length=64)
    assert layout.tokens.tolist() == [4, 5, 6, 7, 8] + [0] * 11
    assert layout.positions.tolist() == [0, 1, 2, 0, 1] + [64] * 11
    assert layout.segments.tolist() == [0, 0, 0, 1, 1] + [0] * 11
    assert layout.last.tolist() == [2, 4]


def test_sliding_window_packs_too():
    """A Mistral-style window (4) shorter than the prompts: the mask is window and segment."""
    config = SMALL.replace(sliding_window=4)
    engine = workbench.Engine(
        config, workbench.make_mesh({"data": 1}), decode_batch_size=1, max_prefill_length=32, max_target_length=32
    )
    params = lively_params(engine)
    prompts = [[t % config.vocab_size for t in prompt(n, n)] for n in (7, 10, 6)]
    for tokens, (prefix, _) in zip(prompts, engine.prefill_concat(params=params, prompts=prompts)):
        assert_close(prefix.logits, forward_rows(engine, params, tokens)[-1])


def test_scheduler_packs_waiting_prompts(engine, params):
    prompts = [prompt(4, 20), prompt(10, 21), prompt(7, 22), prompt(40, 23), prompt(6, 24)]
    scheduler = Scheduler(engine, params, pack_prefill=True)
    for p in prompts:
        scheduler.submit(p, max_new_tokens=3, ignore_eos=True)
    for c in scheduler.run():
        assert_greedy_continuation(engine, params, c.request.prompt, c.tokens)
    details = [(e.request, e.detail) for e in scheduler.events if e.kind == "prefill"]
    # 4 + 10 + 7 pack; 40 tokens do not fit a row of 32 (chunked, alone); 6 waits for a free slot
    assert details == [(0, "packed"), (1, "packed"), (2, "packed"), (3, "2 chunk(s)"), (4, "1 chunk(s)")]


def test_bad_input(engine, params):
    with pytest.raises(ValueError, match=r"3 prompts of 36 tokens in all do not fit one packed row of .* \(32\)"):
        engine.prefill_concat(params=params, prompts=[prompt(12, 0)] * 3)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        engine.prefill_concat(params=params, prompts=[])
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty list of token ids"):
        engine.prefill_concat(params=params, prompts=[[1, 2], []])
    with pytest.raises(ValueError, match="token id 999 is outside the vocabulary"):
        engine.prefill_concat(params=params, prompts=[[1, 999]])
