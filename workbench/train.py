"""Train the default model: the workbench's own Transformer on the Python standard library's source.

    python -m workbench.train --out DIR [--steps 900 --batch-tokens 4096 --seq-len 64 ...]

Data: byte-level text every machine with Python has. The corpus is every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, taken in sorted order of relative path, except those in
:data:`EXCLUDED_DIRS` (tests, site-packages, generated codec tables, the pydoc topic dump,
build configuration) and the machine-specific ``_sysconfigdata_*`` modules. A file is held out
when ``zlib.crc32(relative_path) % 10 == 0`` (about a tenth of them; a rule per file, so the
split does not shift when another Python version adds or drops a file). Each file becomes
``BOS, bytes..., EOS``; the files of a split are concatenated into one stream.

Tokens: bytes 0..255 are their own ids, BOS 256, EOS 257 (PAD 258 is never trained on): the ids
of ``ModelConfig.tiny()``, whose checkpoint records ``tokenizer={"type": "bytes"}``.

Batches: windows of ``seq_len + 1`` tokens at uniformly random offsets of the train stream
(numpy ``default_rng(seed)``), so a window starts mid-file far more often than at a BOS: the
model continues text with or without a leading BOS. Attention on this CPU costs about as much
per token as sequence length (its ``[B, N, T, S]`` scores are memory-bound), so most steps use
short windows and the last ``long_fraction`` of the steps use ``long_seq_len`` with the same
tokens per step -- the model then works at positions a short-window model never saw.

Optimizer: optax AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices only), global-norm
clipping at 1.0, learning rate linear warmup from 0 then cosine decay to 10% of the peak.
Loss: mean next-token cross-entropy in nats per byte. One plain ``jax.jit`` over the params,
with the graphdef closed over; one device, no mesh.

Determinism: the file list, the split, the batches and the initial weights follow from the
seed and the Python installation; on the same machine and versions a rerun gives the same
losses. Another Python version has another stdlib, hence another corpus (``train.json`` in the
checkpoint records the Python version and a sha256 of each stream).

The committed default model (``workbench/assets/default_model``) is this script with every
option at its default, on Python 3.11.7: 606 files, 544 train (8,876,466 tokens) and 62 held
out (1,032,548 tokens); 900 steps of 4,096 tokens (steps 1-720: 64 windows of 64; 721-900: 16
windows of 256); learning rate 0 -> 3e-3 over 50 steps, cosine to 3e-4 at step 900; seed 0;
1,701 s on the shared 2-core CPU. Final loss over 256 evenly spaced 256-token windows: train
1.252, held out 1.265 nats/byte. Its README.md lists the held-out files and shows samples;
its train.json records every file, the loss curve and the stream digests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sysconfig
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from workbench.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from workbench.engine import Engine

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data", "lib-dynload",
     "__phello__"}
)
HELD_OUT_MODULUS = 10
BYTES = {"type": "bytes"}


# ---- data ----------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix) of the corpus files under ``root`` (default: the stdlib), sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus root {root} is not a directory")
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        dirs = relative.parts[:-1]
        if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
            continue
        if relative.name.startswith("_sysconfigdata_") or not path.is_file():
            continue
        files.append(relative.as_posix())
    if not files:
        raise ValueError(f"no corpus files (*.py) under {root}")
    return sorted(files)


def is_held_out(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % HELD_OUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The two token streams (int32, ``BOS bytes EOS`` per file) and the files in each."""

    train: np.ndarray  # [n_train_tokens]
    held_out: np.ndarray  # [n_held_out_tokens]
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]

    def digest(self, split: str) -> str:
        return hashlib.sha256(getattr(self, split).astype(np.int32).tobytes()).hexdigest()


def encode_files(root: Path, paths: Sequence[str], bos: int, eos: int) -> np.ndarray:
    pieces = []
    for relative in paths:
        data = np.frombuffer((root / relative).read_bytes(), np.uint8).astype(np.int32)
        pieces.append(np.concatenate([[bos], data, [eos]]).astype(np.int32))
    return np.concatenate(pieces)


