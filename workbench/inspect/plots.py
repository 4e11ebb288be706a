"""Matplotlib drawings over plain numpy data, shared by the inspectors.

Figures are made with ``matplotlib.figure.Figure`` rather than pyplot: nothing is registered
with a pyplot figure manager, so a notebook shows a returned figure once (no duplicate from the
inline backend) and scripts and tests need no display (the Agg canvas draws them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BYTE_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str = "bytes"):
    """A bar per label; byte values are scaled to the largest unit that keeps them >= 1."""
    values = np.asarray(values, dtype=float)
    scale, unit = 1, "B"
    if ylabel == "bytes":
        scale, unit = next(((s, u) for s, u in _BYTE_UNITS if values.max(initial=0) >= s), (1, "B"))
        ylabel = f"bytes ({unit})"
    fig = _figure(max(4.0, 0.6 * len(labels) + 1.5), 3.2)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(labels)), values / scale, color="tab:blue")
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


def grid(groups: np.ndarray, labels: np.ndarray, *, row_labels: Sequence[str], col_labels: Sequence[str], title: str):
    """Cells colored by ``groups`` [R, C] (equal ids = the same piece; -1 = nothing held),
    each annotated with its ``labels`` [R, C] text."""
    rows, cols = groups.shape
    fig = _figure(max(3.0, 1.6 * cols + 1.0), max(1.6, 1.1 * rows + 0.8))
    ax = fig.add_subplot()
    colors = np.where(groups[..., None] >= 0, _palette(groups), 0.92)
    ax.imshow(colors, aspect="auto")
    for (r, c), text in np.ndenumerate(labels):
        ax.text(c, r, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(np.arange(cols), col_labels, fontsize=8)
    ax.set_yticks(np.arange(rows), row_labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def _label_positions(ax, labels: Sequence[str]) -> None:
    """A tick per position, labelled with its token (rotated only when labels are long)."""
    long = any(len(label) > 2 for label in labels)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=7, rotation=90 if long else 0)


def _palette(groups: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return np.asarray([[cmap(int(g) % 20)[:3] for g in row] for row in groups])


def heatmaps(
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    colorbar: str = "",
):
    """One heatmap per (title, values [Y, X]) panel, stacked vertically, sharing the x axis.

    ``xticklabels`` label every column (token labels on a position axis).
    """
    width = max(5.0, min(16.0, 0.18 * panels[0][1].shape[1] + 2.5))
    fig = _figure(width, 1.0 + sum(max(1.2, 0.25 * p.shape[0] + 0.6) for _, p in panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, panels):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel)
        if yticklabels is not None:
            ax.set_yticks(np.arange(len(yticklabels)), yticklabels, fontsize=7)
        fig.colorbar(image, ax=ax, label=colorbar, pad=0.01)
    if xticklabels is not None:
        _label_positions(axes[-1], xticklabels)
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    return fig


def occupancy(
    written: np.ndarray,
    next_positions: Sequence[int | None],
    *,
    layers: int,
    title: str,
    xticklabels: Sequence[str] | None = None,
):
    """Slots x positions, shaded by how many layers hold a key/value there; a marker at each
    slot's next position (where its next token's K/V goes)."""
    slots, positions = written.shape
    fig = _figure(max(5.0, min(16.0, 0.18 * positions + 2.5)), max(1.8, 0.3 * slots + 1.2))
    ax = fig.add_subplot()
    image = ax.imshow(written, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=max(layers, 1))
    marks = [(p, s) for s, p in enumerate(next_positions) if p is not None and p < positions]
    if marks:
        ax.scatter(
            [p for p, _ in marks], [s for _, s in marks], marker="|", s=120, color="tab:red", label="next position"
        )
        ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(image, ax=ax, label="layers written", pad=0.01)
    ax.set_yticks(np.arange(slots), [str(s) for s in range(slots)], fontsize=7)
    if xticklabels is not None:
        _label_positions(ax, xticklabels)
    ax.set_xlabel("position")
    ax.set_ylabel("slot")
    ax.set_title(title, fontsize=10)
    return fig


def ring(
    positions: Sequence[int | None],
    values: np.ndarray,
    *,
    head: int | None,
    title: str,
    colorbar: str = "",
):
    """A ring cache drawn as a ring: one wedge per slot, clockwise from the top, labelled with the
    slot and the absolute position it holds ("-": empty), shaded by ``values`` [W]; an arrow at
    the write ``head`` (the slot the next token's K/V goes to)."""
    from matplotlib import colormaps
    from matplotlib.patches import FancyArrow, Wedge

    window = len(positions)
    fig = _figure(4.2, 4.2)
    ax = fig.add_subplot()
    values = np.asarray(values, dtype=float)
    top = max(float(values.max(initial=0)), 1e-12)
    cmap = colormaps["viridis"]
    step = 360 / window
    for slot, position in enumerate(positions):
        start = 90 - (slot + 1) * step  # clockwise from 12 o'clock
        color = cmap(values[slot] / top) if position is not None else (0.92, 0.92, 0.92)
        ax.add_patch(Wedge((0, 0), 1.0, start, start + step, width=0.45, facecolor=color, edgecolor="white"))
        angle = np.deg2rad(start + step / 2)
        text = f"{slot}\n{'-' if position is None else position}"
        ax.text(0.775 * np.cos(angle), 0.775 * np.sin(angle), text, ha="center", va="center", fontsize=7)
    if head is not None:
        angle = np.deg2rad(90 - (head + 0.5) * step)
        tip = np.array([np.cos(angle), np.sin(angle)]) * 0.55
        ax.add_patch(FancyArrow(0, 0, *(tip * 0.8), width=0.02, head_width=0.08, color="tab:red"))
        ax.text(0, -0.12, "write head", ha="center", fontsize=7, color="tab:red")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title + (f"\n(shade: {colorbar}; labels: ring slot / position held)" if colorbar else ""), fontsize=8)
    return fig
