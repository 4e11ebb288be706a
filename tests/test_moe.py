"""Mixtures of experts (``workbench.model.moe``): Mixtral and Qwen3-MoE against transformers (torch
CPU, float32, eager attention) on small random checkpoints saved by transformers itself; routing
captured and ablated on the cached path against numpy and against transformers with an expert's
router logit at -inf; both expert kernels against a numpy loop over each token's experts;
quantized experts on an expert mesh axis (8 devices) and the int8 KV cache against the float engine
on 4 devices.

Qwen3-MoE's checkpoint has a dense layer between sparse ones (``mlp_only_layers``), experts
narrower than the dense MLP, and ``norm_topk_prob=False``; Mixtral's renormalizes over its top k.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import workbench
from helpers import assert_close
from workbench import inspect, probes, trees
from workbench.checkpoints import config_from_hf, export_hf
from workbench.engine.scheduler import Scheduler
from workbench.model import moe, quant
from workbench.model.scan import unstack_layers

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
            num_hidden_layers=3,
            head_dim=16,
            num_experts=EXPERTS,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            tie_word_embeddings=False,
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
    # Qwen3-MoE's layers scanned in blocks of their pattern (sparse, dense; one left over)
    engine, params = workbench.load(path, **ENGINE, scan_layers=request.param == "qwen3_moe")
    return request.param, path, model, engine, params


def reference(model, prompt):
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = generated[0, len(prompt) :].tolist()
        rows = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].numpy()
    return tokens, rows


def test_generate_matches_transformers(family, tmp_path):
    """Three prompts through two slots on data=2 x tensor=2, the long ones prefilled in chunks."""
    name, path, model, engine, params = family
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

    # written back: the same tensors, bit for bit (experts unstacked), read by transformers as the same class
    export_hf(engine, params, tmp_path)
    original, exported = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert exported.keys() == original.keys()
    for tensor_name, tensor in original.items():
        np.testing.assert_array_equal(exported[tensor_name], tensor, err_msg=tensor_name)
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == config


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_router_capture_and_expert_ablation(family, monkeypatch):
    """Qwen3-MoE's routing (top-k weights unnormalized, a dense layer before the last). One prefill,
    captured and ablated: the expert transformers' router ranks first for the last token of the
    last layer L is removed there. The logits equal transformers' with that expert's
    router logit at -inf; the captured routing of L equals numpy's top-k of its router (that logit
    at -inf too) over the hidden state rebuilt from the capture (the residual before the block
    plus its attention output, normed)."""
    name, _, model, engine, params = family
    if name != "qwen3_moe":
        pytest.skip("one family: Mixtral's routing is the parity test's and the kernel test's")
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
    pure = trees.leaf_paths(jax.tree.map(np.asarray, unstack_layers(nnx.to_pure_dict(params))))
    hidden = seen.residual(layer - 1) + seen.attn_out(layer)
    normed = rms_norm(hidden[0].astype(np.float64), pure[f"layers/{layer}/mlp_norm/scale"], config.norm_eps)
    logits = normed @ pure[f"layers/{layer}/mlp/router"]
    logits[:, expert] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_ids = np.argsort(-logits, axis=-1)[:, : config.num_experts_per_tok]
    top = np.take_along_axis(probs, want_ids, -1)
    np.testing.assert_array_equal(ids[0], want_ids)
    np.testing.assert_allclose(
        weights[0], top / top.sum(-1, keepdims=True) if config.norm_topk_prob else top, rtol=1e-5
    )
    report = inspect.experts(first, EXPERTS)  # load per expert per layer: the ids counted
    assert report.layers == ([layer - 1, layer] if config.sparse(layer - 1) else [layer])
    np.testing.assert_array_equal(report.load[-1], np.bincount(want_ids.reshape(-1), minlength=EXPERTS))
    assert report.load[-1, expert] == 0 and f"{want_ids[0, 0]}:" in str(report)
    assert report.plot().axes


MODES = ("float", "w8", "w8a8")


def test_expert_kernels_equal_a_numpy_loop():
    """``grouped`` (ragged_dot) and ``dense``, float and with w8 and w8a8 experts, against numpy
    running each token's k experts one by one over the (dequantized) weights; under w8a8 numpy
    rounds each product's input to int8 per row first (a token's for gate and up, a (token,
    expert)'s for down), as test_quant states it. One compile per kernel for the three modes."""
    config = workbench.ModelConfig(
        vocab_size=8, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=24,
        num_experts=EXPERTS, num_experts_per_tok=2, router="topk_softmax", norm_topk_prob=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {"router": (32, EXPERTS), "gate": (EXPERTS, 32, 24), "up": (EXPERTS, 32, 24), "down": (EXPERTS, 24, 32)}
    drawn = {name: rng.standard_normal(shape) / np.sqrt(shape[-2]) for name, shape in shapes.items()}

    @nnx.jit
    def build(drawn):  # the same random weights in every mode, quantized there: one compile
        layers = []
        with nnx.use_eager_sharding(False):
            for mode in MODES:
                layer = moe.MoE(config, rngs=nnx.Rngs(0))
                for name, value in drawn.items():
                    getattr(layer if name == "router" else layer.experts, name)[...] = value
                if mode != "float":
                    for name in ("gate", "up", "down"):
                        setattr(layer.experts, name, quant.QuantizedWeight(getattr(layer.experts, name), (1,), mode))
                layers.append(layer)
        return layers

    layers = dict(zip(MODES, build({k: jnp.asarray(v, jnp.float32) for k, v in drawn.items()})))
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    outs = {}
    for kernel in (moe.grouped, moe.dense):
        for layer in layers.values():
            layer.run = kernel
        run = nnx.jit(lambda layers, x: {mode: layer(x) for mode, layer in zip(MODES, layers)})
        outs[kernel.__name__] = run(list(layers.values()), jnp.asarray(x))

    for mode, layer in layers.items():

        def weight(name):
            w = getattr(layer.experts, name)
            if mode == "float":
                return np.asarray(w[...], np.float64)
            return np.asarray(w.values[...], np.float64) * np.asarray(w.scale[...])[0][:, None, :]  # [1, E, out]

        def rounded(v):  # w8a8: the activations int8 per row, symmetric, then back to float
            if mode != "w8a8":
                return v
            scale = np.abs(v).max() / 127
            return np.round(v / scale) * scale

        gate, up, down = weight("gate"), weight("up"), weight("down")
        logits = x.reshape(6, 32) @ np.asarray(layer.router[...], np.float64)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        want = np.zeros((6, 32))
        for token, row in enumerate(x.reshape(6, 32).astype(np.float64)):
            for e in np.argsort(-probs[token])[:2]:
                h = rounded(row) @ gate[e]
                hidden = h / (1 + np.exp(-h)) * (rounded(row) @ up[e])
                want[token] += probs[token, e] * (rounded(hidden) @ down[e])
        for kernel, out in outs.items():
            assert_close(np.asarray(out[mode]).reshape(6, 32), want, rtol=1e-5)


def test_sharded_quantized_experts_and_int8_cache(family):
    """Mixtral's 4 experts as w8, split over an expert axis (data=2 x expert=4, 8 devices), with an
    int8 KV cache: the uncached forward equals the float model on 4 devices (data=2 x tensor=2)
    over the dequantized weights; prefill through the int8 cache stays within that cache's
    tolerance of it (test_quant's). Against the float checkpoint itself rounding can flip a
    token's experts in so small and lively a model: the dequantized weights are the truth."""
    name, path, model, engine, params = family
    if name != "mixtral":
        pytest.skip("one family is enough for the meshes and the quantized modes")
    tokens = np.asarray([PROMPTS[2]])
    mesh = {"data": 2, "expert": 4}
    w8, w8_params = workbench.load(path, **dict(ENGINE, mesh=mesh), quantize="w8", kv_cache_dtype="int8")
    leaves, shardings = trees.leaf_paths(w8_params), trees.leaf_paths(w8.param_shardings)
    assert leaves["layers/0/mlp/experts/down/values"].dtype == jnp.int8
    assert tuple(shardings["layers/0/mlp/experts/gate/values"].spec)[0] == "expert"
    oracle = engine.forward(engine.load_params(quant.dequantize_params(w8_params)), tokens)
    assert_close(w8.forward(w8_params, tokens), oracle, rtol=1e-5)
    padded, n = w8.pad(PROMPTS[2][:8])
    _, first = w8.prefill(params=w8_params, padded_tokens=padded, true_length=n)
    assert_close(first.logits[0], oracle[0, n - 1], rtol=0.05)


def test_bad_expert_settings_are_one_line_errors(family):
    name, path, *_ = family
    if name != "mixtral":
        pytest.skip("the settings are the family's alike")
    base = workbench.ModelConfig.tiny(num_experts=4)
    for changes, message in [
        (dict(num_experts_per_tok=5), r"^num_experts_per_tok \(5\) must be at most num_experts \(4\)$"),
        (dict(router="sinkhorn"), r"^unknown router scheme 'sinkhorn'; known: softmax_topk, topk_softmax$"),
        (dict(mlp_only_layers=(7,)), r"^mlp_only_layers names layer 7, but the model has layers 0..3$"),
    ]:
        with pytest.raises(ValueError, match=message):
            base.replace(**changes)
    with pytest.raises(ValueError, match=r"^the mesh's expert axis \(3\) does not divide the model's 4 experts$"):
        workbench.load(path, **dict(ENGINE, mesh={"expert": 3}))


def test_moe_preset_counts_what_the_model_holds():
    """mixtral-1b: about 1B params; ``num_params`` counts the router and experts of sparse layers
    and the dense MLPs of the others (checked on a small copy with a dense layer between)."""
    assert round(workbench.preset("mixtral-1b").num_params() / 1e9, 2) == 1.01
    small = workbench.preset("mixtral-1b", vocab_size=64, embed_dim=32, num_layers=3, mlp_dim=48, moe_mlp_dim=24)
    small = small.replace(num_heads=4, num_kv_heads=2, head_dim=8, mlp_only_layers=(1,))
    with nnx.use_eager_sharding(False):
        abstract = nnx.split(nnx.eval_shape(lambda: workbench.Transformer(small, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == small.num_params()
