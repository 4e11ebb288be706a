"""Building an engine: its shardings from the rules table, and its jitted steps, each a
``jax.jit`` of a pure body in ``engine/steps.py`` (or ``multisampling.py``, ``packing.py``) with
its static half bound. Nothing here measures anything; the one program run is
:func:`initial_rest`'s (the model's derived buffers).

Donation: the decode state (every KV cache) flows through insert, generate and free; donating
it lets XLA update the caches in place instead of copying all slots. Probes are a static
argument of prefill and generate (``steps.py``): each (sampling, plan) compiles once, and a step
without probes is the same program whether or not probes ran before.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

from workbench import sharding as shd
from workbench.engine import adapters, multisampling, packing, steps
from workbench.engine.types import DecodeState, Prefix
from workbench.model import ModelConfig, Transformer
from workbench.model.lora import AdapterStack, LoraSpec

if TYPE_CHECKING:
    from workbench.engine.engine import Engine

# The base weights. LoRA adapters (nnx.LoRAParam, a Param subclass) stay out of params: they go
# with rest, and only an engine built with adapters has any.
PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def model(
    config: ModelConfig,
    cache: tuple[int, int] | tuple[int, int, bool] | None = None,
    *,
    scan_layers: bool = False,
    lora_spec: LoraSpec | None = None,
    attention_kernels: str = "reference",
) -> Transformer:
    """The engine's model (``cache=None``: the uncached one; ``(batch, length, ring)``: cached,
    sliding layers in rings when ``ring``), seeded 0; the engine only ever builds it abstractly
    (``nnx.eval_shape``) or inside a jit."""
    with nnx.use_eager_sharding(False):  # shardings come from our own rules, applied by jit
        return Transformer(
            config,
            rngs=nnx.Rngs(0),
            cache=cache,
            scan_layers=scan_layers,
            lora_spec=lora_spec,
            attention_kernels=attention_kernels,
        )


def shardings(engine: Engine) -> tuple[nnx.State, nnx.State, Prefix, DecodeState]:
    """(params, rest, prefix, decode state) shardings of the engine, from its rules table."""
    mesh, rules = engine.mesh, engine.rules
    rep = shd.replicated(mesh)
    slots = NamedSharding(mesh, shd.logical_to_spec(("cache_batch",), (engine.max_concurrent_decodes,), mesh, rules))
    prefix = Prefix(
        cache=nnx.to_pure_dict(shd.shardings_for(engine.abstract_prefill_cache, mesh, rules)),
        length=rep,
        token=rep,
        logits=rep,
        adapter=rep if engine.adapters else None,
    )
    state = DecodeState(
        cache=nnx.to_pure_dict(shd.shardings_for(engine.abstract_decode_cache, mesh, rules)),
        positions=slots,
        tokens=slots,
        lengths=slots,
        active=slots,
        rng=rep,
        adapters=slots if engine.adapters else None,
    )
    params = shd.shardings_for(engine.abstract_params, mesh, rules)
    return params, shd.shardings_for(engine.abstract_rest, mesh, rules), prefix, state


@dataclasses.dataclass(frozen=True)
class Steps:
    """An engine's jitted steps but generate (whose compiler options wait for ``engine.tune``)."""

    cast_params: Callable  # params (placed) -> params in the model's dtypes
    empty_prefix: Callable  # () -> an empty prefill cache (pure dict)
    init_decode_state: Callable  # key -> DecodeState, every slot empty
    forward: Callable  # (params, rest, tokens [B, T], adapters [B] | None) -> logits [B, T, V]
    prefill: Callable  # steps.prefill; static sampling, plan
    prefill_multisampling: Callable  # static sampling, num_samples
    prefill_concat: Callable[[int], Callable]  # number of prompts -> its jit (a list of that many)
    insert: Callable  # (prefix, state, slots [n]) -> state; the state donated
    free: Callable  # (state, slot) -> state; the state donated


