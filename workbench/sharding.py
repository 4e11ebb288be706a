"""Logical axis names, the one rules table, and mesh construction.

Every ``nnx.Param`` and ``nnx.Cache`` in the model names its dimensions with these logical axes;
``RULES`` maps them to mesh axes. Nothing else in the package names a mesh axis for a weight.

=================  ==========================================  ============
logical axis       meaning                                     mesh axis
=================  ==========================================  ============
``vocab``          token vocabulary (embedding rows, logits)   ``tensor``
``embed``          model width (d_model)                       ``fsdp``
``heads``          query heads                                 ``tensor``
``kv_heads``       key/value heads (GQA groups)                ``tensor``
``head_dim``       width of one head                           --
``mlp``            SwiGLU hidden width                         ``tensor``
``norm``           RMSNorm scale                               --
``cache_batch``    decode slots (batch 1 in a prefill cache)   ``data``
``cache_seq``      positions in the KV cache                   --
``cache_kv_heads`` key/value heads of the KV cache             ``tensor``
``cache_head_dim`` width of one cached head                    --
``layers``         stacked blocks (``scan_layers``), leading   --
``adapters``       loaded LoRA adapters (stacked)              --
``lora_rank``      rank of the LoRA adapters                   --
``expert``         a mixture's experts (``model/moe.py``)      ``expert``
=================  ==========================================  ============

Mesh axes: ``data`` (decode slots), ``fsdp`` (weights' embed dimension, optional), ``tensor``
(heads and MLP), and ``expert`` (a mixture's experts: expert parallelism), which a mesh has only
when asked for (``make_mesh({"expert": 4})``); its size must divide the experts of a model
(the engine checks). A dimension whose size the mesh axis does not divide is replicated instead
(for example 4 kv heads on ``tensor=8``), and size-1 mesh axes are left out of specs:
:func:`logical_to_spec` applies both once, for every leaf, so no module has to know the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.checks import is_int

MESH_AXES = ("data", "fsdp", "tensor")
OPTIONAL_AXES = ("expert",)  # in a mesh only when its size is given

RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("cache_batch", "data"),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
    ("layers", None),
    ("adapters", None),
    ("lora_rank", None),
    ("expert", "expert"),
)

LogicalAxes = Sequence[str | None]


def make_mesh(axes: Mapping[str, int] | Mesh | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes ``data``, ``fsdp`` and ``tensor`` (and
    ``expert`` when its size is given).

    ``axes`` gives sizes, e.g. ``{"data": 2, "tensor": 4}``; missing axes have size 1, and with
    no sizes at all every device goes to ``data``. A ready ``Mesh`` is returned as it is.
    """
    if isinstance(axes, Mesh):
        return axes
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(axes or {"data": len(devices)})
    unknown = sorted(set(sizes) - set(MESH_AXES) - set(OPTIONAL_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES + OPTIONAL_AXES)}")
    for name, size in sizes.items():
        if not is_int(size) or size < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {size!r}")
    names = MESH_AXES + tuple(name for name in OPTIONAL_AXES if name in sizes)
    shape = tuple(int(sizes.get(name, 1)) for name in names)
    needed = int(np.prod(shape))
    if needed > len(devices):
        described = ",".join(f"{n}={s}" for n, s in zip(names, shape) if s > 1) or "1 device"
        raise ValueError(
            f"mesh {described} needs {needed} devices but only {len(devices)} exist "
            f"(simulate more on CPU with XLA_FLAGS=--xla_force_host_platform_device_count={needed})"
        )
    device_grid = np.asarray(devices[:needed], dtype=object).reshape(shape)
    return Mesh(device_grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def describe_mesh(mesh: Mesh) -> str:
    """``data=2,fsdp=1,tensor=4`` -- the mesh's axis sizes in one short string."""
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def logical_to_spec(
    axes: LogicalAxes | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = RULES,
) -> P:
    """The PartitionSpec ``rules`` give to ``axes``, replicating dims the mesh axis does not divide."""
    if not axes:
        return P()
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(axes, shape):
        mesh_axis = table.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis in used
            or mesh.shape.get(mesh_axis, 1) == 1  # a size-1 axis shards nothing: keep specs plain
            or size % mesh.shape[mesh_axis] != 0
        ):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def declared_spec(axes: LogicalAxes | None, rules: Sequence[tuple[str, str | None]] = RULES) -> P:
    """The PartitionSpec the rules table declares for ``axes``, before any divisibility fallback."""
    if not axes:
        return P()
    table = dict(rules)
    return P(*(table.get(name) if name is not None else None for name in axes))


def shardings_for(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = RULES) -> Any:
    """NamedShardings for every Variable of an (abstract) nnx.State, from its ``out_sharding``."""
    from flax import nnx

    def one(variable: Any) -> NamedSharding:
        axes = variable.get_metadata().get("out_sharding")
        spec = logical_to_spec(axes, variable.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
