"""inspect.state: rows per leaf of params, cache and rest, checked against the arrays themselves."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench import inspect
from workbench.trees import leaf_paths


@pytest.fixture(scope="module")
def decode_state(engine, params):
    padded, n = engine.pad([72, 101, 108, 108, 111])
    prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n)
    return engine.insert(prefix, engine.init_decode_state(), 1)


def true_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_twin(tree):
    """The same tree with every array replaced by a ShapeDtypeStruct carrying its sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.mark.parametrize("with_decode_state", [False, True])
def test_rows_cover_every_leaf_and_totals_are_true_byte_counts(engine, params, decode_state, with_decode_state):
    report = inspect.state(engine, params, decode_state if with_decode_state else None)
    rows = report.to_rows()
    cache = decode_state.cache if with_decode_state else engine.abstract_prefill_cache
    trees = {"params": params, "cache": cache, "rest": engine.rest}
    if with_decode_state:
        trees["decode"] = decode_state.replace(cache={})
    assert list(report.totals) == list(trees)
    for collection, tree in trees.items():
        mine = [r for r in rows if r["collection"] == collection]
        assert {r["path"] for r in mine} == set(leaf_paths(tree)), collection
        assert sum(r["bytes"] for r in mine) == true_bytes(tree), collection
        assert report.totals[collection]["bytes"] == true_bytes(tree)
        assert report.totals[collection]["arrays"] == len(jax.tree.leaves(tree))
    for row in rows:
        assert {"path", "shape", "dtype", "bytes"} <= set(row)
        if not row["dtype"].startswith("key"):  # numpy has no PRNG key dtype
            assert row["bytes"] == int(np.prod(row["shape"])) * np.dtype(row["dtype"]).itemsize


def test_declared_axes_specs_and_placement_match_the_arrays(engine, params, decode_state):
    report = inspect.state(engine, params, decode_state)
    rows = {(r["collection"], r["path"]): r for r in report.to_rows()}
    embedding = rows[("params", "embed/embedding")]
    assert embedding["type"] == "Param" and embedding["axes"] == ("vocab", "embed")
    assert embedding["declared_spec"] == "(tensor, fsdp)"  # the rules table
    assert embedding["spec"] == "(tensor, -)"  # on this mesh fsdp has size 1
    assert rows[("cache", "layers/0/attn/cache/k")]["spec"] == "(data, -, tensor, -)"
    assert rows[("rest", "rope/inv_freq")]["type"] == "Variable"
    assert report.mismatches == ()
    arrays = {("params", p): x for p, x in leaf_paths(params).items()}
    arrays.update({("cache", p): x for p, x in leaf_paths(decode_state.cache).items()})
    for key, array in arrays.items():
        row = rows[key]
        assert row["mismatch"] is False
        assert row["devices"] == tuple(sorted(d.id for d in array.sharding.device_set))
        # Replication counted independently: the replica ids of the addressable shards.
        assert row["replication"] == 1 + max(s.replica_id for s in array.addressable_shards)
        for shard in array.addressable_shards:
            size = int(np.prod([len(range(*i.indices(d))) for i, d in zip(shard.index, array.shape)]))
            assert row["bytes_per_device"][shard.device.id] == size * array.dtype.itemsize


def test_prefill_cache_rows_are_abstract(engine, params):
    rows = [r for r in inspect.state(engine, params).to_rows() if r["collection"] == "cache"]
    assert rows and all(r["mismatch"] is None and r["actual_spec"] is None for r in rows)
    assert all(r["shape"][0] == 1 and r["spec"] == "(-, -, tensor, -)" for r in rows)  # batch 1: no data split


def test_metadata_only_under_the_transfer_guard(engine, params, decode_state):
    with jax.transfer_guard("disallow"):
        report = inspect.state(engine, params, decode_state)
        text, page = str(report), report._repr_html_()
    # On CPU the guard cannot catch a device-to-host read; arrays with no values can: a tree of
    # ShapeDtypeStructs with the same shardings must give exactly the same report.
    twin = inspect.state(engine, abstract_twin(params), abstract_twin(decode_state))
    assert twin.to_rows() == report.to_rows() and str(twin) == text
    assert "<table" in page and "embed/embedding" in page


def test_mismatch_flag_fires_on_a_mis_sharded_leaf(engine, params):
    pure = nnx.to_pure_dict(params)
    pure["embed"]["embedding"] = jax.device_put(pure["embed"]["embedding"], NamedSharding(engine.mesh, P()))
    pure["final_norm"]["scale"] = jax.device_put(pure["final_norm"]["scale"], jax.devices()[3])
    report = inspect.state(engine, pure)
    assert report.mismatches == ("params/embed/embedding", "params/final_norm/scale")
    rows = {r["path"]: r for r in report.to_rows() if r["collection"] == "params"}
    assert rows["embed/embedding"]["actual_spec"] == "(-, -)" and rows["embed/embedding"]["replication"] == 8
    assert rows["final_norm/scale"]["actual_spec"] == "device 3" and rows["final_norm/scale"]["devices"] == (3,)
    text = str(report)
    assert text.count("MISMATCH") == 2
    assert "mismatches: params/embed/embedding, params/final_norm/scale" in text


def test_text_is_aligned_and_deterministic(engine, params, decode_state):
    text = str(inspect.state(engine, params, decode_state))
    assert text == str(inspect.state(engine, params, decode_state)) == repr(inspect.state(engine, params, decode_state))
    assert not re.search(r"0x[0-9a-f]+", text)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("collection  path"))
    shape_at, bytes_end = lines[header].index("shape"), lines[header].index("bytes") + len("bytes")
    for line in lines[header + 2 :]:
        if not line:
            break
        assert line[shape_at] == "[", line
        assert line[bytes_end - 1].isdigit() and line[bytes_end] == " ", line


def test_to_tree_nests_rows_by_collection_and_path(engine, params):
    tree = inspect.state(engine, params).to_tree()
    assert tree["params"]["layers"]["0"]["attn"]["q"]["shape"] == (128, 8, 16)
    assert tree["rest"]["rope"]["inv_freq"]["type"] == "Variable"


def test_bad_input_is_named(engine, params, decode_state):
    with pytest.raises(TypeError, match="workbench Engine"):
        inspect.state(object(), params)
    with pytest.raises(TypeError, match="params must be"):
        inspect.state(engine, [1, 2])
    with pytest.raises(TypeError, match="decode_state must be"):
        inspect.state(engine, params, decode_state.cache)
    pure = nnx.to_pure_dict(params)
    pure["embed"]["embedding"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="embed/embedding has shape"):
        inspect.state(engine, pure)
    del pure["embed"]
    with pytest.raises(ValueError, match="embed/embedding is missing"):
        inspect.state(engine, pure)
    donated = engine.init_decode_state()
    engine.generate(params, donated)
    with pytest.raises(ValueError, match="donated"):
        inspect.state(engine, params, donated)


def test_the_engine_never_imports_the_inspectors():
    # (treescope is left out of the check: flax itself imports it.)
    code = (
        "import sys, workbench, workbench.engine, workbench.load;"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('matplotlib', 'ipywidgets') or m.startswith(('workbench.inspect', 'workbench.widgets',"
        " 'workbench.notebook'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
