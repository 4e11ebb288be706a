"""Params -> a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``).

The inverse of ``checkpoints.hf``, through the same table of layouts (``hf._layouts``), written
tensor by tensor: ``leaf(path, shape)`` is asked for one of our params at a time, so a model
larger than memory can be written from random draws or from arrays on a mesh (say,
``scripts/write_checkpoint.py`` for the 1B shape) without holding it whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.checkpoints.hf import _layouts
from workbench.checkpoints.hf_config import ARCHITECTURES, CONFIG_FILE
from workbench.checkpoints.safetensors_files import write_tensors
from workbench.model import ModelConfig

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def hf_config_dict(config: ModelConfig, *, max_positions: int = 8192) -> dict[str, Any]:
    """``config.json`` of ``config`` (Llama, Mistral or Qwen2; the weights' dtype is the caller's
    to add): what ``config_from_hf`` reads back as ``config``."""
    if config.quantize is not None:
        raise ValueError(f"a Hugging Face checkpoint holds float weights, not quantize={config.quantize!r}")
    if config.layer_types is not None and len(set(config.layer_types)) > 1:
        raise ValueError("a sliding window on some layers only has no Hugging Face Llama/Mistral/Qwen2 config")
    architecture = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    if config.sliding_window is not None and not config.qkv_bias:
        architecture = "MistralForCausalLM"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}  # transformers 5's spelling
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope |= {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": ARCHITECTURES[architecture],  # what transformers' AutoConfig dispatches on
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": max(max_positions, 8192),
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_id,
        "eos_token_id": list(config.eos_ids),
        "pad_token_id": config.pad_id,
    }
    if config.sliding_window is not None:
        hf |= {"sliding_window": config.sliding_window, "use_sliding_window": True, "max_window_layers": 0}
    return hf


def to_hf(layout: Any, ours: np.ndarray) -> np.ndarray:
    """One of our params in its HF tensor's layout (the inverse of ``hf.read_region`` over the
    whole tensor)."""
    inverse = tuple(int(i) for i in np.argsort(layout.perm))
    return np.asarray(ours).transpose(inverse).reshape(layout.hf_shape)


def save_hf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    leaf: Callable[[str, tuple[int, ...]], np.ndarray],
    *,
    dtype: str = "bfloat16",
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
    hf = hf_config_dict(config) | {"dtype": dtype}
    path.mkdir(parents=True, exist_ok=True)
    layouts = {layout.name: (ours, layout) for ours, layout in _layouts(config).items()}
    shapes = {name: layout.hf_shape for name, (_, layout) in layouts.items()}

    def produce(name: str) -> np.ndarray:
        ours, layout = layouts[name]
        return to_hf(layout, leaf(ours, our_shape(layout)))

    write_tensors(path / "model.safetensors", shapes, SAFETENSORS_DTYPES[dtype], produce)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return path


def our_shape(layout: Any) -> tuple[int, ...]:
    """The shape of our param that ``layout`` places."""
    split = [size for sizes in layout.groups for size in sizes]
    return tuple(split[axis] for axis in layout.perm)
