"""ipywidgets explorers over the inspectors: the KV cache step by step, one leaf's sharding, and
attention step by step (``AttentionExplorer``, over captured steps).

Live in JupyterLab. Where no widget frontend draws them (a headless nbval run, a static
notebook viewer, a script) they show a static text/HTML snapshot of their current view:
``_repr_mimebundle_`` always carries deterministic text/plain and text/html next to the widget
view. Views update by setting widget values (HTML, Image), never by printing into an Output
widget, whose prints nbval would see as cell output.

    explorer = KVCacheExplorer(engine, params, prompts=[[72, 105], [79, 107, 33]])
    explorer          # buttons: prefill / insert / generate; sliders: layer, slot, head
    explorer.prefill(); explorer.insert(slot=3); explorer.generate()   # the same from code
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from workbench.engine import DecodeState, Prefix
from workbench.inspect import KVCacheDiff, attention, kv_cache, kv_cache_diff, sharding, snapshot
from workbench.inspect.attention import steps_of
from workbench.inspect.report import fmt_bytes

try:
    import ipywidgets as widgets
except ImportError:  # the notebooks extra is optional
    widgets = None


def _require_widgets() -> Any:
    if widgets is None:
        raise ImportError("workbench.widgets needs ipywidgets: pip install 'workbench[notebooks]'")
    return widgets


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _has_widget_frontend() -> bool:
    """True inside a Jupyter kernel, where a frontend may draw the widget view."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class _Explorer:
    """Shared display: the live widget where a kernel runs, a static snapshot alongside."""

    widget: Any

    def static_text(self) -> str:
        raise NotImplementedError

    def static_html(self) -> str:
        return f"<pre>{html.escape(self.static_text())}</pre>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = {"text/plain": self.static_text(), "text/html": self.static_html()}
        if _has_widget_frontend():
            view = self.widget._repr_mimebundle_()
            bundle.update({k: v for k, v in view.items() if k != "text/plain"})
        return bundle


