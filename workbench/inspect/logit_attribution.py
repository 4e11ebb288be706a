"""``inspect.logit_attribution``: how much each layer's attention and MLP, and each head, write
toward one token's logit (or the difference of two tokens' logits).

The residual stream before the final norm is a sum: the token embedding plus every block's
attention and MLP outputs. The final RMSNorm is linear once its scale is frozen at the value it
took on the captured final residual (``1 / rms`` times the norm weight, ``1 + w`` with Gemma's
``norm_offset``), so each part's contribution is ``part . (scale * u)``, ``u`` the unembedding
column of the token (minus the other token's). The parts and the embedding then sum to the
logit (difference). Per head: the head's output before ``o`` (``Capture(heads=True)``) times its
slice of ``o`` (and, with Gemma's post-attention norm, that norm's scale frozen likewise).
Final logit soft-capping (Gemma 2) is not linear: the *pre-cap* logit is attributed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from workbench import probes
from workbench.inspect import plots
from workbench.inspect.report import Column, Report, Table, fmt_float
from workbench.model.scan import is_stacked, layer_slice


def _weights(engine: Any, params: Any) -> dict:
    config = engine.config
    if config.quantize is not None:
        raise ValueError(f"logit_attribution reads float weights; this model is quantized ({config.quantize!r})")
    return jax.device_get(nnx.to_pure_dict(params))


def _layer(tree: dict, layer: int) -> dict:
    """One layer's params, from unrolled (``layers/<i>``) or scanned (stacked, ``model.scan``) layers."""
    return layer_slice(tree["layers"], layer) if is_stacked(tree) else tree["layers"][layer]


def _tokens(token: Any, vocab: int) -> tuple[int, int | None]:
    pair = tuple(token) if isinstance(token, (tuple, list)) else (token, None)
    if len(pair) != 2:
        raise ValueError(f"token must be one token id or a pair (token, other), got {token!r}")
    for t in pair:
        if t is not None and not (isinstance(t, (int, np.integer)) and 0 <= int(t) < vocab):
            raise ValueError(f"token {t!r} is not a token id in 0..{vocab - 1}")
    return int(pair[0]), None if pair[1] is None else int(pair[1])


def _rms_scale(x: np.ndarray, weight: np.ndarray, config: Any) -> np.ndarray:
    """The RMSNorm of ``x`` as a diagonal scale [D]: ``1 / rms(x)`` times the (offset) weight."""
    x = x.astype(np.float64)
    return (1.0 / np.sqrt(np.mean(x * x) + config.norm_eps)) * (config.norm_offset + weight.astype(np.float64))


