"""Side by side: workbench against transformers' greedy ``generate`` on one Llama checkpoint.

    .venv/bin/python scripts/side_by_side.py OUT_DIR [--quick] [--precision]

Both read the same Hugging Face checkpoint (a 56M-parameter Llama, ``ModelConfig.llama_56m()``,
random weights saved with ``save_pretrained``) in float32 on the CPU, in one run. Writes to
OUT_DIR: ``results.md`` (tables and the four targets), ``results.json``, and three plots --
decode step time against decode batch and against context length, prefill time against prompt
length. The machine is shared, so the targets are measured in interleaved rounds -- numpy's read
bandwidth (the sum of 1 GiB), our step, transformers' step, our insert at batch 64 -- and each
ratio is the median of the rounds' ratios.

``--precision`` measures instead, in interleaved rounds at decode batch 8, our step and insert in
each precision (float32, bfloat16 -- on the CPU bf16 weights with float32 compute --, w8, w8a8, w4) beside
transformers' step in the same precision:
float32, bfloat16 (``model.to(torch.bfloat16)``) and, for w8a8, torch's dynamic int8
(``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``); w8 and w4 have no torch
counterpart on CPU and are set beside its float32. Writes ``precision.md`` and ``precision.json``.

Transformers' step time is the median gap between consecutive calls of a stopping criterion,
i.e. one pass of its decode loop (forward, greedy pick, bookkeeping); ours is the median of
``engine.generate`` calls, each blocked until ready (:func:`workbench.bench.measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = 32
PROMPT = 64
TARGET_BATCH = 8
BIG_BATCH = 64  # insert must cost the same here as at TARGET_BATCH


def make_checkpoint(path: Path) -> None:
    """A random Llama of the preset's shape, saved the way Hugging Face models are shipped."""
    import torch
    import transformers

    from workbench import ModelConfig

    c = ModelConfig.llama_56m()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.embed_dim,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=c.bos_id,
        eos_token_id=c.eos_ids[0],
        pad_token_id=c.pad_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)


class _StepClock:
    """A stopping criterion that never stops and notes when each decode step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_step_ms(model, batch: int, context: int, steps: int) -> float:
    """Median ms per decode step of greedy ``generate`` for ``batch`` prompts of ``context`` tokens."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.from_numpy(np.random.default_rng(1).integers(3, model.config.vocab_size, (batch, context)))
    clock = _StepClock()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    return statistics.median(np.diff(clock.times)) * 1e3


