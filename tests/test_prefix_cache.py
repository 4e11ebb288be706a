"""The prefix cache against the uncached path: with it, every request's tokens and logits are those
of the same requests without it -- on a plain model, and on a sliding-window model with an int8
cache serving LoRA adapters -- for fixed and random request sequences that share, extend, repeat
and diverge inside a block, with more requests than slots and budgets that evict. (The uncached
scheduler itself is held to the forward pass by test_scheduler.py.) Two engines, one compile of
each step: the whole file is a few seconds on a quiet machine."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench
from helpers import SMALL, assert_close, lively_arrays
from workbench import inspect
from workbench.bench import measure_shared_prefix
from workbench.cli import bench as cli_bench
from workbench.cli import generate as cli_generate
from workbench.cli import main
from workbench.engine.prefix_cache import MB, PrefixCache
from workbench.engine.scheduler import Scheduler
from workbench.model.lora import AdapterStack, LoraSpec

BLOCK, TARGET, SLOTS = 8, 40, 2  # blocks of 8 tokens: prompts up to 4 blocks deep in 40 positions


def prompt(length, seed):
    """``length`` random ids of the small model's vocabulary, reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(3, SMALL.vocab_size, size=length).tolist()


def build(config, adapters=None):
    engine = workbench.Engine(
        config,
        workbench.make_mesh({"data": 1}),
        decode_batch_size=SLOTS,
        max_prefill_length=BLOCK,
        max_target_length=TARGET,
        adapters=adapters,
    )
    return engine, engine.load_params(lively_arrays(engine))


@pytest.fixture(scope="module")
def plain():
    return build(SMALL)


@pytest.fixture(scope="module")
def sliding():
    """A sliding window of 5 (shorter than a block), an int8 KV cache, and two LoRA adapters."""
    spec = LoraSpec(num_adapters=2, rank=2, targets=("q", "v"))
    rng = np.random.default_rng(1)
    shapes = SMALL.projections()
    weights = {
        "layers": {
            i: {
                "attn": {
                    "lora": {
                        name: {
                            "a": rng.standard_normal((2, shapes[name][0][0], 2)).astype(np.float32) * 0.3,
                            "b": rng.standard_normal((2, 2, shapes[name][0][1])).astype(np.float32) * 0.3,
                        }
                        for name in spec.targets
                    }
                }
            }
            for i in range(SMALL.num_layers)
        }
    }
    return build(SMALL.replace(sliding_window=5, kv_cache_dtype="int8"), AdapterStack(("x", "y"), spec, weights))


def run(engine, params, requests, cache=None, **options):
    """Completions of ``requests`` [(prompt, adapter, num_samples)] through one scheduler."""
    scheduler = Scheduler(engine, params, return_logits=True, prefix_cache=cache, **options)
    for tokens, adapter, samples in requests:
        scheduler.submit(tokens, max_new_tokens=3, ignore_eos=True, adapter=adapter, num_samples=samples)
    return scheduler.run()


def assert_same(engine, params, requests, cache, **options):
    """With ``cache`` the completions equal those without it; returns the cache's stats."""
    expected = run(engine, params, requests, **options)
    actual = run(engine, params, requests, cache, **options)
    assert [c.tokens for c in actual] == [c.tokens for c in expected]
    for a, e in zip(actual, expected):
        assert_close(a.logits, e.logits, rtol=1e-5)
    return cache.stats()


HEADER = prompt(2 * BLOCK, 7)  # two shared blocks


def header_requests(adapter=None, samples=1):
    return [(HEADER + prompt(n, seed), adapter, samples) for n, seed in ((3, 1), (BLOCK + 2, 2), (5, 3))]