def load_corpus(root: Path | None = None, *, bos: int = 256, eos: int = 257) -> Corpus:
    root = stdlib_root() if root is None else Path(root)
    files = corpus_files(root)
    train_files = tuple(f for f in files if not is_held_out(f))
    held_out_files = tuple(f for f in files if is_held_out(f))
    if not train_files or not held_out_files:
        raise ValueError(f"the corpus under {root} is too small to split ({len(files)} files)")
    return Corpus(encode_files(root, train_files, bos, eos), encode_files(root, held_out_files, bos, eos),
                  train_files, held_out_files)


def random_windows(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """``batch`` windows [batch, seq_len + 1] at uniformly random offsets: inputs and shifted targets."""
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    return stream[starts[:, None] + np.arange(seq_len + 1)]


def spaced_windows(stream: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """``count`` windows [count, seq_len + 1] evenly spread over ``stream``: a fixed evaluation set."""
    starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(np.int64)
    return stream[starts[:, None] + np.arange(seq_len + 1)]


# ---- training ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, batch shape and optimizer. ``batch_tokens`` is the same for short and long windows."""

    steps: int = 900
    batch_tokens: int = 4096
    seq_len: int = 64
    long_seq_len: int = 256
    long_fraction: float = 0.2
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_windows: int = 32  # held-out windows of long_seq_len tokens, at every log and at the end

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "seq_len", "long_seq_len", "log_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for length in (self.seq_len, self.long_seq_len):
            if self.batch_tokens % length:
                raise ValueError(f"batch_tokens ({self.batch_tokens}) must be a multiple of the sequence length {length}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")

    @property
    def first_long_step(self) -> int:
        return self.steps - round(self.long_fraction * self.steps)

    def seq_len_at(self, step: int) -> int:
        return self.long_seq_len if step >= self.first_long_step else self.seq_len


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.peak_lr, config.warmup_steps, max(config.steps, config.warmup_steps + 1),
        end_value=config.peak_lr * config.final_lr_fraction,
    )
    def decay_matrices(params: nnx.State) -> Any:
        # Norm scales (1-D) are not decayed: pulling them toward 0 would fight the normalisation.
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay, mask=decay_matrices),
    )


