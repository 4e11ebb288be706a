"""Mixtures of experts (``workbench.model.moe``): Mixtral and Qwen3-MoE against transformers (torch
CPU, float32, eager attention) on small random checkpoints saved by transformers itself; routing
captured and ablated on the cached path against numpy and against transformers with an expert's
router logit at -inf; both expert kernels against a numpy loop over each token's experts;
quantized experts and the int8 KV cache against the float engine; 1 device against 8.

Qwen3-MoE's checkpoint has a dense layer between sparse ones (``mlp_only_layers``), experts
narrower than the dense MLP, and ``norm_topk_prob=False``; Mixtral's renormalizes over its top k.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import workbench
from helpers import assert_close
from workbench import probes, trees
from workbench.engine.scheduler import Scheduler
from workbench.model import moe, quant

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations
VOCAB, NEW_TOKENS, EXPERTS = 96, 5, 4
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256, initializer_range=0.3,
    num_experts_per_tok=2, attn_implementation="eager",
)  # fmt: skip
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_hidden_layers=2, num_local_experts=EXPERTS)),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            num_hidden_layers=3, head_dim=16, num_experts=EXPERTS, moe_intermediate_size=24, mlp_only_layers=[1],
            norm_topk_prob=False, tie_word_embeddings=False,
        ),
    ),  # fmt: skip
}
PROMPTS = [np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist() for seed, n in enumerate((3, 11, 19))]
ENGINE = dict(mesh={"data": 2, "tensor": 2}, decode_batch_size=2, max_prefill_length=8, max_target_length=32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF directory, the torch model, our engine and params loaded from the directory)."""
    config_class, model_class, changes = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **changes)).eval()
    with torch.no_grad():  # norms start at 1 and routers at 0 (Qwen3-MoE): randomise them so they bind
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.normal_(1.0, 0.5)
            elif name.endswith("gate.weight"):
                weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    engine, params = workbench.load(path, **ENGINE)
    return request.param, path, model, engine, params


def reference(model, prompt):
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = generated[0, len(prompt) :].tolist()
        rows = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].numpy()
    return tokens, rows


def test_generate_matches_transformers(family):
    """Three prompts through two slots on data=2 x tensor=2, the long ones prefilled in chunks."""
    name, _, model, engine, params = family
    config = engine.config
    assert config.num_experts == EXPERTS and [config.sparse(i) for i in range(config.num_layers)] == (
        [True, True] if name == "mixtral" else [True, False, True]
    )
    scheduler = Scheduler(engine, params, return_logits=True)
    for prompt in PROMPTS:
        scheduler.submit(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    varied = 0
    for prompt, completion in zip(PROMPTS, scheduler.run()):
        tokens, rows = reference(model, prompt)
        assert completion.tokens == tokens, f"prompt of {len(prompt)} tokens"
        ours = np.asarray(completion.logits)
        for step, (mine, theirs) in enumerate(zip(ours, rows)):
            error = np.abs(mine - theirs).max() / np.abs(theirs).max()
            assert error <= 1e-4, f"prompt of {len(prompt)} tokens, step {step}: {error:.2e}"
        varied += len(set(tokens)) > 2
    assert varied >= 2, "greedy tokens barely vary"


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_router_capture_and_expert_ablation(family, monkeypatch):
    """One prefill, captured and ablated: the expert transformers' router ranks first for the last
    token of the last layer L is removed there. The logits equal transformers' with that expert's
    router logit at -inf; the captured routing of L equals numpy's top-k of its router (that logit
    at -inf too) over the hidden state rebuilt from the capture (the residual before the block
    plus its attention output, normed)."""
    name, _, model, engine, params = family
    config, layer = engine.config, engine.config.num_layers - 1
    prompt = PROMPTS[2][:8]  # one prefill chunk
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([prompt]), output_router_logits=True)
    expert = int(plain.router_logits[-1][-1].argmax())  # the last sparse layer's (L's), last token
    router = model.model.layers[layer].mlp.gate  # both families' router module

    class Masked:  # torch.nn.functional with that router's logit of ``expert`` at -inf
        def __getattr__(self, attr):
            return getattr(torch.nn.functional, attr)

        def linear(self, x, w, b=None):
            y = torch.nn.functional.linear(x, w, b)
            if w is router.weight:
                y[..., expert] = -torch.inf
            return y

    monkeypatch.setattr(sys.modules[type(model).__module__], "F", Masked())
    with torch.no_grad():
        want = model(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    plain = plain.logits[0, -1].numpy()
    assert np.abs(want - plain).max() > 1e-2 * np.abs(plain).max(), "the ablation should change the logits"

    padded, n = engine.pad(prompt)
    capture = probes.Capture(router=True, logits=False, layers=(layer - 1, layer))
    _, first = engine.prefill(
        params=params, padded_tokens=padded, true_length=n, probes=capture,
        interventions=[probes.Ablate(layer, experts=[expert])],
    )  # fmt: skip
    assert_close(first.logits[0], want, rtol=1e-4)
    seen = probes.captured(first)
    ids, weights = seen.router(layer)  # [1, T, K]
    assert ids.shape == (1, n, config.num_experts_per_tok) and expert not in ids
    pure = trees.leaf_paths(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
    hidden = seen.residual(layer - 1) + seen.attn_out(layer)
    normed = rms_norm(hidden[0].astype(np.float64), pure[f"layers/{layer}/mlp_norm/scale"], config.norm_eps)
    logits = normed @ pure[f"layers/{layer}/mlp/router"]
    logits[:, expert] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_ids = np.argsort(-logits, axis=-1)[:, : config.num_experts_per_tok]
    top = np.take_along_axis(probs, want_ids, -1)
    np.testing.assert_array_equal(ids[0], want_ids)
    np.testing.assert_allclose(weights[0], top / top.sum(-1, keepdims=True) if config.norm_topk_prob else top, rtol=1e-5)
