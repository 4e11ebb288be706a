"""Gemma 2, Gemma 3 (text) and Qwen3 against Hugging Face transformers (torch CPU, float32, eager
attention) on small random checkpoints built and saved by transformers itself.

Each family's features are made to bind: norm weights random around 0 (Gemma's ``1 + w``) or 1,
soft-caps small enough to cut (Gemma 2), a query scale other than head_dim, head_dim other than
width / heads, sliding windows shorter than the prompts with sliding and global layers mixed, and
for Gemma 3 a linearly scaled global rope beside a local rope of another base. Several prompts
share fewer decode slots than requests on a data=2,tensor=2 mesh, the long ones prefilled in
chunks: greedy tokens must equal transformers' ``generate`` and every logits row (the prefill's
and each decode step's) must be within 1e-4 of an uncached transformers forward pass, relative
to the row's largest logit. One more request runs a PEFT LoRA adapter (all seven projections)
beside them and is held to peft the same way. Exported back (``export_hf``), the tensors are the checkpoint's bit
for bit and transformers reads the config as the same model (logits within 1e-5).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import workbench
from workbench.checkpoints import config_from_hf, export_hf
from workbench.engine.scheduler import Scheduler
from workbench.model import kernels

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations
VOCAB, NEW_TOKENS, WINDOW = 128, 6, 5
# head_dim 16 with width 32 and 4 heads: head_dim independent of width / heads
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=256,
    initializer_range=0.3,  # 0.02 makes a random model repeat one token: the comparison would be weak
    attn_implementation="eager",
)
SLIDING, FULL = "sliding_attention", "full_attention"
FAMILIES = {
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(
            num_hidden_layers=2,
            layer_types=[SLIDING, FULL],
            sliding_window=WINDOW,
            tie_word_embeddings=False,  # tied, sqrt(D)-scaled embeddings make a tiny random model echo its input
            query_pre_attn_scalar=10,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            num_hidden_layers=2,
            layer_types=[FULL, SLIDING],
            sliding_window=WINDOW,
            tie_word_embeddings=False,
            query_pre_attn_scalar=24,
            rope_parameters={
                FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
                SLIDING: {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(num_hidden_layers=2, tie_word_embeddings=True, rope_parameters={"rope_theta": 1000.0}),
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist() for seed, n in enumerate((3, 13, 22))]
ENGINE = dict(mesh={"data": 2, "tensor": 2}, decode_batch_size=2, max_prefill_length=8, max_target_length=64)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(HF directory, the torch model, a PEFT adapter's directory, the peft model holding it)."""
    config_class, model_class, changes = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **changes)).eval()
    offset = request.param.startswith("gemma")  # Gemma norms compute x * (1 + w): w around 0 there
    with torch.no_grad():  # HF starts norms at 0 (Gemma) or 1: randomise them so they are checked too
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.normal_(0.0 if offset else 1.0, 0.5)
    model.generation_config.eos_token_id = None  # compare NEW_TOKENS tokens, EOS or not
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path / "base")
    adapted = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    with torch.no_grad():  # peft's random B is small; make the adapter change the tokens
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.3)
    adapted.save_pretrained(path / "adapter")
    return path, model, path / "adapter", adapted.eval()


def reference(model, prompt):
    """transformers' (or peft's) greedy tokens, and the uncached forward's logits rows they were chosen from."""
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = generated[0, len(prompt) :].tolist()
        rows = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].numpy()
    return tokens, rows


