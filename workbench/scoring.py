"""``workbench.score``: the log-probability of texts under a model, for evaluation harnesses.

    scores = workbench.score(engine, params, ["The capital of France is Paris."])
    scores[0].logprobs        # per token: None for the first, then log p(token | tokens before it)
    scores[0].nats_per_byte   # -sum(logprobs) / UTF-8 bytes: perplexity per byte, tokenizer-free

Perplexity over a corpus is ``exp(sum of -total / sum of token counts)`` (or per byte, comparable
across tokenizers); multiple-choice scoring compares ``sum(logprobs[len(context):])`` of
``context + choice`` over the choices (a choice's tokens are the ones after the context's).

A text goes through the engine's tokenizer, with the model's BOS put first when the tokenizer
does not add it (so every token of the text is scored, as lm-evaluation-harness does); token ids
are scored as given, the first as context only. The numbers are the uncached forward pass's
log-softmax, float32 (``engine/logprobs.py``): the model's own distribution.
(The module is ``scoring``, not ``score``: ``workbench.score`` is the function.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from workbench.engine.engine import Engine, Params
from workbench.engine.logprobs import prompt_logprobs


@dataclasses.dataclass(frozen=True)
class Score:
    """One text's scores: ``tokens`` as scored, ``logprobs`` per token (None for the first),
    ``total`` their sum in nats, ``bytes`` the UTF-8 bytes they spell (None: token ids on an
    engine without a tokenizer) and ``nats_per_byte`` = -total / bytes."""

    tokens: list[int]
    logprobs: list[float | None]
    total: float
    bytes: int | None
    nats_per_byte: float | None

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-probability per scored token."""
        return float(np.exp(-self.total / max(len(self.tokens) - 1, 1)))


def score(
    engine: Engine, params: Params, texts: str | Sequence[str | Sequence[int]], *, adapter: str | None = None
) -> list[Score]:
    """The :class:`Score` of each text (a string, or a list of token ids) under ``engine``'s model
    with ``params`` (``adapter``: a loaded LoRA adapter; None: the base model); one string alone
    is a list of one. Each is at most ``engine.max_target_length`` tokens."""
    if isinstance(texts, str):
        texts = [texts]
    return [_score_one(engine, params, text, adapter, index) for index, text in enumerate(texts)]


def _score_one(engine: Engine, params: Params, text, adapter: str | None, index: int) -> Score:
    tokenizer = engine.tokenizer
    if isinstance(text, str):
        if not text:
            raise ValueError(f"text {index} is empty: nothing to score")
        ids = list(engine.get_tokenizer().encode(text))
        bos = getattr(tokenizer, "bos_id", None)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        size = len(text.encode("utf-8"))
    else:
        ids = np.asarray(text)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError(f"text {index} must be a string or a list of token ids, got {type(text).__name__}")
        ids = ids.tolist()
        size = None if tokenizer is None else len(tokenizer.decode(ids[1:]).encode("utf-8"))
    if len(ids) < 2:
        raise ValueError(f"text {index} is {len(ids)} token(s) with no BOS before it: nothing to score")
    try:
        scores = [float(x) for x in prompt_logprobs(engine, params, ids, adapter=adapter)]
    except ValueError as error:
        raise ValueError(f"text {index}: {error}") from None
    total = float(np.sum(scores))
    return Score(ids, [None, *scores], total, size, -total / size if size else None)
