"""``probes.patching_sweep``: activation patching of every (layer, position) or (layer, head), each
patch one row of a batched run.

The clean prompt runs once per world, a batch of ``engine.max_concurrent_decodes`` rows (the
decode slots are the worlds); each row carries one :class:`~workbench.probes.Patch` that writes
the corrupt prompt's activation in (``slots=[row]``), and ``metric`` reads that row's logits.
More worlds than rows run in rounds, every round the same shape and patch count (the last is
filled with copies of its first world), so the sweep compiles once. The patched run is the
uncached forward under probes (:func:`workbench.probes.forward`, the oracle of the cached steps).

``over="layer_position"`` patches ``site`` (the residual stream after a block by default) of one
layer at one position; ``over="layer_head"`` patches one query head's output before ``o`` at
every position of ``positions`` (the other heads keep the clean run's outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from workbench.checks import check_token_ids, is_int
from workbench.probes.interventions import SITES, Capture, Patch, check_layer
from workbench.probes.uncached import forward

OVER = ("layer_position", "layer_head")


@dataclasses.dataclass(frozen=True, eq=False)
class Sweep:
    """A table of ``metric`` [layers, positions | heads]: ``table[i, j]`` is the metric with layer
    ``layers[i]``'s cell ``columns[j]`` patched from the corrupt run (``kind="exact"``) or its
    first-order estimate (``kind="attribution"``). ``clean`` / ``corrupt``: the metric of each
    unpatched run; ``labels``: a label per column (the clean token at a position, or ``h<i>``)."""

    table: np.ndarray
    over: str
    site: str
    layers: tuple[int, ...]
    columns: tuple[int, ...]
    labels: tuple[str, ...]
    clean: float
    corrupt: float
    kind: str = "exact"

    @property
    def effect(self) -> np.ndarray:
        """The change each patch makes: ``table - clean``."""
        return self.table - self.clean

    def correlation(self, other: Sweep) -> float:
        """Pearson correlation of the two tables' effects (e.g. the exact sweep and its attribution estimate)."""
        if other.table.shape != self.table.shape:
            raise ValueError(f"the sweeps differ in shape: {self.table.shape} and {other.table.shape}")
        return float(np.corrcoef(self.effect.ravel(), other.effect.ravel())[0, 1])

    def text(self, digits: int = 3) -> str:
        """The table as aligned text, rounded to ``digits`` (``-0.000`` printed as ``0.000``)."""
        head = ["layer"] + [f"{c}:{label}" if self.over == "layer_position" else label
                            for c, label in zip(self.columns, self.labels)]  # fmt: skip
        rows = [[str(layer)] + [f"{v + 0.0:.{digits}f}" for v in np.round(row, digits)]
                for layer, row in zip(self.layers, self.table)]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows])

    def __str__(self) -> str:
        what = f"{self.site} at each position" if self.over == "layer_position" else "each head's output"
        name = "attribution patching (estimate)" if self.kind == "attribution" else "activation patching"
        return f"{name}, {what}: metric (clean {self.clean:.3f}, corrupt {self.corrupt:.3f})\n{self.text()}"

    def plot(self, beside: Sweep | None = None):
        """A heatmap of the table (layers down, positions or heads across); with ``beside`` (the
        attribution estimate of the same sweep), both, one above the other on one color scale each."""
        from workbench.inspect import plots

        panels = [(self.kind, self.table)] + ([] if beside is None else [(beside.kind, beside.table)])
        xlabel = "position" if self.over == "layer_position" else "head"
        labels = [repr(label)[1:-1] if self.over == "layer_position" else label for label in self.labels]
        layers = [str(i) for i in self.layers]
        title = f"patching {self.site}: metric"
        return plots.heatmaps(panels, xlabel=xlabel, ylabel="layer", title=title, xticklabels=labels,
                              yticklabels=layers, colorbar="metric")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A sweep's checked inputs: the two prompts' ids [T] and the cells to patch."""

    clean: np.ndarray
    corrupt: np.ndarray
    over: str
    site: str
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    columns: tuple[int, ...]
    labels: tuple[str, ...]


def _ids(engine: Any, what: str, prompt: Any) -> np.ndarray:
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise ValueError(f"{what}: this model has no tokenizer; give token ids")
        prompt = engine.tokenizer.encode(prompt)
    ids = check_token_ids(np.asarray(prompt), engine.config.vocab_size, what=f"{what} token ids")
    if ids.ndim != 1 or not len(ids):
        raise ValueError(f"{what} must be a text or a non-empty list of token ids, got shape {ids.shape}")
    return ids


def check_inputs(engine, clean, corrupt, over, site, layers, positions) -> Inputs:
    """The one-line errors every sweep shares, and the cells it patches."""
    clean, corrupt = _ids(engine, "clean", clean), _ids(engine, "corrupt", corrupt)
    if len(clean) != len(corrupt):
        raise ValueError(f"clean and corrupt must have the same number of tokens, got {len(clean)} and {len(corrupt)}")
    if len(clean) > engine.max_target_length:
        raise ValueError(
            f"the prompts have {len(clean)} tokens, more than max_target_length ({engine.max_target_length})"
        )
    if over not in OVER:
        raise ValueError(f"over must be one of {OVER}, got {over!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    if over == "layer_head" and site != "residual":
        raise ValueError("over='layer_head' patches each head's output: leave site at its default")
    config = engine.config
    layers = tuple(range(config.num_layers)) if layers is None else tuple(check_layer("sweep", i, config.num_layers)
                                                                         for i in layers)  # fmt: skip
    T = len(clean)  # noqa: N806
    if positions is None:
        positions = tuple(range(T))
    else:
        if is_int(positions) or not all(is_int(p) for p in positions) or not len(positions):
            raise TypeError(f"positions must be a non-empty list of positions, got {positions!r}")
        for p in positions:
            if not 0 <= p < T:
                raise ValueError(f"position {p} is out of range: the prompts have positions 0..{T - 1}")
        positions = tuple(sorted({int(p) for p in positions}))
    if over == "layer_position":
        columns = positions
        tokenizer = engine.tokenizer
        labels = tuple(tokenizer.decode([int(clean[p])]) if tokenizer else str(clean[p]) for p in positions)
    else:
        columns = tuple(range(config.num_heads))
        labels = tuple(f"h{h}" for h in columns)
    site = "heads" if over == "layer_head" else site
    return Inputs(clean, corrupt, over, site, layers, positions, columns, labels)


def activations(engine, params, inputs: Inputs) -> tuple[jax.Array, dict[int, np.ndarray]]:
    """Both prompts' logits [2, T, V] (clean row 0, corrupt row 1) and the patched site of each
    swept layer, {layer: [2, T, W]} (``heads``: [2, T, N, H]), from one forward pass."""
    # Every site, every layer: one program serves every sweep of these prompts' length.
    capture = Capture(attention=True, residual=True, mlp=True, logits=False, heads=True)
    logits, captured = forward(engine, params, np.stack([inputs.clean, inputs.corrupt]), capture)
    return logits.astype(jnp.float32), {layer: captured.site(inputs.site, layer) for layer in inputs.layers}


def scalar(metric: Callable, logits: Any) -> float:
    """``metric(logits)`` as a float; a one-line error unless it is a scalar."""
    value = metric(logits)
    shape = np.shape(value)
    if shape != ():
        raise ValueError(f"metric must return a scalar (one number per run), got shape {shape}")
    return float(value)


def _patches(inputs: Inputs, acts: dict[int, np.ndarray]) -> list[tuple[int, int, Patch]]:
    """Every world's patch (for slot 0; the round gives it its row), with its table cell."""
    worlds = []
    for i, layer in enumerate(inputs.layers):
        site = acts[layer]
        if inputs.over == "layer_position":
            for j, p in enumerate(inputs.positions):
                worlds.append((i, j, Patch(layer, inputs.site, [p], site[1, [p]])))
        else:
            positions = list(inputs.positions)
            for h in inputs.columns:
                values = site[0, positions].copy()  # [P, N, H]: the clean heads, ...
                values[:, h] = site[1, positions, h]  # ... head h's from the corrupt run
                worlds.append((i, h, Patch(layer, "heads", positions, values)))
    return worlds


