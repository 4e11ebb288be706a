"""``python -m workbench bench``: prefill, insert and decode speed, after warm-up.

A table goes to stderr; with ``--json``, one object with the same figures goes to stdout:
``prefill_ms``, ``insert_ms``, ``generate_step_ms`` (median), ``decode_tokens_per_s``,
``bytes_per_step``, ``achieved_gb_per_s`` and ``compiles`` (``{"prefill": n, "insert": n,
"generate": n}``), ``quantize``, ``kv_cache_dtype``, ``weight_bytes``, ``read_gb_per_s`` (the
machine's all-core read bandwidth, :func:`workbench.bench.read_gb_per_s`) and
``roofline_fraction`` (achieved over read bandwidth); the cold start: ``compile_s`` (the same
three), ``load_s``, ``first_token_s`` (process start to the first token) and ``compile_cache``
(``"hit"``, ``"miss"`` or ``"off"``); ``decode_library`` (``"ynnpack"`` or ``"eigen"``: what runs
the decode step's weight products on the CPU, :mod:`workbench.engine.autotune`); ``expert_bytes``
for a mixture of experts (what the router's chosen experts need of the bytes per step,
:func:`workbench.bench.expert_bytes`; absent for a dense model). See :mod:`workbench.bench` for
what is measured and how.

``--sweep context|batch|prefill --points N,N,...``: one curve instead (:func:`run_sweep`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time

from workbench.cli.common import add_engine_arguments, load_engine
from workbench.cli.launch import add_process_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_process_arguments(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--prompt-length", type=int, default=64, metavar="L", help="tokens per prompt (default 64)")
    group.add_argument("--steps", type=int, default=32, metavar="N", help="timed decode steps (default 32)")
    group.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    group.add_argument(
        "--shared-prefix-length",
        type=int,
        default=None,
        metavar="L",
        help="instead: time to first token of --prompt-length prompts sharing their first L tokens, "
        "with and without the prefix cache (workbench.PrefixCache)",
    )
    group.add_argument(
        "--sweep",
        choices=("context", "batch", "prefill"),
        default=None,
        help="instead: one curve (decode step against context or batch, prefill against prompt length)",
    )
    group.add_argument(
        "--points", default=None, metavar="N,N,...", help="the sweep's points (cached tokens, slots, prompt tokens)"
    )


def run(args: argparse.Namespace) -> int:
    from workbench import compile_cache
    from workbench.bench import check_shape, expert_bytes, measure, read_gb_per_s

    if args.shared_prefix_length is not None:
        return run_shared_prefix(args)
    if args.sweep:
        return run_sweep(args)
    # Before loading anything: a shape that cannot work should not cost a model load to find out.
    check_shape(args.prompt_length, args.steps, args.max_prefill_length, args.max_target_length)
    cache_before, start = collections.Counter(compile_cache.counts), time.perf_counter()
    engine, params = load_engine(args)
    load_s = time.perf_counter() - start
    result = measure(engine, params, prompt_length=args.prompt_length, steps=args.steps)
    bandwidth = read_gb_per_s()
    result = dataclasses.replace(result, load_s=load_s, compile_cache=compile_cache.status(cache_before))
    config = engine.config
    print(
        f"bench: {config.num_params() / 1e6:.1f}M params ({config.param_dtype}), decode batch "
        f"{engine.max_concurrent_decodes}, prompt {args.prompt_length} tokens, {args.steps} steps, "
        f"mesh {dict(engine.mesh.shape)} on {engine.mesh.devices.flat[0].platform}",
        file=sys.stderr,
    )
    compiles = ", ".join(f"{name} {count}" for name, count in result.compiles.items())
    rows = [
        ("prefill", f"{result.prefill_ms:.2f} ms", f"{args.prompt_length}-token prompt"),
        ("insert", f"{result.insert_ms:.3f} ms", "one slot"),
        ("generate step", f"{result.generate_step_ms:.2f} ms", "median"),
        ("decode", f"{result.decode_tokens_per_s:.1f} tokens/s", "every slot busy"),
        ("bytes per step", f"{result.bytes_per_step / 1e6:.1f} MB", "weights + live KV cache"),
        ("achieved", f"{result.achieved_gb_per_s:.2f} GB/s", "bytes per step / step time"),
        ("roofline", f"{result.achieved_gb_per_s / bandwidth:.0%}", f"of the {bandwidth:.1f} GB/s all-core read"),
        ("weights", f"{result.weight_bytes / 1e6:.1f} MB", f"quantize {result.quantize}, KV {result.kv_cache_dtype}"),
        ("decode library", result.decode_library or "-", "of the weight products (engine.autotune)"),
        ("compiles", compiles, "warm-up included"),
        ("compile", ", ".join(f"{name} {s:.2f} s" for name, s in result.compile_s.items()), "first call less median"),
        ("load", f"{result.load_s:.2f} s", "workbench.load"),
        ("first token", f"{result.first_token_s:.2f} s", f"from process start; compile cache {result.compile_cache}"),
    ]
    experts = None
    if config.num_experts:  # a mixture of experts: what the router's choice needs of those bytes
        experts = expert_bytes(engine, params, prompt_length=args.prompt_length, steps=min(args.steps, 4))
        chosen = statistics.median(experts["chosen"])
        note = f"{chosen / experts['read']:.0%} of the bytes per step, median of {len(experts['chosen'])} steps"
        rows.insert(5, ("experts chosen", f"{chosen / 1e6:.1f} MB", note))
    for name, value, note in rows:
        print(f"  {name:15s} {value:>32s}   {note}", file=sys.stderr)
    if args.json:
        figures = result.to_dict() | {
            "read_gb_per_s": bandwidth,
            "roofline_fraction": result.achieved_gb_per_s / bandwidth,
        }
        if experts is not None:
            figures["expert_bytes"] = experts
        print(json.dumps(figures))
    return 0


def run_shared_prefix(args: argparse.Namespace) -> int:
    """``--shared-prefix-length``: time to first token with and without the prefix cache."""
    from workbench.bench import measure_shared_prefix

    length, shared = args.prompt_length, args.shared_prefix_length
    if not 0 <= shared <= length:  # before the model load, as check_shape
        raise ValueError(f"--shared-prefix-length {shared} is outside 0..--prompt-length ({length})")
    engine, params = load_engine(args)
    result = measure_shared_prefix(engine, params, prompt_length=length, shared_prefix_length=shared)
    print(
        f"bench: {engine.config.num_params() / 1e6:.1f}M params, {length}-token prompts sharing {shared}, "
        f"blocks of {result.block} (--max-prefill-length), {result.tokens_reused} tokens reused on a hit",
        file=sys.stderr,
    )
    for name, ms, note in [
        ("uncached", result.uncached_ms, "no prefix cache"),
        ("miss", result.miss_ms, f"cache on, nothing shared ({result.miss_ms / result.uncached_ms:.2f}x)"),
        ("hit", result.hit_ms, f"cache on, shared header held ({result.hit_ms / result.uncached_ms:.2f}x)"),
    ]:
        print(f"  first token {name:9s} {ms:10.2f} ms   {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict()))


def run_sweep(args: argparse.Namespace) -> int:
    """``--sweep KIND --points ...``: one curve of ours (:func:`workbench.bench.sweep`); each
    point's median ms on stderr, and with ``--json`` ``{"sweep": KIND, "points": [{"point": n,
    "ms": m, "decode_library": ...}, ...]}`` on stdout. ``--steps``: the timed calls a point;
    ``--prompt-length``: the cached tokens a slot of the batch sweep.
    Transformers beside it: ``scripts/side_by_side.py OUT --curves``."""
    from workbench.bench import sweep

    if not args.points:
        raise ValueError("--sweep needs --points, e.g. --points 256,1024,4096")
    try:
        points = [int(part) for part in args.points.split(",")]
    except ValueError:
        raise ValueError(f"--points must be integers separated by commas, got {args.points!r}") from None
    limit = {"context": args.max_target_length, "prefill": args.max_prefill_length}.get(args.sweep)
    if limit is not None and max(points) > limit:  # before loading: a point that cannot run costs no load
        bound = "max_target_length" if args.sweep == "context" else "max_prefill_length"
        raise ValueError(f"{args.sweep} point {max(points)} exceeds {bound} ({limit})")
    engine, params = load_engine(args)
    rows = sweep(engine, params, args.sweep, points, steps=args.steps, context=args.prompt_length)
    unit = {"context": "cached tokens", "batch": "decode slots", "prefill": "prompt tokens"}[args.sweep]
    print(f"bench sweep {args.sweep} ({unit}), {engine.config.num_params() / 1e6:.1f}M params", file=sys.stderr)
    for row in rows:
        print(f"  {row['point']:>7d}   {row['ms']:10.2f} ms", file=sys.stderr)
    if args.json:
        print(json.dumps({"sweep": args.sweep, "points": rows}))
    return 0
