"""Each platform's tuning, in one place: what an engine runs beyond the plain path, and why.

The model on its own is the plain path: attention by :func:`workbench.model.kernels.reference`
(two einsums), every weight product one einsum, compiled with XLA's default options. What runs
faster on a platform is chosen here, by platform and, on the CPU, by measurement:

=============  ==================================  ==============================================
platform       attention kernels                   decode step's weight products
=============  ==================================  ==============================================
``cpu``        ``"xla_cpu"``: layouts XLA:CPU      YNNPACK or Eigen, by ``compiler_options`` of
               runs faster (``model/kernels.py``)  the generate jit: the decode-library probe
                                                   (``engine/autotune.py``) measures float32 per
                                                   machine; bfloat16 and int8 take YNNPACK
anything else  ``"reference"``                     XLA's own choice (no compiler options): nothing
(GPU, TPU)                                         has been measured there
=============  ==================================  ==============================================

One more CPU rule sits here: bfloat16 compute becomes float32 (:func:`for_platform`, used by
``workbench.load``) -- XLA:CPU runs bfloat16 weights with float32 activations fast, and an
all-bfloat16 step many times slower (``docs/speed.md``).

``Engine(kernels=...)``: ``"auto"`` (the default) follows this table; ``"reference"`` runs the
plain path on any platform (no tuning at all); ``"xla_cpu"`` asks for the CPU's tuning anywhere
(its compiler options only ever reach an XLA:CPU compile). A :class:`Tuning` may be passed too.

The probe is a step of its own: building an engine measures nothing and writes nothing.
``engine.tune()`` picks the decode library (reading the cache of earlier picks, or running the
probe once, ``WORKBENCH_AUTOTUNE`` deciding as ``engine/autotune.py`` says) and builds generate
with it; an engine's first ``generate`` calls it if nobody did before.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from workbench.engine import autotune
from workbench.model import ModelConfig, kernels

KERNELS = ("auto", *kernels.KERNELS)  # what Engine(kernels=...) takes


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What an engine runs beyond the plain path."""

    attention_kernels: str = "reference"  # the model's kernel set (model.kernels.KERNELS)
    cpu_products: bool = False  # decode's products on the library autotune picks (XLA:CPU only)

    def __post_init__(self) -> None:
        if self.attention_kernels not in kernels.KERNELS:
            raise ValueError(f"attention_kernels must be one of {kernels.KERNELS}, got {self.attention_kernels!r}")

    def decode_library(self, config, batch: int, *, probe: bool = True) -> str | None:
        """``"ynnpack"`` or ``"eigen"`` for decode's products of ``config`` at decode ``batch``
        (reads the cache of earlier picks, or runs the probe: ``autotune.library``); None: XLA's
        default, nothing to pick. ``probe=False``: "" where the probe would have to run."""
        return autotune.library(config, batch, probe=probe) if self.cpu_products else None


def platform(mesh: Mesh) -> str:
    """The platform of a mesh's devices: ``"cpu"``, ``"gpu"``, ``"tpu"``."""
    return mesh.devices.flat[0].platform


def for_platform(config: ModelConfig, platform: str) -> ModelConfig:
    """``config`` as it runs on ``platform``: on the CPU, bfloat16 compute becomes float32 (the
    weights stay bfloat16, each product taking a float32 result: ``quant.einsum``)."""
    return config.replace(dtype="float32") if platform == "cpu" and config.dtype == "bfloat16" else config


def choose(choice: str | Tuning, platform: str) -> Tuning:
    """The tuning an engine on ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``) runs for
    ``Engine(kernels=choice)``."""
    if isinstance(choice, Tuning):
        return dataclasses.replace(choice, cpu_products=choice.cpu_products and platform == "cpu")
    if choice not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)} (or a tuning.Tuning), got {choice!r}")
    if choice == "auto":
        choice = "xla_cpu" if platform == "cpu" else "reference"
    return Tuning(attention_kernels=choice, cpu_products=choice == "xla_cpu" and platform == "cpu")


def compiler_options(library: str | None) -> dict[str, str] | None:
    """The generate jit's ``compiler_options`` for a decode library (None: XLA's defaults)."""
    return None if library is None else autotune.LIBRARIES[library]
