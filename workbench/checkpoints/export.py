"""Write an engine's params back as a Hugging Face checkpoint: ``config.json`` + ``model.safetensors``
that transformers' ``from_pretrained`` loads into the model the engine runs.

The params are gathered to the host (dequantized, unstacked, an adapter merged) and written by
``checkpoints.hf_write`` tensor by tensor, through the table the loader reads (``hf._layouts``),
with its config: a config no transformers architecture computes is refused, never written wrong.

Quantized weights are written dequantized (float32: transformers loads float weights), said on
stderr. A LoRA adapter the engine serves can be merged into the weights (``adapter=``); without
one, the base model is written and stderr says the adapters were left out.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from workbench.checkpoints.hf_write import hf_config_dict, save_hf_checkpoint
from workbench.model import ModelConfig, quant
from workbench.model.scan import is_stacked, unstack_layers
from workbench.trees import leaf_paths, nest

__all__ = ["export_hf", "hf_config_dict"]


def export_hf(engine: Any, params: Any, path: str | os.PathLike, *, adapter: str | None = None) -> Path:
    """Write ``params`` (of ``engine``: its params State, or a pure dict) to the new directory
    ``path`` as a Hugging Face checkpoint; returns it.

    ``adapter``: the name of one of ``engine.adapters`` to merge into the weights (``W + A @ B``);
    None writes the base model. The tokenizer.json the engine was loaded with is copied beside.
    """
    config: ModelConfig = engine.config
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
    path = Path(path)
    if jax.process_index() != 0:  # over several processes every one gathered the params; one writes
        return path

    def leaf(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in flat:
            raise ValueError(f"params do not match the engine's model: {name} is missing")
        return flat[name]

    dtype = "float32" if config.quantize is not None else config.param_dtype
    save_hf_checkpoint(path, config, leaf, dtype=dtype, max_positions=engine.max_target_length)
    tokenizer_file = getattr(engine.tokenizer, "file", None)  # an HF tokenizer.json, if loaded with one
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path


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
