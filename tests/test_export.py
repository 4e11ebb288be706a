"""``export_hf`` and ``python -m workbench export`` on a small random Llama built by transformers:
the written checkpoint loads in transformers to our logits (1e-5 relative); an adapter merged by
the CLI gives peft's logits; quantized params are written dequantized and say so; a config no
architecture computes is refused; Mistral and Qwen2 params export as those architectures. (Gemma 2,
Gemma 3 and Qwen3 round trips: tests/test_families.py.)"""

import copy
import json
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import workbench
from helpers import SMALL, assert_close, hf_tensors
from workbench.checkpoints import export_hf
from workbench.checkpoints.export import hf_config_dict
from workbench.cli import main
from workbench.model import quant

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations
SHAPE = dict(mesh={"data": 2, "tensor": 2}, decode_batch_size=2, max_prefill_length=16, max_target_length=32)
TOKENS = [[5, 17, 60, 3, 44, 9, 71, 2, 30, 30, 8, 91]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(root, the torch model, the peft model over it): base/ and adapter/ written under root."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    # fmt: off
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", initializer_range=0.3,
        rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    # fmt: on
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.normal_(1.0, 0.3)
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapted = get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.3)
    adapted.save_pretrained(root / "adapter")
    return root, model, adapted.eval()


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_export_loads_in_transformers_to_our_logits(llama, tmp_path):
    root, _, _ = llama
    engine, params = workbench.load(root / "base", **SHAPE)
    export_hf(engine, params, tmp_path / "out")
    assert (
        load_file(tmp_path / "out" / "model.safetensors").keys()
        == load_file(root / "base" / "model.safetensors").keys()
    )
    for name, tensor in load_file(root / "base" / "model.safetensors").items():
        np.testing.assert_array_equal(load_file(tmp_path / "out" / "model.safetensors")[name], tensor, err_msg=name)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(exported) is LlamaForCausalLM
    ours = np.asarray(engine.forward(params, np.asarray(TOKENS, np.int32)))
    assert_close(torch_logits(exported), ours, rtol=1e-5)


def test_cli_merges_an_adapter_into_peft_logits(llama, tmp_path, capsys):
    root, _, adapted = llama
    out = tmp_path / "merged"
    assert (
        main(["export", "--checkpoint", str(root / "base"), "--out", str(out), "--adapter", str(root / "adapter")]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_close(torch_logits(merged), torch_logits(adapted), rtol=1e-5)
    capsys.readouterr()  # transformers' progress bars
    assert main(["export", "--checkpoint", str(root / "base"), "--out", str(out)]) == 2  # never over a checkpoint
    assert capsys.readouterr().err == f"error: --out {out} exists and is not empty\n"


def test_quantized_params_export_dequantized(llama, tmp_path, capsys):
    root, _, _ = llama
    engine, params = workbench.load(root / "base", quantize="w8", **SHAPE)
    export_hf(engine, params, tmp_path / "w8")
    assert capsys.readouterr().err == "export: the w8 weights are written dequantized, as float32\n"
    assert json.loads((tmp_path / "w8" / "config.json").read_text())["dtype"] == "float32"
    dequantized = jax.tree.map(np.asarray, quant.dequantize_params(params))
    want = hf_tensors(engine.config, dequantized)  # helpers' own statement of HF's layout
    got = load_file(tmp_path / "w8" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_configs_no_architecture_computes_are_refused():
    with pytest.raises(
        ValueError, match=r"^no transformers .* as LlamaForCausalLM its norm_offset would be 0.0, not 1.0"
    ):
        hf_config_dict(SMALL.replace(norm_offset=1.0))
    with pytest.raises(ValueError, match=r"^no transformers .* as Qwen3ForCausalLM its qkv_bias would be False"):
        hf_config_dict(SMALL.replace(qk_norm=True, qkv_bias=True))


@pytest.mark.parametrize(
    "config",
    [
        SMALL.replace(sliding_window=4),  # Mistral: every layer sliding
        # Qwen2: q/k/v biases, tied embeddings, a window on the second layer only
        SMALL.replace(
            qkv_bias=True, tie_embeddings=True, sliding_window=4, layer_types=("full_attention", "sliding_attention")
        ),
    ],
    ids=["mistral", "qwen2"],
)
def test_other_families_export_as_themselves(config, tmp_path):
    """Weights drawn on the host (no engine step): transformers reads each tensor where the helpers'
    own layout puts it, and the config as the same architecture and window."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.split(nnx.eval_shape(lambda: workbench.Transformer(config, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    rng = np.random.default_rng(0)
    pure = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), nnx.to_pure_dict(abstract))
    engine = types.SimpleNamespace(config=config, adapters=(), tokenizer=None, max_target_length=32)
    export_hf(engine, pure, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == ("Qwen2ForCausalLM" if config.qkv_bias else "MistralForCausalLM")
    assert model.config.sliding_window == 4
    if config.layer_types is not None:
        assert model.config.layer_types == list(config.layer_types) and model.config.use_sliding_window
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    want = hf_tensors(config, pure)
    for name, tensor in want.items():
        np.testing.assert_array_equal(state[name], tensor, err_msg=name)
