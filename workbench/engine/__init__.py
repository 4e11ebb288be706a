"""The engine layer: Engine (JetStream's API), its typed pytrees, and sampling."""

from workbench.engine.engine import Engine, Params
from workbench.engine.sampling import GREEDY, Sampling, sample
from workbench.engine.types import DecodeState, Prefix, ResultTokens, SlotData

__all__ = ["GREEDY", "DecodeState", "Engine", "Params", "Prefix", "ResultTokens", "Sampling", "SlotData", "sample"]
