"""Training: the optimizer, the loss, the loop and the evaluation (see ``workbench.train``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from workbench.checkpoints import ByteTokenizer
from workbench.engine import Engine, run_requests
from workbench.model import ModelConfig, Transformer
from workbench.train.corpus import Corpus, random_windows, spaced_windows


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
                raise ValueError(
                    f"batch_tokens ({self.batch_tokens}) must be a multiple of the sequence length {length}"
                )
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")

    @property
    def first_long_step(self) -> int:
        return self.steps - round(self.long_fraction * self.steps)

    def seq_len_at(self, step: int) -> int:
        return self.long_seq_len if step >= self.first_long_step else self.seq_len


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.peak_lr,
        config.warmup_steps,
        max(config.steps, config.warmup_steps + 1),
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
            row = {
                "step": step + 1,
                "seq_len": seq_len,
                "train_loss": float(np.mean(jax.device_get(recent))),
                "held_out_loss": float(eval_loss(params, held_out)),
                "seconds": time.perf_counter() - start,
            }
            history.append(row)
            recent = []
            log(
                f"step {row['step']:5d}  T={seq_len:4d}  train {row['train_loss']:.4f}  "
                f"held-out {row['held_out_loss']:.4f}  {row['seconds']:7.1f}s"
            )
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
    return {
        "loss": float(losses.mean()),
        "first_quarter": float(losses[:quarter].mean()),
        "last_quarter": float(losses[-quarter:].mean()),
    }


def greedy_continuation(engine: Engine, params: nnx.State, prompt: str, max_new_tokens: int = 64) -> str:
    """The byte-level model's greedy continuation of ``prompt`` (no BOS) through the scheduler;
    stops at EOS, after ``max_new_tokens`` tokens, or when the slot's cache is full."""
    tokenizer = ByteTokenizer.for_config(engine.config)
    (completion,) = run_requests(engine, params, [tokenizer.encode(prompt)], max_new_tokens=max_new_tokens)
    return tokenizer.decode(completion.tokens)
