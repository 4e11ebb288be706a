"""The rules table and the shardings derived from it."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

import workbench
from workbench import sharding as shd


def test_logical_to_spec_follows_the_rules_and_replicates_what_does_not_divide():
    mesh = workbench.make_mesh({"data": 2, "tensor": 4})
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (128, 8, 16), mesh) == P(None, "tensor")
    assert shd.logical_to_spec(
        ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim"), (4, 64, 4, 16), mesh
    ) == P("data", None, "tensor")
    assert (
        shd.logical_to_spec(("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim"), (1, 64, 2, 16), mesh)
        == P()
    )
    fsdp = workbench.make_mesh({"fsdp": 2, "tensor": 4})
    assert shd.logical_to_spec(("embed", "mlp"), (128, 384), fsdp) == P("fsdp", "tensor")
    assert shd.declared_spec(("embed", "mlp")) == P("fsdp", "tensor")


def test_engine_shardings_follow_the_rules():
    engine = workbench.Engine(
        workbench.ModelConfig.tiny(),
        workbench.make_mesh({"data": 2, "tensor": 4}),
        decode_batch_size=4,
        max_prefill_length=16,
        max_target_length=32,
    )
    params = engine.load_params()
    layer = params["layers"][0]
    assert layer["attn"]["q"][...].sharding.spec == P(None, "tensor")
    assert layer["mlp"]["down"][...].sharding.spec == P("tensor")
    assert params["embed"]["embedding"][...].sharding.spec == P("tensor")
    state = engine.init_decode_state()
    k = state.layer_cache(0)["k"]
    assert k.sharding.spec == P("data", None, "tensor")
    assert k.addressable_shards[0].data.shape == (2, 32, 1, 16)


def test_make_mesh_defaults_and_errors():
    mesh = workbench.make_mesh()
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    assert workbench.make_mesh(mesh) is mesh
    with pytest.raises(ValueError, match="positive integer"):
        workbench.make_mesh({"data": 0})