def test_shared_header_reuses_blocks_and_matches(plain):
    engine, params = plain
    cache = PrefixCache(engine, 1.0)
    requests = header_requests()
    stats = assert_same(engine, params, requests, cache)
    # blocks are the chunks: the cached path runs the uncached one's computations on the same inputs, bit for bit
    for a, e in zip(run(engine, params, requests, PrefixCache(engine, 1.0)), run(engine, params, requests)):
        np.testing.assert_array_equal(a.logits, e.logits)
    # the first request stores both header blocks; the other two reuse them (the second its own third block too)
    assert stats["hits"] == 2 and stats["tokens_reused"] == 4 * BLOCK and stats["evictions"] == 0
    assert stats["bytes"] == 3 * cache.snapshot_bytes  # two header blocks and the second prompt's third


def test_host_tier_takes_what_the_device_budget_evicts(plain):
    engine, params = plain
    one = PrefixCache(engine, 1.0).snapshot_bytes
    cache = PrefixCache(engine, (one + 0.5) / MB, host_mb=1.0)
    stats = assert_same(engine, params, header_requests(), cache)
    assert stats["hits"] == 2 and stats["evictions"] >= 2  # to the host, then back on a hit
    assert cache.held("device") == one and cache.held("host") == 2 * one


def test_multisampling(plain):
    engine, params = plain
    # the fourth prompt's last chunk is a whole block: its multisampled prefix is stored, and extended by the fifth
    whole = HEADER + prompt(BLOCK, 4)
    sampled = header_requests(samples=2) + [(whole, None, 2), (whole + [5, 6], None, 1)]
    stats = assert_same(engine, params, sampled, PrefixCache(engine, 1.0))
    assert stats["hits"] == 4 and stats["tokens_reused"] == (2 + 2 + 2 + 3) * BLOCK
    # (Packed rows need no test here: they hold prompts of one block at most together, which have
    # no block to look up or store; the scheduler's packed path never meets the cache.)


def test_sliding_window_int8_cache_and_adapters(sliding):
    engine, params = sliding
    cache = PrefixCache(engine, 1.0)
    requests = header_requests("x")[:2] + header_requests("y")[:2] + header_requests()[:2]
    stats = assert_same(engine, params, requests, cache)
    assert stats["hits"] == 3  # one per adapter (and base): nothing crosses adapters
    assert sorted(cache.labels.values()) == ["base", "x", "y"]


LENGTHS = (3 * BLOCK + 5, 2 * BLOCK + 1, 3 * BLOCK, BLOCK + 1, 2 * BLOCK, BLOCK, 3, 1)  # around block edges


# Prompts built from a few stems: shared, extended, repeated, or changed at one token (inside a block).
@st.composite
def workloads(draw, adapters):
    stems = [prompt(3 * BLOCK, seed) for seed in range(3)]
    requests = []
    for _ in range(draw(st.integers(3, 6))):
        stem = stems[draw(st.integers(0, 2))]
        length = draw(st.sampled_from(LENGTHS))
        tokens = (stem + prompt(TARGET, len(requests)))[:length]
        if draw(st.booleans()):  # diverge at one position
            at = draw(st.integers(0, length - 1))
            tokens = tokens[:at] + [3 + tokens[at] % (SMALL.vocab_size - 3)] + tokens[at + 1 :]
        requests.append((tokens, draw(st.sampled_from(adapters)), 1))
    return requests, draw(st.sampled_from([100, 1, 2]))  # budget in snapshots: 1 and 2 evict


@pytest.mark.parametrize("which", ["plain", "sliding"])
def test_random_workloads(which, request):
    engine, params = request.getfixturevalue(which)
    adapters = [None, *engine.adapters]
    seen = {"hits": 0, "evictions": 0, "deep": 0}

    @settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(workloads(adapters))
    def check(case):
        requests, snapshots = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = PrefixCache(engine, (snapshots * PrefixCache(engine, 1.0).snapshot_bytes + 0.5) / MB)
        stats = assert_same(engine, params, requests, cache)
        assert stats["bytes"] <= snapshots * cache.snapshot_bytes
        seen["hits"] += stats["hits"]
        seen["evictions"] += stats["evictions"]
        seen["deep"] += stats["tokens_reused"] > stats["hits"] * BLOCK  # some hit reused two blocks or more

    check()
    assert all(seen.values()), f"the workloads never hit, hit past one block, or evicted: {seen}"


