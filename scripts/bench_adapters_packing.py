"""Two figures of issue 13, printed (not a timed test): run ``python scripts/bench_adapters_packing.py``.

1. Packed prefill: 8 prompts of 12-20 tokens in one ``prefill_concat`` call against 8 separate
   ``prefill`` calls (MaxText claims about 15% per prefilled token for packing).
2. The generate step with every slot on one of three rank-8 LoRA adapters (all seven projections)
   against the base step, on the 56M model, batch 8 (target: at most 1.3x).

Both sides of each comparison are timed in interleaved rounds in one process; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "")

import jax
import numpy as np

import workbench
from workbench.checkpoints.adapters import Adapter, sizes, stack_adapters
from workbench.model.lora import TARGETS


def timed(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def random_adapter(config, rank: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(config.num_layers):
        for target in TARGETS:
            d_in, d_out = sizes(config, target)
            a = rng.standard_normal((d_in, rank)).astype(np.float32) / np.sqrt(d_in)
            weights[layer, target] = (a, 0.01 * rng.standard_normal((rank, d_out)).astype(np.float32))
    return Adapter(rank, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="generate steps per round")
    args = parser.parse_args()
    config = workbench.ModelConfig.llama_56m()
    mesh = workbench.make_mesh({"data": 1})
    shape = dict(decode_batch_size=8, max_prefill_length=256, max_target_length=256)
    stack = stack_adapters({f"a{i}": random_adapter(config, 8, i) for i in range(3)}, config)
    base = workbench.Engine(config, mesh, **shape)
    lora = workbench.Engine(config, mesh, adapters=stack, **shape)
    params = base.load_params(seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, size=int(n)).tolist() for n in rng.integers(12, 21, size=8)]

    # ---- packed prefill against separate prefills
    def separate():
        out = []
        for p in prompts:
            padded, n = base.pad(p)
            out.append(base.prefill(params=params, padded_tokens=padded, true_length=n))
        return out

    def packed():
        return base.prefill_concat(params=params, prompts=prompts)

    for call in (separate, packed):
        timed(call)
    times = {"separate": [], "packed": []}
    for _ in range(args.rounds):
        times["separate"].append(timed(separate))
        times["packed"].append(timed(packed))
    sep, pck = statistics.median(times["separate"]), statistics.median(times["packed"])
    tokens = sum(len(p) for p in prompts)
    print(
        f"prefill of 8 prompts ({tokens} tokens, 12-20 each): 8 separate {sep * 1e3:.1f} ms, packed {pck * 1e3:.1f} ms"
    )
    print(
        f"  per prefilled token: separate {sep / tokens * 1e6:.0f} us, packed {pck / tokens * 1e6:.0f} us;"
        f" packed/separate = {pck / sep:.2f}"
    )

    # ---- generate step: three adapters against the base
    def filled(engine, adapters):
        state = engine.init_decode_state()
        padded, n = engine.pad(prompts[0])
        for slot in range(8):
            prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n, adapter=adapters[slot])
            state = engine.insert(prefix, state, slot)
        return state

    states = {"base": filled(base, [None] * 8), "lora": filled(lora, [f"a{s % 3}" for s in range(8)])}
    engines = {"base": base, "lora": lora}
    steps = {"base": [], "lora": []}
    for name in steps:  # warm up
        states[name], _ = engines[name].generate(params, states[name])
    for _ in range(args.rounds):
        for name in steps:
            for _ in range(args.steps):
                start = time.perf_counter()
                states[name], result = engines[name].generate(params, states[name])
                jax.block_until_ready((states[name], result))
                steps[name].append(time.perf_counter() - start)
            states[name] = engines[name].free_resource(0, states[name])  # keep positions from running out
            states[name] = engines[name].insert(
                engines[name].prefill(
                    params=params,
                    padded_tokens=base.pad(prompts[1])[0],
                    true_length=len(prompts[1]),
                    adapter=None if name == "base" else "a0",
                )[0],
                states[name],
                0,
            )
    b, lo = statistics.median(steps["base"]), statistics.median(steps["lora"])
    print(
        f"generate step, 56M model, batch 8: base {b * 1e3:.1f} ms,"
        f" slots on 3 rank-8 adapters {lo * 1e3:.1f} ms; ratio {lo / b:.2f}"
    )


if __name__ == "__main__":
    main()
