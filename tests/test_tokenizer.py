"""Tokenizers: bytes, tokenizer.json through `tokenizers`, streaming text, and how checkpoints carry them."""

import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import workbench
from helpers import SHAPE, SMALL, lively_params, pure_numpy, write_hf
from workbench.checkpoints import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    default_tokenizer,
    read_hf_config,
    save_checkpoint,
)

TEXTS = ["def main():\n    return 0\n", "héllo wörld — ünïcode ✓", "emoji 🙂 and 漢字", ""]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json that adds <s> like Llama's, trained here on a few lines."""
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 20 + ["import os\nimport sys\n"] * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_bytes_round_trip_and_specials():
    tokenizer = default_tokenizer(workbench.ModelConfig.tiny())
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_ids == (257,) and tokenizer.bos_id == 256
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode([256, *ids, 257, 258]) == text
    assert default_tokenizer(workbench.ModelConfig.llama_56m()) is None  # its ids are not bytes
    with pytest.raises(ValueError, match="at least 256"):
        ByteTokenizer(vocab_size=100)


@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_stream_decoder_emits_whole_characters(kind, tokenizer_file):
    tokenizer = ByteTokenizer() if kind == "bytes" else HFTokenizer(tokenizer_file)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        stream = StreamDecoder(tokenizer)
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces)
    cut = StreamDecoder(ByteTokenizer())
    assert [cut.push(b) for b in "é".encode()] == ["", "é"]  # the first byte alone is held back


def test_hf_tokenizer_matches_transformers(tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    ours = HFTokenizer(tokenizer_file, bos_id=1, eos_ids=(2,))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    for text in TEXTS[:3]:
        ids = ours.encode(text)
        assert ids[0] == 1 and len(ids) < len(text.encode()) + 1, "BOS, then merged tokens"
        assert ids == reference(text)["input_ids"]
        assert ours.decode(ids + [2]) == reference.decode(ids + [2], skip_special_tokens=True) == text
    assert 259 < ours.vocab_size <= 320  # 256 bytes, 3 specials, and the merges it learned


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="corrupt tokenizer file"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_checkpoints_carry_their_tokenizer(tokenizer_file, tmp_path):
    config = SMALL.replace(vocab_size=HFTokenizer(tokenizer_file).vocab_size)
    engine = workbench.Engine(config, workbench.make_mesh({"data": 1}), **SHAPE)
    pure = pure_numpy(lively_params(engine))
    hf_dir = write_hf(tmp_path / "hf", config, pure, eos_token_id=[2, 5])
    (hf_dir / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    engine, params = workbench.load(hf_dir, **SHAPE)
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.get_tokenizer()  # no tokenizer.json yet
    assert read_hf_config(hf_dir).eos_ids == (2, 5, 7)  # config.json's, then generation_config.json's

    (hf_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    engine, params = workbench.load(hf_dir, **SHAPE)
    tokenizer = engine.get_tokenizer()
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_ids == (2, 5, 7) and tokenizer.bos_id == 1

    saved = save_checkpoint(tmp_path / "orbax", engine.config, params, tokenizer=tokenizer)
    assert (saved / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    restored, restored_params = workbench.load(saved, **SHAPE)
    assert restored.get_tokenizer().encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    assert restored.config.eos_ids == (2, 5, 7)
    for a, b in zip(
        nnx.to_pure_dict(restored_params)["layers"][1]["mlp"].values(),
        nnx.to_pure_dict(params)["layers"][1]["mlp"].values(),
    ):
        assert np.array_equal(a, b)

    (saved / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer file tokenizer.json is missing"):
        workbench.load(saved, **SHAPE)
