"""Will it fit (``workbench.memory``): host bytes of sharded arrays, the free memory read from
/proc/meminfo and a cgroup, and the one-line errors of a checkpoint or a KV cache too large for
it -- raised before anything is read or allocated (the free memory faked, nothing allocated)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import workbench
from helpers import SHAPE, SMALL, engine_for, lively_arrays, write_hf
from workbench import memory
from workbench.checkpoints import placement


def test_host_bytes_count_every_cpu_device_copy():
    mesh = workbench.make_mesh({"data": 2, "tensor": 4})
    abstract = {
        "split": jax.ShapeDtypeStruct((8, 16), jnp.float32),
        "copied": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16),
    }
    shardings = {"split": NamedSharding(mesh, P(None, "tensor")), "copied": NamedSharding(mesh, P())}
    # split: 8 devices each hold [8, 4] float32 (128 bytes; the data axis repeats them);
    # copied: 8 replicas of 256 bytes
    assert memory.bytes_by_leaf(abstract, shardings) == {"split": 8 * 128, "copied": 8 * 256}
    assert memory.host_bytes(abstract, shardings) == 3072


def test_available_bytes_reads_meminfo_and_a_cgroup_limit(tmp_path, monkeypatch):
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    assert memory.available_bytes() is None  # nothing to read: nothing is checked
    meminfo.write_text("MemTotal:       8000 kB\nMemFree:        1000 kB\nMemAvailable:   2000 kB\n")
    assert memory.available_bytes() == 2_048_000
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_bytes() == 2_048_000
    (cgroup / "memory.max").write_text("1500000\n")
    (cgroup / "memory.current").write_text("500000\n")
    assert memory.available_bytes() == 1_000_000  # a container's limit is nearer


def test_too_large_a_checkpoint_or_kv_cache_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    path = write_hf(tmp_path / "hf", SMALL, lively_arrays(engine_for(SMALL, {"data": 1})))

    def unread(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(placement, "read_region", unread)
    monkeypatch.setattr(memory, "available_bytes", lambda: 60_000)
    # by hand: SMALL has 21,664 float32 params (86.7 kB); its KV caches (2 layers x k, v x 32 positions
    # x 2 kv heads x 8 x 4 bytes a slot) are 16.4 kB for the 2 decode slots and 8.2 kB for the prefill
    # slot; the largest weight in flight is the [96, 32] embedding (12.3 kB)
    pattern = (
        rf"checkpoint '{re.escape(str(path))}' needs 123.5 kB of memory on this host "
        r"\(86.7 kB weights \+ 24.6 kB KV cache \+ 12.3 kB the tensor in flight\) "
        r"but only 60.0 kB is available: serve it smaller"
    )
    with pytest.raises(ValueError, match=pattern):
        workbench.load(path, mesh={"data": 1}, **SHAPE)
    # 8 slots x 4096 positions: 8.39 MB decode cache + 1.05 MB prefill cache
    refused = r"^a KV cache of 8 slots x 4096 positions x 2 layers needs 9.4 MB of memory on this host but only 60.0 kB"
    with pytest.raises(ValueError, match=refused + " is available: lower max_target_length"):
        workbench.Engine(SMALL, workbench.make_mesh({"data": 1}), decode_batch_size=8, max_target_length=4096)
