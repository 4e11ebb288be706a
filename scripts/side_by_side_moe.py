"""Side by side on a mixture of experts: our decode step against transformers' on one checkpoint.

    .venv/bin/python scripts/side_by_side_moe.py [--preset mixtral-1b] [--dtype float32|bfloat16]
        [--checkpoint DIR] [--rounds 3] [--json OUT.json]

One run, one machine: decode step at batch 8 after 64-token prompts, ours
(:func:`workbench.bench.measure`) against transformers' greedy ``generate`` (``MixtralForCausalLM``,
eager attention, torch threads 2; per-step time from a stopping criterion's timestamps), A B A B
rounds, the ratio the median of the rounds' ratios. The checkpoint is a random Mixtral written by
transformers (float32) into ``--checkpoint`` (default: a temporary directory) unless it already
holds one: ``--preset small`` (hidden 512, 4 layers, 8 experts top-2, expert width 1408, vocab
32000; 105M) or ``--preset mixtral-1b`` (``ModelConfig.mixtral_1b()``: 1.0B). Both sides run
``--dtype``. Nothing downloads.

Then the bytes (:func:`workbench.bench.expert_bytes`): what our step reads against what the
router's choice needs -- the non-expert weights, the live KV cache and, per layer, the experts
chosen by at least one slot's token at that step (``probes.Capture(router=True)`` on real steps,
each slot its own prompt); transformers' loop runs exactly those experts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from side_by_side_shared import hf_step_ms, machine, parity
from transformers import MixtralConfig, MixtralForCausalLM

import workbench
from workbench import bench
from workbench.checkpoints.hf_write import hf_config_dict

SMALL = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
)  # fmt: skip


def write_checkpoint(path: str, preset: str) -> None:
    small = preset == "small"
    config = MixtralConfig(**SMALL) if small else MixtralConfig.from_dict(hf_config_dict(workbench.preset(preset)))
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("small", "mixtral-1b"), default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--checkpoint", default=None, help="an HF Mixtral directory (written when empty)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per call")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    path = args.checkpoint or os.path.join(tempfile.mkdtemp(), "mixtral")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_checkpoint(path, args.preset)
    dtype = getattr(torch, args.dtype)
    model = MixtralForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()
    engine, params = workbench.load(
        path, mesh={"data": 1}, decode_batch_size=8, max_prefill_length=64, max_target_length=128, dtype=args.dtype
    )
    config = engine.config
    print(
        f"{config.num_params() / 1e9:.2f}B params, {args.dtype}, kernels {engine.tuning.attention_kernels}", flush=True
    )
    rel = parity(engine, params, model)
    print(f"logits max |ours - theirs| / max |theirs| = {rel:.1e}", flush=True)

    def ours():
        return bench.measure(engine, params, prompt_length=64, steps=args.steps, repeats=1)

    def theirs():
        return hf_step_ms(model, 8, 64, args.steps)

    ours(), theirs()  # warm-up
    rounds = []
    for r in range(args.rounds):
        conditions = machine()
        a = ours()
        b = theirs()
        rounds.append({"ours_ms": a.generate_step_ms, "theirs_ms": b, "library": a.decode_library} | conditions)
        print(
            f"round {r}: ours {a.generate_step_ms:.1f} ms ({a.decode_library}), transformers {b:.1f} ms, "
            f"ratio {b / a.generate_step_ms:.2f} (read {conditions['read_gb_per_s']:.1f} GB/s, "
            f"load {conditions['load']:.1f})",
            flush=True,
        )
    ratio = statistics.median(r["theirs_ms"] / r["ours_ms"] for r in rounds)
    print(f"median ratio (transformers' step / ours): {ratio:.2f}")

    moe = bench.expert_bytes(engine, params, prompt_length=64, steps=4)
    experts = config.num_experts * sum(config.sparse(i) for i in range(config.num_layers))
    for step, (chosen, counts) in enumerate(zip(moe["chosen"], moe["experts_chosen"])):
        print(
            f"step {step}: reads {moe['read'] / 1e9:.3f} GB, the chosen experts need {chosen / 1e9:.3f} GB "
            f"({chosen / moe['read']:.0%}); experts chosen {sum(counts)} of {experts}, per layer {counts}"
        )
    if args.json:
        figures = {
            "preset": args.preset, "dtype": args.dtype, "params": config.num_params(), "decode_batch": 8,
            "prompt": 64, "steps": args.steps, "parity": rel, "rounds": rounds, "ratio": ratio,
            "bytes": moe | {"experts": experts},
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
