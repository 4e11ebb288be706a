"""Test fixtures: small models built from configs (the environment is set by ../conftest.py)."""

import jax
import pytest

import workbench
from helpers import lively_params


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
