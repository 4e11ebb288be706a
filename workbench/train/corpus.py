"""The training corpus: the Python standard library's ``*.py`` files as byte streams, split by
a rule per file, and the windows batches and evaluations are cut from (see ``workbench.train``)."""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workbench.model.config import BYTE_BOS, BYTE_EOS

EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__phello__",
    }
)
HELD_OUT_MODULUS = 10


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix) of the corpus files under ``root`` (default: the stdlib), sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus root {root} is not a directory")
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        dirs = relative.parts[:-1]
        if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
            continue
        if relative.name.startswith("_sysconfigdata_") or not path.is_file():
            continue
        files.append(relative.as_posix())
    if not files:
        raise ValueError(f"no corpus files (*.py) under {root}")
    return sorted(files)


def is_held_out(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % HELD_OUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The two token streams (int32, ``BOS bytes EOS`` per file) and the files in each."""

    train: np.ndarray  # [n_train_tokens]
    held_out: np.ndarray  # [n_held_out_tokens]
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]

    def digest(self, split: str) -> str:
        return hashlib.sha256(getattr(self, split).astype(np.int32).tobytes()).hexdigest()


def encode_files(root: Path, paths: Sequence[str], bos: int, eos: int) -> np.ndarray:
    pieces = []
    for relative in paths:
        data = np.frombuffer((root / relative).read_bytes(), np.uint8).astype(np.int32)
        pieces.append(np.concatenate([[bos], data, [eos]]).astype(np.int32))
    return np.concatenate(pieces)


def load_corpus(root: Path | None = None, *, bos: int = BYTE_BOS, eos: int = BYTE_EOS) -> Corpus:
    root = stdlib_root() if root is None else Path(root)
    files = corpus_files(root)
    train_files = tuple(f for f in files if not is_held_out(f))
    held_out_files = tuple(f for f in files if is_held_out(f))
    if not train_files or not held_out_files:
        raise ValueError(f"the corpus under {root} is too small to split ({len(files)} files)")
    return Corpus(
        encode_files(root, train_files, bos, eos),
        encode_files(root, held_out_files, bos, eos),
        train_files,
        held_out_files,
    )


def random_windows(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """``batch`` windows [batch, seq_len + 1] at uniformly random offsets: inputs and shifted targets."""
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    return stream[starts[:, None] + np.arange(seq_len + 1)]


def spaced_windows(stream: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """``count`` windows [count, seq_len + 1] evenly spread over ``stream``: a fixed evaluation set."""
    starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(np.int64)
    return stream[starts[:, None] + np.arange(seq_len + 1)]


HELD_OUT_WINDOWS = "held_out_windows.npz"  # in the default model's directory


def held_out_windows(count: int, seq_len: int = 128) -> np.ndarray:
    """The default model's evaluation windows [count, seq_len + 1]: ``spaced_windows`` of the held-out
    stream it was trained beside (Python 3.11.7's stdlib), stored with it, since another Python's
    stdlib holds other text and so gives other losses. Stored: (4, 128) and (8, 128)."""
    from workbench.load import DEFAULT_MODEL_DIR  # workbench.load imports the engine: only when asked

    key = f"{count}x{seq_len}"
    with np.load(DEFAULT_MODEL_DIR / HELD_OUT_WINDOWS) as stored:
        if key not in stored:
            raise ValueError(f"no stored held-out windows {key} (stored: {', '.join(sorted(stored))})")
        return stored[key]
