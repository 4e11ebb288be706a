"""Rings in the KV-cache inspectors: a sliding layer's cache read as slot -> absolute position.

A ring layer's cache dict holds ``held`` [B, W] beside ``k`` and ``v`` (``model/ring.py``):
``held - 1`` is the absolute position each slot holds, -1 for an empty slot. Everything here
reads that array, never the engine's bookkeeping, so a ring describes itself; a layer without
``held`` is a full-length cache whose index is the position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.distributed import host_value
from workbench.inspect.report import Column, Report, Table, fmt_ranges


def positions(held: Any | None, slots: int, length: int) -> np.ndarray:
    """[B, S] the absolute position at each cache index of a layer: the index itself in a
    full-length cache (``held`` None), the ring's ``held - 1`` (-1: empty) in a ring."""
    if held is None:
        return np.broadcast_to(np.arange(length), (slots, length))
    return host_value(held).astype(np.int64) - 1


def holds(held_row: np.ndarray) -> str:
    """The positions one ring row holds, as ranges (``"10-15"``; ``"-"``: empty)."""
    return fmt_ranges(held_row[held_row > 0] - 1)


def write_head(next_position: int | None, window: int) -> int | None:
    """The ring slot the next token's K/V goes to."""
    return None if next_position is None else int(next_position) % window


class RingReport(Report):
    """One ring row: per slot, the absolute position it holds, whether it is live (a key the next
    query sees: within the window that ends at the next position; the head's slot is not, its
    key is the one the next write replaces) and where the write head is."""

    def __init__(self, layer: int, slot: int, held_row: np.ndarray, next_position: int | None):
        window = held_row.shape[0]
        head = write_head(next_position, window)
        rows = []
        for index, h in enumerate(held_row):
            position = int(h) - 1
            live = position >= 0 and (next_position is None or position > next_position - window)
            rows.append(
                {
                    "slot": index,
                    "position": None if position < 0 else position,
                    "live": live,
                    "head": index == head,
                }
            )
        self.rows = rows
        self.title = f"layer {layer}, slot {slot}: a ring of {window} slots holding positions {holds(held_row)}" + (
            "" if head is None else f"; the write head is at slot {head} (position {next_position} goes there)"
        )
        mark = lambda x: "<-" if x else ""  # noqa: E731
        columns = (
            Column("slot", "ring slot", str, "right"),
            Column("position", "position", lambda p: "-" if p is None else str(p), "right"),
            Column("live", "live", lambda x: "yes" if x else "-"),
            Column("head", "head", mark),
        )
        self.tables = (Table("", columns, tuple(rows)),)
        self.notes = ()

    def plot(self, norms: np.ndarray | None = None, *, title: str | None = None):
        """The ring drawn as a ring (``plots.ring``): each slot a wedge labelled with the position
        it holds, shaded by ``norms`` [W] (or by whether it is live), the write head marked."""
        from workbench.inspect import plots

        held = [r["position"] for r in self.rows]
        head = next((r["slot"] for r in self.rows if r["head"]), None)
        values = np.asarray([1.0 if r["live"] else 0.0 for r in self.rows]) if norms is None else norms
        return plots.ring(
            held, values, head=head, title=title or self.title, colorbar="|K|" if norms is not None else ""
        )
