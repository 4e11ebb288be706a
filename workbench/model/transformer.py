"""The decoder-only Transformer: embed -> N x (attention + gated MLP, pre-RMSNorm; Gemma adds a
norm after each too) -> norm -> logits (soft-capped for Gemma 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from workbench.model import kernels, quant
from workbench.model.attention import Attention
from workbench.model.config import ModelConfig
from workbench.model.layers import MLP, Embed, RMSNorm, Rotary, param
from workbench.model.lora import LoraSpec
from workbench.model.moe import MoE
from workbench.model.scan import run_layers, stack_model_layers


class Block(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        cache: tuple[int, int] | None,
        attention_kernels: str,
        lora_spec: LoraSpec | None = None,
        layer: int = 0,
    ):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(
            config, rngs=rngs, cache=cache, attention_kernels=attention_kernels, lora_spec=lora_spec, layer=layer
        )
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        if config.sparse(layer):  # a mixture of experts (model/moe.py)
            if lora_spec is not None and set(lora_spec.targets) & {"gate", "up", "down"}:
                raise ValueError("LoRA adapters on the MLP (gate, up, down) of a mixture of experts are not supported")
            self.mlp = MoE(config, rngs=rngs, kernels=attention_kernels)
        else:
            self.mlp = MLP(config, rngs=rngs, lora_spec=lora_spec)
        if config.post_norms:  # Gemma's sandwich: each sublayer's output normed before the residual add
            self.post_attn_norm = RMSNorm(config, rngs=rngs)
            self.post_mlp_norm = RMSNorm(config, rngs=rngs)
        self.post_norms = config.post_norms

    def _attn(self, x, positions, rope, hooks=None, **rows) -> jax.Array:
        out = self.attn(self.attn_norm(x), positions, rope, hooks, **rows)
        return self.post_attn_norm(out) if self.post_norms else out

    def _mlp(self, x, adapters, hooks=None) -> jax.Array:
        routed = () if hooks is None or not isinstance(self.mlp, MoE) else (hooks,)  # probes see the router
        out = self.mlp(self.mlp_norm(x), adapters, *routed)
        return self.post_mlp_norm(out) if self.post_norms else out

    def __call__(
        self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array], hooks=None, **rows
    ) -> jax.Array:
        # rows: the optional per-row inputs (segments, adapters) Attention documents
        if hooks is not None:  # probes (workbench.model.hooks): patch, steer and record at each site
            x = x + hooks.site(self, "attn_out", self._attn(x, positions, rope, hooks, **rows))
            mlp = self._mlp(x, rows.get("adapters"), hooks)
            return hooks.site(self, "residual", x + hooks.site(self, "mlp_out", mlp))
        x = x + self._attn(x, positions, rope, **rows)
        return x + self._mlp(x, rows.get("adapters"))


class Transformer(nnx.Module):
    """Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 decoder (``ModelConfig`` says which).

    ``cache=(batch, length)`` gives every layer a KV cache of that size (a prefill model has
    batch 1; an autoregressive model has one row per decode slot); ``cache=None`` gives the
    uncached model whose full forward pass is the oracle for every cached path.
    ``attention_kernels``: ``"reference"`` (plain einsums) or ``"xla_cpu"`` (layouts tuned for
    XLA:CPU); see ``model.kernels`` (an engine picks per platform: ``engine.tuning``).
    ``scan_layers``: the blocks stacked on a leading ``layers`` axis and run by one scan
    (``model.scan``; a mixed model in blocks of its layer pattern): the same numbers, a compile
    that does not grow with depth.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        cache: tuple[int, int] | None = None,
        attention_kernels: str = "reference",
        scan_layers: bool = False,
        lora_spec: LoraSpec | None = None,
    ):
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        self.rope = Rotary(config)
        # Gemma 3: sliding layers take a rope of their own (config.layer_rope)
        self.local_rope = Rotary(config, local=True) if config.local_rope_theta is not None else None
        self.layers = nnx.List(
            [
                Block(config, rngs=rngs, cache=cache, attention_kernels=attention_kernels, lora_spec=lora_spec, layer=i)
                for i in range(config.num_layers)
            ]
        )
        if scan_layers:  # every layer's params and cache stacked, [L, ...]; a pattern's by position
            self.layers = stack_model_layers(self.layers, config.layer_period)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(rngs, (config.embed_dim, config.vocab_size), ("embed", "vocab"), config.weight_dtype)
        quant.quantize_model(self, config.quantize)  # a no-op for float weights

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        logits_at: jax.Array | None = None,
        segments: jax.Array | None = None,
        adapters: jax.Array | None = None,
        hooks=None,
    ) -> jax.Array:
        """Logits [B, T, V] in float32 for ``tokens`` [B, T] at absolute ``positions`` [B, T].

        With ``logits_at`` [B] (one index into T per row) only those rows' logits, [B, V]: prefill
        needs just the last prompt token's, and the vocabulary projection of every position would
        be about half of its work. ``logits_at`` [B, M]: M rows each, [B, M, V] (packed prompts).
        ``hooks``: a ``workbench.model.hooks.Hooks`` (probes: capture, interventions).

        ``segments`` [B, T]: several prompts packed in a row (``engine/packing.py``), each token
        attending only to its own prompt and writing its K/V to cache row ``segments``.
        ``adapters`` [B]: each row's LoRA adapter index, -1 for none (a model built with ``lora_spec``).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)  # [B, T, D]
        rope = self.rope(positions)
        ropes = {"global": rope, "local": rope if self.local_rope is None else self.local_rope(positions)}
        rows = dict(segments=segments, adapters=adapters)
        if not isinstance(self.layers, nnx.List):  # scanned layers: the hooks see a traced layer index
            pattern = [ropes[self.config.layer_rope(j)] for j in range(self.config.layer_period)]
            x = run_layers(self.layers, x, positions, pattern, hooks=hooks, **rows)
        else:
            for i, layer in enumerate(self.layers):
                probed = () if hooks is None else (hooks.layer(i),)
                x = layer(x, positions, ropes[self.config.layer_rope(i)], *probed, **rows)
        if logits_at is not None:
            index = logits_at[:, None, None] if logits_at.ndim == 1 else logits_at[:, :, None]
            x = jnp.take_along_axis(x, index, axis=1)  # [B, 1, D] (or [B, M, D])
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = quant.einsum("BTD,DV->BTV", x, self.lm_head, x.dtype)
        logits = kernels.capped(logits.astype(jnp.float32), self.config.final_logit_softcap)
        if hooks is not None and hooks.capture is not None and hooks.capture.logits:
            hooks.record(self, "logits", logits)
        if logits_at is None or logits_at.ndim == 2:
            return logits
        return logits[:, 0]
