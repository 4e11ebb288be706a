"""Speed of the engine's three calls, measured the way a server would use them.

A decode step must read every weight once and the live part of each slot's KV cache; that, over
the machine's read bandwidth, is the floor of its time. :func:`bytes_per_step` counts exactly
those bytes, so ``achieved_gb_per_s`` compares with the machine's read bandwidth and says how
close a step comes to that floor; reading more than needed (cache positions no query can see)
shows up as a lower figure, never as a higher one.

Every timed call is blocked until its results (the whole decode state included) are ready, and
every call is warmed up first; ``compiles`` counts the traces the engine saw, warm-up included.
The cold start is measured too: ``compile_s`` (each call's first run less its median run),
``first_token_s`` (process start to the first generated token, prefill's), and, filled in by
the bench command, ``load_s`` (``workbench.load``) and ``compile_cache`` (``"hit"`` when every
program came from the persistent cache, ``"miss"``, or ``"off"``).

Curves (``bench --sweep``, and ``scripts/side_by_side.py --curves`` beside transformers): the
decode step against context and decode batch (:func:`decode_step_times`), prefill against prompt
length (:func:`prefill_times`), one point each (:func:`sweep`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from workbench.checks import check_int
from workbench.engine import Engine, Params
from workbench.trees import leaf_paths

COMPILED = ("prefill", "insert", "generate")


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Medians of the timed calls; times in milliseconds."""

    prefill_ms: float  # one prompt of ``prompt_length`` tokens
    insert_ms: float  # one prefix into one slot
    generate_step_ms: float  # one decode step over all slots
    decode_tokens_per_s: float
    bytes_per_step: int  # weights + live KV cache one step reads
    achieved_gb_per_s: float
    compiles: dict[str, int]  # traces of each jitted body, warm-up included
    quantize: str = "none"  # the weights' mode (``model.quant``)
    kv_cache_dtype: str = "auto"
    weight_bytes: int = 0  # every param leaf (quantized values and scales included)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)  # first call less the median call
    first_token_s: float | None = None  # process start to prefill's token, ready on the host
    load_s: float | None = None  # workbench.load: engine and params (the bench command's)
    compile_cache: str = "off"  # "hit", "miss" or "off" (workbench.compile_cache.status)
    decode_library: str | None = None  # the library of decode's products on the CPU (Engine.tune)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _timed(call: Callable[[], Any]) -> float:
    """Seconds until everything ``call`` returns is ready."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc, to a clock tick; elsewhere, since this
    module was imported)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def bytes_per_step(engine: Engine, params: Params, cached_tokens: float) -> int:
    """Bytes one decode step must read: every weight, plus ``cached_tokens`` (mean per slot) of
    keys and values in every layer for every slot (a sliding layer's ring: its whole window).

    The token embedding is the exception among the weights: a step gathers one row per slot
    from it -- unless the embedding is tied, when it is also the output projection, read whole.
    """
    slots = engine.max_concurrent_decodes
    weights = 0
    for path, leaf in leaf_paths(params).items():
        nbytes = leaf.size * leaf.dtype.itemsize
        if path.startswith("embed/embedding") and not engine.config.tie_embeddings:  # a quantized one too
            nbytes = slots * (leaf.size // engine.config.vocab_size) * leaf.dtype.itemsize
        weights += nbytes
    # Each layer's k and v: [B, S, K, H] ([L, B, S, K, H] stacked), int8 scales [B, S, K], a ring's
    # held positions [B, W]. A full-length cache is read as far as the tokens it holds; a ring
    # (S = window < max_target_length) is read whole every step.
    seq_axis = 2 if engine.scan_layers else 1
    cache = 0.0
    for leaf in leaf_paths(engine.abstract_decode_cache).values():
        length = leaf.shape[seq_axis]
        read = length if length < engine.max_target_length else cached_tokens
        cache += leaf.size // length * leaf.dtype.itemsize * read
    return int(weights + cache)


def expert_bytes(engine: Engine, params: Params, *, prompt_length: int = 64, steps: int = 4) -> dict[str, Any]:
    """A mixture of experts' decode step: the bytes it reads against the bytes the router's choice
    needs, on ``steps`` real steps after each slot took its own random ``prompt_length``-token
    prompt. ``read``: :func:`bytes_per_step` (the CPU's dense experts read every expert);
    ``chosen``: per step, the same less each sparse layer's experts no slot's token chose at
    that step (``probes.Capture(router=True)``: the union over the batch, layer by layer);
    ``experts_chosen``: per step, that union's size per sparse layer; ``expert_bytes``: one
    expert of one layer (quantized values and scales included)."""
    from workbench import probes

    config, slots = engine.config, engine.max_concurrent_decodes
    check_shape(prompt_length, steps, engine.max_prefill_length, engine.max_target_length)
    if not config.num_experts:
        raise ValueError("expert_bytes needs a mixture of experts (config.num_experts > 0)")
    layers = config.sparse_layers
    sparse = len(layers)
    leaves = leaf_paths(params).items()
    per_expert = sum(x.size * x.dtype.itemsize for p, x in leaves if "/experts/" in p) // (sparse * config.num_experts)
    rng = np.random.default_rng(0)
    state = engine.init_decode_state(0)
    for slot in range(slots):
        padded, true_length = engine.pad(rng.integers(3, config.vocab_size, size=prompt_length))
        prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=true_length)
        state = engine.insert(prefix, state, slot)
    capture = probes.Capture(attention=False, residual=False, mlp=False, logits=False, router=True)
    read = bytes_per_step(engine, params, prompt_length + (steps + 1) / 2)
    chosen, counts = [], []
    for _ in range(steps):
        state, result = engine.generate(params, state, probes=capture)
        seen = probes.captured(result)
        live = seen.live.astype(bool)
        counts.append([len(np.unique(seen.router(i)[0][live])) for i in layers])
        chosen.append(read - per_expert * (sparse * config.num_experts - sum(counts[-1])))
    return {"read": read, "chosen": chosen, "experts_chosen": counts, "expert_bytes": per_expert}


def check_shape(prompt_length: int, steps: int, max_prefill_length: int, max_target_length: int) -> None:
    """Raise ValueError unless ``steps`` decode steps after a ``prompt_length``-token prompt fit the engine."""
    for name, value in [("prompt length", prompt_length), ("steps", steps)]:
        check_int(name, value, positive=True)
    if prompt_length > max_prefill_length:
        raise ValueError(f"prompt length {prompt_length} exceeds max_prefill_length ({max_prefill_length})")
    if prompt_length + steps > max_target_length:
        raise ValueError(
            f"prompt length {prompt_length} + {steps} steps exceeds max_target_length ({max_target_length}): "
            "the slots would fill up while being timed"
        )


def measure(
    engine: Engine, params: Params, *, prompt_length: int = 64, steps: int = 32, repeats: int = 5
) -> BenchResult:
    """Time prefill (``prompt_length`` tokens), insert (one slot) and ``steps`` decode steps with
    every slot busy. Each slot holds the same ``prompt_length``-token prompt."""
    check_shape(prompt_length, steps, engine.max_prefill_length, engine.max_target_length)
    check_int("repeats", repeats, positive=True)
    slots = engine.max_concurrent_decodes
    # The decode library first (a probe on a new machine), so no timed call includes it.
    decode_library = engine.tune()
    prompt = np.random.default_rng(0).integers(0, engine.config.vocab_size, size=prompt_length)
    padded, true_length = engine.pad(prompt)

    def prefill():
        return engine.prefill(params=params, padded_tokens=padded, true_length=true_length)

    def fill(state):
        for slot in range(slots):
            state = engine.insert(prefix, state, slot)
        return state

    # Stepped by hand, not through the Scheduler, on purpose: each engine call is timed alone,
    # blocked until ready, with no host bookkeeping in the measurement.
    # Warm-up: every call compiles here; only the first call of each is timed (compile_s).
    start = time.perf_counter()
    prefix, first = prefill()
    np.asarray(first.data)  # the first token on the host, where a user would see it
    first_token_s, first_prefill_s = process_age_s(), time.perf_counter() - start
    start = time.perf_counter()
    state = jax.block_until_ready(engine.insert(prefix, engine.init_decode_state(0), 0))
    first_insert_s = time.perf_counter() - start
    state = fill(state)
    start = time.perf_counter()
    state, _ = jax.block_until_ready(engine.generate(params, state))
    first_generate_s = time.perf_counter() - start

    prefill_s = statistics.median(_timed(prefill) for _ in range(repeats))
    insert_times = []
    for i in range(max(repeats, slots)):
        start = time.perf_counter()
        state = engine.insert(prefix, state, i % slots)
        jax.block_until_ready(state)
        insert_times.append(time.perf_counter() - start)

    state = fill(state)  # every slot restarts at position prompt_length
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, result = engine.generate(params, state)
        jax.block_until_ready((state, result))
        step_times.append(time.perf_counter() - start)
    if not np.asarray(result.data)[:, 1].all():
        raise RuntimeError("a slot stopped during the timed steps: the figures would undercount")

    step_s = statistics.median(step_times)
    # Step i writes position prompt_length + i and reads prompt_length + i + 1 cached tokens.
    bytes_read = bytes_per_step(engine, params, prompt_length + (steps + 1) / 2)
    return BenchResult(
        prefill_ms=prefill_s * 1e3,
        insert_ms=statistics.median(insert_times) * 1e3,
        generate_step_ms=step_s * 1e3,
        decode_tokens_per_s=slots / step_s,
        bytes_per_step=bytes_read,
        achieved_gb_per_s=bytes_read / step_s / 1e9,
        compiles={name: int(engine.compile_counts[name]) for name in COMPILED},
        quantize=engine.config.quantize or "none",
        kv_cache_dtype=engine.config.kv_cache_dtype or "auto",
        weight_bytes=sum(leaf.size * leaf.dtype.itemsize for leaf in leaf_paths(params).values()),
        compile_s={
            name: max(0.0, first - median)
            for name, first, median in zip(
                COMPILED,
                (first_prefill_s, first_insert_s, first_generate_s),
                (prefill_s, statistics.median(insert_times), step_s),
            )
        },
        first_token_s=first_token_s,
        decode_library=decode_library,
    )


def read_gb_per_s(gib: float = 0.5, repeats: int = 3) -> float:
    """The machine's read bandwidth with all cores: the median time of ``jax.jit(jnp.sum)`` over
    ``gib`` GiB of float32 (XLA:CPU splits the reduction over its threads; numpy's single-threaded
    pairwise sum is compute-bound and reads at a third of this). The roofline of a decode step is
    its bytes over this figure."""
    import jax.numpy as jnp

    data = jnp.ones(int(gib * 2**30) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(data))  # compile and touch every page before timing
    seconds = statistics.median(_timed(lambda: total(data)) for _ in range(repeats))
    return data.nbytes / seconds / 1e9


# ---- the prefix cache (``bench --shared-prefix-length``) -------------------------------------------
@dataclasses.dataclass(frozen=True)
class SharedPrefixResult:
    """Time to first token (prompt in, first token on the host; medians, milliseconds) of prompts
    of ``prompt_length`` tokens sharing their first ``shared_prefix_length``: ``uncached`` without
    a prefix cache, ``miss`` with one that holds nothing of the prompt (lookup and store included),
    ``hit`` with one that holds the shared blocks (``tokens_reused`` tokens of them)."""

    prompt_length: int
    shared_prefix_length: int
    block: int  # the cache's block: the engine's max_prefill_length
    tokens_reused: int
    uncached_ms: float
    miss_ms: float
    hit_ms: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "hit_ratio": self.hit_ms / self.uncached_ms,
            "miss_ratio": self.miss_ms / self.uncached_ms,
        }


def measure_shared_prefix(
    engine: Engine, params: Params, *, prompt_length: int, shared_prefix_length: int, repeats: int = 5
) -> SharedPrefixResult:
    """Time to first token with and without a :class:`~workbench.PrefixCache`, measured A B C A B C
    in one run: each round prefills a fresh prompt uncached, one with a header the cache has never
    seen (a miss), and one with the shared header it holds (a hit); every prompt's tail is new."""
    from workbench.engine import prefix_cache

    check_int("prompt length", prompt_length, positive=True)
    check_int("shared prefix length", shared_prefix_length)
    check_int("repeats", repeats, positive=True)
    if not 0 <= shared_prefix_length <= prompt_length:
        raise ValueError(f"shared prefix length {shared_prefix_length} is outside 0..prompt length ({prompt_length})")
    if prompt_length >= engine.max_target_length:
        raise ValueError(
            f"prompt length {prompt_length} leaves no room within max_target_length ({engine.max_target_length})"
        )
    rng = np.random.default_rng(0)
    draw = lambda n: rng.integers(0, engine.config.vocab_size, size=n).tolist()  # noqa: E731
    header = draw(shared_prefix_length)
    blocks = prompt_length // engine.max_prefill_length + 1
    # room for the shared header's blocks and one miss's; the oldest misses are evicted
    cache = prefix_cache.PrefixCache(engine, 3 * blocks * prefix_cache.snapshot_nbytes(engine) / prefix_cache.MB)

    def first_token(tokens: list[int], use: prefix_cache.PrefixCache | None) -> tuple[float, int]:
        start = time.perf_counter()
        prefix, _, reused = prefix_cache.prefill_prompt(engine, params, tokens, cache=use)
        np.asarray(prefix.token)  # on the host, where a user would see it
        return time.perf_counter() - start, reused

    tail = prompt_length - shared_prefix_length
    for use in (None, cache, cache):  # warm-up: compiles, and the header stored
        first_token(header + draw(tail), use)
    times: dict[str, list[float]] = {"uncached": [], "miss": [], "hit": []}
    reused = 0
    for _ in range(repeats):
        times["uncached"].append(first_token(header + draw(tail), None)[0])
        times["miss"].append(first_token(draw(prompt_length), cache)[0])
        seconds, reused = first_token(header + draw(tail), cache)
        times["hit"].append(seconds)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return SharedPrefixResult(
        prompt_length, shared_prefix_length, engine.max_prefill_length, reused, ms["uncached"], ms["miss"], ms["hit"]
    )


# ---- curves: the step against context and batch, prefill against prompt length ------------------
def decode_step_times(engine: Engine, params: Params, context: int, steps: int) -> list[float]:
    """Seconds of ``steps`` decode steps (after one untimed) with every slot holding ``context``
    cached tokens by the last step, each step blocked until ready.

    The slots are not prefilled (at 1B parameters a batch of 8k-token prompts would take hours on
    a few cores): every slot of a fresh decode state is marked live at position ``context - steps
    - 1``, so attention reads ``context`` keys (zeros) as it would for a real prompt; the weights'
    and the cache's bytes read, and the kernels run, are the same."""
    start = context - steps - 1
    if start < 0 or context > engine.max_target_length:
        raise ValueError(f"context {context} must lie in {steps + 1}..max_target_length ({engine.max_target_length})")
    state = engine.init_decode_state(0)
    slots = state.positions.shape
    positions = jax.device_put(np.full(slots, start, np.int32), state.positions.sharding)
    state = state.replace(positions=positions, active=jax.device_put(np.ones(slots, bool), state.active.sharding))
    state, _ = jax.block_until_ready(engine.generate(params, state))  # untimed: compiles on a first call
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        state, _ = jax.block_until_ready(engine.generate(params, state))
        times.append(time.perf_counter() - begin)
    return times


def prefill_times(engine: Engine, params: Params, length: int, repeats: int = 1) -> list[float]:
    """Seconds of ``repeats`` prefills of one ``length``-token prompt, after an untimed one
    (which compiles the prompt's bucket if no earlier call did)."""
    tokens = np.random.default_rng(2).integers(3, engine.config.vocab_size, size=length)
    padded, true_length = engine.pad(tokens)

    def prefill():
        return engine.prefill(params=params, padded_tokens=padded, true_length=true_length)

    jax.block_until_ready(prefill())
    return [_timed(prefill) for _ in range(repeats)]


SWEEPS = ("context", "batch", "prefill")  # the bench command's --sweep


def sweep(
    engine: Engine, params: Params, kind: str, points: list[int], steps: int = 3, context: int = 64
) -> list[dict[str, Any]]:
    """One curve of ours: ``[{"point": n, "ms": median ms, "decode_library": ...}]`` -- the decode
    step against ``context`` (cached tokens a slot, :func:`decode_step_times`), against decode
    ``batch`` (one engine per batch over the same params, ``context`` cached tokens a slot), or
    ``prefill`` against prompt length. ``side_by_side.py --curves`` sets transformers beside them."""
    if kind not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}, got {kind!r}")
    for point in points:
        check_int(f"{kind} point", point, positive=True)
    rows = []
    for point in points:
        target = engine
        if kind == "batch":
            shape = dict(max_prefill_length=engine.max_prefill_length, max_target_length=engine.max_target_length)
            target = Engine(engine.config, engine.mesh, decode_batch_size=point, **shape)
        if kind == "prefill":
            times = prefill_times(target, params, point, steps)
        else:
            times = decode_step_times(target, params, context if kind == "batch" else point, steps)
        library = target.tune()
        rows.append({"point": point, "ms": statistics.median(times) * 1e3, "decode_library": library})
    return rows
