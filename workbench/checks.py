"""One way to check input and to fail: ints (never bools), token ids, donated arrays.

Every layer raises through these, so the same mistake reads the same wherever it is made.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_int(value: Any) -> bool:
    """A Python or numpy integer; ``True`` and ``False`` are not ints here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, positive: bool = False) -> int:
    """``value`` as an int. Not an int: TypeError. With ``positive``, anything but an int >= 1 is
    a ValueError (``name must be a positive int, got 0``)."""
    if positive:
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    elif not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_token_ids(ids: Any, vocab_size: int, *, what: str = "token ids") -> np.ndarray:
    """``ids`` as an int32 array: TypeError unless integers, ValueError for an id outside 0..V-1."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integer token ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{vocab_size - 1})")
    return ids.astype(np.int32)


def check_not_donated(leaf: Any, where: str) -> None:
    """ValueError when ``leaf`` is an array that a call donated (insert, generate, free_resource)."""
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
        raise ValueError(
            f"{where} was donated to insert/generate (its arrays are deleted): take "
            "workbench.inspect.snapshot(state) before the call, and pass the snapshot"
        )
