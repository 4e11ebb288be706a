"""What the jitted step gets: :func:`prepare` turns a capture and interventions into a static
:class:`Plan` and dense arrays; :func:`run` calls the merged model under them inside the step;
:func:`attach` hands the step's capture back on its result."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench.checks import check_int, is_int
from workbench.model.hooks import Hooks
from workbench.probes.interventions import (
    ABLATE_MODES,
    INTERVENTIONS,
    SITES,
    STEER_MODES,
    Ablate,
    Capture,
    Steer,
    SteerFeature,
    check_layer,
)
from workbench.probes.recorded import captured_from
from workbench.sae import SAE


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static half of a probe setting (a jit static argument): what to capture, which kinds
    of intervention are present, and each patched site's count of positions."""

    capture: Capture | None = None
    ablate: bool = False
    steer: bool = False
    clamp: bool = False
    experts: bool = False  # some Ablate removes experts
    patches: tuple[tuple[str, int], ...] = ()


def _slot_mask(what: str, slots: Any, rows: int) -> np.ndarray:
    """The rows an intervention applies to: None -> all; slot indices or a bool mask [rows]."""
    if slots is None:
        return np.ones(rows, bool)
    slots = np.asarray(slots)
    if slots.dtype == bool:
        if slots.shape != (rows,):
            raise ValueError(f"{what}: slot mask has shape {slots.shape}, expected ({rows},)")
        return slots
    if slots.dtype.kind not in "iu" or slots.ndim != 1 or ((slots < 0) | (slots >= rows)).any():
        raise ValueError(f"{what}: slots must be indices in 0..{rows - 1} or a bool mask, got {slots.tolist()}")
    mask = np.zeros(rows, bool)
    mask[slots] = True
    return mask


def _vectors(what: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values, np.float32)
    if array.shape != shape:
        raise ValueError(f"{what}: values have shape {array.shape}, but the site takes {shape}")
    return array


def site_width(site: str, config: Any) -> int:
    """A patched site's width: D, or N * H for the query heads' outputs (flattened)."""
    return config.num_heads * config.head_dim if site == "heads" else config.embed_dim


def _check_overlaps(site: str, entries: list, rows: int) -> None:
    """ValueError when two patches write the same layer, position and slot of ``site``."""
    taken: dict[tuple[int, int], np.ndarray] = {}
    for layer, position, mask, _ in entries:
        before = taken.setdefault((layer, position), np.zeros(rows, bool))
        if (before & mask).any():
            raise ValueError(f"Patch: {site} of layer {layer} at position {position} is patched twice")
        before |= mask


def _check_width(what: str, sae: Any, width: int) -> None:
    if not isinstance(sae, SAE):
        raise TypeError(f"{what}: sae must be a workbench.sae.SAE (workbench.sae.load), got {type(sae).__name__}")
    if sae.d_in != width:
        raise ValueError(f"{what}: the SAE reads width {sae.d_in}, but the residual stream is {width} wide")


def _clamp_arrays(L: int, rows: int, D: int) -> dict[str, np.ndarray]:  # noqa: N803 (axis letters)
    """Per layer and row, one clamped feature: its encoder column, bias, threshold, decoder row,
    the value it is clamped to, and whether a clamp applies there at all."""
    return {
        "enc": np.zeros((L, rows, D), np.float32), "bias": np.zeros((L, rows), np.float32),
        "threshold": np.zeros((L, rows), np.float32), "dec": np.zeros((L, rows, D), np.float32),
        "value": np.zeros((L, rows), np.float32), "on": np.zeros((L, rows), bool),
    }  # fmt: skip


def _steer_feature(item: SteerFeature, layer: int, mask: np.ndarray, D: int, steer, clamp) -> None:  # noqa: N803
    _check_width("SteerFeature", item.sae, D)
    if item.mode not in STEER_MODES:
        raise ValueError(f"SteerFeature: mode must be one of {STEER_MODES}, got {item.mode!r}")
    sae, i = item.sae, item.sae.feature(item.feature)
    if item.mode == "add":
        steer[layer, mask] += float(item.value) * sae.W_dec[i]
        return
    if sae.architecture == "topk":
        raise ValueError("SteerFeature: a topk SAE's feature depends on the others; clamp needs a JumpReLU or ReLU SAE")
    if (clamp["on"][layer] & mask).any():
        raise ValueError(f"SteerFeature: layer {layer} already clamps a feature in one of these slots")
    bias = sae.b_enc[i] - (sae.b_dec @ sae.W_enc[:, i] if sae.apply_b_dec_to_input else 0.0)
    threshold = sae.threshold[i] if sae.architecture == "jumprelu" else 0.0
    values = (sae.W_enc[:, i], bias, threshold, sae.W_dec[i], float(item.value), True)
    for name, value in zip(("enc", "bias", "threshold", "dec", "value", "on"), values):
        clamp[name][layer, mask] = value


