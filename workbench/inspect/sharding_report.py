"""``inspect.sharding``: how a mesh cuts a tree of arrays -- per leaf and per device.

Metadata only: shapes, dtypes and ``Sharding`` objects. Nothing here reads an array's values,
so it runs under ``jax.transfer_guard("disallow")`` and works on ``jax.ShapeDtypeStruct``
leaves that carry a sharding just as on real arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from workbench.checks import check_not_donated
from workbench.inspect import plots
from workbench.inspect.report import Column, Report, Table, fmt_bytes, fmt_int, fmt_shape, fmt_spec, nbytes, plural
from workbench.sharding import describe_mesh
from workbench.trees import leaf_paths


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the pieces of one array of ``shape`` live: which slice on which device."""

    indices: Mapping[int, tuple[slice, ...]]  # device id -> the slice of the array it holds
    shard_shape: tuple[int, ...]
    shards: int  # distinct pieces
    replication: int  # devices holding each piece
    bytes_per_device: Mapping[int, int]

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(sorted(self.indices))


def placement(shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> Placement:
    """The placement ``sharding`` gives an array of ``shape`` and ``dtype`` (no values read)."""
    index_map = {d.id: tuple(idx) for d, idx in sharding.devices_indices_map(tuple(shape)).items()}
    sizes = {
        device: tuple(len(range(*s.indices(dim))) for s, dim in zip(idx, shape)) for device, idx in index_map.items()
    }
    pieces = {tuple((s.start, s.stop, s.step) for s in idx) for idx in index_map.values()}
    return Placement(
        indices=index_map,
        shard_shape=tuple(int(d) for d in sharding.shard_shape(tuple(shape))),
        shards=len(pieces),
        replication=len(index_map) // len(pieces),
        bytes_per_device={device: nbytes(size, dtype) for device, size in sizes.items()},
    )


def _pieces(where: Placement) -> str:
    return f"{plural(where.shards, 'piece')} x {plural(where.replication, 'copy')}"


def describe_sharding(sharding: Sharding | None, ndim: int) -> str:
    """A NamedSharding's spec per dimension (``(tensor, -)``); otherwise where it lives."""
    if sharding is None:
        return "-"
    if isinstance(sharding, NamedSharding):
        return fmt_spec(sharding.spec, ndim)
    if isinstance(sharding, SingleDeviceSharding):
        return f"device {next(iter(sharding.device_set)).id}"
    return type(sharding).__name__


def fmt_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """``(slice(0, 96), slice(None))`` -> ``0:96, :`` (a whole dimension prints as ``:``)."""
    parts = []
    for s, dim in zip(index, shape):
        start, stop, _ = s.indices(dim)
        parts.append(":" if (start, stop) == (0, dim) else f"{start}:{stop}")
    return ", ".join(parts) if parts else "()"


def mesh_coordinates(mesh: Mesh) -> dict[int, str]:
    """Device id -> ``data=1 tensor=2`` (axes of size 1 left out)."""
    names = [n for n in mesh.axis_names if mesh.shape[n] > 1]
    out = {}
    for coords, device in np.ndenumerate(mesh.devices):
        named = dict(zip(mesh.axis_names, coords))
        out[device.id] = " ".join(f"{n}={named[n]}" for n in names) or "-"
    return out


def leaf_metadata(path: str, leaf: Any) -> tuple[tuple[int, ...], Any, Sharding]:
    """(shape, dtype, sharding) of an array or of a ShapeDtypeStruct that carries a sharding."""
    where = path or "the array"
    if isinstance(leaf, jax.Array):
        check_not_donated(leaf, where)
        return tuple(leaf.shape), leaf.dtype, leaf.sharding
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise ValueError(f"{where} is a ShapeDtypeStruct without a sharding")
        return tuple(leaf.shape), leaf.dtype, leaf.sharding
    raise TypeError(
        f"{where} is a {type(leaf).__name__}, not a jax.Array on devices (or a ShapeDtypeStruct with a sharding)"
    )


class ShardingReport(Report):
    """Per leaf: spec, shard shape, pieces, replication, bytes per device; then per device."""

    def __init__(self, leaves: Mapping[str, tuple[tuple[int, ...], Any, Sharding]], mesh: Mesh | None):
        self.mesh = mesh
        self._leaves = dict(leaves)
        if mesh is not None:
            device_ids = [d.id for d in mesh.devices.flat]
            coords = mesh_coordinates(mesh)
        else:
            device_ids = sorted({d.id for _, _, s in leaves.values() for d in s.device_set})
            coords = {i: "-" for i in device_ids}
        self.placements = {path: placement(shape, dtype, s) for path, (shape, dtype, s) in leaves.items()}
        rows = []
        for path, (shape, dtype, s) in leaves.items():
            where = self.placements[path]
            outside = sorted(set(where.devices) - set(device_ids))
            if outside:
                raise ValueError(f"{path or 'the array'} lives on device {outside[0]}, which is not in the mesh")
            rows.append(
                {
                    "path": path,
                    "shape": shape,
                    "dtype": str(dtype),
                    "bytes": nbytes(shape, dtype),
                    "spec": describe_sharding(s, len(shape)),
                    "shard_shape": where.shard_shape,
                    "shards": where.shards,
                    "replication": where.replication,
                    "devices": where.devices,
                    "bytes_per_device": dict(where.bytes_per_device),
                    "max_device_bytes": max(where.bytes_per_device.values()),
                    "device_bytes": sum(where.bytes_per_device.values()),
                }
            )
        # Which process holds each device: a column of its own once the mesh spans processes.
        process = {d.id: d.process_index for _, _, s in leaves.values() for d in s.device_set}
        process.update({d.id: d.process_index for d in ([] if mesh is None else mesh.devices.flat)})
        per_device = []
        for device in device_ids:
            held = [r["bytes_per_device"][device] for r in rows if device in r["bytes_per_device"]]
            per_device.append(
                {
                    "device": device,
                    "coords": coords[device],
                    "process": process[device],
                    "arrays": len(held),
                    "bytes": sum(held),
                }
            )
        self.per_device = tuple(per_device)

        leaf_columns = (
            Column("path", "path"),
            Column("shape", "shape", fmt_shape),
            Column("dtype", "dtype"),
            Column("bytes", "bytes", fmt_int, "right"),
            Column("spec", "spec"),
            Column("shard_shape", "shard", fmt_shape),
            Column("shards", "pieces", str, "right"),
            Column("replication", "copies", str, "right"),
            Column("max_device_bytes", "per device", fmt_int, "right"),
        )
        device_columns = (
            Column("device", "device", str, "right"),
            Column("coords", "mesh position"),
            Column("arrays", "arrays", str, "right"),
            Column("bytes", "bytes", fmt_int, "right"),
            Column("bytes", "", fmt_bytes, "right"),
        )
        if len(set(process.values())) > 1:
            device_columns = (*device_columns[:2], Column("process", "process", str, "right"), *device_columns[2:])
        total = sum(r["bytes"] for r in rows)
        held = sum(r["device_bytes"] for r in rows)
        where = f"mesh {describe_mesh(mesh)}" if mesh is not None else f"{len(device_ids)} devices"
        self.title = f"sharding: {len(rows)} arrays, {fmt_bytes(total)} on {where}"
        self.tables = (
            Table("", leaf_columns, tuple(rows)),
            Table("per device", device_columns, self.per_device),
        )
        self.notes = (
            f"total {fmt_int(total)} bytes; held on devices {fmt_int(held)} bytes "
            f"({held / total:.2f}x: replicas counted)"
            if total
            else "total 0 bytes",
        )

    def _leaf(self, leaf: str | None) -> str:
        if leaf is None:
            if len(self._leaves) != 1:
                raise ValueError("name a leaf: this report holds several (its paths are in to_rows())")
            return next(iter(self._leaves))
        if leaf not in self._leaves:
            known = list(self._leaves)
            more = f" and {len(known) - 8} more" if len(known) > 8 else ""
            raise ValueError(f"no leaf {leaf!r} in this report; leaves are: {', '.join(known[:8])}{more}")
        return leaf

    def _grid(self, path: str) -> tuple[list[str], list[str], np.ndarray]:
        """Row labels, column labels, and device ids [R, C] laying the devices out on the mesh."""
        _, _, s = self._leaves[path]
        mesh = s.mesh if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) else self.mesh
        if mesh is None:
            ids = np.asarray(sorted(d.id for d in s.device_set))[None]
            return [""], [f"device {i}" for i in ids[0]], ids
        names = [n for n in mesh.axis_names if mesh.shape[n] > 1] or [mesh.axis_names[0]]
        ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
        ids = ids.transpose(
            [mesh.axis_names.index(n) for n in names] + [i for i, n in enumerate(mesh.axis_names) if n not in names]
        ).reshape([mesh.shape[n] for n in names])
        if ids.ndim == 1:
            return [""], [f"{names[0]}={i}" for i in range(ids.shape[0])], ids[None]
        cols = [" ".join(f"{n}={c}" for n, c in zip(names[1:], idx)) for idx in np.ndindex(*ids.shape[1:])]
        return [f"{names[0]}={r}" for r in range(ids.shape[0])], cols, ids.reshape(ids.shape[0], -1)

    def grid(self, leaf: str | None = None) -> str:
        """One leaf's placement on the mesh as text: each device's slice of the array."""
        path = self._leaf(leaf)
        shape, dtype, s = self._leaves[path]
        where = self.placements[path]
        rows, cols, ids = self._grid(path)
        cells = [
            [f"d{i} [{fmt_index(where.indices[i], shape)}]" if i in where.indices else f"d{i} -" for i in r]
            for r in ids
        ]
        widths = [max(len(c) for c in [cols[j]] + [r[j] for r in cells]) for j in range(len(cols))]
        lead = max(len(r) for r in rows)
        lines = [
            f"{path or 'array'}  {fmt_shape(shape)} {dtype}  spec {describe_sharding(s, len(shape))}  "
            f"shard {fmt_shape(where.shard_shape)}  {_pieces(where)}  "
            f"{fmt_int(max(where.bytes_per_device.values()))} bytes per device",
            " " * lead + "  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)),
        ]
        for label, line in zip(rows, cells):
            lines.append(label.ljust(lead) + "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)))
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, leaf: str | None = None):
        """A matplotlib Figure: bytes per device (bars), or with ``leaf`` that leaf's placement grid."""
        if leaf is None:
            labels = [f"{r['device']}\n{r['coords'].replace(' ', chr(10))}" for r in self.per_device]
            return plots.bars(
                labels, [r["bytes"] for r in self.per_device], title=self.title, xlabel="device", ylabel="bytes"
            )
        path = self._leaf(leaf)
        shape, _, _ = self._leaves[path]
        where = self.placements[path]
        rows, cols, ids = self._grid(path)
        pieces: dict[tuple, int] = {}
        groups = np.full(ids.shape, -1)
        labels = np.empty(ids.shape, dtype=object)
        for (r, c), device in np.ndenumerate(ids):
            if device in where.indices:
                index = where.indices[device]
                groups[r, c] = pieces.setdefault(fmt_index(index, shape), len(pieces))
                labels[r, c] = f"d{device}\n[{fmt_index(index, shape)}]\n{fmt_bytes(where.bytes_per_device[device])}"
            else:
                labels[r, c] = f"d{device}\n-"
        title = f"{path or 'array'} {fmt_shape(shape)}: {_pieces(where)}"
        return plots.grid(groups, labels, row_labels=rows, col_labels=cols, title=title)


def sharding(tree_or_array: Any, mesh: Mesh | None = None) -> ShardingReport:
    """How ``tree_or_array`` (an array, State, DecodeState, Prefix, dict ...) lies on the mesh.

    ``mesh`` orders and labels the per-device table (devices holding nothing show 0 bytes);
    without it, the mesh of the first leaf with a NamedSharding is used, else a plain device list.
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if isinstance(tree_or_array, (jax.Array, jax.ShapeDtypeStruct)):
        leaves = {"": leaf_metadata("", tree_or_array)}
    else:
        leaves = {path: leaf_metadata(path, leaf) for path, leaf in leaf_paths(tree_or_array).items()}
    if not leaves:
        raise ValueError("nothing to inspect: the tree has no arrays")
    if mesh is None:  # an AbstractMesh names no devices: fall back to a plain device list
        mesh = next(
            (s.mesh for _, _, s in leaves.values() if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh)), None
        )
    return ShardingReport(leaves, mesh)
