"""Model configuration: one frozen dataclass for the Llama family and its relatives (Mistral,
Qwen2/3, Gemma 2/3), with named presets. Every field past the shapes defaults to Llama's behaviour;
each family's difference is one field (``checkpoints/hf_config.py`` maps HF configs onto them)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from workbench.checks import check_int
from workbench.model import quant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The byte vocabulary layout (the default model's; ``ByteTokenizer`` and training read it here):
# ids 0..255 are the bytes themselves, the specials come after.
BYTES = 256
BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama), GeGLU with tanh-approximated gelu (Gemma)
ROPE_SCALINGS = ("llama3", "linear")
# How a mixture of experts turns router logits into each token's k weights (``model/moe.py``):
# "softmax_topk": softmax over the k largest logits (Mixtral); "topk_softmax": softmax over every
# expert, then the k largest probabilities, renormalized to sum to 1 when ``norm_topk_prob`` (Qwen3-MoE).
ROUTERS = ("softmax_topk", "topk_softmax")


def sliding_pattern(num_layers: int, every: int) -> tuple[str, ...]:
    """HF Gemma's default ``layer_types``: every ``every``-th layer full, the others sliding."""
    return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers))


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rope scaling: Llama-3's frequency-dependent one (``rope_type: llama3`` in HF configs), or
    ``linear`` (every frequency divided by ``factor``; Gemma 3's global layers), which reads only
    ``factor``."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope scaling {self.rope_type!r}; known: {', '.join(ROPE_SCALINGS)}")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only Transformer of the Llama family or a relative.

    Attributes:
      vocab_size: number of token ids.
      embed_dim: model width D.
      num_layers: decoder blocks.
      num_heads: query heads N.
      num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
      head_dim: width H of one head (Llama: embed_dim // num_heads).
      mlp_dim: SwiGLU hidden width F.
      rope_theta: base of the rotary frequencies.
      rope_scaling: rope scaling (Llama-3's or linear), or None; with ``local_rope_theta``, of
        the full-attention layers only.
      local_rope_theta: the rope base of sliding layers, which then take no scaling (Gemma 3's
        local layers), or None: every layer's rope alike.
      norm_eps: RMSNorm epsilon.
      qkv_bias: bias on the q/k/v projections (Qwen2).
      sliding_window: attend only to the last ``sliding_window`` positions (Mistral), or None.
      layer_types: each layer's attention, ``"full_attention"`` or ``"sliding_attention"`` (HF's
        ``layer_types``; Gemma alternates them), or None: every layer sliding when
        ``sliding_window`` is set, else full. See :meth:`window`.
      tie_embeddings: the output projection reuses the token embedding.
      norm_offset: 0 (every RMSNorm computes ``x * w``) or 1 (``x * (1 + w)`` in float32, Gemma;
        the weights then start at zero).
      post_norms: Gemma's sandwich norms, an RMSNorm on the attention and the MLP outputs too.
      qk_norm: an RMSNorm over each query and key head before rope (Qwen3, Gemma 3).
      embed_scale: token embeddings times sqrt(embed_dim), rounded to the weight dtype (Gemma).
      mlp_activation: the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
      query_pre_attn_scalar: queries scaled by ``query_pre_attn_scalar ** -0.5`` (Gemma); None:
        ``head_dim ** -0.5``.
      attn_logit_softcap / final_logit_softcap: ``cap * tanh(x / cap)`` on the attention scores /
        on the output logits (Gemma 2), or None.
      dtype: compute dtype (activations and KV cache), "float32" or "bfloat16".
      param_dtype: parameter storage dtype.
      bos_id / eos_ids / pad_id: special token ids (metadata for tokenizers and the CLI).
      quantize: None (float weights), "w8", "w8a8" or "w4"; see ``model.quant``.
      kv_cache_dtype: None (the compute dtype) or "int8" (with a scale per position and kv head).
      num_experts: experts of a sparse MLP layer (a mixture of experts, ``model/moe.py``); 0: a
        dense model.
      num_experts_per_tok: the k experts each token runs.
      moe_mlp_dim: each expert's hidden width (HF's ``moe_intermediate_size``); None: ``mlp_dim``.
      router: how logits become the k weights, one of ``ROUTERS`` (Mixtral "softmax_topk",
        Qwen3-MoE "topk_softmax").
      norm_topk_prob: "topk_softmax" renormalizes the k probabilities to sum to 1.
      decoder_sparse_step / mlp_only_layers: layer ``i`` is sparse when ``(i + 1) %
        decoder_sparse_step == 0`` and ``i`` is not in ``mlp_only_layers`` (Qwen3-MoE); the others
        keep a dense MLP of ``mlp_dim``. See :meth:`sparse`.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    tie_embeddings: bool = False
    local_rope_theta: float | None = None
    norm_offset: float = 0.0
    post_norms: bool = False
    qk_norm: bool = False
    embed_scale: bool = False
    mlp_activation: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    quantize: str | None = None
    kv_cache_dtype: str | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_mlp_dim: int | None = None
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            value = getattr(self, name)
            check_int(f"ModelConfig.{name}", value, positive=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        quant.check_mode(self.quantize)
        quant.check_kv_cache_dtype(self.kv_cache_dtype)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            for kind in self.layer_types:
                if kind not in LAYER_TYPES:
                    raise ValueError(f"unknown layer_types entry {kind!r}; known: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types names sliding_attention layers but sliding_window is None")
        if self.norm_offset not in (0.0, 1.0):
            raise ValueError(f"norm_offset must be 0 (x * w) or 1 (x * (1 + w)), got {self.norm_offset}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}; known: {', '.join(MLP_ACTIVATIONS)}")
        self._check_experts()
        for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be positive or None, got {value}")

    def _check_experts(self) -> None:
        check_int("ModelConfig.num_experts", self.num_experts)
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be 0 (a dense model) or positive, got {self.num_experts}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router scheme {self.router!r}; known: {', '.join(ROUTERS)}")
        if not self.num_experts:
            return
        for name in ("num_experts_per_tok", "decoder_sparse_step") + (("moe_mlp_dim",) if self.moe_mlp_dim else ()):
            check_int(f"ModelConfig.{name}", getattr(self, name), positive=True)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be at most num_experts ({self.num_experts})"
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mlp_only_layers names layer {bad[0]}, but the model has layers 0..{self.num_layers - 1}")

    def sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a mixture of experts (else dense, ``mlp_dim`` wide)."""
        return (
            self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """The layers whose MLP is a mixture of experts (:meth:`sparse`), in order."""
        return tuple(i for i in range(self.num_layers) if self.sparse(i))

    @property
    def expert_dim(self) -> int:
        """Each expert's hidden width."""
        return self.moe_mlp_dim or self.mlp_dim

    def window(self, layer: int) -> int | None:
        """The attention window of layer ``layer``: ``sliding_window`` for a sliding layer, else None."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> str:
        """Which rope layer ``layer`` takes: "local" (``local_rope_theta``) for a sliding layer
        when that is set, else "global"."""
        return "local" if self.local_rope_theta is not None and self.window(layer) is not None else "global"

    @property
    def layer_period(self) -> int:
        """The length of the shortest pattern of layer kinds that repeats through the layers (the
        last repeat may stop short): 1 when every layer attends alike, 6 for Gemma 3, 2 for
        Gemma 2; a layer's kind is its window and whether its MLP is a mixture of experts. Scanned
        layers run one repeat per scan step (``model.scan``)."""
        kinds = [(self.window(i), self.sparse(i)) for i in range(self.num_layers)]
        return next(p for p in range(1, self.num_layers + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_ids"] = tuple(data.get("eos_ids", ()))
        if data.get("layer_types") is not None:
            data["layer_types"] = tuple(data["layer_types"])
        data["mlp_only_layers"] = tuple(data.get("mlp_only_layers", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field {unknown[0]!r}")
        return cls(**data)

    def projections(self) -> dict[str, tuple[tuple[int, int], tuple[str, str]]]:
        """The seven weight products of a block, in order q, k, v, o, gate, up, down: each one's
        (in, out) sizes, heads flattened as HF stores them, and the logical axes of in and out."""
        d, f = self.embed_dim, self.mlp_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q": ((d, q), ("embed", "heads")),
            "k": ((d, kv), ("embed", "kv_heads")),
            "v": ((d, kv), ("embed", "kv_heads")),
            "o": ((q, d), ("heads", "embed")),
            "gate": ((d, f), ("embed", "mlp")),
            "up": ((d, f), ("embed", "mlp")),
            "down": ((f, d), ("mlp", "embed")),
        }

    def num_params(self) -> int:
        d, h = self.embed_dim, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        norms = (4 if self.post_norms else 2) * d + (2 * h if self.qk_norm else 0)
        sparse = len(self.sparse_layers)
        mlps = (self.num_layers - sparse) * 3 * d * self.mlp_dim
        mlps += sparse * self.num_experts * (3 * d * self.expert_dim + d)  # experts and the router
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * (attn + norms) + mlps + d + head

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **changes: Any) -> "ModelConfig":
        """The default model: byte-level vocabulary (256 bytes + BOS/EOS/PAD), about 0.8M params."""
        # fmt: off
        base = cls(
            vocab_size=384, embed_dim=128, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=384,
            rope_theta=10_000.0, tie_embeddings=True, bos_id=BYTE_BOS, eos_ids=(BYTE_EOS,), pad_id=BYTE_PAD,
        )
        # fmt: on
        return base.replace(**changes)

    @classmethod
    def llama_56m(cls, **changes: Any) -> "ModelConfig":
        """The benchmark model: hidden 512, 8 layers, 8 heads / 4 kv heads, MLP 1408, vocab 32000."""
        # fmt: off
        base = cls(
            vocab_size=32000, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1408,
            rope_theta=10_000.0, bos_id=1, eos_ids=(2,), pad_id=0,
        )
        # fmt: on
        return base.replace(**changes)

    @classmethod
    def llama3_1b(cls, **changes: Any) -> "ModelConfig":
        """The shape of Llama-3.2-1B (rope scaling, tied embeddings), for sharding and memory studies."""
        # fmt: off
        base = cls(
            vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
            mlp_dim=8192, rope_theta=500_000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
            bos_id=128000, eos_ids=(128001, 128008, 128009), pad_id=0, param_dtype="bfloat16", dtype="bfloat16",
        )
        # fmt: on
        return base.replace(**changes)

    # The shapes of three public models (random weights here; a real checkpoint loads through
    # ``workbench.load``), for sharding, memory and cache studies of their families.
    @classmethod
    def gemma2_2b(cls, **changes: Any) -> "ModelConfig":
        """The shape of Gemma-2-2B: sliding and global layers alternating, soft-capping, sandwich norms."""
        # fmt: off
        base = cls(
            vocab_size=256000, embed_dim=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
            norm_eps=1e-6, sliding_window=4096, layer_types=sliding_pattern(26, 2), tie_embeddings=True,
            norm_offset=1.0, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=256,
            attn_logit_softcap=50.0, final_logit_softcap=30.0, bos_id=2, eos_ids=(1, 107), pad_id=0,
            param_dtype="bfloat16", dtype="bfloat16",
        )
        # fmt: on
        return base.replace(**changes)

    @classmethod
    def gemma3_1b(cls, **changes: Any) -> "ModelConfig":
        """The shape of Gemma-3-1B: five sliding layers (window 512, rope 10k) to one global (rope 1M), q/k norms."""
        # fmt: off
        base = cls(
            vocab_size=262144, embed_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=6912,
            rope_theta=1_000_000.0, local_rope_theta=10_000.0, norm_eps=1e-6, sliding_window=512,
            layer_types=sliding_pattern(26, 6), tie_embeddings=True, norm_offset=1.0, post_norms=True, qk_norm=True,
            embed_scale=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=256, bos_id=2, eos_ids=(1, 106),
            pad_id=0, param_dtype="bfloat16", dtype="bfloat16",
        )
        # fmt: on
        return base.replace(**changes)

    @classmethod
    def qwen3_0_6b(cls, **changes: Any) -> "ModelConfig":
        """The shape of Qwen3-0.6B: q/k norms, head_dim 128 apart from the width (16 x 128 != 1024)."""
        # fmt: off
        base = cls(
            vocab_size=151936, embed_dim=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
            rope_theta=1_000_000.0, norm_eps=1e-6, tie_embeddings=True, qk_norm=True, bos_id=151643,
            eos_ids=(151645, 151643), pad_id=151643, param_dtype="bfloat16", dtype="bfloat16",
        )
        # fmt: on
        return base.replace(**changes)

    @classmethod
    def mixtral_1b(cls, **changes: Any) -> "ModelConfig":
        """A Mixtral-shaped mixture of experts of about 1B params: 8 experts per layer, top-2, so
        a token runs about a quarter of the expert weights (the bench's MoE)."""
        # fmt: off
        base = cls(
            vocab_size=32000, embed_dim=1024, num_layers=12, num_heads=16, num_kv_heads=8, head_dim=64, mlp_dim=3072,
            rope_theta=1_000_000.0, num_experts=8, num_experts_per_tok=2, bos_id=1, eos_ids=(2,), pad_id=0,
            param_dtype="bfloat16", dtype="bfloat16",
        )
        # fmt: on
        return base.replace(**changes)


PRESETS = {
    "tiny": ModelConfig.tiny,
    "llama-56m": ModelConfig.llama_56m,
    "llama3-1b": ModelConfig.llama3_1b,
    "gemma2-2b": ModelConfig.gemma2_2b,
    "gemma3-1b": ModelConfig.gemma3_1b,
    "qwen3-0.6b": ModelConfig.qwen3_0_6b,
    "mixtral-1b": ModelConfig.mixtral_1b,
}


def preset(name: str, **changes: Any) -> ModelConfig:
    """A named preset (``tiny``, ``llama-56m``, ``llama3-1b``, ``gemma2-2b``, ``gemma3-1b``,
    ``qwen3-0.6b``, ``mixtral-1b``) with optional field changes."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    return PRESETS[name](**changes)