def patching_sweep(
    engine: Any,
    params: Any,
    clean: str | Sequence[int],
    corrupt: str | Sequence[int],
    metric: Callable[[Any], Any],
    over: str = "layer_position",
    *,
    site: str = "residual",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Sweep:
    """Patch the corrupt prompt's activations into the clean run, one cell per world, and read
    ``metric`` of each world's logits [T, V] (float32; e.g. ``lambda l: l[-1, a] - l[-1, b]``).

    ``over``: "layer_position" (``site`` of one layer at one position: "residual", "attn_out",
    "mlp_out" or "heads") or "layer_head" (one head's output at every one of ``positions``).
    ``layers`` / ``positions``: the ones to sweep (None: all). ``clean`` and ``corrupt``: texts
    or token ids of the same length. Returns a :class:`Sweep` [layers, positions | heads]."""
    inputs = check_inputs(engine, clean, corrupt, over, site, layers, positions)
    logits, acts = activations(engine, params, inputs)
    base = [scalar(metric, logits[0]), scalar(metric, logits[1])]
    worlds = _patches(inputs, acts)
    rows = engine.max_concurrent_decodes
    tokens = np.broadcast_to(inputs.clean, (rows, len(inputs.clean)))
    table = np.zeros((len(inputs.layers), len(inputs.columns)))
    for start in range(0, len(worlds), rows):
        batch = worlds[start : start + rows]
        batch = batch + [batch[0]] * (rows - len(batch))  # one shape and patch count every round
        patches = [dataclasses.replace(patch, slots=[row]) for row, (_, _, patch) in enumerate(batch)]
        patched, _ = forward(engine, params, tokens, None, patches)
        patched = patched.astype(jnp.float32)
        for row, (i, j, _) in enumerate(worlds[start : start + rows]):
            table[i, j] = scalar(metric, patched[row])
    return Sweep(table, inputs.over, inputs.site, inputs.layers, inputs.columns, inputs.labels, *base)
