"""Checkpoints: workbench (orbax) directories; Hugging Face import and tokenizers come next."""

from workbench.checkpoints.orbax import (
    abstract_target, is_workbench_checkpoint, read_config, read_manifest, restore_params, save_checkpoint,
)

__all__ = ["abstract_target", "is_workbench_checkpoint", "read_config", "read_manifest", "restore_params",
           "save_checkpoint"]
