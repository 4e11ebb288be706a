"""``inspect.state``: the engine's split NNX state -- params, cache and rest -- one row per leaf.

Each row sets what the model declares (the Variable's logical axes in the engine's abstract
state, and the PartitionSpec the rules table gives them on this mesh) beside what the array
actually is (its sharding), and flags the leaves where the two disagree. Metadata only: runs
under ``jax.transfer_guard("disallow")``; ShapeDtypeStructs with shardings work like arrays.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from jax.sharding import NamedSharding

from workbench import sharding as rules_table
from workbench.engine import DecodeState, Engine
from workbench.inspect.report import Column, Report, Table, fmt_axes, fmt_bytes, fmt_int, fmt_shape, fmt_spec, nbytes
from workbench.inspect.sharding_report import describe_sharding, leaf_metadata, placement
from workbench.trees import check_matches, leaf_paths, variables

_SLOT_FIELDS = ("positions", "tokens", "lengths", "active", "rng")


def _row(
    collection: str,
    path: str,
    kind: str,
    axes: Any,
    shape: tuple,
    dtype: Any,
    actual: Any,
    expected: NamedSharding,
    declared: Any,
) -> dict[str, Any]:
    ndim = len(shape)
    sharding = actual if actual is not None else expected  # abstract leaves: where the rules put them
    where = placement(shape, dtype, sharding)
    return {
        "collection": collection,
        "path": path,
        "type": kind,
        "shape": shape,
        "dtype": str(dtype),
        "bytes": nbytes(shape, dtype),
        "axes": tuple(axes) if axes else None,
        "declared_spec": fmt_spec(declared, ndim),
        "spec": fmt_spec(expected.spec, ndim),
        "actual_spec": describe_sharding(actual, ndim) if actual is not None else None,
        "mismatch": None if actual is None else not actual.is_equivalent_to(expected, ndim),
        "devices": where.devices,
        "replication": where.replication,
        "bytes_per_device": dict(where.bytes_per_device),
    }


def _collection(engine: Engine, collection: str, abstract: nnx.State, concrete: Any | None) -> list[dict[str, Any]]:
    declared = variables(abstract)  # the model's declaration: type and logical axes
    kinds = {path: type(v).__name__ for path, v in declared.items()}
    leaves = None
    if concrete is not None:
        leaves = leaf_paths(concrete)
        check_matches(collection, abstract, concrete)
        if isinstance(concrete, nnx.State):  # its own Variables name their type; a pure dict has none
            kinds.update({path: type(v).__name__ for path, v in variables(concrete).items()})
    rows = []
    for path, variable in declared.items():
        axes = variable.get_metadata().get("out_sharding")
        shape, dtype = tuple(variable.shape), variable.dtype
        actual = None
        if leaves is not None:
            shape, dtype, actual = leaf_metadata(f"{collection} {path}", leaves[path])
        expected = NamedSharding(engine.mesh, rules_table.logical_to_spec(axes, shape, engine.mesh, engine.rules))
        spec = rules_table.declared_spec(axes, engine.rules)
        rows.append(_row(collection, path, kinds[path], axes, shape, dtype, actual, expected, spec))
    return rows


def _slot_rows(engine: Engine, decode_state: DecodeState) -> list[dict[str, Any]]:
    rows = []
    for name in _SLOT_FIELDS + (("adapters",) if decode_state.adapters is not None else ()):
        shape, dtype, actual = leaf_metadata(f"decode {name}", getattr(decode_state, name))
        expected = getattr(engine.decode_state_shardings, name)
        rows.append(_row("decode", name, "-", None, shape, dtype, actual, expected, expected.spec))
    return rows


class StateReport(Report):
    """Rows per leaf of params, cache and rest (and the decode state's slot arrays), with totals."""

    def __init__(self, rows: list[dict[str, Any]], cache_source: str, mesh: Any, cache_length: int | None = None):
        # cache_length: max_target_length, what a ring's cache would hold at full length
        self.totals: dict[str, dict[str, int]] = {}
        for row in rows:
            total = self.totals.setdefault(row["collection"], {"arrays": 0, "bytes": 0, "device_bytes": 0})
            total["arrays"] += 1
            total["bytes"] += row["bytes"]
            total["device_bytes"] += sum(row["bytes_per_device"].values())
        for name, total in self.totals.items():
            per_device: dict[int, int] = {}
            for row in rows:
                if row["collection"] == name:
                    for device, n in row["bytes_per_device"].items():
                        per_device[device] = per_device.get(device, 0) + n
            total["max_device_bytes"] = max(per_device.values())
        self.mismatches = tuple(f"{r['collection']}/{r['path']}" for r in rows if r["mismatch"])

        def check(row: dict[str, Any]) -> str:
            return "abstract" if row["mismatch"] is None else ("MISMATCH" if row["mismatch"] else "ok")

        shown = [
            {
                **r,
                "check": check(r),
                "n_devices": len(r["devices"]),
                "rules": r["spec"] + ("*" if r["spec"] != r["declared_spec"] else ""),
            }
            for r in rows
        ]
        columns = (
            Column("collection", "collection", repeat=False),
            Column("path", "path"),
            Column("type", "type"),
            Column("shape", "shape", fmt_shape),
            Column("dtype", "dtype"),
            Column("bytes", "bytes", fmt_int, "right"),
            Column("axes", "logical axes", fmt_axes),
            Column("rules", "rules give"),
            Column("actual_spec", "actual", lambda s: "-" if s is None else s),
            Column("check", "check"),
            Column("n_devices", "devices", str, "right"),
            Column("replication", "copies", str, "right"),
        )
        total_rows = tuple({"collection": k, **v} for k, v in self.totals.items())
        total_columns = (
            Column("collection", "collection"),
            Column("arrays", "arrays", str, "right"),
            Column("bytes", "bytes", fmt_int, "right"),
            Column("bytes", "", fmt_bytes, "right"),
            Column("device_bytes", "on all devices", fmt_bytes, "right"),
            Column("max_device_bytes", "max per device", fmt_bytes, "right"),
        )
        self._rows = rows
        self.title = f"split state on mesh {rules_table.describe_mesh(mesh)}: cache = {cache_source}"
        self.tables = (Table("", columns, tuple(shown)), Table("totals", total_columns, total_rows))
        notes = [f"mismatches: {', '.join(self.mismatches) if self.mismatches else 'none'}"]
        if any(r["spec"] != r["declared_spec"] for r in rows):
            notes.append(
                "* not the rules table's spec (declared_spec): a mesh axis of size 1, or one that does not "
                "divide the dimension, leaves that dimension unsplit"
            )
        self.ring_saving = None if cache_length is None else _ring_saving(rows, cache_length)
        if self.ring_saving is not None:
            held, full = self.ring_saving["cache_bytes"], self.ring_saving["full_length_bytes"]
            notes.append(
                f"sliding layers keep rings of their window (the leaves with a held array): the cache takes "
                f"{fmt_bytes(held)} where full-length caches would take {fmt_bytes(full)} ({full / held:.1f}x)"
            )
        self.notes = tuple(notes)

    def to_rows(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._rows]


def _ring_saving(rows: list[dict[str, Any]], cache_length: int) -> dict[str, int] | None:
    """The cache's bytes, and what they would be with every ring (a layer whose cache dict holds
    ``held``: ``model/ring.py``) stretched to ``cache_length`` positions; None without rings."""
    cache = [r for r in rows if r["collection"] == "cache"]
    rings = {r["path"].rpartition("/")[0] for r in cache if r["path"].endswith("/held")}
    if not rings:
        return None
    total = full = 0
    for r in cache:
        total += r["bytes"]
        parent, _, name = r["path"].rpartition("/")
        if parent not in rings:
            full += r["bytes"]
        elif name != "held":  # k, v (and int8 scales): their cache_seq axis stretched
            window = r["shape"][r["axes"].index("cache_seq")]
            full += r["bytes"] // window * cache_length
    return {"cache_bytes": total, "full_length_bytes": full}


def state(engine: Engine, params: nnx.State | dict, decode_state: DecodeState | None = None) -> StateReport:
    """The split state of ``engine`` with ``params``: one row per leaf of params, cache, rest.

    The cache is the engine's prefill cache (abstract: where the rules would put it) or, with
    ``decode_state``, that state's cache -- plus its slot arrays (positions, tokens, ...) as a
    ``decode`` collection. Row keys: collection, path, type, shape, dtype, bytes, axes,
    declared_spec (the rules table), spec (the rules on this mesh, after the divisibility
    fallback), actual_spec, mismatch (None for abstract leaves), devices, replication,
    bytes_per_device. ``.totals`` sums each collection; ``.mismatches`` names the flagged leaves;
    ``.ring_saving`` (None without sliding layers' rings): the cache's bytes beside what
    full-length caches would take (``model/ring.py``), also in the notes.
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a workbench Engine, got {type(engine).__name__}")
    if not isinstance(params, (nnx.State, dict)):
        raise TypeError(f"params must be an nnx.State or a pure dict, got {type(params).__name__}")
    if decode_state is not None and not isinstance(decode_state, DecodeState):
        raise TypeError(f"decode_state must be a DecodeState or None, got {type(decode_state).__name__}")
    rows = _collection(engine, "params", engine.abstract_params, params)
    if decode_state is None:
        rows += _collection(engine, "cache", engine.abstract_prefill_cache, None)
    else:
        rows += _collection(engine, "cache", engine.abstract_decode_cache, decode_state.cache)
    if engine.adapters:  # the LoRA weights (nnx.LoRAParam) live in rest; shown as their own collection
        abstract_lora, abstract_rest = nnx.split_state(engine.abstract_rest, nnx.LoRAParam, ...)
        lora, rest = nnx.split_state(engine.rest, nnx.LoRAParam, ...)
        rows += _collection(engine, "lora", abstract_lora, lora)
        rows += _collection(engine, "rest", abstract_rest, rest)
    else:
        rows += _collection(engine, "rest", engine.abstract_rest, engine.rest)
    if decode_state is not None:
        rows += _slot_rows(engine, decode_state)
    source = "prefill cache (abstract)" if decode_state is None else "decode state"
    return StateReport(rows, source, engine.mesh, engine.max_target_length)