def hf_prefill_ms(model, length: int, repeats: int = 5) -> float:
    """Median ms of the forward pass ``generate`` makes over a ``length``-token prompt: it fills a
    fresh cache and projects only the last position onto the vocabulary (``logits_to_keep=1``)."""
    import torch

    ids = torch.from_numpy(np.random.default_rng(2).integers(3, model.config.vocab_size, (1, length)))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def parity(engine, params, model) -> float:
    """Max |ours - theirs| / max |theirs| of the logits of one 16-token sequence: same weights?"""
    import torch

    tokens = np.random.default_rng(3).integers(3, engine.config.vocab_size, (1, 16))
    ours = np.asarray(engine.forward(params, tokens))
    with torch.inference_mode():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def target_rounds(checkpoint: Path, model, steps: int, rounds: int, log) -> tuple[list[dict], float, dict]:
    """The targets' figures in ``rounds`` interleaved rounds (numpy, ours, transformers, insert at
    the big batch), so a change of load on this shared machine hits both sides alike."""
    import workbench
    from workbench.bench import measure, numpy_read_gb_per_s

    engine, params = workbench.load(checkpoint, decode_batch_size=TARGET_BATCH)
    big_engine, big_params = workbench.load(checkpoint, decode_batch_size=BIG_BATCH)
    parity_error = parity(engine, params, model)
    rows = []
    for _ in range(rounds):
        bandwidth = numpy_read_gb_per_s()
        ours = measure(engine, params, prompt_length=PROMPT, steps=steps)
        theirs = hf_step_ms(model, TARGET_BATCH, PROMPT, steps)
        big = measure(big_engine, big_params, prompt_length=PROMPT, steps=2)
        rows.append(
            dict(
                numpy_gb_per_s=bandwidth,
                ours=ours.to_dict(),
                hf_step_ms=theirs,
                big_batch_insert_ms=big.insert_ms,
                load=os.getloadavg()[0],
            )
        )
        log(
            f"round: numpy {bandwidth:.1f} GB/s | ours {ours.generate_step_ms:.2f} ms/step "
            f"({ours.achieved_gb_per_s:.2f} GB/s), insert {ours.insert_ms:.3f} ms (batch {BIG_BATCH}: "
            f"{big.insert_ms:.3f} ms) | transformers {theirs:.2f} ms/step | load {rows[-1]['load']:.2f}"
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
    med = statistics.median
    speedup = med(r["hf_step_ms"] / r["ours"]["generate_step_ms"] for r in rounds)
    fraction = med(r["ours"]["achieved_gb_per_s"] / r["numpy_gb_per_s"] for r in rounds)
    insert_ratio = med(r["big_batch_insert_ms"] / r["ours"]["insert_ms"] for r in rounds)
    step, hf = med(r["ours"]["generate_step_ms"] for r in rounds), med(r["hf_step_ms"] for r in rounds)
    gb_s, numpy_gb_s = med(r["ours"]["achieved_gb_per_s"] for r in rounds), med(r["numpy_gb_per_s"] for r in rounds)
    insert, big_insert = med(r["ours"]["insert_ms"] for r in rounds), med(r["big_batch_insert_ms"] for r in rounds)
    sweep = swept["compiles"]
    once = all(c["generate"] == 1 for c in compiles.values()) and sweep["generate"] == 1
    per_bucket = all(c["prefill"] == 1 for c in compiles.values()) and sweep["prefill"] == len(swept["buckets"])
    runs = len(swept["by_context"]) + len(swept["by_length"])
    return [
        (
            f"decode step >= 2x faster than transformers (batch {TARGET_BATCH}, {PROMPT}-token prompts)",
            f"{speedup:.2f}x ({step:.1f} vs {hf:.1f} ms)",
            speedup >= 2,
        ),
        (
            "achieved bandwidth >= 50% of numpy's read bandwidth",
            f"{100 * fraction:.0f}% ({gb_s:.2f} of {numpy_gb_s:.2f} GB/s)",
            fraction >= 0.5,
        ),
        (
            f"insert at batch {BIG_BATCH} <= 1.5x insert at batch {TARGET_BATCH}",
            f"{insert_ratio:.2f}x ({big_insert:.3f} vs {insert:.3f} ms)",
            insert_ratio <= 1.5,
        ),
        (
            "generate compiled once; prefill once per length bucket",
            f"generate {sweep['generate']} for {runs} runs of one engine; prefill {sweep['prefill']} for buckets "
            f"{swept['buckets']}",
            once and per_bucket,
        ),
    ]


def write_report(out_dir: Path, results: dict, met: list[tuple[str, str, bool]]) -> str:
    swept, rounds = results["sweeps"], results["rounds"]
    by_batch, by_context, by_length = swept["by_batch"], swept["by_context"], swept["by_length"]
    batches, contexts, lengths = (
        [p[k] for p in rows] for k, rows in [("batch", by_batch), ("context", by_context), ("length", by_length)]
    )

    def series(rows: list[dict], ours, theirs) -> dict[str, list[float]]:
        return {"workbench": [ours(p) for p in rows], "transformers": [theirs(p) for p in rows]}

    step, hf_step = (lambda p: p["ours"]["generate_step_ms"]), (lambda p: p["hf_step_ms"])
    plot(
        out_dir / "step_vs_batch.png",
        batches,
        series(by_batch, step, hf_step),
        "decode batch",
        "ms per decode step",
        f"decode step, {PROMPT}-token prompts",
    )
    plot(
        out_dir / "step_vs_context.png",
        contexts,
        series(by_context, step, hf_step),
        "context length (prompt tokens)",
        "ms per decode step",
        f"decode step, batch {TARGET_BATCH}",
    )
    plot(
        out_dir / "prefill_vs_length.png",
        lengths,
        series(by_length, lambda p: p["ours_prefill_ms"], lambda p: p["hf_prefill_ms"]),
        "prompt length",
        "ms per prefill",
        "prefill, batch 1",
    )
    v = results["versions"]
    loads = [r["load"] for r in rounds]
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
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in met],
        "",
        "| round | numpy GB/s | workbench ms/step | GB/s | transformers ms/step | insert ms (batch 8 / 64) | load |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {i + 1} | {r['numpy_gb_per_s']:.2f} | {r['ours']['generate_step_ms']:.2f} | "
            f"{r['ours']['achieved_gb_per_s']:.2f} | {r['hf_step_ms']:.2f} | {r['ours']['insert_ms']:.3f} / "
            f"{r['big_batch_insert_ms']:.3f} | {r['load']:.2f} |"
            for i, r in enumerate(rounds)
        ],
        "",
        f"## Decode step against decode batch ({PROMPT}-token prompts)",
        "",
        "| batch | workbench ms/step | transformers ms/step | speedup | workbench GB/s | insert ms |",
        "|---|---|---|---|---|---|",
        *[
            f"| {p['batch']} | {p['ours']['generate_step_ms']:.2f} | {p['hf_step_ms']:.2f} | "
            f"{p['hf_step_ms'] / p['ours']['generate_step_ms']:.2f}x | {p['ours']['achieved_gb_per_s']:.2f} | "
            f"{p['ours']['insert_ms']:.3f} |"
            for p in by_batch
        ],
        "",
        f"## Decode step against context length (batch {TARGET_BATCH})",
        "",
        "| context | workbench ms/step | transformers ms/step | speedup | workbench GB/s |",
        "|---|---|---|---|---|",
        *[
            f"| {p['context']} | {p['ours']['generate_step_ms']:.2f} | {p['hf_step_ms']:.2f} | "
            f"{p['hf_step_ms'] / p['ours']['generate_step_ms']:.2f}x | {p['ours']['achieved_gb_per_s']:.2f} |"
            for p in by_context
        ],
        "",
        "## Prefill against prompt length (batch 1)",
        "",
        "| prompt | workbench ms | transformers ms | speedup |",
        "|---|---|---|---|",
        *[
            f"| {p['length']} | {p['ours_prefill_ms']:.2f} | {p['hf_prefill_ms']:.2f} | "
            f"{p['hf_prefill_ms'] / p['ours_prefill_ms']:.2f}x |"
            for p in by_length
        ],
        "",
        "![step vs batch](step_vs_batch.png) ![step vs context](step_vs_context.png) "
        "![prefill vs length](prefill_vs_length.png)",
        "",
    ]
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text)
    return text


