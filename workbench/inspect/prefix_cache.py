"""``inspect.prefix_cache``: what a :class:`~workbench.PrefixCache` holds, block by block.

One row per node of its radix tree: the adapter it belongs to, the tokens it covers (a node at
depth d holds the KV of tokens ``0 .. d * block - 1``), the first ids of its own block, where its
snapshot lives (``device``, ``host``, or ``-``: a path node whose snapshot was evicted), its bytes,
how many lookups reused it and when it was last used (the cache's clock: one tick per lookup or
store, so the text is the same on every run). ``plot()`` draws the tree over token positions.
"""

from __future__ import annotations

from workbench.engine.prefix_cache import PrefixCache
from workbench.inspect.report import Column, Report, Table, fmt_bytes, fmt_int, plural

_PREVIEW = 4  # ids of a block shown in its row
_TIER_COLORS = {"device": "tab:blue", "host": "tab:orange", "-": "lightgrey"}


def _preview(block: tuple[int, ...]) -> str:
    head = " ".join(str(t) for t in block[:_PREVIEW])
    return head + (" ..." if len(block) > _PREVIEW else "")


class PrefixCacheReport(Report):
    """The tree of a prefix cache as a table (``to_rows``: adapter, node, tokens, block, tier,
    bytes, hits, last_use, depth, parent) and its totals as notes; ``plot()`` draws it."""

    def __init__(self, cache: PrefixCache):
        if not isinstance(cache, PrefixCache):
            raise TypeError(f"prefix_cache takes a workbench.PrefixCache, got {type(cache).__name__}")
        self.block = cache.block
        ids: dict[int, int] = {}  # id(node) -> its row number, for the parent column and the plot
        rows = []
        for adapter, node in cache.nodes():
            ids[id(node)] = len(rows)
            rows.append(
                {
                    "adapter": adapter,
                    "node": len(rows),
                    "parent": ids.get(id(node.parent)),
                    "depth": node.depth,
                    "tokens": f"0-{node.depth * cache.block - 1}",
                    "block": _preview(node.block),
                    "tier": node.tier,
                    "bytes": node.nbytes,
                    "hits": node.hits,
                    "last_use": node.last_use,
                }
            )
        columns = (
            Column("adapter", "adapter", repeat=False),
            Column("node", "node", fmt_int, "right"),
            Column("parent", "parent", lambda p: "-" if p is None else str(p), "right"),
            Column("tokens", "tokens", align="right"),
            Column("block", "block starts"),
            Column("tier", "tier"),
            Column("bytes", "bytes", fmt_bytes, "right"),
            Column("hits", "hits", fmt_int, "right"),
            Column("last_use", "last use", fmt_int, "right"),
        )
        stats = cache.stats()
        held = sum(1 for row in rows if row["tier"] != "-")
        self.title = f"prefix cache: {plural(len(rows), 'node')} of {cache.block}-token blocks, {held} held"
        self.tables = (Table("", columns, tuple(rows)),)
        self.notes = (
            f"device {fmt_bytes(cache.held('device'))} of {fmt_bytes(cache.budget)}, "
            f"host {fmt_bytes(cache.held('host'))} of {fmt_bytes(cache.host_budget)}; "
            f"one block's snapshot: {fmt_bytes(cache.snapshot_bytes)}",
            f"hits {stats['hits']}, tokens reused {stats['tokens_reused']}, evictions {stats['evictions']}",
        )

    def plot(self):
        """A matplotlib Figure: each node a bar over its block's token positions (color: tier;
        label: hits), linked to its parent; one row of the figure per node."""
        from matplotlib.figure import Figure  # not pyplot: see inspect/plots.py

        rows = self.tables[0].rows
        fig = Figure(figsize=(7.0, max(2.0, 0.32 * len(rows) + 1.0)), layout="constrained")
        ax = fig.add_subplot()
        for row in rows:
            y, start = row["node"], (row["depth"] - 1) * self.block
            ax.barh(y, self.block, left=start, height=0.6, color=_TIER_COLORS[row["tier"]], edgecolor="black")
            ax.text(start + self.block / 2, y, f"{row['hits']} hits", ha="center", va="center", fontsize=7)
            if row["parent"] is not None:
                ax.plot([start, start], [rows[row["parent"]]["node"], y], color="grey", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [f"{r['adapter']} #{r['node']}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("token position")
        ax.set_title(f"{self.title} (blue: device, orange: host, grey: evicted)", fontsize=9)
        return fig


def prefix_cache(cache: PrefixCache) -> PrefixCacheReport:
    """The tree of ``cache`` (a :class:`~workbench.PrefixCache`): text, HTML, rows and ``plot()``."""
    return PrefixCacheReport(cache)
