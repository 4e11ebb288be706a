"""Log-probabilities from the library: ``workbench.score`` (texts and token ids, nats per byte),
``ResultTokens.logprobs`` under sampling (the model's distribution, before temperature), and the
bad K / bad text errors. Truth: the engine's uncached forward pass, log-softmaxed here in numpy.
(The generate path, ``--logprobs`` and ``--prompt-logprobs``, is held to transformers in
``test_hf_parity.py``'s CLI run.)"""

import dataclasses

import numpy as np
import pytest

import workbench
from tests.helpers import SHAPE, SMALL, forward_rows, lively_params
from workbench.checkpoints.tokenizer import ByteTokenizer
from workbench.cli import main
from workbench.engine.scheduler import Scheduler

CONFIG = dataclasses.replace(SMALL, vocab_size=260, bos_id=256, eos_ids=(257,), pad_id=258)  # bytes fit
TEXT = "héllo, wörld"  # 12 characters, 14 UTF-8 bytes


@pytest.fixture(scope="module")
def model():
    engine = workbench.Engine(
        CONFIG, workbench.make_mesh({"data": 1}), tokenizer=ByteTokenizer.for_config(CONFIG), **SHAPE
    )
    return engine, lively_params(engine)


def log_softmax(rows):
    rows = np.asarray(rows, np.float64)
    shifted = rows - rows.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_score_matches_the_uncached_forward(model):
    engine, params = model
    ids = [256, *TEXT.encode()]  # the byte tokenizer adds no BOS: score puts the model's first
    from_text, from_ids = workbench.score(engine, params, [TEXT, ids])
    assert from_text.tokens == ids and from_text.logprobs[0] is None
    logp = log_softmax(forward_rows(engine, params, ids))
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(from_text.logprobs[1:], expected, atol=1e-5, rtol=0)
    assert from_text.bytes == 14
    assert from_text.nats_per_byte == pytest.approx(-expected.sum() / 14, abs=1e-5)
    assert from_text.perplexity == pytest.approx(np.exp(-expected.mean()), rel=1e-5)
    assert from_ids == from_text  # ids score as given; their bytes are the decoded text's
    assert from_text.nats_per_byte > 0.1  # a random model is far from certain: the check is not vacuous


def test_logprobs_are_of_the_model_before_temperature(model):
    """A sampled first token (temperature 0.5, top-k 3) is scored under the raw distribution:
    the forward pass's log-softmax, not the tempered one it was drawn from."""
    engine, params = model
    prompt = list(b"abc")
    padded, n = engine.pad(prompt)
    sampling = workbench.Sampling(temperature=0.5, top_k=3)
    _, result = engine.prefill(params=params, padded_tokens=padded, true_length=n, sampling=sampling)
    (scored,) = result.logprobs(4)
    row = forward_rows(engine, params, prompt)[-1]
    logp = log_softmax(row)
    assert scored.token == int(np.asarray(result.data)[0, 0])
    assert scored.logprob == pytest.approx(logp[scored.token], abs=1e-5)
    assert scored.logprob != pytest.approx(log_softmax(row / 0.5)[scored.token], abs=1e-3)
    best = np.argsort(-logp)[:4]
    assert [i for i, _ in scored.top] == best.tolist()
    np.testing.assert_allclose([v for _, v in scored.top], logp[best], atol=1e-5)


def test_bad_input_is_one_line(model, capsys):
    engine, params = model
    for k, error, words in [(0, ValueError, "1..260"), (261, ValueError, "1..260"), (2.5, TypeError, "an int")]:
        with pytest.raises(error, match=words):
            Scheduler(engine, params, logprobs=k)
    with pytest.raises(TypeError, match="an int"):
        Scheduler(engine, params, logprobs=True)
    cases = [([""], "empty"), ([[256]], "nothing to score"), ([[1] * 33], "max_target_length"), ([[5, 999]], "999")]
    for texts, words in cases:
        with pytest.raises(ValueError, match=words):
            workbench.score(engine, params, texts)
    with pytest.raises(TypeError, match="string or a list of token ids"):
        workbench.score(engine, params, [[[1, 2]]])
    # the CLI names its flags, before loading anything
    for args, words in [
        (["--json", "--logprobs", "0"], "--logprobs must be at least 1"),
        (["--logprobs", "3"], "--logprobs needs --json"),
        (["--prompt-logprobs"], "--prompt-logprobs needs --json"),
        (["--json", "--logprobs", "x"], "invalid int value"),
    ]:
        assert main(["generate", "--prompt-ids", "1,2", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