def test_generate_matches_transformers_and_exports_back(family, tmp_path):
    """Every prompt on the base model beside one more on the adapter, in one scheduler run."""
    path, model, adapter, adapted = family
    engine, params = workbench.load(path / "base", adapters={"lora": str(adapter)}, **ENGINE)
    scheduler = Scheduler(engine, params, return_logits=True)
    requests = [(prompt, None) for prompt in PROMPTS] + [(PROMPTS[1], "lora")]
    for prompt, name in requests:
        scheduler.submit(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, adapter=name)
    truths = {}
    for (prompt, name), completion in zip(requests, scheduler.run()):
        tokens, rows = truths[len(prompt), name] = reference(model if name is None else adapted, prompt)
        assert completion.tokens == tokens, f"prompt of {len(prompt)} tokens, adapter {name}"
        ours = np.asarray(completion.logits)
        assert ours.shape == rows.shape
        for step, (mine, theirs) in enumerate(zip(ours, rows)):
            error = np.abs(mine - theirs).max() / np.abs(theirs).max()
            assert error <= 1e-4, f"prompt of {len(prompt)} tokens, adapter {name}, step {step}: {error:.2e}"
    assert sum(len(set(tokens)) > 2 for tokens, _ in truths.values()) >= 3, "greedy tokens barely vary"
    assert truths[len(PROMPTS[1]), None][0] != truths[len(PROMPTS[1]), "lora"][0], "the adapter should change tokens"

    # written back: the same tensors, bit for bit, and a config transformers reads as the same model
    export_hf(engine, params, tmp_path)
    original, exported = load_file(path / "base" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(model)
    with torch.no_grad():
        tokens = torch.tensor(PROMPTS[-1:])
        want, got = model(tokens).logits.numpy(), back(tokens).logits.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_configs_map_each_feature():
    def hf(name, **changes):
        config_class, model_class, family_changes = FAMILIES[name]
        config = config_class(**COMMON, **(family_changes | changes)).to_dict()
        return config | {"architectures": [model_class.__name__]}

    gemma2 = config_from_hf(hf("gemma2"))
    assert (gemma2.norm_offset, gemma2.post_norms, gemma2.embed_scale, gemma2.qk_norm) == (1.0, True, True, False)
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.query_pre_attn_scalar) == (2.0, 4.0, 10)
    assert gemma2.layer_types == (SLIDING, FULL) and gemma2.window(0) == WINDOW and gemma2.window(1) is None
    assert gemma2.mlp_activation == "gelu_tanh" and not gemma2.tie_embeddings and gemma2.head_dim == 16
    gemma3 = config_from_hf(hf("gemma3"))
    assert gemma3.qk_norm and gemma3.attn_logit_softcap is None and gemma3.local_rope_theta == 100.0
    assert gemma3.rope_scaling.rope_type == "linear" and gemma3.rope_scaling.factor == 4.0
    assert [gemma3.layer_rope(i) for i in range(2)] == ["global", "local"]
    # the older spelling: rope_theta + rope_scaling (global), rope_local_base_freq, sliding_window_pattern
    older = {k: v for k, v in hf("gemma3").items() if k not in ("rope_parameters", "layer_types")}
    older |= dict(rope_theta=5e5, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    older = config_from_hf(older | {"num_hidden_layers": 6, "sliding_window_pattern": 3})
    assert (older.rope_theta, older.local_rope_theta, older.rope_scaling.factor) == (5e5, 1e4, 8.0)
    assert older.layer_types == (SLIDING, SLIDING, FULL) * 2
    qwen3 = config_from_hf(hf("qwen3"))
    assert qwen3.qk_norm and qwen3.norm_offset == 0.0 and not qwen3.post_norms and qwen3.mlp_activation == "silu"
    assert qwen3.sliding_window is None and qwen3.rope_theta == 1000.0 and qwen3.tie_embeddings

    bad = {
        "layer_types entry 'chunked_attention'": hf("gemma2") | {"layer_types": [SLIDING, "chunked_attention"]},
        "use_bidirectional_attention": hf("gemma3") | {"use_bidirectional_attention": True},
        "rope_parameters['full_attention'] rope_type 'yarn'": hf("gemma3")
        | {"rope_parameters": {FULL: {"rope_type": "yarn", "factor": 2.0}, SLIDING: {"rope_theta": 1e4}}},
        "rope_parameters['sliding_attention'] rope_type 'linear'": hf("gemma3")
        | {"rope_parameters": {FULL: {"rope_theta": 1e6}, SLIDING: {"rope_type": "linear", "factor": 2.0}}},
        "rope_parameters keyed by layer type": hf("qwen3") | {"rope_parameters": {FULL: {"rope_theta": 1e4}}},
        "hidden_activation 'gelu'": hf("gemma2") | {"hidden_activation": "gelu"},
    }
    for message, config in bad.items():
        with pytest.raises(ValueError, match=f"^unsupported .*{message}".replace("[", r"\[").replace("]", r"\]")):
            config_from_hf(config)


def test_presets_are_shaped_like_the_models():
    """Published sizes: Gemma-2-2B 2.61B params, Gemma-3-1B 1.00B, Qwen3-0.6B 0.60B (tied)."""
    assert round(workbench.preset("gemma2-2b").num_params() / 1e9, 2) == 2.61
    assert round(workbench.preset("gemma3-1b").num_params() / 1e9, 2) == 1.00
    assert round(workbench.preset("qwen3-0.6b").num_params() / 1e9, 2) == 0.60
    gemma3 = workbench.preset("gemma3-1b")
    assert gemma3.layer_types.count(FULL) == 4 and gemma3.layer_types[5] == FULL
    small = gemma3.replace(vocab_size=64, embed_dim=32, num_layers=6, layer_types=gemma3.layer_types[:6], mlp_dim=48)
    with nnx.use_eager_sharding(False):  # num_params counts what the model holds (sandwich and q/k norms too)
        abstract = nnx.split(nnx.eval_shape(lambda: workbench.Transformer(small, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == small.num_params()
    with pytest.raises(ValueError, match="^unknown mlp_activation 'relu'"):
        workbench.preset("qwen3-0.6b", mlp_activation="relu")
    with pytest.raises(ValueError, match="^norm_offset must be 0"):
        workbench.preset("qwen3-0.6b", norm_offset=0.5)


def test_softcap_in_the_sliced_decode_kernel():
    """Soft-capping in ``chunked_prefix`` (decode over a prefix of a cache longer than 128
    positions, which the parity test's engine never reaches) equals the reference's; its other
    kernels ran there."""
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(3 * rng.standard_normal(s), jnp.float32) for s in [(2, 1, 2, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8)]
    )
    visible = jnp.asarray(rng.random((2, 1, 9)) < 0.7)

    @jax.jit
    def run(q, k, v, visible):
        capped = kernels.reference(q, k, v, visible, jnp.float32, softcap=3.0)
        return (
            capped,
            kernels.reference(q, k, v, visible, jnp.float32),
            kernels.chunked_prefix(q, k, v, visible, jnp.float32, 3.0),
        )

    want, uncapped, got = run(q, k, v, visible)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, uncapped, atol=1e-3), "the cap should bind"