def build(engine: Engine) -> Steps:
    """Every step but generate, over the engine's split models and shardings."""
    counts, state_out = engine.compile_counts, engine.decode_state_shardings
    prefill_model = steps.CachedModel(engine.prefill_graphdef, engine.abstract_prefill_cache, engine.max_target_length)
    result_out = (engine.prefix_shardings, engine.result_shardings)

    @functools.cache
    def prefill_concat(n: int) -> Callable:
        return jax.jit(
            functools.partial(packing.prefill_concat, prefill_model, counts),
            static_argnames=("sampling",),
            out_shardings=[result_out] * n,
        )

    return Steps(
        cast_params=jax.jit(
            lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, engine.abstract_params),
            out_shardings=engine.param_shardings,
        ),
        empty_prefix=jax.jit(
            functools.partial(steps.zeros, engine.abstract_prefill_cache), out_shardings=engine.prefix_shardings.cache
        ),
        init_decode_state=jax.jit(
            functools.partial(
                steps.init_decode_state,
                engine.abstract_decode_cache,
                engine.max_concurrent_decodes,
                adapters=bool(engine.adapters),
            ),
            out_shardings=state_out,
        ),
        forward=jax.jit(functools.partial(steps.forward, engine.forward_graphdef)),
        prefill=jax.jit(
            functools.partial(steps.prefill, prefill_model, counts),
            static_argnames=("sampling", "plan"),
            out_shardings=(*result_out, None),
        ),
        prefill_multisampling=jax.jit(
            functools.partial(multisampling.prefill_multisampling, prefill_model, counts),
            static_argnames=("sampling", "num_samples"),
            out_shardings=result_out,
        ),
        prefill_concat=prefill_concat,
        # scanned layers stack the caches [L, B, S, K, H]: the slots are axis 1
        insert=jax.jit(
            functools.partial(steps.insert, counts, slot_axis=1 if engine.scan_layers else 0),
            donate_argnums=(1,),
            out_shardings=state_out,
        ),
        free=jax.jit(steps.free, donate_argnums=(0,), out_shardings=state_out),
    )


def generate(engine: Engine, compiler_options: dict[str, str] | None) -> Callable:
    """The generate step (``steps.generate``; static sampling, plan), compiled with
    ``compiler_options`` (the decode library's, ``engine/tuning.py``)."""
    decode_model = steps.CachedModel(engine.decode_graphdef, engine.abstract_decode_cache, engine.max_target_length)
    return jax.jit(
        functools.partial(steps.generate, decode_model, engine.compile_counts),
        static_argnames=("sampling", "plan"),
        donate_argnums=(2,),
        out_shardings=(engine.decode_state_shardings, engine.result_shardings, None),
        compiler_options=compiler_options,
    )


def warm(step: Callable, *args, **kwargs) -> Any:
    """Compile the jitted ``step`` for these arguments (arrays, or ``jax.ShapeDtypeStruct`` with
    shardings) without running it -- or read it from the persistent compile cache; a later call
    with arrays of the same shapes, dtypes and shardings finds it traced and compiled. Returns
    its outputs' shapes and shardings (``ShapeDtypeStruct``), to warm the step they feed."""
    outputs = step.trace(*args, **kwargs).lower().compile().out_info
    return jax.tree.map(lambda out: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=out.sharding), outputs)


def initial_rest(engine: Engine, stack: AdapterStack | None) -> nnx.State:
    """The engine's ``rest``: the model's derived buffers (rope frequencies), computed on the
    mesh (XLA prunes the unused weight init), with the adapters' stacked weights placed."""
    uncached = functools.partial(model, engine.config, **engine.model_options)
    rest = jax.jit(lambda: nnx.split(uncached(), PARAMS, ...)[2], out_shardings=engine.rest_shardings)()
    if stack is None:
        return rest
    return adapters.place(rest, stack.weights, engine.abstract_rest, engine.rest_shardings)
