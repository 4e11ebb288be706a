"""``python -m workbench generate``: the JSON contract against the forward oracle, streamed text,
and one ``error: ...`` line (exit 2) for every bad input. Mostly in-process through
``workbench.cli.main``; two real subprocesses prove --host-devices and the one-line error."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import workbench
from helpers import assert_close, lively_params, pure_numpy
from workbench.checkpoints import ByteTokenizer, save_checkpoint
from workbench.cli import main
from workbench.engine.scheduler import run_requests

ENGINE = ["--mesh", "data=2,tensor=2", "--decode-batch", "2", "--max-prefill-length", "16", "--max-target-length", "64"]
REQUESTS = ["--prompt", "def f(x):", "--prompt-ids", "72,101,108,108,111", "--prompt", "import os, sys\nfrom "]
PROMPT_IDS = [list(b"def f(x):"), [72, 101, 108, 108, 111], list(b"import os, sys\nfrom ")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Lively tiny() weights (the default model may be random and dull) with the bytes tokenizer."""
    engine = workbench.Engine(
        workbench.ModelConfig.tiny(),
        workbench.make_mesh({"data": 1}),
        decode_batch_size=1,
        max_prefill_length=16,
        max_target_length=64,
    )
    path = tmp_path_factory.mktemp("cli") / "lively"
    return save_checkpoint(path, engine.config, lively_params(engine), tokenizer=ByteTokenizer())


def generate(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def oracle(checkpoint):
    engine, params = workbench.load(
        checkpoint, mesh={"data": 2, "tensor": 2}, decode_batch_size=2, max_prefill_length=16, max_target_length=64
    )

    def rows(prompt, tokens):  # the forward pass's logits rows the generated tokens come from
        return np.asarray(engine.forward(params, np.array([prompt + tokens[:-1]])))[0, len(prompt) - 1 :]

    return engine, params, rows


@pytest.fixture(scope="module")
def json_run(checkpoint, tmp_path_factory):
    """One --json --return-logits --capture run, shared (a module fixture cannot use capsys:
    capture by hand); the capture's file is ``json_run[3]``."""
    capture = tmp_path_factory.mktemp("capture") / "capture.npz"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            [
                "generate",
                "--checkpoint",
                str(checkpoint),
                *ENGINE,
                *REQUESTS,
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "--json",
                "--return-logits",
                "--capture",
                "attention,residual",
                "--capture-out",
                str(capture),
            ]
        )
    return code, json.loads(out.getvalue()), err.getvalue(), capture


def test_json_requests_match_the_forward_oracle(json_run, oracle):
    code, report, err, _ = json_run
    engine, _, rows = oracle
    assert code == 0 and err == ""
    assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert report["sampling"] == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    assert [r["prompt_ids"] for r in report["requests"]] == PROMPT_IDS  # input order, text encoded as bytes
    for request in report["requests"]:
        expected = rows(request["prompt_ids"], request["tokens"])
        assert request["tokens"] == expected.argmax(-1).tolist() and len(request["tokens"]) == 6
        assert len(set(request["tokens"])) > 1
        logits = np.array(request["logits"], np.float32)
        assert logits.shape == (6, engine.config.vocab_size)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert request["text"] == engine.tokenizer.decode(request["tokens"])
        assert request["finish_reason"] == "max_new_tokens"


def test_text_streams_in_input_order(capsys, checkpoint, json_run):
    _, report, _, _ = json_run
    code, out, err = generate(
        capsys, "--checkpoint", str(checkpoint), *ENGINE, *REQUESTS, "--max-new-tokens", "6", "--ignore-eos"
    )
    assert code == 0
    blocks = [
        f"=== request {i} ===\n{bytes(r['prompt_ids']).decode()}{r['text']}\n[6 tokens, max_new_tokens]\n"
        for i, r in enumerate(report["requests"])
    ]
    assert out == "".join(blocks)
    assert "generating" in err and "18/18" in err  # the progress bar, on stderr


def test_sampling_flags_and_seed(capsys, checkpoint, oracle):
    code, out, _ = generate(
        capsys,
        "--checkpoint",
        str(checkpoint),
        *ENGINE,
        *REQUESTS,
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
        "--top-k",
        "40",
        "--seed",
        "1",
    )
    assert code == 0
    report = json.loads(out)
    assert report["sampling"] == {"temperature": 1.0, "top_k": 40, "top_p": 1.0, "seed": 1}
    engine, params, _ = oracle

    def sampled(seed):  # the same requests through the scheduler API
        return [
            c.tokens
            for c in run_requests(
                engine,
                params,
                PROMPT_IDS,
                max_new_tokens=5,
                ignore_eos=True,
                sampling=workbench.Sampling(temperature=1.0, top_k=40),
                seed=seed,
            )
        ]

    assert [r["tokens"] for r in report["requests"]] == sampled(1) != sampled(2)


