"""workbench.widgets (driven by their buttons and sliders, no frontend) and notebook_setup."""

import re

import matplotlib
import numpy as np
import pytest
import treescope

import workbench
from workbench import inspect, widgets

matplotlib.use("Agg")
PROMPTS = [[72, 101, 108, 108, 111], [104, 105]]
PNG = b"\x89PNG"


def step_by_clicks(engine, params):
    """prefill -> insert into slot 2 -> generate, by button clicks; the diff after each click."""
    explorer = widgets.KVCacheExplorer(engine, params, PROMPTS)
    seen = {"start": (explorer.last_diff, bytes(explorer.occupancy_view.value))}
    explorer.buttons["prefill"].click()
    seen["prefill"] = (explorer.last_diff, explorer.status, int(explorer.prefix.token))
    explorer.slot.value = 2
    explorer.buttons["insert"].click()
    slot_tokens = {s: list(t) for s, t in explorer.slot_tokens.items()}
    seen["insert"] = (explorer.last_diff, explorer.diff_view.value, slot_tokens)
    explorer.buttons["generate"].click()
    seen["generate"] = explorer.last_diff
    return explorer, seen


@pytest.fixture(scope="module")
def stepped(engine, params):
    return step_by_clicks(engine, params)


def test_kv_explorer_buttons_step_the_engine_and_show_each_diff(stepped):
    explorer, seen = stepped
    assert (explorer.layer.max, explorer.slot.max, explorer.head.min, explorer.head.max) == (3, 3, -1, 3)
    diff, image = seen["start"]
    assert diff is None and image.startswith(PNG)

    diff, status, first_token = seen["prefill"]
    assert status.startswith("prefill: 5 tokens (bucket 16)")
    assert diff.positions == {0: tuple(range(5))}  # what prefill wrote into an empty prefix

    diff, shown, slot_tokens = seen["insert"]
    assert diff.slots == (2,) and diff.positions == {2: tuple(range(5))}
    assert "slots changed: 2;" in shown and slot_tokens == {2: PROMPTS[0]}

    diff = seen["generate"]
    assert diff.slots == (2,) and diff.positions == {2: (5,)}
    assert explorer.slot_tokens[2] == PROMPTS[0] + [first_token]  # the token fed to the step
    rows = inspect.kv_cache(explorer.state).to_rows()
    assert [r["filled"] for r in rows if r["slot"] == 2] == [6] * 4


def test_sliders_redraw_the_detail_view(stepped):
    explorer, _ = stepped
    before = bytes(explorer.detail_view.value)
    explorer.head.value = 1
    after = bytes(explorer.detail_view.value)
    assert after.startswith(PNG) and after != before
    explorer.layer.value = 3
    assert bytes(explorer.detail_view.value) != after


def test_a_button_out_of_order_reports_the_error(engine, params):
    explorer = widgets.KVCacheExplorer(engine, params, PROMPTS)
    explorer.buttons["insert"].click()
    assert explorer.status == "error: nothing to insert: prefill a prompt first"
    assert "error: nothing to insert" in explorer.status_view.value
    with pytest.raises(ValueError, match="prefill a prompt first"):
        explorer.insert()
    with pytest.raises(TypeError, match="token-id lists"):
        widgets.KVCacheExplorer(engine, params, ["hello"])


def test_static_output_without_a_frontend(stepped):
    explorer, _ = stepped
    bundle = explorer._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}  # no widget view: no kernel runs here
    text = bundle["text/plain"]
    assert text == f"KV-cache explorer\n{explorer.status}\n\n{explorer.last_diff}"
    assert explorer.status.startswith("generate: tokens per slot 2:") and "slots changed: 2;" in text
    assert not re.search(r"0x[0-9a-f]+|[0-9a-f]{32}", text + bundle["text/html"])  # no addresses, no ids
    assert bundle["text/html"].startswith("<pre>")


def test_the_widget_view_joins_the_bundle_in_a_kernel(params, monkeypatch):
    monkeypatch.setattr(widgets, "_has_widget_frontend", lambda: True)
    explorer = widgets.ShardingExplorer(params)
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == explorer.static_text()


def test_sharding_explorer_shows_the_picked_leaf(params):
    explorer = widgets.ShardingExplorer(params)
    assert list(explorer.leaf.options) == [r["path"] for r in inspect.sharding(params).to_rows()]
    explorer.select("layers/0/attn/q")
    shown = explorer.grid_view.value
    assert "layers/0/attn/q" in shown and "d5 [:, 2:4, :]" in shown
    assert "bytes per device: d0: 16.00 KiB" in shown  # [128, 2, 16] float32 on each device
    assert bytes(explorer.placement_view.value).startswith(PNG)
    assert explorer.static_text().splitlines()[2].startswith("layers/0/attn/q")


@pytest.fixture
def restore_treescope():
    autovisualizer = treescope.active_autovisualizer.get()
    dpi = matplotlib.rcParams["figure.dpi"]
    yield
    treescope.active_autovisualizer.set_globally(autovisualizer)
    matplotlib.rcParams["figure.dpi"] = dpi


def test_notebook_setup_runs_without_ipython(restore_treescope):
    workbench.notebook_setup(dpi=90)
    assert isinstance(treescope.active_autovisualizer.get(), treescope.ArrayAutovisualizer)
    assert matplotlib.rcParams["figure.dpi"] == 90


def test_notebook_setup_registers_treescope_non_streaming_and_uncompressed(params, restore_treescope):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        workbench.notebook_setup()
        data, _ = shell.display_formatter.format({"unique_key_42": np.arange(3)})
        # Streaming would give an empty placeholder object, compression a zlib payload: the
        # key is readable in the HTML only when rendering is neither.
        assert isinstance(data["text/html"], str) and "unique_key_42" in data["text/html"]
        report = inspect.sharding(params)
        data, _ = shell.display_formatter.format(report)
        assert data["text/html"] == report._repr_html_() and data["text/plain"] == str(report)
    finally:
        InteractiveShell.clear_instance()
