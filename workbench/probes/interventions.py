"""What the user writes: which activations to capture, and the interventions (ablate heads,
patch a site, steer the residual stream) as plain frozen dataclasses, with the checks they share."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from workbench.checks import check_int, is_int
from workbench.sae import SAE

SITES = ("residual", "attn_out", "mlp_out", "heads")  # where a Patch may write
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
    ``inspect.logit_attribution`` splits per head). ``sae``: ``{layer: workbench.sae.SAE}``, read
    on the host over that layer's captured residual: ``Captured.features(layer)`` holds the
    ``sae_top`` strongest features per token and the reconstruction error (the SAEs take no part
    in the compiled step, so changing them never recompiles). ``router``: each token's expert ids
    and weights [rows, T, K] at every sparse layer of a mixture of experts (``Captured.router``)."""

    attention: bool = True
    residual: bool = True
    mlp: bool = True
    logits: bool = True
    layers: tuple[int, ...] | None = None
    heads: bool = False
    router: bool = False
    sae: Any = dataclasses.field(default=None, compare=False)
    sae_top: int = dataclasses.field(default=10, compare=False)  # host-side: no recompile

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(is_int(i) for i in self.layers):
                raise TypeError(f"Capture.layers must be a sequence of layer indices or None, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.sae is not None:
            pairs = dict(self.sae).items() if not isinstance(self.sae, dict) else self.sae.items()
            if not all(is_int(k) and isinstance(v, SAE) for k, v in pairs):
                raise TypeError("Capture.sae must map layer indices to workbench.sae.SAE (workbench.sae.load)")
            if not self.residual:
                raise ValueError("Capture(sae=...) reads the residual stream: pass residual=True")
            for layer in dict(pairs):
                if not self.records(int(layer)):
                    raise ValueError(f"Capture(sae=...): layer {layer} is not among the captured layers {self.layers}")
            object.__setattr__(self, "sae", tuple(sorted((int(k), v) for k, v in pairs)))
            check_int("Capture.sae_top", self.sae_top)
            if self.sae_top < 1:
                raise ValueError(f"Capture.sae_top must be at least 1, got {self.sae_top}")

    def records(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclasses.dataclass(frozen=True)
class Ablate:
    """Switch off query heads ``heads`` of ``layer``: their output (before the o projection) set
    to zero (the same as zeroing those heads' rows of ``o``), or with ``mode="mean"`` to its mean
    over the step's live queries (prefill: the prompt's tokens; generate: the live slots).
    ``experts``: experts of a sparse ``layer`` (a mixture of experts) removed from the choice:
    their router logits at -inf, so each token's k experts are picked among the rest."""

    layer: int
    heads: Sequence[int] = ()
    mode: str = "zero"
    slots: Any = None
    experts: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace the activation at ``site`` of ``layer`` ("residual": the stream after the block;
    "attn_out" / "mlp_out": what attention / the MLP add; "heads": the query heads' outputs before
    ``o``) at the absolute ``positions`` by ``values`` ``[len(positions), D]`` (``heads``:
    ``[len(positions), N, H]``, every head's) -- typically another run's capture."""

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


@dataclasses.dataclass(frozen=True, eq=False)
class SteerFeature:
    """Steer one feature of an SAE (``workbench.sae``) in the residual stream after block ``layer``,
    every position: ``mode="add"`` adds ``value`` times the feature's decoder row (the same as
    ``Steer(layer, sae.W_dec[feature], value)``); ``mode="clamp"`` sets the feature to ``value``
    and keeps what the SAE does not explain: ``x + (value - f(x)) * W_dec[feature]``, ``f(x)`` the
    feature's activation on ``x`` (JumpReLU or ReLU SAEs; a topk SAE's feature depends on the others)."""

    layer: int
    sae: Any
    feature: int
    value: float
    mode: str = "add"
    slots: Any = None


STEER_MODES = ("add", "clamp")
INTERVENTIONS = (Ablate, Patch, Steer, SteerFeature)
