"""``workbench.load``: one call from a checkpoint (or none) to an engine and its params.

A checkpoint is a directory: a workbench checkpoint (``workbench.json`` + orbax ``params/``) or
a Hugging Face one (``config.json`` + ``*.safetensors``). Either way the weights go straight
into the engine's shardings, and the engine is built with the checkpoint's tokenizer.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from workbench import memory, trees
from workbench.engine import Engine, Params, tuning
from workbench.model import ModelConfig, quant
from workbench.model.init import random_params
from workbench.sharding import make_mesh

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"  # the one definition


def load(
    checkpoint: str | os.PathLike | None = None,
    *,
    mesh: Mapping[str, int] | Mesh | None = None,
    decode_batch_size: int = 8,
    max_prefill_length: int = 256,
    max_target_length: int = 1024,
    dtype: str | None = None,
    config: ModelConfig | None = None,
    seed: int = 0,
    progress: bool | None = None,
    quantize: str | None = None,
    kv_cache_dtype: str | None = None,
    scan_layers: bool = False,
    adapters: Mapping[str, str | os.PathLike] | None = None,
    kernels: str | tuning.Tuning = "auto",
    warm: Iterable[int] | Callable[[Engine], Any] | None = None,
) -> tuple[Engine, Params]:
    """An engine and its params on ``mesh``; the tokenizer is ``engine.get_tokenizer()``.

    Args:
      checkpoint: a workbench or Hugging Face checkpoint directory; None for the default model
        (the committed one in ``workbench/assets/default_model`` when present, else seeded
        random weights of ``ModelConfig.tiny()``).
      mesh: axis sizes such as ``{"data": 2, "tensor": 4}``, a ``jax.sharding.Mesh``, or None
        (every device on ``data``).
      decode_batch_size / max_prefill_length / max_target_length: the engine's shape.
      dtype: "float32" or "bfloat16" for both weights and compute; None keeps the model's. On the
        CPU, bfloat16 (asked for here or saved in the checkpoint) means bfloat16 weights with
        float32 compute (activations, norms, KV cache), each product of bf16 weights taking a
        float32 result: XLA:CPU runs that mix faster than the float32 step, where bfloat16
        elementwise ops and cache writes make an all-bf16 step many times slower (``docs/speed.md``).
        An ``Engine`` built directly from a ``ModelConfig`` computes in whatever dtype it names.
      config: with ``checkpoint=None``, a model config to build with seeded random weights.
      seed: the seed of random weights.
      progress: a progress bar on stderr while reading a Hugging Face checkpoint (None: only
        for large ones).
      quantize: None (the checkpoint's weights as saved), "w8", "w8a8" or "w4" (``model.quant``):
        float weights are quantized leaf by leaf as they load; a quantized checkpoint loads as it
        was saved, and asking it for another mode is an error.
      kv_cache_dtype: None (the compute dtype) or "int8".
      scan_layers: the blocks' params and KV caches stacked on a leading ``layers`` axis and run
        by one scan (compile time flat in depth); a checkpoint of either layout loads.
      adapters: ``{"name": "path/to/peft_adapter_dir"}``: LoRA adapters served per slot
        (``engine.prefill(..., adapter="name")``); ``engine.adapters`` lists the names.
      kernels: the platform tuning (``engine/tuning.py``): "auto" (by platform), "reference" (the
        plain path) or "xla_cpu".
      warm: prompt lengths: ``engine.warm(warm)`` compiles what serving such prompts runs -- or
        reads it from the compile cache -- in a thread while the weights are read, so the first
        request finds its programs ready; or a function called with the engine there instead
        (say ``lambda e: e.warm(lengths_through(e.tokenizer), sampling=...)``). On a mesh over
        several processes it runs after the load, alike on every process. The load returns when
        both are done.
    """
    quant.check_mode(quantize)
    quant.check_kv_cache_dtype(kv_cache_dtype)
    modes = dict(quantize=quantize, kv_cache_dtype=kv_cache_dtype)
    mesh = make_mesh(mesh)
    platform = tuning.platform(mesh)
    shape = dict(
        decode_batch_size=decode_batch_size, max_prefill_length=max_prefill_length, max_target_length=max_target_length
    )
    if scan_layers:
        shape["scan_layers"] = True
    if kernels != "auto":
        shape["kernels"] = kernels
    with _Warming(warm) as warming:
        if checkpoint is None and config is None and (DEFAULT_MODEL_DIR / "workbench.json").is_file():
            checkpoint = DEFAULT_MODEL_DIR
        if checkpoint is None:
            from workbench.checkpoints.tokenizer import default_tokenizer

            config = _with_dtype(config or ModelConfig.tiny(), dtype, platform).replace(**modes)
            engine = Engine(config, mesh, tokenizer=default_tokenizer(config), **shape, **_adapters(adapters, config))
            _check_memory(engine, "the model")
            warming.start(engine)
            if config.quantize is None:
                return engine, engine.load_params(None, seed=seed)
            # random float weights drawn on the host, then quantized leaf by leaf like a float checkpoint's
            drawn = nnx.to_pure_dict(random_params(*_float_target(engine), seed))
            return engine, _as_params(engine, _quantized(engine, drawn))
        if config is not None:
            raise ValueError("config= builds a model with random weights; it cannot be combined with a checkpoint")
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"checkpoint {os.fspath(path)!r} is not a directory")

        from workbench import checkpoints as ckpt
        from workbench.checkpoints import layout

        # Both loaders take (path, abstract params, shardings) and place every array straight into
        # its shard, in the engine's dtype (orbax casts on the way in; the HF reader per region).
        if ckpt.is_workbench_checkpoint(path):
            manifest = ckpt.read_manifest(path)
            try:
                saved = ModelConfig.from_dict(manifest["model"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"corrupt workbench checkpoint {os.fspath(path)!r}: bad model config ({error})"
                ) from None
            if saved.quantize is not None and quantize not in (None, saved.quantize):
                raise ValueError(
                    f"checkpoint {os.fspath(path)!r} is quantized {saved.quantize}: load it with quantize=None or "
                    f"{saved.quantize!r}, not {quantize!r}"
                )
            config = _with_dtype(saved, dtype, platform)
            config = config.replace(quantize=quantize or saved.quantize, kv_cache_dtype=kv_cache_dtype)
            tokenizer = ckpt.tokenizer_from_manifest(manifest.get("tokenizer"), path, config)
            engine = Engine(config, mesh, tokenizer=tokenizer, **shape, **_adapters(adapters, config))
            stacked, layers = layout.saved_layers(path) or (engine.scan_layers, config.num_layers)
            if layers != config.num_layers:
                raise ValueError(
                    f"corrupt workbench checkpoint {os.fspath(path)!r}: cannot restore params "
                    f"({layers} layers saved, the config says {config.num_layers})"
                )
            # float weights are quantized as they load if asked; quantized ones restore as they are
            target = (
                _float_target(engine) if saved.quantize is None else (engine.abstract_params, engine.param_shardings)
            )
            _check_memory(engine, f"checkpoint {os.fspath(path)!r}", target)
            warming.start(engine)
            pure = ckpt.restore_params(path, *layout.targets(*target, stacked=stacked, period=config.layer_period))
            if stacked != engine.scan_layers:
                pure = layout.relayout(pure, target[1], stacked=engine.scan_layers)
            if saved.quantize is None:
                pure = _quantized(engine, pure)
        elif ckpt.is_hf_checkpoint(path):
            config = _with_dtype(ckpt.read_hf_config(path), dtype, platform).replace(**modes)
            tokenizer = ckpt.tokenizer_for_hf_dir(path, config)
            engine = Engine(config, mesh, tokenizer=tokenizer, **shape, **_adapters(adapters, config))
            target = _float_target(engine)
            _check_memory(engine, f"checkpoint {os.fspath(path)!r}", target)
            warming.start(engine)
            # each float leaf is quantized as soon as it is placed: never a float copy of the model
            pure = ckpt.load_hf_params(
                path,
                *layout.targets(*target, stacked=False),
                config=config,
                progress=progress,
                transform=_quantize_each_leaf(engine),
            )
            if engine.scan_layers:  # read (and quantized) layer by layer, then stacked
                pure = layout.relayout(pure, engine.param_shardings, stacked=True)
        else:
            raise ValueError(
                f"{os.fspath(path)!r} is neither a workbench checkpoint (workbench.json) "
                "nor a Hugging Face checkpoint (config.json)"
            )
        return engine, _as_params(engine, pure)


class _Warming:
    """``engine.warm`` beside a load (``load``'s ``warm``): :meth:`start` starts it in a
    thread once the engine is built and its memory checked; leaving the ``with`` waits for it and
    raises its error. A load that fails leaves it to finish (or fail) unwatched: the load's error
    comes first."""

    def __init__(self, warm: Iterable[int] | Callable[[Engine], Any] | None):
        self.warm, self.engine, self.thread, self.error = warm, None, None, None

    def __enter__(self) -> _Warming:
        return self

    def start(self, engine: Engine) -> None:
        if self.warm is not None:
            self.engine = engine
            if jax.process_count() == 1:  # several processes: after the load, in the same order
                self.thread = threading.Thread(target=self._warm, name="workbench-warm", daemon=True)
                self.thread.start()

    def _warm(self) -> None:
        try:
            self.warm(self.engine) if callable(self.warm) else self.engine.warm(list(self.warm))
        except BaseException as error:  # raised in the loading thread, at the end of the load
            self.error = error

    def __exit__(self, kind, error, trace) -> None:
        if self.engine is None or kind is not None:
            return
        if self.thread is not None:
            self.thread.join()
        else:
            self._warm()
        if self.error is not None:
            raise self.error


def _check_memory(engine: Engine, what: str, target: tuple[Params, Params] | None = None) -> None:
    """ValueError before any weight is read when the engine's weights, its KV cache and the one
    float tensor a load holds in flight (the largest of ``target``) exceed this host's free memory."""
    needed = {
        "weights": memory.host_bytes(engine.abstract_params, engine.param_shardings),
        "KV cache": memory.kv_cache_bytes(engine),
    }
    if target is not None:  # a loader holds one tensor of the float target beside what it has placed
        needed["the tensor in flight"] = max(memory.bytes_by_leaf(*target).values())
    memory.check_fits(needed, what, "serve it smaller (--dtype bfloat16, --quantize w8a8) or on more hosts")


def _adapters(adapters: Mapping[str, str | os.PathLike] | None, config: ModelConfig) -> dict:
    """The engine's ``adapters`` argument: none, or the PEFT adapters read and stacked."""
    if not adapters:
        return {}
    from workbench.checkpoints.adapters import load_adapters

    return {"adapters": load_adapters(adapters, config)}


def _with_dtype(config: ModelConfig, dtype: str | None, platform: str) -> ModelConfig:
    """``config`` in ``dtype`` (None: its own), as it runs on ``platform`` (``tuning.for_platform``)."""
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    return tuning.for_platform(config, platform)


def _float_target(engine: Engine) -> tuple[Params, Params]:
    """(abstract params, shardings) of the engine's model with float weights: what a float
    checkpoint restores into before :func:`_quantized`. The engine's own when it is not quantized;
    else read off its quantized leaves (a weight's ``values`` have the float weight's shape and
    sharding) rather than built again: tracing a 1B model's shapes takes seconds."""
    if engine.config.quantize is None:
        return engine.abstract_params, engine.param_shardings
    abstract = trees.leaf_paths(engine.abstract_params)
    placed = trees.leaf_paths(nnx.to_pure_dict(engine.param_shardings))
    dtype = engine.config.weight_dtype
    params, shardings = {}, {}
    for path, leaf in abstract.items():
        owner = path.removesuffix("/values")
        if owner != path and f"{owner}/scale" in abstract:
            params[owner], shardings[owner] = jax.ShapeDtypeStruct(leaf.shape, dtype), placed[path]
        elif not (path.endswith("/scale") and f"{path.removesuffix('/scale')}/values" in abstract):
            params[path], shardings[path] = leaf, placed[path]
    return nnx.State(trees.nest(params)), nnx.State(trees.nest(shardings))


def _quantize_each_leaf(engine: Engine):
    """The per-leaf transform of a float checkpoint's reader: ``(path, float array) -> {path:
    array, ...}`` in the engine's shardings, quantized when the engine is; None when it is not."""
    if engine.config.quantize is None:
        return None
    shardings = trees.leaf_paths(nnx.to_pure_dict(engine.param_shardings))
    return functools.partial(quant.quantize_leaf, quantize=engine.config.quantize, shardings=shardings)


def _quantized(engine: Engine, pure: dict) -> dict:
    """Float params quantized into the engine's shardings (leaf by leaf) when the engine is quantized."""
    if engine.config.quantize is None:
        return pure
    return quant.quantize_params(pure, engine.config.quantize, nnx.to_pure_dict(engine.param_shardings))


def _as_params(engine: Engine, pure: dict) -> Params:
    """Arrays already placed in the engine's shardings and dtype, wrapped as its params State.

    Not ``engine.load_params``: its cast would hold a second copy of every weight on device.
    """
    trees.check_matches("checkpoint params", engine.abstract_params, pure)
    return trees.fill(engine.abstract_params, pure)
