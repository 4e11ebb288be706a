"""``python -m workbench tour``: the engine on a simulated 8-device mesh, step by step."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_engine_arguments, load_engine

PROMPTS = ([72, 101, 108, 108, 111], [100, 101, 102, 32, 102, 40, 120, 41, 58], [105, 109, 112, 111, 114, 116])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, decode_batch=4)
    parser.add_argument("--steps", type=int, default=8, help="generate steps after the inserts")
    parser.set_defaults(host_devices=8, mesh={"data": 2, "tensor": 4}, max_target_length=128, max_prefill_length=32)


def _nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    engine, params = load_engine(args)
    print(f"mesh: {dict(engine.mesh.shape)} over {engine.mesh.size} {jax.devices()[0].platform} devices")
    print(f"model: {engine.config.num_layers} layers, {engine.config.num_params():,} params\n")
    state = engine.init_decode_state()
    print("the split: (graphdef, params, cache, rest)")
    for name, tree in [("params", params), ("prefill cache", engine.abstract_prefill_cache),
                       ("decode cache", state.cache), ("rest", engine.rest)]:
        print(f"  {name:14s} {len(jax.tree.leaves(tree)):4d} arrays {_nbytes(tree) / 2**20:9.2f} MiB")
    print()
    for slot, prompt in enumerate(PROMPTS):
        padded, true_length = engine.pad(prompt)
        prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=true_length)
        state = engine.insert(prefix, state, slot)
        print(f"prefill {len(prompt)} tokens (bucket {len(padded)}) -> first token {int(first.data[0, 0])}; insert into slot {slot}")
    streams = {slot: [] for slot in range(len(PROMPTS))}
    for _ in range(args.steps):
        state, result = engine.generate(params, state)
        data = np.asarray(result.data)
        for slot in streams:
            if data[slot, 1]:
                streams[slot].append(int(data[slot, 0]))
    print()
    for slot, tokens in streams.items():
        print(f"slot {slot}: position {int(state.positions[slot])}, tokens {tokens}")
    print(f"\ncompiles: {dict(engine.compile_counts)}")
    return 0
