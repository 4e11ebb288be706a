"""The environment of every test, notebooks included (set before JAX starts, and inherited by the
notebook kernels and CLI processes the tests start): 8 simulated CPU devices, no persistent
compile cache (every run compiles from scratch, as a fresh machine would), and the fixed decode
library (no autotune probe: the same programs on every machine, nothing extra on stderr)."""

import os

os.environ["WORKBENCH_COMPILE_CACHE"] = "off"
os.environ["WORKBENCH_AUTOTUNE"] = "off"

from workbench.devices import simulate_cpu_devices  # noqa: E402 (after the environment it may read)

simulate_cpu_devices(8)
