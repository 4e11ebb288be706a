"""Flags and helpers every command shares: the engine's shape, the mesh, simulated devices."""

from __future__ import annotations

import argparse
import re
from typing import Any

from workbench.devices import simulate_cpu_devices
from workbench.model.quant import MODES as QUANTIZE_MODES


class CliError(Exception):
    """Bad command-line input: reported as one ``error: ...`` line, exit code 2."""


def add_engine_arguments(parser: argparse.ArgumentParser, *, decode_batch: int = 8) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--checkpoint", metavar="PATH", help="HF dir or workbench orbax dir; omitted: the default model")
    group.add_argument("--decode-batch", type=int, default=decode_batch, metavar="B", help="decode slots")
    group.add_argument("--max-prefill-length", type=int, default=256, metavar="L")
    group.add_argument("--max-target-length", type=int, default=1024, metavar="T")
    group.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: the checkpoint's; on the CPU bfloat16 weights compute in float32",
    )
    group.add_argument("--quantize", choices=("none", *QUANTIZE_MODES), default=None, help="default: as saved")
    group.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto", help="auto: the compute dtype")
    group.add_argument(
        "--host-devices", type=int, default=None, metavar="N", help="simulate N CPU devices (applied before JAX starts)"
    )
    group.add_argument("--mesh", type=parse_mesh, default=None, metavar="data=2,tensor=4", help="mesh axis sizes")
    group.add_argument(
        "--scan-layers", action="store_true", help="stack the layers and run them by one scan (compile flat in depth)"
    )
    group.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_false",
        help="compile without the persistent cache (default: on; see workbench.compile_cache)",
    )


def parse_mesh(text: str) -> dict[str, int]:
    """``data=2,tensor=4`` -> ``{"data": 2, "tensor": 4}``."""
    sizes = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([a-z_]+)\s*=\s*(\d+)\s*", part)
        if not match:
            raise argparse.ArgumentTypeError(f"malformed mesh {text!r}: expected axis=size pairs like data=2,tensor=4")
        sizes[match.group(1)] = int(match.group(2))
    return sizes


def apply_host_devices(count: int | None) -> None:
    """Simulate ``count`` CPU devices (:func:`workbench.devices.simulate_cpu_devices`); must run
    before JAX initialises its backend."""
    if count is None:
        return
    if count < 1:
        raise CliError(f"--host-devices must be positive, got {count}")
    try:
        simulate_cpu_devices(count)
    except RuntimeError as error:  # JAX already started (say, in a notebook) with another count
        raise CliError(f"--host-devices {count}: {error}") from None


def load_engine(args: argparse.Namespace, **overrides: Any):
    """(engine, params) from the shared engine flags."""
    import workbench

    options = dict(
        mesh=args.mesh,
        decode_batch_size=args.decode_batch,
        max_prefill_length=args.max_prefill_length,
        max_target_length=args.max_target_length,
        dtype=args.dtype,
        quantize=None if args.quantize in (None, "none") else args.quantize,
        kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
    )
    if getattr(args, "scan_layers", False):
        options["scan_layers"] = True
    options.update(overrides)
    return workbench.load(args.checkpoint, **options)
