"""Direct logit attribution against the captured logits: the parts (every layer's attention and
MLP, the embedding) sum to the logit (difference), and the heads sum to their layer's attention.

One tiny engine, captured through prefill and one cached generate step, with every feature the
attribution must undo: Gemma 2's (tied embeddings, norm offset, sandwich norms, embedding scale,
final soft-cap: the pre-cap logit is the truth there) on scanned layers (stacked params).
"""

import dataclasses

import jax
import numpy as np
import pytest

import workbench
from helpers import SHAPE, SMALL, lively_params, prompt
from workbench import inspect, probes

GEMMA = dataclasses.replace(
    SMALL, tie_embeddings=True, norm_offset=1.0, post_norms=True, embed_scale=True, final_logit_softcap=8.0
)
CAPTURE = probes.Capture(heads=True)


@pytest.fixture(scope="module")
def steps():
    """(engine, params, prefill step, generate step with the prompt in slot 1)."""
    engine = workbench.Engine(GEMMA, workbench.make_mesh({"data": 1}, jax.devices()[:1]), scan_layers=True, **SHAPE)
    params = lively_params(engine, seed=5)
    padded, n = engine.pad([t % 96 for t in prompt(7, 40)])
    prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n, probes=CAPTURE)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    _, step = engine.generate(params, state, probes=CAPTURE)
    return engine, params, first, step


def precap(engine, logits):
    cap = engine.config.final_logit_softcap
    logits = np.asarray(logits, np.float64)
    return logits if cap is None else cap * np.arctanh(logits / cap)


@pytest.mark.parametrize("which", ["prefill", "generate"])
def test_parts_sum_to_the_logit_difference_and_heads_to_their_layer(steps, which):
    engine, params, first, step = steps
    result, row, slot, column = (first, 0, 0, 6) if which == "prefill" else (step, 1, 1, 0)
    logits = precap(engine, result.captured.logits[row, column])
    a, b = int(np.argmax(logits)), int(np.argmin(logits))
    for token, truth in ((a, logits[a]), ((a, b), logits[a] - logits[b])):
        report = inspect.logit_attribution(result, engine, params, token, slot=slot)
        assert report.position == (6 if which == "prefill" else 7)
        total = report.embed + sum(report.parts.values())
        assert abs(total - truth) <= 1e-4 * max(1.0, abs(truth)), (total, truth)
        assert abs(report.rest) <= 1e-4 * max(1.0, abs(truth))
        attn = np.array([report.parts[(layer, "attn")] for layer in range(engine.config.num_layers)])
        np.testing.assert_allclose(report.heads.sum(1), attn, atol=1e-4)
        assert np.ptp(report.heads) > 1e-3  # the heads differ: a real split, not a copy
    rows = report.to_rows()
    assert [r["part"] for r in rows] == ["embed"] + ["attn", "mlp"] * engine.config.num_layers + ["total"]
    assert "logit contribution" in str(report) and "head 3" in str(report)
    assert "pre-cap logit" in str(report)


def test_plot_and_bad_input(steps):
    engine, params, first, _ = steps
    report = inspect.logit_attribution(first, engine, params, 5, position=3)
    bars, heat = report.plot()
    assert bars.axes and heat.axes
    with pytest.raises(ValueError, match="token 999 is not a token id in 0..95"):
        inspect.logit_attribution(first, engine, params, (1, 999))
    with pytest.raises(ValueError, match="position 20 was not captured"):
        inspect.logit_attribution(first, engine, params, 1, position=20)
    no_heads = dict(first.captured.sites)
    no_heads.pop("heads")
    plain = inspect.logit_attribution(dataclasses.replace(first.captured, sites=no_heads), engine, params, 1)
    assert plain.heads is None and "head 0" not in str(plain)
