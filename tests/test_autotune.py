"""The decode step's product library (``engine.autotune``): fixed, forced, or measured once and cached."""

import json

import jax
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


def test_the_pick_is_the_faster_whole_step_not_the_faster_layers(fresh, tmp_path):
    """The issue's 1B case in miniature: Eigen wins the layers, loses the vocabulary projection by
    more; the step's products are their sum, so YNNPACK is kept."""
    fresh.setenv(autotune.ENV, str(tmp_path / "autotune.json"))
    parts = {"ynnpack": {"layers": 131.0, "vocab": 30.0}, "eigen": {"layers": 112.0, "vocab": 250.0}}
    fresh.setattr(autotune, "measure_parts", lambda config, batch: parts)
    assert autotune.measure(TINY, 8) == {"ynnpack": 161.0, "eigen": 362.0}
    assert autotune.library(TINY, 8) == "ynnpack"


@pytest.mark.parametrize("tied", [True, False])
def test_the_probe_covers_the_vocabulary_in_the_engines_layout(tied, monkeypatch):
    """Every weight the step multiplies, in proportion: the scales bring each part to the whole
    model, and the vocabulary slice has the layout and dtype of the model's own output weight."""
    from flax import nnx

    from workbench.model import Transformer

    config = TINY.replace(vocab_size=4096, tie_embeddings=tied)
    monkeypatch.setattr(autotune, "PROBE_BYTES", 2**20)  # one layer of four, half the vocabulary
    parts = autotune.plan(config)
    _, layers, layer_scale = parts["layers"]
    vocab_fn, head, vocab_scale = parts["vocab"]
    assert (len(layers), layer_scale) == (1, config.num_layers)
    rows = head.shape[0 if tied else 1]
    assert (rows, vocab_scale) == (config.vocab_size // 2, 2)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(config.replace(vocab_size=rows), rngs=nnx.Rngs(0)))
    model_head = model.embed.embedding if tied else model.lm_head
    assert head.shape == model_head.shape and head.dtype == model_head.dtype
    assert vocab_fn(jax.numpy.ones((2, config.embed_dim)), head).shape == (2, rows)
