"""Sparse autoencoders on the residual stream: load published weights, encode captured residuals.

    sae = workbench.sae.load("path/to/layer_12")        # Gemma Scope or SAELens layout
    capture = probes.Capture(sae={12: sae}, sae_top=8)  # active features per token, on the cached path
    prefix, first = engine.prefill(..., probes=capture)
    found = first.captured.features(12)                  # .ids / .values [rows, T, 8], .error [rows, T]
    engine.generate(params, state, interventions=[probes.SteerFeature(12, sae, 1234, 40.0)])

Two layouts are read: Gemma Scope's ``params.npz`` (``W_enc`` [D, F], ``W_dec`` [F, D], ``b_enc``,
``b_dec``, ``threshold``: JumpReLU, ``f = relu(pre) * (pre > threshold)``, ``pre = x W_enc + b_enc``)
and SAELens' ``sae_weights.safetensors`` + ``cfg.json`` (``d_in``, ``d_sae``, ``architecture``:
"standard" (ReLU), "jumprelu" or "topk" (with ``k``); ``apply_b_dec_to_input``: the encoder reads
``x - b_dec``, SAELens' default). Encoding runs on the host (numpy, float32) over the residual the
step captured, so an SAE costs the compiled step nothing and every layout shares its programs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

ARCHITECTURES = ("standard", "jumprelu", "topk")


@dataclasses.dataclass(frozen=True, eq=False)
class SAE:
    """One sparse autoencoder over vectors of width ``d_in``: ``W_enc`` [D, F], ``W_dec`` [F, D]."""

    W_enc: np.ndarray  # noqa: N815 (the published names)
    W_dec: np.ndarray  # noqa: N815
    b_enc: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None = None
    architecture: str = "jumprelu"
    apply_b_dec_to_input: bool = False
    k: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAE architecture {self.architecture!r} is not supported; supported: {ARCHITECTURES}")
        d, f = self.W_enc.shape
        shapes = {"W_dec": (f, d), "b_enc": (f,), "b_dec": (d,)}
        if self.architecture == "jumprelu":
            shapes["threshold"] = (f,)
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"SAE {name} has shape {got}, but W_enc [{d}, {f}] needs {shape}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= f):
            raise ValueError(f"a topk SAE needs k in 1..{f}, got {self.k!r}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def preactivations(self, x: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"this SAE reads vectors of width {self.d_in}, got width {x.shape[-1]}")
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Any) -> np.ndarray:
        """Feature activations [..., F] of vectors [..., D]."""
        pre = self.preactivations(x)
        if self.architecture == "jumprelu":
            return np.where(pre > self.threshold, np.maximum(pre, 0), 0).astype(np.float32)
        acts = np.maximum(pre, 0)
        if self.architecture == "topk":  # only the k largest survive
            cut = -np.partition(-acts, self.k - 1, axis=-1)[..., self.k - 1 : self.k]
            acts = np.where(acts >= cut, acts, 0)
        return acts.astype(np.float32)

    def decode(self, features: Any) -> np.ndarray:
        return np.asarray(features, np.float32) @ self.W_dec + self.b_dec

    def feature(self, index: Any) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.d_sae:
            raise ValueError(f"feature {index!r} is out of range: this SAE has features 0..{self.d_sae - 1}")
        return int(index)


@dataclasses.dataclass(frozen=True)
class Features:
    """One layer's SAE reading of a captured residual [rows, T, D]: the ``top`` strongest features
    per token (``ids``, ``values`` [rows, T, top], strongest first; values 0 once fewer are
    active), ``active`` [rows, T] (how many are nonzero: L0) and ``error`` [rows, T] (the L2 norm of
    the residual minus its reconstruction)."""

    ids: np.ndarray
    values: np.ndarray
    active: np.ndarray
    error: np.ndarray


def features(sae: SAE, residual: Any, top: int) -> Features:
    residual = np.asarray(residual, np.float32)
    acts = sae.encode(residual)
    top = min(int(top), sae.d_sae)
    ids = np.argsort(-acts, axis=-1, kind="stable")[..., :top]
    values = np.take_along_axis(acts, ids, axis=-1)
    error = np.linalg.norm(residual - sae.decode(acts), axis=-1)
    return Features(ids.astype(np.int32), values, (acts > 0).sum(-1).astype(np.int32), error.astype(np.float32))


def _gemma_scope(path: str) -> SAE:
    with np.load(path) as stored:
        arrays = {name: np.asarray(stored[name], np.float32) for name in stored.files}
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if n not in arrays]
    if missing:
        raise ValueError(f"{path} is not a Gemma Scope SAE: missing {', '.join(missing)}")
    return SAE(arrays["W_enc"], arrays["W_dec"], arrays["b_enc"], arrays["b_dec"], arrays["threshold"])


def _sae_lens(folder: str) -> SAE:
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "cfg.json")) as f:
        cfg = json.load(f)
    stored = load_file(os.path.join(folder, "sae_weights.safetensors"))
    arrays = {k: np.asarray(v, np.float32) for k, v in stored.items()}
    if "log_threshold" in arrays and "threshold" not in arrays:
        arrays["threshold"] = np.exp(arrays["log_threshold"])
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in arrays]
    if missing:
        raise ValueError(f"{folder} is not a SAELens SAE: missing {', '.join(missing)}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"SAE normalize_activations={cfg['normalize_activations']!r} is not supported (only 'none')")
    architecture = cfg.get("architecture", "standard")
    sae = SAE(
        arrays["W_enc"], arrays["W_dec"], arrays["b_enc"], arrays["b_dec"], arrays.get("threshold"), architecture,
        bool(cfg.get("apply_b_dec_to_input", True)), cfg.get("k"),
    )  # fmt: skip
    for name in ("d_in", "d_sae"):
        if name in cfg and cfg[name] != getattr(sae, name):
            raise ValueError(f"{folder}: cfg.json says {name}={cfg[name]}, but the weights have {getattr(sae, name)}")
    return sae


def load(path: str | os.PathLike) -> SAE:
    """An SAE from a Gemma Scope ``params.npz`` (the file or its folder) or a SAELens folder
    (``sae_weights.safetensors`` + ``cfg.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "sae_weights.safetensors")):
            return _sae_lens(path)
        if os.path.exists(os.path.join(path, "params.npz")):
            return _gemma_scope(os.path.join(path, "params.npz"))
        raise FileNotFoundError(f"{path} holds no SAE: expected params.npz or sae_weights.safetensors + cfg.json")
    if path.endswith(".npz") and os.path.exists(path):
        return _gemma_scope(path)
    raise FileNotFoundError(f"no SAE at {path}: give a params.npz or a folder holding one (or a SAELens folder)")
