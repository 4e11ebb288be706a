"""``python -m workbench tour``: the engine on a simulated 8-device mesh, step by step."""

from __future__ import annotations

import argparse
import collections

from workbench.cli.common import add_engine_arguments, load_engine

PROMPTS = ("    for i in range(", "        self.", "import os\nimport ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, decode_batch=4)
    parser.add_argument("--steps", type=int, default=24, help="generate steps after the inserts")
    parser.set_defaults(host_devices=8, mesh={"data": 2, "tensor": 4}, max_target_length=128, max_prefill_length=32)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from workbench import inspect

    engine, params = load_engine(args)
    tokenizer = engine.get_tokenizer()
    print(
        f"mesh {dict(engine.mesh.shape)} over {engine.mesh.size} {jax.devices()[0].platform} devices; "
        f"model: {engine.config.num_layers} layers, {engine.config.num_params():,} params; "
        f"{engine.max_concurrent_decodes} decode slots of {engine.max_target_length} positions\n"
    )

    state = engine.init_decode_state()
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for row in inspect.state(engine, params, state).to_rows():
        totals[row["collection"]][0] += 1
        totals[row["collection"]][1] += row["bytes"]
    print("the split: nnx.split(model, nnx.Param, nnx.Cache, ...) -> (graphdef, params, cache, rest)")
    for collection, (count, nbytes) in totals.items():
        print(f"  {collection:8s} {count:4d} arrays {nbytes / 2**20:9.3f} MiB")
    print("  (workbench.inspect.state(engine, params, state) lists every leaf)\n")

    for slot, text in enumerate(PROMPTS):
        padded, true_length = engine.pad(tokenizer.encode(text))
        prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=true_length)
        state = engine.insert(prefix, state, slot)
        print(f"prefill {true_length:2d} tokens (bucket {len(padded)}) -> insert into slot {slot}: {text!r}")
    # Stepped by hand, on purpose: the tour shows the engine's calls (workbench.Scheduler and
    # run_requests drive the same loop for real requests, as `generate` does).
    streams: dict[int, list[int]] = {slot: [int(state.tokens[slot])] for slot in range(len(PROMPTS))}
    for _ in range(args.steps):
        state, result = engine.generate(params, state)
        data = np.asarray(result.data)  # [slots, 3]: token, valid, length -- one host copy per step
        for slot, tokens in streams.items():
            if data[slot, 1]:
                tokens.append(int(data[slot, 0]))
    print(f"\ngenerate x{args.steps}: every slot advances at its own position")
    for slot, tokens in streams.items():
        print(f"  slot {slot} (next position {int(state.positions[slot])}): {tokens[:8]}...")
        print(f"    {PROMPTS[slot] + tokenizer.decode(tokens)!r}")
    print(f"\ncompiles: {dict(engine.compile_counts)}")
    return 0
