"""The environment of every test, notebooks included (set before JAX starts, and inherited by the
notebook kernels and CLI processes the tests start): 8 simulated CPU devices, a compile cache of
this run's own, and the fixed decode library (no autotune probe: the same programs on every
machine, nothing extra on stderr).

The compile cache starts empty in a new temporary directory, as on a fresh machine, and is removed
when the run ends: nothing from an earlier run or from the user's own cache is read. Within the
run, a program that many tests and notebooks compile alike (the same small models) is compiled
once. A child process that must compile for itself (the narrowed-ISA notebook run) sets it off."""

import os
import shutil
import tempfile

RUN_CACHE = "WORKBENCH_TEST_RUN_CACHE"  # set by the process that made the cache; workers and children share it
if RUN_CACHE not in os.environ:
    os.environ[RUN_CACHE] = os.environ["WORKBENCH_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="workbench-test-xla-")
    _made_here = True
else:
    _made_here = False
os.environ["WORKBENCH_AUTOTUNE"] = "off"

from workbench import compile_cache  # noqa: E402 (after the environment it may read)
from workbench.devices import simulate_cpu_devices  # noqa: E402

simulate_cpu_devices(8)
compile_cache.enable()


def pytest_unconfigure(config):
    if _made_here:
        shutil.rmtree(os.environ[RUN_CACHE], ignore_errors=True)
