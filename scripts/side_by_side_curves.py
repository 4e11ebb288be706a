"""``side_by_side.py OUT_DIR --curves``: the decode step against context length and decode batch,
and prefill against prompt length, ours beside transformers on one checkpoint, point by point.

The grid is (decode batch x context), each cell kept only when its KV cache fits ``kv_budget``
bytes (``B * context * bytes per token``, our float32 cache); the cells left out are listed in
the report. For each decode batch one engine is built over the shared params (its generate
compiled once, every context read through its key buckets); for each cell our steps
(:func:`decode_step_times`) and transformers' (:func:`hf_cached_step_times`) run
back to back, so a change of load hits both alike. Neither side prefills the context: our slots
are moved on to the context's position, transformers' cache is filled with random keys and
values of that length; a step reads the same bytes and runs the same kernels as after a real
prompt. The prompt sweep then times one prefill per length on each side (ours after an untimed
call, which compiles the length's bucket). Writes ``curves.json``, ``curves.csv``, ``curves.md``
and three plots in OUT_DIR.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

from side_by_side_shared import plot, table

CONTEXTS = [256, 1024, 2048, 4096, 8192]
BATCHES = [1, 8, 32, 64]
LENGTHS = [128, 512, 1024, 2048, 4096]
KV_BUDGET = 2 * 2**30  # one side's cache at a time, beside both sides' weights (5 GB each at 1B float32)


def kv_bytes_per_token(config) -> int:
    """Bytes of keys and values one token holds in our cache (every layer; compute dtype)."""
    import numpy as np

    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * np.dtype(config.compute_dtype).itemsize


def grid(batches, contexts, per_token: int, budget: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(cells kept, cells left out): (batch, context) pairs whose cache fits ``budget`` bytes."""
    cells = [(b, c) for b in batches for c in contexts]
    return [x for x in cells if x[0] * x[1] * per_token <= budget], [
        x for x in cells if x[0] * x[1] * per_token > budget
    ]


def hf_cached_step_times(model, batch: int, context: int, steps: int) -> list[float]:
    """Seconds of ``steps`` greedy decode steps of transformers (forward of one token per row,
    ``logits_to_keep=1``, argmax), after one untimed, over a ``DynamicCache`` holding random
    keys and values so that the last step sees ``context`` tokens."""
    import torch
    from transformers import DynamicCache

    c = model.config
    start = context - steps - 1
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=c)
    generator = torch.Generator().manual_seed(0)
    for layer in range(c.num_hidden_layers):
        shape = (batch, c.num_key_value_heads, start, c.head_dim)
        cache.update(torch.randn(shape, generator=generator, dtype=dtype), torch.randn(shape, dtype=dtype), layer)
    tokens = torch.randint(3, c.vocab_size, (batch, 1), generator=generator)
    times = []
    with torch.inference_mode():
        for step in range(steps + 1):
            begin = time.perf_counter()
            logits = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1).logits
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            if step:
                times.append(time.perf_counter() - begin)
    del cache
    return times


def best_threads(measure) -> dict:
    """Transformers' median ms with torch's own thread count and with one thread, the faster kept
    as ``hf_ms``: on a loaded machine torch's OpenMP threads wait at every barrier for a core
    (a 56M step 8x slower with two threads than with one at load 7), where XLA's pool does not;
    the faster of the two is the fair figure to set ours beside."""
    import torch

    own = torch.get_num_threads()
    by_threads = {}
    for threads in sorted({own, 1}, reverse=True):
        torch.set_num_threads(threads)
        by_threads[threads] = statistics.median(measure()) * 1e3
    torch.set_num_threads(own)
    fastest = min(by_threads, key=by_threads.get)
    return dict(hf_ms=by_threads[fastest], hf_threads=fastest, hf_ms_by_threads=by_threads)


def hf_prefill_time(model, length: int) -> float:
    """Seconds of the forward pass ``generate`` makes over a ``length``-token prompt (a fresh
    cache, logits of the last position only)."""
    import numpy as np
    import torch

    ids = torch.from_numpy(np.random.default_rng(2).integers(3, model.config.vocab_size, (1, length)))
    with torch.inference_mode():
        begin = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - begin


