"""Continuous batching on the host: requests flow through the engine's decode slots.

Each ``step``: every free slot takes the next queued request (prefill -- in chunks through
``existing_prefix`` when the prompt is longer than ``max_prefill_length`` -- then insert), and
one ``generate`` advances every occupied slot by a token. A request ends on EOS (unless
``ignore_eos``), at ``max_new_tokens``, or when prompt plus output reach ``max_target_length``;
its slot is freed at once and the next request takes it on the following step. With a
``prefix_cache`` (``engine/prefix_cache.py``), a prompt prefills only the blocks the cache does not
hold, and leaves its own there.

The scheduler keeps an event log -- ``Event(step, slot, request, kind)`` for prefill, insert,
finish and free -- so a notebook can draw requests entering and leaving slots. Everything here
is host-side bookkeeping; the device work is the engine's prefill, insert, generate and free.

    scheduler = Scheduler(engine, params)
    ids = [scheduler.submit(prompt, max_new_tokens=32) for prompt in prompts]
    completions = scheduler.run()          # in submission order

or in one call: ``run_requests(engine, params, prompts, max_new_tokens=32)``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np

from workbench.checks import check_int, check_token_ids
from workbench.engine.engine import Engine, Params
from workbench.engine.logprobs import TokenLogprobs, check_k, prompt_logprobs, top_logprobs
from workbench.engine.prefix_cache import PrefixCache, prefill_prompt
from workbench.engine.sampling import GREEDY, Sampling
from workbench.engine.types import DecodeState, Prefix

FinishReason = Literal["eos", "max_new_tokens", "max_target_length"]
EventKind = Literal["prefill", "insert", "finish", "free"]


@dataclasses.dataclass(frozen=True)
class Request:
    """A queued prompt; ``id`` is its submission index."""

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool = False
    num_samples: int = 1  # continuations of the one prompt, each in its own slot (multisampling)
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)


@dataclasses.dataclass
class Completion:
    """One finished request: its generated ``tokens`` (an ending EOS included) and, when asked
    for, the float32 logits row [V] each token was chosen from (``logits`` [len(tokens), V]),
    each token's log-probability with the K best (``logprobs``), and each prompt token's
    log p(token | tokens before it) (``prompt_logprobs``, None for the first); both under the
    model's own distribution, before temperature or top-k/top-p (``engine/logprobs.py``)."""

    request: Request
    tokens: list[int]
    finish_reason: FinishReason
    logits: np.ndarray | None = None
    sample: int = 0  # which of the request's ``num_samples`` continuations
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """``step``: generate steps run so far; ``detail``: chunk count of a prefill, finish reason."""

    step: int
    slot: int
    request: int
    kind: EventKind
    detail: str = ""


TokenCallback = Callable[[Request, int], None]
FinishCallback = Callable[[Completion], None]


