"""The training script (corpus selection, batches, a few steps) and the committed default model."""

import ast
import math
import zlib

import jax
import numpy as np
import pytest

from workbench import checkpoints, train
from workbench.engine import Engine
from workbench.model import ModelConfig
from workbench.sharding import make_mesh

SMALL = ModelConfig.tiny(embed_dim=32, num_layers=2, head_dim=8, mlp_dim=64)


def write(root, relative, text="x = 1\n"):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_corpus_selection_keeps_library_modules_only(tmp_path):
    for relative in [
        "a.py",
        "pkg/b.py",
        "pkg/sub/c.py",
        "notes.txt",
        "test/test_a.py",
        "pkg/tests/t.py",
        "idlelib/idle_test/x.py",
        "site-packages/numpy/core.py",
        "encodings/cp1252.py",
        "pydoc_data/topics.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
        "__pycache__/a.py",
    ]:
        write(tmp_path, relative)
    assert train.corpus_files(tmp_path) == ["a.py", "pkg/b.py", "pkg/sub/c.py"]


def test_corpus_streams_are_bos_bytes_eos_per_file_and_split_by_path_hash(tmp_path):
    names = [f"m{i:02d}.py" for i in range(40)]
    for i, name in enumerate(names):
        write(tmp_path, name, "é" * (i + 1))  # two bytes per character
    corpus = train.load_corpus(tmp_path, bos=256, eos=257)
    held = [n for n in names if zlib.crc32(n.encode()) % 10 == 0]
    assert list(corpus.held_out_files) == held and held
    assert sorted(corpus.train_files + corpus.held_out_files) == names
    first = corpus.train_files[0]
    size = 2 * (int(first[1:3]) + 1)
    assert corpus.train[0] == 256 and corpus.train[size + 1] == 257 and corpus.train[size + 2] == 256
    assert list(corpus.train[1 : size + 1]) == list(("é" * (size // 2)).encode())
    assert len(corpus.train) == sum(2 * (int(n[1:3]) + 1) + 2 for n in corpus.train_files)


def test_the_stdlib_corpus_is_deterministic():
    files = train.corpus_files()
    assert files == train.corpus_files() == sorted(files)
    assert "argparse.py" in files and "json/decoder.py" in files
    assert not any(part in train.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    held_out = [f for f in files if train.is_held_out(f)]
    assert 0.05 < len(held_out) / len(files) < 0.2


def test_windows_are_contiguous_and_reproducible():
    stream = np.arange(1000)
    a = train.random_windows(stream, np.random.default_rng(3), batch=5, seq_len=16)
    b = train.random_windows(stream, np.random.default_rng(3), batch=5, seq_len=16)
    assert a.shape == (5, 17) and np.array_equal(a, b)
    assert np.array_equal(a - a[:, :1], np.broadcast_to(np.arange(17), (5, 17)))
    spaced = train.spaced_windows(stream, 4, seq_len=9)
    assert spaced[0, 0] == 0 and spaced[-1, -1] == 999


def test_train_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the sequence length"):
        train.TrainConfig(batch_tokens=100, seq_len=64)
    with pytest.raises(ValueError, match="steps must be positive"):
        train.TrainConfig(steps=0)


def test_the_last_steps_use_long_windows():
    config = train.TrainConfig(steps=10, batch_tokens=64, seq_len=16, long_seq_len=32, long_fraction=0.3)
    assert [config.seq_len_at(step) for step in range(10)] == [16] * 7 + [32] * 3


def test_a_few_steps_lower_the_loss():
    text = np.frombuffer(b"def f(self, x):\n    return self.x + x\n" * 200, np.uint8).astype(np.int32)
    corpus = train.Corpus(text, text[: len(text) // 4], ("a.py",), ("b.py",))
    # fmt: off
    config = train.TrainConfig(
        steps=16, batch_tokens=128, seq_len=16, long_seq_len=16, long_fraction=0.0, peak_lr=1e-2, warmup_steps=2,
        log_every=4, eval_windows=4,
    )
    # fmt: on
    params, history = train.train(SMALL, config, corpus, log=lambda line: None)
    assert [row["step"] for row in history] == [4, 8, 12, 16]
    assert history[0]["train_loss"] < math.log(SMALL.vocab_size) + 0.5
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0
    assert history[-1]["held_out_loss"] < history[0]["held_out_loss"] - 1.0
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def default_model():
    """The committed default model restored through workbench.checkpoints onto a 2x4 mesh."""
    path = train.DEFAULT_MODEL_DIR
    config = checkpoints.read_config(path)
    engine = Engine(
        config, make_mesh({"data": 2, "tensor": 4}), decode_batch_size=2, max_prefill_length=64, max_target_length=128
    )
    target = checkpoints.abstract_target(engine.abstract_params, engine.param_shardings)
    return engine, engine.load_params(checkpoints.restore_params(path, target))


def test_the_default_model_is_a_small_byte_level_checkpoint():
    path = train.DEFAULT_MODEL_DIR
    assert checkpoints.read_manifest(path)["tokenizer"] == {"type": "bytes"}
    assert checkpoints.read_config(path) == ModelConfig.tiny()
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 10 * 2**20


@pytest.mark.parametrize("prompt", ["    return ", "        self.", "    for i in range(", "        if "])
def test_the_default_model_completes_lines_of_python(default_model, prompt):
    engine, params = default_model
    continuation = train.greedy_continuation(engine, params, prompt, 80)
    assert "\n" in continuation, continuation  # the line ends (a random model runs on: "QQQQ...")
    first, second = (prompt + continuation).split("\n")[:2]
    # The completed line is valid Python (as a statement in a function body)...
    body = "\n        pass" if first.endswith(":") else ""
    ast.parse(f"def f():\n    {first.strip()}{body}", mode="exec")
    # ...and a block header is followed by a line indented deeper than itself.
    if first.endswith(":"):
        assert len(second) - len(second.lstrip(" ")) > len(first) - len(first.lstrip(" ")), continuation


def test_the_default_model_has_learned_the_held_out_files(default_model):
    engine, params = default_model
    corpus = train.load_corpus(bos=engine.config.bos_id, eos=engine.config.eos_ids[0])
    result = train.evaluate(engine, params, corpus.held_out, windows=16, seq_len=128)
    # Uniform guessing over the bytes would cost ln(256) = 5.5 nats; the committed model, 1.27.
    assert result["loss"] < 1.5, result
