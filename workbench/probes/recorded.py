"""What the user gets back: :class:`Captured`, one step's recorded activations on the host, built
from the step's raw capture by :func:`captured_from`; :func:`captured` finds it on a result."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from workbench import sae, trees
from workbench.probes.interventions import Capture

NO_CAPTURE = "was not captured: pass probes=workbench.probes.Capture(...) to prefill / generate"


@dataclasses.dataclass(frozen=True, eq=False)
class Captured:
    """One step's recorded activations, on the host, trimmed to the real queries and the keys
    they could see. ``tokens``, ``positions``, ``live``: [rows, T] (rows: 1 for prefill, the
    slots for generate); per layer (see ``attention`` / ``attn_out`` / ``residual`` / ``mlp``)."""

    capture: Capture
    tokens: np.ndarray
    positions: np.ndarray
    live: np.ndarray
    sites: dict[str, dict[int, np.ndarray]]
    logits: np.ndarray | None
    sae_features: dict[int, sae.Features] = dataclasses.field(default_factory=dict)

    def site(self, name: str, layer: int) -> np.ndarray:
        if name not in self.sites:
            flag = {"attn_out": "attention", "mlp_out": "mlp", "router_ids": "router", "router_weights": "router"}
            flag = flag.get(name, name)
            raise ValueError(f"{name} {NO_CAPTURE} with {flag}=True")
        if layer not in self.sites[name]:
            raise ValueError(f"layer {layer} {NO_CAPTURE}: captured layers are {sorted(self.sites[name])}")
        return self.sites[name][layer]

    def attention(self, layer: int) -> np.ndarray:
        """Attention weights [rows, N, T, S] over keys 0 .. S-1 (S: one past the furthest query)."""
        return self.site("attention", layer)

    def attn_out(self, layer: int) -> np.ndarray:
        """What attention adds to the residual stream, [rows, T, D]."""
        return self.site("attn_out", layer)

    def residual(self, layer: int) -> np.ndarray:
        """The residual stream after block ``layer``, [rows, T, D]."""
        return self.site("residual", layer)

    def mlp(self, layer: int) -> np.ndarray:
        """What the MLP adds to the residual stream, [rows, T, D]."""
        return self.site("mlp_out", layer)

    def heads(self, layer: int) -> np.ndarray:
        """Each query head's output before the ``o`` projection, [rows, T, N, H]."""
        return self.site("heads", layer)

    def router(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """A sparse layer's routing (``Capture(router=True)``): each token's expert ids and
        weights, [rows, T, K] each, ids in descending order of weight."""
        return self.site("router_ids", layer), self.site("router_weights", layer)

    def features(self, layer: int) -> sae.Features:
        """The SAE reading of layer ``layer``'s residual (``Capture(sae={layer: ...})``): the
        strongest features per token, how many are active, the reconstruction error."""
        if layer not in self.sae_features:
            raise ValueError(f"SAE features of layer {layer} {NO_CAPTURE} with sae={{{layer}: an SAE}}")
        return self.sae_features[layer]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for per_layer in self.sites.values() for layer in per_layer})


SOWN = {
    "weights": "attention", "attn_out": "attn_out", "residual": "residual", "mlp_out": "mlp_out", "heads": "heads",
    "router_ids": "router_ids", "router_weights": "router_weights",
}  # fmt: skip


ROUTED = ("router_ids", "router_weights")  # the sites only a sparse layer has


def _without_absent_layers(sites: dict[str, dict[int, np.ndarray]], stacked: set[str]) -> None:
    """Drop the routing rows of the dense layers of a stacked capture. ``model.scan`` records every
    layer of a pattern mixing sparse and dense layers, filling a dense layer's routing rows (ids
    with -1, which no expert is; weights with NaN). Only the ids decide: a float site's NaN rows
    stay what they are, the activations of a step that overflowed."""
    if "router_ids" not in stacked:  # unrolled layers record only the sites they have
        return
    absent = {layer for layer, row in sites["router_ids"].items() if bool(np.all(row == -1))}
    for name in ROUTED:
        for layer in absent & set(sites.get(name, {})):
            del sites[name][layer]


def captured_from(raw: dict, capture: Capture) -> Captured:
    """The host-side :class:`Captured` of a step's raw capture (``run``'s second output)."""
    raw = jax.device_get(raw)
    live = np.asarray(raw["live"], bool)
    queries = int(np.flatnonzero(live.any(axis=0)).max(initial=-1)) + 1 if live.shape[1] > 1 else live.shape[1]
    keys = int(np.asarray(raw["positions"])[live].max(initial=-1)) + 1
    sites: dict[str, dict[int, np.ndarray]] = {}
    stacked: set[str] = set()
    logits = None
    for path, value in trees.leaf_paths(raw["sown"]).items():
        parts = path.split("/")
        if parts[0] == "logits":
            logits = np.asarray(value)[:, :queries]
            continue
        name = SOWN[[p for p in parts if p in SOWN][-1]]
        value = np.asarray(value)
        if parts[1].isdigit():  # layers/<i>/...: one layer's
            per_layer = {int(parts[1]): value}
        else:  # scanned layers, stacked: every layer's, or the asked ones in ascending order (plan.run)
            layers = range(value.shape[0]) if capture.layers is None else sorted(set(capture.layers))
            per_layer = dict(zip(layers, value))
            stacked.add(name)
        for layer, recorded in per_layer.items():
            trimmed = recorded[:, :, :queries, :keys] if name == "attention" else recorded[:, :queries]
            sites.setdefault(name, {})[layer] = trimmed
    _without_absent_layers(sites, stacked)
    cut = (slice(None), slice(0, queries))
    # SAEs read the captured residual on the host: no SAE weights enter the compiled step
    top = capture.sae_top
    features = {layer: sae.features(model, sites["residual"][layer], top) for layer, model in capture.sae or ()}
    return Captured(capture, raw["tokens"][cut], raw["positions"][cut], live[cut], sites, logits, features)


def captured(result: Any) -> Captured:
    """The :class:`Captured` of a ResultTokens (or a Captured itself); a one-line error when none."""
    found = getattr(result, "captured", result)
    if not isinstance(found, Captured):
        raise ValueError(f"this result {NO_CAPTURE}")
    return found