class LogitAttributionReport(Report):
    """``parts``: {(layer, "attn" | "mlp"): contribution}; ``heads`` [layers, N] (None without
    ``Capture(heads=True)``); ``embed``: the embedding's; ``logit``: the pre-cap logit (difference)
    they sum to; ``rest``: what the captured sites do not explain (nonzero only under interventions
    that add to the residual stream, e.g. ``Steer``)."""

    def __init__(self, step: probes.Captured, engine: Any, params: Any, token: Any, slot: int, position: Any):
        config = engine.config
        target, other = _tokens(token, config.vocab_size)
        row = 0 if step.live.shape[0] == 1 else slot
        live = np.flatnonzero(step.live[row])
        if not len(live):
            raise ValueError(f"slot {slot} has no live query in this step")
        column = live[-1] if position is None else None
        if position is not None:
            hits = [c for c in live if int(step.positions[row, c]) == int(position)]
            if not hits:
                raise ValueError(f"position {position} was not captured: captured positions are "
                                 f"{[int(step.positions[row, c]) for c in live]}")  # fmt: skip
            column = hits[0]
        self.position = int(step.positions[row, column])
        w = _weights(engine, params)
        unembed = w["embed"]["embedding"].T if config.tie_embeddings else w["lm_head"]  # [D, V]
        direction = unembed[:, target].astype(np.float64)
        if other is not None:
            direction = direction - unembed[:, other]
        L = config.num_layers  # noqa: N806
        final = step.residual(L - 1)[row, column]
        self.scale = _rms_scale(final, w["final_norm"]["scale"], config)  # the frozen final norm
        read = self.scale * direction  # what one residual vector's dot product gives the logit
        embedded = w["embed"]["embedding"][int(step.tokens[row, column])].astype(np.float32)
        if config.embed_scale:
            embedded = embedded * np.float32(config.embed_dim**0.5)
        self.embed = float(embedded @ read)
        self.parts: dict[tuple[int, str], float] = {}
        for layer in range(L):
            self.parts[(layer, "attn")] = float(step.attn_out(layer)[row, column] @ read)
            self.parts[(layer, "mlp")] = float(step.mlp(layer)[row, column] @ read)
        self.heads = None
        if "heads" in step.sites:
            self.heads = np.zeros((L, config.num_heads))
            for layer in range(L):
                p = _layer(w, layer)
                written = np.einsum("NH,NHD->ND", step.heads(layer)[row, column].astype(np.float64), p["attn"]["o"])
                if config.post_norms:  # Gemma: the post-attention norm of the heads' sum, frozen
                    written = written * _rms_scale(written.sum(0), p["post_attn_norm"]["scale"], config)
                self.heads[layer] = written @ read
        self.logit = float(final.astype(np.float64) @ read)
        self.rest = self.logit - self.embed - sum(self.parts.values())
        names = {i: str(i) for i in (target, other) if i is not None}
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is not None:
            names = {i: repr(tokenizer.decode([i]) or f"<{i}>") for i in names}
        what = names[target] if other is None else f"{names[target]} - {names[other]}"
        self.what = what
        self.title = f"Direct logit attribution of slot {slot} at position {self.position}: logit {what}"
        rows = [{"layer": "-", "part": "embed", "contribution": self.embed}]
        rows += [{"layer": layer, "part": part, "contribution": v} for (layer, part), v in self.parts.items()]
        rows.append({"layer": "-", "part": "total", "contribution": self.logit})
        columns = (
            Column("layer", "layer", align="right", repeat=False),
            Column("part", "part"),
            Column("contribution", "logit contribution", fmt_float, "right"),
        )
        tables = [Table("", columns, tuple(rows))]
        if self.heads is not None:
            n = config.num_heads
            head_rows = tuple(
                {"layer": layer, **{f"h{i}": self.heads[layer, i] for i in range(n)}} for layer in range(L)
            )
            head_columns = (Column("layer", "layer", align="right"),) + tuple(
                Column(f"h{i}", f"head {i}", fmt_float, "right") for i in range(n)
            )
            tables.append(Table("Per head (attention, through its slice of o)", head_columns, head_rows))
        self.tables = tuple(tables)
        notes = ["the final norm's scale is frozen at its value on the captured final residual"]
        if config.final_logit_softcap is not None:
            notes.append(
                f"the pre-cap logit is attributed (final soft-capping at {config.final_logit_softcap} is not linear)"
            )
        if self.heads is not None:
            attn = np.array([self.parts[(layer, "attn")] for layer in range(L)])
            if np.abs(self.heads.sum(1) - attn).max() > 1e-3 * max(1.0, np.abs(attn).max()):
                notes.append(
                    "the heads do not sum to their layer's attention (a LoRA adapter on o is not split per head)"
                )
        if abs(self.rest) > 1e-4 * max(1.0, abs(self.logit)):
            notes.append(f"not from the captured sites (an intervention's addition): {fmt_float(self.rest)}")
        self.notes = tuple(notes)

    def plot(self):
        """Bars: the embedding and each layer's attention and MLP; with heads, a layers x heads heatmap."""
        labels = ["embed"] + [f"{layer}.{part}" for layer, part in self.parts]
        fig = plots.bars(labels, [self.embed, *self.parts.values()], title=self.title, xlabel="part",
                         ylabel=f"logit {self.what}")  # fmt: skip
        if self.heads is None:
            return fig
        heat = plots.heatmaps(
            [("per head", self.heads)], xlabel="head", ylabel="layer", title=self.title,
            yticklabels=[str(i) for i in range(self.heads.shape[0])], colorbar="logit contribution",
        )  # fmt: skip
        return fig, heat


def logit_attribution(
    captured: Any, engine: Any, params: Any, token: Any, *, slot: int = 0, position: int | None = None
) -> LogitAttributionReport:
    """Direct logit attribution of one captured step (``probes.Capture(heads=True)`` for per-head
    rows; every layer's residual, attention and MLP output must be captured) toward ``token`` (an
    id) or ``(token, other)`` (their logit difference), for ``slot`` at ``position`` (default: its
    last captured query)."""
    return LogitAttributionReport(probes.captured(captured), engine, params, token, int(slot), position)
