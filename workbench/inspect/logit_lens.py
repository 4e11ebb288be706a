"""``inspect.logit_lens``: what the residual stream after each layer would predict.

Each captured residual (``Capture(residual=True)``) goes through the model's own final norm and
unembedding (``probes.unembed``); the report lists the top tokens per layer at the chosen
positions, and the probability each layer already gives the model's final choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench import probes
from workbench.inspect import plots
from workbench.inspect.attention import gather, label, position_labels, steps_of
from workbench.inspect.report import Column, Report, Table


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


class LogitLensReport(Report):
    """``probabilities`` [layers, positions, V]: each layer's residual read as a prediction."""

    def __init__(self, steps, engine, params, tokens, slot: int, positions: Sequence[int] | None, top: int):
        residuals, fed = gather(steps, "residual", slot)
        self.layers, self.positions = sorted(residuals), sorted(fed)
        vectors = np.stack([residuals[layer][p] for layer in self.layers for p in self.positions])
        logits = probes.unembed(engine, params, vectors).reshape(len(self.layers), len(self.positions), -1)
        self.probabilities = _softmax(logits)
        tokenizer = getattr(engine, "tokenizer", None)
        self.name = lambda i: label(tokenizer.decode([int(i)]) or f"<{i}>") if tokenizer else str(int(i))  # noqa: E731
        size = self.positions[-1] + 1
        self.labels = position_labels(tokens, fed, size, self.name)
        self.final = self.probabilities[-1].argmax(-1)  # [positions]: the last captured layer's choice
        shown = [self.positions[-1]] if positions is None else [int(p) for p in positions]
        for p in shown:
            if p not in fed:
                raise ValueError(f"position {p} was not captured: captured positions are {self.positions}")
        rows = []
        for i, layer in enumerate(self.layers):
            for p in shown:
                j = self.positions.index(p)
                probs = self.probabilities[i, j]
                best = np.argsort(-probs, kind="stable")[:top]
                rows.append(
                    {
                        "layer": layer,
                        "position": p,
                        "token": self.labels[p],
                        "top": ", ".join(f"'{self.name(t)}' {probs[t]:.2f}" for t in best),
                        "final": float(probs[self.final[j]]),
                    }
                )
        self.title = f"Logit lens of slot {slot}: {len(self.layers)} layers, the residual after each block unembedded"
        columns = (
            Column("layer", "layer", align="right", repeat=False),
            Column("position", "position", align="right"),
            Column("token", "input"),
            Column("top", f"top {top} (probability)"),
            Column("final", "p(final top)", lambda x: f"{x:.2f}", "right"),
        )
        self.tables = (Table("", columns, tuple(rows)),)
        self.notes = ("p(final top): the probability this layer gives the token the last layer ranks first",)

    def plot(self):
        """Layers x positions: the probability of the final layer's top token."""
        final = np.take_along_axis(self.probabilities, self.final[None, :, None], axis=-1)[..., 0]
        return plots.heatmaps(
            [("p(final top token)", final)], xlabel="input token", ylabel="layer", title=self.title,
            xticklabels=[self.labels[p] for p in self.positions], yticklabels=[str(layer) for layer in self.layers],
            colorbar="probability",
        )  # fmt: skip


def logit_lens(
    captured: Any,
    engine: Any,
    params: Any,
    *,
    tokens: Sequence[Any] | None = None,
    slot: int = 0,
    positions: Sequence[int] | None = None,
    top: int = 3,
) -> LogitLensReport:
    """The logit lens of ``slot`` over the captured step(s); rows for ``positions`` (default: the
    last captured position). ``tokens``: a label per position (default: the fed ids, decoded)."""
    return LogitLensReport(steps_of(captured), engine, params, tokens, int(slot), positions, int(top))
