"""``inspect.kv_cache_diff``: what an insert, generate or prefill changed in a KV cache.

insert, bulk_insert, generate and free_resource donate the decode state: after the call the
arrays you passed are deleted. So take ``before = snapshot(state)`` first (a host copy), then
``kv_cache_diff(before, state_after)``.

A ring layer (a sliding layer's, ``model/ring.py``) reports the absolute positions its changed
slots hold (after the change; a slot emptied: the one it held before), as a full layer does.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from workbench.checks import check_not_donated
from workbench.distributed import host_value, spans_processes
from workbench.engine import DecodeState, Prefix
from workbench.inspect import kv_ring
from workbench.inspect.kv_source import kv_source
from workbench.inspect.report import Column, Report, Table, fmt_int, fmt_ranges, nbytes

T = TypeVar("T")
# The bookkeeping beside the cache, and the column each prints under.
_SLOT_FIELDS = {
    DecodeState: {"positions": "next", "tokens": "token", "lengths": "generated", "active": "active"},
    Prefix: {"length": "length", "token": "token"},
}


def snapshot(tree: T) -> T:
    """A host copy of ``tree`` (a DecodeState, Prefix, cache ...) that survives donation.

    Every array becomes a numpy array (a real copy, never a view of a buffer XLA may reuse);
    a PRNG key becomes its raw key data (``jax.random.key_data``), since numpy has no key
    type. ``kv_cache`` and ``kv_cache_diff`` take snapshots as they take the originals.
    """

    def copy(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        check_not_donated(x, "an array to snapshot")
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(host_value(x), copy=True)  # an array spanning processes is gathered (a collective)

    return jax.tree.map(copy, tree)


@jax.jit
def _changed(before_k: tuple, before_v: tuple, after_k: tuple, after_v: tuple, atol: jax.Array) -> tuple:
    """Per layer [B, S]: whether any key or value element at (slot, cache index) differs by more than ``atol``."""

    def differs(a, b):  # NaN == NaN here: a NaN left in place is not a change
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        same = (a == b) | (jnp.abs(a - b) <= atol) | (jnp.isnan(a) & jnp.isnan(b))
        return ~same

    return tuple(
        jnp.any(differs(bk, ak) | differs(bv, av), axis=(2, 3))
        for bk, bv, ak, av in zip(before_k, before_v, after_k, after_v)
    )


def _by_position(changed: tuple, old, new) -> np.ndarray:
    """[L, B, P]: the per-layer changes [B, S] at absolute positions (a ring's slots at the
    positions they hold, or held before when emptied); P reaches the furthest one."""
    slots = new.shape[0]
    where = []
    for layer, mask in enumerate(changed):
        mask, size = np.asarray(mask), mask.shape[1]
        after = kv_ring.positions(new.helds[layer], slots, size)
        before = kv_ring.positions(old.helds[layer], slots, size)
        where.append(np.where(after >= 0, after, before)[mask] if mask.any() else np.zeros(0, int))
    reach = [m.shape[1] for m, h in zip(changed, new.helds) if h is None] + [int(w.max()) + 1 for w in where if w.size]
    out = np.zeros((len(changed), slots, max(reach, default=1)), bool)
    for layer, mask in enumerate(changed):
        rows = np.nonzero(np.asarray(mask))[0]
        keep = where[layer] >= 0
        out[layer, rows[keep], where[layer][keep]] = True
    return out


def _arrow(before: Any, after: Any) -> str:
    return str(before) if before == after else f"{before}->{after}"


class KVCacheDiff(Report):
    """Which slots, layers and positions changed between two KV caches.

    A K/V row is one (layer, slot, position): its key and value vectors for every kv head. It
    counts as changed when some element differs by more than ``atol`` (0: any bit of a value;
    NaN equals NaN). ``.atol`` is the tolerance used; the title says it.

    ``.slots`` (cache or bookkeeping changed), ``.layers`` (cache changed), ``.positions``
    ({slot: changed positions, over all layers}); ``to_rows()`` has one row per changed
    (slot, layer) with its positions and the bytes of k and v written there.
    """

    def __init__(self, before: Any, after: Any, *, atol: float = 0.0):
        if isinstance(atol, bool) or not isinstance(atol, (int, float, np.floating, np.integer)) or not atol >= 0:
            raise ValueError(f"atol must be a non-negative number, got {atol!r}")
        self.atol = float(atol)
        if type(before) is not type(after):
            raise TypeError(
                f"before and after must be the same kind, got {type(before).__name__} and {type(after).__name__}"
            )
        old, new = kv_source(before, role="before"), kv_source(after, role="after")
        shapes = [[tuple(k.shape) for k in source.keys] for source in (old, new)]
        if shapes[0] != shapes[1] or [h is None for h in old.helds] != [h is None for h in new.helds]:
            raise ValueError(
                f"before and after caches differ in shape: {old.shape} x {len(old.paths)} layers "
                f"vs {new.shape} x {len(new.paths)} layers"
            )
        changed = _changed(old.keys, old.values, new.keys, new.values, jnp.float32(self.atol))
        self.mask = _by_position(changed, old, new)  # [L, B, P]: P positions
        slots, _, heads, dim = new.shape
        dtype = new.keys[0].dtype
        rows = []
        for slot in range(slots):
            for layer, path in enumerate(new.paths):
                positions = tuple(int(p) for p in np.flatnonzero(self.mask[layer, slot]))
                if positions:
                    rows.append(
                        {
                            "slot": slot,
                            "layer": layer,
                            "path": path,
                            "positions": positions,
                            "shape": (len(positions), heads, dim),
                            "dtype": str(dtype),
                            "bytes": 2 * nbytes((len(positions), heads, dim), dtype),
                        }
                    )
        self._rows = rows
        fields = {
            name: (np.asarray(getattr(before, name)).reshape(-1), np.asarray(getattr(after, name)).reshape(-1))
            for name in _SLOT_FIELDS.get(type(after), {})
        }
        bookkeeping = {s for b, a in fields.values() for s in np.flatnonzero(b != a)}
        self.slots = tuple(sorted({r["slot"] for r in rows} | {int(s) for s in bookkeeping}))
        self.layers = tuple(sorted({r["layer"] for r in rows}))
        self.positions = {
            s: tuple(sorted({p for r in rows if r["slot"] == s for p in r["positions"]})) for s in self.slots
        }

        summary = []
        for slot in self.slots:
            groups: dict[tuple[int, ...], list[int]] = {}  # positions -> layers that changed exactly there
            for r in rows:
                if r["slot"] == slot:
                    groups.setdefault(r["positions"], []).append(r["layer"])
            for positions, layers in sorted(groups.items(), key=lambda g: g[1]) or [((), [])]:
                line = {
                    "slot": slot,
                    "layers": fmt_ranges(layers),
                    "positions": fmt_ranges(positions),
                    "count": len(positions),
                }
                for name, (b, a) in fields.items():
                    line[f"state_{name}"] = _arrow(_plain(b[slot]), _plain(a[slot]))
                summary.append(line)
        columns = (
            Column("slot", "slot", str, "right", repeat=False),
            Column("layers", "layers"),
            Column("positions", "positions"),
            Column("count", "count", fmt_int, "right"),
        )
        columns += tuple(Column(f"state_{name}", _SLOT_FIELDS[type(after)][name]) for name in fields)
        changed = ", ".join(str(s) for s in self.slots) or "none"
        self.title = (
            f"KV cache diff of a {new.kind}: slots changed: {changed}; layers: {fmt_ranges(self.layers)}; "
            f"{int(self.mask.sum())} K/V rows changed {self.tolerance}"
        )
        self.tables = (Table("", columns, tuple(summary)),) if summary else ()
        self.notes = ("nothing changed",) if not self.slots else ()

    @property
    def tolerance(self) -> str:
        """``"(any bit)"`` or ``"(by more than 1e-05)"``: what counted as a change."""
        return "(any bit)" if self.atol == 0 else f"(by more than {self.atol:g})"

    def to_rows(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._rows]


def _plain(x: Any) -> Any:
    return bool(x) if isinstance(x, (bool, np.bool_)) else int(x)


def kv_cache_diff(
    before: DecodeState | Prefix | dict, after: DecodeState | Prefix | dict, *, atol: float = 0.0
) -> KVCacheDiff:
    """What changed from ``before`` to ``after`` (two decode states, prefixes or cache dicts).

    ``before`` must still be readable: since insert/generate donate the decode state, pass
    ``snapshot(state)`` taken before the call. Caches on devices of several processes are
    compared as snapshots: ``snapshot`` gathers them, on every process at once.

    ``atol``: a K/V row counts as changed when some key or value element differs by more than
    this. Keep 0 where the engine copies bits (insert copies a prefix); use a tolerance such as
    1e-5 to compare caches computed by different shapes or code paths, whose float32 sums round
    differently on different CPUs.
    """
    if spans_processes((before, after)):
        raise ValueError(
            "these caches span the devices of several processes: diff inspect.snapshot()s of "
            "them, taken on every process (snapshot gathers each array, a collective)"
        )
    return KVCacheDiff(before, after, atol=atol)
