"""``export_hf`` and ``python -m workbench export`` on a small random Llama built by transformers:
the written checkpoint loads in transformers to our logits (1e-5 relative); an adapter merged by
the CLI gives peft's logits; quantized params are written dequantized and say so; a config no
architecture computes is refused; every family (Llama, Mistral, Qwen2, Gemma 2, Gemma 3, Qwen3)
exports as itself, to our logits. (Gemma 2, Gemma 3 and Qwen3 checkpoints saved by transformers,
round-tripped bit for bit: tests/test_families.py.)"""

import copy
import json
import types

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import workbench
from helpers import SMALL, assert_close, hf_tensors, host_arrays, uncached_forward
from workbench.checkpoints import export_hf
from workbench.checkpoints.export import hf_config_dict
from workbench.cli import main
from workbench.model import RopeScaling, quant

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


GEMMA = dict(norm_offset=1.0, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh", sliding_window=4)
MIXED = ("sliding_attention", "full_attention")
FAMILIES = {  # tiny configs, each binding its family's features; TOKENS (12) are longer than the windows
    "llama": SMALL.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16)),
    "mistral": SMALL.replace(sliding_window=4),  # every layer sliding
    "qwen2": SMALL.replace(qkv_bias=True, tie_embeddings=True, sliding_window=4, layer_types=MIXED[::-1]),
    "gemma2": SMALL.replace(
        **GEMMA, layer_types=MIXED, query_pre_attn_scalar=10, attn_logit_softcap=2.0, final_logit_softcap=4.0
    ),
    "gemma3": SMALL.replace(
        **GEMMA,
        layer_types=MIXED,
        qk_norm=True,
        query_pre_attn_scalar=24,
        local_rope_theta=100.0,
        rope_scaling=RopeScaling(factor=4.0, rope_type="linear"),
    ),
    "qwen3": SMALL.replace(qk_norm=True, tie_embeddings=True, rope_theta=1000.0),
}
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma2": "Gemma2", "gemma3": "Gemma3"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_to_our_logits(family, tmp_path):
    """Lively weights drawn on the host, our uncached forward (one jit, no engine) against
    transformers' on the exported checkpoint (eager attention), 1e-5 relative; for the families
    laid out like Llama, every tensor where the helpers' own layout puts it."""
    config = FAMILIES[family]
    pure = host_arrays(config)
    engine = types.SimpleNamespace(config=config, adapters=(), tokenizer=None, max_target_length=32)
    export_hf(engine, pure, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == ARCHITECTURES.get(family, "Qwen3") + "ForCausalLM"
    if config.sliding_window is not None:
        assert model.config.sliding_window == 4
    if config.layer_types is not None:
        assert model.config.layer_types == list(config.layer_types)
    if not config.post_norms:  # Gemma's norms take other names (test_families checks them bit for bit)
        state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
        for name, tensor in hf_tensors(config, pure).items():
            np.testing.assert_array_equal(state[name], tensor, err_msg=name)
    ours = uncached_forward(config, pure, TOKENS)
    assert_close(torch_logits(model), ours, rtol=1e-5)