def _ablate_experts(item: Ablate, layer: int, mask: np.ndarray, config: Any, expert_keep: np.ndarray) -> None:
    if is_int(item.experts) or isinstance(item.experts, str):
        raise TypeError(f"Ablate: experts must be a list of expert indices, got {item.experts!r}")
    if not len(item.experts):
        return
    if not config.sparse(layer):
        raise ValueError(f"Ablate: layer {layer} has no experts (a dense MLP)")
    E = config.num_experts  # noqa: N806
    for expert in item.experts:
        if not is_int(expert) or not 0 <= expert < E:
            raise ValueError(f"Ablate: expert {expert!r} is out of range: layer {layer} has experts 0..{E - 1}")
        expert_keep[layer, mask, expert] = False
    if (expert_keep[layer].sum(-1) < config.num_experts_per_tok).any():
        raise ValueError(
            f"Ablate: layer {layer} would keep fewer experts than the {config.num_experts_per_tok} each token runs"
        )


def prepare(
    capture: Capture | None, interventions: Sequence[Any] | None, config: Any, rows: int
) -> tuple[Plan | None, dict[str, Any] | None]:
    """(static plan, arrays) for one step of ``rows`` batch rows; (None, None) when nothing is asked."""
    if capture is not None and not isinstance(capture, Capture):
        raise TypeError(f"probes must be a workbench.probes.Capture, got {type(capture).__name__}")
    interventions = list(interventions or ())
    if capture is None and not interventions:
        return None, None
    L, N, D = config.num_layers, config.num_heads, config.embed_dim  # noqa: N806 (axis letters)
    if capture is not None:
        for layer in capture.layers or ():
            check_layer("Capture", layer, L)
        for layer, sae in capture.sae or ():
            check_layer("Capture(sae=...)", layer, L)
            _check_width(f"Capture(sae=...) layer {layer}", sae, D)
    keep, mean = np.ones((L, rows, N), np.float32), np.zeros((L, rows, N), np.float32)
    expert_keep = np.ones((L, rows, max(config.num_experts, 1)), bool)
    steer = np.zeros((L, rows, D), np.float32)
    clamp = _clamp_arrays(L, rows, D)
    patches: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for item in interventions:
        if not isinstance(item, INTERVENTIONS):
            raise TypeError(
                f"interventions must be probes.Ablate / Patch / Steer / SteerFeature, got {type(item).__name__}"
            )
        what = type(item).__name__
        layer = check_layer(what, item.layer, L)
        mask = _slot_mask(what, item.slots, rows)
        if isinstance(item, Ablate):
            if is_int(item.heads) or isinstance(item.heads, str):
                raise TypeError(f"Ablate: heads must be a list of head indices, got {item.heads!r}")
            if item.mode not in ABLATE_MODES:
                raise ValueError(f"Ablate: mode must be one of {ABLATE_MODES}, got {item.mode!r}")
            for head in item.heads:
                if not is_int(head) or not 0 <= head < N:
                    raise ValueError(f"Ablate: head {head!r} is out of range: layer {layer} has heads 0..{N - 1}")
                keep[layer, mask, head] = 0.0
                mean[layer, mask, head] = 1.0 if item.mode == "mean" else 0.0
            _ablate_experts(item, layer, mask, config, expert_keep)
        elif isinstance(item, Steer):
            steer[layer, mask] += float(item.scale) * _vectors("Steer", item.vector, (D,))
        elif isinstance(item, SteerFeature):
            _steer_feature(item, layer, mask, D, steer, clamp)
        else:
            if item.site not in SITES:
                raise ValueError(f"Patch: site must be one of {SITES}, got {item.site!r}")
            positions = [check_int("Patch position", p) for p in item.positions]
            if len(set(positions)) != len(positions) or any(p < 0 for p in positions):
                raise ValueError(f"Patch: positions must be distinct and >= 0, got {positions}")
            shape = (len(positions), N, config.head_dim) if item.site == "heads" else (len(positions), D)
            values = _vectors("Patch", item.values, shape).reshape(len(positions), site_width(item.site, config))
            patches.setdefault(item.site, []).extend((layer, p, mask, v) for p, v in zip(positions, values))
    # The kinds present are static (an Ablate of no heads still compiles the ablating program, so
    # a baseline run shares it); everything else is data.
    adds = any(isinstance(i, Steer) or isinstance(i, SteerFeature) and i.mode == "add" for i in interventions)
    clamps = any(isinstance(i, SteerFeature) and i.mode == "clamp" for i in interventions)
    ablates = [i for i in interventions if isinstance(i, Ablate)]
    removes = any(len(i.experts) for i in ablates)
    # an Ablate of neither heads nor experts is a head ablation of none (the baseline's program)
    plan = Plan(capture, any(len(i.heads) or not len(i.experts) for i in ablates), adds, clamps, removes)
    data: dict[str, Any] = {}
    if plan.ablate:
        data["keep"], data["mean"] = keep, mean
    if plan.experts:
        data["expert_keep"] = expert_keep
    if plan.steer:
        data["steer"] = steer
    if plan.clamp:
        data["clamp"] = clamp
    sizes = []
    for site in sorted(patches):  # a static plan that does not depend on the order given
        entries = patches[site]
        _check_overlaps(site, entries, rows)
        # Room for a power of two of entries (unused ones never match): patching n positions
        # compiles once per power of two, not once per n.
        P = 1 << max(len(entries) - 1, 0).bit_length()  # noqa: N806
        sizes.append((site, P))
        positions = np.full((L, P), -1, np.int32)
        masks, values = np.zeros((L, P, rows), bool), np.zeros((L, P, site_width(site, config)), np.float32)
        for j, (layer, p, mask, v) in enumerate(entries):
            positions[layer, j], masks[layer, j], values[layer, j] = p, mask, v
        data[f"patch_{site}"] = (positions, masks, values)
    plan = dataclasses.replace(plan, patches=tuple(sizes))
    return plan, data