def run(checkpoint: Path, model, out_dir: Path, *, dtype: str, batches, contexts, lengths, steps, budget, log) -> int:
    import workbench
    from workbench.bench import decode_step_times, prefill_times
    from workbench.engine import autotune
    from workbench.trees import leaf_paths

    base, params = workbench.load(checkpoint, dtype=dtype, decode_batch_size=1, max_prefill_length=16)
    config = base.config
    per_token = kv_bytes_per_token(config)
    cells, left_out = grid(batches, contexts, per_token, budget)
    log(f"cells {cells}; left out (cache over {budget / 2**30:.1f} GiB): {left_out}")
    results = dict(
        checkpoint=str(checkpoint),
        dtype=dtype,
        cpu=autotune.cpu_name(),
        lscpu_model_name=lscpu_model_name(),
        steps=steps,
        kv_budget_bytes=budget,
        kv_bytes_per_token=per_token,
        weight_bytes=sum(leaf.nbytes for leaf in leaf_paths(params).values()),
        decode_library={},
        left_out=left_out,
        decode=[],
        prefill=[],
    )
    for batch in sorted({b for b, _ in cells}):
        mine = sorted(c for b, c in cells if b == batch)
        # Past the largest context, so every cell reads a sliced prefix of the cache, as a request
        # short of a full cache does.
        engine = workbench.Engine(
            config, base.mesh, decode_batch_size=batch, max_prefill_length=16, max_target_length=max(mine) + 16
        )
        results["decode_library"][batch] = engine.tune()
        for context in mine:
            load = os.getloadavg()[0]
            ours = decode_step_times(engine, params, context, steps)
            theirs = best_threads(lambda: hf_cached_step_times(model, batch, context, steps))
            point = dict(batch=batch, context=context, load=load, kv_cache_bytes=batch * context * per_token)
            point |= dict(ours_ms=statistics.median(ours) * 1e3, ours_times_ms=[t * 1e3 for t in ours], **theirs)
            results["decode"].append(point)
            write(out_dir, results, plots=False)  # a run cut short keeps its points
            log(
                f"batch {batch:3d} context {context:5d}: ours {point['ours_ms']:8.1f} ms/step | "
                f"transformers {point['hf_ms']:8.1f} ms/step | load {load:.1f}"
            )
        del engine
    if lengths:
        engine = workbench.Engine(config, base.mesh, decode_batch_size=1, max_prefill_length=max(lengths))
        hf_prefill_time(model, min(lengths))  # warm-up: torch's first forward allocates
        for length in lengths:
            load = os.getloadavg()[0]
            ours = prefill_times(engine, params, length)[0]
            theirs = best_threads(lambda: [hf_prefill_time(model, length)])
            results["prefill"].append(dict(length=length, load=load, ours_ms=ours * 1e3, **theirs))
            write(out_dir, results, plots=False)
            log(f"prompt {length:5d}: ours {ours * 1e3:9.1f} ms | transformers {theirs['hf_ms']:9.1f} ms")
    write(out_dir, results)
    return 0


def lscpu_model_name() -> str:
    import subprocess

    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if "Model name" in line), "?")


DECODE_COLUMNS = [
    ("batch", lambda p: p["batch"], "{}"),
    ("context", lambda p: p["context"], "{}"),
    ("KV cache MB", lambda p: p["kv_cache_bytes"] / 1e6, "{:.0f}"),
    ("workbench ms/step", lambda p: p["ours_ms"], "{:.1f}"),
    ("transformers ms/step", lambda p: p["hf_ms"], "{:.1f}"),
    ("torch threads", lambda p: p["hf_threads"], "{}"),
    ("speedup", lambda p: p["hf_ms"] / p["ours_ms"], "{:.2f}x"),
    ("load", lambda p: p["load"], "{:.1f}"),
]
PREFILL_COLUMNS = [
    ("prompt", lambda p: p["length"], "{}"),
    ("workbench ms", lambda p: p["ours_ms"], "{:.0f}"),
    ("transformers ms", lambda p: p["hf_ms"], "{:.0f}"),
    ("torch threads", lambda p: p["hf_threads"], "{}"),
    ("speedup", lambda p: p["hf_ms"] / p["ours_ms"], "{:.2f}x"),
    ("load", lambda p: p["load"], "{:.1f}"),
]


