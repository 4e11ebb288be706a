"""``python -m workbench.train``: train the default model and write its checkpoint and record."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import optax

from workbench.checkpoints import ByteTokenizer, save_checkpoint
from workbench.engine import Engine
from workbench.model import ModelConfig
from workbench.sharding import make_mesh
from workbench.train.corpus import EXCLUDED_DIRS, HELD_OUT_MODULUS, load_corpus, stdlib_root
from workbench.train.loop import TrainConfig, evaluate, greedy_continuation, train

DESCRIPTION = "Train the default model: the workbench's own Transformer on the Python standard library's source."
SAMPLE_PROMPTS = ("def __init__(self", "import os\nimport ", "    for i in range(", "class ")


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m workbench.train", description=DESCRIPTION)
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            help="default: %(default)s",
        )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} exists and is not empty")
    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as error:
        parser.error(str(error))
    model_config = ModelConfig.tiny()

    corpus = load_corpus(bos=model_config.bos_id, eos=model_config.eos_ids[0])
    print(
        f"corpus: {len(corpus.train_files)} train files ({len(corpus.train):,} tokens), "
        f"{len(corpus.held_out_files)} held-out files ({len(corpus.held_out):,} tokens)",
        flush=True,
    )
    started = time.perf_counter()
    params, history = train(model_config, config, corpus, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started

    tokenizer = ByteTokenizer.for_config(model_config)
    save_checkpoint(out, model_config, params, tokenizer=tokenizer)
    engine = Engine(
        model_config,
        make_mesh({"data": 1}),
        decode_batch_size=1,
        max_prefill_length=64,
        max_target_length=256,
        tokenizer=tokenizer,
    )
    placed = engine.load_params(params)
    final = {
        split: evaluate(engine, placed, getattr(corpus, split), windows=256, seq_len=config.long_seq_len)
        for split in ("train", "held_out")
    }
    print(f"final (256 windows of {config.long_seq_len}): {json.dumps(final)}", flush=True)
    samples = {prompt: greedy_continuation(engine, placed, prompt, 96) for prompt in SAMPLE_PROMPTS}
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{prompt}{text}", flush=True)
    record = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "corpus_root": str(stdlib_root()),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "held_out_rule": f"zlib.crc32(relative_path) % {HELD_OUT_MODULUS} == 0",
        "train_files": list(corpus.train_files),
        "held_out_files": list(corpus.held_out_files),
        "train_tokens": len(corpus.train),
        "held_out_tokens": len(corpus.held_out),
        "train_sha256": corpus.digest("train"),
        "held_out_sha256": corpus.digest("held_out"),
        "train_config": dataclasses.asdict(config),
        "model": model_config.to_dict(),
        "train_seconds": seconds,
        "history": history,
        "final": final,
        "samples": samples,
    }
    (out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
