"""Sparse autoencoders (``workbench.sae``) against numpy: both layouts written here with random
weights and read back, features and reconstruction error of the captured residual, and
``SteerFeature`` through prefill and a cached generate step (add: the same as ``Steer`` with the
decoder row; clamp: ``x + (value - f(x)) * W_dec[feature]`` on the residual before the edit).

One tiny engine; every probed call shares one probe setting, so one prefill and one generate compile.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import workbench
from helpers import SHAPE, SMALL, assert_close, lively_params, prompt
from workbench import probes

D, F = SMALL.embed_dim, 64
FEATURE, CLAMP = 7, 1.5


def random_weights(seed, width=D):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.standard_normal((width, F)) / np.sqrt(width)).astype(np.float32),
        "W_dec": (rng.standard_normal((F, width)) / np.sqrt(F)).astype(np.float32),
        "b_enc": (0.1 * rng.standard_normal(F)).astype(np.float32),
        "b_dec": (0.1 * rng.standard_normal(width)).astype(np.float32),
        "threshold": np.abs(0.3 * rng.standard_normal(F)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    """(Gemma Scope JumpReLU SAE, SAELens ReLU SAE reading x - b_dec, their written arrays)."""
    root = tmp_path_factory.mktemp("saes")
    scope, lens = random_weights(1), random_weights(2)
    np.savez(root / "params.npz", **scope)
    (root / "lens").mkdir()
    del lens["threshold"]
    save_file(lens, str(root / "lens" / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": F, "architecture": "standard", "apply_b_dec_to_input": True}
    (root / "lens" / "cfg.json").write_text(json.dumps(cfg))
    return workbench.sae.load(root), workbench.sae.load(root / "lens"), scope, lens, root


def jumprelu(x, w):  # Gemma Scope's reference, in numpy
    pre = x @ w["W_enc"] + w["b_enc"]
    return np.maximum(pre, 0) * (pre > w["threshold"])


def relu_lens(x, w):  # SAELens' standard SAE
    return np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)


def check_features(found, residual, acts, w, top):
    expected = -np.sort(-acts, axis=-1)[..., :top]
    np.testing.assert_allclose(found.values, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(acts, found.ids, -1), found.values, atol=1e-5)
    np.testing.assert_array_equal(found.active, (acts > 0).sum(-1))
    error = np.linalg.norm(residual - (acts @ w["W_dec"] + w["b_dec"]), axis=-1)
    np.testing.assert_allclose(found.error, error, rtol=1e-4)
    assert (found.values[..., 0] > 0).any() and (found.active < F).all()  # sparse, not dead


@pytest.fixture(scope="module")
def runs(saes):
    """Slot 0 under [add feature 3 of the SAELens SAE after block 0, clamp FEATURE of the Gemma
    Scope SAE after block 1]; slot 1 the same with the add written as a plain Steer."""
    scope, lens = saes[0], saes[1]
    engine = workbench.Engine(SMALL, workbench.make_mesh({"data": 1}, jax.devices()[:1]), **SHAPE)
    params = lively_params(engine, seed=3)
    capture = probes.Capture(sae={1: scope, 0: lens}, sae_top=5)
    clamp = probes.SteerFeature(1, scope, FEATURE, CLAMP, mode="clamp")
    edits = {0: [probes.SteerFeature(0, lens, 3, 2.0), clamp], 1: [probes.Steer(0, lens.W_dec[3], 2.0), clamp]}
    tokens = [t % SMALL.vocab_size for t in prompt(9, 50)]
    padded, n = engine.pad(tokens)
    state, firsts = engine.init_decode_state(), {}
    for slot, interventions in edits.items():
        prefix, firsts[slot] = engine.prefill(
            params=params, padded_tokens=padded, true_length=n, probes=capture, interventions=interventions
        )
        state = engine.insert(prefix, state, slot)
    in_batch = [dataclasses.replace(e, slots=[slot]) for slot, items in edits.items() for e in items]
    _, step = engine.generate(params, state, probes=capture, interventions=in_batch)
    embedding = np.asarray(jax.device_get(nnx.to_pure_dict(params))["embed"]["embedding"])
    return engine, firsts, step, embedding, params


def test_both_layouts_read_back_the_written_weights(saes):
    scope, lens, w_scope, w_lens, _ = saes
    assert (scope.architecture, scope.d_in, scope.d_sae, lens.architecture) == ("jumprelu", D, F, "standard")
    for sae, w in ((scope, w_scope), (lens, w_lens)):
        for name, value in w.items():
            np.testing.assert_array_equal(getattr(sae, name), value)
    x = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    np.testing.assert_allclose(scope.encode(x), jumprelu(x, w_scope), atol=1e-6)
    np.testing.assert_allclose(lens.encode(x), relu_lens(x, w_lens), atol=1e-6)


def test_captured_features_are_numpy_on_the_captured_residual(saes, runs):
    _, _, w_scope, w_lens, _ = saes
    _, firsts, step, _, _ = runs
    for captured in (firsts[0].captured, step.captured):
        for layer, encode, w in ((1, jumprelu, w_scope), (0, relu_lens, w_lens)):
            residual = captured.residual(layer)
            check_features(captured.features(layer), residual, encode(residual, w), w, 5)
    assert firsts[0].captured.features(1).ids.shape == (1, 9, 5)


def test_steer_feature_add_is_steer_with_the_decoder_row_and_clamp_sets_the_feature(saes, runs):
    _, lens, w_scope, _, _ = saes
    _, firsts, step, embedding, _ = runs
    assert_close(firsts[0].logits, firsts[1].logits, rtol=1e-6)
    assert_close(step.logits[0], step.logits[1], rtol=1e-6)
    for captured, rows in ((firsts[0].captured, [0]), (firsts[1].captured, [0]), (step.captured, [0, 1])):
        r = np.asarray(rows)
        # after block 0: the embedding, attention, MLP, and the feature's decoder row times 2.0
        before = embedding[captured.tokens[r]] + captured.attn_out(0)[r] + captured.mlp(0)[r]
        assert_close(captured.residual(0)[r], before + 2.0 * lens.W_dec[3], rtol=1e-5)
        # after block 1: the clamped feature reads CLAMP, what the SAE does not explain is kept
        x = captured.residual(0)[r] + captured.attn_out(1)[r] + captured.mlp(1)[r]
        f = jumprelu(x, w_scope)[..., FEATURE]
        assert (np.abs(f - CLAMP) > 0.1).all()  # the clamp moves every token
        expected = x + (CLAMP - f)[..., None] * w_scope["W_dec"][FEATURE]
        assert_close(captured.residual(1)[r], expected, rtol=1e-5)


def test_bad_saes_fail_in_one_line(saes, runs):
    scope, lens, _, _, root = saes
    engine, firsts, params = runs[0], runs[1], runs[4]
    narrow = workbench.sae.SAE(**random_weights(4, 16))
    padded, n = engine.pad([5, 6, 7])
    cases = [
        (lambda: probes.Capture(sae={0: scope}, residual=False), "reads the residual stream: pass residual=True"),
        (lambda: probes.Capture(sae={1: scope}, layers=[0]), "layer 1 is not among the captured layers"),
        (lambda: probes.Capture(sae={0: "x"}), "Capture.sae must map layer indices to workbench.sae.SAE"),
        (
            lambda: probes.SteerFeature(0, scope, F, 1.0),
            f"feature {F} is out of range: this SAE has features 0..{F - 1}",
        ),
        (lambda: probes.SteerFeature(0, scope, 1, 1.0, "set"), "mode must be one of"),
        (lambda: probes.Capture(sae={0: narrow}), "the SAE reads width 16, but the residual stream is 32 wide"),
        (lambda: workbench.sae.load(root / "nothing"), "no SAE at"),
        (lambda: workbench.sae.SAE(**{**random_weights(5), "architecture": "gated"}), "architecture 'gated'"),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message) as error:
            made = make()
            if isinstance(made, probes.Capture):
                engine.prefill(params=params, padded_tokens=padded, true_length=n, probes=made)
            else:
                engine.prefill(params=params, padded_tokens=padded, true_length=n, interventions=[made])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="SAE features of layer 0 was not captured"):
        probes.Captured(firsts[0].captured.capture, *[None] * 5).features(0)
