"""``workbench.simulate_cpu_devices``: the flag rewrite by hand, and in fresh processes that
``import workbench`` leaves JAX's backend unstarted (so a notebook may call it right after), that
the count takes effect, and that a different count after JAX started is a clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.devices import xla_flags_with_device_count

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("", "--xla_force_host_platform_device_count=4"),
        ("--xla_cpu_max_isa=SSE4_2", "--xla_cpu_max_isa=SSE4_2 --xla_force_host_platform_device_count=4"),
        (
            "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2",
            "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=4",
        ),
        (
            " --a=1  --xla_force_host_platform_device_count=2 --b --xla_force_host_platform_device_count=16 ",
            "--a=1 --b --xla_force_host_platform_device_count=4",
        ),
        # a flag that merely starts with the same name is the user's, not ours
        (
            "--xla_force_host_platform_device_count_x=1",
            "--xla_force_host_platform_device_count_x=1 --xla_force_host_platform_device_count=4",
        ),
    ],
)
def test_the_count_replaces_any_earlier_one_and_keeps_other_flags(flags, expected):
    assert xla_flags_with_device_count(flags, 4) == expected


def python(code: str, flags: str = "--xla_cpu_max_isa=AVX2") -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose XLA_FLAGS hold ``flags`` and no device count."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_import_leaves_jax_unstarted_the_count_applies_and_a_later_other_count_is_a_clear_error():
    """One fresh interpreter (they cost seconds each on 2 cores): ``import workbench`` starts no
    backend, the count then takes effect, the same count again is fine once JAX has started, and
    another is one clear error."""
    done = python(
        "import os, workbench\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'import workbench started JAX'\n"
        "workbench.simulate_cpu_devices(3)\n"
        "import jax\n"
        "print(jax.device_count(), os.environ['XLA_FLAGS'])\n"
        "jax.numpy.zeros(1).block_until_ready()  # JAX starts here\n"
        "workbench.simulate_cpu_devices(3)  # what it has: fine\n"
        "try:\n"
        "    workbench.simulate_cpu_devices(5)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "print(jax.device_count())\n"
    )
    assert done.returncode == 0, done.stderr
    started, message, count = done.stdout.strip().splitlines()
    assert started.split() == ["3", "--xla_cpu_max_isa=AVX2", "--xla_force_host_platform_device_count=3"]
    assert message.startswith("cannot simulate 5 CPU devices: JAX has already started with 3;")
    assert count == "3"


@pytest.mark.parametrize("count", [0, -1, 2.0, True, "8"])
def test_a_count_that_is_not_a_positive_int_is_refused(count):
    from workbench import simulate_cpu_devices

    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(ValueError, match="must be a positive int"):
        simulate_cpu_devices(count)
    assert os.environ.get("XLA_FLAGS") == before
