"""What capturing costs: a generate step with ``probes.Capture()`` (every layer, every site, the
captured arrays brought to the host) against the same step without, side by side in one process.

    python scripts/probes_overhead.py [--preset llama-56m] [--batch 8] [--steps 20]

Steps alternate (plain, captured, plain, ...) so load on the machine hits both alike; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

import workbench
from workbench import probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-56m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = workbench.preset(args.preset)
    engine = workbench.Engine(config, workbench.make_mesh({"data": 1}), decode_batch_size=args.batch)
    params = engine.load_params(seed=0)
    state = engine.init_decode_state()
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt_length)
    padded, n = engine.pad(prompt)
    prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n)
    state = engine.bulk_insert(prefix, state, list(range(args.batch)))
    capture = probes.Capture()
    times: dict[str, list[float]] = {"plain": [], "captured": []}
    for step in range(2 * (args.steps + 2)):
        kind = "plain" if step % 2 == 0 else "captured"
        start = time.perf_counter()
        state, result = engine.generate(params, state, probes=capture if kind == "captured" else None)
        jax.block_until_ready((state, result))  # the capture is on the host already
        if step >= 4:  # two of each to warm up (compiles)
            times[kind].append(time.perf_counter() - start)
    plain, captured = (1e3 * statistics.median(times[k]) for k in ("plain", "captured"))
    print(f"{args.preset}, batch {args.batch}, {args.steps} steps each, load {os.getloadavg()[0]:.1f}")
    print(f"generate step: plain {plain:.1f} ms, with Capture() {captured:.1f} ms ({captured / plain:.2f}x)")


if __name__ == "__main__":
    main()
