"""``inspect.attention``: what each head attended to, from the engine's own captured steps.

Takes one step's capture (``result.captured`` of ``prefill`` / ``generate`` with
``probes=workbench.probes.Capture()``) or a list of them -- a prefill, then the generate steps
of one slot -- and lays one slot's attention out as a square of query x key positions per
layer and head. Head summaries, averaged over the queries captured:

- ``entropy``: of the query's weights, in nats (0: one key; ln(n): spread evenly over n);
- ``previous``: weight on the key just before the query;
- ``first``: weight on position 0 (an attention sink or BOS);
- ``line start``: weight on the first token of the query's line (after the last newline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench import probes
from workbench.inspect import plots
from workbench.inspect.report import Column, Report, Table

ROLES = ("previous", "first", "line_start")
ROLE_THRESHOLD = 0.4  # a head is named for the role that gets at least this much weight


def label(token: Any) -> str:
    """A token's text as one printable cell (``"\\n"`` for a newline, ``" "`` kept)."""
    return repr(token)[1:-1] if isinstance(token, str) else str(token)


def steps_of(captured: Any) -> list[probes.Captured]:
    """One capture, a ResultTokens, or a list of them, as a list of Captured."""
    items = list(captured) if isinstance(captured, (list, tuple)) else [captured]
    if not items:
        raise ValueError("no captured steps given")
    return [probes.captured(item) for item in items]


def gather(steps: Sequence[probes.Captured], site: str, slot: int) -> tuple[dict[int, Any], dict[int, int]]:
    """Per layer, the ``site`` rows of ``slot`` by absolute query position (a one-row capture,
    a prefill, counts as every slot's), and the token id fed at each position."""
    per_position: dict[int, dict[int, Any]] = {}
    fed: dict[int, int] = {}
    for step in steps:
        row = 0 if step.live.shape[0] == 1 else slot
        if row >= step.live.shape[0]:
            raise ValueError(f"slot {slot} is out of range: the capture has {step.live.shape[0]} slots")
        for t in np.flatnonzero(step.live[row]):
            position = int(step.positions[row, t])
            fed[position] = int(step.tokens[row, t])
            for layer in step.layers:
                per_position.setdefault(layer, {})[position] = step.site(site, layer)[row][..., t, :]
    if not fed:
        raise ValueError(f"slot {slot} has no live query in the captured steps")
    return per_position, fed


def position_labels(tokens: Sequence[Any] | None, fed: dict[int, int], size: int, name=str) -> list[str]:
    """A label per position 0..size-1: from ``tokens`` where given, else ``name`` of the fed id."""
    given = lambda p: tokens is not None and p < len(tokens)  # noqa: E731
    return [label(tokens[p]) if given(p) else name(fed[p]) if p in fed else "?" for p in range(size)]


