"""Platform tuning (``engine.tuning``): what an engine runs on each platform, faked here, and that
the plain path gives the tuned path's tokens; the decode-library probe runs at ``tune()`` only."""

import re

import numpy as np
import pytest

import workbench
from helpers import lively_params
from workbench.engine import autotune, compiled, tuning

SHAPE = dict(decode_batch_size=2, max_prefill_length=32, max_target_length=64)


@pytest.fixture
def options_of_generate(monkeypatch):
    """The compiler options each engine's generate is built with, in order."""
    seen = []
    build = compiled.generate

    def recording(engine, compiler_options):
        seen.append(compiler_options)
        return build(engine, compiler_options)

    monkeypatch.setattr(compiled, "generate", recording)
    return seen


def build(kernels="auto", platform=None, monkeypatch=None) -> workbench.Engine:
    if platform is not None:
        monkeypatch.setattr(tuning, "platform", lambda mesh: platform)
    return workbench.Engine(workbench.ModelConfig.tiny(), workbench.make_mesh({"data": 2}), kernels=kernels, **SHAPE)


def kernels_in(graphdef) -> set[str]:
    """The kernel sets the attention modules of a split model were built with."""
    return set(re.findall(r"\('attention_kernels', Static\(value='(\w+)'\)\)", repr(graphdef)))


@pytest.mark.parametrize(
    "platform, kernels, want, options",
    [
        ("cpu", "auto", "xla_cpu", autotune.LIBRARIES["ynnpack"]),
        ("cpu", "reference", "reference", None),
        ("gpu", "auto", "reference", None),
        ("tpu", "auto", "reference", None),
        ("gpu", "xla_cpu", "xla_cpu", None),  # the CPU's compiler options never reach another compiler
    ],
)
def test_each_platform_gets_its_kernels_and_options(monkeypatch, options_of_generate, platform, kernels, want, options):
    monkeypatch.setenv(autotune.ENV, "ynnpack")
    engine = build(kernels, platform, monkeypatch)
    assert engine.tuning.attention_kernels == want
    assert engine.model_options["attention_kernels"] == want
    for graphdef in (engine.prefill_graphdef, engine.decode_graphdef, engine.forward_graphdef):
        assert kernels_in(graphdef) == {want}
    assert options_of_generate == []  # nothing built or measured yet
    assert engine.tune() == (None if options is None else "ynnpack") == engine.decode_library
    assert options_of_generate == [options]
    engine.tune()
    assert len(options_of_generate) == 1  # once per engine


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="kernels must be one of auto, reference, xla_cpu"):
        tuning.choose("cuda", "gpu")
    with pytest.raises(ValueError, match="attention_kernels must be one of"):
        tuning.Tuning(attention_kernels="fast")
    assert tuning.choose(tuning.Tuning("xla_cpu", cpu_products=True), "gpu") == tuning.Tuning("xla_cpu", False)


def test_bfloat16_compute_becomes_float32_on_the_cpu_only():
    config = workbench.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    assert tuning.for_platform(config, "cpu").dtype == "float32"
    assert tuning.for_platform(config, "cpu").param_dtype == "bfloat16"
    assert tuning.for_platform(config, "gpu") == config


def test_the_plain_path_gives_the_tuned_tokens(monkeypatch):
    """A GPU engine (faked: it runs on the CPU here), so the reference kernels and no CPU compiler
    options, against the default CPU engine: the same greedy tokens from prefill and every decode
    step, logits close. (The reference kernels under the CPU options: tests/test_kernels.py.)"""

    def tokens(engine):
        params = lively_params(engine)
        out, logits = [], []
        state = engine.init_decode_state(0)
        for slot, prompt in enumerate([[5, 9, 200, 31, 7], list(range(40, 61))]):
            padded, n = engine.pad(prompt)
            prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
            state = engine.insert(prefix, state, slot)
            out.append(int(first.data[0, 0]))
            logits.append(np.asarray(first.logits))
        for _ in range(6):
            state, result = engine.generate(params, state)
            out += np.asarray(result.data[:, 0]).tolist()
            logits.append(np.asarray(result.logits))
        return out, logits

    want, want_logits = tokens(build())
    engine = build("auto", "gpu", monkeypatch)
    assert engine.tuning.attention_kernels == "reference"
    got, got_logits = tokens(engine)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_building_an_engine_measures_nothing(monkeypatch, tmp_path):
    """The probe runs at tune() (or the first generate), never while an engine is built or
    warmed (a warm may run beside a load, which would disturb its timing: generate waits)."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.ENV, str(path))
    monkeypatch.setattr(autotune, "_chosen", {})
    calls = []
    monkeypatch.setattr(autotune, "measure", lambda *a: calls.append(a) or {"ynnpack": 2.0, "eigen": 1.0})
    engine = build()
    assert calls == [] and not path.exists() and engine.decode_library is None
    engine.warm([])
    assert calls == [] and engine.decode_library is None and "generate" not in engine.compile_counts
    assert engine.tune() == "eigen" and len(calls) == 1 and path.exists()


def test_load_passes_the_kernels_on():
    engine, _ = workbench.load(kernels="reference", mesh={"data": 2}, **SHAPE)
    assert engine.tuning == tuning.Tuning("reference", cpu_products=False)
    assert kernels_in(engine.decode_graphdef) == {"reference"}
