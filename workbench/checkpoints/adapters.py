"""LoRA adapters in the Hugging Face PEFT format: read, stack for serving, merge into weights.

An adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ...) and ``adapter_model.safetensors`` with, per targeted projection,
``base_model.model.model.layers.<i>.<self_attn|mlp>.<x>_proj.lora_A.weight`` [r, in] and
``lora_B.weight`` [out, r]; PEFT computes ``y = x W^T + scale * x A^T B^T``. We keep ``A^T``
[in, r] and ``scale * B^T`` [r, out] (``model/lora.py`` folds the scale into B: nnx.LoRA has no
alpha). Options this reader does not implement (bias training, DoRA, fan_in_fan_out, per-module
ranks, ...) are refused by name rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from workbench.checkpoints.hf_config import read_json
from workbench.model import ModelConfig
from workbench.model.lora import TARGETS, AdapterStack, LoraSpec, scale
from workbench.model.scan import is_stacked, stack_layers, stacked_period, unstack_layers
from workbench.trees import leaf_paths, nest

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_NAMES = {f"{target}_proj": target for target in TARGETS}
MODULE = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)_proj\.lora_([AB])\.weight")
# PEFT options that change what an adapter computes, and the value under which ours is exact.
UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapter: its rank and, per (layer, target), ``A`` [in, r] and ``scale * B`` [r, out]."""

    rank: int
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if any(target == t for _, target in self.weights))


def sizes(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of projection ``target``, heads flattened as PEFT stores them."""
    d, f = config.embed_dim, config.mlp_dim
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def _check_config(path: Path) -> dict:
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{os.fspath(path)!r} is not a PEFT adapter: no {CONFIG_FILE}")
    config = read_json(path / CONFIG_FILE)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"adapter {path.name}: unsupported PEFT type {config['peft_type']!r} (only LORA)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {path.name}: unsupported PEFT option bias={config['bias']!r} (bias training)")
    for option, plain in UNSUPPORTED.items():
        if config.get(option) not in (plain, None, {}, [], False):
            raise ValueError(f"adapter {path.name}: unsupported PEFT option {option}={config[option]!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ValueError(f"adapter {path.name}: {CONFIG_FILE} needs a positive {key}, got {config.get(key)!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(PEFT_NAMES))
        if unknown:
            raise ValueError(
                f"adapter {path.name}: unsupported target module {unknown[0]!r}; "
                f"LoRA applies to {', '.join(PEFT_NAMES)}"
            )
    return config


def read_adapter(path: str | os.PathLike, config: ModelConfig) -> Adapter:
    """The adapter in directory ``path`` for a model of ``config``; ValueError naming whatever
    does not fit (an unsupported option, a target the model lacks, a tensor of the wrong shape)."""
    from safetensors.numpy import load_file

    path = Path(path)
    peft = _check_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"adapter {path.name}: no {WEIGHTS_FILE} (only safetensors adapters are supported)")
    rank = int(peft["r"])
    factor = scale(float(peft["lora_alpha"]), rank, bool(peft.get("use_rslora", False)))
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, tensor in load_file(path / WEIGHTS_FILE).items():
        match = TENSOR.fullmatch(name)
        if match is None or f"{match[2]}_proj" not in PEFT_NAMES:
            raise ValueError(f"adapter {path.name}: unsupported tensor {name}")
        layer, target = int(match[1]), PEFT_NAMES[f"{match[2]}_proj"]
        if layer >= config.num_layers:
            raise ValueError(f"adapter {path.name}: {name} targets layer {layer}, the model has {config.num_layers}")
        d_in, d_out = sizes(config, target)
        expected = (rank, d_in) if match[3] == "A" else (d_out, rank)
        if tensor.shape != expected:
            raise ValueError(
                f"adapter {path.name}: {name} has shape {tensor.shape} but the model and r={rank} imply {expected}"
            )
        halves.setdefault((layer, target), {})[match[3]] = tensor.astype(np.float32)
    if not halves:
        raise ValueError(f"adapter {path.name}: {WEIGHTS_FILE} holds no LoRA tensors")
    weights = {}
    for (layer, target), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(
                f"adapter {path.name}: layer {layer} {target}_proj lacks lora_{'B' if 'A' in pair else 'A'}"
            )
        weights[layer, target] = (pair["A"].T, factor * pair["B"].T)
    return Adapter(rank, weights)


def stack_adapters(adapters: Mapping[str, Adapter], config: ModelConfig) -> AdapterStack:
    """Adapters side by side for an engine: index i is the i-th name; ranks zero-padded to the
    largest, projections an adapter leaves alone zero for it."""
    names = tuple(adapters)
    if not names:
        raise ValueError("adapters must name at least one adapter")
    targets = tuple(t for t in TARGETS if any(t in a.targets for a in adapters.values()))
    spec = LoraSpec(len(names), max(a.rank for a in adapters.values()), targets)
    flat = {}
    for layer in range(config.num_layers):
        for target in targets:
            d_in, d_out = sizes(config, target)
            a = np.zeros((spec.num_adapters, d_in, spec.rank), np.float32)
            b = np.zeros((spec.num_adapters, spec.rank, d_out), np.float32)
            for index, adapter in enumerate(adapters.values()):
                if (layer, target) in adapter.weights:
                    low, high = adapter.weights[layer, target]
                    a[index, :, : adapter.rank], b[index, : adapter.rank] = low, high
            where = f"layers/{layer}/{MODULE[target]}/lora/{target}"
            flat[f"{where}/a"], flat[f"{where}/b"] = a, b
    return AdapterStack(names, spec, nest(flat))


def load_adapters(adapters: Mapping[str, str | os.PathLike], config: ModelConfig) -> AdapterStack:
    """``{"name": "path/to/adapter_dir"}`` read and stacked (``workbench.load(..., adapters=...)``)."""
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must map names to adapter directories, got {type(adapters).__name__}")
    for name in adapters:
        if not isinstance(name, str) or not name or name == "base":
            raise ValueError(f"adapter name {name!r} is reserved or empty: 'base' means no adapter")
    return stack_adapters({name: read_adapter(path, config) for name, path in adapters.items()}, config)


def merge_adapter(params: dict, adapter: str | os.PathLike | Adapter, config: ModelConfig) -> dict:
    """``params`` (a pure dict, as ``nnx.to_pure_dict`` gives) with one adapter folded into the
    base weights, ``W + scale * A @ B``: serving one adapter at the base model's speed. Either
    layer layout (scanned layers' come back stacked); float weights only."""
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter, config)
    stacked = is_stacked(params)
    flat = dict(leaf_paths(unstack_layers(params)))
    for (layer, target), (a, b) in adapter.weights.items():
        where = f"layers/{layer}/{MODULE[target]}/{target}"
        if f"{where}/values" in flat:  # quantized: the sum would be rounded again, error on error
            raise ValueError(f"merge_adapter needs float weights; {where} is quantized: merge, then quantize")
        weight = np.asarray(flat[where])
        flat[where] = (weight.astype(np.float32) + (a @ b).reshape(weight.shape)).astype(weight.dtype)
    return stack_layers(nest(flat), stacked_period(params)) if stacked else nest(flat)
