"""Patching sweeps and attribution patching against independent truths: every patch applied one
at a time through the engine's cached prefill with ``probes.Patch``, a head's patch restated as
a patch of the attention output through that head's slice of ``o`` (numpy), and the attribution
estimate of one cell against a central finite difference of the patched metric.

One small engine (2 layers, 4 heads, 2 slots: a 6-token sweep runs 12 worlds in 6 rounds) with
lively weights at half scale: the estimate is first-order, and the full-scale random model bends
too sharply for a correlation that holds across seeds (at half scale, seeds 0-4: layer x head
correlation 0.88-0.98).
"""

import jax
import numpy as np
import pytest

import workbench
from helpers import SHAPE, SMALL, assert_close, lively_arrays, prompt, pure_numpy
from workbench import probes
from workbench.probes import uncached

CLEAN = [t % SMALL.vocab_size for t in prompt(6, 3)]
CORRUPT = CLEAN[:2] + [(CLEAN[2] + 7) % SMALL.vocab_size] + CLEAN[3:]
CAPTURE = probes.Capture(heads=True, mlp=False)  # residual, attention (and attn_out), heads, logits
LOGITS = probes.Capture(attention=False, residual=False, mlp=False)


@pytest.fixture(scope="module")
def model():
    engine = workbench.Engine(SMALL, workbench.make_mesh({"data": 1}, jax.devices()[:1]), **SHAPE)
    arrays = jax.tree.map(lambda x: x if x.ndim == 1 else x / 2, lively_arrays(engine, seed=0))
    params = engine.load_params(arrays)
    last = prefill(engine, params, CLEAN, CAPTURE).logits[0, -1]
    a, b = np.argsort(last)[-2:][::-1].tolist()

    def metric(logits):  # the clean run's top token against its runner-up, at the last position
        return logits[-1, a] - logits[-1, b]

    return engine, params, metric


def prefill(engine, params, tokens, capture, interventions=()):
    padded, n = engine.pad(tokens)
    _, first = engine.prefill(params=params, padded_tokens=padded, true_length=n, probes=capture,
                              interventions=list(interventions))  # fmt: skip
    return first.captured


@pytest.fixture(scope="module")
def runs(model):
    """The clean and corrupt prefills' captures, and both sweeps over heads (shared by two tests)."""
    engine, params, metric = model
    clean, corrupt = (prefill(engine, params, t, CAPTURE) for t in (CLEAN, CORRUPT))
    exact = probes.patching_sweep(engine, params, CLEAN, CORRUPT, metric, "layer_head")
    estimate = probes.attribution_patching(engine, params, CLEAN, CORRUPT, metric, "layer_head")
    return clean, corrupt, exact, estimate


def patched_metric(model, patch):
    engine, params, metric = model
    return float(metric(prefill(engine, params, CLEAN, LOGITS, [patch]).logits[0]))


def head_as_attn_out(model, runs, layer, head, scale=1.0):
    """Head ``head`` of ``layer`` patched from the corrupt run, as a patch of attn_out at every
    position: the clean attn_out plus ``scale`` times the head's change through its rows of ``o``."""
    engine, params, _ = model
    clean, corrupt, _, _ = runs
    o = pure_numpy(params)["layers"][layer]["attn"]["o"][head]  # [H, D]
    change = (corrupt.heads(layer)[0, :, head] - clean.heads(layer)[0, :, head]) @ o
    return probes.Patch(layer, "attn_out", range(len(CLEAN)), clean.attn_out(layer)[0] + scale * change)


