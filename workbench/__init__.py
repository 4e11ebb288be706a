"""workbench: a research workbench for NNX-native LLM inference.

    engine, params = workbench.load(mesh={"data": 2, "tensor": 4})
    prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
    state = engine.insert(prefix, engine.init_decode_state(), slot=0)
    state, result = engine.generate(params, state)

or let the continuous-batching driver step it (prefill, insert, generate and free per request):

    completions = workbench.run_requests(engine, params, prompts, max_new_tokens=32)
    # or: scheduler = workbench.Scheduler(engine, params); scheduler.submit(...); scheduler.run()
    # prompts sharing a header prefill it once: Scheduler(..., prefix_cache=workbench.PrefixCache(engine, 64))

and score texts (perplexity, multiple choice): ``workbench.score(engine, params, texts)``.

The engine's contract with JetStream's API, difference by difference: ``docs/engine-api.md``.
"""

from workbench import sae  # the module: workbench.sae.load
from workbench.devices import simulate_cpu_devices
from workbench.engine import (
    GREEDY,
    Completion,
    DecodeState,
    Engine,
    Prefix,
    PrefixCache,
    ResultTokens,
    Sampling,
    Scheduler,
    SlotData,
    run_requests,
)
from workbench.load import load
from workbench.model import ModelConfig, Transformer, preset
from workbench.scoring import Score, score
from workbench.sharding import RULES, make_mesh

__all__ = [
    "GREEDY",
    "RULES",
    "Completion",
    "DecodeState",
    "Engine",
    "ModelConfig",
    "Prefix",
    "PrefixCache",
    "ResultTokens",
    "Sampling",
    "Scheduler",
    "Score",
    "SlotData",
    "Transformer",
    "load",
    "make_mesh",
    "notebook_setup",
    "preset",
    "run_requests",
    "sae",
    "score",
    "simulate_cpu_devices",
]


def __getattr__(name: str):
    # Notebook-side pieces load on first use, so importing the engine never imports them
    # (nor treescope, matplotlib or ipywidgets).
    import importlib

    if name == "notebook_setup":
        return importlib.import_module("workbench.notebook").notebook_setup
    if name in ("inspect", "widgets"):
        return importlib.import_module(f"workbench.{name}")
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
