"""The engine layer: Engine (JetStream-shaped, see docs/engine-api.md), its typed pytrees,
sampling, the continuous-batching Scheduler that drives it, and the PrefixCache it can reuse."""

from workbench.engine.engine import Engine, Params
from workbench.engine.prefix_cache import PrefixCache
from workbench.engine.sampling import GREEDY, Sampling, sample
from workbench.engine.scheduler import Completion, Scheduler, run_requests
from workbench.engine.types import DecodeState, Prefix, ResultTokens, SlotData, layer_cache

__all__ = [
    "GREEDY",
    "Completion",
    "DecodeState",
    "Engine",
    "Params",
    "Prefix",
    "PrefixCache",
    "ResultTokens",
    "Sampling",
    "Scheduler",
    "SlotData",
    "layer_cache",
    "run_requests",
    "sample",
]
