"""Checkpoints: workbench (orbax) directories, Hugging Face safetensors import, tokenizers."""

from workbench.checkpoints.adapters import Adapter, load_adapters, merge_adapter, read_adapter, stack_adapters
from workbench.checkpoints.export import export_hf
from workbench.checkpoints.hf import load_hf_params
from workbench.checkpoints.hf_config import config_from_hf, is_hf_checkpoint, read_hf_config
from workbench.checkpoints.orbax import (
    abstract_target,
    is_workbench_checkpoint,
    read_config,
    read_manifest,
    restore_params,
    save_checkpoint,
)
from workbench.checkpoints.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    Tokenizer,
    default_tokenizer,
    tokenizer_for_hf_dir,
    tokenizer_from_manifest,
)

__all__ = [
    "Adapter",
    "ByteTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "abstract_target",
    "config_from_hf",
    "default_tokenizer",
    "export_hf",
    "is_hf_checkpoint",
    "is_workbench_checkpoint",
    "load_adapters",
    "load_hf_params",
    "merge_adapter",
    "read_adapter",
    "read_config",
    "read_hf_config",
    "read_manifest",
    "restore_params",
    "save_checkpoint",
    "stack_adapters",
    "tokenizer_for_hf_dir",
    "tokenizer_from_manifest",
]
