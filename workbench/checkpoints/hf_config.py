"""Hugging Face ``config.json`` -> ModelConfig, for the architectures the workbench implements.

Supported: LlamaForCausalLM (with Llama-3 or linear rope scaling), MistralForCausalLM (sliding
window), Qwen2ForCausalLM (q/k/v bias), Qwen3ForCausalLM (q/k norms), Gemma2ForCausalLM (sandwich
norms, GeGLU, soft-capping, alternating sliding layers) and Gemma3ForCausalLM (text; q/k norms and
a rope per layer type), and the mixtures of experts MixtralForCausalLM and Qwen3MoeForCausalLM
(with ``decoder_sparse_step`` and ``mlp_only_layers``). Anything else -- another architecture, another rope type, biases
elsewhere, experts, quantization, bidirectional attention -- is refused with an error that names
it, rather than loaded into a model that would compute something else.

Both config styles are read: transformers 5's ``rope_parameters`` (theta inside; Gemma 3's keyed
by layer type) and the older ``rope_theta`` + ``rope_scaling`` (+ Gemma 3's
``rope_local_base_freq``); ``dtype`` or ``torch_dtype``; ``layer_types``, or what each family
derives them from when absent (Qwen's ``use_sliding_window`` + ``max_window_layers``, Gemma's
``sliding_window_pattern``). A key a config leaves out takes transformers' default for its class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.model import ModelConfig, RopeScaling
from workbench.model.config import LAYER_TYPES, sliding_pattern

CONFIG_FILE = "config.json"
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE = ("mixtral", "qwen3_moe")
ROPE_TYPES = ("default", "llama3", "linear")
# transformers' class defaults of the keys our mapping reads, for configs that leave them out
GEMMA = dict(
    hidden_activation="gelu_pytorch_tanh", head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    tie_word_embeddings=True, rms_norm_eps=1e-6,
)  # fmt: skip
DEFAULTS = {
    "gemma2": GEMMA | dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=10_000.0),
    "gemma3": GEMMA | dict(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
}
GLOBAL_THETA_DEFAULT = 10_000.0
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
    hf = {**DEFAULTS.get(family, {}), **hf}
    gemma = family.startswith("gemma")

    def refuse(feature: str) -> None:
        raise ValueError(f"unsupported {architectures[0]} feature: {feature}")

    if hf.get("quantization_config"):
        refuse(f"quantization_config ({hf['quantization_config'].get('quant_method', 'quantized weights')})")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key) and (family not in MOE or key == "n_routed_experts"):
            refuse(f"mixture of experts ({key}={hf[key]})")
    if gemma and hf.get("hidden_activation") != "gelu_pytorch_tanh":
        refuse(f"hidden_activation {hf.get('hidden_activation')!r} (only gelu_pytorch_tanh)")
    if not gemma and hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("attention_bias"):
        refuse("attention_bias (bias on the q/k/v/o projections)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention (only causal attention)")
    window, layer_types = _layers(hf, family, refuse)
    experts = _experts(hf, family) if family in MOE else {}
    if family == "gemma3":
        theta, scaling, local_theta = _gemma3_rope(hf, refuse)
    else:
        (theta, scaling), local_theta = _rope(hf, refuse), None

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
        sliding_window=window,
        layer_types=layer_types,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        local_rope_theta=local_theta,
        norm_offset=1.0 if gemma else 0.0,
        post_norms=gemma,
        qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
        embed_scale=gemma,
        mlp_activation="gelu_tanh" if gemma else "silu",
        query_pre_attn_scalar=hf["query_pre_attn_scalar"] if gemma else None,
        # Gemma 3's attention takes no soft-capping whatever its config says (transformers ignores the key)
        attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        dtype=CHECKPOINT_DTYPES[dtype],
        param_dtype=CHECKPOINT_DTYPES[dtype],
        bos_id=hf.get("bos_token_id"),
        eos_ids=tuple(eos),
        pad_id=hf.get("pad_token_id") or 0,
        **experts,
    )


def _experts(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The ModelConfig fields of a mixture of experts. Mixtral: every layer sparse, each expert
    ``intermediate_size`` wide, softmax over the top-k logits. Qwen3-MoE: softmax over all, the
    top k renormalized when ``norm_topk_prob``; experts ``moe_intermediate_size`` wide, the dense
    layers (``mlp_only_layers``, or off the ``decoder_sparse_step``) ``intermediate_size``.
    Qwen3-MoE's config writes ``num_local_experts`` too (an alias of its ``num_experts``)."""
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if family == "mixtral":
        return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"])
    return dict(
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_mlp_dim=hf["moe_intermediate_size"],
        router="topk_softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )


def _rope(
    hf: dict[str, Any], refuse: Callable[[str], None], rope: dict | None = None, field: str = "rope_parameters"
) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
    rope = dict(rope if rope is not None else (hf.get("rope_parameters") or hf.get("rope_scaling") or {}))
    if set(rope) & set(LAYER_TYPES):
        refuse(f"{field} keyed by layer type (only Gemma 3 has a rope per layer type)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", GLOBAL_THETA_DEFAULT)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        refuse(f"{field} rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(factor=float(rope["factor"]), rope_type="linear")
    return theta, RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _gemma3_rope(hf: dict[str, Any], refuse: Callable[[str], None]) -> tuple[float, RopeScaling | None, float]:
    """(global theta, global scaling, local theta): ``rope_parameters`` keyed by layer type, or
    the older ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq`` (local)."""
    rope = hf.get("rope_parameters") or {}
    if set(rope) & set(LAYER_TYPES):
        unknown = sorted(set(rope) - set(LAYER_TYPES))
        if unknown:
            refuse(f"rope_parameters entry {unknown[0]!r} (known: {', '.join(LAYER_TYPES)})")
        full = {"rope_theta": hf["rope_theta"], **(rope.get("full_attention") or {})}
        local = {"rope_theta": hf["rope_local_base_freq"], **(rope.get("sliding_attention") or {})}
    else:  # the older spelling: rope_scaling applies to the global layers
        full = {"rope_theta": hf["rope_theta"], **(rope or hf.get("rope_scaling") or {})}
        local = {"rope_theta": hf["rope_local_base_freq"]}
    theta, scaling = _rope(hf, refuse, full, "rope_parameters['full_attention']")
    local_theta, local_scaling = _rope(hf, refuse, local, "rope_parameters['sliding_attention']")
    if local_scaling is not None:
        refuse(f"rope_parameters['sliding_attention'] rope_type {local_scaling.rope_type!r} (sliding layers: default)")
    return theta, scaling, local_theta


def _layers(hf: dict[str, Any], family: str, refuse: Callable[[str], None]) -> tuple[int | None, tuple | None]:
    """(sliding_window, layer_types) as ModelConfig takes them: (None, None) with no window,
    (window, None) when every layer slides, else (window, each layer's type)."""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if family == "llama" or window is None:
        return None, None
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None and family in (
        "qwen2",
        "qwen3",
        "qwen3_moe",
    ):  # older Qwen configs: windows from max_window_layers on
        first = hf.get("max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if layer_types is None and family.startswith("gemma"):
        every = (
            hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or (2 if family == "gemma2" else 6)
        )
        layer_types = sliding_pattern(layers, every)
    if layer_types is None:
        return int(window), None
    unknown = [kind for kind in layer_types if kind not in LAYER_TYPES]
    if unknown:
        refuse(f"layer_types entry {unknown[0]!r} (known: {', '.join(LAYER_TYPES)})")
    if len(layer_types) != layers:
        refuse(f"layer_types has {len(layer_types)} entries for {layers} layers")
    if set(layer_types) == {"full_attention"}:
        return None, None
    if set(layer_types) == {"sliding_attention"}:
        return int(window), None
    return int(window), tuple(layer_types)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt Hugging Face checkpoint: cannot read {file} ({error})") from None
