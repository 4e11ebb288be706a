"""The notebooks in a real JupyterLab, seen through a real browser (Chromium driven by Playwright).

nbval runs the notebooks' code but draws nothing. Here one JupyterLab server (loopback, a token,
temporary runtime/config/settings/workspace dirs) serves copies of notebooks/, and one headless
Chromium opens each copy with live outputs (HTML with scripts, widgets; notebooks of text and
matplotlib images are nbval's alone), runs all its cells and checks what a reader would see:
every cell ran with no error and no stderr, no widget failed to display, every figure is a loaded
image, the explorers' controls redraw their views, treescope's tree expands, and the browser
console has no JavaScript errors. Nothing is saved: the copies are thrown away with the server.

Needs playwright (the test extra) and a Chromium binary: Debian's ``apt-get install chromium``
(no browser download; ``$WORKBENCH_CHROMIUM`` names another binary). Without either the module
skips and says why; with ``WORKBENCH_REQUIRE_BROWSER=1`` (CI) it fails instead. Alone:
``make test-browser``. Screenshots of every checked view go under the test's temporary
directory, whose path a failing test prints.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LIVE_OUTPUTS = ("text/html", "application/vnd.jupyter.widget-view+json")  # what the browser runs: treescope, widgets


def _draws_live(path: Path) -> bool:
    """Whether a stored notebook has an output the browser itself must bring to life: HTML with its
    scripts (treescope, the reports' tables) or a widget. A notebook of printed text and
    matplotlib images only (04, 06, 07, 08, 10, 12) is left to nbval, which runs it and compares
    every text output: a browser would show the same text and images and nothing more to check."""
    cells = json.loads(path.read_text())["cells"]
    return any(set(o.get("data", ())) & set(LIVE_OUTPUTS) for cell in cells for o in cell.get("outputs", []))


NOTEBOOKS = sorted(p.name for p in (Path(__file__).parents[1] / "notebooks").glob("*.ipynb") if _draws_live(p))
RUN_TIMEOUT_S = 300  # one notebook's run-all; the slowest takes ~25 s on 2 idle cores
STEP_TIMEOUT_S = 60  # opening a notebook, a kernel start, one widget redraw


def _chromium() -> str | None:
    named = os.environ.get("WORKBENCH_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if _chromium() is None:
        return "no Chromium found (Debian: apt-get install chromium; or set WORKBENCH_CHROMIUM)"
    return None


if (_why := _missing()) is not None:
    if os.environ.get("WORKBENCH_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser test required but cannot run: {_why}")
    pytest.skip(f"browser test skipped: {_why}", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402


# ---- the server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configure(config: Path, settings: Path) -> None:
    """User settings: no autosave (nothing is written back), no news or update checks (no
    network) and no toast asking about them. Page config: no debugger, whose state requests
    to a kernel being shut down log console errors that are JupyterLab's, not our outputs'."""
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    (config / "labconfig").mkdir()
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/debugger-extension": True}})
    )


class Lab:
    """A JupyterLab server on a free loopback port, serving copies of the notebooks."""

    def __init__(self, root: Path):
        self.root, self.port, self.token = root, _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.notebooks = root / "notebooks"
        self.notebooks.mkdir()
        for name in NOTEBOOKS:
            shutil.copy(Path(__file__).parents[1] / "notebooks" / name, self.notebooks / name)
        (root / "data").mkdir()
        # The server's kernel manager, importable (see lab_server/wb_lab_kernels.py for why).
        lab_server = str(Path(__file__).parent / "lab_server")
        path = os.pathsep.join(filter(None, [lab_server, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, JUPYTER_DATA_DIR=str(root / "data"), PYTHONPATH=path)
        for var, sub in [
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTERLAB_SETTINGS_DIR", "settings"),
            ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
            ("IPYTHONDIR", "ipython"),
        ]:
            env[var] = str(root / sub)
            (root / sub).mkdir()
        _configure(root / "config", root / "settings")
        args = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.notebooks}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--AsyncMappingKernelManager.kernel_manager_class=wb_lab_kernels.ListableKernelManager",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # CI runs as root
        self.log = root / "jupyterlab.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                args, cwd=self.notebooks, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.process.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"JupyterLab did not answer in {STEP_TIMEOUT_S} s; see {self.log}")

    def stop(self) -> None:
        """The server asked to shut down (it shuts its kernels down), then made to: its process
        group, then any kernel left (kernels run in sessions of their own)."""
        kernels = self._kernel_pids()
        try:
            request = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(request, timeout=5).close()
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=10)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pid in kernels:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _kernel_pids(self) -> list[int]:
        """This server's kernels: processes whose command line names a connection file in its
        runtime dir (Linux; elsewhere the server's own shutdown has to do)."""
        runtime, pids = str(self.root / "runtime"), []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if runtime in cmdline.read_bytes().decode(errors="replace"):
                    pids.append(int(cmdline.parent.name))
            except OSError:
                continue
        return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    server = Lab(tmp_path_factory.mktemp("lab"))
    try:
        yield server
    finally:
        server.stop()


# ---- the browser --------------------------------------------------------------------------------
class Browser:
    """One Chromium page on JupyterLab; notebooks open as tabs of the one app."""

    def __init__(self, page: Page, lab: Lab, shots: Path):
        self.page, self.lab, self.shots = page, lab, shots
        self.console_errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        # The console's "Failed to load resource" names no resource: the response does.
        page.on("response", lambda r: r.status >= 500 and self.console_errors.append(f"HTTP {r.status} {r.url}"))
        page.set_default_timeout(STEP_TIMEOUT_S * 1000)
        page.goto(f"{lab.url}/lab?token={lab.token}")
        page.wait_for_function("window.jupyterapp !== undefined")
        self.call("async () => { await jupyterapp.restored; }")

    def call(self, script: str, arg: Any = None, timeout_s: float = STEP_TIMEOUT_S) -> Any:
        """Run an async JS function of ``arg`` in the page, waiting at most ``timeout_s`` for it."""
        self.page.evaluate(
            f"""(arg) => {{
                window.__wbResult = undefined;
                const failed = error => {{
                    window.__wbResult = {{ok: false, error: String(error && error.stack || error)}};
                }};
                ({script})(arg).then(value => {{ window.__wbResult = {{ok: true, value}}; }}, failed);
            }}""",
            arg,
        )
        self.page.wait_for_function("window.__wbResult !== undefined", timeout=timeout_s * 1000, polling=250)
        result = self.page.evaluate("window.__wbResult")
        if not result["ok"]:
            raise AssertionError(f"in the page: {result['error']}")
        return result.get("value")

    def shot(self, name: str, target: Any = None) -> Path:
        path = self.shots / f"{name}.png"
        (target or self.page).screenshot(path=path)
        return path

    def take_console_errors(self) -> list[str]:
        errors, self.console_errors[:] = list(self.console_errors), []
        return errors


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory) -> Iterator[Browser]:
    shots = tmp_path_factory.mktemp("screenshots")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), timeout=STEP_TIMEOUT_S * 1000)
        try:
            page = chromium.new_page(viewport={"width": 1280, "height": 2000})
            yield Browser(page, lab, shots)
        finally:
            chromium.close()


