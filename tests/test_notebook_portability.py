"""The stored notebook outputs hold on any CPU: the notebooks that print float digits re-run with
XLA:CPU's vectors narrowed.

``--xla_cpu_max_isa=SSE4_2`` makes XLA:CPU emit narrower vector code, so float sums round the way
they would on another CPU. A notebook that prints float noise (digits below the tolerance its
numbers are known to, or counts of elements that differ in their last bits) fails here even when
it passes on the machine that recorded it. The notebooks are those that print float digits: 02
(comparisons between different programs: buckets, chunks, the uncached forward; cache norms), 04
(sampling probabilities), 07 (quantization errors, held-out loss and agreement of each mode) and
09 (attention statistics, the logit lens, ablation and patching effects); the others print
integers, shapes, bytes and tolerance statements. They run in one child pytest under strict nbval,
exactly as the main run checks them, with the narrowed ISA added to any XLA_FLAGS set.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [f"notebooks/{name}.ipynb" for name in ("02_prefill", "04_generate", "07_precision", "09_inside_a_step")]
NARROW_ISA = "--xla_cpu_max_isa=SSE4_2"


def test_the_notebooks_printing_floats_match_their_stored_outputs_under_a_narrower_isa():
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(("--xla_cpu_max_isa", "--xla_force_host"))]
    env["XLA_FLAGS"] = " ".join([*flags, NARROW_ISA])
    env["WORKBENCH_COMPILE_CACHE"] = "off"  # compiled here, for the narrowed ISA
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *NOTEBOOKS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{NOTEBOOKS} under XLA_FLAGS={env['XLA_FLAGS']!r}:\n{run.stdout[-6000:]}"
