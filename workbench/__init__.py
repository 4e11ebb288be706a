"""workbench: a research workbench for NNX-native LLM inference.

    engine, params = workbench.load(mesh={"data": 2, "tensor": 4})
    prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
    state = engine.insert(prefix, engine.init_decode_state(), slot=0)
    state, result = engine.generate(params, state)
"""

from workbench.engine import GREEDY, DecodeState, Engine, Prefix, ResultTokens, Sampling, SlotData
from workbench.load import load
from workbench.model import ModelConfig, Transformer, preset
from workbench.sharding import RULES, make_mesh

__all__ = [
    "GREEDY", "RULES", "DecodeState", "Engine", "ModelConfig", "Prefix", "ResultTokens", "Sampling", "SlotData",
    "Transformer", "load", "make_mesh", "preset",
]
