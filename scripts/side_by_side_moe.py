"""Side by side on a mixture of experts. Usage: .venv/bin/python scripts/side_by_side_moe.py [DIR]

One run, one machine: decode step at batch 8, ours (workbench.bench.measure) vs transformers'
greedy generate (per-step time from a stopping criterion's timestamps), on one random Mixtral
checkpoint (hidden 512, 4 layers, 8 experts top-2, expert width 1408, vocab 32000), float32.
A B A B rounds. The checkpoint is written by transformers into DIR (default: a temporary
directory) unless DIR already holds one."""

import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM, StoppingCriteria, StoppingCriteriaList

import workbench
from workbench import bench

torch.manual_seed(0)
torch.set_num_threads(2)
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "mixtral")
if not os.path.exists(os.path.join(path, "config.json")):
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
    )
    MixtralForCausalLM(cfg).save_pretrained(path)
model = MixtralForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
engine, params = workbench.load(
    path, mesh={"data": 1}, decode_batch_size=8, max_prefill_length=64, max_target_length=128
)
print("params", engine.config.num_params() / 1e6, "M; kernels", engine.tuning.attention_kernels)


class Stamps(StoppingCriteria):
    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores, **kw):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def theirs():
    stamps = Stamps()
    ids = torch.randint(3, 32000, (8, 64))
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=33,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([stamps]),
            pad_token_id=0,
        )
    return statistics.median(np.diff(stamps.t)) * 1e3


def ours():
    return bench.measure(engine, params, prompt_length=64, steps=32, repeats=3).generate_step_ms


ours()
theirs()
rows = []
for r in range(3):
    a, b = ours(), theirs()
    rows.append((a, b))
    print(f"round {r}: ours {a:.1f} ms, transformers {b:.1f} ms, ratio (theirs/ours) {b / a:.2f}")
print("median ratio", statistics.median(b / a for a, b in rows))
