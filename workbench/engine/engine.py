"""The inference engine: JetStream-shaped (docs/engine-api.md lists every difference), over an
NNX model split once.

The engine builds two abstract models (``nnx.eval_shape``, nothing materialised): a prefill
model (batch 1) and a decode model (``max_concurrent_decodes`` slots), both with KV caches over
``max_target_length`` positions, and splits each once into ``(graphdef, params, cache, rest)``.
Parameters are shared between the two. The jitted bodies are pure functions in
:mod:`workbench.engine.steps`; this class checks input, holds the shapes and shardings, and
calls them.

Compiles: prefill once per padded length, generate once per sampling setting, insert once per
number of slots filled at a time. ``compile_counts`` counts the traces of each.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from workbench import probes as probing
from workbench import sharding as shd
from workbench import trees
from workbench.checks import check_int
from workbench.engine import adapters as adapting
from workbench.engine import autotune, multisampling, packing, steps
from workbench.engine.inputs import bucket, check_decode_state, check_slot, check_tokens, pad
from workbench.engine.sampling import GREEDY, Sampling
from workbench.engine.types import DecodeState, Prefix, ResultTokens
from workbench.model import ModelConfig, Transformer
from workbench.model.init import random_params
from workbench.model.lora import AdapterStack, LoraSpec
from workbench.model.scan import is_stacked, stack_layers, unstack_layers

Params = nnx.State
Rules = Sequence[tuple[str, str | None]]
# The base weights. LoRA adapters (nnx.LoRAParam, a Param subclass) stay out of params: they go
# with rest, and only an engine built with adapters has any.
PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _model(
    config: ModelConfig,
    cache: tuple[int, int] | None = None,
    seed: int = 0,
    scan_layers: bool = False,
    lora_spec: LoraSpec | None = None,
) -> Transformer:
    with nnx.use_eager_sharding(False):  # shardings come from our own rules, applied by jit
        return Transformer(config, rngs=nnx.Rngs(seed), cache=cache, scan_layers=scan_layers, lora_spec=lora_spec)


class Engine:
    """JetStream-shaped engine: prefill -> insert / bulk_insert -> generate, on a device mesh.

    ``tokenizer``: the checkpoint's (``workbench.load`` passes it); ``get_tokenizer`` returns it.
    ``scan_layers``: params and KV caches stacked on a leading ``layers`` axis, the blocks run by
    one scan (``model.scan``): compile time flat in depth, the same numbers.
    ``adapters``: LoRA adapters served per slot (``workbench.load(..., adapters=...)`` reads them);
    ``engine.adapters`` lists their names.
    """

    samples_per_slot = 1  # JetStream's properties that never change here
    use_chunked_prefill = True

    def __init__(
        self,
        config: ModelConfig,
        mesh: Mesh,
        *,
        decode_batch_size: int = 8,
        max_prefill_length: int = 256,
        max_target_length: int = 1024,
        rules: Rules = shd.RULES,
        tokenizer: Any = None,
        scan_layers: bool = False,
        adapters: AdapterStack | None = None,
    ):
        slots = check_int("decode_batch_size", decode_batch_size, positive=True)
        self.max_prefill_length = check_int("max_prefill_length", max_prefill_length, positive=True)
        self.max_target_length = check_int("max_target_length", max_target_length, positive=True)
        if max_prefill_length > max_target_length:
            raise ValueError(
                f"max_prefill_length ({max_prefill_length}) exceeds max_target_length ({max_target_length})"
            )
        tensor = mesh.shape.get("tensor", 1)
        if config.num_heads % tensor:
            raise ValueError(f"the mesh's tensor axis ({tensor}) does not divide the model's {config.num_heads} heads")
        self.config, self.mesh, self.rules, self.tokenizer = config, mesh, tuple(rules), tokenizer
        self.scan_layers = bool(scan_layers)
        if self.scan_layers and (config.quantize or config.kv_cache_dtype or adapters is not None):
            raise ValueError("scan_layers does not combine with quantize, kv_cache_dtype or adapters yet: choose one")
        self._max_concurrent_decodes = slots
        self.adapters: tuple[str, ...] = adapters.names if adapters is not None else ()
        self.lora_spec = adapters.spec if adapters is not None else None
        self.compile_counts: collections.Counter[str] = collections.Counter()
        self._split_models()
        self._derive_shardings()
        self._jit_steps()
        if adapters is not None:
            self.rest = adapting.place(self.rest, adapters.weights, self.abstract_rest, self.rest_shardings)

    def _split_models(self) -> None:
        """Three abstract models, split once: prefill (batch 1), decode (one row per slot), and
        the uncached forward model. Params and rest are the same in all three."""
        config, length, scan, spec = self.config, self.max_target_length, self.scan_layers, self.lora_spec
        prefill = nnx.eval_shape(lambda: _model(config, (1, length), scan_layers=scan, lora_spec=spec))
        decode = nnx.eval_shape(
            lambda: _model(config, (self.max_concurrent_decodes, length), scan_layers=scan, lora_spec=spec)
        )
        self.prefill_graphdef, self.abstract_params, self.abstract_prefill_cache, self.abstract_rest = nnx.split(
            prefill, PARAMS, nnx.Cache, ...
        )
        self.decode_graphdef, _, self.abstract_decode_cache, _ = nnx.split(decode, PARAMS, nnx.Cache, ...)
        forward = nnx.eval_shape(lambda: _model(config, scan_layers=scan, lora_spec=spec))
        self.forward_graphdef = nnx.split(forward, PARAMS, ...)[0]

    def _derive_shardings(self) -> None:
        """Every sharding from the rules table: params, rest, prefix, decode state, results."""
        mesh, rules = self.mesh, self.rules
        rep = shd.replicated(mesh)
        slots = NamedSharding(mesh, shd.logical_to_spec(("cache_batch",), (self.max_concurrent_decodes,), mesh, rules))
        self.param_shardings = shd.shardings_for(self.abstract_params, mesh, rules)
        self.rest_shardings = shd.shardings_for(self.abstract_rest, mesh, rules)
        self.prefix_shardings = Prefix(
            cache=nnx.to_pure_dict(shd.shardings_for(self.abstract_prefill_cache, mesh, rules)),
            length=rep,
            token=rep,
            logits=rep,
            adapter=rep if self.adapters else None,
        )
        self.decode_state_shardings = DecodeState(
            cache=nnx.to_pure_dict(shd.shardings_for(self.abstract_decode_cache, mesh, rules)),
            positions=slots,
            tokens=slots,
            lengths=slots,
            active=slots,
            rng=rep,
            adapters=slots if self.adapters else None,
        )
        self.result_shardings = ResultTokens(data=rep, logits=rep)

    def _jit_steps(self) -> None:
        """The jitted steps, grouped: setup (rest, params, empty caches), the oracle, then the
        API steps. Donation: the decode state (every KV cache) flows through insert, generate
        and free; donating it lets XLA update the caches in place instead of copying all slots."""
        config, counts, state_out = self.config, self.compile_counts, self.decode_state_shardings
        prefill_model = steps.CachedModel(self.prefill_graphdef, self.abstract_prefill_cache, self.max_target_length)
        decode_model = steps.CachedModel(self.decode_graphdef, self.abstract_decode_cache, self.max_target_length)
        # setup. rest holds derived buffers (rope frequencies); XLA prunes the unused weight init.
        spec = self.lora_spec
        self.rest = jax.jit(
            lambda: nnx.split(_model(config, lora_spec=spec), PARAMS, ...)[2], out_shardings=self.rest_shardings
        )()
        self._cast_params_jit = jax.jit(
            lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, self.abstract_params),
            out_shardings=self.param_shardings,
        )
        self._empty_prefix_jit = jax.jit(
            partial(steps.zeros, self.abstract_prefill_cache), out_shardings=self.prefix_shardings.cache
        )
        self._init_state_jit = jax.jit(
            partial(
                steps.init_decode_state,
                self.abstract_decode_cache,
                self.max_concurrent_decodes,
                adapters=bool(self.adapters),
            ),
            out_shardings=state_out,
        )
        # the oracle: the uncached forward pass
        self._forward_jit = jax.jit(
            lambda p, rest, t, a=None: nnx.merge(self.forward_graphdef, p, rest, copy=True)(t, adapters=a)
        )
        # the API steps
        self._prefill_jit = jax.jit(
            partial(steps.prefill, prefill_model, counts),
            static_argnames=("sampling",),
            out_shardings=(self.prefix_shardings, self.result_shardings),
        )
        insert = partial(steps.insert, counts, slot_axis=1) if self.scan_layers else partial(steps.insert, counts)
        self._insert_jit = jax.jit(insert, donate_argnums=(1,), out_shardings=state_out)
        self._generate_jit = jax.jit(
            partial(steps.generate, decode_model, counts),
            static_argnames=("sampling",),
            donate_argnums=(2,),
            out_shardings=(state_out, self.result_shardings),
            compiler_options=self._compiler_options("generate"),
        )
        self._free_jit = jax.jit(steps.free, donate_argnums=(0,), out_shardings=state_out)
        # the same steps with probes (workbench.probes): separate jits, so the ones above never change
        self._prefill_probes_jit = jax.jit(
            partial(steps.prefill, prefill_model, counts),
            static_argnames=("sampling", "plan"),
            out_shardings=(self.prefix_shardings, self.result_shardings, None),
        )
        self._generate_probes_jit = jax.jit(
            partial(steps.generate, decode_model, counts),
            static_argnames=("sampling", "plan"),
            donate_argnums=(2,),
            out_shardings=(state_out, self.result_shardings, None),
            compiler_options=self._compiler_options("generate"),
        )
        self._prefill_multisampling_jit = jax.jit(
            partial(multisampling.prefill_multisampling, prefill_model, counts),
            static_argnames=("sampling", "num_samples"),
            out_shardings=(self.prefix_shardings, self.result_shardings),
        )
        # prefill_concat: one jit per number of prompts (its output is a list of that many prefixes)
        self._prefill_concat_jits = {}
        self._prefill_concat_body = partial(packing.prefill_concat, prefill_model, counts)

    def _compiler_options(self, step: str) -> dict[str, str] | None:
        """Decode's products: the library measured fastest on this CPU (``engine.autotune``)."""
        if step != "generate":
            return None
        return autotune.generate_options(self.config, self.max_concurrent_decodes, self.mesh.devices.flat[0].platform)

    # ---- JetStream's properties (docs/engine-api.md) ---------------------------------------------
    @property
    def max_concurrent_decodes(self) -> int:
        """Decode slots: the ``decode_batch_size`` the engine was built with (CLI ``--decode-batch``)."""
        return self._max_concurrent_decodes

    @property
    def prefill_chunk_size(self) -> int:
        """JetStream's name for the chunk length: here always ``max_prefill_length``."""
        return self.max_prefill_length

    def get_prefix_destination_sharding(self) -> Prefix:
        return self.prefix_shardings

    def get_tokenizer(self) -> Any:
        """The checkpoint's tokenizer object (JetStream returns tokenizer parameters); ValueError
        when there is none."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: give token ids instead of text")
        return self.tokenizer

    # ---- params and the oracle -------------------------------------------------------------------
    def load_params(self, params: nnx.State | dict | None = None, *, seed: int = 0) -> Params:
        """Params on the mesh: seeded random weights, or ``params`` (State or pure dict) checked
        against the model and placed by the rules (cast to the model's parameter dtype)."""
        if params is None:
            # drawn on the host (model.init): a compiled init costs ~13 s for the 56M preset
            return random_params(self.abstract_params, self.param_shardings, check_int("seed", seed))
        pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        if not isinstance(pure, dict):
            raise TypeError(f"params must be an nnx.State or a pure dict, got {type(params).__name__}")
        if self.scan_layers != is_stacked(pure):  # either layer layout: stacked here on the host
            pure = stack_layers(pure) if self.scan_layers else unstack_layers(pure)
        trees.check_matches("params", self.abstract_params, pure)
        # device_put moves arrays from any devices (or the host) onto this engine's mesh; the cast
        # to the model's parameter dtype then runs there, shard by shard.
        placed = jax.device_put(trees.fill(self.abstract_params, pure), self.param_shardings)
        return self._cast_params_jit(placed)

    def forward(self, params: Params, tokens: jax.Array | np.ndarray, *, adapter: str | None = None) -> jax.Array:
        """Float32 logits [B, T, V] of a full forward pass over ``tokens`` [B, T] with no cache:
        the oracle every cached path (prefill, chunks, insert, generate) must reproduce.
        ``adapter``: a loaded LoRA adapter applied to every row (None: the base model)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be 2-D [batch, length], got shape {tokens.shape}")
        check_tokens(tokens.reshape(-1), self.config.vocab_size, None)
        rows = adapting.rows(self.adapters, adapter, tokens.shape[0])
        return self._forward_jit(params, self.rest, jnp.asarray(tokens, jnp.int32), rows)

    # ---- adapters (engine/adapters.py) -----------------------------------------------------------
    def adapter_index(self, adapter: str | None) -> jax.Array | None:
        """The int32 index of a loaded adapter (-1 for None: the base model); None on an engine
        without adapters. ValueError naming the loaded ones for an unknown name."""
        return adapting.index(self.adapters, adapter)

    # ---- decode state ----------------------------------------------------------------------------
    def init_decode_state(self, rng: jax.Array | int | None = None) -> DecodeState:
        """All slots empty; ``rng`` (a key or seed) drives sampling in generate."""
        key = jax.random.key(0 if rng is None else rng) if not isinstance(rng, jax.Array) else rng
        return self._init_state_jit(key)

    def free_resource(self, slot: int, decode_state: DecodeState | None = None) -> DecodeState | None:
        """Release ``slot``. With a decode state, returns it with the slot emptied (valid=0 until
        the next insert); without one (JetStream's signature) it only checks the slot."""
        slot = check_slot(slot, self.max_concurrent_decodes)
        if decode_state is None:
            return None
        return self._free_jit(decode_state, jnp.int32(slot))

    # ---- prefill ---------------------------------------------------------------------------------
    def bucket(self, length: int) -> int:
        """The padded length for a prompt (chunk) of ``length`` tokens (``inputs.bucket``)."""
        return bucket(length, self.max_prefill_length)

    def pad(self, tokens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, int]:
        """(padded int32 tokens of bucket length, true length), padded with the pad id."""
        return pad(tokens, self.config.pad_id, self.max_prefill_length)

    def _check_probes_layout(self) -> None:
        if self.scan_layers or self.adapters:
            raise ValueError("probes and interventions need unscanned layers and no adapters (not combined yet)")

    def prefill(
        self,
        *,
        params: Params,
        existing_prefix: Prefix | None = None,
        padded_tokens: jax.Array | np.ndarray,
        true_length: int,
        sampling: Sampling | None = None,
        rng: jax.Array | None = None,
        adapter: str | None = None,
        probes: probing.Capture | None = None,
        interventions: Sequence[Any] | None = None,
    ) -> tuple[Prefix, ResultTokens]:
        """Run the prompt (or, with ``existing_prefix``, its next chunk) through the prefill model.

        ``padded_tokens`` [P] holds ``true_length`` real tokens then padding. The result's cache
        holds the earlier prefix plus these tokens; its first token is sampled from the logits
        at the last real position. Chunked prefill equals one prefill of the whole prompt.
        ``adapter``: a loaded LoRA adapter's name (None: the base model); insert records it.
        ``probes`` / ``interventions``: see :mod:`workbench.probes` (the result's ``captured``).
        """
        inputs = self._prefill_inputs(existing_prefix, padded_tokens, true_length, rng)
        index = adapting.chunk_index(self.adapters, existing_prefix, adapter)
        plan, data = probing.prepare(probes, interventions, self.config, 1)
        if plan is None:
            return self._prefill_jit(params, self.rest, *inputs, sampling=sampling or GREEDY, adapter=index)
        self._check_probes_layout()
        prefix, result, raw = self._prefill_probes_jit(
            params, self.rest, *inputs, data, sampling=sampling or GREEDY, plan=plan
        )
        return prefix, probing.attach(result, raw, plan)

    def _prefill_inputs(self, existing_prefix, padded_tokens, true_length, rng) -> tuple:
        """(cache, tokens, start, true_length, key) for a prefill body, every input checked."""
        tokens = check_tokens(padded_tokens, self.config.vocab_size, self.max_prefill_length)
        true_length = check_int("true_length", true_length)
        if not 0 < true_length <= tokens.shape[0]:
            raise ValueError(f"true_length must be in 1..{tokens.shape[0]} (the padded length), got {true_length}")
        if existing_prefix is None:
            start, cache = 0, self._empty_prefix_jit()
        elif isinstance(existing_prefix, Prefix):
            if existing_prefix.token.ndim:
                raise ValueError("existing_prefix holds several samples (prefill_multisampling): it cannot be extended")
            start, cache = int(existing_prefix.length), existing_prefix.cache
        else:
            raise TypeError(f"existing_prefix must be a Prefix from prefill, got {type(existing_prefix).__name__}")
        if start + true_length > self.max_target_length:
            raise ValueError(
                f"prompt of {start + true_length} tokens exceeds max_target_length ({self.max_target_length})"
            )
        key = jax.random.key(0) if rng is None else rng
        return cache, jnp.asarray(tokens), jnp.int32(start), jnp.int32(true_length), key

    def prefill_multisampling(
        self,
        *,
        params: Params,
        padded_tokens: jax.Array | np.ndarray,
        true_length: int,
        num_samples: int,
        sampling: Sampling | None = None,
        rng: jax.Array | None = None,
        existing_prefix: Prefix | None = None,
        adapter: str | None = None,
    ) -> tuple[Prefix, ResultTokens]:
        """``prefill``, drawing ``num_samples`` first tokens independently from the same logits.

        The prefix's ``token`` is [num_samples] and the result's ``data`` [num_samples, 3];
        ``bulk_insert(prefix, state, slots)`` with ``len(slots) == num_samples`` gives slot
        ``slots[i]`` the i-th sample (see ``engine/multisampling.py``).
        """
        num_samples = check_int("num_samples", num_samples, positive=True)
        if num_samples > self.max_concurrent_decodes:
            raise ValueError(
                f"num_samples ({num_samples}) exceeds the engine's {self.max_concurrent_decodes} decode slots"
            )
        inputs = self._prefill_inputs(existing_prefix, padded_tokens, true_length, rng)
        index = adapting.chunk_index(self.adapters, existing_prefix, adapter)
        return self._prefill_multisampling_jit(
            params, self.rest, *inputs, sampling=sampling or GREEDY, num_samples=num_samples, adapter=index
        )

    def prefill_concat(
        self,
        *,
        params: Params,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling | None = None,
        rng: jax.Array | None = None,
    ) -> list[tuple[Prefix, ResultTokens]]:
        """Several short prompts packed into one padded row and prefilled in one call; each comes
        back as its own (prefix, first result), equal to a separate prefill of it and inserted like
        one. The prompts must fit ``max_prefill_length`` tokens together (``engine/packing.py``)."""
        packed = packing.pack(
            prompts,
            pad_id=self.config.pad_id,
            vocab_size=self.config.vocab_size,
            max_prefill_length=self.max_prefill_length,
            cache_length=self.max_target_length,
        )
        n = len(packed.lengths)
        if n not in self._prefill_concat_jits:
            self._prefill_concat_jits[n] = jax.jit(
                self._prefill_concat_body,
                static_argnames=("sampling",),
                out_shardings=[(self.prefix_shardings, self.result_shardings)] * n,
            )
        key = jax.random.key(0) if rng is None else rng
        arrays = (packed.tokens, packed.positions, packed.segments, packed.last, packed.lengths)
        return self._prefill_concat_jits[n](
            params,
            self.rest,
            *map(jnp.asarray, arrays),
            key,
            sampling=sampling or GREEDY,
            adapter=self.adapter_index(None),
        )

    # ---- insert ----------------------------------------------------------------------------------
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Put ``prefix`` into decode slot ``slot`` (the decode state is donated)."""
        return self.bulk_insert(prefix, decode_state, [slot])

    def bulk_insert(self, prefix: Prefix, decode_state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Put one prefix into several slots at once (e.g. several samples of one prompt: a prefix
        of ``prefill_multisampling`` gives slot ``slots[i]`` its i-th first token)."""
        if not isinstance(prefix, Prefix):
            raise TypeError(f"prefix must be a Prefix from prefill, got {type(prefix).__name__}")
        check_decode_state(decode_state)
        slots = [check_slot(s, self.max_concurrent_decodes) for s in slots]
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be a non-empty list of distinct slots, got {slots}")
        if prefix.token.ndim and len(slots) != prefix.token.shape[0]:
            raise ValueError(f"the prefix holds {prefix.token.shape[0]} samples: give as many slots, got {len(slots)}")
        return self._insert_jit(prefix, decode_state, jnp.asarray(slots, jnp.int32))

    # ---- generate --------------------------------------------------------------------------------
    def generate(
        self,
        params: Params,
        decode_state: DecodeState,
        *,
        sampling: Sampling | None = None,
        probes: probing.Capture | None = None,
        interventions: Sequence[Any] | None = None,
    ) -> tuple[DecodeState, ResultTokens]:
        """One token for every slot, each at its own position (the decode state is donated).

        A slot is valid when it holds a request and its cache has room; a full slot
        (position == max_target_length) stops with valid=0 rather than wrapping around.
        ``probes`` / ``interventions``: see :mod:`workbench.probes`; an intervention's ``slots``
        picks the slots it applies to.
        """
        check_decode_state(decode_state)
        plan, data = probing.prepare(probes, interventions, self.config, self.max_concurrent_decodes)
        if plan is None:
            return self._generate_jit(params, self.rest, decode_state, sampling=sampling or GREEDY)
        self._check_probes_layout()
        state, result, raw = self._generate_probes_jit(
            params, self.rest, decode_state, data, sampling=sampling or GREEDY, plan=plan
        )
        return state, probing.attach(result, raw, plan)
