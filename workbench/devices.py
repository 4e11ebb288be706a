"""Simulated CPU devices: the one place that sets how many devices XLA:CPU pretends to have.

    import workbench
    workbench.simulate_cpu_devices(8)   # before the first JAX computation

Used by the command line (``--host-devices``), the tests' conftest and the notebooks' first cell.
It only affects the CPU platform, so a GPU or TPU machine runs unchanged. ``import workbench``
imports JAX but does not start its backend (``tests/test_devices.py`` checks), so this can run
right after it.
"""

from __future__ import annotations

import numbers
import os
import re
import sys

COUNT_FLAG = "--xla_force_host_platform_device_count"
_COUNT = re.compile(rf"(^|\s){re.escape(COUNT_FLAG)}=\S*")


def xla_flags_with_device_count(flags: str, count: int) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with the device count set to ``count``: an existing count
    is replaced, every other flag kept as the user gave it."""
    kept = _COUNT.sub(" ", flags).split()
    return " ".join([*kept, f"{COUNT_FLAG}={count}"])


def simulate_cpu_devices(count: int) -> None:
    """Make XLA:CPU present ``count`` devices, by rewriting ``XLA_FLAGS`` (inherited by the
    processes this one starts) and, if JAX is imported already, its ``jax_num_cpu_devices``.

    Call it before the first JAX computation. After one, it is fine if JAX already has
    ``count`` CPU devices; otherwise it raises a RuntimeError (restart the process or kernel).
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"the simulated CPU device count must be a positive int, got {count!r}")
    os.environ["XLA_FLAGS"] = xla_flags_with_device_count(os.environ.get("XLA_FLAGS", ""), int(count))
    jax = sys.modules.get("jax")
    if jax is None:  # not imported yet: the flag alone is read when its backend starts
        return
    try:
        # Imported but not started: this setting overrides the flag (an earlier one may be set).
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:  # started already (say, earlier in a notebook): fine if it has what was asked
        have = len(jax.devices("cpu"))
        if have != count:
            raise RuntimeError(
                f"cannot simulate {count} CPU devices: JAX has already started with {have}; "
                "call simulate_cpu_devices before the first JAX computation (restart the process or kernel)"
            ) from None
