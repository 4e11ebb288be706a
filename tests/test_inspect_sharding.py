"""inspect.sharding: per leaf and per device, checked against each array's addressable shards."""

import io
import re

import jax
import matplotlib
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import workbench
from workbench import inspect
from workbench.trees import leaf_paths

matplotlib.use("Agg")


def shard_bytes(array) -> dict[int, int]:
    """Bytes each device holds, from the array's own shards (their index slices)."""
    out = {}
    for shard in array.addressable_shards:
        size = int(np.prod([len(range(*i.indices(d))) for i, d in zip(shard.index, array.shape)]))
        out[shard.device.id] = size * array.dtype.itemsize
    return out


@pytest.mark.parametrize("which", ["params", "decode_state"])
def test_leaves_and_devices_match_the_shards(engine, params, which):
    tree = params if which == "params" else engine.init_decode_state()
    report = inspect.sharding(tree)
    arrays = leaf_paths(tree)
    rows = {r["path"]: r for r in report.to_rows()}
    assert set(rows) == set(arrays)
    assert sum(r["bytes"] for r in rows.values()) == sum(x.size * x.dtype.itemsize for x in arrays.values())
    for path, array in arrays.items():
        row = rows[path]
        assert row["bytes_per_device"] == shard_bytes(array), path
        assert row["shard_shape"] == array.addressable_shards[0].data.shape, path
        assert row["replication"] == 1 + max(s.replica_id for s in array.addressable_shards), path
        assert row["shards"] * row["replication"] == len(array.sharding.device_set), path
    per_device = {r["device"]: r["bytes"] for r in report.per_device}
    for device in jax.devices()[:8]:
        assert per_device[device.id] == sum(shard_bytes(x).get(device.id, 0) for x in arrays.values())
    assert [r["coords"] for r in report.per_device][:2] == ["data=0 tensor=0", "data=0 tensor=1"]


def test_metadata_only_under_the_transfer_guard(params):
    with jax.transfer_guard("disallow"):
        report = inspect.sharding(params)
        text, page, grid = str(report), report._repr_html_(), report.grid("embed/embedding")
    twin = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    assert inspect.sharding(twin).to_rows() == report.to_rows() and str(inspect.sharding(twin)) == text
    assert "<table" in page and not re.search(r"0x[0-9a-f]+", text + page + grid)


def test_grid_names_each_devices_slice(engine, params):
    embedding = params["embed"]["embedding"][...]  # [384, 128] split over tensor, replicated over data
    lines = inspect.sharding(params).grid("embed/embedding").splitlines()
    assert lines[1].split() == ["tensor=0", "tensor=1", "tensor=2", "tensor=3"]
    cells = {int(d): text for d, text in re.findall(r"d(\d+) \[([^\]]*)\]", "\n".join(lines[2:]))}
    for shard in embedding.addressable_shards:
        rows = shard.index[0]
        assert cells[shard.device.id] == f"{rows.start}:{rows.stop}, :"
    assert lines[2].startswith("data=0") and lines[3].startswith("data=1")


def test_single_array_on_one_device_with_the_mesh_given(engine):
    array = jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), jax.devices()[3])
    report = inspect.sharding(array, mesh=engine.mesh)
    (row,) = report.to_rows()
    assert row["spec"] == "device 3" and row["bytes_per_device"] == {3: 48}
    assert [r["bytes"] for r in report.per_device] == [0, 0, 0, 48, 0, 0, 0, 0]
    assert "d3 [:, :]" in report.grid() and "d0 -" in report.grid()


def test_plots_render_with_agg(engine, params):
    report = inspect.sharding(params)
    bars = report.plot()
    (ax,) = bars.axes
    assert ax.get_xlabel() == "device" and ax.get_ylabel() == "bytes (KiB)"
    heights = [p.get_height() * 1024 for p in ax.patches]
    assert heights == pytest.approx([r["bytes"] for r in report.per_device])
    grid = report.plot("layers/0/attn/q")
    (ax,) = grid.axes
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 8 and texts[5].startswith("d5\n[:, 2:4, :]")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["data=0", "data=1"]
    assert "layers/0/attn/q" in ax.get_title()
    for fig in (bars, grid):
        fig.savefig(io.BytesIO(), format="png")


def test_bad_input_is_named(engine, params):
    with pytest.raises(TypeError, match="w is a ndarray"):
        inspect.sharding({"w": np.zeros(3)})
    with pytest.raises(TypeError, match="mesh must be"):
        inspect.sharding(params, mesh={"data": 2})
    with pytest.raises(ValueError, match="no arrays"):
        inspect.sharding({})
    with pytest.raises(ValueError, match="no leaf 'nope'"):
        inspect.sharding(params).grid("nope")
    with pytest.raises(ValueError, match="name a leaf"):
        inspect.sharding(params).grid()
    other = workbench.make_mesh({"data": 2}, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="not in the mesh"):
        inspect.sharding(jax.device_put(np.zeros(8), NamedSharding(engine.mesh, P("data"))), mesh=other)
    donated = engine.init_decode_state()
    engine.free_resource(0, donated)
    with pytest.raises(ValueError, match="donated"):
        inspect.sharding(donated)
