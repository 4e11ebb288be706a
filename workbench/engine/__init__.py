"""The engine layer: Engine (JetStream-shaped, see docs/engine-api.md), its typed pytrees,
sampling, and the continuous-batching Scheduler that drives it."""

from workbench.engine.engine import Engine, Params
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
    "ResultTokens",
    "Sampling",
    "Scheduler",
    "SlotData",
    "layer_cache",
    "run_requests",
    "sample",
]
