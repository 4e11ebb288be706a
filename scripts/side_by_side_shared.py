"""What both programs of ``side_by_side.py`` share: the checkpoint, transformers' clocks, the
logits check, and the report's pieces (tables built from rows, plots, medians of ratios).

Bandwidth has one measure here: :func:`workbench.bench.read_gb_per_s`, the machine's all-core
read bandwidth, the same figure ``python -m workbench bench`` divides by for its roofline.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = 64  # tokens of every prompt of the decode measurements
TARGET_BATCH = 8  # the decode batch of the targets and of the precision table


def make_checkpoint(path: Path) -> None:
    """A random Llama of the preset's shape, saved the way Hugging Face models are shipped."""
    import torch
    import transformers

    from workbench import ModelConfig

    c = ModelConfig.llama_56m()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.embed_dim,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=c.bos_id,
        eos_token_id=c.eos_ids[0],
        pad_token_id=c.pad_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)


class _StepClock:
    """A stopping criterion that never stops and notes when each decode step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_step_ms(model, batch: int, context: int, steps: int) -> float:
    """Median ms per decode step of greedy ``generate`` for ``batch`` prompts of ``context`` tokens:
    the gap between consecutive calls of a stopping criterion, i.e. one pass of its decode loop
    (forward, greedy pick, bookkeeping)."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.from_numpy(np.random.default_rng(1).integers(3, model.config.vocab_size, (batch, context)))
    clock = _StepClock()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    return statistics.median(np.diff(clock.times)) * 1e3


def hf_prefill_ms(model, length: int, repeats: int = 5) -> float:
    """Median ms of the forward pass ``generate`` makes over a ``length``-token prompt: it fills a
    fresh cache and projects only the last position onto the vocabulary (``logits_to_keep=1``)."""
    import torch

    ids = torch.from_numpy(np.random.default_rng(2).integers(3, model.config.vocab_size, (1, length)))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def parity(engine, params, model) -> float:
    """Max |ours - theirs| / max |theirs| of the logits of one 16-token sequence: same weights?"""
    import torch

    tokens = np.random.default_rng(3).integers(3, engine.config.vocab_size, (1, 16))
    ours = np.asarray(engine.forward(params, tokens))
    with torch.inference_mode():
        theirs = model(torch.from_numpy(tokens)).logits.float().numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def machine() -> dict[str, float]:
    """The round's conditions: the all-core read bandwidth and the load average now."""
    from workbench.bench import read_gb_per_s

    return {"read_gb_per_s": read_gb_per_s(), "load": os.getloadavg()[0]}


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ---- the report ----------------------------------------------------------------------------------
Column = tuple[str, Callable[[Any], Any], str]  # header, the cell's value from a row, its template


def table(columns: Sequence[Column], rows: Iterable[Any]) -> list[str]:
    """A markdown table, one line per row: each cell is ``template.format(value(row))``."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(template.format(value(row)) for _, value, template in columns) + " |")
    return lines


def plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> None:
    """A log-log line plot of each named series against ``xs``, saved to ``path``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' own labels would overlap
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
