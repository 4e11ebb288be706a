"""Parity with Hugging Face transformers (torch CPU, float32, eager attention) on small random
models of each supported family, built from configs here and saved with ``save_pretrained``.

Several prompts of different lengths share fewer decode slots than requests, on a data=2,tensor=2
mesh, with prompts longer than max_prefill_length (chunked prefill) and, for Mistral, longer than
its sliding window. Greedy tokens must equal transformers' ``generate``; every logits row must be
within 1e-3 (relative to the row's largest logit) of an uncached transformers forward pass. The
two tests run decode's products on the two libraries the autotune probe can pick (YNNPACK through
the API, Eigen through the CLI), so each is held to transformers without running either twice.
Mistral's CLI run also asks for log-probabilities (``--logprobs 3 --prompt-logprobs``; one family:
each prompt length is one more compile of the scoring forward pass): every one within 1e-4 of
transformers' log-softmax of the uncached forward, the top 3 its best ids.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import workbench
from workbench.cli import main
from workbench.engine import autotune
from workbench.engine.scheduler import run_requests

VOCAB, NEW_TOKENS, SLOTS, PREFILL, TARGET = 128, 8, 2, 8, 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=256,
    initializer_range=0.3,  # 0.02 makes a random model repeat one token: the comparison would be weak
    attn_implementation="eager",
)
FAMILIES = {
    # low/high wavelengths 16 and 4 put head_dim 16's frequencies in all three Llama-3 regions.
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=6)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}
PROMPTS = [np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist() for seed, n in enumerate((3, 11, 19, 26))]
ENGINE = dict(
    mesh={"data": 2, "tensor": 2}, decode_batch_size=SLOTS, max_prefill_length=PREFILL, max_target_length=TARGET
)


def word_tokenizer(path):
    """tokenizer.json over words ``w0 .. w127`` (ids = the number), adding <s> (id 1) like Llama's."""
    vocab = {f"w{i}": i for i in range(VOCAB)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(HF directory, the torch model, its reference outputs per prompt)."""
    config_class, model_class, changes = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **changes)).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: randomise them so they are checked too
        for name, weight in model.named_parameters():
            if weight.ndim == 1:
                weight.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.generation_config.eos_token_id = None  # compare NEW_TOKENS tokens, EOS or not
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    word_tokenizer(path)
    return path, model


def reference(model, prompt):
    """transformers' greedy tokens, and the uncached forward's logits rows they were chosen from."""
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = generated[0, len(prompt) :].tolist()
        rows = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].numpy()
    return tokens, rows


def assert_rows_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    for ours, theirs in zip(actual, expected):
        assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_generate_matches_transformers(family, monkeypatch):
    """Decode's float32 products on YNNPACK (the probe's pick on AVX-512 machines), forced before
    the engine builds its jits; the CLI test below runs them on Eigen (the fixed choice)."""
    monkeypatch.setenv(autotune.ENV, "ynnpack")
    path, model = family
    engine, params = workbench.load(path, **ENGINE)
    assert engine.tune() == "ynnpack"
    completions = run_requests(engine, params, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
    varied = 0
    for prompt, completion in zip(PROMPTS, completions):
        tokens, rows = reference(model, prompt)
        assert completion.tokens == tokens, f"prompt of {len(prompt)} tokens"
        assert_rows_close(completion.logits, rows)
        varied += len(set(tokens)) > 2
    assert varied >= 3, "greedy tokens barely vary: the comparison would prove little"


def test_cli_matches_transformers(family, monkeypatch, request):
    monkeypatch.setenv(autotune.ENV, "eigen")  # the other library the probe can pick (the suite's fixed one)
    path, model = family
    texts = ["w5 w17 w99 w3", " ".join(f"w{i}" for i in range(40, 60))]  # the second one: 21 tokens
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    requests = [hf_tokenizer(text)["input_ids"] for text in texts] + PROMPTS[2:]
    args = [
        "generate",
        "--checkpoint",
        str(path),
        "--mesh",
        "data=2,tensor=2",
        "--decode-batch",
        str(SLOTS),
        "--max-prefill-length",
        str(PREFILL),
        "--max-target-length",
        str(TARGET),
        "--prompt",
        texts[0],
        "--prompt",
        texts[1],
        *(a for p in PROMPTS[2:] for a in ("--prompt-ids", ",".join(map(str, p)))),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--ignore-eos",
        "--json",
        "--return-logits",
    ]
    scored = request.node.callspec.params["family"] == "mistral"  # prompts past its sliding window
    args += ["--logprobs", "3", "--prompt-logprobs"] if scored else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    report = json.loads(out.getvalue())["requests"]
    assert [r["prompt_ids"] for r in report] == requests
    for prompt, result in zip(requests, report):
        tokens, rows = reference(model, prompt)
        assert result["tokens"] == tokens
        assert_rows_close(result["logits"], rows)
        assert result["text"] == hf_tokenizer.decode(tokens, skip_special_tokens=True)
        if scored:
            assert_logprobs_match(model, prompt, result)
        else:
            assert "logprobs" not in result and "prompt_logprobs" not in result


def assert_logprobs_match(model, prompt, result):
    """``--logprobs 3`` and ``--prompt-logprobs`` against transformers' log-softmax of one uncached
    forward over prompt and output: log p(each token | all before it), and the 3 best of each row."""
    ids = prompt + result["tokens"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1).numpy()
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    assert result["prompt_logprobs"][0] is None and len(result["prompt_logprobs"]) == len(prompt)
    np.testing.assert_allclose(result["prompt_logprobs"][1:], expected[: len(prompt) - 1], atol=1e-4, rtol=0)
    generated = result["logprobs"]
    assert [entry["token"] for entry in generated] == result["tokens"]
    np.testing.assert_allclose([e["logprob"] for e in generated], expected[len(prompt) - 1 :], atol=1e-4, rtol=0)
    for entry, row in zip(generated, logp[len(prompt) - 1 :]):
        best = np.argsort(-row)[:3]
        assert [pair[0] for pair in entry["top"]] == best.tolist()
        np.testing.assert_allclose([pair[1] for pair in entry["top"]], row[best], atol=1e-4, rtol=0)
