"""The stored notebook outputs hold on any CPU: one notebook re-run with XLA:CPU's vectors narrowed.

``--xla_cpu_max_isa=SSE4_2`` makes XLA:CPU emit narrower vector code, so float sums round the way
they would on another CPU. A notebook that prints float noise (digits below the tolerance its
numbers are known to, or counts of elements that differ in their last bits) fails here even when
it passes on the machine that recorded it. The notebook is the one richest in comparisons between
different programs (buckets, chunks, the uncached forward); it runs in a child pytest under strict
nbval, exactly as the main run checks it, with the narrowed ISA added to any XLA_FLAGS set.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/02_prefill.ipynb"
NARROW_ISA = "--xla_cpu_max_isa=SSE4_2"


def test_a_notebook_matches_its_stored_outputs_under_a_narrower_isa():
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(("--xla_cpu_max_isa", "--xla_force_host"))]
    env["XLA_FLAGS"] = " ".join([*flags, NARROW_ISA])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", NOTEBOOK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{NOTEBOOK} under XLA_FLAGS={env['XLA_FLAGS']!r}:\n{run.stdout[-6000:]}"
