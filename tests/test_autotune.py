"""The decode step's product library (``engine.autotune``): fixed, forced, or measured once and cached."""

import json

import pytest

from workbench import ModelConfig
from workbench.engine import autotune, tuning

TINY = ModelConfig.tiny()


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(autotune, "_chosen", {})
    return monkeypatch


@pytest.mark.parametrize(
    "config, library",
    [(TINY, "eigen"), (TINY.replace(param_dtype="bfloat16"), "ynnpack"), (TINY.replace(quantize="w8a8"), "ynnpack")],
)
def test_off_keeps_the_fixed_choice_per_weights(fresh, config, library):
    fresh.setenv(autotune.ENV, "off")
    assert autotune.library(config, 8) == library
    assert tuning.choose("auto", "cpu").decode_library(config, 8) == library
    assert tuning.compiler_options(library) == autotune.LIBRARIES[library]
    assert tuning.choose("auto", "gpu").decode_library(config, 8) is None and tuning.compiler_options(None) is None


def test_a_forced_library_wins(fresh):
    fresh.setenv(autotune.ENV, "ynnpack")
    assert autotune.library(TINY, 8) == "ynnpack"
    fresh.setenv(autotune.ENV, "eigen")
    assert autotune.library(TINY.replace(quantize="w8a8"), 8) == "eigen"


def test_measured_once_then_read_back(fresh, tmp_path, capsys):
    path = tmp_path / "autotune.json"
    fresh.setenv(autotune.ENV, str(path))
    chosen = autotune.library(TINY, 2)
    saved = json.loads(path.read_text())
    (key, entry), *others = saved.items()
    assert not others and entry["library"] == chosen == min(entry["ms"], key=entry["ms"].get)
    assert set(entry["ms"]) == set(autotune.LIBRARIES) and all(ms > 0 for ms in entry["ms"].values())
    assert "autotune: float32 decode products on this CPU" in capsys.readouterr().err
    # another process (no choice in memory) reads the file back and measures nothing
    fresh.setattr(autotune, "_chosen", {})
    fresh.setattr(autotune, "measure", lambda *a: pytest.fail("measured again"))
    assert autotune.library(TINY, 2) == chosen
    # another decode batch, or a corrupt file, measures again
    path.write_text("{not json")
    fresh.setattr(autotune, "_chosen", {})
    fresh.setattr(autotune, "measure", lambda *a: {"ynnpack": 1.0, "eigen": 2.0})
    assert autotune.library(TINY, 2) == "ynnpack" and json.loads(path.read_text())[key]["library"] == "ynnpack"
