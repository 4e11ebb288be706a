"""The decode-library probe: which library runs the decode step's weight products on this CPU,
measured once and cached.

XLA:CPU hands a dot to YNNPACK or to Eigen (``compiler_options`` of the jit). Decode multiplies
a few rows (one per slot) by every weight, and which library streams those weights faster
depends on the CPU, the weights' dtype *and* their layout (``docs/speed.md`` has the figures:
each library won on one of two 2-core machines, and Eigen runs the tied vocabulary projection,
``[B, D] x [V, D]^T``, several times slower than YNNPACK where it wins the layers). bfloat16 and
int8 products have no fast Eigen kernel, so they always take YNNPACK and only float32 products
are measured.

The probe stands for everything the step multiplies, in proportion: the model's layer products
(as many whole layers as fit :data:`PROBE_BYTES`, chained) and a slice of its vocabulary
projection in the engine's layout (``[V, D]`` tied, ``[D, V]`` else; as many rows as fit
:data:`PROBE_BYTES`) and, for a mixture of experts, as many of one layer's experts as fit (two at least), in
``model/moe.py``'s batched products (its layers part then without a dense MLP where every layer is
sparse), float32, at the decode batch, each library in interleaved rounds. Each
part's median is scaled up to the whole model (layers by ``num_layers / layers probed``, the
projection by ``vocab_size / rows probed``) and the library with the smaller sum is kept, said
on stderr, and written to ``$XDG_CACHE_HOME/workbench/autotune.json``
(``~/.cache/workbench/autotune.json``), keyed by (probe version, CPU, XLA flags, jax version,
model shape, decode batch). Later engines and processes read it back. Left out, on purpose:
attention, whose decode kernel over a cache slice has no dot (``model/kernels.py``) and whose
share depends on the context, unknown when the pick is made; and w8 / w4's convert of int8
weights before their float32 dot (the probe's weights are float32 already).

When it runs: :mod:`workbench.engine.tuning` asks :func:`library` for an engine on the CPU, at
``engine.tune()`` or the engine's first ``generate`` -- never while an engine is built.

``WORKBENCH_AUTOTUNE``: ``off`` keeps the fixed choice (Eigen for float32, the test suite's
setting: no probe, the same program on every machine), ``ynnpack`` or ``eigen`` forces one, and
any other value is the path of the cache file. A mesh over several processes (``jax.distributed``)
takes the fixed choice unless one is forced: a probe per process could pick differently, and
replicas of one array on two processes must round alike. YNNPACK is asked for dots only
(``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``): its default also takes reductions, and then copies
the cache slice attention reads.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from workbench import compile_cache

ENV = "WORKBENCH_AUTOTUNE"
OPTION = "xla_cpu_experimental_ynn_fusion_type"
LIBRARIES = {"ynnpack": {OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}, "eigen": {OPTION: ""}}
FIXED = "eigen"  # float32 with WORKBENCH_AUTOTUNE=off
PROBE_BYTES = 64 * 2**20  # per part: past the last-level cache, so weights stream as in the step
ROUNDS, CALLS = 3, 3
VERSION = "probe2"  # in the cache key: picks of an earlier probe (layers only) are not read back
# (a mixture of experts' key also holds its experts: picks of a probe that left them out are not read)

_chosen: dict[str, str] = {}  # this process's choices, by key


def library(config, batch: int, *, probe: bool = True) -> str:
    """``"ynnpack"`` or ``"eigen"`` for the decode products of ``config`` at decode ``batch``;
    ``probe=False``: "" when nothing is cached and the probe would have to run."""
    setting = os.environ.get(ENV, "").strip()
    if setting in LIBRARIES:
        return setting
    if _products_dtype(config) != "float32":
        return "ynnpack"
    if setting.lower() in compile_cache.OFF or jax.process_count() > 1:
        return FIXED  # several processes must compile alike: their replicas must round alike
    key = _key(config, batch)
    if key not in _chosen:
        path = Path(setting).expanduser() if setting else compile_cache.cache_home() / "autotune.json"
        cached = _read(path)
        if key in cached:
            _chosen[key] = cached[key]["library"]
        elif not probe:
            return ""
        else:
            times = measure(config, batch)
            _chosen[key] = min(times, key=times.get)
            shown = ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items())
            print(
                f"autotune: float32 decode products on this CPU (whole model, estimated): {shown} -> {_chosen[key]}",
                file=sys.stderr,
            )
            _write(path, {**cached, key: {"library": _chosen[key], "ms": times}})
    return _chosen[key]


def measure(config, batch: int) -> dict[str, float]:
    """Per library, the estimated ms of the decode step's weight products: the sum of
    :func:`measure_parts`."""
    parts = measure_parts(config, batch)
    return {name: round(sum(ms.values()), 3) for name, ms in parts.items()}


def measure_parts(config, batch: int) -> dict[str, dict[str, float]]:
    """Per library, ``{"layers": ms, "vocab": ms}``: each probed part's median, in interleaved
    rounds, scaled up to the whole model (:func:`plan`)."""
    parts = plan(config)
    x = jnp.ones((batch, config.embed_dim), jnp.float32)
    runs = {
        (name, part): (jax.jit(fn, compiler_options=options), weights)
        for name, options in LIBRARIES.items()
        for part, (fn, weights, _) in parts.items()
    }
    for run, weights in runs.values():  # compile, and touch every page, before timing
        run(x, weights).block_until_ready()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(ROUNDS):
        for key, (run, weights) in runs.items():
            for _ in range(CALLS):
                start = time.perf_counter()
                run(x, weights).block_until_ready()
                times[key].append(time.perf_counter() - start)
    return {
        name: {part: round(statistics.median(times[name, part]) * 1e3 * parts[part][2], 3) for part in parts}
        for name in LIBRARIES
    }


def plan(config) -> dict[str, tuple]:
    """The probe's parts: ``{part: (function of (x, weights), weights, scale)}``, float32 weights
    in the engine's layout, ``scale`` the model's size over the part's."""
    shapes = [size for size, _ in config.projections().values()]  # q, k, v, o, gate, up, down: [in, out]
    sparse = len(config.sparse_layers)
    if sparse == config.num_layers:
        shapes = shapes[:4]  # no dense MLP: the experts part
    per_layer = 4 * sum(a * b for a, b in shapes)
    layers = max(1, min(config.num_layers, PROBE_BYTES // per_layer))
    rows = max(1, min(config.vocab_size, PROBE_BYTES // (4 * config.embed_dim)))
    head = (rows, config.embed_dim) if config.tie_embeddings else (config.embed_dim, rows)
    parts = {
        "layers": (_layers, [[_weight(shape) for shape in shapes] for _ in range(layers)], config.num_layers / layers),
        "vocab": (_tied if config.tie_embeddings else _untied, _weight(head), config.vocab_size / rows),
    }
    if sparse:  # a mixture of experts: as many of one layer's experts as fit, scaled to every sparse layer's
        d, f = config.embed_dim, config.expert_dim
        count = min(config.num_experts, max(2, PROBE_BYTES // (4 * 3 * d * f)))
        weights = [_weight((count, d, f)), _weight((count, d, f)), _weight((count, f, d))]
        parts["experts"] = (_experts, weights, sparse * config.num_experts / count)
    return parts


def _weight(shape) -> jax.Array:
    return jnp.full(shape, 0.01, jnp.float32)


def _layers(x: jax.Array, weights: list[list[jax.Array]]) -> jax.Array:
    for wq, wk, wv, wo, *mlp in weights:  # no mlp: a mixture of experts' layer (the experts part)
        attn = x @ wq + jnp.concatenate([x @ wk, x @ wv], axis=-1).sum(-1, keepdims=True)
        x = x + jnp.tanh(attn) @ wo
        if mlp:
            gate, up, down = mlp
            x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x


def _experts(x: jax.Array, weights: list[jax.Array]) -> jax.Array:  # model/moe.py's dense products
    gate, up, down = weights
    xe = jnp.broadcast_to(x, (gate.shape[0], *x.shape))
    h = jax.nn.silu(jnp.einsum("END,EDF->ENF", xe, gate)) * jnp.einsum("END,EDF->ENF", xe, up)
    return jnp.einsum("ENF,EFD->END", h, down).sum(0)


def _tied(x: jax.Array, embedding: jax.Array) -> jax.Array:  # Embed.attend: the embedding [V, D]
    return jnp.einsum("BD,VD->BV", x, embedding)


def _untied(x: jax.Array, head: jax.Array) -> jax.Array:  # the lm_head [D, V]
    return jnp.einsum("BD,DV->BV", x, head)


def _products_dtype(config) -> str:
    """The dtype the decode products run in: int8 for w8a8, the weights' own for bfloat16
    weights, else float32 (w8 and w4 convert their weights before a float product)."""
    if config.quantize == "w8a8":
        return "int8"
    if config.quantize is None and config.param_dtype == "bfloat16":
        return "bfloat16"
    return "float32"


def _key(config, batch: int) -> str:
    shape = (config.embed_dim, config.mlp_dim, config.num_heads, config.num_kv_heads, config.head_dim)
    shape += (config.num_layers, config.vocab_size, "tied" if config.tie_embeddings else "untied")
    if config.num_experts:
        shape += (config.num_experts, config.expert_dim, len(config.sparse_layers))
    flags = os.environ.get("XLA_FLAGS", "")
    fields = (VERSION, jax.__version__, cpu_name(), flags, "float32", "x".join(map(str, shape)), f"b{batch}")
    return "|".join(fields)


def cpu_name() -> str:
    """The CPU's model name and its flags' count (another kind of machine gets its own entry)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('model name', '?')} ({len(fields.get('flags', '').split())} flags, {os.cpu_count()} cpus)"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Best effort (atomic rename): a cache that cannot be written only costs a probe next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(out.name, path)
    except OSError as error:
        print(f"warning: autotune choices not saved to {path}: {error.strerror or error}", file=sys.stderr)
