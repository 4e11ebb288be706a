"""Params -> a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``).

The inverse of ``checkpoints.hf``, through the same table of layouts (``hf._layouts``), written
tensor by tensor: ``leaf(path, shape)`` is asked for one of our params at a time, so a model
larger than memory can be written from random draws or from arrays on a mesh (say,
``scripts/write_checkpoint.py`` for the 1B shape, or ``export.export_hf``) without holding it whole.

The config is :func:`hf_config_dict`: it picks the architecture from the fields (Gemma's sandwich
norms, Qwen's q/k norms or biases, a window) and is checked by reading it back with
``config_from_hf``: a config no transformers architecture computes is refused with the first
field that would change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.checkpoints.hf import _layouts
from workbench.checkpoints.hf_config import CONFIG_FILE, config_from_hf
from workbench.checkpoints.safetensors_files import write_tensors
from workbench.model import ModelConfig
from workbench.model.config import LAYER_TYPES

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
# fields a round trip through config.json does not keep (how the engine runs, not what it computes)
RUNTIME_FIELDS = ("dtype", "param_dtype", "quantize", "kv_cache_dtype")


def hf_config_dict(config: ModelConfig, *, max_positions: int = 8192) -> dict[str, Any]:
    """The transformers ``config.json`` of ``config``; ValueError when no architecture computes it."""
    gemma = config.post_norms
    if gemma:
        family = "gemma3" if config.qk_norm else "gemma2"
    elif config.num_experts:
        family = "qwen3_moe" if config.qk_norm else "mixtral"
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
        "mixtral": ("MixtralForCausalLM", "mixtral"),
        "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
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
    if family == "mixtral":
        hf |= {"num_local_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok}
    if family == "qwen3_moe":
        hf |= {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.expert_dim,
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": config.decoder_sparse_step,
            "mlp_only_layers": list(config.mlp_only_layers),
        }
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
    fields["moe_mlp_dim"] = config.expert_dim if config.num_experts else None
    if config.local_rope_theta is None and config.rope_scaling is None:
        fields["local_rope_theta"] = config.rope_theta
    return fields


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def to_hf(layout: Any, ours: np.ndarray) -> np.ndarray:
    """One of our params in its HF tensor's layout (the inverse of ``placement.read_region`` over the
    whole tensor)."""
    inverse = tuple(int(i) for i in np.argsort(layout.perm))
    return np.asarray(ours).transpose(inverse).reshape(layout.hf_shape)


def save_hf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    leaf: Callable[[str, tuple[int, ...]], np.ndarray],
    *,
    dtype: str = "bfloat16",
    max_positions: int = 8192,
) -> Path:
    """Write a Hugging Face checkpoint of ``config`` into the new directory ``path``, weights in
    ``dtype`` ("float32" or "bfloat16"). ``leaf(path, shape)``: our param at ``path`` (say
    ``"layers/0/attn/q"``) of our ``shape``, asked for one at a time. No tokenizer is written
    (prompts are then token ids); copy a ``tokenizer.json`` in to have one."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAFETENSORS_DTYPES)}; got {dtype!r}")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"checkpoint directory {path} exists and is not empty")
    hf = hf_config_dict(config, max_positions=max_positions) | {"dtype": dtype}
    path.mkdir(parents=True, exist_ok=True)
    # HF tensor name -> (our param, its layout, the expert it holds of a stacked param, or None)
    layouts = {
        name: (ours, layout, j if isinstance(layout.name, tuple) else None)
        for ours, layout in _layouts(config).items()
        for j, name in enumerate(layout.names)
    }
    shapes = {
        name: layout.hf_shape[1:] if j is not None else layout.hf_shape for name, (_, layout, j) in layouts.items()
    }
    held: dict[str, np.ndarray] = {}  # the last stacked param asked for: its experts are written one by one

    def produce(name: str) -> np.ndarray:
        ours, layout, j = layouts[name]
        if j is None:
            return to_hf(layout, leaf(ours, our_shape(layout)))
        if ours not in held:
            held.clear()
            held[ours] = to_hf(layout, leaf(ours, our_shape(layout)))
        return held[ours][j]

    write_tensors(path / "model.safetensors", shapes, SAFETENSORS_DTYPES[dtype], produce)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return path


def our_shape(layout: Any) -> tuple[int, ...]:
    """The shape of our param that ``layout`` places."""
    split = [size for sizes in layout.groups for size in sizes]
    return tuple(split[axis] for axis in layout.perm)
