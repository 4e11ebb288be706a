"""The scheduler against the uncached forward pass, and its slot bookkeeping against its event log."""

import collections
import logging

import jax
import numpy as np
import pytest

import workbench
from helpers import assert_greedy_continuation, lively_params, prompt
from workbench.engine.scheduler import Scheduler, run_requests

SLOTS, PREFILL, TARGET = 2, 16, 64


PROMPTS = [prompt(3, 0), prompt(20, 1), prompt(9, 2), prompt(37, 3), prompt(5, 4)]  # 20 and 37: chunked


@pytest.fixture(scope="module")
def loaded():
    """The engine, warmed for PROMPTS while its (random) weights load; its trace counts then."""
    engine, _ = workbench.load(
        config=workbench.ModelConfig.tiny(),
        mesh={"data": 2, "tensor": 4},
        decode_batch_size=SLOTS,
        max_prefill_length=PREFILL,
        max_target_length=TARGET,
        warm=[len(p) for p in PROMPTS],
    )
    return engine, dict(engine.compile_counts)


@pytest.fixture(scope="module")
def engine(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def params(engine):
    return lively_params(engine)


class Compiles(logging.Handler):
    """The names of the programs jax compiles while attached (``jax.log_compiles``)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


@pytest.fixture(scope="module")
def warmed(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def greedy_run(engine, params, warmed):
    """The prompts served greedily, and what jax compiled meanwhile."""
    scheduler = Scheduler(engine, params, return_logits=True)
    for p in PROMPTS:
        scheduler.submit(p, max_new_tokens=7, ignore_eos=True)
    compiles, logger = Compiles(), logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(compiles)
    try:
        with jax.log_compiles(True):
            completions = scheduler.run()
    finally:
        logger.removeHandler(compiles)
    return scheduler, completions, compiles.names


def test_a_warmed_engine_compiles_nothing_of_its_own_while_serving(engine, warmed, greedy_run):
    """``workbench.load(warm=)`` had ``Engine.warm`` compile, beside the load, every program the
    run needed from the params' shapes alone (the chunked prompts' prefills, insert, generate,
    free, the decode state): serving traced none again, and compiled only jax's own scalar
    helpers (a key fold, an index conversion)."""
    _, _, compiled = greedy_run
    assert set(warmed) == {"prefill", "insert", "generate"}  # traced by the warm, before any ran
    assert dict(engine.compile_counts) == warmed
    steps = {"jit(prefill)", "jit(insert)", "jit(generate)", "jit(free)", "jit(init_decode_state)", "jit(zeros)"}
    assert not steps & set(compiled), compiled


def test_a_warm_for_a_prompt_past_the_cache_fails_the_load():
    with pytest.raises(ValueError, match="prompt of 9999 tokens exceeds max_target_length"):
        workbench.load(config=workbench.ModelConfig.tiny(), max_target_length=64, max_prefill_length=16, warm=[9999])


def test_tokens_and_logits_equal_the_uncached_forward(engine, params, greedy_run):
    _, completions, _ = greedy_run
    assert [c.request.prompt for c in completions] == [tuple(p) for p in PROMPTS]
    for completion in completions:
        tokens, p = completion.tokens, list(completion.request.prompt)
        full = np.asarray(engine.forward(params, np.array([p + tokens[:-1]])))[0]
        expected = full[len(p) - 1 :]  # the rows the generated tokens were chosen from
        assert tokens == expected.argmax(-1).tolist()
        assert len(set(tokens)) > 1, "weights too dull: the comparison would prove little"
        assert completion.logits.shape == (7, engine.config.vocab_size)
        np.testing.assert_allclose(completion.logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert completion.finish_reason == "max_new_tokens"


def test_event_log_shows_requests_entering_and_leaving_slots(greedy_run):
    scheduler, _, _ = greedy_run
    occupant, admitted_late = {}, 0
    per_request = collections.defaultdict(list)
    for event in scheduler.events:
        per_request[event.request].append(event.kind)
        if event.kind == "insert":
            assert event.slot not in occupant, "inserted into an occupied slot"
            occupant[event.slot] = event.request
            admitted_late += event.step > 0
        elif event.kind == "free":
            assert occupant.pop(event.slot) == event.request
        assert len(occupant) <= SLOTS
    assert not occupant
    assert all(kinds == ["prefill", "insert", "finish", "free"] for kinds in per_request.values())
    assert sorted(per_request) == list(range(len(PROMPTS)))
    assert admitted_late == len(PROMPTS) - SLOTS, "requests beyond the slots wait in the queue"
    chunks = [e.detail for e in scheduler.events if e.kind == "prefill"]
    assert chunks == ["1 chunk(s)", "2 chunk(s)", "1 chunk(s)", "3 chunk(s)", "1 chunk(s)"]
    # Each request runs 6 generate steps after its prefill; two slots -> ceil over three waves.
    assert scheduler.step_count == 18


def test_eos_ends_a_request_unless_ignored(engine, params, greedy_run):
    _, completions, _ = greedy_run
    tokens = completions[2].tokens
    stop = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])  # a token's first appearance
    eos = tokens[stop]
    ended = run_requests(engine, params, [PROMPTS[2]], max_new_tokens=7, eos_ids=[eos])[0]
    assert ended.tokens == tokens[: stop + 1] and ended.finish_reason == "eos"
    ignored = run_requests(engine, params, [PROMPTS[2]], max_new_tokens=7, eos_ids=[eos], ignore_eos=True)[0]
    assert ignored.tokens == tokens


def test_eos_as_the_first_token_never_takes_a_slot(engine, params, greedy_run):
    _, completions, _ = greedy_run
    scheduler = Scheduler(engine, params, eos_ids=[completions[0].tokens[0]])
    scheduler.submit(PROMPTS[0], max_new_tokens=5)
    scheduler.submit(PROMPTS[2], max_new_tokens=3, ignore_eos=True)
    first, second = scheduler.run()
    assert first.tokens == completions[0].tokens[:1] and first.finish_reason == "eos"
    assert second.tokens == completions[2].tokens[:3]
    kinds = [(e.request, e.kind, e.slot) for e in scheduler.events]
    assert kinds[:4] == [(0, "prefill", 0), (0, "finish", 0), (0, "free", 0), (1, "prefill", 0)]
    assert (0, "insert", 0) not in kinds


def test_max_target_length_ends_a_request(engine, params):
    long_prompt = prompt(TARGET - 4, 5)
    (completion,) = run_requests(engine, params, [long_prompt], max_new_tokens=10, ignore_eos=True)
    assert len(completion.tokens) == 4 and completion.finish_reason == "max_target_length"
    full = np.asarray(engine.forward(params, np.array([long_prompt + completion.tokens[:-1]])))[0]
    assert completion.tokens == full[len(long_prompt) - 1 :].argmax(-1).tolist()


def test_callbacks_stream_every_token_in_order(engine, params, greedy_run):
    _, expected, _ = greedy_run
    streamed, finished = collections.defaultdict(list), []
    scheduler = Scheduler(
        engine,
        params,
        on_token=lambda r, t: streamed[r.id].append(t),
        on_finish=lambda c: finished.append(c.request.id),
    )
    for p in PROMPTS[:3]:
        scheduler.submit(p, max_new_tokens=7, ignore_eos=True)
    completions = scheduler.run()
    assert [streamed[i] for i in range(3)] == [c.tokens for c in completions] == [c.tokens for c in expected[:3]]
    assert sorted(finished) == [0, 1, 2] and completions[0].logits is None


def test_sampling_repeats_for_a_seed(engine, params):
    def sample(seed):
        return [
            c.tokens
            for c in run_requests(
                engine,
                params,
                PROMPTS[:3],
                max_new_tokens=6,
                ignore_eos=True,
                sampling=workbench.Sampling(temperature=1.0),
                seed=seed,
            )
        ]

    first = sample(1)
    assert first == sample(1)
    assert first != sample(2)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "non-empty"),
        ([1, 384], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
        (list(range(TARGET)), "no room"),
        ([1.5], "integer token ids"),
    ],
)
def test_bad_requests(engine, params, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Scheduler(engine, params).submit(bad, max_new_tokens=4)


def test_bad_max_new_tokens(engine, params):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Scheduler(engine, params).submit([1, 2], max_new_tokens=0)


def test_decode_state_positions_follow_each_slots_request(engine, params):
    """After every step, an occupied slot's next position is its prompt plus its tokens so far,
    less one (the newest token is the next input, not yet in the cache)."""
    streamed = collections.defaultdict(list)
    scheduler = Scheduler(engine, params, on_token=lambda r, t: streamed[r.id].append(t))
    for p in PROMPTS[:3]:
        scheduler.submit(p, max_new_tokens=4, ignore_eos=True)
    checked = 0
    while scheduler.busy:
        scheduler.step()
        state = scheduler.decode_state
        positions, active = np.asarray(state.positions), np.asarray(state.active)
        assert sorted(np.flatnonzero(active).tolist()) == sorted(scheduler.slots)
        for slot, request in scheduler.slots.items():
            assert positions[slot] == len(request.prompt) + len(streamed[request.id]) - 1
            checked += 1
    assert checked >= 6


def test_packed_prefill_leaves_multisample_requests_alone(engine, params):
    """With pack_prefill, waiting single-sample prompts share one prefill row (as many as free
    slots); a request of several samples is prefilled alone (a packed row draws one token per
    prompt), once its slots are free. Every sample still follows the uncached forward pass."""
    prompts = [prompt(3, 5), prompt(5, 6), prompt(4, 7), prompt(6, 8), prompt(2, 9)]
    scheduler = Scheduler(engine, params, pack_prefill=True)
    for i, p in enumerate(prompts):
        scheduler.submit(p, max_new_tokens=3, ignore_eos=True, num_samples=2 if i == 2 else 1)
    completions = scheduler.run()
    details = {e.request: e.detail for e in scheduler.events if e.kind == "prefill"}
    assert details == {0: "packed", 1: "packed", 2: "1 chunk(s)", 3: "packed", 4: "packed"}
    assert [(c.request.id, c.sample) for c in completions] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (4, 0)]
    for completion in completions:
        assert_greedy_continuation(engine, params, completion.request.prompt, completion.tokens)
