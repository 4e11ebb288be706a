"""Tokenizers: bytes for the default model, ``tokenizer.json`` (the ``tokenizers`` package) for HF.

Both speak the same small interface -- ``encode(text) -> ids``, ``decode(ids) -> text`` -- and
carry the special ids of the checkpoint they belong to. EOS ids come from the checkpoint's config
(``ModelConfig.eos_ids``), not from the tokenizer file: a model's config is what says when it
stops (Llama-3 instruct, for one, stops on several ids its tokenizer file does not flag).

``StreamDecoder`` turns a token stream into text pieces for printing as tokens arrive, holding
back an incomplete multi-byte character until its last byte comes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.model import ModelConfig
from workbench.model.config import BYTE_BOS, BYTE_EOS, BYTES

TOKENIZER_FILE = "tokenizer.json"
_REPLACEMENT = "\ufffd"  # what a cut-off UTF-8 sequence decodes to


class Tokenizer:
    """The interface: ``encode``, ``decode``, special ids, and how a checkpoint records it."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Write whatever files the tokenizer needs into ``directory``; return its manifest entry."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """Bytes 0..255 are their own ids; ids 256 and up are special (BOS, EOS, PAD of ``tiny()``).

    ``encode`` adds no BOS: the default model was trained on windows that mostly start mid-file,
    so it continues plain text as it is (and its own sample script prompts it the same way).
    """

    def __init__(self, *, bos_id: int | None = BYTE_BOS, eos_ids: Sequence[int] = (BYTE_EOS,), vocab_size: int = 384):
        if vocab_size < BYTES:
            raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least {BYTES} ids, got {vocab_size}")
        self.vocab_size, self.bos_id, self.eos_ids = vocab_size, bos_id, tuple(eos_ids)

    @classmethod
    def for_config(cls, config: ModelConfig) -> "ByteTokenizer":
        return cls(bos_id=config.bos_id, eos_ids=config.eos_ids, vocab_size=config.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTES).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> dict[str, Any]:
        return {"type": "bytes"}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` through the ``tokenizers`` package; ``encode`` applies its
    post-processor (so a Llama tokenizer adds its BOS, as ``transformers`` would)."""

    def __init__(self, file: str | os.PathLike, *, bos_id: int | None = None, eos_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer as RustTokenizer

        self.file = Path(file)
        try:
            self._tokenizer = RustTokenizer.from_file(str(self.file))
        except Exception as error:  # the Rust side raises its own exception type
            raise ValueError(f"corrupt tokenizer file {self.file}: {str(error).splitlines()[0]}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> dict[str, Any]:
        shutil.copyfile(self.file, Path(directory) / TOKENIZER_FILE)
        return {"type": "hf", "file": TOKENIZER_FILE}

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.file)!r}, vocab_size={self.vocab_size}, eos_ids={self.eos_ids})"


def tokenizer_from_manifest(entry: dict[str, Any] | None, directory: Path, config: ModelConfig) -> Tokenizer | None:
    """The tokenizer a workbench checkpoint records (``None``: it has none)."""
    if entry is None:
        return None
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "bytes":
        return ByteTokenizer.for_config(config)
    if kind == "hf":
        file = directory / entry.get("file", TOKENIZER_FILE)
        if not file.is_file():
            raise ValueError(f"corrupt workbench checkpoint {directory}: tokenizer file {file.name} is missing")
        return HFTokenizer(file, bos_id=config.bos_id, eos_ids=config.eos_ids)
    raise ValueError(f"corrupt workbench checkpoint {directory}: unknown tokenizer entry {entry!r}")


def tokenizer_for_hf_dir(directory: Path, config: ModelConfig) -> Tokenizer | None:
    """The ``tokenizer.json`` of a Hugging Face checkpoint, or ``None`` when it has none."""
    file = directory / TOKENIZER_FILE
    return HFTokenizer(file, bos_id=config.bos_id, eos_ids=config.eos_ids) if file.is_file() else None


def missing_tokenizer(directory: str | os.PathLike) -> str | None:
    """What a checkpoint directory lacks to have a tokenizer, said for a user (None: it has one,
    or it is no checkpoint, which loading reports). Read from its files, before any weight loads."""
    from workbench.checkpoints.orbax import is_workbench_checkpoint, read_manifest  # it imports this module

    directory = Path(directory)
    if is_workbench_checkpoint(directory):
        if read_manifest(directory).get("tokenizer") is None:
            return f"checkpoint {directory} has no tokenizer (its workbench.json names none)"
        return None
    if not (directory / "config.json").is_file() or (directory / TOKENIZER_FILE).is_file():
        return None
    unread = [name for name in ("tokenizer.model", "vocab.json") if (directory / name).is_file()]
    also = f" ({' and '.join(unread)} alone cannot be read: the workbench reads {TOKENIZER_FILE})" if unread else ""
    return f"checkpoint {directory} has no tokenizer: {TOKENIZER_FILE} is missing{also}"


def default_tokenizer(config: ModelConfig) -> Tokenizer | None:
    """Bytes for a config laid out like ``tiny()`` (bytes first, specials after); else none."""
    specials = [config.bos_id, *config.eos_ids]
    if config.vocab_size > BYTES and all(i is not None and i >= BYTES for i in specials):
        return ByteTokenizer.for_config(config)
    return None


class StreamDecoder:
    """Text pieces of a growing token list: ``push(token)`` returns the text it adds.

    Decoding token by token breaks multi-byte characters (and BPE merges that depend on the
    neighbour); decoding the whole list and printing the new suffix does not. A trailing
    replacement character is held back: it may be a character whose last bytes are still coming.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is still held back (at the end of a request)."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # a tokenizer rewrote earlier text: print no repeats
            common = os.path.commonprefix([text, self.emitted])
            piece = text[len(common) :]
        else:
            piece = text[len(self.emitted) :]
        self.emitted = text
        return piece
