"""A prefix cache: prompts that share a beginning prefill it once.

The KV of a prompt's first ``k`` blocks of ``block`` tokens is kept as the prefix dict that
``Engine.prefill`` returned after those blocks, in a radix tree whose edges are token blocks
(JetStream's trie over chunks). A new prompt walks the tree block by block; the deepest node that
holds a snapshot is its cached prefix, and only the rest is prefilled, through ``existing_prefix``.

Why a block is ``engine.max_prefill_length`` (the chunk of chunked prefill): a snapshot is then
the very prefix that the uncached path holds after its k-th chunk, and the cached path runs the
same remaining chunks on the same inputs -- so the first token and the KV are the uncached ones
bit for bit, not merely within a tolerance. (Smaller blocks would need the miss path to prefill
in smaller chunks; build the engine with a smaller ``max_prefill_length`` instead.) At least the
prompt's last token is always prefilled: the first token's logits come from it.

A snapshot is opaque: a pytree of arrays plus its length, whatever shape each layer's cache has
(full, ring, int8 values with scales, stacked layers). What changes the KV is in the key: the
engine (model config with its KV-cache dtype, shapes, kernels: one cache per engine), the params
object, and the LoRA adapter. Each snapshot costs its whole batch-1 cache (its global bytes, over
every device of the mesh); a byte budget on device memory evicts the least recently used, to a
host tier (``host_mb``) or out. A stored block is the prefill's own output, never copied.

Multisampling shares like any prompt: its blocks before the last chunk are plain prefills, and a
multisampled prefix that ends on a block edge is stored with one placeholder token (token and
logits are not part of the KV), so a longer prompt can extend it. Where sharing is skipped, and
why: packed rows (``pack_prefill``) hold prompts of at most
``max_prefill_length`` tokens together, so no segment has a full block before its last token; a
lookup would always miss, and a packed row holds no snapshot at a block boundary.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workbench.engine.engine import Engine, Params
from workbench.engine.sampling import GREEDY, Sampling
from workbench.engine.types import Prefix

MB = 10**6  # budgets are in megabytes (10^6 bytes), as the CLI's --prefix-cache-mb


@dataclasses.dataclass(eq=False)
class Node:
    """One block of a prompt: the edge ``block`` from ``parent``; ``prefix`` is the KV of every
    block from the root to here (None: never stored, or evicted), on device or on the host."""

    block: tuple[int, ...]
    depth: int  # blocks from the root: this node ends at token depth * block size
    parent: Node | None
    children: dict[tuple[int, ...], Node] = dataclasses.field(default_factory=dict)
    prefix: Prefix | None = None
    nbytes: int = 0
    tier: str = "-"  # "device", "host" or "-" (nothing held)
    hits: int = 0
    last_use: int = 0  # the cache's clock (one tick per lookup or store) when last read or written

    def walk(self) -> Iterator[Node]:
        """This node and every node below it, depth first."""
        yield self
        for child in self.children.values():
            yield from child.walk()


@dataclasses.dataclass(frozen=True)
class Hit:
    """A lookup's answer: the cached prefix of the prompt's first ``tokens`` tokens (None, 0: a miss)."""

    prefix: Prefix | None
    tokens: int


class PrefixCache:
    """Stored prefills of ``engine``'s prompts, ``budget_mb`` megabytes of device memory at most.

    ``host_mb``: a second tier in host memory for snapshots evicted from the device (0: none).
    ``stats()``: ``{"hits", "tokens_reused", "bytes", "evictions"}`` -- lookups that reused a
    block, tokens they did not prefill, bytes held now (both tiers), snapshots evicted from the
    device (to the host or out).
    """

    def __init__(self, engine: Engine, budget_mb: float, *, host_mb: float = 0.0):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a workbench Engine, got {type(engine).__name__}")
        self.budget = _budget("budget_mb", budget_mb)
        self.host_budget = _budget("host_mb", host_mb)
        self.engine = engine
        self.identity = identity(engine)
        self.block = engine.max_prefill_length
        self.roots: dict[tuple, Node] = {}
        self.labels: dict[tuple, str] = {}  # namespace -> its adapter's name, for the inspector
        self.clock = self.hits = self.tokens_reused = self.evictions = 0
        self._params: dict[int, Any] = {}  # id -> a weak (or strong) reference that keeps the id unique
        self.snapshot_bytes = snapshot_nbytes(engine)
        self._bytes = {"device": 0, "host": 0}  # held per tier, kept as snapshots move
        # token and logits are not part of the KV: stored prefixes share these (a scalar token
        # keeps a multisampled prefix extendable)
        self._no_token, self._no_logits = jnp.zeros((), jnp.int32), jnp.zeros((0,), jnp.float32)
        if self.snapshot_bytes > self.budget:
            warnings.warn(
                f"prefix cache budget {budget_mb} MB is smaller than one block's KV "
                f"({self.snapshot_bytes / MB:.3g} MB): nothing will be cached",
                stacklevel=2,
            )

    # ---- the key ---------------------------------------------------------------------------------
    def check_engine(self, engine: Engine) -> None:
        """ValueError unless ``engine``'s KV is interchangeable with the one this cache was made for."""
        if engine is not self.engine and identity(engine) != self.identity:
            raise ValueError(
                "this PrefixCache was built for another engine (model, shape or mesh differ): make one per engine"
            )

    def _namespace(self, params: Params, adapter: str | None, create: bool) -> tuple:
        """The root key: what changes the KV besides the tokens (the engine is fixed per cache)."""
        self.engine.adapter_index(adapter)  # an unknown adapter fails here
        key = (id(params), adapter, self.engine.config.kv_cache_dtype)
        if create and id(params) not in self._params:
            try:  # a dead params object's id may be reused: drop its snapshots when it goes
                forget = weakref.WeakMethod(self._forget)  # the params must not keep the cache alive
                self._params[id(params)] = weakref.ref(params, lambda _, i=id(params): (f := forget()) and f(i))
            except TypeError:  # not weakly referable (a plain dict): hold it, so its id stays its own
                self._params[id(params)] = params
        return key

    def _forget(self, params_id: int) -> None:
        self._params.pop(params_id, None)
        for key in [k for k in self.roots if k[0] == params_id]:
            for node in list(self.roots[key].walk()):
                self._drop(node)
            del self.roots[key], self.labels[key]

    # ---- lookup and store ------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], *, params: Params, adapter: str | None = None) -> Hit:
        """The longest cached block prefix of ``tokens`` that leaves at least its last token to
        prefill; counts a hit when it reuses a block. Host snapshots come back to the device."""
        self.clock += 1
        node = self.roots.get(self._namespace(params, adapter, create=False))
        best, path = None, []
        for depth in range((len(tokens) - 1) // self.block):
            node = None if node is None else node.children.get(self._block(tokens, depth))
            if node is None:
                break
            path.append(node)
            best = node if node.prefix is not None else best
        if best is None:
            return Hit(None, 0)
        for node in path[: best.depth]:
            node.last_use = self.clock
        best.hits += 1
        prefix = self._promote(best) if best.tier == "host" else best.prefix
        self.hits += 1
        self.tokens_reused += best.depth * self.block
        return Hit(prefix, best.depth * self.block)

    def store(self, tokens: Sequence[int], prefix: Prefix, *, params: Params, adapter: str | None = None) -> None:
        """Keep ``prefix``, the KV of exactly ``tokens`` (a whole number of blocks), evicting the
        least recently used snapshots to stay within the budget. (``prefix.length`` is not read
        back to check: that would wait for the prefill between chunks.)"""
        depth, rest = divmod(len(tokens), self.block)
        if rest or depth == 0:
            raise ValueError(
                f"a stored prefix must hold a whole number of {self.block}-token blocks, got {len(tokens)}"
            )
        if self.snapshot_bytes > self.budget:
            return
        self.clock += 1
        key = self._namespace(params, adapter, create=True)
        if key not in self.roots:
            self.roots[key], self.labels[key] = Node((), 0, None), adapter or "base"
        node = self.roots[key]
        for d in range(depth):
            block = self._block(tokens, d)
            node = node.children.setdefault(block, Node(block, d + 1, node))
            node.last_use = self.clock
        if node.tier == "device":
            return
        self._place(node, prefix.replace(token=self._no_token, logits=self._no_logits), "device")
        self._fit()

    def _block(self, tokens: Sequence[int], depth: int) -> tuple[int, ...]:
        return tuple(int(t) for t in tokens[depth * self.block : (depth + 1) * self.block])

    # ---- budget ----------------------------------------------------------------------------------
    def nodes(self) -> Iterator[tuple[str, Node]]:
        """Every node but the roots, depth first, with its namespace's label (adapter or "base")."""
        for key, root in self.roots.items():
            for node in root.walk():
                if node is not root:
                    yield self.labels[key], node

    def held(self, tier: str) -> int:
        """Bytes of the snapshots in ``tier`` (``"device"`` or ``"host"``)."""
        return self._bytes[tier]

    def stats(self) -> dict[str, int]:
        """The CLI's ``"prefix_cache"`` object."""
        bytes_held = self.held("device") + self.held("host")
        return {
            "hits": self.hits,
            "tokens_reused": self.tokens_reused,
            "bytes": bytes_held,
            "evictions": self.evictions,
        }

    def _fit(self) -> None:
        """Evict least recently used snapshots until each tier is within its budget."""
        for tier, budget in (("device", self.budget), ("host", self.host_budget)):
            if self._bytes[tier] <= budget:
                continue
            held = [node for _, node in self.nodes() if node.tier == tier]
            # deepest first among equals: a parent is as recent as its child, and more shareable
            for node in sorted(held, key=lambda n: (n.last_use, -n.depth)):
                if self._bytes[tier] <= budget:
                    break
                if tier == "device":
                    self.evictions += 1
                if tier == "device" and node.nbytes <= self.host_budget:
                    self._place(node, jax.device_get(node.prefix), "host")
                else:
                    self._drop(node)

    def _promote(self, node: Node) -> Prefix:
        """``node``'s host snapshot back on the device (which may evict others, or it again)."""
        host = node.prefix
        shardings = self.engine.get_prefix_destination_sharding().cache
        prefix = jax.tree.map(jnp.asarray, host.replace(cache={})).replace(cache=jax.device_put(host.cache, shardings))
        self._place(node, prefix, "device")
        self._fit()
        return prefix

    def _place(self, node: Node, prefix: Prefix | None, tier: str) -> None:
        """``node`` now holds ``prefix`` in ``tier`` (None, "-": nothing); the bytes per tier follow."""
        if node.tier in self._bytes:
            self._bytes[node.tier] -= node.nbytes
        node.prefix, node.tier, node.nbytes = prefix, tier, 0 if prefix is None else self.snapshot_bytes
        if tier in self._bytes:
            self._bytes[tier] += node.nbytes

    def _drop(self, node: Node) -> None:
        """Forget ``node``'s snapshot; prune nodes left with no snapshot and no children."""
        self._place(node, None, "-")
        while node.parent is not None and node.prefix is None and not node.children:
            del node.parent.children[node.block]
            node = node.parent


def prefill_prompt(
    engine: Engine,
    params: Params,
    tokens: Sequence[int],
    *,
    cache: PrefixCache | None = None,
    adapter: str | None = None,
    sampling: Sampling | None = None,
    rng: jax.Array | None = None,
    num_samples: int = 1,
) -> tuple[Prefix, int, int]:
    """The prompt's prefix, prefilled in chunks of ``max_prefill_length`` tokens after what
    ``cache`` holds of it, each full chunk stored; the last chunk draws the first token of every
    sample. Returns (prefix, chunks prefilled, tokens reused from the cache)."""
    chunk, prefix, start = engine.max_prefill_length, None, 0
    if cache is not None:
        cache.check_engine(engine)
        hit = cache.lookup(tokens, params=params, adapter=adapter)
        prefix, start = hit.prefix, hit.tokens
    chunks = 0
    for begin in range(start, len(tokens), chunk):
        padded, length = engine.pad(tokens[begin : begin + chunk])
        inputs = dict(params=params, existing_prefix=prefix, padded_tokens=padded, true_length=length)
        if adapter is not None:
            inputs["adapter"] = adapter
        if num_samples > 1 and begin + chunk >= len(tokens):
            prefix, _ = engine.prefill_multisampling(**inputs, num_samples=num_samples, sampling=sampling, rng=rng)
        else:
            prefix, _ = engine.prefill(**inputs, sampling=sampling or GREEDY, rng=rng)
        chunks += 1
        if cache is not None and length == chunk:
            cache.store(tokens[: begin + chunk], prefix, params=params, adapter=adapter)
    return prefix, chunks, start


def identity(engine: Engine) -> tuple:
    """What makes two engines' KV interchangeable: the model (with its KV-cache dtype), the cache
    shapes, the layer layout, the adapters, the attention kernels and the mesh."""
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(engine.abstract_prefill_cache))
    mesh = (tuple(engine.mesh.axis_names), tuple(d.id for d in engine.mesh.devices.flat))
    kernels = engine.model_options["attention_kernels"]
    return (engine.config, engine.max_target_length, engine.max_prefill_length, shapes, engine.scan_layers,
            engine.adapters, kernels, mesh)  # fmt: skip


def snapshot_nbytes(engine: Engine) -> int:
    """Bytes of one stored prefix: its whole batch-1 cache, every layer."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(engine.abstract_prefill_cache))


def _budget(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of megabytes, got {value!r}")
    return int(value * MB)
