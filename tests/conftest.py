"""Test setup: 8 simulated CPU devices (before JAX starts) and small models built from configs."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import workbench  # noqa: E402


def lively_params(engine: workbench.Engine, seed: int = 0) -> nnx.State:
    """Random weights scaled so the model's greedy tokens vary (0.02-std init gives one token
    over and over, which would make token comparisons weak): twice fan-in scaling, norms near 1."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (2 * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    return engine.load_params(jax.tree.map(draw, nnx.to_pure_dict(engine.abstract_params)))


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) >= 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def engine():
    """The tiny model on data=2 x tensor=4 with 4 slots, shared (with its compiles) by every
    module that does not define an engine of its own shape."""
    return workbench.Engine(
        workbench.ModelConfig.tiny(), workbench.make_mesh({"data": 2, "tensor": 4}),
        decode_batch_size=4, max_prefill_length=32, max_target_length=64,
    )


@pytest.fixture(scope="session")
def params(engine):
    return lively_params(engine)