# ---- notebooks ----------------------------------------------------------------------------------
OPEN = """async (path) => {
    const panel = await jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    await panel.context.ready;
    await panel.sessionContext.ready;
    panel.content.widgets.forEach((cell, i) => { cell.node.dataset.wbCell = String(i); });
    (window.__wbPanels = window.__wbPanels || {})[path] = panel;
    return panel.id;
}"""

# Starts the run and returns at once: the next notebook may open and start meanwhile.
START_RUN = """async (path) => {
    const target = {widgetId: window.__wbPanels[path].id, activate: false};
    await jupyterapp.commands.execute('notebook:clear-all-cell-outputs', target);
    (window.__wbRuns = window.__wbRuns || {})[path] = undefined;
    jupyterapp.commands.execute('notebook:run-all-cells', target).then(
        ok => { window.__wbRuns[path] = {ok}; },
        error => { window.__wbRuns[path] = {ok: false, error: String(error && error.stack || error)}; });
}"""

CELLS = """async (path) => window.__wbPanels[path].content.widgets.map((cell, i) => ({
    index: i, type: cell.model.type, source: cell.model.sharedModel.getSource(),
    count: cell.model.type === 'code' ? cell.model.executionCount : null,
    outputs: cell.model.type === 'code' ? cell.model.outputs.toJSON().map(o => ({
        type: o.output_type, name: o.name || null, mimes: Object.keys(o.data || {}),
        text: o.output_type === 'error' ? `${o.ename}: ${o.evalue}` : (o.name === 'stderr' ? String(o.text) : ''),
    })) : [],
}))"""

ACTIVATE = "async (path) => jupyterapp.shell.activateById(window.__wbPanels[path].id)"
SHUT_DOWN_KERNEL = "async (path) => { window.__wbPanels[path].sessionContext.shutdown(); }"  # not awaited

FAILED_WIDGET = ("Error displaying widget", "model not found", "Failed to create view")
# Notebooks whose kernels the interactive tests use after all the runs; the others' kernels
# are shut down as soon as their run is checked.
NEEDED_LIVE = {"01_tour.ipynb", "03_insert.ipynb", "05_meshes.ipynb"}


