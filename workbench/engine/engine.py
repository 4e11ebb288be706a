"""The inference engine: JetStream-shaped (docs/engine-api.md lists every difference), over an
NNX model split once.

The engine builds two abstract models (``nnx.eval_shape``, nothing materialised): a prefill
model (batch 1) and a decode model (``max_concurrent_decodes`` slots), both with KV caches over
``max_target_length`` positions (a sliding layer's: a ring of its window, ``model/ring.py``),
and splits each once into ``(graphdef, params, cache, rest)``.
Parameters are shared between the two. The jitted steps are built in ``engine/compiled.py``
over the pure bodies of ``engine/steps.py``; this class checks input, holds the shapes and
shardings, and calls them.

Platform tuning (``engine/tuning.py``): ``kernels="auto"`` runs XLA:CPU's attention layouts on
the CPU and the plain reference anywhere else. The decode step's products library is picked
by :meth:`Engine.tune` (at the first ``generate`` if not before): building an engine measures
nothing and writes nothing.

Compiles: prefill once per padded length, generate once per sampling setting, insert once per
number of slots filled at a time. ``compile_counts`` counts the traces of each.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from workbench import memory, probes, trees
from workbench import sharding as shd
from workbench.checks import check_int
from workbench.engine import adapters, compiled, inputs, packing, tuning
from workbench.engine.compiled import PARAMS
from workbench.engine.sampling import GREEDY, Sampling
from workbench.engine.types import DecodeState, Prefix, ResultTokens
from workbench.model import ModelConfig
from workbench.model.init import random_params
from workbench.model.lora import AdapterStack
from workbench.model.scan import is_stacked, stack_layers, unstack_layers

Params = nnx.State
Rules = Sequence[tuple[str, str | None]]


class Engine:
    """JetStream-shaped engine: prefill -> insert / bulk_insert -> generate, on a device mesh.

    ``tokenizer``: the checkpoint's (``workbench.load`` passes it); ``get_tokenizer`` returns it.
    ``scan_layers``: params and KV caches stacked on a leading ``layers`` axis, the blocks run by
    one scan (``model.scan``): compile time flat in depth, the same numbers.
    ``adapters``: LoRA adapters served per slot (``workbench.load(..., adapters=...)`` reads them);
    ``engine.adapters`` lists their names.
    ``kernels``: ``"auto"`` (by platform), ``"reference"`` (the plain path) or ``"xla_cpu"``, or a
    ``tuning.Tuning``; ``engine.tuning`` is what was chosen (``engine/tuning.py``).
    ``ring_cache``: a sliding layer keeps a ring of its window (``model/ring.py``), not
    ``max_target_length`` positions; False gives every layer a full-length cache (to compare).
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
        kernels: str | tuning.Tuning = "auto",
        ring_cache: bool = True,
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
        expert = mesh.shape.get("expert", 1)
        if expert > 1 and config.num_experts % expert:
            raise ValueError(
                f"the mesh's expert axis ({expert}) does not divide the model's {config.num_experts} experts"
            )
        self.config, self.mesh, self.rules, self.tokenizer = config, mesh, tuple(rules), tokenizer
        self.scan_layers = bool(scan_layers)
        self.ring_cache = bool(ring_cache)
        self._max_concurrent_decodes = slots
        self.adapters: tuple[str, ...] = adapters.names if adapters is not None else ()
        self.lora_spec = adapters.spec if adapters is not None else None
        self.tuning = tuning.choose(kernels, tuning.platform(mesh))
        # what the three models share: the layer layout, the adapters, the attention kernels
        self.model_options = dict(
            scan_layers=self.scan_layers, lora_spec=self.lora_spec, attention_kernels=self.tuning.attention_kernels
        )
        self.compile_counts: collections.Counter[str] = collections.Counter()
        self.decode_library: str | None = None  # set by tune()
        self._generate: Callable | None = None  # built by tune()
        self._split_models()
        self.param_shardings, self.rest_shardings, self.prefix_shardings, self.decode_state_shardings = (
            compiled.shardings(self)
        )
        self.result_shardings = ResultTokens(data=shd.replicated(mesh), logits=shd.replicated(mesh))
        memory.check_fits(  # before anything is allocated: a clear error, not an out-of-memory kill
            {"KV cache": memory.kv_cache_bytes(self)},
            f"a KV cache of {slots} slots x {max_target_length} positions x {config.num_layers} layers",
            "lower max_target_length (--max-target-length) or decode_batch_size (--decode-batch)",
        )
        self.steps = compiled.build(self)
        self.rest = compiled.initial_rest(self, adapters)

    def _split_models(self) -> None:
        """Three abstract models, split once: prefill (batch 1), decode (one row per slot), and
        the uncached forward model. Params and rest are the same in all three."""
        config, length, options, ringed = self.config, self.max_target_length, self.model_options, self.ring_cache
        prefill = nnx.eval_shape(lambda: compiled.model(config, (1, length, ringed), **options))
        slots = self.max_concurrent_decodes
        decode = nnx.eval_shape(lambda: compiled.model(config, (slots, length, ringed), **options))
        self.prefill_graphdef, self.abstract_params, self.abstract_prefill_cache, self.abstract_rest = nnx.split(
            prefill, PARAMS, nnx.Cache, ...
        )
        self.decode_graphdef, _, self.abstract_decode_cache, _ = nnx.split(decode, PARAMS, nnx.Cache, ...)
        self.forward_graphdef = nnx.split(nnx.eval_shape(lambda: compiled.model(config, **options)), PARAMS, ...)[0]

    def tune(self) -> str | None:
        """Pick the decode step's products library and build generate with it; returns the
        library (``"ynnpack"`` or ``"eigen"``; None: XLA's default, off the CPU or with
        ``kernels="reference"``). On the CPU this reads the cache of earlier picks or runs the
        decode-library probe once (``engine/autotune.py``; one stderr line).
        The first ``generate`` calls it if nobody did before; later calls return the same."""
        if self._generate is None:
            self.decode_library = self.tuning.decode_library(self.config, self.max_concurrent_decodes)
            self._generate = compiled.generate(self, tuning.compiler_options(self.decode_library))
        return self.decode_library

    def warm(self, prompt_lengths: Sequence[int] = (), *, sampling: Sampling | None = None) -> None:
        """Compile what serving prompts of ``prompt_lengths`` tokens runs, from the params' shapes
        alone, running nothing: the decode state's init, each prompt's prefill chunks, insert,
        free, and generate with ``sampling`` -- or read them from the persistent compile cache.
        Needing no weights, it can overlap their load (``workbench.load(..., warm=...)`` runs it
        in a thread while they are read); the calls that follow find their programs compiled.

        Generate is warmed once the decode library is known without measuring (a pick cached by
        an earlier process, a forced or fixed one, or a library nothing picks): the probe times
        products, which a load beside it would disturb; else the first ``generate`` picks it."""
        lengths = sorted({check_int("prompt length", n, positive=True) for n in prompt_lengths})
        if lengths and lengths[-1] > self.max_target_length:
            raise ValueError(f"prompt of {lengths[-1]} tokens exceeds max_target_length ({self.max_target_length})")
        params = trees.fill(self.abstract_params, trees.placed_shapes(self.abstract_params, self.param_shardings))
        sampling, key, chunk = sampling or GREEDY, jax.random.key(0), self.max_prefill_length
        state = compiled.warm(self.steps.init_decode_state, key)
        empty, adapter, prefix = compiled.warm(self.steps.empty_prefix), self.adapter_index(None), None
        for length in lengths:  # as prefix_cache.prefill_prompt walks a prompt: full chunks, then the rest
            cache = empty
            for start in range(0, length, chunk):
                size = min(chunk, length - start)
                tokens, begin, size = jnp.zeros(self.bucket(size), jnp.int32), jnp.int32(start), jnp.int32(size)
                args = (params, self.rest, cache, tokens, begin, size, key, None)
                prefix, _, _ = compiled.warm(self.steps.prefill, *args, sampling=sampling, plan=None, adapter=adapter)
                cache = prefix.cache
        if prefix is not None:
            state = compiled.warm(self.steps.insert, prefix, state, jnp.zeros(1, jnp.int32))
        compiled.warm(self.steps.free, state, jnp.int32(0))
        slots = self.max_concurrent_decodes
        if self._generate is not None or self.tuning.decode_library(self.config, slots, probe=False) != "":
            self.tune()
            compiled.warm(self._generate, params, self.rest, state, None, sampling=sampling, plan=None)

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
        if params is None:  # drawn on the host (model/init.py): a compiled init grows with the model
            return random_params(self.abstract_params, self.param_shardings, check_int("seed", seed))
        pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        if not isinstance(pure, dict):
            raise TypeError(f"params must be an nnx.State or a pure dict, got {type(params).__name__}")
        if self.scan_layers != is_stacked(pure):  # either layer layout: stacked here on the host
            pure = stack_layers(pure, self.config.layer_period) if self.scan_layers else unstack_layers(pure)
        trees.check_matches("params", self.abstract_params, pure)
        # device_put moves arrays from any devices (or the host) onto this engine's mesh; the cast
        # to the model's parameter dtype then runs there, shard by shard.
        placed = jax.device_put(trees.fill(self.abstract_params, pure), self.param_shardings)
        return self.steps.cast_params(placed)

    def forward(self, params: Params, tokens: jax.Array | np.ndarray, *, adapter: str | None = None) -> jax.Array:
        """Float32 logits [B, T, V] of a full forward pass over ``tokens`` [B, T] with no cache:
        the oracle every cached path (prefill, chunks, insert, generate) must reproduce.
        ``adapter``: a loaded LoRA adapter applied to every row (None: the base model)."""
        tokens = inputs.check_token_rows(tokens, self.config.vocab_size)
        rows = adapters.rows(self.adapters, adapter, tokens.shape[0])
        return self.steps.forward(params, self.rest, jnp.asarray(tokens), rows)

    def adapter_index(self, adapter: str | None) -> jax.Array | None:
        """The int32 index of a loaded adapter (-1 for None: the base model); None on an engine
        without adapters. ValueError naming the loaded ones for an unknown name."""
        return adapters.index(self.adapters, adapter)

    # ---- decode state ----------------------------------------------------------------------------
    def init_decode_state(self, rng: jax.Array | int | None = None) -> DecodeState:
        """All slots empty; ``rng`` (a key or seed) drives sampling in generate."""
        key = jax.random.key(0 if rng is None else rng) if not isinstance(rng, jax.Array) else rng
        return self.steps.init_decode_state(key)

    def free_resource(self, slot: int, decode_state: DecodeState | None = None) -> DecodeState | None:
        """Release ``slot``. With a decode state, returns it with the slot emptied (valid=0 until
        the next insert); without one (JetStream's signature) it only checks the slot."""
        slot = inputs.check_slot(slot, self.max_concurrent_decodes)
        if decode_state is None:
            return None
        return self.steps.free(decode_state, jnp.int32(slot))

    # ---- prefill ---------------------------------------------------------------------------------
    def bucket(self, length: int) -> int:
        """The padded length for a prompt (chunk) of ``length`` tokens (``inputs.bucket``)."""
        return inputs.bucket(length, self.max_prefill_length)

    def pad(self, tokens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, int]:
        """(padded int32 tokens of bucket length, true length), padded with the pad id."""
        return inputs.pad(tokens, self.config.pad_id, self.max_prefill_length)

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
        probes: probes.Capture | None = None,
        interventions: Sequence[Any] | None = None,
    ) -> tuple[Prefix, ResultTokens]:
        """Run the prompt (or, with ``existing_prefix``, its next chunk) through the prefill model.

        ``padded_tokens`` [P] holds ``true_length`` real tokens then padding. The result's cache
        holds the earlier prefix plus these tokens; its first token is sampled from the logits
        at the last real position. Chunked prefill equals one prefill of the whole prompt.
        ``adapter``: a loaded LoRA adapter's name (None: the base model); insert records it.
        ``probes`` / ``interventions``: see :mod:`workbench.probes` (the result's ``captured``).
        """
        arrays = self._prefill_inputs(existing_prefix, padded_tokens, true_length, rng)
        index = adapters.chunk_index(self.adapters, existing_prefix, adapter)
        step = self.steps.prefill
        return self._probed(step, (params, self.rest, *arrays), probes, interventions, 1, sampling, adapter=index)

    def _prefill_inputs(self, existing_prefix, padded_tokens, true_length, rng) -> tuple:
        """(cache, tokens, start, true_length, key) for a prefill body, every input checked."""
        tokens = inputs.check_tokens(padded_tokens, self.config.vocab_size, self.max_prefill_length)
        true_length = check_int("true_length", true_length)
        if not 0 < true_length <= tokens.shape[0]:
            raise ValueError(f"true_length must be in 1..{tokens.shape[0]} (the padded length), got {true_length}")
        start = inputs.prefix_start(existing_prefix, true_length, self.max_target_length)
        cache = self.steps.empty_prefix() if existing_prefix is None else existing_prefix.cache
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
        num_samples = inputs.check_num_samples(num_samples, self.max_concurrent_decodes)
        arrays = self._prefill_inputs(existing_prefix, padded_tokens, true_length, rng)
        index = adapters.chunk_index(self.adapters, existing_prefix, adapter)
        return self.steps.prefill_multisampling(
            params, self.rest, *arrays, sampling=sampling or GREEDY, num_samples=num_samples, adapter=index
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
        shape = dict(max_prefill_length=self.max_prefill_length, cache_length=self.max_target_length)
        packed = packing.pack(prompts, pad_id=self.config.pad_id, vocab_size=self.config.vocab_size, **shape)
        arrays = map(jnp.asarray, (packed.tokens, packed.positions, packed.segments, packed.last, packed.lengths))
        key = jax.random.key(0) if rng is None else rng
        step = self.steps.prefill_concat(len(packed.lengths))
        return step(params, self.rest, *arrays, key, sampling=sampling or GREEDY, adapter=self.adapter_index(None))

    # ---- insert ----------------------------------------------------------------------------------
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Put ``prefix`` into decode slot ``slot`` (the decode state is donated)."""
        return self.bulk_insert(prefix, decode_state, [slot])

    def bulk_insert(self, prefix: Prefix, decode_state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Put one prefix into several slots at once (e.g. several samples of one prompt: a prefix
        of ``prefill_multisampling`` gives slot ``slots[i]`` its i-th first token)."""
        slots = inputs.check_insert(prefix, decode_state, slots, self.max_concurrent_decodes)
        return self.steps.insert(prefix, decode_state, jnp.asarray(slots, jnp.int32))

    # ---- generate --------------------------------------------------------------------------------
    def generate(
        self,
        params: Params,
        decode_state: DecodeState,
        *,
        sampling: Sampling | None = None,
        probes: probes.Capture | None = None,
        interventions: Sequence[Any] | None = None,
    ) -> tuple[DecodeState, ResultTokens]:
        """One token for every slot, each at its own position (the decode state is donated).

        A slot is valid when it holds a request and its cache has room; a full slot
        (position == max_target_length) stops with valid=0 rather than wrapping around.
        ``probes`` / ``interventions``: see :mod:`workbench.probes`; an intervention's ``slots``
        picks the slots it applies to.
        """
        inputs.check_decode_state(decode_state)
        self.tune()
        args = (params, self.rest, decode_state)
        return self._probed(self._generate, args, probes, interventions, self.max_concurrent_decodes, sampling)

    def _probed(self, step: Callable, args: tuple, capture, interventions, rows: int, sampling, **extra) -> tuple:
        """``step(*args, probe_data, ...)`` with its probe plan (``workbench.probes``; None when
        there is nothing to capture or change): its two outputs, the capture attached to the result."""
        plan, data = probes.prepare(capture, interventions, self.config, rows)
        out, result, raw = step(*args, data, sampling=sampling or GREEDY, plan=plan, **extra)
        return out, result if plan is None else probes.attach(result, raw, plan)
