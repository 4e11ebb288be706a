"""Continuous batching on the host: requests flow through the engine's decode slots.

Each ``step``: every free slot takes the next queued request (prefill -- in chunks through
``existing_prefix`` when the prompt is longer than ``max_prefill_length`` -- then insert), and
one ``generate`` advances every occupied slot by a token. A request ends on EOS (unless
``ignore_eos``), at ``max_new_tokens``, or when prompt plus output reach ``max_target_length``;
its slot is freed at once and the next request takes it on the following step.

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


@dataclasses.dataclass
class Completion:
    """One finished request: its generated ``tokens`` (an ending EOS included) and, when asked
    for, the float32 logits row [V] each token was chosen from (``logits`` [len(tokens), V])."""

    request: Request
    tokens: list[int]
    finish_reason: FinishReason
    logits: np.ndarray | None = None


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
      on_token: ``on_token(request, token)`` as each token arrives, for streaming.
      on_finish: ``on_finish(completion)`` as each request ends.
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
        on_token: TokenCallback | None = None,
        on_finish: FinishCallback | None = None,
    ):
        self.engine, self.params = engine, params
        self.sampling = sampling or GREEDY
        self.eos_ids = frozenset(engine.config.eos_ids if eos_ids is None else (int(i) for i in eos_ids))
        self.return_logits = return_logits
        self.on_token, self.on_finish = on_token, on_finish
        self.step_count = 0
        self.events: list[Event] = []
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: dict[int, Request] = {}  # occupied slot -> its request
        self._key = jax.random.key(seed)
        self._state = engine.init_decode_state(seed)
        self._requests: list[Request] = []
        self._tokens: dict[int, list[int]] = {}
        self._rows: dict[int, list[np.ndarray]] = {}
        self._done: dict[int, Completion] = {}

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], *, max_new_tokens: int, ignore_eos: bool = False) -> int:
        """Queue a request; returns its id. The prompt must leave room for one new token."""
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
        request = Request(len(self._requests), tuple(int(i) for i in ids), max_new_tokens, bool(ignore_eos))
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
        """The finished requests, in submission order."""
        return [self._done[r.id] for r in self._requests if r.id in self._done]

    def run(self) -> list[Completion]:
        """Step until every request is done; all completions in submission order."""
        while self.busy:
            self.step()
        return self.completions()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit queued requests into free slots, then one generate step for every occupied slot."""
        for slot in range(self.engine.max_concurrent_decodes):
            while self.queue and slot not in self.slots:  # a request can end at its first token
                self._admit(self.queue.popleft(), slot)
        if not self.slots:
            return
        self._state, result = self.engine.generate(self.params, self._state, sampling=self.sampling)
        self.step_count += 1
        data = np.asarray(result.data)  # [slots, 3]: token, valid, length -- one copy per step
        logits = np.asarray(result.logits) if self.return_logits else None
        for slot, request in list(self.slots.items()):
            if not data[slot, 1]:
                raise RuntimeError(f"slot {slot} produced no token for request {request.id}")  # a scheduler bug
            self._emit(request, slot, int(data[slot, 0]), None if logits is None else logits[slot])

    def _admit(self, request: Request, slot: int) -> None:
        self.slots[slot] = request
        self._tokens[request.id], self._rows[request.id] = [], []
        prefix, chunks = self._prefill(request)
        self.events.append(Event(self.step_count, slot, request.id, "prefill", f"{chunks} chunk(s)"))
        first_logits = np.asarray(prefix.logits) if self.return_logits else None
        if self._emit(request, slot, int(prefix.token), first_logits, inserted=False):
            return  # done after its first token: the slot never held it
        self._state = self.engine.insert(prefix, self._state, slot)
        self.events.append(Event(self.step_count, slot, request.id, "insert"))

    def _prefill(self, request: Request) -> tuple[Prefix, int]:
        """The prompt's prefix, prefilled in chunks of at most max_prefill_length tokens."""
        chunk = self.engine.max_prefill_length
        key = jax.random.fold_in(self._key, request.id)
        prefix, chunks = None, 0
        for start in range(0, len(request.prompt), chunk):
            padded, length = self.engine.pad(request.prompt[start : start + chunk])
            prefix, _ = self.engine.prefill(
                params=self.params,
                existing_prefix=prefix,
                padded_tokens=padded,
                true_length=length,
                sampling=self.sampling,
                rng=key,
            )
            chunks += 1
        return prefix, chunks

    def _emit(self, request: Request, slot: int, token: int, row: np.ndarray | None, inserted: bool = True) -> bool:
        """Record one token; finish the request if it ended. Returns whether it ended."""
        tokens = self._tokens[request.id]
        tokens.append(token)
        if row is not None:
            self._rows[request.id].append(row)
        if self.on_token is not None:
            self.on_token(request, token)
        reason = self._finish_reason(request, tokens)
        if reason is None:
            return False
        rows = self._rows.pop(request.id)
        logits = np.stack(rows) if self.return_logits else None
        completion = self._done[request.id] = Completion(request, self._tokens.pop(request.id), reason, logits)
        self.events.append(Event(self.step_count, slot, request.id, "finish", reason))
        del self.slots[slot]
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