class Notebook:
    """A notebook opened in the browser and run: its cells as the frontend's model holds them."""

    def __init__(self, browser: Browser, path: str):
        self.browser, self.path, self.stem = browser, path, Path(path).stem
        self.node = browser.page.locator(f"#{browser.call(OPEN, path)}")
        # What a reader of a fresh clone sees on opening, before running anything: the stored
        # outputs, untrusted, so each widget shows its static text/html. (Trusted, as
        # `make notebooks` leaves them for whoever ran it, JupyterLab draws stored widgets from
        # the notebook's widget state instead, and on a loaded machine it can race and show
        # "Error displaying widget: model not found": jupyterlab_widgets' doing, not ours.)
        try:
            browser.page.wait_for_function(
                "node => !node.textContent.includes('Loading widget...')", arg=self.node.element_handle()
            )
        except PlaywrightTimeout:
            pass  # the test says what is wrong
        self.text_on_opening = self.text()
        self.shot_on_opening = browser.shot(f"{self.stem}-opened")
        browser.call(START_RUN, path)
        self.ran: bool | None = None
        self.cells: list[dict] = []

    def finish(self) -> Notebook:
        if self.ran is None:
            page, key = self.browser.page, json.dumps(self.path)
            page.wait_for_function(f"window.__wbRuns[{key}] !== undefined", timeout=RUN_TIMEOUT_S * 1000, polling=250)
            result = page.evaluate(f"window.__wbRuns[{key}]")
            assert "error" not in result, f"run-all failed in the page: {result.get('error')}"
            self.ran, self.cells = result["ok"], self.browser.call(CELLS, self.path)
            if self.path not in NEEDED_LIVE:
                self.browser.call(SHUT_DOWN_KERNEL, self.path)
        self.browser.call(ACTIVATE, self.path)
        return self

    def text(self) -> str:
        return self.node.evaluate("node => node.textContent")

    def output(self, containing: str) -> Any:
        """The output area of the code cell whose source contains ``containing``."""
        index = next(c["index"] for c in self.cells if c["type"] == "code" and containing in c["source"])
        return self.node.locator(f'[data-wb-cell="{index}"] .jp-OutputArea')


@pytest.fixture(scope="module")
def run_notebook(browser) -> Any:
    """``run_notebook(name)``: the notebook, opened and run once per module. Two run at once
    (2 cores: while one kernel compiles, the other can): asking for one starts the next
    in NOTEBOOKS too."""
    opened: dict[str, Notebook] = {}

    def run(name: str) -> Notebook:
        following = NOTEBOOKS[NOTEBOOKS.index(name) + 1 :]
        for path in [name, *following[:1]]:
            if path not in opened:
                opened[path] = Notebook(browser, path)
        return opened[name].finish()

    return run


def _png_of(element: Any) -> bytes:
    element.scroll_into_view_if_needed()
    return element.screenshot(animations="disabled")


def _wait_loaded(images: Any) -> None:
    images.first.page.wait_for_function(
        "imgs => imgs.every(img => img.complete && img.naturalWidth > 0)", arg=images.element_handles()
    )


def _redraws(browser: Browser, images: list[Any], action: Any, name: str) -> None:
    """``action`` makes the kernel send each of ``images`` a new picture, and what is drawn
    changes."""
    sources, before = [i.get_attribute("src") for i in images], [_png_of(i) for i in images]
    action()
    for image, src, old in zip(images, sources, before):
        expect(image).not_to_have_attribute("src", src)
        _wait_loaded(image)
        assert _png_of(image) != old, f"{name}: an image got a new source but looks the same"
    browser.shot(name, images[0].locator("xpath=.."))


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_cleanly_in_jupyterlab(run_notebook, browser, name):
    print(f"screenshots: {browser.shots}")
    nb = run_notebook(name)
    browser.shot(f"{nb.stem}-ran")
    failed = [phrase for phrase in FAILED_WIDGET if phrase in nb.text_on_opening]
    assert not failed, f"on opening, before running: {failed}; see {nb.shot_on_opening}"

    code = [c for c in nb.cells if c["type"] == "code"]
    errors = [(c["index"], o["text"]) for c in code for o in c["outputs"] if o["type"] == "error"]
    stderr = [(c["index"], o["text"]) for c in code for o in c["outputs"] if o["name"] == "stderr"]
    assert not errors, f"error outputs (cell, error): {errors}"
    assert not stderr, f"stderr outputs (cell, text): {stderr}"
    assert nb.ran, "run-all did not finish cleanly"
    assert all(c["count"] is not None for c in code), "cells left unrun"

    text = nb.text()
    assert not [phrase for phrase in FAILED_WIDGET if phrase in text], "a widget failed to display"

    # Every figure (image/png output) is an image that the browser decoded.
    figures = sum("image/png" in o["mimes"] for c in code for o in c["outputs"])
    images = nb.node.locator(".jp-RenderedImage img")
    assert images.count() == figures
    if figures:
        _wait_loaded(images)
        for i in range(figures):
            browser.shot(f"{nb.stem}-figure-{i}", images.nth(i))

    assert browser.take_console_errors() == []


