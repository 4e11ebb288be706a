"""Compile time against depth, scanned layers against unrolled (issue 15's closing figures).

    python scripts/scan_compile.py [--layers 4 8 16 32] [--steps 16]

The 56M preset's shape (hidden 512, MLP 1408, vocab 32000) at each depth, seeded random weights,
decode batch 8, 1024 positions, a 64-token prompt; the persistent compile cache off, so every
program compiles. Per depth and layout: prefill and generate compile (first call less the
median call, as the bench command reports them), the median generate step, and the scanned
figures as ratios of the unrolled ones and of the shallowest depth's. Quote the load with them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["WORKBENCH_COMPILE_CACHE"] = "off"

import workbench  # noqa: E402
from workbench.bench import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        for scan in (False, True):
            start = time.perf_counter()
            engine, params = workbench.load(
                config=workbench.ModelConfig.llama_56m(num_layers=layers), mesh={"data": 1}, scan_layers=scan
            )
            load_s = time.perf_counter() - start
            result = measure(engine, params, prompt_length=64, steps=args.steps, repeats=3)
            row = dict(
                layers=layers,
                scan=scan,
                load_s=round(load_s, 2),
                prefill_compile_s=round(result.compile_s["prefill"], 2),
                generate_compile_s=round(result.compile_s["generate"], 2),
                step_ms=round(result.generate_step_ms, 2),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = {scan: next(r for r in rows if r["scan"] == scan) for scan in (False, True)}
    print(f"{'layers':>6} {'layout':>8} {'prefill+generate compile s':>27} {'x shallowest':>12} {'step ms':>8}")
    for row in rows:
        compile_s = row["prefill_compile_s"] + row["generate_compile_s"]
        base = first[row["scan"]]
        ratio = compile_s / (base["prefill_compile_s"] + base["generate_compile_s"])
        layout = "scanned" if row["scan"] else "unrolled"
        print(f"{row['layers']:>6} {layout:>8} {compile_s:>27.2f} {ratio:>12.2f} {row['step_ms']:>8.2f}")


if __name__ == "__main__":
    main()
