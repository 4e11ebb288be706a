"""Test setup: 8 simulated CPU devices (before JAX starts) and small models built from configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# No persistent compile cache in the suite (nor in the notebook kernels and CLI processes it
# starts, which inherit this): every run compiles from scratch, as a fresh machine would.
os.environ["WORKBENCH_COMPILE_CACHE"] = "off"
os.environ["WORKBENCH_AUTOTUNE"] = "off"  # the fixed decode library: no probe, the same programs on every machine

import jax  # noqa: E402
import pytest  # noqa: E402

import workbench  # noqa: E402
from helpers import lively_params  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) >= 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def engine():
    """The tiny model on data=2 x tensor=4 with 4 slots, shared (with its compiles) by every
    module that does not define an engine of its own shape."""
    return workbench.Engine(
        workbench.ModelConfig.tiny(),
        workbench.make_mesh({"data": 2, "tensor": 4}),
        decode_batch_size=4,
        max_prefill_length=32,
        max_target_length=64,
    )


@pytest.fixture(scope="session")
def params(engine):
    return lively_params(engine)
