"""Train the default model: the workbench's own Transformer on the Python standard library's source.

    python -m workbench.train --out DIR [--steps 900 --batch-tokens 4096 --seq-len 64 ...]

Its own package, outside the library's core (optax is the optional ``train`` extra): the corpus
(:mod:`.corpus`), the optimizer, loop and evaluation (:mod:`.loop`), and the command line
(:mod:`.__main__`, which also writes the checkpoint and its ``train.json`` record).

Data: byte-level text every machine with Python has. The corpus is every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, taken in sorted order of relative path, except those in
:data:`EXCLUDED_DIRS` (tests, site-packages, generated codec tables, the pydoc topic dump,
build configuration) and the machine-specific ``_sysconfigdata_*`` modules. A file is held out
when ``zlib.crc32(relative_path) % 10 == 0`` (about a tenth of them; a rule per file, so the
split does not shift when another Python version adds or drops a file). Each file becomes
``BOS, bytes..., EOS``; the files of a split are concatenated into one stream.

Tokens: the byte vocabulary of ``ModelConfig.tiny()`` (``model.config.BYTE_*``: bytes are their own
ids, then BOS, EOS, PAD; PAD is never trained on), whose checkpoint records the ``ByteTokenizer``.

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
Final loss over 256 evenly spaced 256-token windows: train
1.252, held out 1.265 nats/byte. Its README.md lists the held-out files and shows samples;
its train.json records every file, the loss curve and the stream digests.
"""

from workbench.load import DEFAULT_MODEL_DIR
from workbench.train.corpus import (
    EXCLUDED_DIRS,
    HELD_OUT_MODULUS,
    Corpus,
    corpus_files,
    encode_files,
    held_out_windows,
    is_held_out,
    load_corpus,
    random_windows,
    spaced_windows,
    stdlib_root,
)
from workbench.train.loop import (
    TrainConfig,
    build_model,
    evaluate,
    greedy_continuation,
    make_loss,
    make_optimizer,
    train,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "EXCLUDED_DIRS",
    "HELD_OUT_MODULUS",
    "Corpus",
    "TrainConfig",
    "build_model",
    "corpus_files",
    "encode_files",
    "evaluate",
    "greedy_continuation",
    "held_out_windows",
    "is_held_out",
    "load_corpus",
    "make_loss",
    "make_optimizer",
    "random_windows",
    "spaced_windows",
    "stdlib_root",
    "train",
]
