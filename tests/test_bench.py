"""The bench command's smoke run (tiny model, a few steps), its byte count worked out by hand, and
the decode state updated in place (the invariant decode speed rests on).

No timing is asserted: the figures only have to be positive, finite and consistent with each other.
"""

import contextlib
import io
import json
import math

import pytest

import workbench
from workbench.bench import bytes_per_step
from workbench.cli import main
from workbench.trees import buffer_pointers

KEYS = {
    "prefill_ms",
    "insert_ms",
    "generate_step_ms",
    "decode_tokens_per_s",
    "bytes_per_step",
    "achieved_gb_per_s",
    "compiles",
    "quantize",
    "kv_cache_dtype",
    "weight_bytes",
    "read_gb_per_s",
    "roofline_fraction",
    "compile_s",
    "first_token_s",
    "load_s",
    "compile_cache",
    "decode_library",
}
ARGS = [
    "bench",
    "--decode-batch",
    "4",
    "--prompt-length",
    "20",
    "--steps",
    "3",
    "--max-target-length",
    "64",
    "--max-prefill-length",
    "32",
    "--mesh",
    "data=2,tensor=2",
]


@pytest.fixture(scope="module")
def bench_run():
    """(exit code, stdout, stderr) of one bench run, shared by the tests that read it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*ARGS, "--json"])
    return code, out.getvalue(), err.getvalue()


def test_json_has_the_figures(bench_run):
    code, out, err = bench_run
    assert code == 0, err
    figures = json.loads(out)
    assert set(figures) == KEYS
    assert figures["compiles"] == {"prefill": 1, "insert": 1, "generate": 1}
    assert (figures["quantize"], figures["kv_cache_dtype"]) == ("none", "auto")
    assert figures["roofline_fraction"] == pytest.approx(figures["achieved_gb_per_s"] / figures["read_gb_per_s"])
    assert figures["compile_cache"] in {"hit", "miss"}  # the run's own cache (conftest)
    assert figures["decode_library"] == "eigen"  # and with the fixed library (WORKBENCH_AUTOTUNE=off)
    assert set(figures["compile_s"]) == {"prefill", "insert", "generate"}
    assert all(s >= 0 and math.isfinite(s) for s in figures["compile_s"].values())
    assert figures["first_token_s"] > figures["load_s"]  # the process loaded the model before its first token
    for key in KEYS - {"compiles", "compile_s", "compile_cache", "quantize", "kv_cache_dtype", "decode_library"}:
        assert figures[key] > 0 and math.isfinite(figures[key]), key
    step_s = figures["generate_step_ms"] / 1e3
    assert figures["decode_tokens_per_s"] == pytest.approx(4 / step_s)
    assert figures["achieved_gb_per_s"] == pytest.approx(figures["bytes_per_step"] / step_s / 1e9)


def test_table_goes_to_stderr(bench_run):
    _, out, err = bench_run
    assert out.count("\n") == 1  # only the JSON line
    for label in ("prefill", "insert", "generate step", "achieved", "compiles"):
        assert label in err


@pytest.mark.parametrize("tied", [True, False])
def test_bytes_per_step_by_hand(tied):
    config = workbench.ModelConfig.tiny(tie_embeddings=tied)
    engine = workbench.Engine(
        config, workbench.make_mesh({"data": 1}), decode_batch_size=4, max_prefill_length=16, max_target_length=32
    )
    params = engine.abstract_params  # shapes and dtypes are all the count needs
    d, kv_per_token = config.embed_dim, config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4
    weights = config.num_params() * 4
    if not tied:  # the embedding table is only gathered from: one row per slot
        weights -= config.vocab_size * d * 4 - 4 * d * 4
    assert bytes_per_step(engine, params, cached_tokens=10.5) == weights + 4 * 10.5 * kv_per_token


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bytes_per_step_reads_a_ring_whole(scan_layers):
    """Sliding layers keep a ring of their window, read whole each step (k, v and the held
    positions, int32 per slot); the same count for stacked layers."""
    window, slots = 8, 4
    config = workbench.ModelConfig.tiny(sliding_window=window)
    engine = workbench.Engine(
        config, workbench.make_mesh({"data": 1}), decode_batch_size=slots, max_prefill_length=16,
        max_target_length=32, scan_layers=scan_layers,
    )  # fmt: skip
    kv_per_position = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4
    ring = slots * window * (kv_per_position + config.num_layers * 4)
    weights = config.num_params() * 4
    assert bytes_per_step(engine, engine.abstract_params, cached_tokens=3.0) == weights + ring


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt-length", "40"], "exceeds max_prefill_length"),
        (["--steps", "60"], "exceeds max_target_length"),
        (["--steps", "0"], "steps must be a positive int, got 0"),
    ],
)
def test_bad_input_is_one_line(flags, message, capsys):
    assert main([*ARGS, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("mesh", [{"data": 1}, {"data": 2, "tensor": 2}])
def test_decode_state_is_updated_in_place(mesh):
    """Donation at work: insert, generate and free write into the very buffers of the KV cache
    they were given, on every device, instead of copying every slot's cache on every call."""
    engine = workbench.Engine(
        workbench.ModelConfig.tiny(),
        workbench.make_mesh(mesh),
        decode_batch_size=4,
        max_prefill_length=16,
        max_target_length=64,
    )
    params = engine.load_params()

    def buffers(state):
        return buffer_pointers(state.cache)

    padded, true_length = engine.pad([1, 2, 3])
    prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=true_length)
    state = engine.init_decode_state(0)
    before = buffers(state)
    state = engine.insert(prefix, state, 1)
    assert buffers(state) == before
    state, _ = engine.generate(params, state)
    assert buffers(state) == before
    state = engine.free_resource(1, state)
    assert buffers(state) == before


def test_sweep_context_times_one_point_per_context(capsys):
    """``bench.sweep``: a median per point on the library the engine picks; through the command,
    a context past the cache is one line of error before anything loads."""
    from helpers import SMALL, engine_for
    from workbench.bench import sweep

    engine = engine_for(SMALL, {"data": 1})  # decode batch 2, a 32-position cache
    rows = sweep(engine, engine.load_params(), "context", [24, 32], steps=1)
    assert [row["point"] for row in rows] == [24, 32]
    assert all(row["ms"] > 0 and row["decode_library"] == "eigen" for row in rows)
    shape = ["--max-prefill-length", "16", "--max-target-length", "96"]
    assert main(["bench", "--sweep", "context", "--points", "32,200", *shape]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "200 exceeds max_target_length (96)" in err and "\n" not in err
