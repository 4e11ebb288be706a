"""Load time, peak memory and first token at scale: workbench beside transformers, one run.

    python scripts/load_side_by_side.py CHECKPOINT [--rounds 2] [--precisions float32,bfloat16,w8a8]
        [--first-token] [--baseline SRC] [--json OUT.json]

CHECKPOINT: a Hugging Face checkpoint (``scripts/write_checkpoint.py --preset llama3-1b`` writes
the 1B shape). Every figure comes from a fresh process, so each peak is its own: our
``workbench.load`` (decode batch 8, 1024 positions) beside transformers' ``from_pretrained`` in the
same precision -- float32, bfloat16, and w8a8 beside torch's dynamic int8
(``quantize_dynamic`` of every ``nn.Linear`` in place, after a float32 load) --, rounds
interleaved A B A B. Load time excludes the imports on both sides; peak memory is the process's
``VmHWM`` (imports included), beside the bound of issue 25: 1.2 x the bytes of the weights + 1 GB.

``--first-token``: ``python -m workbench generate --checkpoint CHECKPOINT --prompt-ids (64 ids)
--max-new-tokens 1 --json`` from process start to the token, with a fresh compile cache (cold)
and again with it (warm), and the load inside it.

``--baseline SRC``: also load with the workbench of another source tree (``git archive COMMIT |
tar -x -C SRC``) in every round, beside ours and transformers': before and after in one run.

Run it alone: it needs about 12 GB at the 1B shape (``flock /work/bigmem.lock`` on shared machines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"}, "w8a8": {"quantize": "w8a8"}}
PROMPT = ",".join(str(1 + 7 * i % 250) for i in range(64))  # ids every vocabulary has


def peak_gb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1e6


# ---- the children: one measurement each ----------------------------------------------------------
def child_ours(checkpoint: str, precision: str) -> dict:
    import jax

    import workbench

    start = time.perf_counter()
    _, params = workbench.load(checkpoint, progress=False, **OURS[precision])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"load_s": seconds, "peak_gb": peak_gb(), "weights_gb": weights / 1e9}


def child_theirs(checkpoint: str, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    if precision == "w8a8":
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8, inplace=True)
    seconds = time.perf_counter() - start
    return {"load_s": seconds, "peak_gb": peak_gb()}


def child_generate(checkpoint: str) -> dict:
    """Process start -> first token of the CLI, with the load inside it timed."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks  # since boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    begun = time.perf_counter() - (uptime - started)  # process start on the perf_counter clock
    import workbench
    from workbench import cli
    from workbench.engine import scheduler

    marks: dict[str, float] = {"imported": time.perf_counter() - begun}
    real_load, real_run = workbench.load, scheduler.Scheduler.run

    def load(*args, **kwargs):
        start = time.perf_counter()
        result = real_load(*args, **kwargs)
        marks["load_s"] = time.perf_counter() - start
        return result

    def run(self, *args, **kwargs):
        result = real_run(self, *args, **kwargs)
        marks["first_token_s"] = time.perf_counter() - begun
        return result

    workbench.load, scheduler.Scheduler.run = load, run
    argv = ["generate", "--checkpoint", checkpoint, "--prompt-ids", PROMPT, "--max-new-tokens", "1", "--json"]
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            code = cli.main(argv)
        finally:
            sys.stdout = stdout
    if code:
        raise SystemExit(code)
    return marks | {"peak_gb": peak_gb()}


# ---- the parent ----------------------------------------------------------------------------------
def measure(checkpoint: str, *args: str, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, checkpoint, "--child", *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", default="float32,bfloat16,w8a8")
    parser.add_argument("--first-token", action="store_true")
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree, measured beside ours")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = {"ours": child_ours, "theirs": child_theirs, "generate": child_generate}[kind](args.checkpoint, *rest)
        print(json.dumps(result))
        return 0

    rows, loads = [], [machine()["load"]]
    for round_ in range(args.rounds):
        for precision in args.precisions.split(","):
            ours, theirs = measure(args.checkpoint, "ours", precision), measure(args.checkpoint, "theirs", precision)
            rows.append({"round": round_, "precision": precision, "ours": ours, "theirs": theirs})
            if args.baseline:
                env = {"PYTHONPATH": os.fspath(args.baseline.absolute())}
                rows[-1]["baseline"] = measure(args.checkpoint, "ours", precision, env=env)
            print(json.dumps(rows[-1]), file=sys.stderr)
    generate = []
    if args.first_token:
        with tempfile.TemporaryDirectory() as cache:  # a fresh compile cache and autotune record
            env = {"WORKBENCH_COMPILE_CACHE": f"{cache}/jax", "XDG_CACHE_HOME": cache}
            for state in ("cold", "warm", "warm"):
                generate.append({"cache": state, **measure(args.checkpoint, "generate", env=env)})
                print(json.dumps(generate[-1]), file=sys.stderr)
    loads.append(machine()["load"])
    report = {"machine": machine() | {"load": loads}, "loads": rows, "first_token": generate}
    if args.baseline:
        report["baseline"] = os.fspath(args.baseline)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def render(report: dict) -> str:
    info, baseline = report["machine"], "baseline" in report
    lines = [
        f"{info['cpu']}, {info['cores']} cores, load average {info['load'][0]:.1f} -> {info['load'][1]:.1f}",
        "",
        "| precision | load ours (s) | load transformers (s) | peak ours (GB) | peak transformers (GB) "
        "| weights (GB) | bound 1.2 x weights + 1 (GB) |"
        + (" load baseline (s) | peak baseline (GB) |" if baseline else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if baseline else ""),
    ]
    for precision in dict.fromkeys(row["precision"] for row in report["loads"]):
        rows = [row for row in report["loads"] if row["precision"] == precision]

        def cells(side: str, key: str) -> str:
            return " / ".join(f"{row[side][key]:.1f}" for row in rows)

        weights = statistics.median(row["ours"]["weights_gb"] for row in rows)
        lines.append(
            f"| {precision} | {cells('ours', 'load_s')} | {cells('theirs', 'load_s')} | {cells('ours', 'peak_gb')} "
            f"| {cells('theirs', 'peak_gb')} | {weights:.2f} | {1.2 * weights + 1:.2f} |"
            + (f" {cells('baseline', 'load_s')} | {cells('baseline', 'peak_gb')} |" if baseline else "")
        )
    if report["first_token"]:
        lines += ["", "| compile cache | process start -> first token (s) | load inside it (s) | peak (GB) |"]
        lines.append("|---|---|---|---|")
        for entry in report["first_token"]:
            lines.append(
                f"| {entry['cache']} | {entry['first_token_s']:.1f} | {entry['load_s']:.1f} | {entry['peak_gb']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