class KVCacheExplorer(_Explorer):
    """Step an engine through prefill -> insert -> generate and watch its KV cache change.

    ``prompts`` are token-id lists, prefilled in turn. Each step shows what it changed
    (``inspect.kv_cache_diff``), the slot-occupancy map, and one layer/slot/head view picked by
    the sliders (head -1 = every kv head's norm). ``labels`` turns a token id into the text
    on the position axis (default: the id). Each step snapshots the decode state to the host
    first (insert and generate donate it): meant for small models.
    """

    def __init__(
        self,
        engine: Any,
        params: Any,
        prompts: Sequence[Sequence[int]],
        *,
        decode_state: DecodeState | None = None,
        labels: Callable[[int], str] = str,
    ):
        w = _require_widgets()
        if not prompts or any(
            isinstance(p, str) or not all(isinstance(t, (int, np.integer)) for t in p) for p in prompts
        ):
            raise TypeError("prompts must be a non-empty list of token-id lists")
        self.engine, self.params, self.labels = engine, params, labels
        self.prompts = [[int(t) for t in p] for p in prompts]
        self.state = engine.init_decode_state() if decode_state is None else decode_state
        self.prefix: Prefix | None = None
        self._prompt_index = 0
        self._pending: list[int] = []  # the prefix's prompt, waiting to be inserted
        self.slot_tokens: dict[int, list[int]] = {}  # per slot: tokens whose K/V the cache holds
        self.last_diff: KVCacheDiff | None = None
        self.status = "ready: prefill a prompt"

        config = engine.config
        self.layer = w.IntSlider(0, min=0, max=config.num_layers - 1, description="layer")
        self.slot = w.IntSlider(0, min=0, max=engine.max_concurrent_decodes - 1, description="slot")
        self.head = w.IntSlider(-1, min=-1, max=config.num_kv_heads - 1, description="head (-1 all)")
        self.buttons = {name: w.Button(description=name) for name in ("prefill", "insert", "generate")}
        self.buttons["prefill"].on_click(lambda _: self._guarded(self.prefill))
        self.buttons["insert"].on_click(lambda _: self._guarded(self.insert))
        self.buttons["generate"].on_click(lambda _: self._guarded(self.generate))
        for slider in (self.layer, self.slot, self.head):
            slider.observe(lambda _: self._draw_detail(), names="value")
        self._report_cache: Any = None  # kv_cache of the current state, made once per step
        self.status_view, self.diff_view = w.HTML(), w.HTML()
        self.occupancy_view, self.detail_view = w.Image(format="png"), w.Image(format="png")
        self.widget = w.VBox(
            [
                w.HBox(list(self.buttons.values())),
                w.HBox([self.layer, self.slot, self.head]),
                self.status_view,
                self.diff_view,
                self.occupancy_view,
                self.detail_view,
            ]
        )
        self._refresh()

    # ---- steps (buttons call these; code may too) ---------------------------------------------
    def prefill(self) -> KVCacheDiff:
        """Prefill the next prompt; the diff is against an empty prefix (what prefill wrote)."""
        prompt = self.prompts[self._prompt_index % len(self.prompts)]
        self._prompt_index += 1
        padded, length = self.engine.pad(prompt)
        self.prefix, result = self.engine.prefill(params=self.params, padded_tokens=padded, true_length=length)
        empty = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.prefix)
        self._pending = prompt
        first = int(np.asarray(result.data)[0, 0])
        self.status = f"prefill: {length} tokens (bucket {len(padded)}), first token {first}"
        return self._show(kv_cache_diff(empty, self.prefix))

    def insert(self, slot: int | None = None) -> KVCacheDiff:
        """Insert the last prefill into ``slot`` (default: the slot slider's)."""
        if self.prefix is None:
            raise ValueError("nothing to insert: prefill a prompt first")
        slot = self.slot.value if slot is None else slot
        before = snapshot(self.state)
        self.state = self.engine.insert(self.prefix, self.state, slot)
        self.slot_tokens[slot] = list(self._pending)
        self._report_cache = None
        self.slot.value = slot  # show the slot just filled (redraws the detail view if it moved)
        self.status = f"insert: prefix of {len(self._pending)} tokens into slot {slot}"
        return self._show(kv_cache_diff(before, self.state))

    def generate(self) -> KVCacheDiff:
        """One generate step for every slot."""
        before = snapshot(self.state)
        self.state, result = self.engine.generate(self.params, self.state)
        data = np.asarray(result.data)  # [slots, 3]: token, valid, length
        for slot in np.flatnonzero(data[:, 1]):
            # The step wrote the K/V of the token it was fed: the one sampled before it.
            self.slot_tokens.setdefault(int(slot), []).append(int(before.tokens[slot]))
        made = ", ".join(f"{s}:{int(data[s, 0])}" for s in np.flatnonzero(data[:, 1])) or "none (no active slot)"
        self.status = f"generate: tokens per slot {made}"
        return self._show(kv_cache_diff(before, self.state))

    # ---- view ---------------------------------------------------------------------------------
    def _guarded(self, step: Callable[[], Any]) -> None:
        try:
            step()
        except ValueError as error:  # a button pressed out of order: say so in the view
            self.status = f"error: {error}"
            self._refresh()

    def _show(self, diff: KVCacheDiff) -> KVCacheDiff:
        self.last_diff = diff
        self._report_cache = None
        self._refresh()
        return diff

    def _report(self) -> Any:
        if self._report_cache is None:
            tokens = {s: [self.labels(t) for t in ts] for s, ts in self.slot_tokens.items()}
            self._report_cache = kv_cache(self.state, tokens=tokens)
        return self._report_cache

    def _refresh(self) -> None:
        self.status_view.value = f"<b>{html.escape(self.status)}</b>"
        self.diff_view.value = self.last_diff._repr_html_() if self.last_diff is not None else ""
        self.occupancy_view.value = _png(self._report().plot())
        self._draw_detail()

    def _draw_detail(self) -> None:
        head = None if self.head.value < 0 else self.head.value
        self.detail_view.value = _png(self._report().plot(layer=self.layer.value, slot=self.slot.value, head=head))

    def static_text(self) -> str:
        lines = ["KV-cache explorer", self.status]
        if self.last_diff is not None:
            lines += ["", str(self.last_diff)]
        return "\n".join(lines)


