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


# Two workers take whole files (--dist loadfile), each taking the next file in the queue when its
# own is nearly done; the run ends when the busier one does. xdist's own order (most tests first,
# --loadscope-reorder) left the single-test files, the longest among them, to the end: the
# narrowed-ISA notebook run (70 s) started last and ran alone. So the queue is longest first (the
# files of 15 s or more, as measured in whole runs on 2 busy cores, AMD EPYC Zen 3), then the rest
# in collection order, all under 15 s: the workers end within about one short file of each other.
# A file missing here only runs later; `pytest --durations=0` shows when the list is out of date.
LONGEST_FIRST = [
    "tests/test_browser.py",  # 100 s: JupyterLab and Chromium running six notebooks
    "tests/test_distributed.py",  # 94 s: its module fixture's nine processes
    "tests/test_notebook_portability.py",  # 73 s: four notebooks again under SSE4_2
    "tests/test_quant.py",
    "tests/test_engine.py",
    "tests/test_lora.py",
    "tests/test_cli_generate.py",
    "notebooks/08_adapters_and_sampling.ipynb",
    "tests/test_probes.py",
    "tests/test_model.py",
    "notebooks/05_meshes.ipynb",
    "tests/test_combinations.py",
    "notebooks/09_inside_a_step.ipynb",
    "tests/test_scan.py",
    "tests/test_moe.py",
    "tests/test_train.py",
    "notebooks/01_tour.ipynb",
    "tests/test_ring_cache.py",
    "tests/test_kernels.py",
    "tests/test_hf_parity.py",
    "notebooks/02_prefill.ipynb",
    "tests/test_families.py",
    "tests/test_scheduler.py",
    "notebooks/03_insert.ipynb",
    "notebooks/06_checkpoints.ipynb",
    "notebooks/07_precision.ipynb",
    "notebooks/04_generate.ipynb",
    "tests/test_devices.py",
    "tests/test_launch.py",
    "tests/test_checkpoints.py",
]


def pytest_collection_modifyitems(session, config, items):
    """The files in the order of LONGEST_FIRST, then the others (xdist keeps this order with
    --no-loadscope-reorder, set in pyproject's addopts); each file's tests in their own order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))


def pytest_unconfigure(config):
    if _made_here:
        shutil.rmtree(os.environ[RUN_CACHE], ignore_errors=True)
