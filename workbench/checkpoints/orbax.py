"""Workbench checkpoints: params saved with orbax, the model config and tokenizer alongside.

Layout of a checkpoint directory::

    workbench.json   {"format": "workbench", "version": 1, "model": {ModelConfig fields},
                      "tokenizer": {"type": "bytes"} | {"type": "hf", "file": "tokenizer.json"} | null}
    params/          orbax StandardCheckpointer of nnx.to_pure_dict(params)

Restores go straight into the target shardings, so a checkpoint saved on one mesh restores on
any other (and into another dtype, cast by orbax on the way in). Other files in the directory
(a README, training records) are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from workbench.checkpoints.tokenizer import Tokenizer
from workbench.distributed import barrier
from workbench.model import ModelConfig
from workbench.trees import placed_shapes

MANIFEST = "workbench.json"


def is_workbench_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    params: nnx.State | dict,
    *,
    tokenizer: Tokenizer | dict | None = None,
) -> Path:
    """Write ``params`` (State or pure dict) and ``config`` to a new directory ``path``.

    ``tokenizer``: a Tokenizer (say ``engine.tokenizer``; its files are copied in), or its
    manifest entry such as ``{"type": "bytes"}``, or None.
    """
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"checkpoint directory {path} exists and is not empty")
    barrier("workbench save: every process has looked")  # before any of them writes (one process: no-op)
    path.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    with ocp.StandardCheckpointer() as checkpointer:  # each process writes its own shards
        checkpointer.save(path / "params", pure)
    if jax.process_index() == 0:  # one writer for the files beside params/
        if isinstance(tokenizer, Tokenizer):
            tokenizer = tokenizer.save(path)
        manifest = {"format": "workbench", "version": 1, "model": config.to_dict(), "tokenizer": tokenizer}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    barrier("workbench save: done")
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt workbench checkpoint {path}: cannot read {MANIFEST} ({error})") from None
    if manifest.get("format") != "workbench":
        raise ValueError(f"{path / MANIFEST} is not a workbench checkpoint manifest")
    return manifest


def read_config(path: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_dict(read_manifest(path)["model"])


def restore_params(path: str | os.PathLike, abstract_params: Any, shardings: Any = None) -> dict:
    """The saved params as a pure dict, shaped and typed like ``abstract_params`` and placed in
    ``shardings`` (say, an engine's ``abstract_params`` and ``param_shardings``): the same
    signature as ``load_hf_params``. Without ``shardings``, ``abstract_params`` is already a
    restore target (a pure dict of ``jax.ShapeDtypeStruct`` with shardings, see
    :func:`abstract_target`).

    A missing, truncated or mismatched ``params/`` raises ValueError with orbax's first line.
    """
    target = abstract_params if shardings is None else abstract_target(abstract_params, shardings)
    params = Path(path).absolute() / "params"
    if not params.is_dir():
        raise ValueError(f"corrupt workbench checkpoint {Path(path)}: params/ is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params, target)
    except Exception as error:  # orbax and tensorstore raise many types, with long messages
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"corrupt workbench checkpoint {Path(path)}: cannot restore params ({first})") from None


def abstract_target(abstract_params: nnx.State | dict, shardings: Any) -> dict:
    """Restore target from an engine's ``abstract_params`` and ``param_shardings``."""
    return placed_shapes(abstract_params, shardings)