PRECISIONS = {  # ours: workbench.load options; theirs: the transformers model of the same precision
    "float32": ({}, "float32"),
    "bfloat16": ({"dtype": "bfloat16"}, "bfloat16"),  # on the CPU: bf16 weights, f32 compute and KV cache
    "w8": ({"quantize": "w8"}, "float32"),
    "w8a8": ({"quantize": "w8a8"}, "int8 dynamic"),
    "w4": ({"quantize": "w4"}, "float32"),
}


def load_precision(checkpoint: Path, options: dict):
    """(engine, params) at decode batch 8 in one precision (``workbench.load`` options)."""
    import workbench

    return workbench.load(checkpoint, decode_batch_size=TARGET_BATCH, **options)


def precision_rounds(checkpoint: Path, model, steps: int, rounds: int, log) -> tuple[str, list[dict]]:
    """Our step and insert per precision beside transformers' in the same precision; a table."""
    import copy

    import torch

    from workbench.bench import measure, read_gb_per_s
    from workbench.engine import autotune

    theirs_models = {
        "float32": model,
        "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
        "int8 dynamic": torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8),
    }
    ours = {name: load_precision(checkpoint, o) for name, (o, _) in PRECISIONS.items()}
    rows = []
    for _ in range(rounds):
        row = {"read_gb_per_s": read_gb_per_s(), "load": os.getloadavg()[0]}
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
    med = statistics.median
    f32 = [r["float32"]["ours"] for r in rows]
    lines = [
        f"# Precision side by side (llama-56m, decode batch {TARGET_BATCH}, {PROMPT}-token prompts, "
        f"{rounds} interleaved rounds, medians of per-round ratios)",
        "",
        "| precision | transformers in | ours ms/step | theirs ms/step | theirs/ours | ours / our f32 | "
        "insert / our f32 insert | weight MB | roofline | decode library |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, theirs) in PRECISIONS.items():
        mine = [r[name]["ours"] for r in rows]
        lines.append(
            f"| {name} | {theirs} | {med(m['generate_step_ms'] for m in mine):.2f} | "
            f"{med(r[name]['hf_step_ms'] for r in rows):.2f} | "
            f"{med(r[name]['hf_step_ms'] / r[name]['ours']['generate_step_ms'] for r in rows):.2f}x | "
            f"{med(m['generate_step_ms'] / f['generate_step_ms'] for m, f in zip(mine, f32)):.2f} | "
            f"{med(m['insert_ms'] / f['insert_ms'] for m, f in zip(mine, f32)):.2f} | "
            f"{mine[0]['weight_bytes'] / 1e6:.1f} | "
            f"{med(m['achieved_gb_per_s'] / r['read_gb_per_s'] for m, r in zip(mine, rows)):.0%} | "
            f"{mine[0]['decode_library']} |"
        )
    lines += [
        "",
        "Loads: "
        + ", ".join(f"{r['load']:.2f}" for r in rows)
        + "; all-core read bandwidth: "
        + ", ".join(f"{r['read_gb_per_s']:.1f}" for r in rows)
        + " GB/s.",
        f"CPU: {autotune.cpu_name()}.",
        "",
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, points and steps (a smoke run)")
    parser.add_argument("--precision", action="store_true", help="only the precision table (see above)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import jax
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    steps, sweep_steps, rounds = (8, 4, 1) if args.quick else (STEPS, 16, 3)
    batches = [1, 8, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    contexts = [64, 256] if args.quick else [64, 128, 256, 512, 1024]
    lengths = [16, 64, 256] if args.quick else [16, 32, 64, 128, 256, 512, 1024]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama-56m"
        make_checkpoint(checkpoint)
        model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        hf_step_ms(model, 2, 16, 2)  # warm-up
        if args.precision:
            text, rows = precision_rounds(checkpoint, model, steps, rounds, log)
            (args.out_dir / "precision.md").write_text(text)
            (args.out_dir / "precision.json").write_text(json.dumps(rows, indent=1))
            log(text)
            return 0
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
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
    )
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    log(write_report(args.out_dir, results, met).split("\n## Decode step")[0])
    return 0 if all(ok for _, _, ok in met) else 1


if __name__ == "__main__":
    sys.exit(main())
