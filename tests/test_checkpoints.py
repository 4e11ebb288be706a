"""Checkpoints: orbax round trips across meshes, and Hugging Face import against hand-written layouts.

The HF side here needs no torch: ``write_hf`` lays our params out as HF tensors with explicit
numpy reshapes (an independent statement of the layouts), and loading must give them back.
Parity with transformers itself is tests/test_hf_parity.py.
"""

import importlib
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import workbench
from helpers import SHAPE, SMALL, engine_for, hf_config, hf_tensors, lively_params, pure_numpy, write_hf
from workbench.checkpoints import ByteTokenizer, config_from_hf, placement, read_hf_config, save_checkpoint
from workbench.checkpoints.hf_write import hf_config_dict, save_hf_checkpoint
from workbench.checkpoints.safetensors_files import NUMPY_DTYPES, Scratch, read_header, write_tensors
from workbench.model import quant
from workbench.trees import leaf_paths


def assert_bit_exact(actual, expected):
    actual, expected = leaf_paths(actual), leaf_paths(expected)
    assert actual.keys() == expected.keys()
    for path in expected:
        assert np.asarray(actual[path]).dtype == np.asarray(expected[path]).dtype, path
        assert np.array_equal(np.asarray(actual[path]), np.asarray(expected[path])), path


# ---- orbax ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Lively tiny() params saved from a data=1,tensor=8 mesh."""
    engine = engine_for(workbench.ModelConfig.tiny(), {"data": 1, "tensor": 8})
    params = lively_params(engine)
    path = save_checkpoint(
        tmp_path_factory.mktemp("orbax") / "ckpt",
        engine.config,
        params,
        tokenizer=ByteTokenizer.for_config(engine.config),
    )
    return path, pure_numpy(params)


@pytest.mark.parametrize("mesh", [{"data": 2, "tensor": 2}, "one device"])
def test_orbax_round_trip_is_bit_exact_across_meshes(saved, devices, mesh):
    path, expected = saved
    mesh = workbench.make_mesh({"data": 1}, devices[:1]) if mesh == "one device" else mesh
    engine, params = workbench.load(path, mesh=mesh, **SHAPE)
    assert_bit_exact(nnx.to_pure_dict(params), expected)
    shardings = leaf_paths(engine.param_shardings)
    for name, array in leaf_paths(params).items():
        assert array.sharding == shardings[name], name
    assert isinstance(engine.get_tokenizer(), ByteTokenizer) and engine.get_tokenizer().eos_ids == (257,)


def test_orbax_restores_into_another_dtype(saved):
    path, expected = saved
    engine, params = workbench.load(path, mesh={"data": 2, "tensor": 4}, dtype="bfloat16", **SHAPE)
    assert engine.config.param_dtype == "bfloat16"
    assert_bit_exact(nnx.to_pure_dict(params), jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected))


def test_corrupt_orbax_checkpoints(saved, tmp_path):
    path, _ = saved
    with pytest.raises(FileExistsError):
        save_checkpoint(path, workbench.ModelConfig.tiny(), {})
    (tmp_path / "no_params").mkdir()
    (tmp_path / "no_params" / "workbench.json").write_text((path / "workbench.json").read_text())
    with pytest.raises(ValueError, match="params/ is missing"):
        workbench.load(tmp_path / "no_params", **SHAPE)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "workbench.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt workbench checkpoint"):
        workbench.load(tmp_path / "junk", **SHAPE)
    manifest = json.loads((path / "workbench.json").read_text())
    manifest["model"]["num_layers"] = 5  # params/ holds 4 layers
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "params").symlink_to(path / "params")
    (mismatched / "workbench.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot restore params"):
        workbench.load(mismatched, **SHAPE)


