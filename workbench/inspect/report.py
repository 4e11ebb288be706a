"""The shared shape of every inspector's answer: a titled table (or a few) plus notes.

A ``Report`` prints as aligned plain text (``str``), renders as an HTML table in notebooks
(``_repr_html_``) and hands its rows back as plain dicts (``to_rows``). The text and HTML are
deterministic -- no ids, no memory addresses, floats rounded -- because notebooks print these
reports and nbval compares a fresh run against the stored output.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


# ---- formatting -------------------------------------------------------------------------------
def fmt_bytes(n: int | float) -> str:
    """``1536`` -> ``1.50 KiB``: binary units, three significant decimals at most."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.2f} {_UNITS[unit]}"


def fmt_int(n: int) -> str:
    return f"{int(n):,}"


def fmt_float(x: float | None, digits: int = 4) -> str:
    """Rounded to ``digits`` significant digits, so float noise never reaches a stored output."""
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def plural(n: int, word: str) -> str:
    """``1 piece``, ``4 pieces``, ``2 copies``: the count and its noun."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def fmt_shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(str(int(d)) for d in shape) + "]"


def fmt_axes(axes: Sequence[str | None] | None) -> str:
    return "-" if not axes else ",".join("-" if a is None else str(a) for a in axes)


def spec_entries(spec: PartitionSpec, ndim: int) -> tuple[str | None, ...]:
    """One entry per dimension (``None`` = not split; ``"data+tensor"`` = split over both)."""
    entries: list[str | None] = []
    for entry in tuple(spec):
        if entry is None or entry == ():
            entries.append(None)
        elif isinstance(entry, (tuple, list)):
            entries.append("+".join(str(e) for e in entry))
        else:
            entries.append(str(entry))
    return tuple(entries + [None] * (ndim - len(entries)))


def fmt_spec(spec: PartitionSpec | None, ndim: int) -> str:
    """``P('tensor', None)`` on a 3-D array -> ``(tensor, -, -)``; a scalar -> ``()``."""
    if spec is None:
        return "-"
    return "(" + ", ".join("-" if e is None else e for e in spec_entries(spec, ndim)) + ")"


def fmt_ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``; nothing -> ``-``."""
    values = sorted(set(int(v) for v in values))
    if not values:
        return "-"
    runs, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(runs)


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (key dtypes included: their itemsize)."""
    return int(np.prod(shape, dtype=np.int64)) * int(dtype.itemsize)


# ---- tables -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Column:
    """How one row key prints: its header, formatter and alignment.

    ``repeat=False`` blanks a cell equal to the one above it, so a grouping column (the
    collection of a state row) reads as a heading instead of a wall of repeats.
    """

    key: str
    header: str
    format: Callable[[Any], str] = str
    align: str = "left"
    repeat: bool = True


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]

    def cells(self) -> list[list[str]]:
        grid, above = [], None
        for row in self.rows:
            line = []
            for column in self.columns:
                text = column.format(row.get(column.key))
                if not column.repeat and above is not None and above.get(column.key) == row.get(column.key):
                    text = ""
                line.append(text)
            grid.append(line)
            above = row
        return grid

    def text(self) -> list[str]:
        cells = self.cells()
        headers = [c.header for c in self.columns]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

        def line(values: Sequence[str]) -> str:
            parts = [v.rjust(w) if c.align == "right" else v.ljust(w) for v, w, c in zip(values, widths, self.columns)]
            return "  ".join(parts).rstrip()

        out = [self.title] if self.title else []
        out += [line(headers), line(["-" * w for w in widths])]
        out += [line(r) for r in cells] or ["(empty)"]
        return out

    def html(self) -> str:
        style = "padding:1px 8px;font-family:monospace;white-space:pre;"
        head = "".join(f'<th style="{style}text-align:{c.align}">{html.escape(c.header)}</th>' for c in self.columns)
        body = "".join(
            "<tr>"
            + "".join(f'<td style="{style}text-align:{c.align}">{html.escape(v)}</td>' for v, c in zip(r, self.columns))
            + "</tr>"
            for r in self.cells()
        )
        caption = f'<caption style="text-align:left;font-weight:bold">{html.escape(self.title)}</caption>'
        return (
            f'<table style="border-collapse:collapse">{caption if self.title else ""}'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )


class Report:
    """Base of every inspector's result: ``title``, tables, notes.

    Subclasses fill ``self.title``, ``self.tables`` (the first one's rows are ``to_rows()``
    unless a subclass says otherwise) and ``self.notes`` (plain text lines after the tables).
    """

    title: str = ""
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (copies): at least ``path``, ``shape``, ``dtype``, ``bytes``."""
        return [dict(row) for row in self.tables[0].rows] if self.tables else []

    def to_tree(self) -> dict[str, Any]:
        """The rows nested by collection, path and slot (``{"params": {"layers": {"0": ...}}}``):
        displayed in a notebook set up by ``workbench.notebook_setup()``, treescope renders it
        as a foldable tree."""
        tree: dict[str, Any] = {}
        for row in self.to_rows():
            node = tree
            parts = [str(row["collection"])] if "collection" in row else []
            parts += [p for p in str(row["path"]).split("/") if p]
            parts += [f"slot {row['slot']}"] if "slot" in row else []
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1] if parts else ""] = row
        return tree

    def __str__(self) -> str:
        lines = [self.title]
        for table in self.tables:
            lines += [""] + table.text()
        if self.notes:
            lines += [""] + list(self.notes)
        return "\n".join(lines)

    # In notebooks the text/plain output is repr(): the same deterministic text.
    __repr__ = __str__

    def _repr_html_(self) -> str:
        parts = [f'<div><div style="font-weight:bold">{html.escape(self.title)}</div>']
        parts += [table.html() for table in self.tables]
        if self.notes:
            parts.append("<pre>" + html.escape("\n".join(self.notes)) + "</pre>")
        return "".join(parts) + "</div>"
