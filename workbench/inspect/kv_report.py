"""``inspect.kv_cache``: the per-layer KV cache of a decode state (or a prefix), slot by slot.

The statistics are reductions computed where the cache lives; only the small results (one
number per layer and slot, or the one heatmap a plot draws) come to the host. A position
counts as *filled* when its key or value row holds anything but zeros: what a write left there,
measured independently of the engine's own bookkeeping (``next position``).

A sliding layer's ring (``model/ring.py``) is shown as a ring: its rows say which positions it
holds and where its write head is, ``ring(layer, slot)`` lists slot -> position, and its plots
place each slot at the position it holds (``inspect/kv_ring.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workbench.checks import is_int
from workbench.distributed import host_value, spans_processes
from workbench.engine import DecodeState, Prefix
from workbench.inspect import kv_ring, plots
from workbench.inspect.kv_source import KVSource, kv_source
from workbench.inspect.report import Column, Report, Table, fmt_bytes, fmt_float, fmt_int, fmt_ranges, nbytes, plural

Tokens = Sequence[int | str] | str | Mapping[int, Sequence[int | str] | str]


@jax.jit
def _stats(keys: tuple, values: tuple, helds: tuple) -> dict[str, jax.Array]:
    """Per layer and slot ([L, B] each): filled positions, end of the last write (an absolute
    position, a ring's too), NaN and inf counts, largest finite |k| and |v|."""

    def one(k, v, held):  # [B, S, K, H], a ring's [B, S] or None
        written = jnp.any((k != 0) | (v != 0), axis=(2, 3))  # [B, S]
        ends = jnp.where(written, jnp.arange(k.shape[1]) + 1 if held is None else held, 0)
        finite_max = lambda x: jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), axis=(1, 2, 3)).astype(jnp.float32)
        count = lambda f: (f(k).sum((1, 2, 3)) + f(v).sum((1, 2, 3))).astype(jnp.int32)
        return {
            "filled": written.sum(1),
            "end": ends.max(1),
            "nan": count(jnp.isnan),
            "inf": count(jnp.isinf),
            "max_abs_k": finite_max(k),
            "max_abs_v": finite_max(v),
        }

    per_layer = [one(k, v, h) for k, v, h in zip(keys, values, helds)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


def _bucket(n: int, length: int) -> int:
    """``n`` rounded up to a multiple of 16 (at most ``length``): the plots' reductions compile
    once per bucket, not once per step as a sequence grows; the host drops the extra columns."""
    return min(length, -(-n // 16) * 16)


@functools.partial(jax.jit, static_argnames=("n",))
def _occupancy(keys: tuple, values: tuple, helds: tuple, n: int) -> jax.Array:
    """[B, n]: how many layers hold a K/V at each slot and position (a ring's at the positions
    its slots hold)."""
    total = jnp.zeros((keys[0].shape[0], n), jnp.int32)
    for k, v, held in zip(keys, values, helds):
        if held is None:
            written = jnp.any((k[:, :n] != 0) | (v[:, :n] != 0), axis=(2, 3)).astype(jnp.int32)  # [B, min(n, S)]
            total = total.at[:, : written.shape[1]].add(written)
        else:
            written = jnp.any((k != 0) | (v != 0), axis=(2, 3)) & (held > 0)  # [B, W]
            at = jnp.where(written, held - 1, n)  # n: out of range, dropped
            total = total.at[jnp.arange(k.shape[0])[:, None], at].add(1, mode="drop")
    return total


@functools.partial(jax.jit, static_argnames=("n", "head"))
def _rows(x: jax.Array, slot: jax.Array, n: int, head: int | None) -> jax.Array:
    """One slot's first ``n`` positions: norms per kv head [n, K], or one head's values [n, H]."""
    rows = jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)[:n].astype(jnp.float32)  # [n, K, H]
    return jnp.linalg.norm(rows, axis=-1) if head is None else rows[:, head]


def _read_rows(x: Any, slot: int, n: int, head: int | None) -> np.ndarray:
    return host_value(_rows(x, jnp.int32(slot), _bucket(n, x.shape[1]), head))[:n]


def _token_labels(tokens: Tokens | None) -> dict[int | None, list[str]]:
    """``None`` -> {}; a sequence (or str) -> {None: labels} for every slot; a mapping -> per slot."""
    if tokens is None:
        return {}

    def labels(seq: Any) -> list[str]:
        if isinstance(seq, str):
            return list(seq)
        if not isinstance(seq, Sequence) and not isinstance(seq, np.ndarray):
            raise TypeError(f"tokens must be a sequence of ids or strings, got {type(seq).__name__}")
        return [str(int(t)) if isinstance(t, (int, np.integer)) else str(t) for t in seq]

    if isinstance(tokens, Mapping):
        return {int(slot): labels(seq) for slot, seq in tokens.items()}
    return {None: labels(tokens)}


class KVCacheReport(Report):
    """Per layer and slot: next position, filled positions, NaN/inf counts, max |k| and |v|."""

    def __init__(self, source: KVSource, tokens: Tokens | None = None):
        self.source = source
        self._labels = _token_labels(tokens)
        stats = {name: host_value(x) for name, x in _stats(source.keys, source.values, source.helds).items()}
        self.stats = stats  # [L, B] each
        slots, length, heads, dim = source.shape
        dtype = source.keys[0].dtype
        self.helds = [None if h is None else host_value(h) for h in source.helds]  # rings' [B, W]
        nexts = source.next_positions
        # the positions axis of the plots: the full layers' length, or as far as a ring reached
        reach = [x.shape[1] for x, h in zip(source.keys, self.helds) if h is None]
        reach += [int(stats["end"].max(initial=0)), 1 + (0 if nexts is None else int(nexts.max(initial=0)))]
        self.span = max(reach) if source.rings else length
        rows = []
        for layer, path in enumerate(source.paths):
            held, size = self.helds[layer], source.keys[layer].shape[1]
            for slot in range(slots):
                next_position = None if nexts is None else int(nexts[slot])
                ring = {} if held is None else {
                    "window": size,
                    "holds": kv_ring.holds(held[slot]),
                    "head": kv_ring.write_head(next_position, size),
                }  # fmt: skip
                rows.append(
                    {
                        "layer": layer,
                        "slot": slot,
                        "path": path,
                        "shape": (size, heads, dim),
                        "dtype": str(dtype),
                        # k and v rows of this slot (and a ring's held positions)
                        "bytes": 2 * nbytes((size, heads, dim), dtype) + (0 if held is None else 4 * size),
                        "active": None if source.active is None else bool(source.active[slot]),
                        "next_position": next_position,
                        **ring,
                        "filled": int(stats["filled"][layer, slot]),
                        "nan": int(stats["nan"][layer, slot]),
                        "inf": int(stats["inf"][layer, slot]),
                        "max_abs_k": float(stats["max_abs_k"][layer, slot]),
                        "max_abs_v": float(stats["max_abs_v"][layer, slot]),
                    }
                )
        total = sum(r["bytes"] for r in rows)
        self.title = (
            f"KV cache of a {source.kind}: {plural(len(source.paths), 'layer')} x {plural(slots, 'slot')} x "
            f"{plural(length, 'position')} x {plural(heads, 'kv head')} x {plural(dim, 'dim')}, "
            f"k and v in {dtype}, {fmt_bytes(total)}"
        )
        self.ring_layers = tuple(i for i, h in enumerate(self.helds) if h is not None)
        if self.ring_layers:
            windows = sorted({source.keys[i].shape[1] for i in self.ring_layers})
            self.title += (
                f"; sliding layers {fmt_ranges(self.ring_layers)} keep rings of "
                f"{'/'.join(map(str, windows))} slots (holds: the positions a ring holds; head: its next write)"
            )
        dash = lambda x: "-" if x is None else str(x)
        columns = (
            Column("layer", "layer", str, "right", repeat=False),
            Column("slot", "slot", str, "right"),
            Column("active", "active", dash),
            Column("next_position", "next", dash, "right"),
            Column("filled", "filled", str, "right"),
            *(
                (Column("holds", "holds", dash, "right"), Column("head", "head", dash, "right"))
                if self.ring_layers
                else ()
            ),
            Column("nan", "nan", str, "right"),
            Column("inf", "inf", str, "right"),
            Column("max_abs_k", "max|k|", fmt_float, "right"),
            Column("max_abs_v", "max|v|", fmt_float, "right"),
            Column("bytes", "bytes", fmt_int, "right"),
        )
        self.tables = (Table("", columns, tuple(rows)),)
        odd = [
            r
            for r in rows
            if r["next_position"] is not None
            and r["active"] is not False
            and r["filled"] != min(r["next_position"], r.get("window", r["next_position"]))
        ]
        self.notes = tuple(
            f"layer {r['layer']} slot {r['slot']}: {r['filled']} positions filled, next position {r['next_position']}"
            for r in odd
        )

    # ---- plots ---------------------------------------------------------------------------
    def _positions_shown(self, slots: Sequence[int]) -> int:
        """Enough positions to show every write and each slot's next position (at least 1)."""
        ends = [int(self.stats["end"][:, s].max()) for s in slots]
        if self.source.next_positions is not None:
            ends += [int(self.source.next_positions[s]) + 1 for s in slots]
        return max(1, min(self.span, max(ends)))

    def ring(self, layer: int, slot: int | None = None) -> kv_ring.RingReport:
        """A ring layer's slots (``slot`` may be left out for a prefix): the absolute position each
        holds, which are live, where the write head is; ``.plot()`` draws the ring."""
        if not 0 <= layer < len(self.helds) or self.helds[layer] is None:
            raise ValueError(f"layer {layer} is not a ring: the ring layers are {fmt_ranges(self.ring_layers)}")
        slot = self._slot(slot)
        nexts = self.source.next_positions
        return kv_ring.RingReport(layer, slot, self.helds[layer][slot], None if nexts is None else int(nexts[slot]))

    def _slot(self, slot: int | None) -> int:
        slots = self.source.shape[0]
        if slot is None and slots != 1:
            raise ValueError(f"pass slot= (0..{slots - 1}): this cache has {slots} slots")
        slot = 0 if slot is None else slot
        if not is_int(slot) or not 0 <= slot < slots:
            raise ValueError(f"slot must be an int in 0..{slots - 1}, got {slot!r}")
        return slot

    def _norms(self, layer: int, name: str, slot: int, n: int, head: int | None) -> np.ndarray:
        """[n, K] per-head norms (or [n] of ``head``'s values, as ``_read_rows``) of a layer at
        absolute positions 0..n-1; a ring's slots placed at the positions they hold (0 elsewhere)."""
        x = (self.source.keys if name == "k" else self.source.values)[layer]
        held = self.helds[layer]
        if held is None:
            return _read_rows(x, slot, n, head)
        rows = _read_rows(x, slot, x.shape[1], head)  # the whole ring
        out = np.zeros((n, *rows.shape[1:]), rows.dtype)
        at = held[slot].astype(np.int64) - 1
        keep = (at >= 0) & (at < n)
        out[at[keep]] = rows[keep]
        return out

    def _xticklabels(self, slot: int | None, n: int) -> list[str] | None:
        labels = self._labels.get(slot, self._labels.get(None))
        if labels is None and slot is None and self.source.shape[0] == 1:
            labels = self._labels.get(0)
        return None if labels is None else [labels[p] if p < len(labels) else "" for p in range(n)]

    def plot(self, layer: int | None = None, slot: int | None = None, head: int | None = None):
        """A matplotlib Figure.

        - no arguments: the slot-occupancy map (slots x positions, shaded by layers written,
          a marker at each slot's next position);
        - ``slot``: K and V norms over layers x positions (mean over kv heads, or ``head``);
        - ``layer`` and ``slot`` (``slot`` may be left out for a prefix): K and V norms over
          kv heads x positions, or with ``head`` that head's K and V values over dims x positions;
          a ring layer is drawn as a ring (``ring(layer, slot).plot``), its slots shaded by |K|.
        Token labels (``tokens=`` of ``kv_cache``) mark the position axis.
        """
        slots, length, heads, _ = self.source.shape
        n_layers = len(self.source.paths)
        for name, value, size in (("layer", layer, n_layers), ("slot", slot, slots), ("head", head, heads)):
            if value is not None and (not is_int(value) or not 0 <= value < size):
                raise ValueError(f"{name} must be an int in 0..{size - 1}, got {value!r}")
        if layer is not None and slot is None:
            if slots != 1:
                raise ValueError(f"plot(layer=...) draws one slot: pass slot= too (0..{slots - 1})")
            slot = 0
        if slot is None:
            if head is not None:
                raise ValueError("head= picks a head within a layer or slot view: pass layer= or slot= too")
            n = self._positions_shown(range(slots))
            held = self.source.helds
            written = host_value(_occupancy(self.source.keys, self.source.values, held, _bucket(n, self.span)))[:, :n]
            known = self.source.next_positions
            nexts = [None] * slots if known is None else [int(p) for p in known]
            return plots.occupancy(
                written,
                nexts,
                layers=n_layers,
                title=f"{self.source.kind}: slot occupancy",
                xticklabels=self._xticklabels(None, n),
            )
        n = self._positions_shown([slot])
        ticks = self._xticklabels(slot, n)
        if layer is None:

            def per_layer(layer, name):  # [n] per layer: norm of one head, or mean of the heads' norms
                norms = self._norms(layer, name, slot, n, None)  # [n, K]
                return norms[:, head] if head is not None else norms.mean(-1)

            panels = [
                (f"|{name.upper()}|", np.stack([per_layer(layer, name) for layer in range(n_layers)]))
                for name in ("k", "v")
            ]
            which = "mean over kv heads" if head is None else f"kv head {head}"
            return plots.heatmaps(
                panels,
                xlabel="position",
                ylabel="layer",
                xticklabels=ticks,
                title=f"slot {slot}: K and V norms per layer ({which})",
                colorbar="norm",
                yticklabels=[str(i) for i in range(n_layers)],
            )
        if self.helds[layer] is not None:  # a ring, drawn as a ring: each slot shaded by its |K|
            norms = _read_rows(self.source.keys[layer], slot, self.source.keys[layer].shape[1], None)  # [W, K]
            which = "mean over kv heads" if head is None else f"kv head {head}"
            view = self.ring(layer, slot)
            return view.plot(norms.mean(-1) if head is None else norms[:, head], title=f"{view.title}\n|K|: {which}")
        panels = [
            ("|K|" if head is None else "K", self._norms(layer, "k", slot, n, head).T),
            ("|V|" if head is None else "V", self._norms(layer, "v", slot, n, head).T),
        ]
        if head is None:
            return plots.heatmaps(
                panels,
                xlabel="position",
                ylabel="kv head",
                xticklabels=ticks,
                colorbar="norm",
                title=f"layer {layer}, slot {slot}: K and V norms per kv head",
                yticklabels=[str(h) for h in range(heads)],
            )
        return plots.heatmaps(
            panels,
            xlabel="position",
            ylabel="head dim",
            xticklabels=ticks,
            colorbar="value",
            title=f"layer {layer}, slot {slot}, kv head {head}: K and V values",
        )


def kv_cache(
    decode_state_or_prefix: DecodeState | Prefix | dict, *, tokens: Tokens | None = None, gather: bool = False
) -> KVCacheReport:
    """Per layer and slot of a decode state (or prefix, or cache dict, or their snapshots):
    next position, filled positions, NaN/inf counts, max |k| and |v|; ``.plot()`` draws it.

    ``tokens`` label the position axis of plots: one sequence for every slot (a prompt's ids,
    or a string, one character per position) or ``{slot: sequence}``.

    A cache on devices of several processes (``workbench.distributed``) needs ``gather=True``,
    on every process at once: each statistic (and each plot's data) is then a collective.
    """
    if spans_processes(decode_state_or_prefix) and not gather:
        raise ValueError(
            "this cache spans the devices of several processes: call inspect.kv_cache(..., gather=True) on "
            "every process to gather its statistics (a collective), or read arrays with "
            "workbench.distributed.host_value"
        )
    return KVCacheReport(kv_source(decode_state_or_prefix), tokens)
