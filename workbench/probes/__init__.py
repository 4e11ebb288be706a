"""Research instruments inside the engine's own steps: capture activations, intervene on them.

    capture = probes.Capture(attention=True, residual=True, mlp=True, logits=True)
    prefix, first = engine.prefill(..., probes=capture)       # first.captured: a Captured
    state, result = engine.generate(params, state, probes=capture,
                                    interventions=[probes.Ablate(1, [3]), probes.Steer(2, v, 4.0)])

**Capture** is ``Module.sow`` of ``nnx.Intermediate`` values at the hook sites
(:mod:`workbench.model.hooks`), collected by ``nnx.capture`` around the merged model's call inside
the jitted step and returned from it as a plain dict (so nothing outlives split / merge). Per
layer: the attention weights ``[rows, N, T, S]`` (rows: 1 for prefill, the slots for generate;
T the step's queries; S the keys it read), the attention block's output ``attn_out`` and the MLP
output ``mlp`` (``[rows, T, D]``, what each adds to the residual stream), the residual stream after
the block ``residual``; and the final logits ``[rows, T, V]``.

With ``Capture(router=True)`` a mixture of experts' routing is recorded at each sparse layer: each
token's expert ids and weights ``[rows, T, K]`` (``Captured.router(layer)``, read by
``inspect.experts``); ``Ablate(layer, experts=[...])`` removes experts from that layer's choice
(their router logits at -inf: each token's k experts are picked among the rest).

With ``Capture(heads=True)`` each query head's output before ``o`` is recorded too
(``inspect.logit_attribution`` splits attention per head with it); with ``Capture(sae={layer: sae})``
the host reads each such layer's captured residual through a sparse autoencoder
(:mod:`workbench.sae`): ``Captured.features(layer)``. ``SteerFeature`` adds or clamps one SAE feature.

**Sweeps**: :func:`patching_sweep` patches every (layer, position) or (layer, head) from a corrupt
prompt into a clean one, each patch one row of a batched run, and tables a metric of the logits;
:func:`attribution_patching` estimates the same table from one backward pass (``jax.vjp``).

**Interventions** are data. :func:`prepare` turns a list of them into dense arrays over layers
(``[L, rows, N]`` head gains, ``[L, rows, D]`` steering vectors, ``[L, P, ...]`` patches) passed
into the jitted step; only the *kinds* present (and a patch's count of positions, rounded up to
a power of two) are static.
So changing a layer, a head, a value or a slot does not recompile. ``slots`` on an intervention
is the slot mask: which decode rows it applies to (None: all; prefill has one row, 0).

Scanned layers (``scan_layers=True``): one block runs every layer, so its hooks see a traced layer
index; interventions pick their layer's row of the arrays above by it, and the capture comes out
of the scan stacked ``[L, ...]`` (every layer; the host keeps those ``Capture.layers`` asks for).

Zero cost when off: with no probes and no interventions the engine calls its steps exactly as
before (the hooks are ``None`` and every hook site is a Python ``if``), so the compiled programs
are today's. Each probe setting compiles once, counted as ``"prefill+probes"`` / ``"generate+probes"``.
"""

from workbench.probes.attribution import attribution_patching
from workbench.probes.interventions import (
    ABLATE_MODES,
    INTERVENTIONS,
    SITES,
    STEER_MODES,
    Ablate,
    Capture,
    Patch,
    Steer,
    SteerFeature,
    check_layer,
)
from workbench.probes.plan import Plan, attach, prepare, run
from workbench.probes.recorded import NO_CAPTURE, SOWN, Captured, captured, captured_from
from workbench.probes.sweep import OVER, Sweep, patching_sweep
from workbench.probes.uncached import forward, unembed

__all__ = [
    "ABLATE_MODES",
    "INTERVENTIONS",
    "NO_CAPTURE",
    "OVER",
    "SITES",
    "SOWN",
    "STEER_MODES",
    "Ablate",
    "Capture",
    "Captured",
    "Patch",
    "Plan",
    "Steer",
    "SteerFeature",
    "Sweep",
    "attach",
    "attribution_patching",
    "captured",
    "captured_from",
    "check_layer",
    "forward",
    "patching_sweep",
    "prepare",
    "run",
    "unembed",
]
