"""Hugging Face ``config.json`` -> ModelConfig, for the architectures the workbench implements.

Supported: LlamaForCausalLM (with Llama-3 rope scaling), MistralForCausalLM (sliding window) and
Qwen2ForCausalLM (q/k/v bias, tied embeddings). Anything else -- another architecture, another
rope type, biases elsewhere, experts, quantization, a window on some layers only -- is refused
with an error that names it, rather than loaded into a model that would compute something else.

Both config styles are read: transformers 5's ``rope_parameters`` (theta inside) and the older
``rope_theta`` + ``rope_scaling``; ``dtype`` or ``torch_dtype``; Qwen2's ``layer_types`` or
``use_sliding_window`` + ``max_window_layers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.model import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "llama3")
CHECKPOINT_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # f16 widens exactly


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the HF checkpoint in directory ``path`` (config.json, plus the EOS ids
    of generation_config.json when it lists more)."""
    path = Path(path)
    hf = read_json(path / CONFIG_FILE)
    generation = path / "generation_config.json"
    if generation.is_file():
        extra = _ids(read_json(generation).get("eos_token_id"))
        hf = {**hf, "eos_token_id": list(dict.fromkeys(_ids(hf.get("eos_token_id")) + extra))}
    return config_from_hf(hf)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF config dict to ours; raise ValueError naming the first unsupported feature."""
    try:
        return _config_from_hf(hf)
    except KeyError as error:
        raise ValueError(f"corrupt Hugging Face config: {error.args[0]!r} is missing") from None


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        named = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[architectures[0]]

    def refuse(feature: str) -> None:
        raise ValueError(f"unsupported {architectures[0]} feature: {feature}")

    if hf.get("quantization_config"):
        refuse(f"quantization_config ({hf['quantization_config'].get('quant_method', 'quantized weights')})")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            refuse(f"mixture of experts ({key}={hf[key]})")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("attention_bias"):
        refuse("attention_bias (bias on the q/k/v/o projections)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias")
    theta, scaling = _rope(hf, refuse)

    heads = hf["num_attention_heads"]
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in CHECKPOINT_DTYPES:
        refuse(f"dtype {dtype!r}")
    eos = _ids(hf.get("eos_token_id"))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2",
        sliding_window=_sliding_window(hf, family, refuse),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=CHECKPOINT_DTYPES[dtype],
        param_dtype=CHECKPOINT_DTYPES[dtype],
        bos_id=hf.get("bos_token_id"),
        eos_ids=tuple(eos),
        pad_id=hf.get("pad_token_id") or 0,
    )


def _rope(hf: dict[str, Any], refuse: Callable[[str], None]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        refuse(f"rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor")
    if kind == "default":
        return theta, None
    return theta, RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _sliding_window(hf: dict[str, Any], family: str, refuse: Callable[[str], None]) -> int | None:
    window = hf.get("sliding_window")
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if family == "llama" or window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None and family == "qwen2":  # older Qwen2 configs: windows from max_window_layers on
        first = hf.get("max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
    if layer_types is not None and len(set(layer_types)) > 1:
        refuse("sliding window on some layers only (layer_types mixes full and sliding attention)")
    if layer_types is not None and layer_types and layer_types[0] == "full_attention":
        return None
    return int(window)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt Hugging Face checkpoint: cannot read {file} ({error})") from None
