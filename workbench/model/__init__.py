"""The model layer: config and presets, layers, attention with an nnx.Cache KV cache, transformer."""

from workbench.model.config import PRESETS, ModelConfig, RopeScaling, preset
from workbench.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "Transformer", "preset"]
