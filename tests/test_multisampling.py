"""Multisampling: one prefill, several first tokens. Greedy samples are the forward pass's argmax;
sampled ones follow the softmax of the prefill's logits (total variation over many draws);
bulk_insert gives slot ``slots[i]`` sample i, and each slot then continues as the uncached
forward pass says. The scheduler and ``generate --num-samples`` run requests this way."""

import contextlib
import io

import jax
import numpy as np
import pytest

import workbench
from helpers import SMALL, assert_close, assert_greedy_continuation, forward_rows, lively_params, prompt
from workbench import Sampling
from workbench.cli import main
from workbench.engine.sampling import probabilities
from workbench.engine.scheduler import Scheduler

HOT = Sampling(temperature=1.5)


def multisample(engine, params, tokens, n, sampling=None, rng=None):
    padded, length = engine.pad(tokens)
    return engine.prefill_multisampling(
        params=params, padded_tokens=padded, true_length=length, num_samples=n, sampling=sampling, rng=rng
    )


def test_greedy_samples_are_the_argmax(engine, params):
    tokens = prompt(11, 0)
    prefix, result = multisample(engine, params, tokens, 4)
    row = forward_rows(engine, params, tokens)[-1]
    assert_close(prefix.logits, row)
    assert np.asarray(result.data).tolist() == [[int(row.argmax()), 1, 1]] * 4
    assert np.asarray(prefix.token).tolist() == [int(row.argmax())] * 4 and int(prefix.length) == 11


def total_variation(counts, probs):
    return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def test_sampled_first_tokens_follow_the_softmax():
    """4096 draws (32 calls x 128 samples) against the softmax of the prefill's own logits."""
    engine = workbench.Engine(
        SMALL, workbench.make_mesh({"data": 1}), decode_batch_size=128, max_prefill_length=16, max_target_length=32
    )
    params = lively_params(engine)
    tokens = [t % SMALL.vocab_size for t in prompt(7, 1)]
    row = forward_rows(engine, params, tokens)[-1]
    counts = np.zeros(SMALL.vocab_size)
    for seed in range(32):
        prefix, result = multisample(engine, params, tokens, 128, HOT, jax.random.key(seed))
        np.add.at(counts, np.asarray(result.data)[:, 0], 1)
    assert engine.compile_counts["prefill_multisampling"] == 1
    expected = np.asarray(probabilities(row, HOT))
    assert 0.1 < expected.max() < 0.9, "a near-deterministic distribution would prove little"
    # Of 4096 true draws the TV is 0.046 at the median and 0.064 at the 99.99th percentile
    # (multinomial simulation); a distribution off by the temperature (the untempered softmax) is 0.27 away.
    assert total_variation(counts, expected) < 0.08
    assert total_variation(counts, np.asarray(probabilities(row, Sampling(temperature=1.0)))) > 0.12


def test_bulk_insert_gives_each_slot_its_sample(engine, params):
    tokens, slots = prompt(9, 2), [3, 1, 0, 2]
    prefix, result = multisample(engine, params, tokens, 4, HOT, jax.random.key(5))
    samples = np.asarray(result.data)[:, 0].tolist()
    assert len(set(samples)) > 1, "samples all alike: the slot order would be unchecked"
    state = engine.bulk_insert(prefix, engine.init_decode_state(), slots)
    assert np.asarray(state.tokens)[slots].tolist() == samples
    generated = {slot: [sample] for slot, sample in zip(slots, samples)}
    for _ in range(3):
        state, step = engine.generate(params, state)
        for slot in slots:
            generated[slot].append(int(step.data[slot, 0]))
    for continuation in generated.values():  # greedy after the sampled first token
        assert_greedy_continuation(engine, params, tokens + continuation[:1], continuation[1:])


def test_bad_input(engine, params):
    tokens = prompt(5, 3)
    with pytest.raises(ValueError, match=r"num_samples \(5\) exceeds the engine's 4 decode slots"):
        multisample(engine, params, tokens, 5)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        multisample(engine, params, tokens, 0)
    prefix, _ = multisample(engine, params, tokens, 2)
    with pytest.raises(ValueError, match="the prefix holds 2 samples: give as many slots, got 3"):
        engine.bulk_insert(prefix, engine.init_decode_state(), [0, 1, 2])
    padded, n = engine.pad(tokens)
    with pytest.raises(ValueError, match="holds several samples"):
        engine.prefill(params=params, existing_prefix=prefix, padded_tokens=padded, true_length=n)


def test_scheduler_runs_samples_in_their_own_slots(engine, params):
    """Greedy, so every sample must be the forward pass's continuation; 4 + 1 + 4 samples on 4
    slots: each request waits until its slots are all free together."""
    prompts = [prompt(6, 4), prompt(8, 5), prompt(5, 6)]
    scheduler = Scheduler(engine, params)
    for p, n, new in zip(prompts, (4, 1, 4), (3, 2, 2)):
        scheduler.submit(p, max_new_tokens=new, ignore_eos=True, num_samples=n)
    completions = scheduler.run()
    assert [(c.request.id, c.sample) for c in completions] == [(0, i) for i in range(4)] + [(1, 0)] + [
        (2, i) for i in range(4)
    ]
    for c in completions:
        assert_greedy_continuation(engine, params, c.request.prompt, c.tokens)
    inserts = [(e.request, e.step) for e in scheduler.events if e.kind == "insert"]
    assert inserts == [(0, 0)] * 4 + [(1, 2)] + [(2, 3)] * 4, "a request enters once all its slots are free"
    with pytest.raises(ValueError, match="exceeds the engine's 4 decode slots"):
        scheduler.submit(prompts[0], max_new_tokens=2, num_samples=5)


def test_cli_num_samples_beyond_the_slots():
    """(``generate --num-samples`` itself runs in tests/test_lora.py, against peft.)"""
    flags = ["generate", "--decode-batch", "4", "--prompt", "ab"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*flags, "--num-samples", "5"]) == 2
    assert err.getvalue() == "error: --num-samples 5 exceeds the 4 slots of --decode-batch\n"
