"""Inspectors: reports and plots over the engine's plain data (never imported by the engine).

    from workbench import inspect
    inspect.state(engine, params, decode_state)   # the split state, leaf by leaf
    inspect.kv_cache(decode_state).plot(slot=0)    # the per-layer KV cache
    before = inspect.snapshot(state)               # insert/generate donate the state
    inspect.kv_cache_diff(before, engine.insert(prefix, state, 2))
    inspect.sharding(params).plot()                # bytes per device
    inspect.attention(result.captured, tokens=text)  # heads, from probes.Capture() (workbench.probes)
    inspect.logit_lens(result.captured, engine, params)
    inspect.logit_attribution(result, engine, params, (token, other))  # Capture(heads=True)
    inspect.prefix_cache(cache).plot()             # a PrefixCache's tree: blocks, bytes, hits
    inspect.experts(result.captured).plot()        # a mixture's routing, Capture(router=True)

Every report prints as aligned, deterministic text, renders as an HTML table in notebooks, and
returns its rows with ``.to_rows()``.
"""

from workbench.inspect.attention import AttentionReport, attention
from workbench.inspect.experts import ExpertsReport, experts
from workbench.inspect.kv_diff import KVCacheDiff, kv_cache_diff, snapshot
from workbench.inspect.kv_report import KVCacheReport, kv_cache
from workbench.inspect.logit_attribution import LogitAttributionReport, logit_attribution
from workbench.inspect.logit_lens import LogitLensReport, logit_lens
from workbench.inspect.prefix_cache import PrefixCacheReport, prefix_cache
from workbench.inspect.report import Report
from workbench.inspect.sharding_report import ShardingReport, sharding
from workbench.inspect.state_report import StateReport, state

__all__ = [
    "ExpertsReport",
    "experts",
    "AttentionReport",
    "KVCacheDiff",
    "KVCacheReport",
    "LogitAttributionReport",
    "LogitLensReport",
    "PrefixCacheReport",
    "Report",
    "attention",
    "ShardingReport",
    "StateReport",
    "kv_cache",
    "kv_cache_diff",
    "logit_attribution",
    "logit_lens",
    "prefix_cache",
    "sharding",
    "snapshot",
    "state",
]
