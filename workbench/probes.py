"""Research instruments inside the engine's own steps: capture activations, intervene on them.

    capture = probes.Capture(attention=True, residual=True, mlp=True, logits=True)
    prefix, first = engine.prefill(..., probes=capture)       # first.captured: a Captured
    state, result = engine.generate(params, state, probes=capture,
                                    interventions=[probes.Ablate(1, [3]), probes.Steer(2, v, 4.0)])

**Capture** is ``Module.sow`` of ``nnx.Intermediate`` values at the hook sites
(:mod:`workbench.model.hooks`), collected by ``nnx.capture`` around the merged model's call inside
the jitted step and returned from it as a plain dict (so nothing outlives split / merge). Per
layer: the attention weights ``[rows, N, T, S]`` (rows: 1 for prefill, the slots for generate;
T the step's queries; S the keys it read), the attention block's output ``attn_out`` and the MLP
output ``mlp`` (``[rows, T, D]``, what each adds to the residual stream), the residual stream after
the block ``residual``; and the final logits ``[rows, T, V]``.

**Interventions** are data. :func:`prepare` turns a list of them into dense arrays over layers
(``[L, rows, N]`` head gains, ``[L, rows, D]`` steering vectors, ``[L, P, ...]`` patches) passed
into the jitted step; only the *kinds* present (and a patch's count of positions, rounded up to
a power of two) are static.
So changing a layer, a head, a value or a slot does not recompile. ``slots`` on an intervention
is the slot mask: which decode rows it applies to (None: all; prefill has one row, 0).

Zero cost when off: with no probes and no interventions the engine calls its steps exactly as
before (the hooks are ``None`` and every hook site is a Python ``if``), so the compiled programs
are today's. Each probe setting compiles once, counted as ``"prefill+probes"`` / ``"generate+probes"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from workbench import trees
from workbench.checks import check_int, check_token_ids, is_int
from workbench.model.hooks import Hooks

SITES = ("residual", "attn_out", "mlp_out")
MODES = ("zero", "mean")


def check_layer(name: str, layer: Any, num_layers: int) -> int:
    layer = check_int(f"{name} layer", layer)
    if not 0 <= layer < num_layers:
        raise ValueError(f"{name}: layer {layer} is out of range: the model has layers 0..{num_layers - 1}")
    return layer


# ---- what the user writes ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Capture:
    """Which activations a step records. ``layers``: the layers to record (None: every layer)."""

    attention: bool = True
    residual: bool = True
    mlp: bool = True
    logits: bool = True
    layers: tuple[int, ...] | None = None

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


# ---- what the jitted step gets ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """The static half of a probe setting (a jit static argument): what to capture, which kinds
    of intervention are present, and each patched site's count of positions."""

    capture: Capture | None = None
    ablate: bool = False
    steer: bool = False
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


def _check_overlaps(site: str, entries: list, rows: int) -> None:
    """ValueError when two patches write the same layer, position and slot of ``site``."""
    taken: dict[tuple[int, int], np.ndarray] = {}
    for layer, position, mask, _ in entries:
        before = taken.setdefault((layer, position), np.zeros(rows, bool))
        if (before & mask).any():
            raise ValueError(f"Patch: {site} of layer {layer} at position {position} is patched twice")
        before |= mask


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
    keep, mean = np.ones((L, rows, N), np.float32), np.zeros((L, rows, N), np.float32)
    steer = np.zeros((L, rows, D), np.float32)
    patches: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for item in interventions:
        if not isinstance(item, INTERVENTIONS):
            raise TypeError(f"interventions must be probes.Ablate / Patch / Steer, got {type(item).__name__}")
        what = type(item).__name__
        layer = check_layer(what, item.layer, L)
        mask = _slot_mask(what, item.slots, rows)
        if isinstance(item, Ablate):
            if is_int(item.heads) or isinstance(item.heads, str):
                raise TypeError(f"Ablate: heads must be a list of head indices, got {item.heads!r}")
            if item.mode not in MODES:
                raise ValueError(f"Ablate: mode must be one of {MODES}, got {item.mode!r}")
            for head in item.heads:
                if not is_int(head) or not 0 <= head < N:
                    raise ValueError(f"Ablate: head {head!r} is out of range: layer {layer} has heads 0..{N - 1}")
                keep[layer, mask, head] = 0.0
                mean[layer, mask, head] = 1.0 if item.mode == "mean" else 0.0
        elif isinstance(item, Steer):
            steer[layer, mask] += float(item.scale) * _vectors("Steer", item.vector, (D,))
        else:
            if item.site not in SITES:
                raise ValueError(f"Patch: site must be one of {SITES}, got {item.site!r}")
            positions = [check_int("Patch position", p) for p in item.positions]
            if len(set(positions)) != len(positions) or any(p < 0 for p in positions):
                raise ValueError(f"Patch: positions must be distinct and >= 0, got {positions}")
            values = _vectors("Patch", item.values, (len(positions), D))
            patches.setdefault(item.site, []).extend((layer, p, mask, v) for p, v in zip(positions, values))
    # The kinds present are static (an Ablate of no heads still compiles the ablating program, so
    # a baseline run shares it); everything else is data.
    plan = Plan(
        capture, any(isinstance(i, Ablate) for i in interventions), any(isinstance(i, Steer) for i in interventions)
    )
    data: dict[str, Any] = {}
    if plan.ablate:
        data["keep"], data["mean"] = keep, mean
    if plan.steer:
        data["steer"] = steer
    sizes = []
    for site in sorted(patches):  # a static plan that does not depend on the order given
        entries = patches[site]
        _check_overlaps(site, entries, rows)
        # Room for a power of two of entries (unused ones never match): patching n positions
        # compiles once per power of two, not once per n.
        P = 1 << max(len(entries) - 1, 0).bit_length()  # noqa: N806
        sizes.append((site, P))
        positions = np.full((L, P), -1, np.int32)
        masks, values = np.zeros((L, P, rows), bool), np.zeros((L, P, D), np.float32)
        for j, (layer, p, mask, v) in enumerate(entries):
            positions[layer, j], masks[layer, j], values[layer, j] = p, mask, v
        data[f"patch_{site}"] = (positions, masks, values)
    plan = dataclasses.replace(plan, patches=tuple(sizes))
    return plan, data


