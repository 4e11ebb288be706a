"""Will it fit? The bytes a model's arrays take on this host against the memory free, checked
before anything is allocated: a one-line error instead of the kernel's out-of-memory kill.

On the CPU every device's buffers are host memory, so what must fit is the sum, over the devices
of this process, of each array's shard there (a replicated array counts once per device: each
holds its copy). An accelerator's arrays live in its own memory, whose exhaustion XLA reports as
an error of its own, so the checks here are for CPU devices only.

Free memory is ``MemAvailable`` of ``/proc/meminfo`` (what can be had without swapping), capped
by the room left under a cgroup v2 limit (``memory.max``: a container's). Off Linux nothing is
known and nothing is checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from workbench.trees import leaf_paths

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def available_bytes() -> int | None:
    """Bytes this process can still allocate without swapping, or None where unknown."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024  # "19226284 kB"
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit in view
    return free


def host_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes the arrays of ``abstract`` (shapes and dtypes), placed in ``shardings``, take in this
    host's memory: the shards on this process's CPU devices (0 for arrays on accelerators)."""
    return sum(bytes_by_leaf(abstract, shardings).values())


def bytes_by_leaf(abstract: Any, shardings: Any) -> dict[str, int]:
    """:func:`host_bytes` of each leaf, by its path."""
    shardings = leaf_paths(shardings)
    sizes = {}
    for path, leaf in leaf_paths(abstract).items():
        sharding = shardings[path]
        devices = [d for d in sharding.addressable_devices if d.platform == "cpu"]
        shard = math.prod(sharding.shard_shape(tuple(leaf.shape)))
        sizes[path] = shard * np.dtype(leaf.dtype).itemsize * len(devices)
    return sizes


def kv_cache_bytes(engine: Any) -> int:
    """Host bytes of an engine's KV caches: the decode state's and one prefill prefix's."""
    decode = host_bytes(engine.abstract_decode_cache, engine.decode_state_shardings.cache)
    return decode + host_bytes(engine.abstract_prefill_cache, engine.prefix_shardings.cache)


def check_fits(needed: Mapping[str, int], what: str, hint: str = "") -> None:
    """ValueError when the bytes ``needed`` (named parts, say ``{"weights": ..., "KV cache": ...}``)
    exceed the memory available: one line naming ``what``, each part, and the bytes free."""
    total = sum(needed.values())
    free = available_bytes()
    if free is None or total <= free:
        return
    parts = [f"{readable(size)} {name}" for name, size in needed.items() if size]
    split = f" ({' + '.join(parts)})" if len(parts) > 1 else ""
    raise ValueError(
        f"{what} needs {readable(total)} of memory on this host{split} but only {readable(free)} is available"
        + (f": {hint}" if hint else "")
    )


def readable(size: int) -> str:
    if size >= 10**8:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 10**6 else f"{size / 1e3:.1f} kB"