def build_model(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest) of the uncached model, with seeded random weights on one device."""
    with nnx.use_eager_sharding(False):  # no mesh: the logical axes stay metadata
        model = Transformer(config, rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, ...)


def make_loss(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable[[nnx.State, jax.Array], jax.Array]:
    def loss(params: nnx.State, windows: jax.Array) -> jax.Array:  # windows [B, T + 1]
        logits = nnx.merge(graphdef, params, rest, copy=True)(windows[:, :-1])  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    return loss


def train(
    model_config: ModelConfig, config: TrainConfig, corpus: Corpus, *, log: Callable[[str], None] = print
) -> tuple[nnx.State, list[dict[str, Any]]]:
    """Train from seeded random weights; return the params and one history row per log step."""
    for name in ("train", "held_out"):
        if len(getattr(corpus, name)) <= config.long_seq_len + 1:
            raise ValueError(f"the {name} stream ({len(getattr(corpus, name))} tokens) is shorter than one window")
    graphdef, params, rest = build_model(model_config, config.seed)
    loss_fn = make_loss(graphdef, rest)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)

    @jax.jit  # compiles once per window length: twice in all
    def train_step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)
    held_out = jnp.asarray(spaced_windows(corpus.held_out, config.eval_windows, config.long_seq_len))
    rng = np.random.default_rng(config.seed)
    history, recent, start = [], [], time.perf_counter()
    for step in range(config.steps):
        seq_len = config.seq_len_at(step)
        windows = random_windows(corpus.train, rng, config.batch_tokens // seq_len, seq_len)
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(windows))
        recent.append(loss)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            row = {"step": step + 1, "seq_len": seq_len, "train_loss": float(np.mean(jax.device_get(recent))),
                   "held_out_loss": float(eval_loss(params, held_out)), "seconds": time.perf_counter() - start}
            history.append(row)
            recent = []
            log(f"step {row['step']:5d}  T={seq_len:4d}  train {row['train_loss']:.4f}  "
                f"held-out {row['held_out_loss']:.4f}  {row['seconds']:7.1f}s")
    return params, history


def evaluate(
    engine: Engine, params: nnx.State, stream: np.ndarray, *, windows: int, seq_len: int, batch: int = 16
) -> dict[str, float]:
    """Mean loss of ``engine.forward`` (the uncached oracle) over ``windows`` evenly spread windows,
    and over their first and last quarters of positions (a model that only learned short contexts
    does worse in the last quarter)."""
    total = np.zeros(seq_len)
    for chunk in np.array_split(spaced_windows(stream, windows, seq_len), max(1, windows // batch)):
        logits = engine.forward(params, chunk[:, :-1])  # [b, T, V]
        total += np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:]).sum(0))
    losses = total / windows
    quarter = max(1, seq_len // 4)
    return {"loss": float(losses.mean()), "first_quarter": float(losses[:quarter].mean()),
            "last_quarter": float(losses[-quarter:].mean())}


def greedy_continuation(engine: Engine, params: nnx.State, prompt: str, max_new_tokens: int = 64) -> str:
    """The byte-level model's greedy continuation of ``prompt`` (no BOS), through prefill, insert
    and generate on slot 0 of ``engine``; stops at EOS or after ``max_new_tokens`` bytes."""
    prompt_ids = list(prompt.encode("utf-8"))
    padded, length = engine.pad(prompt_ids)
    prefix, result = engine.prefill(params=params, padded_tokens=padded, true_length=length)
    state = engine.insert(prefix, engine.init_decode_state(), 0)
    tokens = [int(result.data[0, 0])]
    while len(tokens) < max_new_tokens and tokens[-1] not in engine.config.eos_ids:
        state, result = engine.generate(params, state)
        if not int(result.data[0, 1]):  # the slot ran out of cache
            break
        tokens.append(int(result.data[0, 0]))
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


# ---- command line --------------------------------------------------------------------------------
SAMPLE_PROMPTS = ("def __init__(self", "import os\nimport ", "    for i in range(", "class ")


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m workbench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), help="default: %(default)s")
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
    print(f"corpus: {len(corpus.train_files)} train files ({len(corpus.train):,} tokens), "
          f"{len(corpus.held_out_files)} held-out files ({len(corpus.held_out):,} tokens)", flush=True)
    started = time.perf_counter()
    params, history = train(model_config, config, corpus, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started

    from workbench.checkpoints import save_checkpoint  # imported late: orbax is slow to import
    from workbench.engine import Engine
    from workbench.sharding import make_mesh

    save_checkpoint(out, model_config, params, tokenizer=BYTES)
    engine = Engine(model_config, make_mesh({"data": 1}), decode_batch_size=1, max_prefill_length=64,
                    max_target_length=256)
    placed = engine.load_params(params)
    final = {split: evaluate(engine, placed, getattr(corpus, split), windows=256, seq_len=config.long_seq_len)
             for split in ("train", "held_out")}
    print(f"final (256 windows of {config.long_seq_len}): {json.dumps(final)}", flush=True)
    samples = {prompt: greedy_continuation(engine, placed, prompt, 96) for prompt in SAMPLE_PROMPTS}
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{prompt}{text}", flush=True)
    record = {
        "python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__,
        "corpus_root": str(stdlib_root()), "excluded_dirs": sorted(EXCLUDED_DIRS),
        "held_out_rule": f"zlib.crc32(relative_path) % {HELD_OUT_MODULUS} == 0",
        "train_files": list(corpus.train_files), "held_out_files": list(corpus.held_out_files),
        "train_tokens": len(corpus.train), "held_out_tokens": len(corpus.held_out),
        "train_sha256": corpus.digest("train"), "held_out_sha256": corpus.digest("held_out"),
        "train_config": dataclasses.asdict(config), "model": model_config.to_dict(),
        "train_seconds": seconds, "history": history, "final": final, "samples": samples,
    }
    (out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
