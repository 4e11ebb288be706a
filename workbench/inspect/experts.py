"""``inspect.experts``: a mixture of experts' routing from a capture (``probes.Capture(router=True)``):
the load on each expert of each sparse layer, and which experts each token went to."""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.inspect import plots
from workbench.inspect.report import Column, Report, Table
from workbench.probes import captured as find_captured


class ExpertsReport(Report):
    """``load`` [layers, E]: the live tokens routed to each expert (each token counts once per
    expert it runs); the first table one row per layer, the second per token: its experts and
    weights at each layer."""

    def __init__(self, captured: Any, num_experts: int | None = None):
        seen = find_captured(captured)
        self.layers = sorted(seen.sites.get("router_ids", {}))
        if not self.layers:
            raise ValueError("no routing was captured: pass probes=workbench.probes.Capture(router=True)")
        live = np.asarray(seen.live, bool)  # [rows, T]
        routed = {layer: seen.router(layer) for layer in self.layers}
        top = max(int(ids.max(initial=0)) for ids, _ in routed.values()) + 1
        self.num_experts = num_experts or top
        self.load = np.stack(
            [np.bincount(ids[live].reshape(-1), minlength=self.num_experts) for ids, _ in routed.values()]
        )
        self.title = (
            f"expert load: {len(self.layers)} sparse layers x {self.num_experts} experts, {int(live.sum())} tokens"
        )
        experts = [Column(f"e{e}", f"e{e}", str, "right") for e in range(self.num_experts)]
        layer_rows = tuple(
            {"layer": layer, **{f"e{e}": int(n) for e, n in enumerate(row)}}
            for layer, row in zip(self.layers, self.load)
        )
        token_rows = []
        for row, t in zip(*np.nonzero(live)):
            entry = {"row": int(row), "position": int(seen.positions[row, t]), "token": int(seen.tokens[row, t])}
            for layer, (ids, weights) in routed.items():
                entry[f"L{layer}"] = " ".join(f"{i}:{w:.2f}" for i, w in zip(ids[row, t], weights[row, t]))
            token_rows.append(entry)
        by_layer = [Column(f"L{layer}", f"layer {layer}") for layer in self.layers]
        self.tables = (
            Table("tokens per expert", (Column("layer", "layer", str, "right"), *experts), layer_rows),
            Table(
                "each token's experts (id:weight)",
                (
                    Column("row", "row", str, "right"),
                    Column("position", "pos", str, "right"),
                    Column("token", "token", str, "right"),
                    *by_layer,
                ),
                tuple(token_rows),
            ),
        )

    def plot(self):
        """A heatmap of the load: layers down, experts across."""
        return plots.heatmaps(
            [("tokens per expert", self.load.astype(float))],
            xlabel="expert", ylabel="layer", title=self.title,
            xticklabels=[str(e) for e in range(self.num_experts)], yticklabels=[str(i) for i in self.layers],
            colorbar="tokens",
        )  # fmt: skip


def experts(captured: Any, num_experts: int | None = None) -> ExpertsReport:
    """The routing a step recorded (a ResultTokens or Captured with ``Capture(router=True)``):
    load per expert per layer and each token's experts. ``num_experts``: the model's (default:
    one past the largest id seen)."""
    return ExpertsReport(captured, num_experts)
