"""Where a decode state's, a prefix's or a cache dict's per-layer KV caches are: :func:`kv_source`
finds them (scanned layers shown per layer, int8 caches dequantized, a ring's held positions beside
its keys) and checks their shapes, for the KV-cache report (``kv_report.py``) and its diff
(``kv_diff.py``)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from workbench.checks import check_not_donated
from workbench.distributed import host_value
from workbench.engine import DecodeState, Prefix
from workbench.model import quant
from workbench.model.scan import is_stacked, unstack_layers
from workbench.trees import leaf_paths


@dataclasses.dataclass(frozen=True)
class KVSource:
    """The caches of one decode state / prefix / cache dict, layer by layer."""

    kind: str  # "decode state", "prefix" or "cache"
    paths: tuple[str, ...]  # per layer: "layers/0/attn/cache"
    keys: tuple[Any, ...]  # per layer: [B, S, K, H] (a ring: S = its window)
    values: tuple[Any, ...]
    next_positions: np.ndarray | None  # [B]: where each slot's next K/V goes
    active: np.ndarray | None  # [B]
    helds: tuple[Any, ...] = ()  # per layer: a ring's held [B, W] (model/ring.py), None for a full cache

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """B, S, K, H; S: the longest layer's length."""
        b, _, k, h = self.keys[0].shape
        return b, max(x.shape[1] for x in self.keys), k, h

    @property
    def rings(self) -> bool:
        return any(h is not None for h in self.helds)


def _layer_number(path: str, order: int) -> int:
    match = re.search(r"(?:^|/)(\d+)(?:/|$)", path)
    return int(match.group(1)) if match else order


def kv_source(obj: Any, *, role: str = "input") -> KVSource:
    """The per-layer k/v arrays of a DecodeState, Prefix or pure cache dict (snapshots too)."""
    if isinstance(obj, DecodeState):
        kind, cache = "decode state", obj.cache
    elif isinstance(obj, Prefix):
        kind, cache = "prefix", obj.cache
    elif isinstance(obj, dict):
        kind, cache = "cache", obj
    else:
        raise TypeError(f"{role} must be a DecodeState, a Prefix or a cache dict, got {type(obj).__name__}")
    if is_stacked(cache):  # scanned layers, [L, B, S, K, H]: shown per layer, as an unrolled cache is
        for leaf in leaf_paths(cache).values():
            check_not_donated(leaf, f"the {role}'s cache")
        cache = unstack_layers(cache)
    pairs: dict[str, dict[str, Any]] = {}
    for path, leaf in leaf_paths(cache).items():
        check_not_donated(leaf, f"the {role}'s cache")
        head, _, name = path.rpartition("/")
        if name in ("k", "v", "k_scale", "v_scale", "held"):  # int8 scales; a ring's held positions
            pairs.setdefault(head, {})[name] = leaf
    if not pairs or any(not {"k", "v"} <= set(kv) for kv in pairs.values()):
        raise ValueError(f"the {role} holds no per-layer KV cache (expected '.../k' and '.../v' arrays per layer)")
    helds = {head: kv.get("held") for head, kv in pairs.items()}
    pairs = {head: quant.dequantized_cache(kv) for head, kv in pairs.items()}  # int8: shown dequantized
    order = sorted(pairs, key=lambda p: _layer_number(p, list(pairs).index(p)))
    keys, values = tuple(pairs[p]["k"] for p in order), tuple(pairs[p]["v"] for p in order)
    shapes = [tuple(np.shape(x)) for x in keys + values]
    if any(len(s) != 4 for s in shapes) or len({(s[0], *s[2:]) for s in shapes}) != 1:
        raise ValueError(
            f"the {role}'s k/v caches must all be [slots, positions, kv_heads, head_dim], got {sorted(set(shapes))}"
        )
    for p in order:  # a ring's held [B, W] matches its k
        if helds[p] is not None and tuple(np.shape(helds[p])) != tuple(np.shape(pairs[p]["k"]))[:2]:
            raise ValueError(
                f"the {role}'s ring at {p} holds {np.shape(helds[p])} positions for k {np.shape(pairs[p]['k'])}"
            )
    next_positions = active = None
    if kind == "decode state":
        next_positions, active = host_value(obj.positions).astype(int), host_value(obj.active).astype(bool)
    elif kind == "prefix":
        next_positions = host_value(obj.length).astype(int).reshape(1)
    return KVSource(kind, tuple(order), keys, values, next_positions, active, tuple(helds[p] for p in order))