class Scheduler:
    """Runs requests through ``engine``'s slots, more requests than slots waiting in a queue.

    Args:
      sampling: one setting for all requests (greedy by default).
      seed: seeds the decode state's key and each request's prefill key (so runs repeat).
      eos_ids: the ids that end a request; default ``engine.config.eos_ids``.
      return_logits: keep each token's logits row (copied to the host every step).
      logprobs: K: keep each token's log-probability and the K most likely tokens' (reduced on
        device: K + 1 numbers per slot cross to the host, not the row).
      prompt_logprobs: keep each prompt token's log-probability (one uncached forward pass over
        the prompt per request, ``engine/logprobs.py``).
      on_token: ``on_token(request, token)`` as each token arrives, for streaming (for a request
        of several samples ``on_token(request, token, sample)``).
      on_finish: ``on_finish(completion)`` as each request ends.
      pack_prefill: prefill waiting short prompts packed together (``engine.prefill_concat``), as
        many as free slots and one row of ``max_prefill_length`` allow; off: one prefill each.
      prefix_cache: a :class:`PrefixCache` of this engine: each prompt prefills only what it does
        not hold, and leaves its full blocks there (``engine/prefix_cache.py``).
    """

    def __init__(
        self,
        engine: Engine,
        params: Params,
        *,
        sampling: Sampling | None = None,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        on_token: TokenCallback | None = None,
        on_finish: FinishCallback | None = None,
        pack_prefill: bool = False,
        prefix_cache: PrefixCache | None = None,
    ):
        if prefix_cache is not None:
            prefix_cache.check_engine(engine)
        self.engine, self.params = engine, params
        self.prefix_cache = prefix_cache
        self.sampling = sampling or GREEDY
        self.eos_ids = frozenset(engine.config.eos_ids if eos_ids is None else (int(i) for i in eos_ids))
        self.return_logits = return_logits
        self.logprobs = None if logprobs is None else check_k(logprobs, engine.config.vocab_size)
        self.prompt_logprobs = bool(prompt_logprobs)
        self.on_token, self.on_finish = on_token, on_finish
        self.pack_prefill = pack_prefill
        self.step_count = 0
        self.events: list[Event] = []
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: dict[int, Request] = {}  # occupied slot -> its request
        self._sample: dict[int, int] = {}  # occupied slot -> which sample of its request
        self._key = jax.random.key(seed)
        self._state = engine.init_decode_state(seed)
        self._requests: list[Request] = []
        # per (request id, sample): the tokens so far, their logits rows and log-probs, the completion
        self._tokens: dict[tuple[int, int], list[int]] = {}
        self._rows: dict[tuple[int, int], list[np.ndarray]] = {}
        self._logprobs: dict[tuple[int, int], list[TokenLogprobs]] = {}
        self._prompt_logprobs: dict[int, list[float | None]] = {}  # per request id
        self._done: dict[tuple[int, int], Completion] = {}

    # ---- requests ------------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        ignore_eos: bool = False,
        num_samples: int = 1,
        adapter: str | None = None,
    ) -> int:
        """Queue a request; returns its id. The prompt must leave room for one new token.

        ``num_samples``: continuations drawn from one prefill (``engine.prefill_multisampling``),
        each in its own slot; the request waits until that many slots are free together.
        ``adapter``: one of ``engine.adapters`` (None: the base model).
        """
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"a prompt must be a non-empty list of token ids, got shape {ids.shape}")
        ids = check_token_ids(ids, self.engine.config.vocab_size, what="a prompt")
        limit = self.engine.max_target_length
        if ids.size >= limit:
            raise ValueError(
                f"prompt of {ids.size} tokens leaves no room to generate within max_target_length ({limit})"
            )
        check_int("max_new_tokens", max_new_tokens, positive=True)
        check_int("num_samples", num_samples, positive=True)
        if num_samples > self.engine.max_concurrent_decodes:
            raise ValueError(
                f"num_samples ({num_samples}) exceeds the engine's {self.engine.max_concurrent_decodes} decode slots"
            )
        self.engine.adapter_index(adapter)  # an unknown name fails here, not at its turn
        request = Request(
            len(self._requests), tuple(int(i) for i in ids), max_new_tokens, bool(ignore_eos), num_samples, adapter
        )
        self._requests.append(request)
        self.queue.append(request)
        return request.id

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.slots)

    @property
    def decode_state(self) -> DecodeState:
        """The engine's decode state after the last step, for inspection: read it before the
        next ``step``, which donates it (its arrays are deleted then)."""
        return self._state

    def completions(self) -> list[Completion]:
        """The finished requests, in submission order (a request's samples in sample order)."""
        streams = ((r.id, i) for r in self._requests for i in range(r.num_samples))
        return [self._done[s] for s in streams if s in self._done]

    def run(self) -> list[Completion]:
        """Step until every request is done; all completions in submission order."""
        while self.busy:
            self.step()
        return self.completions()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit queued requests into free slots, then one generate step for every occupied slot."""
        while self.queue:  # the lowest free slots first; a request can end at its first token
            free = [s for s in range(self.engine.max_concurrent_decodes) if s not in self.slots]
            if self.queue[0].num_samples > len(free):
                break
            packed = self._packable(len(free)) if self.pack_prefill else []
            if len(packed) > 1:
                results = self.engine.prefill_concat(
                    params=self.params,
                    prompts=[r.prompt for r in packed],
                    sampling=self.sampling,
                    rng=jax.random.fold_in(self._key, packed[0].id),
                )
                for request, (prefix, _) in zip(packed, results):
                    self.queue.popleft()
                    free = [s for s in range(self.engine.max_concurrent_decodes) if s not in self.slots]
                    self._admit(request, free[:1], (prefix, "packed"))
            else:
                request = self.queue.popleft()
                self._admit(request, free[: request.num_samples])
        if not self.slots:
            return
        self._state, result = self.engine.generate(self.params, self._state, sampling=self.sampling)
        self.step_count += 1
        data = np.asarray(result.data)  # [slots, 3]: token, valid, length -- one copy per step
        logits = np.asarray(result.logits) if self.return_logits else None
        scored = result.logprobs(self.logprobs) if self.logprobs else None
        for slot, request in list(self.slots.items()):
            if not data[slot, 1]:
                raise RuntimeError(f"slot {slot} produced no token for request {request.id}")  # a scheduler bug
            row = None if logits is None else logits[slot]
            self._emit(request, slot, int(data[slot, 0]), row, None if scored is None else scored[slot])

    def _packable(self, free: int) -> list[Request]:
        """The queue's head requests that fit one packed row: single samples, at most ``free``."""
        packed, total = [], 0
        for request in self.queue:
            total += len(request.prompt)
            alone = request.num_samples > 1 or request.adapter is not None  # packed rows run the base model
            if len(packed) == free or alone or total > self.engine.max_prefill_length:
                break
            packed.append(request)
        return packed

    def _admit(self, request: Request, slots: list[int], prefilled: tuple[Prefix, str] | None = None) -> None:
        """Prefill ``request`` (unless ``prefilled``: its prefix and how it was made) into ``slots``,
        one per sample; samples that end at their first token never take their slot."""
        for sample, slot in enumerate(slots):
            self.slots[slot], self._sample[slot] = request, sample
            self._tokens[request.id, sample], self._rows[request.id, sample] = [], []
            self._logprobs[request.id, sample] = []
        if self.prompt_logprobs:
            scores = prompt_logprobs(self.engine, self.params, request.prompt, adapter=request.adapter)
            self._prompt_logprobs[request.id] = [None, *map(float, scores)]
        prefix, detail = self._prefill(request) if prefilled is None else prefilled
        self.events.append(Event(self.step_count, slots[0], request.id, "prefill", detail))
        first_logits = np.asarray(prefix.logits) if self.return_logits else None
        first = np.asarray(prefix.token).reshape(-1)  # one first token per sample
        scored = top_logprobs(prefix.logits, prefix.token, self.logprobs) if self.logprobs else [None] * len(first)
        ended = [
            self._emit(request, slot, int(first[i]), first_logits, scored[i], False) for i, slot in enumerate(slots)
        ]
        kept = [i for i, done in enumerate(ended) if not done]
        if not kept:
            return  # done after its first token: the slot never held it
        if request.num_samples == 1:
            self._state = self.engine.insert(prefix, self._state, slots[0])
        else:
            prefix = prefix.replace(token=prefix.token[np.asarray(kept)])
            self._state = self.engine.bulk_insert(prefix, self._state, [slots[i] for i in kept])
        for i in kept:
            self.events.append(Event(self.step_count, slots[i], request.id, "insert"))

    def _prefill(self, request: Request) -> tuple[Prefix, str]:
        """The prompt's prefix, prefilled in chunks of at most max_prefill_length tokens after what
        the prefix cache holds of it; the last chunk draws the first token of every sample."""
        prefix, chunks, reused = prefill_prompt(
            self.engine,
            self.params,
            request.prompt,
            cache=self.prefix_cache,
            adapter=request.adapter,
            sampling=self.sampling,
            rng=jax.random.fold_in(self._key, request.id),
            num_samples=request.num_samples,
        )
        return prefix, f"{chunks} chunk(s)" + (f", {reused} tokens cached" if reused else "")

    def _emit(self, request, slot, token, row, scored: TokenLogprobs | None, inserted: bool = True) -> bool:
        """Record one token (its logits ``row`` and log-probs when kept); finish the request if it
        ended. Returns whether it ended."""
        stream = request.id, self._sample[slot]
        tokens = self._tokens[stream]
        tokens.append(token)
        if row is not None:
            self._rows[stream].append(row)
        if scored is not None:
            self._logprobs[stream].append(scored)
        if self.on_token is not None:
            self.on_token(request, token, *stream[1:] if request.num_samples > 1 else ())
        reason = self._finish_reason(request, tokens)
        if reason is None:
            return False
        rows, scored = self._rows.pop(stream), self._logprobs.pop(stream)
        logits = np.stack(rows) if self.return_logits else None
        completion = self._done[stream] = Completion(
            request,
            self._tokens.pop(stream),
            reason,
            logits,
            stream[1],
            scored if self.logprobs else None,
            self._prompt_logprobs.get(request.id) if self.prompt_logprobs else None,
        )
        if not any(other == request.id for other, _ in self._tokens):  # its last sample: forget the prompt's
            self._prompt_logprobs.pop(request.id, None)
        self.events.append(Event(self.step_count, slot, request.id, "finish", reason))
        del self.slots[slot], self._sample[slot]
        if inserted:
            self._state = self.engine.free_resource(slot, self._state)
        self.events.append(Event(self.step_count, slot, request.id, "free"))
        if self.on_finish is not None:
            self.on_finish(completion)
        return True

    def _finish_reason(self, request: Request, tokens: list[int]) -> FinishReason | None:
        if not request.ignore_eos and tokens[-1] in self.eos_ids:
            return "eos"
        if len(tokens) >= request.max_new_tokens:
            return "max_new_tokens"
        if len(request.prompt) + len(tokens) >= self.engine.max_target_length:
            return "max_target_length"
        return None


def run_requests(
    engine: Engine,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    ignore_eos: bool = False,
    **options,
) -> list[Completion]:
    """Run ``prompts`` to completion through a fresh :class:`Scheduler` (``options`` go to it)."""
    scheduler = Scheduler(engine, params, **options)
    for prompt in prompts:
        scheduler.submit(prompt, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    return scheduler.run()