def write(out_dir: Path, results: dict, plots: bool = True) -> str:
    """``curves_DTYPE.json``, ``.csv`` (one row per point), ``.md`` and, with ``plots``, the plots."""
    tag = results["dtype"]
    (out_dir / f"curves_{tag}.json").write_text(json.dumps(results, indent=1))
    decode, prefill = results["decode"], results["prefill"]
    with open(out_dir / f"curves_{tag}.csv", "w", newline="") as out:
        rows = csv.writer(out)
        rows.writerow(["kind", "batch", "context_or_prompt", "workbench_ms", "transformers_ms", "load"])
        for p in decode:
            rows.writerow(
                ["decode_step", p["batch"], p["context"], f"{p['ours_ms']:.2f}", f"{p['hf_ms']:.2f}", p["load"]]
            )
        for p in prefill:
            rows.writerow(["prefill", 1, p["length"], f"{p['ours_ms']:.2f}", f"{p['hf_ms']:.2f}", p["load"]])
    by_batch = {}
    for p in decode if plots else []:
        by_batch.setdefault(p["batch"], []).append(p)
    for batch, rows in by_batch.items():
        if len(rows) > 1:
            plot(
                out_dir / f"curves_{tag}_step_vs_context_b{batch}.png",
                [p["context"] for p in rows],
                {"workbench": [p["ours_ms"] for p in rows], "transformers": [p["hf_ms"] for p in rows]},
                "context length (cached tokens)",
                "ms per decode step",
                f"decode step, batch {batch}, {tag}",
            )
    first = min((p["context"] for p in decode), default=0)
    at_first = [p for p in decode if p["context"] == first]
    if plots and len(at_first) > 1:
        plot(
            out_dir / f"curves_{tag}_step_vs_batch.png",
            [p["batch"] for p in at_first],
            {"workbench": [p["ours_ms"] for p in at_first], "transformers": [p["hf_ms"] for p in at_first]},
            "decode batch",
            "ms per decode step",
            f"decode step, context {first}, {tag}",
        )
    if plots and prefill:
        plot(
            out_dir / f"curves_{tag}_prefill_vs_length.png",
            [p["length"] for p in prefill],
            {"workbench": [p["ours_ms"] for p in prefill], "transformers": [p["hf_ms"] for p in prefill]},
            "prompt length",
            "ms per prefill",
            f"prefill, batch 1, {tag}",
        )
    lines = [
        f"# Curves: workbench vs transformers, {tag}",
        "",
        f"Checkpoint {results['checkpoint']} ({results['weight_bytes'] / 1e9:.2f} GB of weights served), "
        f"{results['lscpu_model_name']} ({results['cpu']}); decode library {results['decode_library']} "
        f"(by decode batch); {results['steps']} timed steps a cell, medians; transformers: the faster of torch's "
        f"own thread count and one thread (`hf_ms_by_threads` in the JSON). Cells left out (KV cache over "
        f"{results['kv_budget_bytes'] / 2**30:.1f} GiB, {results['kv_bytes_per_token'] // 1024} KiB a token): "
        f"{', '.join(f'batch {b} x {c}' for b, c in results['left_out']) or 'none'}.",
        "",
        "## Decode step",
        "",
        *table(DECODE_COLUMNS, decode),
        "",
        "## Prefill (batch 1)",
        "",
        *table(PREFILL_COLUMNS, prefill),
        "",
    ]
    text = "\n".join(lines)
    (out_dir / f"curves_{tag}.md").write_text(text)
    return text