class AttentionReport(Report):
    """Attention of one slot: ``pattern(layer, head)`` is [queries, keys] over positions."""

    def __init__(self, steps: Sequence[probes.Captured], tokens: Sequence[Any] | None, slot: int):
        rows_by_layer, fed = gather(steps, "attention", slot)
        self.positions = sorted(fed)
        size = self.positions[-1] + 1
        self.labels = position_labels(tokens, fed, size)
        self.layers = sorted(rows_by_layer)
        first_layer = rows_by_layer[self.layers[0]]
        heads = next(iter(first_layer.values())).shape[0]
        # [L, N, P, P]: a query's weights over keys 0..size-1 (zero where it did not look)
        self.weights = np.zeros((len(self.layers), heads, size, size), np.float32)
        for i, layer in enumerate(self.layers):
            for position, w in rows_by_layer[layer].items():  # w [N, S]
                keys = min(size, w.shape[-1])
                self.weights[i, :, position, :keys] = w[:, :keys]
        texts = [str(t) for t in tokens] if tokens is not None and all(isinstance(t, str) for t in tokens) else None
        self.line_starts = _line_starts(texts, size)
        self.slot = slot
        rows = [self._summary(i, head) for i in range(len(self.layers)) for head in range(heads)]
        self.title = (
            f"Attention of slot {slot}: {len(self.positions)} queries (positions "
            f"{self.positions[0]}..{self.positions[-1]}), {len(self.layers)} layers x {heads} heads"
        )
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        columns = (
            Column("layer", "layer", align="right", repeat=False),
            Column("head", "head", align="right"),
            Column("entropy", "entropy", fmt, "right"),
            Column("previous", "previous", fmt, "right"),
            Column("first", "first", fmt, "right"),
            Column("line_start", "line start", fmt, "right"),
            Column("role", "role"),
        )
        self.tables = (Table("head summaries (mean over queries; weights sum to 1)", columns, tuple(rows)),)
        self.notes = (f"role: the summary with at least {ROLE_THRESHOLD} of the weight, if any",)

    def _summary(self, i: int, head: int) -> dict[str, Any]:
        queries = np.asarray(self.positions)
        w = self.weights[i, head][queries]  # [Q, P]
        entropy = -np.sum(np.where(w > 0, w * np.log(np.maximum(w, 1e-30)), 0.0), axis=-1)
        later = queries >= 1
        previous = float(w[later, queries[later] - 1].mean()) if later.any() else None
        first = float(w[:, 0].mean())
        line_start = None
        if self.line_starts is not None:
            starts = self.line_starts[queries]
            off = starts > 0  # a query on the first line: its line start is position 0, the "first" key
            line_start = float(w[np.flatnonzero(off), starts[off]].mean()) if off.any() else None
        scores = {"previous": previous, "first": first, "line_start": line_start}
        best = max((s for s in scores.items() if s[1] is not None), key=lambda s: s[1])
        role = best[0].replace("_", " ") if best[1] >= ROLE_THRESHOLD else "-"
        return {"layer": self.layers[i], "head": head, "entropy": float(entropy.mean()), **scores, "role": role}

    def pattern(self, layer: int, head: int) -> np.ndarray:
        """[queries, keys]: the captured queries' rows of the square (positions as in ``positions``)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured: captured layers are {self.layers}")
        if not 0 <= head < self.weights.shape[1]:
            raise ValueError(f"head {head} is out of range: the model has heads 0..{self.weights.shape[1] - 1}")
        return self.weights[self.layers.index(layer), head][np.asarray(self.positions)]

    def top_keys(self, layer: int, position: int, k: int = 3) -> list[str]:
        """Per head, the ``k`` keys the query at ``position`` weighs most: ``"5 'x' 0.61"``."""
        row = self.positions.index(position)
        lines = []
        for head in range(self.weights.shape[1]):
            w = self.pattern(layer, head)[row]
            best = np.argsort(-w, kind="stable")[:k]
            lines.append(f"head {head}: " + ", ".join(f"{p} '{self.labels[p]}' {w[p]:.2f}" for p in best))
        return lines

    def plot(self, layer: int | None = None, head: int | None = None, *, first: int = 0, last: int | None = None):
        """One head's pattern (queries x keys, labelled by token); without a head, every head of
        ``layer``; with neither, the head summaries as layers x heads grids. ``first`` / ``last``:
        the queries shown (positions), keys up to ``last`` (a generation step by step)."""
        if layer is None:
            panels = [(name.replace("_", " "), self._grid(name)) for name in ROLES if self._grid(name) is not None]
            heads = [str(h) for h in range(self.weights.shape[1])]
            return plots.heatmaps(
                panels, xlabel="head", ylabel="layer", title=self.title, xticklabels=heads,
                yticklabels=[str(layer) for layer in self.layers], colorbar="weight",
            )  # fmt: skip
        heads = range(self.weights.shape[1]) if head is None else [head]
        end = len(self.labels) if last is None else last + 1
        rows = [i for i, p in enumerate(self.positions) if first <= p < end]
        shown = [self.positions[i] for i in rows]
        panels = [(f"layer {layer} head {h}", self.pattern(layer, h)[rows, :end]) for h in heads]
        return plots.heatmaps(
            panels, xlabel="key", ylabel="query", title=self.title, xticklabels=self.labels[:end],
            yticklabels=[self.labels[p] for p in shown], colorbar="weight",
        )  # fmt: skip

    def _grid(self, name: str) -> np.ndarray | None:
        values = [row[name] for row in self.tables[0].rows]
        if any(v is None for v in values):
            return None
        return np.asarray(values, float).reshape(len(self.layers), -1)


def _line_starts(texts: Sequence[str] | None, size: int) -> np.ndarray | None:
    """Per position, the first position of its line (after the last token ending in a newline)."""
    if texts is None:
        return None
    starts, start = np.zeros(size, int), 0
    for p in range(size):
        starts[p] = start
        if p < len(texts) and texts[p].endswith("\n"):
            start = p + 1
    return starts


def attention(captured: Any, *, tokens: Sequence[Any] | None = None, slot: int = 0) -> AttentionReport:
    """The attention report of ``slot`` over the captured step(s) ``captured``.

    ``tokens``: a label per position (token strings give the ``line start`` summary; ids are
    printed as they are); default: the ids the steps were fed.
    """
    return AttentionReport(steps_of(captured), tokens, int(slot))
