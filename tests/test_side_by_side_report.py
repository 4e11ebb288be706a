"""``scripts/side_by_side*.py`` without the measuring: the table helper, the targets' medians of
per-round ratios and the report's tables, from rows whose figures are worked out by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import side_by_side_targets as targets  # noqa: E402
from side_by_side_shared import table  # noqa: E402


def test_table_formats_each_cell_from_its_row():
    columns = [("name", lambda r: r[0], "{}"), ("ms", lambda r: r[1], "{:.2f}"), ("ratio", lambda r: r[2], "{:.1f}x")]
    assert table(columns, [("a", 1.0, 2.0), ("b", 12.345, 0.25)]) == [
        "| name | ms | ratio |",
        "|---|---|---|",
        "| a | 1.00 | 2.0x |",
        "| b | 12.35 | 0.2x |",
    ]


def round_row(step, hf, gb_s, read, insert, big_insert):
    ours = dict(generate_step_ms=step, achieved_gb_per_s=gb_s, insert_ms=insert, prefill_ms=1.0)
    return dict(ours=ours, hf_step_ms=hf, read_gb_per_s=read, big_batch_insert_ms=big_insert, load=1.5)


ROUNDS = [  # per-round speedups 2, 3, 1.5; bandwidth fractions 0.5, 0.25, 0.6; insert ratios 1, 2, 1.2
    round_row(10.0, 20.0, 5.0, 10.0, 2.0, 2.0),
    round_row(10.0, 30.0, 2.5, 10.0, 1.0, 2.0),
    round_row(20.0, 30.0, 6.0, 10.0, 2.5, 3.0),
]
COMPILES = {8: {"prefill": 1, "generate": 1}, 64: {"prefill": 1, "generate": 1}}


def swept(prefills=2):
    point = dict(ours=dict(generate_step_ms=10.0, achieved_gb_per_s=4.0, insert_ms=2.0), hf_step_ms=25.0)
    return dict(
        by_batch=[dict(batch=1, **point), dict(batch=8, **point)],
        by_context=[dict(context=64, **point)],
        by_length=[dict(length=16, ours_prefill_ms=4.0, hf_prefill_ms=5.0)],
        compiles={"prefill": prefills, "generate": 1},
        buckets=[16, 64],
    )


def test_targets_are_medians_of_per_round_ratios():
    met = targets.targets(ROUNDS, COMPILES, swept())
    assert [m for _, m, _ in met][:3] == [
        "2.00x (10.0 vs 30.0 ms)",
        "50% (5.00 of 10.00 GB/s)",
        "1.20x (2.000 vs 2.000 ms)",
    ]
    assert [ok for _, _, ok in met] == [True, True, True, True]
    assert targets.targets(ROUNDS, COMPILES, swept(prefills=3))[3][2] is False  # a bucket compiled twice


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_tables_come_from_the_rows(tmp_path):
    met = targets.targets(ROUNDS, COMPILES, swept())
    results = dict(
        rounds=ROUNDS,
        parity_max_rel_error=1e-6,
        steps=8,
        sweep_steps=4,
        sweeps=swept(),
        versions=dict(jax="j", torch="t", transformers="x"),
    )
    text = targets.write_report(tmp_path, results, met)
    assert (tmp_path / "results.md").read_text() == text
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "step_vs_batch.png",
        "step_vs_context.png",
        "prefill_vs_length.png",
    }
    lines = text.splitlines()
    assert "| 2 | 10.00 | 10.00 | 2.50 | 30.00 | 1.000 / 2.000 | 1.50 |" in lines  # the second round
    assert "| 8 | 10.00 | 25.00 | 2.50x | 4.00 | 2.000 |" in lines  # batch 8
    assert "| 64 | 10.00 | 25.00 | 2.50x | 4.00 |" in lines  # context 64
    assert "| 16 | 4.00 | 5.00 | 1.25x |" in lines  # prompt 16


def test_precision_table_medians_per_round_ratios_against_float32():
    import side_by_side_precision as precision

    def entry(step, hf, insert, gb_s):
        ours = dict(generate_step_ms=step, insert_ms=insert, achieved_gb_per_s=gb_s, weight_bytes=2e6)
        return dict(ours=ours | dict(decode_library="eigen"), hf_step_ms=hf)

    # w8a8 / float32 step: 0.5, 0.25, 1.0 over three rounds -> median 0.5; the rest constant
    steps = {"float32": [10.0, 20.0, 10.0], "w8a8": [5.0, 5.0, 10.0]}
    rows = [
        dict(read_gb_per_s=20.0, load=1.0)
        | {name: entry(steps.get(name, [10.0] * 3)[i], 30.0, 2.0, 5.0) for name in precision.PRECISIONS}
        for i in range(3)
    ]
    lines = precision.report(rows).splitlines()
    assert "| w8a8 | int8 dynamic | 5.00 | 30.00 | 6.00x | 0.50 | 1.00 | 2.0 | 25% | eigen |" in lines
    assert "| float32 | float32 | 10.00 | 30.00 | 3.00x | 1.00 | 1.00 | 2.0 | 25% | eigen |" in lines


def test_curves_grid_leaves_out_the_cells_whose_cache_does_not_fit():
    import side_by_side_curves as curves

    from workbench import ModelConfig

    per_token = curves.kv_bytes_per_token(ModelConfig.llama3_1b(dtype="float32"))
    assert per_token == 2 * 16 * 8 * 64 * 4  # keys and values, 16 layers, 8 kv heads of 64, float32
    kept, left_out = curves.grid([1, 8, 64], [256, 8192], per_token, 2 * 2**30)
    assert kept == [(1, 256), (1, 8192), (8, 256), (64, 256)]  # 64 x 256 tokens: 1 GiB
    assert left_out == [(8, 8192), (64, 8192)]  # 4 GiB and 32 GiB
