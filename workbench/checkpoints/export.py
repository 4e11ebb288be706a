"""Write an engine's params back as a Hugging Face checkpoint: ``config.json`` + ``model.safetensors``
that transformers' ``from_pretrained`` loads into the model the engine runs.

The tensors are ``checkpoints.hf``'s ``_layouts`` read backwards (our axes permuted back, heads
flattened), so import and export share one table. The config is :func:`hf_config_dict`, which
picks the architecture from the fields (Gemma's sandwich norms, Qwen's q/k norms or biases, a
window) and is checked by reading it back with ``config_from_hf``: a config no transformers
architecture computes is refused with the first field that would change, never written wrong.

Quantized weights are written dequantized (float32: transformers loads float weights), said on
stderr. A LoRA adapter the engine serves can be merged into the weights (``adapter=``); without
one, the base model is written and stderr says the adapters were left out.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from workbench.checkpoints.hf import _layouts
from workbench.checkpoints.hf_config import CONFIG_FILE, config_from_hf
from workbench.model import ModelConfig, quant
from workbench.model.config import LAYER_TYPES
from workbench.model.scan import is_stacked, unstack_layers
from workbench.trees import leaf_paths, nest

WEIGHTS_FILE = "model.safetensors"
# fields a round trip through config.json does not keep (how the engine runs, not what it computes)
RUNTIME_FIELDS = ("dtype", "param_dtype", "quantize", "kv_cache_dtype")


def export_hf(engine: Any, params: Any, path: str | os.PathLike, *, adapter: str | None = None) -> Path:
    """Write ``params`` (of ``engine``: its params State, or a pure dict) to directory ``path`` as
    a Hugging Face checkpoint; returns it.

    ``adapter``: the name of one of ``engine.adapters`` to merge into the weights (``W + A @ B``);
    None writes the base model. The tokenizer.json the engine was loaded with is copied beside.
    """
    config: ModelConfig = engine.config
    hf = hf_config_dict(config, max_positions=engine.max_target_length)
    pure = params if isinstance(params, dict) else nnx.to_pure_dict(params)
    if config.quantize is not None:
        pure = quant.dequantize_params(pure)
        print(f"export: the {config.quantize} weights are written dequantized, as float32", file=sys.stderr)
    flat = {name: _host(leaf) for name, leaf in leaf_paths(pure).items()}
    if is_stacked(pure):  # scanned layers: [L, ...] leaves back to one per layer
        flat = leaf_paths(unstack_layers(nest(flat)))
    if adapter is not None:
        _merge(flat, engine, adapter)
    elif engine.adapters:
        names = ", ".join(engine.adapters)
        print(f"export: the base model, without the adapters {names} (adapter=NAME merges one)", file=sys.stderr)
    dtype = np.float32 if config.quantize is not None else np.dtype(config.weight_dtype)
    hf["dtype"] = "float32" if dtype == np.float32 else config.param_dtype
    tensors = {}
    for ours, layout in _layouts(config).items():
        if ours not in flat:
            raise ValueError(f"params do not match the engine's model: {ours} is missing")
        inverse = np.argsort(layout.perm)  # our axis j is axis perm[j] of HF's split dims
        tensors[layout.name] = np.ascontiguousarray(flat[ours].transpose(inverse).reshape(layout.hf_shape), dtype)
    path = Path(path)
    if jax.process_index() != 0:  # over several processes every one gathered the params; one writes
        return path
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    tokenizer_file = getattr(engine.tokenizer, "file", None)  # an HF tokenizer.json, if loaded with one
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path


def hf_config_dict(config: ModelConfig, *, max_positions: int = 8192) -> dict[str, Any]:
    """The transformers ``config.json`` of ``config``; ValueError when no architecture computes it."""
    gemma = config.post_norms
    if gemma:
        family = "gemma3" if config.qk_norm else "gemma2"
    elif config.qk_norm:
        family = "qwen3"
    elif config.qkv_bias:
        family = "qwen2"
    else:
        family = "mistral" if config.sliding_window is not None and config.layer_types is None else "llama"
    architecture, model_type = {
        "llama": ("LlamaForCausalLM", "llama"),
        "mistral": ("MistralForCausalLM", "mistral"),
        "qwen2": ("Qwen2ForCausalLM", "qwen2"),
        "qwen3": ("Qwen3ForCausalLM", "qwen3"),
        "gemma2": ("Gemma2ForCausalLM", "gemma2"),
        "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    }[family]
    layer_types = list(config.layer_types or [])
    if not layer_types:
        sliding = config.sliding_window is not None
        layer_types = [LAYER_TYPES[1] if sliding else LAYER_TYPES[0]] * config.num_layers
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": max(max_positions, 8192),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "bos_token_id": config.bos_id,
        "eos_token_id": list(config.eos_ids) if len(config.eos_ids) != 1 else config.eos_ids[0],
        "pad_token_id": config.pad_id,
    }
    if gemma:
        hf |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _number(config.query_pre_attn_scalar or config.head_dim),
            "final_logit_softcapping": config.final_logit_softcap,
            "attn_logit_softcapping": config.attn_logit_softcap,
            "sliding_window": config.sliding_window,
            "layer_types": layer_types,
        }
    else:
        hf["hidden_act"] = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[config.mlp_activation]
        if config.sliding_window is not None:
            hf["sliding_window"] = config.sliding_window
            if family != "mistral":
                hf |= {"use_sliding_window": True, "layer_types": layer_types, "max_window_layers": 0}
    global_rope = _rope(config.rope_theta, config.rope_scaling)
    if family == "gemma3":
        local_theta = config.local_rope_theta if config.local_rope_theta is not None else config.rope_theta
        hf["rope_parameters"] = {"full_attention": global_rope, "sliding_attention": _rope(local_theta, None)}
    else:
        hf["rope_parameters"] = global_rope
    _check_round_trip(config, hf, architecture)
    return hf


def _rope(theta: float, scaling: Any) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "factor": scaling.factor, "rope_theta": theta}
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def _check_round_trip(config: ModelConfig, hf: dict[str, Any], architecture: str) -> None:
    """Refuse a config that would load as another model: read ``hf`` back, compare the fields."""
    try:
        back = config_from_hf(hf)
    except ValueError as error:
        raise ValueError(f"cannot export this model as {architecture}: {error}") from None
    ours, theirs = _canonical(config), _canonical(back)
    for field in ours:
        if field not in RUNTIME_FIELDS and theirs[field] != ours[field]:
            raise ValueError(
                f"no transformers architecture computes this model: as {architecture} its {field} would be "
                f"{theirs[field]!r}, not {ours[field]!r}"
            )


def _canonical(config: ModelConfig) -> dict[str, Any]:
    """``config``'s fields with the defaults that mean a value spelled out (the query scale of
    head_dim; one unscaled rope for every layer)."""
    fields = config.to_dict()
    fields["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
    if config.local_rope_theta is None and config.rope_scaling is None:
        fields["local_rope_theta"] = config.rope_theta
    return fields


def _merge(flat: dict[str, np.ndarray], engine: Any, adapter: str) -> None:
    """Fold adapter ``adapter``'s deltas (``a`` [n, in, r] @ ``b`` [n, r, out], scale in b) into ``flat``."""
    if adapter not in engine.adapters:
        loaded = ", ".join(engine.adapters) or "none"
        raise ValueError(f"unknown adapter {adapter!r}; the engine serves: {loaded}")
    index = engine.adapters.index(adapter)
    lora = {k: _host(v) for k, v in leaf_paths(nnx.to_pure_dict(engine.rest)).items() if "/lora/" in k}
    for name, a in lora.items():
        if not name.endswith("/a"):
            continue
        owner = name[: -len("/a")].replace("/lora/", "/")  # layers/0/attn/lora/q/a -> layers/0/attn/q
        b = lora[name[:-1] + "b"]
        weight = flat[owner]
        delta = (a[index].astype(np.float32) @ b[index].astype(np.float32)).reshape(weight.shape)
        flat[owner] = (weight.astype(np.float32) + delta).astype(weight.dtype)


def _host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # over several processes
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
