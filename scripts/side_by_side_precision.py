"""``side_by_side.py OUT_DIR --precision``: in interleaved rounds at decode batch 8, our step and
insert in each precision beside transformers' step in the same one; ``precision.md`` and
``precision.json`` in OUT_DIR. Run it through ``side_by_side.py``."""

from __future__ import annotations

import json
from pathlib import Path

from side_by_side_shared import PROMPT, TARGET_BATCH, hf_step_ms, machine, median, table

PRECISIONS = {  # ours: workbench.load options; theirs: the transformers model of the same precision
    "float32": ({}, "float32"),
    "bfloat16": ({"dtype": "bfloat16"}, "bfloat16"),  # on the CPU: bf16 weights, f32 compute and KV cache
    "w8": ({"quantize": "w8"}, "float32"),
    "w8a8": ({"quantize": "w8a8"}, "int8 dynamic"),
    "w4": ({"quantize": "w4"}, "float32"),
}


def their_models(model) -> dict[str, object]:
    """transformers' model in each precision it has on the CPU, by the names of ``PRECISIONS``."""
    import copy

    import torch

    return {
        "float32": model,
        "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
        "int8 dynamic": torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8),
    }


def precision_rounds(checkpoint: Path, model, steps: int, rounds: int, log) -> list[dict]:
    """Per round: the machine's conditions, then per precision our figures and transformers' step."""
    import workbench
    from workbench.bench import measure

    theirs_models = their_models(model)
    ours = {
        name: workbench.load(checkpoint, decode_batch_size=TARGET_BATCH, **options)
        for name, (options, _) in PRECISIONS.items()
    }
    rows = []
    for _ in range(rounds):
        row = machine()
        for name, (_, theirs) in PRECISIONS.items():
            result = measure(*ours[name], prompt_length=PROMPT, steps=steps)
            row[name] = dict(
                ours=result.to_dict(),
                theirs=theirs,
                hf_step_ms=hf_step_ms(theirs_models[theirs], TARGET_BATCH, PROMPT, steps),
            )
            log(
                f"{name:8s} ours {result.generate_step_ms:7.2f} ms/step, insert {result.insert_ms:.3f} ms | "
                f"transformers ({theirs}) {row[name]['hf_step_ms']:7.2f} ms/step | load {row['load']:.2f}"
            )
        rows.append(row)
    return rows


def precision_columns(rows: list[dict]) -> list:
    """The table's columns over the precisions' names: medians over ``rows`` of per-round figures."""

    def over_rounds(figure):  # name -> the median of figure(round's entry for name, round, its float32)
        return lambda name: median(figure(r[name], r, r["float32"]) for r in rows)

    def step(entry):
        return entry["ours"]["generate_step_ms"]

    first = rows[0]
    return [
        ("precision", lambda name: name, "{}"),
        ("transformers in", lambda name: PRECISIONS[name][1], "{}"),
        ("ours ms/step", over_rounds(lambda e, r, f: step(e)), "{:.2f}"),
        ("theirs ms/step", over_rounds(lambda e, r, f: e["hf_step_ms"]), "{:.2f}"),
        ("theirs/ours", over_rounds(lambda e, r, f: e["hf_step_ms"] / step(e)), "{:.2f}x"),
        ("ours / our f32", over_rounds(lambda e, r, f: step(e) / step(f)), "{:.2f}"),
        (
            "insert / our f32 insert",
            over_rounds(lambda e, r, f: e["ours"]["insert_ms"] / f["ours"]["insert_ms"]),
            "{:.2f}",
        ),
        ("weight MB", lambda name: first[name]["ours"]["weight_bytes"] / 1e6, "{:.1f}"),
        ("roofline", over_rounds(lambda e, r, f: e["ours"]["achieved_gb_per_s"] / r["read_gb_per_s"]), "{:.0%}"),
        ("decode library", lambda name: first[name]["ours"]["decode_library"], "{}"),
    ]


def report(rows: list[dict]) -> str:
    """``precision.md``: the table, then the rounds' loads and bandwidths and the CPU."""
    from workbench.engine import autotune

    return "\n".join(
        [
            f"# Precision side by side (llama-56m, decode batch {TARGET_BATCH}, {PROMPT}-token prompts, "
            f"{len(rows)} interleaved rounds, medians of per-round ratios)",
            "",
            *table(precision_columns(rows), PRECISIONS),
            "",
            "Loads: "
            + ", ".join(f"{r['load']:.2f}" for r in rows)
            + "; all-core read bandwidth: "
            + ", ".join(f"{r['read_gb_per_s']:.1f}" for r in rows)
            + " GB/s.",
            f"CPU: {autotune.cpu_name()}.",
            "",
        ]
    )


def run(checkpoint: Path, model, out_dir: Path, *, quick: bool, log) -> int:
    """The whole program: the rounds, then ``precision.md`` and ``precision.json``."""
    steps, rounds = (8, 1) if quick else (32, 3)
    rows = precision_rounds(checkpoint, model, steps, rounds, log)
    text = report(rows)
    (out_dir / "precision.md").write_text(text)
    (out_dir / "precision.json").write_text(json.dumps(rows, indent=1))
    log(text)
    return 0