def test_load_without_checkpoint_prefers_the_committed_default_model(saved, tmp_path, monkeypatch):
    path, expected = saved
    load_module = importlib.import_module("workbench.load")
    monkeypatch.setattr(load_module, "DEFAULT_MODEL_DIR", path)
    engine, params = workbench.load(mesh={"data": 2}, **SHAPE)
    assert_bit_exact(nnx.to_pure_dict(params), expected)
    monkeypatch.setattr(load_module, "DEFAULT_MODEL_DIR", tmp_path / "not_trained_yet")
    engine, params = workbench.load(mesh={"data": 2}, seed=3, **SHAPE)
    assert_bit_exact(nnx.to_pure_dict(params), pure_numpy(engine.load_params(None, seed=3)))
    assert isinstance(engine.tokenizer, ByteTokenizer)


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        workbench.load(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        workbench.load(tmp_path / "file")
    with pytest.raises(ValueError, match="neither a workbench checkpoint"):
        workbench.load(tmp_path)
    with pytest.raises(ValueError, match="cannot be combined"):
        workbench.load(tmp_path, config=SMALL)


# ---- Hugging Face --------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["llama", "qwen2"])
def hf_case(request, tmp_path_factory):
    config = SMALL.replace(qkv_bias=request.param, tie_embeddings=request.param)
    pure = pure_numpy(lively_params(engine_for(config, {"data": 1})))
    return config, pure, write_hf(tmp_path_factory.mktemp("hf") / "model", config, pure)


def test_hf_import_loads_every_shard_in_place(hf_case, monkeypatch):
    config, expected, path = hf_case
    reads = []  # (our shape, block read)
    real_read = placement.read_region

    def counting_read(tensor, layout, index, shape):
        block = real_read(tensor, layout, index, shape)
        reads.append((shape, block))
        return block

    monkeypatch.setattr(placement, "read_region", counting_read)
    engine, params = workbench.load(path, mesh={"fsdp": 2, "tensor": 4}, **SHAPE)
    assert engine.config == config
    assert_bit_exact(nnx.to_pure_dict(params), expected)
    shardings = leaf_paths(engine.param_shardings)
    sharded = 0
    for name, array in leaf_paths(params).items():
        assert array.sharding == shardings[name], name
        sharded += array.sharding.shard_shape(array.shape) != array.shape
    assert sharded > 10, "the mesh should shard most weights"
    # Every read is one device's shard, never a whole sharded tensor; replicas share one read.
    arrays = leaf_paths(params).values()
    shard_sizes = {a.shape: int(np.prod(a.sharding.shard_shape(a.shape))) for a in arrays}
    assert all(block.size == shard_sizes[shape] for shape, block in reads)
    distinct_shards = sum(len({repr(i) for i in a.sharding.devices_indices_map(a.shape).values()}) for a in arrays)
    assert len(reads) == distinct_shards


def test_hf_import_from_several_files_and_other_dtypes(hf_case, tmp_path):
    config, expected, _ = hf_case
    bf16 = ml_dtypes.bfloat16
    sharded = write_hf(tmp_path / "sharded", config, expected, files=3)
    assert_bit_exact(nnx.to_pure_dict(workbench.load(sharded, mesh={"tensor": 2}, **SHAPE)[1]), expected)
    engine, params = workbench.load(write_hf(tmp_path / "bf16", config, expected, dtype=bf16), **SHAPE)
    # bf16 weights as saved; on the CPU they compute in float32 (workbench.load's fast mix)
    assert (engine.config.param_dtype, engine.config.dtype) == ("bfloat16", "float32")
    assert_bit_exact(nnx.to_pure_dict(params), jax.tree.map(lambda x: x.astype(bf16), expected))
    engine, params = workbench.load(write_hf(tmp_path / "f16", config, expected, dtype=np.float16), **SHAPE)
    assert engine.config.param_dtype == "float32"  # float16 widens exactly
    widened = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), expected)
    assert_bit_exact(nnx.to_pure_dict(params), widened)
    engine, params = workbench.load(sharded, dtype="bfloat16", **SHAPE)
    assert_bit_exact(nnx.to_pure_dict(params), jax.tree.map(lambda x: x.astype(bf16), expected))


