"""Sampling strategies, against what each one means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workbench.engine.sampling import GREEDY, Sampling, probabilities, sample

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)


def draws(sampling, count=300):
    keys = jax.random.split(jax.random.key(0), count)
    return np.asarray(jax.vmap(lambda k: sample(LOGITS, k, sampling))(keys))  # [count, 4]


def test_greedy_is_argmax():
    np.testing.assert_array_equal(sample(LOGITS, jax.random.key(0), GREEDY), np.argmax(LOGITS, -1))
    # ties go to the first index, as numpy's; -inf rows give 0; a whole vocabulary under jit
    ties = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [-jnp.inf] * 4, [2.0, 0.0, 2.0, 2.0]])
    greedy = jax.jit(lambda logits: sample(logits, jax.random.key(0), GREEDY))
    np.testing.assert_array_equal(greedy(ties), [1, 0, 0])
    vocab = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32000)), jnp.float32)
    np.testing.assert_array_equal(greedy(vocab), np.argmax(vocab, -1))


def test_top_k_keeps_only_the_k_most_likely():
    allowed = np.argsort(-np.asarray(LOGITS), axis=-1)[:, :3]
    got = draws(Sampling(temperature=5.0, top_k=3))
    for row in range(4):
        assert set(got[:, row]) <= set(allowed[row]) and len(set(got[:, row])) == 3
    np.testing.assert_array_equal(draws(Sampling(temperature=2.0, top_k=1), 20)[0], np.argmax(LOGITS, -1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.asarray(jax.nn.softmax(LOGITS, -1))
    got = draws(Sampling(temperature=1.0, top_p=0.5))
    for row in range(4):
        order = np.argsort(-probs[row])
        needed = np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1
        assert set(got[:, row]) <= set(order[:needed])
    tiny = draws(Sampling(temperature=1.0, top_p=1e-6), 20)
    assert (tiny == np.argmax(LOGITS, -1)).all()


def test_temperature_sampling_follows_the_distribution():
    got = draws(Sampling(temperature=1.0), 2000)[:, 0]
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    top = np.argmax(probs)
    assert abs((got == top).mean() - probs[top]) < 0.05


def test_same_key_same_tokens():
    sampling = Sampling(temperature=0.8, top_k=10, top_p=0.9)
    a = sample(LOGITS, jax.random.key(7), sampling)
    b = sample(LOGITS, jax.random.key(7), sampling)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_probabilities_are_what_sample_draws_from():
    """The numpy statement of temperature, top-k and top-p (what notebook 04 shows) against the library's."""
    row = np.asarray(LOGITS[0], np.float64)
    settings = [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5), Sampling(temperature=0.7, top_p=0.9)]
    for sampling in settings:
        z = row / sampling.temperature
        if sampling.top_k:
            z = np.where(z < np.sort(z)[-sampling.top_k], -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if sampling.top_p < 1:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            p[order[before >= sampling.top_p]] = 0
            p /= p.sum()
        np.testing.assert_allclose(np.asarray(probabilities(LOGITS[0], sampling)), p, atol=1e-6)
        kept = set(np.flatnonzero(p))
        assert set(draws(sampling, 100)[:, 0]) <= kept