class ShardingExplorer(_Explorer):
    """Pick a leaf of ``tree``: its placement on the mesh (which slice on which device) and its
    bytes per device, beside the whole tree's bytes per device."""

    def __init__(self, tree: Any, mesh: Any = None):
        w = _require_widgets()
        self.report = sharding(tree, mesh)
        paths = [row["path"] for row in self.report.to_rows()]
        self.leaf = w.Dropdown(options=paths, value=paths[0], description="leaf")
        self.leaf.observe(lambda _: self._refresh(), names="value")
        self.grid_view, self.placement_view = w.HTML(), w.Image(format="png")
        totals = w.Image(format="png", value=_png(self.report.plot()))
        self.widget = w.VBox([self.leaf, self.grid_view, self.placement_view, totals])
        self._refresh()

    def select(self, path: str) -> None:
        self.leaf.value = path

    def _refresh(self) -> None:
        self.grid_view.value = f"<pre>{html.escape(self._leaf_text())}</pre>"
        self.placement_view.value = _png(self.report.plot(self.leaf.value))

    def _leaf_text(self) -> str:
        row = next(r for r in self.report.to_rows() if r["path"] == self.leaf.value)
        per_device = ", ".join(f"d{d}: {fmt_bytes(n)}" for d, n in sorted(row["bytes_per_device"].items()))
        return f"{self.report.grid(self.leaf.value)}\nbytes per device: {per_device}"

    def static_text(self) -> str:
        return f"{self.report.title}\n\n{self._leaf_text()}"


class AttentionExplorer(_Explorer):
    """Walk the captured steps of one slot (a prefill, then its generate steps, each run with
    ``probes=workbench.probes.Capture()``): sliders pick the layer, the head and the step; the
    view shows the head's pattern up to that step and, per head, the keys its newest query read.

        steps = [first.captured] + [result.captured for each generate step]
        AttentionExplorer(steps, tokens=[tokenizer.decode([t]) for t in ids], slot=0)
    """

    def __init__(self, captured: Any, *, tokens: Sequence[Any] | None = None, slot: int = 0):
        w = _require_widgets()
        steps = steps_of(captured)
        self.report = attention(steps, tokens=tokens, slot=slot)
        # the newest query position of each step (a prefill's last prompt token, then one per step)
        self.step_positions = []
        for step in steps:
            row = 0 if step.live.shape[0] == 1 else slot
            self.step_positions.append(int(step.positions[row][step.live[row]].max(initial=-1)))
        layers, heads = self.report.layers, self.report.weights.shape[1]
        self.layer = w.IntSlider(layers[0], min=layers[0], max=layers[-1], description="layer")
        self.head = w.IntSlider(0, min=0, max=heads - 1, description="head")
        self.step = w.IntSlider(len(steps) - 1, min=0, max=len(steps) - 1, description="step")
        for slider in (self.layer, self.head, self.step):
            slider.observe(lambda _: self._refresh(), names="value")
        self.pattern_view, self.keys_view = w.Image(format="png"), w.HTML()
        self.widget = w.VBox([w.HBox([self.layer, self.head, self.step]), self.keys_view, self.pattern_view])
        self._refresh()

    def _position(self) -> int:
        return self.step_positions[self.step.value]

    def _keys_text(self) -> str:
        position = self._position()
        where = f"layer {self.layer.value}, step {self.step.value}: the query at position {position}"
        lines = [f"{where} ('{self.report.labels[position]}') read"]
        return "\n".join(lines + self.report.top_keys(self.layer.value, position))

    def _refresh(self) -> None:
        self.keys_view.value = f"<pre>{html.escape(self._keys_text())}</pre>"
        last = self._position()  # the newest query and the 23 before it: a figure that stays legible
        fig = self.report.plot(self.layer.value, self.head.value, first=last - 23, last=last)
        self.pattern_view.value = _png(fig)

    def static_text(self) -> str:
        return f"{self.report.title}\n\n{self._keys_text()}"