# ---- inside the jitted step ---------------------------------------------------------------------
def run(model: Any, plan: Plan, data: dict | None, tokens, positions, live, logits_at=None) -> tuple[jax.Array, dict]:
    """Call a merged model under ``plan`` inside a jitted step: (logits, the raw capture).

    With ``Capture(logits=True)`` every position's logits are computed (and recorded); the
    step still gets the rows at ``logits_at`` [B] when given."""
    hooks = Hooks(plan, data or {}, positions, live)
    every = plan.capture is not None and plan.capture.logits
    call = nnx.capture(model, nnx.Intermediate)  # what the hooks ``sow`` comes back as a State
    logits, sown = call(tokens, positions, logits_at=None if every else logits_at, hooks=hooks)
    if every and logits_at is not None:
        logits = jnp.take_along_axis(logits, logits_at[:, None, None], axis=1)[:, 0]
    return logits, {"sown": nnx.to_pure_dict(sown), "tokens": tokens, "positions": positions, "live": live}


# ---- what the user gets back --------------------------------------------------------------------
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

    def site(self, name: str, layer: int) -> np.ndarray:
        if name not in self.sites:
            flag = {"attn_out": "attention", "mlp_out": "mlp"}.get(name, name)
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

    @property
    def layers(self) -> list[int]:
        return sorted({layer for per_layer in self.sites.values() for layer in per_layer})


SOWN = {"weights": "attention", "attn_out": "attn_out", "residual": "residual", "mlp_out": "mlp_out"}


def captured_from(raw: dict, capture: Capture) -> Captured:
    """The host-side :class:`Captured` of a step's raw capture (``run``'s second output)."""
    raw = jax.device_get(raw)
    live = np.asarray(raw["live"], bool)
    queries = int(np.flatnonzero(live.any(axis=0)).max(initial=-1)) + 1 if live.shape[1] > 1 else live.shape[1]
    keys = int(np.asarray(raw["positions"])[live].max(initial=-1)) + 1
    sites: dict[str, dict[int, np.ndarray]] = {}
    logits = None
    for path, value in trees.leaf_paths(raw["sown"]).items():
        parts = path.split("/")
        if parts[0] == "logits":
            logits = np.asarray(value)[:, :queries]
            continue
        name = SOWN[[p for p in parts if p in SOWN][-1]]
        value = np.asarray(value)
        value = value[:, :, :queries, :keys] if name == "attention" else value[:, :queries]
        sites.setdefault(name, {})[int(parts[1])] = value
    cut = (slice(None), slice(0, queries))
    return Captured(capture, raw["tokens"][cut], raw["positions"][cut], live[cut], sites, logits)


def attach(result: Any, raw: dict, plan: Plan) -> Any:
    """``result`` (a ResultTokens) carrying the step's :class:`Captured` (None without a capture)."""
    return result if plan.capture is None else result.replace(captured=captured_from(raw, plan.capture))


def captured(result: Any) -> Captured:
    """The :class:`Captured` of a ResultTokens (or a Captured itself); a one-line error when none."""
    found = getattr(result, "captured", result)
    if not isinstance(found, Captured):
        raise ValueError(f"this result {NO_CAPTURE}")
    return found


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, plan, params, rest, tokens, data):
    model = nnx.merge(graphdef, params, rest, copy=True)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return run(model, plan, data, tokens, positions, jnp.ones(tokens.shape, bool))


def forward(
    engine: Any, params: Any, tokens: Any, capture: Capture | None = None, interventions: Sequence[Any] | None = None
) -> tuple[jax.Array, Captured | None]:
    """The uncached forward pass (``engine.forward``'s oracle) under probes: (logits [B, T, V], Captured)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [batch, length], got shape {tokens.shape}")
    plan, data = prepare(capture, interventions, engine.config, tokens.shape[0])
    if plan is None:
        return engine.forward(params, tokens), None
    check_token_ids(tokens, engine.config.vocab_size)
    logits, raw = _forward(engine.forward_graphdef, plan, params, engine.rest, jnp.asarray(tokens, jnp.int32), data)
    return logits, None if capture is None else captured_from(raw, capture)


def unembed(engine: Any, params: Any, vectors: Any) -> np.ndarray:
    """Float32 logits [R, V] of residual-stream vectors [R, D] through the model's own final norm
    and unembedding (the logit lens): a one-token forward per row whose last block's output is
    patched to the vector, so no second copy of the model's tail exists to drift from it."""
    vectors = np.asarray(vectors, np.float32)
    last = engine.config.num_layers - 1
    patches = [Patch(last, "residual", [0], v[None], slots=[r]) for r, v in enumerate(vectors)]
    logits, _ = forward(engine, params, np.zeros((len(vectors), 1), np.int32), None, patches)
    return np.asarray(logits)[:, 0]