def test_treescope_tree_expands_and_draws_arrays(run_notebook, browser):
    print(f"screenshots: {browser.shots}")
    nb = run_notebook("01_tour.ipynb")
    output = nb.output('params["layers"][0]["attn"]["k"]')
    output.scroll_into_view_if_needed()  # treescope draws once its output is near the viewport
    canvases = output.locator("treescope-container canvas")
    expect(canvases.first).to_be_visible()  # the array's values, drawn by the autovisualizer
    drawn = canvases.count()
    browser.shot("01_tour-treescope", output)

    node = output.locator("treescope-container label", has_text="Sharded across")
    expect(node.locator("input")).not_to_be_checked()
    node.click()  # expand: the array's placement on the devices, drawn on its own canvas
    expect(node.locator("input")).to_be_checked()
    expect(canvases).not_to_have_count(drawn)
    assert canvases.count() > drawn and canvases.nth(drawn).is_visible()
    browser.shot("01_tour-treescope-expanded", output)
    assert browser.take_console_errors() == []


def _slider(widget: Any, label: str) -> Any:
    return widget.locator(".widget-slider").filter(has=widget.page.get_by_text(label, exact=True))


def test_kv_cache_explorer_controls_redraw_the_cache(run_notebook, browser):
    print(f"screenshots: {browser.shots}")
    nb = run_notebook("03_insert.ipynb")
    widget = nb.output("KVCacheExplorer(").locator(".widget-vbox").first
    widget.scroll_into_view_if_needed()
    buttons = {name: widget.get_by_role("button", name=name, exact=True) for name in ("prefill", "insert", "generate")}
    sliders = {
        name: _slider(widget, label)
        for name, label in [("layer", "layer"), ("slot", "slot"), ("head", "head (-1 all)")]
    }
    for control in [*buttons.values(), *sliders.values()]:
        expect(control).to_be_visible()
    status, diff = widget.locator(".widget-html").nth(0), widget.locator(".widget-html").nth(1)
    occupancy, detail = widget.locator("img.widget-image").nth(0), widget.locator("img.widget-image").nth(1)
    expect(status).to_contain_text("generate: tokens per slot 1:")  # the notebook's own steps
    _wait_loaded(widget.locator("img.widget-image"))
    browser.shot("03_insert-kv-explorer", widget)

    def move(name: str, key: str) -> Any:
        return lambda: sliders[name].locator(".noUi-handle").press(key)

    _redraws(browser, [detail], move("layer", "ArrowRight"), "03_insert-kv-explorer-layer-1")
    expect(sliders["layer"].locator(".widget-readout")).to_have_text("1")
    _redraws(browser, [detail], move("slot", "ArrowRight"), "03_insert-kv-explorer-slot-2")
    expect(sliders["slot"].locator(".widget-readout")).to_have_text("2")

    # Steps: generate advances slot 1; prefill + insert fill slot 2 (the slot slider's).
    shown = diff.inner_text()
    _redraws(browser, [occupancy], buttons["generate"].click, "03_insert-kv-explorer-generate")
    expect(diff).not_to_have_text(shown)
    buttons["prefill"].click()
    expect(status).to_contain_text("prefill:")
    _redraws(browser, [occupancy, detail], buttons["insert"].click, "03_insert-kv-explorer-insert")
    expect(status).to_contain_text("into slot 2")
    browser.shot("03_insert-kv-explorer-stepped", widget)
    assert browser.take_console_errors() == []


def test_sharding_explorer_shows_the_picked_leaf(run_notebook, browser):
    print(f"screenshots: {browser.shots}")
    nb = run_notebook("05_meshes.ipynb")
    widget = nb.output("ShardingExplorer(").locator(".widget-vbox").first
    widget.scroll_into_view_if_needed()
    leaf = widget.locator("select")
    grid = widget.locator(".widget-html")
    placement = widget.locator("img.widget-image").first
    expect(leaf).to_be_visible()
    _wait_loaded(widget.locator("img.widget-image"))
    browser.shot("05_meshes-sharding-explorer", widget)
    options = leaf.locator("option").all_inner_texts()
    assert len(options) > 1 and grid.inner_text().startswith(options[0])
    _redraws(browser, [placement], lambda: leaf.select_option(options[-1]), "05_meshes-sharding-explorer-last-leaf")
    expect(grid).to_contain_text(options[-1])
    browser.shot("05_meshes-sharding-explorer-picked", widget)
    assert browser.take_console_errors() == []
