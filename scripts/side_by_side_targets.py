"""``side_by_side.py OUT_DIR``: the four targets in interleaved rounds, then sweeps of step time
against decode batch and context, and of prefill time against prompt length; ``results.md``,
``results.json`` and three plots in OUT_DIR. Run it through ``side_by_side.py``."""

from __future__ import annotations

import os
from pathlib import Path

from side_by_side_shared import (
    PROMPT,
    TARGET_BATCH,
    hf_prefill_ms,
    hf_step_ms,
    machine,
    median,
    parity,
    plot,
    table,
)

BIG_BATCH = 64  # insert must cost the same here as at TARGET_BATCH


def target_rounds(checkpoint: Path, model, steps: int, rounds: int, log) -> tuple[list[dict], float, dict]:
    """The targets' figures in ``rounds`` interleaved rounds (read bandwidth, ours, transformers,
    insert at the big batch), so a change of load on this shared machine hits both sides alike."""
    import workbench
    from workbench.bench import measure

    engine, params = workbench.load(checkpoint, decode_batch_size=TARGET_BATCH)
    big_engine, big_params = workbench.load(checkpoint, decode_batch_size=BIG_BATCH)
    parity_error = parity(engine, params, model)
    rows = []
    for _ in range(rounds):
        row = machine()
        ours = measure(engine, params, prompt_length=PROMPT, steps=steps)
        theirs = hf_step_ms(model, TARGET_BATCH, PROMPT, steps)
        big = measure(big_engine, big_params, prompt_length=PROMPT, steps=2)
        rows.append(row | dict(ours=ours.to_dict(), hf_step_ms=theirs, big_batch_insert_ms=big.insert_ms))
        log(
            f"round: read {row['read_gb_per_s']:.1f} GB/s | ours {ours.generate_step_ms:.2f} ms/step "
            f"({ours.achieved_gb_per_s:.2f} GB/s), insert {ours.insert_ms:.3f} ms (batch {BIG_BATCH}: "
            f"{big.insert_ms:.3f} ms) | transformers {theirs:.2f} ms/step | load {row['load']:.2f}"
        )
    compiles = {TARGET_BATCH: dict(engine.compile_counts), BIG_BATCH: dict(big_engine.compile_counts)}
    return rows, parity_error, compiles


def sweeps(checkpoint: Path, model, steps: int, batches, contexts, lengths, log) -> dict:
    """Step time against batch and context, prefill time against prompt length (one pass each).
    The context and prompt sweeps share one engine: one generate compile, one prefill per bucket."""
    import workbench
    from workbench.bench import measure

    by_batch = []
    for batch in batches:
        engine, params = workbench.load(checkpoint, decode_batch_size=batch)
        ours = measure(engine, params, prompt_length=PROMPT, steps=steps)
        theirs = hf_step_ms(model, batch, PROMPT, steps)
        by_batch.append(dict(batch=batch, ours=ours.to_dict(), hf_step_ms=theirs))
        log(f"batch {batch:3d}: ours {ours.generate_step_ms:8.2f} ms/step | transformers {theirs:8.2f} ms/step")
        del engine, params
    engine, params = workbench.load(
        checkpoint,
        decode_batch_size=TARGET_BATCH,
        max_prefill_length=max(contexts + lengths),
        max_target_length=max(contexts) + steps,
    )
    by_context = []
    for context in contexts:
        ours = measure(engine, params, prompt_length=context, steps=steps)
        theirs = hf_step_ms(model, TARGET_BATCH, context, steps)
        by_context.append(dict(context=context, ours=ours.to_dict(), hf_step_ms=theirs))
        log(f"context {context:5d}: ours {ours.generate_step_ms:8.2f} ms/step | transformers {theirs:8.2f} ms/step")
    by_length = []
    for length in lengths:
        ours = measure(engine, params, prompt_length=length, steps=1)
        theirs = hf_prefill_ms(model, length)
        by_length.append(dict(length=length, ours_prefill_ms=ours.prefill_ms, hf_prefill_ms=theirs))
        log(f"prompt {length:5d}: ours prefill {ours.prefill_ms:8.2f} ms | transformers {theirs:8.2f} ms")
    buckets = sorted({engine.bucket(n) for n in [*contexts, *lengths]})
    return dict(
        by_batch=by_batch,
        by_context=by_context,
        by_length=by_length,
        compiles=dict(engine.compile_counts),
        buckets=buckets,
    )


