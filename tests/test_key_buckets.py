"""Attention reads only the live bucket of the KV cache: still exactly the uncached forward pass.

The engine tests use caches shorter than the smallest bucket (one branch); these cross bucket
boundaries (128, 256, and a last bucket that is not a power of two) in prefill and in generate.
"""

import numpy as np
import pytest

import workbench
from helpers import assert_close, lively_params, prefill_chunks
from workbench.model.attention import key_buckets

TARGET = 300  # buckets 128, 256, 300


def test_buckets_double_up_to_the_cache():
    assert key_buckets(64) == (64,)
    assert key_buckets(128) == (128,)
    assert key_buckets(300) == (128, 256, 300)
    assert key_buckets(1024) == (128, 256, 512, 1024)


@pytest.fixture(scope="module", params=[{"data": 1}, {"data": 2, "tensor": 2}], ids=["1 device", "4 devices"])
def engine(request):
    return workbench.Engine(
        workbench.ModelConfig.tiny(),
        workbench.make_mesh(request.param),
        decode_batch_size=2,
        max_prefill_length=128,
        max_target_length=TARGET,
    )


def test_prefill_and_generate_across_buckets(engine):
    params = lively_params(engine)
    rng = np.random.default_rng(0)
    prompts = {0: rng.integers(0, 256, 120).tolist(), 1: rng.integers(0, 256, 250).tolist()}
    state = engine.init_decode_state()
    rows = {}
    for slot, tokens in prompts.items():
        prefix = prefill_chunks(engine, params, tokens)  # slot 1: chunks of 128 + 122, the second in bucket 256
        state = engine.insert(prefix, state, slot)
        rows[slot] = ([int(prefix.token)], [np.asarray(prefix.logits)])
    for _ in range(12):  # slot 0 crosses 128, slot 1 crosses 256 into the last bucket
        state, result = engine.generate(params, state)
        for slot, (tokens, logits) in rows.items():
            tokens.append(int(result.data[slot, 0]))
            logits.append(np.asarray(result.logits[slot]))
    for slot, tokens in prompts.items():
        generated, logits = rows[slot]
        full = np.asarray(engine.forward(params, np.array([tokens + generated[:-1]])))[0]
        assert generated == full[len(tokens) - 1 :].argmax(-1).tolist()
        assert_close(np.stack(logits), full[len(tokens) - 1 :])
