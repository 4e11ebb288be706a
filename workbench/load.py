"""``workbench.load``: one call from a checkpoint (or none) to an engine and its params."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from workbench.engine import Engine, Params
from workbench.model import ModelConfig
from workbench.sharding import make_mesh


def load(
    checkpoint: str | os.PathLike | None = None,
    *,
    mesh: Mapping[str, int] | Mesh | None = None,
    decode_batch_size: int = 8,
    max_prefill_length: int = 256,
    max_target_length: int = 1024,
    dtype: str | None = None,
    config: ModelConfig | None = None,
    seed: int = 0,
) -> tuple[Engine, Params]:
    """An engine and its params on ``mesh``.

    Args:
      checkpoint: None for the default model, or a checkpoint directory.
      mesh: axis sizes such as ``{"data": 2, "tensor": 4}``, a ``jax.sharding.Mesh``, or None
        (every device on ``data``).
      decode_batch_size / max_prefill_length / max_target_length: the engine's shape.
      dtype: "float32" or "bfloat16" for both weights and compute; None keeps the model's.
      config: with ``checkpoint=None``, a model config to build with seeded random weights.
      seed: the seed of random weights.
    """
    mesh = make_mesh(mesh)
    params: Any = None
    if checkpoint is None:
        config = config or ModelConfig.tiny()
    else:
        raise ValueError(f"cannot load checkpoint {os.fspath(checkpoint)!r}: checkpoint loading is not available yet")
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    engine = Engine(
        config, mesh, decode_batch_size=decode_batch_size, max_prefill_length=max_prefill_length,
        max_target_length=max_target_length,
    )
    return engine, engine.load_params(params, seed=seed)