def test_a_bf16_checkpoint_widens_on_the_mesh_and_quantizes_tensor_by_tensor(hf_case, tmp_path):
    """bf16 tensors served as float32 (widened after the transfer, into a sharded layout) equal the
    checkpoint's exactly; served w8a8 they equal ``quantize_params`` of the bf16 weights (each
    tensor quantized as it is placed, bit for bit the whole-model quantization)."""
    config, expected, _ = hf_case
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected)
    path = write_hf(tmp_path / "bf16", config, expected, dtype=ml_dtypes.bfloat16)
    mesh = {"fsdp": 2, "tensor": 2}
    engine, params = workbench.load(path, mesh=mesh, dtype="float32", **SHAPE)
    assert engine.config.param_dtype == "float32"
    assert_bit_exact(nnx.to_pure_dict(params), jax.tree.map(lambda x: x.astype(np.float32), bf16))
    engine, params = workbench.load(path, mesh=mesh, quantize="w8a8", **SHAPE)
    assert_bit_exact(nnx.to_pure_dict(params), quant.quantize_params(jax.tree.map(np.asarray, bf16), "w8a8"))


def test_hf_writer_round_trips_through_the_hand_written_layouts(hf_case, tmp_path):
    """``save_hf_checkpoint`` (the inverse of the loader, tensor by tensor) writes exactly the
    tensors ``helpers.hf_tensors`` states by hand, read back by safetensors' own reader, and a
    config.json that reads back as the model's config -- the 1B preset's llama3 rope included."""
    config, expected, _ = hf_case
    flat = leaf_paths(expected)
    path = save_hf_checkpoint(tmp_path / "written", config, lambda name, shape: flat[name], dtype="float32")
    tensors, want = load_file(path / "model.safetensors"), hf_tensors(config, expected)
    assert tensors.keys() == want.keys()
    assert all(tensors[name].dtype == np.float32 and np.array_equal(tensors[name], want[name]) for name in want)
    assert read_hf_config(path) == config
    llama = workbench.ModelConfig.llama3_1b()
    assert config_from_hf(hf_config_dict(llama) | {"dtype": "bfloat16"}) == llama
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(path, config, lambda name, shape: flat[name])


def test_hf_progress_bar(hf_case, capsys):
    _, _, path = hf_case
    workbench.load(path, progress=True, **SHAPE)
    assert "loading model" in capsys.readouterr().err
    workbench.load(path, **SHAPE)  # small: quiet by default
    assert capsys.readouterr().err == ""


def test_hf_config_features():
    llama3 = config_from_hf(
        hf_config(
            SMALL,
            "bfloat16",
            rope_theta=500000.0,
            rope_scaling={  # before transformers 5
                "type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling.factor == 32.0 and llama3.dtype == "bfloat16"
    mistral = config_from_hf(hf_config(SMALL, architectures=["MistralForCausalLM"], sliding_window=8))
    assert mistral.sliding_window == 8 and not mistral.qkv_bias
    qwen = dict(hf_config(SMALL.replace(qkv_bias=True)), sliding_window=8, max_window_layers=0)
    assert config_from_hf(qwen).sliding_window is None  # use_sliding_window is off
    assert config_from_hf(qwen | {"use_sliding_window": True}).sliding_window == 8
    assert config_from_hf(qwen | {"use_sliding_window": True, "max_window_layers": 2}).sliding_window is None
    mixed = config_from_hf(qwen | {"use_sliding_window": True, "max_window_layers": 1})  # windows from layer 1 on
    assert mixed.layer_types == ("full_attention", "sliding_attention") and mixed.window(1) == 8
    generation = config_from_hf(hf_config(SMALL, eos_token_id=7, pad_token_id=None))
    assert generation.eos_ids == (7,) and generation.pad_id == 0


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"architectures": ["DeepseekV3ForCausalLM"]}, "DeepseekV3ForCausalLM"),
        ({"architectures": None, "model_type": "gemma"}, "gemma"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_local_experts": 8}, "mixture of experts"),
        ({"quantization_config": {"quant_method": "gptq"}}, "gptq"),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 8,
                "layer_types": ["full_attention", "chunked_attention"],
            },
            "layer_types entry 'chunked_attention'",
        ),
        ({"torch_dtype": "int8"}, "dtype 'int8'"),
    ],
)
def test_hf_unsupported_features_are_named(changes, named):
    with pytest.raises(ValueError, match=f"unsupported.*{named}"):
        config_from_hf(hf_config(SMALL, **changes))