def test_bad_input(plain, sliding):
    engine, params = plain
    for bad in (-1, "10", float("nan")):
        with pytest.raises(ValueError, match="budget_mb must be a non-negative number"):
            PrefixCache(engine, bad)
    with pytest.warns(UserWarning, match="smaller than one block"):
        tiny = PrefixCache(engine, 1e-6)
    run(engine, params, header_requests()[:1], tiny)
    assert tiny.stats() == {"hits": 0, "tokens_reused": 0, "bytes": 0, "evictions": 0}
    with pytest.raises(ValueError, match="built for another engine"):
        Scheduler(*sliding, prefix_cache=PrefixCache(engine, 1.0))


def test_cli_reports_the_cache_and_a_hit_changes_nothing(capsys, monkeypatch, plain):
    """Two equal prompts one after the other (the engine's flags are not read: the module's
    engine serves, compiled): the second reuses the first's blocks, and its tokens and logits are
    the first's, made without the cache."""
    monkeypatch.setattr(cli_generate, "load_engine", lambda args, **_: plain)
    ids = ",".join(str(i) for i in prompt(2 * BLOCK + 4, 5))
    flags = ["--prompt-ids", ids, "--prompt-ids", ids, "--max-new-tokens", "3", "--json", "--return-logits"]
    assert main(["generate", *flags, "--prefix-cache-mb", "0.5"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    first, second = report["requests"]
    assert second["tokens"] == first["tokens"]
    assert_close(second["logits"], first["logits"], rtol=1e-5)
    assert report["prefix_cache"] == {
        "hits": 1,
        "tokens_reused": 2 * BLOCK,
        "bytes": 2 * PrefixCache(plain[0], 1.0).snapshot_bytes,
        "evictions": 0,
    }
    for bad, message in (("-1", "non-negative"), ("many", "malformed size")):
        assert main(["generate", *flags, "--prefix-cache-mb", bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", *flags, "--prefix-cache-mb", "0.000001"]) == 0
    assert "warning: --prefix-cache-mb 1e-06: prefix cache budget" in capsys.readouterr().err


def test_bench_times_first_tokens_with_and_without(plain, monkeypatch, capsys):
    result = measure_shared_prefix(*plain, prompt_length=3 * BLOCK, shared_prefix_length=2 * BLOCK + 3, repeats=1)
    assert result.tokens_reused == 2 * BLOCK and result.block == BLOCK
    assert min(result.uncached_ms, result.miss_ms, result.hit_ms) > 0
    with pytest.raises(ValueError, match="shared prefix length 30 is outside 0..prompt length"):
        measure_shared_prefix(*plain, prompt_length=20, shared_prefix_length=30)
    monkeypatch.setattr(cli_bench, "load_engine", lambda args: plain)  # the module's engine, compiled
    assert main(["bench", "--prompt-length", str(3 * BLOCK), "--shared-prefix-length", str(2 * BLOCK), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tokens_reused"] == 2 * BLOCK and "first token hit" in err
    assert main(["bench", "--prompt-length", "8", "--shared-prefix-length", "9"]) == 2
    assert "--shared-prefix-length 9 is outside 0..--prompt-length (8)" in capsys.readouterr().err


def test_inspect_shows_the_tree(plain):
    engine, params = plain
    cache = PrefixCache(engine, 1.0)
    run(engine, params, header_requests(), cache)
    report = inspect.prefix_cache(cache)
    rows = report.to_rows()
    assert [(r["depth"], r["parent"], r["tokens"], r["hits"]) for r in rows] == [
        (1, None, f"0-{BLOCK - 1}", 0),
        (2, 0, f"0-{2 * BLOCK - 1}", 2),  # both later prompts reused the header's two blocks
        (3, 1, f"0-{3 * BLOCK - 1}", 0),
    ]
    text = str(report)
    assert "3 nodes of 8-token blocks, 3 held" in text and "hits 2, tokens reused 32, evictions 0" in text
    assert len(report.plot().axes[0].patches) == 3
