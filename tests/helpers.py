"""Helpers the test modules share (not a test module: tests import from here, never from each other).

``lively_params`` gives random weights whose greedy tokens vary; ``prompt``, ``prefill`` and
``assert_close`` are the engine tests' vocabulary; ``SMALL`` / ``SHAPE`` and ``write_hf`` lay a
small model out as a Hugging Face checkpoint with explicit numpy reshapes (an independent
statement of the layouts that ``checkpoints.hf`` must read back).
"""

import functools
import json

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

import workbench

SHAPE = dict(decode_batch_size=2, max_prefill_length=16, max_target_length=32)
# fmt: off
SMALL = workbench.ModelConfig(
    vocab_size=96, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, bos_id=1,
    eos_ids=(2,),
)
# fmt: on


def lively_arrays(engine: workbench.Engine, seed: int = 0) -> dict:
    """Random weights scaled so the model's greedy tokens vary (0.02-std init gives one token
    over and over, which would make token comparisons weak): twice fan-in scaling, norms near 1.
    A pure dict of host arrays; ``lively_params`` places them on the engine's mesh."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (2 * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    return jax.tree.map(draw, nnx.to_pure_dict(engine.abstract_params))


def lively_params(engine: workbench.Engine, seed: int = 0) -> nnx.State:
    return engine.load_params(lively_arrays(engine, seed))


def engine_for(config: workbench.ModelConfig, mesh: dict) -> workbench.Engine:
    """An engine of the small checkpoint tests' shape (``SHAPE``) on ``mesh``."""
    return workbench.Engine(config, workbench.make_mesh(mesh), **SHAPE)


def prompt(length: int, seed: int) -> list[int]:
    """``length`` random byte ids (the tiny model's bytes), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, size=length).tolist()


def prefill(engine, params, tokens, existing_prefix=None):
    """(prefix, first result) of one prefill of ``tokens`` (at most max_prefill_length)."""
    padded, n = engine.pad(tokens)
    return engine.prefill(params=params, existing_prefix=existing_prefix, padded_tokens=padded, true_length=n)


def prefill_chunks(engine, params, tokens):
    """The prefix of ``tokens`` of any length, prefilled in chunks of max_prefill_length."""
    prefix = None
    for start in range(0, len(tokens), engine.max_prefill_length):
        prefix, _ = prefill(engine, params, tokens[start : start + engine.max_prefill_length], prefix)
    return prefix


def forward_rows(engine, params, tokens):
    """The uncached forward pass's logits rows [len(tokens), V]: the sequence right-padded to
    max_target_length, so every call shares one compile (causal: later tokens change no row)."""
    padded = np.zeros((1, engine.max_target_length), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(engine.forward(params, padded))[0, : len(tokens)]


def assert_greedy_continuation(engine, params, prompt, generated):
    """``generated`` (the first token included) is the forward pass's greedy continuation of ``prompt``."""
    rows = forward_rows(engine, params, list(prompt) + list(generated[:-1]))
    assert list(generated) == rows[len(prompt) - 1 :].argmax(-1).tolist()


def assert_close(actual, expected, rtol=1e-5):
    """Same shape, and max abs difference within ``rtol`` of the largest expected magnitude
    (shapes first: broadcasting [4] against [1, 4], or [1] against anything, would hide a mismatch)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def host_arrays(config: workbench.ModelConfig, seed: int = 0) -> dict:
    """Lively float32 weights drawn on the host for ``config``'s unrolled model (a pure dict):
    norms around 0 for Gemma's ``x * (1 + w)``, around 1 otherwise; matrices fan-in scaled."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.split(nnx.eval_shape(lambda: workbench.Transformer(config, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:
            return (1 - config.norm_offset + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (2 * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    return jax.tree.map(draw, nnx.to_pure_dict(abstract))


@functools.partial(jax.jit, static_argnums=0)
def _uncached(config, pure, tokens):  # the model built inside the jit: its random init is pruned
    with nnx.use_eager_sharding(False):
        model = workbench.Transformer(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model(tokens)


def uncached_forward(config: workbench.ModelConfig, pure: dict, tokens) -> np.ndarray:
    """The unrolled model's logits ``[B, T, V]`` over ``tokens`` ``[B, T]`` from a pure dict of
    weights, with no engine and no cache: the truth for every cached path (one jit per config)."""
    return np.asarray(_uncached(config, pure, np.asarray(tokens, np.int32)))


def pure_numpy(params):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def hf_tensors(config, pure):
    """Our params in HF's names and layouts ([out, in] projections, heads flattened)."""
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    tensors = {
        "model.embed_tokens.weight": pure["embed"]["embedding"],
        "model.norm.weight": pure["final_norm"]["scale"],
    }
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = pure["lm_head"].T
    for i, layer in pure["layers"].items():
        attn, mlp, prefix = layer["attn"], layer["mlp"], f"model.layers.{i}"
        tensors |= {
            f"{prefix}.input_layernorm.weight": layer["attn_norm"]["scale"],
            f"{prefix}.post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
            f"{prefix}.self_attn.q_proj.weight": attn["q"].reshape(d, n * h).T,
            f"{prefix}.self_attn.k_proj.weight": attn["k"].reshape(d, k * h).T,
            f"{prefix}.self_attn.v_proj.weight": attn["v"].reshape(d, k * h).T,
            f"{prefix}.self_attn.o_proj.weight": attn["o"].reshape(n * h, d).T,
            f"{prefix}.mlp.gate_proj.weight": mlp["gate"].T,
            f"{prefix}.mlp.up_proj.weight": mlp["up"].T,
            f"{prefix}.mlp.down_proj.weight": mlp["down"].T,
        }
        if config.qkv_bias:
            tensors |= {f"{prefix}.self_attn.{x}_proj.bias": attn[f"{x}_bias"].reshape(-1) for x in "qkv"}
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def hf_config(config, dtype="float32", **changes):
    return {
        "architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": config.bos_id,
        "eos_token_id": list(config.eos_ids),
        **changes,
    }


def write_hf(path, config, pure, *, dtype=np.float32, files=1, drop=(), extra=None, **config_changes):
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.astype(dtype) for name, t in hf_tensors(config, pure).items() if name not in drop}
    tensors |= extra or {}
    names = sorted(tensors)
    if files == 1:
        save_file(tensors, path / "model.safetensors")
    else:  # a sharded checkpoint: several files and the index naming each tensor's file
        weight_map = {}
        for part in range(files):
            file = f"model-{part + 1:05d}-of-{files:05d}.safetensors"
            save_file({n: tensors[n] for n in names[part::files]}, path / file)
            weight_map |= {n: file for n in names[part::files]}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dtype_name = {np.float32: "float32", np.float16: "float16", ml_dtypes.bfloat16: "bfloat16"}[dtype]
    (path / "config.json").write_text(json.dumps(hf_config(config, dtype_name, **config_changes)))
    return path