def run(
    model: Any, plan: Plan, data: dict | None, tokens, positions, live, logits_at=None, adapters=None
) -> tuple[jax.Array, dict]:
    """Call a merged model under ``plan`` inside a jitted step: (logits, the raw capture).

    With ``Capture(logits=True)`` every position's logits are computed (and recorded); the
    step still gets the rows at ``logits_at`` [B] when given. ``adapters`` [B]: each row's LoRA
    adapter (-1: the base model), on a model with adapters; None: none."""
    hooks = Hooks(plan, data or {}, positions, live)
    every = plan.capture is not None and plan.capture.logits
    call = nnx.capture(model, nnx.Intermediate)  # what the hooks ``sow`` comes back as a State
    at = None if every else logits_at
    logits, sown = call(tokens, positions, logits_at=at, adapters=adapters, hooks=hooks)
    if every and logits_at is not None:
        logits = jnp.take_along_axis(logits, logits_at[:, None, None], axis=1)[:, 0]
    sown = asked_layers(nnx.to_pure_dict(sown), plan.capture)
    return logits, {"sown": sown, "tokens": tokens, "positions": positions, "live": live}


def asked_layers(sown: dict, capture: Capture | None) -> dict:
    """Scanned layers record every layer, stacked ``[L, ...]`` under ``layers/<site>`` (the layer
    index is traced): keep the rows of the layers ``capture`` asks for, in ascending order, so
    only those leave the device. An unrolled model's records (``layers/<i>/...``) are kept as they are."""
    layers = sown.get("layers")
    if capture is None or capture.layers is None or not layers or any(isinstance(k, int) for k in layers):
        return sown
    rows = jnp.asarray(sorted(set(capture.layers)), jnp.int32)
    return {**sown, "layers": jax.tree.map(lambda stacked: stacked[rows], layers)}


def attach(result: Any, raw: dict, plan: Plan) -> Any:
    """``result`` (a ResultTokens) carrying the step's :class:`Captured` (None without a capture)."""
    return result if plan.capture is None else result.replace(captured=captured_from(raw, plan.capture))