def targets(rounds: list[dict], compiles: dict, swept: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the four targets; ratios are medians of per-round ratios."""

    def ours(name):
        return lambda r: r["ours"][name]

    step, gb_s, insert = ours("generate_step_ms"), ours("achieved_gb_per_s"), ours("insert_ms")
    speedup = median(r["hf_step_ms"] / step(r) for r in rounds)
    fraction = median(gb_s(r) / r["read_gb_per_s"] for r in rounds)
    insert_ratio = median(r["big_batch_insert_ms"] / insert(r) for r in rounds)
    sweep = swept["compiles"]
    once = all(c["generate"] == 1 for c in compiles.values()) and sweep["generate"] == 1
    per_bucket = all(c["prefill"] == 1 for c in compiles.values()) and sweep["prefill"] == len(swept["buckets"])
    runs = len(swept["by_context"]) + len(swept["by_length"])

    def of(value, spec: str) -> str:  # the median over the rounds of one figure
        return format(median(map(value, rounds)), spec)

    return [
        (
            f"decode step >= 2x faster than transformers (batch {TARGET_BATCH}, {PROMPT}-token prompts)",
            f"{speedup:.2f}x ({of(step, '.1f')} vs {of(lambda r: r['hf_step_ms'], '.1f')} ms)",
            speedup >= 2,
        ),
        (
            "achieved bandwidth >= 50% of the all-core read bandwidth",
            f"{100 * fraction:.0f}% ({of(gb_s, '.2f')} of {of(lambda r: r['read_gb_per_s'], '.2f')} GB/s)",
            fraction >= 0.5,
        ),
        (
            f"insert at batch {BIG_BATCH} <= 1.5x insert at batch {TARGET_BATCH}",
            f"{insert_ratio:.2f}x ({of(lambda r: r['big_batch_insert_ms'], '.3f')} vs {of(insert, '.3f')} ms)",
            insert_ratio <= 1.5,
        ),
        (
            "generate compiled once; prefill once per length bucket",
            f"generate {sweep['generate']} for {runs} runs of one engine; prefill {sweep['prefill']} for buckets "
            f"{swept['buckets']}",
            once and per_bucket,
        ),
    ]


# ---- the report: each table a list of columns over rows ------------------------------------------
def _step(p):
    return p["ours"]["generate_step_ms"]


def _speedup(p):
    return p["hf_step_ms"] / _step(p)


TARGET_COLUMNS = [("target", lambda t: t[0], "{}"), ("measured", lambda t: t[1], "{}"), ("met", lambda t: t[2], "{}")]
ROUND_COLUMNS = [
    ("round", lambda ir: ir[0] + 1, "{}"),
    ("read GB/s", lambda ir: ir[1]["read_gb_per_s"], "{:.2f}"),
    ("workbench ms/step", lambda ir: _step(ir[1]), "{:.2f}"),
    ("GB/s", lambda ir: ir[1]["ours"]["achieved_gb_per_s"], "{:.2f}"),
    ("transformers ms/step", lambda ir: ir[1]["hf_step_ms"], "{:.2f}"),
    (
        f"insert ms (batch {TARGET_BATCH} / {BIG_BATCH})",
        lambda ir: (ir[1]["ours"]["insert_ms"], ir[1]["big_batch_insert_ms"]),
        "{0[0]:.3f} / {0[1]:.3f}",
    ),
    ("load", lambda ir: ir[1]["load"], "{:.2f}"),
]
STEP_COLUMNS = [
    ("workbench ms/step", _step, "{:.2f}"),
    ("transformers ms/step", lambda p: p["hf_step_ms"], "{:.2f}"),
    ("speedup", _speedup, "{:.2f}x"),
    ("workbench GB/s", lambda p: p["ours"]["achieved_gb_per_s"], "{:.2f}"),
]
BATCH_COLUMNS = [
    ("batch", lambda p: p["batch"], "{}"),
    *STEP_COLUMNS,
    ("insert ms", lambda p: p["ours"]["insert_ms"], "{:.3f}"),
]
CONTEXT_COLUMNS = [("context", lambda p: p["context"], "{}"), *STEP_COLUMNS]
PREFILL_COLUMNS = [
    ("prompt", lambda p: p["length"], "{}"),
    ("workbench ms", lambda p: p["ours_prefill_ms"], "{:.2f}"),
    ("transformers ms", lambda p: p["hf_prefill_ms"], "{:.2f}"),
    ("speedup", lambda p: p["hf_prefill_ms"] / p["ours_prefill_ms"], "{:.2f}x"),
]


def write_report(out_dir: Path, results: dict, met: list[tuple[str, str, bool]]) -> str:
    """``results.md`` and the three plots in ``out_dir``; returns the markdown."""
    swept, rounds = results["sweeps"], results["rounds"]
    by_batch, by_context, by_length = swept["by_batch"], swept["by_context"], swept["by_length"]

    def both(rows, ours, theirs):
        return {"workbench": [ours(p) for p in rows], "transformers": [theirs(p) for p in rows]}

    def hf_step(p):
        return p["hf_step_ms"]

    plot(
        out_dir / "step_vs_batch.png",
        [p["batch"] for p in by_batch],
        both(by_batch, _step, hf_step),
        "decode batch",
        "ms per decode step",
        f"decode step, {PROMPT}-token prompts",
    )
    plot(
        out_dir / "step_vs_context.png",
        [p["context"] for p in by_context],
        both(by_context, _step, hf_step),
        "context length (prompt tokens)",
        "ms per decode step",
        f"decode step, batch {TARGET_BATCH}",
    )
    plot(
        out_dir / "prefill_vs_length.png",
        [p["length"] for p in by_length],
        both(by_length, lambda p: p["ours_prefill_ms"], lambda p: p["hf_prefill_ms"]),
        "prompt length",
        "ms per prefill",
        "prefill, batch 1",
    )
    v = results["versions"]
    loads = [r["load"] for r in rounds]
    met_rows = [(t, m, "yes" if ok else "NO") for t, m, ok in met]
    lines = [
        "# workbench vs transformers, side by side",
        "",
        f"Llama 56M (hidden 512, 8 layers, 8 heads / 4 kv heads, MLP 1408, vocab 32000), float32, one HF checkpoint "
        f"(logits agree to {results['parity_max_rel_error']:.1e} relative), {os.cpu_count()} CPU cores. Targets: "
        f"{len(rounds)} interleaved rounds (load average {min(loads):.2f}-{max(loads):.2f}), {results['steps']} decode "
        f"steps each, medians; sweeps: one pass, {results['sweep_steps']} steps per point. jax {v['jax']}, torch "
        f"{v['torch']}, transformers {v['transformers']}.",
        "",
        "## Targets",
        "",
        *table(TARGET_COLUMNS, met_rows),
        "",
        *table(ROUND_COLUMNS, enumerate(rounds)),
        "",
        f"## Decode step against decode batch ({PROMPT}-token prompts)",
        "",
        *table(BATCH_COLUMNS, by_batch),
        "",
        f"## Decode step against context length (batch {TARGET_BATCH})",
        "",
        *table(CONTEXT_COLUMNS, by_context),
        "",
        "## Prefill against prompt length (batch 1)",
        "",
        *table(PREFILL_COLUMNS, by_length),
        "",
        "![step vs batch](step_vs_batch.png) ![step vs context](step_vs_context.png) "
        "![prefill vs length](prefill_vs_length.png)",
        "",
    ]
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text)
    return text


def run(checkpoint: Path, model, out_dir: Path, *, quick: bool, versions: dict, log) -> int:
    """The whole program: rounds, sweeps, report; exit code 0 when every target is met."""
    import json

    steps, sweep_steps, rounds = (8, 4, 1) if quick else (32, 16, 3)
    batches = [1, 8, 64] if quick else [1, 2, 4, 8, 16, 32, 64]
    contexts = [64, 256] if quick else [64, 128, 256, 512, 1024]
    lengths = [16, 64, 256] if quick else [16, 32, 64, 128, 256, 512, 1024]
    round_rows, parity_error, compiles = target_rounds(checkpoint, model, steps, rounds, log)
    swept = sweeps(checkpoint, model, sweep_steps, batches, contexts, lengths, log)
    met = targets(round_rows, compiles, swept)
    results = dict(
        rounds=round_rows,
        parity_max_rel_error=parity_error,
        steps=steps,
        sweep_steps=sweep_steps,
        target_compiles=compiles,
        sweeps=swept,
        targets=[dict(target=t, measured=m, met=bool(ok)) for t, m, ok in met],
        versions=versions,
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    log(write_report(out_dir, results, met).split("\n## Decode step")[0])
    return 0 if all(ok for _, _, ok in met) else 1