def test_hf_tensor_problems(hf_case, tmp_path):
    config, pure, path = hf_case
    with pytest.raises(ValueError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        workbench.load(write_hf(tmp_path / "a", config, pure, drop=["model.layers.1.mlp.up_proj.weight"]), **SHAPE)
    bias = {"model.layers.0.self_attn.o_proj.bias": np.zeros(config.embed_dim, np.float32)}
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.o_proj.bias"):
        workbench.load(write_hf(tmp_path / "b", config, pure, extra=bias), **SHAPE)
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(48, 32\) but config.json implies \(40, 32\)"):
        workbench.load(write_hf(tmp_path / "c", config, pure, intermediate_size=40), **SHAPE)
    truncated = write_hf(tmp_path / "d", config, pure)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt Hugging Face checkpoint"):
        workbench.load(truncated, **SHAPE)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors"):
        workbench.load(tmp_path / "e", **SHAPE)
    (tmp_path / "e" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt Hugging Face checkpoint"):
        workbench.load(tmp_path / "e", **SHAPE)


@pytest.mark.parametrize("stored", ["BF16", "F16"])
def test_widening_equals_numpy_bit_for_bit(stored, devices, tmp_path, monkeypatch):
    """A half-precision tensor widened to float32 and laid out by the jitted program
    (``placement._widen_on_device``, sharded over two devices) holds numpy's cast of the transposed
    tensor bit for bit, and so does one widened on the host (``placement._widen_rows``): signed zeros,
    subnormals, infinities, NaN and the extremes included."""
    dtype = NUMPY_DTYPES[stored]
    info = ml_dtypes.finfo(dtype)
    special = [0.0, -0.0, info.smallest_subnormal, -info.tiny, info.max, -info.max, np.inf, -np.inf, np.nan, 1.0]
    values = np.random.default_rng(0).standard_normal((6, 8)).astype(dtype)
    values.reshape(-1)[: len(special)] = np.array(special, np.float32).astype(dtype)
    write_tensors(tmp_path / "t.safetensors", {"w": values.shape}, stored, lambda name: values)
    tensor = read_header(tmp_path / "t.safetensors")["w"]
    mesh = Mesh(np.array(devices[:2]), ("tensor",))
    sharding = NamedSharding(mesh, P(None, "tensor"))  # ours [8, 6], its second axis split
    layout = placement.Layout("w", ((6,), (8,)), (1, 0))
    widened = placement._widen_on_device(tensor, layout, (8, 6), np.dtype(np.float32), sharding, Scratch())
    assert widened.sharding == sharding and widened.dtype == np.float32
    expected = values.T.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(widened).view(np.uint32), expected.view(np.uint32))
    # a tensor laid out as ours already is widened on the host, in bands of rows (here 1 row)
    monkeypatch.setattr(placement, "_BAND_BYTES", 1)
    as_is = placement.Layout("w", ((6,), (8,)), (0, 1))
    sharding = NamedSharding(mesh, P("tensor", None))
    widened = placement.place(tensor, as_is, jax.ShapeDtypeStruct((6, 8), np.float32), sharding, Scratch())
    assert widened.sharding == sharding
    np.testing.assert_array_equal(np.asarray(widened).view(np.uint32), values.astype(np.float32).view(np.uint32))
