"""Does the decode-library probe pick the faster whole step? Probe times and whole-step times for
both libraries, at one model shape, in one run.

    flock /work/bigmem.lock .venv/bin/python scripts/decode_library_check.py [--preset llama3-1b]
        [--batch 8] [--steps 6] [--rounds 3] [--json OUT]

The probe (``workbench.engine.autotune.measure_parts``: the layer products and the vocabulary
projection, each scaled to the whole model) runs first and is timed as a user would pay for it.
Then one float32 engine of the preset, random weights, gets generate compiled under each library
(``WORKBENCH_AUTOTUNE`` forced per engine; the params are shared), every slot holding the same
64-token prompt, and the two engines' decode steps alternate (one step of each per turn, ``--steps``
turns a round, ``--rounds`` rounds), each step blocked until ready; the medians are compared. The
llama3-1b preset in float32 holds about 5 GB of weights: run it under the shared memory lock.
Prints a table to stderr; ``--json`` writes the figures. Exit code 0 when the pick agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-1b", help="a ModelConfig preset (default llama3-1b)")
    parser.add_argument("--batch", type=int, default=8, help="decode batch (default 8)")
    parser.add_argument("--steps", type=int, default=6, help="decode steps of each library per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the figures to OUT")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    import workbench
    from workbench.engine import autotune

    def log(*parts) -> None:
        print(*parts, file=sys.stderr, flush=True)

    config = workbench.model.preset(args.preset, dtype="float32", param_dtype="float32")
    start = time.perf_counter()
    parts = autotune.measure_parts(config, args.batch)
    probe_s = time.perf_counter() - start
    estimates = {name: sum(ms.values()) for name, ms in parts.items()}
    pick = min(estimates, key=estimates.get)
    log(f"probe: {probe_s:.1f} s; {parts} -> {pick}")

    shape = dict(decode_batch_size=args.batch, max_prefill_length=PROMPT, max_target_length=PROMPT + 8 + args.steps)
    start = time.perf_counter()
    base, params = workbench.load(config=config, **shape)
    load_s = time.perf_counter() - start
    engines, states = {}, {}
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, PROMPT)
    prefix, _ = base.prefill(params=params, padded_tokens=base.pad(prompt)[0], true_length=PROMPT)
    for name in autotune.LIBRARIES:
        os.environ[autotune.ENV] = name  # read by tune(): this engine's generate takes this library
        engine = workbench.Engine(base.config, base.mesh, **shape)
        assert engine.tune() == name
        state = engine.init_decode_state(0)
        for slot in range(args.batch):
            state = engine.insert(prefix, state, slot)
        start = time.perf_counter()
        states[name] = jax.block_until_ready(engine.generate(params, state)[0])  # compiles
        log(f"{name}: generate compiled and run once in {time.perf_counter() - start:.1f} s")
        engines[name] = engine
    times: dict[str, list[float]] = {name: [] for name in engines}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for _ in range(args.steps):
            for name, engine in engines.items():
                start = time.perf_counter()
                states[name], result = jax.block_until_ready(engine.generate(params, states[name]))
                times[name].append(time.perf_counter() - start)
    steps = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    faster = min(steps, key=steps.get)
    cpu = autotune.cpu_name()
    rows = [(name, estimates[name], parts[name]["layers"], parts[name]["vocab"], steps[name]) for name in engines]
    log(f"\n{args.preset} float32, decode batch {args.batch}, {cpu}, load average {min(loads):.1f}-{max(loads):.1f}")
    log("| library | probe estimate ms | layers ms | vocabulary ms | whole step ms |\n|---|---|---|---|---|")
    for row in rows:
        log("| {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |".format(*row))
    agrees = pick == faster
    log(f"probe picks {pick} in {probe_s:.1f} s; the faster step is {faster}: {'agrees' if agrees else 'DISAGREES'}")
    if args.json:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
        figures = dict(
            preset=args.preset,
            batch=args.batch,
            cpu=cpu,
            lscpu_model_name=model,
            load_average=loads,
            probe_s=probe_s,
            probe_parts_ms=parts,
            probe_estimate_ms=estimates,
            pick=pick,
            step_ms=steps,
            step_times_ms={name: [t * 1e3 for t in ts] for name, ts in times.items()},
            faster_step=faster,
            agrees=agrees,
            load_s=load_s,
            jax=jax.__version__,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
