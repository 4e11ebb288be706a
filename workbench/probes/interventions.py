"""What the user writes: which activations to capture, and the interventions (ablate heads,
patch a site, steer the residual stream) as plain frozen dataclasses, with the checks they share."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from workbench.checks import check_int, is_int

SITES = ("residual", "attn_out", "mlp_out")  # where a Patch may write
ABLATE_MODES = ("zero", "mean")  # what an ablated head's output becomes


def check_layer(name: str, layer: Any, num_layers: int) -> int:
    layer = check_int(f"{name} layer", layer)
    if not 0 <= layer < num_layers:
        raise ValueError(f"{name}: layer {layer} is out of range: the model has layers 0..{num_layers - 1}")
    return layer


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which activations a step records. ``layers``: the layers to record (None: every layer).
    ``heads``: each query head's output before the ``o`` projection, [rows, T, N, H] (what
    ``inspect.logit_attribution`` splits per head)."""

    attention: bool = True
    residual: bool = True
    mlp: bool = True
    logits: bool = True
    layers: tuple[int, ...] | None = None
    heads: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(is_int(i) for i in self.layers):
                raise TypeError(f"Capture.layers must be a sequence of layer indices or None, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def records(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclasses.dataclass(frozen=True)
class Ablate:
    """Switch off query heads ``heads`` of ``layer``: their output (before the o projection) set
    to zero (the same as zeroing those heads' rows of ``o``), or with ``mode="mean"`` to its mean
    over the step's live queries (prefill: the prompt's tokens; generate: the live slots)."""

    layer: int
    heads: Sequence[int]
    mode: str = "zero"
    slots: Any = None


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace the activation at ``site`` of ``layer`` ("residual": the stream after the block;
    "attn_out" / "mlp_out": what attention / the MLP add) at the absolute ``positions`` by
    ``values`` ``[len(positions), D]`` -- typically another run's capture."""

    layer: int
    site: str
    positions: Sequence[int]
    values: Any
    slots: Any = None


@dataclasses.dataclass(frozen=True)
class Steer:
    """Add ``scale * vector`` ``[D]`` to the residual stream after block ``layer``, every position."""

    layer: int
    vector: Any
    scale: float = 1.0
    slots: Any = None


INTERVENTIONS = (Ablate, Patch, Steer)