def test_sweep_over_positions_equals_patching_one_at_a_time(model, runs):
    engine, params, metric = model
    clean, corrupt, _, _ = runs
    compiled = uncached._forward._cache_size()
    sweep = probes.patching_sweep(engine, params, CLEAN, CORRUPT, metric)
    assert uncached._forward._cache_size() - compiled <= 2  # the capture and one patched program: rounds share it
    L, T = SMALL.num_layers, len(CLEAN)  # noqa: N806
    assert sweep.table.shape == (L, T) and sweep.layers == (0, 1) and sweep.columns == tuple(range(T))
    truth = np.array([[patched_metric(model, probes.Patch(layer, "residual", [p], corrupt.residual(layer)[0, [p]]))
                       for p in range(T)] for layer in range(L)])  # fmt: skip
    assert_close(sweep.table, truth)
    assert abs(sweep.clean - float(metric(clean.logits[0]))) < 1e-4
    assert abs(sweep.corrupt - float(metric(corrupt.logits[0]))) < 1e-4
    np.testing.assert_allclose(sweep.table[:, :2], sweep.clean, atol=1e-5)  # before the corrupted token: no change
    assert np.abs(sweep.effect[:, 2:]).max() > 0.1
    # the corrupt residual after the last block at the last position is the corrupt run's last row
    np.testing.assert_allclose(sweep.table[L - 1, T - 1], sweep.corrupt, atol=1e-4)
    assert "activation patching" in str(sweep) and sweep.plot() is not None


def test_sweep_over_heads_equals_their_attn_out_patched_one_at_a_time(model, runs):
    _, _, exact, _ = runs
    assert exact.table.shape == (SMALL.num_layers, SMALL.num_heads) and exact.labels == ("h0", "h1", "h2", "h3")
    truth = np.array([[patched_metric(model, head_as_attn_out(model, runs, layer, head))
                       for head in range(SMALL.num_heads)] for layer in range(SMALL.num_layers)])  # fmt: skip
    assert_close(exact.table, truth)
    assert np.ptp(exact.table) > 0.1


def test_attribution_tracks_the_sweep_and_is_the_directional_derivative(model, runs):
    _, _, exact, estimate = runs
    assert estimate.kind == "attribution" and estimate.clean == exact.clean
    assert exact.correlation(estimate) > 0.8
    layer, head, eps = 0, 2, 1e-2
    plus, minus = (patched_metric(model, head_as_attn_out(model, runs, layer, head, s)) for s in (eps, -eps))
    np.testing.assert_allclose(estimate.effect[layer, head], (plus - minus) / (2 * eps), rtol=1e-2, atol=1e-3)
    # one residual cell: (corrupt - clean) . gradient, the derivative along the patch's direction
    engine, params, metric = model
    clean, corrupt, _, _ = runs
    by_position = probes.attribution_patching(engine, params, CLEAN, CORRUPT, metric)  # the same gradient program
    layer, p = 0, 3
    base = clean.residual(layer)[0, [p]]
    change = corrupt.residual(layer)[0, [p]] - base
    plus, minus = (patched_metric(model, probes.Patch(layer, "residual", [p], base + s * change)) for s in (eps, -eps))
    np.testing.assert_allclose(by_position.effect[layer, p], (plus - minus) / (2 * eps), rtol=1e-2, atol=1e-3)
    assert np.abs(by_position.effect[:, :2]).max() < 1e-6  # positions before the corrupted token do not change


def test_bad_input_is_one_line(model):
    engine, params, metric = model
    cases = [
        (dict(metric=lambda logits: logits[-1]), ValueError, "metric must return a scalar"),
        (dict(over="layer"), ValueError, "over must be one of"),
        (dict(positions=[0, 6]), ValueError, "position 6 is out of range: the prompts have positions 0..5"),
        (dict(corrupt=CORRUPT[:-1]), ValueError, "same number of tokens, got 6 and 5"),
        (dict(site="embed"), ValueError, "site must be one of"),
    ]
    for change, error, message in cases:
        args = dict(clean=CLEAN, corrupt=CORRUPT, metric=metric) | change
        for sweep in (probes.patching_sweep, probes.attribution_patching):
            with pytest.raises(error, match=message) as caught:
                sweep(engine, params, **args)
            assert "\n" not in str(caught.value)