def test_max_new_tokens_past_the_target_length_is_clipped(capsys, checkpoint):
    prompt = list(range(40, 100))  # 60 of the 64 positions
    code, out, err = generate(
        capsys,
        "--checkpoint",
        str(checkpoint),
        *ENGINE,
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
    )
    assert code == 0
    assert err.startswith("warning: request 0: --max-new-tokens 10 clipped to 4")
    (request,) = json.loads(out)["requests"]
    assert request["finish_reason"] == "max_target_length" and len(request["tokens"]) == 4


def bad_checkpoints(tmp: Path, checkpoint: Path) -> dict[str, Path]:
    (tmp / "hf").mkdir(exist_ok=True)
    (tmp / "hf" / "config.json").write_text("{")
    (tmp / "untokenized_hf").mkdir(exist_ok=True)  # read no further than its files: no weights needed
    (tmp / "untokenized_hf" / "config.json").write_text("{}")
    (tmp / "untokenized_hf" / "tokenizer.model").write_bytes(b"")
    (tmp / "orbax").mkdir(exist_ok=True)
    (tmp / "orbax" / "workbench.json").write_text('{"format": "workbench", "model": {"vocab_size": -1}}')
    untokenized = tmp / "untokenized"
    if not untokenized.exists():
        untokenized.mkdir()
        (untokenized / "params").symlink_to(checkpoint / "params")
        manifest = json.loads((checkpoint / "workbench.json").read_text())
        (untokenized / "workbench.json").write_text(json.dumps(manifest | {"tokenizer": None}))
    names = ("missing", "hf", "orbax", "untokenized_hf")
    return {name: tmp / name for name in names} | {"untokenized": untokenized}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "malformed ids '1,x'"),
        (["--prompt-ids", "1,,2"], "malformed ids"),
        (["--prompt-ids", "1,400"], "request 0: token id 400 is outside the vocabulary (0..383)"),
        (["--prompt", "ok", "--prompt-ids", "-1"], "request 1: token id -1 is outside the vocabulary"),
        (["--prompt", ""], "request 0: empty prompt"),
        (["--prompt-ids", ""], "empty prompt"),
        ([], "give at least one --prompt or --prompt-ids"),
        (["--prompt", "x", "--checkpoint", "{missing}"], "does not exist"),
        (["--prompt-ids", "1", "--checkpoint", "{hf}"], "corrupt Hugging Face checkpoint"),
        (["--prompt-ids", "1", "--checkpoint", "{orbax}"], "corrupt workbench checkpoint"),
        (["--prompt", "x", "--checkpoint", "{untokenized}"], "no tokenizer (its workbench.json names none); give tok"),
        (
            ["--prompt", "x", "--checkpoint", "{untokenized_hf}"],
            "has no tokenizer: tokenizer.json is missing (tokenizer.model alone cannot be read: the workbench reads "
            "tokenizer.json); give token ids with --prompt-ids (e.g. --prompt-ids 1,2,3) instead of --prompt",
        ),
        (["--prompt", "x", "--mesh", "data=16"], "needs 16 devices but only 8 exist"),
        (["--prompt", "x", "--mesh", "data=2,tensor=3"], "tensor axis (3) does not divide the model's 8 heads"),
        (["--prompt", "x", "--mesh", "data=two"], "malformed mesh"),
        (["--prompt", "x", "--mesh", "rows=2"], "unknown mesh axis 'rows'"),
        (
            ["--prompt-ids", ",".join(["7"] * 70)],
            "request 0: prompt of 70 tokens leaves no room to generate within max_target_length (64)",
        ),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--return-logits"], "--return-logits needs --json"),
        (["--prompt", "x", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["--prompt", "x", "--decode-batch", "0"], "decode_batch_size must be a positive int, got 0"),
        (
            ["--prompt", "x", "--capture", "attention,bogus", "--capture-out", "c.npz"],
            "--capture: unknown kind 'bogus'",
        ),
        (["--prompt", "x", "--capture", "residual"], "--capture needs --capture-out FILE.npz"),
    ],
)
def test_bad_input_is_one_error_line(capsys, tmp_path_factory, checkpoint, args, message):
    tmp = tmp_path_factory.getbasetemp() / "bad_checkpoints"
    tmp.mkdir(exist_ok=True)
    args = [a.format(**bad_checkpoints(tmp, checkpoint)) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(checkpoint), *args]
    engine_flags = ENGINE[2:] if "--mesh" in args else ENGINE  # the case's own --mesh replaces ours
    code, out, err = generate(capsys, *engine_flags, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # only --host-devices sets the count
    return subprocess.run(
        [sys.executable, "-m", "workbench", "generate", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )


def test_subprocess_host_devices_and_json(checkpoint, json_run):
    _, report, _, _ = json_run
    done = run_cli(
        "--host-devices",
        "4",
        "--checkpoint",
        str(checkpoint),
        *ENGINE,
        "--prompt-ids",
        "72,101,108,108,111",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert result["requests"][0]["tokens"] == report["requests"][1]["tokens"]


def test_subprocess_error_is_one_line():
    done = run_cli("--host-devices", "2", "--mesh", "data=4", "--prompt", "x")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: mesh data=4 needs 4 devices but only 2 exist")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("count", ["0", "-2"])
def test_a_sample_count_below_one_is_the_schedulers_one_line_error(capsys, checkpoint, count):
    """The CLI leaves this check to the scheduler, whose error still comes out as one line."""
    code, out, err = generate(capsys, "--checkpoint", str(checkpoint), *ENGINE, "--prompt", "x", "--num-samples", count)
    assert code == 2 and out == ""
    assert err == f"error: request 0: num_samples must be a positive int, got {count}\n"


def test_pack_prefill_packs_short_prompts_and_changes_no_token(monkeypatch, capsys, checkpoint, json_run, oracle):
    """--pack-prefill: the first two prompts (9 and 5 tokens) share one prefill row of 16 (the
    20-token one is chunked alone); the tokens equal the unpacked run's, and every logits row the
    forward oracle's within 1e-5."""
    packed, prefill_concat = [], workbench.Engine.prefill_concat

    def counting(self, **inputs):
        packed.append([list(p) for p in inputs["prompts"]])
        return prefill_concat(self, **inputs)

    monkeypatch.setattr(workbench.Engine, "prefill_concat", counting)
    flags = [*ENGINE, *REQUESTS, "--max-new-tokens", "6", "--ignore-eos", "--json", "--return-logits"]
    code, out, err = generate(capsys, "--checkpoint", str(checkpoint), *flags, "--pack-prefill")
    assert code == 0 and err == "" and packed == [PROMPT_IDS[:2]]
    report = json.loads(out)["requests"]
    assert [r["tokens"] for r in report] == [r["tokens"] for r in json_run[1]["requests"]]
    for request in report:
        expected = oracle[2](request["prompt_ids"], request["tokens"])
        np.testing.assert_allclose(request["logits"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_capture_writes_each_requests_activations(json_run, oracle):
    """--capture attention,residual: the npz holds each request's fed tokens; the last block's
    residual through the final norm and the tied unembedding (numpy) gives the forward pass's
    logits; each attention row is a causal distribution."""
    engine, params, _ = oracle
    _, report, _, path = json_run
    saved = np.load(path)
    config, pure = engine.config, pure_numpy(params)
    L, N = config.num_layers, config.num_heads  # noqa: N806
    names = ["tokens"] + [f"{kind}/layer{j}" for kind in ("attention", "residual") for j in range(L)]
    assert sorted(saved.files) == sorted(f"request{i}/{name}" for i in range(len(PROMPT_IDS)) for name in names)
    padded = np.zeros((len(PROMPT_IDS), 32), np.int32)  # every request in one forward (right padding changes no row)
    for i in range(len(PROMPT_IDS)):
        padded[i, : len(saved[f"request{i}/tokens"])] = saved[f"request{i}/tokens"]
    forward = np.asarray(engine.forward(params, padded))
    for i, request in enumerate(report["requests"]):
        tokens = saved[f"request{i}/tokens"]
        assert tokens.tolist() == request["prompt_ids"] + request["tokens"][:-1]
        T = len(tokens)  # noqa: N806
        x = saved[f"request{i}/residual/layer{L - 1}"].astype(np.float64)  # [T, D]
        normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + config.norm_eps) * pure["final_norm"]["scale"]
        assert_close(normed @ pure["embed"]["embedding"].T, forward[i, :T], rtol=1e-4)
        attention = saved[f"request{i}/attention/layer0"]
        assert attention.shape == (N, T, T)
        np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
        assert np.abs(np.triu(attention, 1)).max() == 0.0
