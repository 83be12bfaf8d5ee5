"""LLaDA 2.0 MoE: a bidirectional mixture-of-experts transformer trained as a masked diffusion LM.

Architectural choices (those of the released LLaDA2.0-mini / -flash checkpoints, checked against dFactory's
modeling code):

- Bidirectional attention: no causal mask. A ``[B, L]`` keep-mask only hides padded keys; a 4-D
  ``[B, 1, Lq, Lk]`` mask (additive float or boolean keep) expresses block-diffusion or packed sequences.
- Fused ``query_key_value`` projection without bias; its rows are the Q heads, then K heads, then V heads.
- Per-head RMSNorm on Q and K (over ``head_dim``) *before* RoPE.
- Partial rotary embedding: only the first ``head_dim * partial_rotary_factor`` channels of each head rotate
  (rotate-half layout inside that slice, theta 600000); the remaining channels carry no position.
- Grouped-query attention through ``torch.nn.functional.scaled_dot_product_attention`` (``attn_implementation``
  ``"sdpa"``, the default) or the explicit softmax of the scores (``"eager"``: the naive reference the tests compare
  the fast path against).
- Pre-norm residual blocks; every RMSNorm is computed in fp32 and its weight applied after casting back.
- The first ``first_k_dense_replace`` layers use a dense SwiGLU MLP; later layers a sparse MoE block:
  sigmoid router in fp32, experts *selected* by ``score + expert_bias`` with group-limited top-k (groups ranked by
  the sum of their two best biased scores), *weighted* by the unbiased scores normalised to sum 1 and scaled by
  ``routed_scaling_factor``, plus one ungated shared expert. No auxiliary loss.
- Untied ``lm_head``; logits at position i predict the token at position i (no shift: masked diffusion).

Parameter names and shapes equal the released checkpoints (per-expert layout,
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``), so ``save_pretrained`` output reads like a
released folder; dFactory's stacked-expert layout is converted in ``checkpoint.py``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from anyorder_ray.models.llada2_moe.checkpoint import (
    CheckpointLayout,
    SafetensorsCheckpoint,
    detect_folder_layout,
    read_llada2_config,
)
from anyorder_ray.models.llada2_moe.configuration_llada2_moe import LLaDA2MoeConfig
from anyorder_ray.training.objective import masked_cross_entropy


class LLaDA2MoeRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 squares lose too much); the weight multiplies after casting back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rope_inv_freq(config: LLaDA2MoeConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary slice: ``theta ** (-2i / rotary_dims)`` for i < rotary_dims / 2."""
    dim = config.rotary_dims
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (float(config.rope_theta) ** exponents)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """Produces the (cos, sin) tables of the rotary slice for given positions, shared by all layers."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        # Not persistent: derived from the config, and absent from the released checkpoints.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even for bf16 models: positions up to 32k times small frequencies need the mantissa.
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f0..f_{d/2-1}, f0..f_{d/2-1}]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (``[..., head_dim]``); pass the rest through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


def prepare_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Turn the user mask into what SDPA takes, without ever adding a causal constraint.

    - ``None``: full bidirectional attention.
    - ``[B, L]`` keep-mask (1/True = real token): boolean ``[B, 1, 1, L]`` hiding padded *keys* only; padded
      queries still compute something, and callers ignore it (their labels are -100).
    - ``[B|1, 1, Lq, Lk]`` boolean keep-mask or additive float mask (0 = attend, -inf or a large negative = not).

    A query row with no visible key would make softmax NaN; such rows (all padding, or an over-eager 4-D mask) are
    made harmless: boolean rows are opened fully and additive ``-inf`` is clamped to the dtype's minimum, so the
    row gets a finite (meaningless) value instead of poisoning the loss and gradients.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"2-D attention_mask must be [batch, seq] = {[batch, length]}, got {list(attention_mask.shape)}"
            )
        keep = attention_mask.to(torch.bool)
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        return keep[:, None, None, :]
    if attention_mask.dim() == 4:
        b, h, lq, lk = attention_mask.shape
        if b not in (1, batch) or h != 1 or lq != length or lk != length:
            raise ValueError(
                f"4-D attention_mask must be [batch or 1, 1, seq, seq] = [{batch}, 1, {length}, {length}], "
                f"got {list(attention_mask.shape)}"
            )
        if attention_mask.dtype == torch.bool:
            return attention_mask | ~attention_mask.any(dim=-1, keepdim=True)
        if not attention_mask.is_floating_point():
            raise ValueError(f"4-D attention_mask must be bool or floating point, got {attention_mask.dtype}")
        return attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)
    raise ValueError(
        "attention_mask must be [batch, seq] (keep-mask) or [batch, 1, seq, seq] (4-D), "
        f"got {list(attention_mask.shape)}"
    )


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` written out: q ``[B, H, L, D]``, k and v ``[B, H_kv, L, D]`` (GQA: each
    KV head serves ``H / H_kv`` query heads), ``mask`` as ``prepare_attention_mask`` returns it."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


class LLaDA2MoeAttention(nn.Module):
    """Bidirectional GQA with fused QKV, per-head QK RMSNorm and partial RoPE."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config  # read at every call: ``attn_implementation`` may be set after the build
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.use_qkv_bias
        )
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.query_layernorm = self.key_layernorm = None
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(
            bsz, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim
        )
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.query_layernorm is not None:
            q = self.query_layernorm(q)
            k = self.key_layernorm(k)
        cos, sin = position_embeddings  # [B|1, L, rot] -> broadcast over heads
        q = apply_partial_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
        k = apply_partial_rotary(k, cos[:, :, None, :], sin[:, :, None, :])
        dropout = self.attention_dropout if self.training else 0.0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.config._attn_implementation == "eager":
            out = eager_attention(q, k, v, attention_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=False,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # fmt: skip
        return self.dense(out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``; the dense MLP, each routed expert and the shared expert."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router with bias-adjusted, group-limited top-k selection (all in fp32)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            # Load-balancing bias: steers *which* experts are chosen, never how much they weigh. It is updated
            # outside backprop (a buffer), so it is saved with the weights but has no gradient.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, H]`` -> (expert ids ``[T, k]``, combine weights ``[T, k]`` fp32, router logits ``[T, E]`` fp32)."""
        logits = F.linear(hidden_states.to(torch.float32), self.weight.to(torch.float32))
        scores = torch.sigmoid(logits)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.to(torch.float32)
        topk_idx = self.select(choice)
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, weights * self.routed_scaling_factor, logits

    def select(self, choice: torch.Tensor) -> torch.Tensor:
        """Top-k experts restricted to the ``topk_group`` groups whose two best scores sum highest."""
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        masked = grouped.masked_fill(~group_keep[..., None], float("-inf")).view(tokens, self.num_experts)
        return masked.topk(self.top_k, dim=-1, sorted=False).indices


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (per-expert modules, the released layout) plus the ungated shared expert."""

    run_idle_experts: bool = False
    """Also run experts that received no token (on an empty batch), so that every expert gets a gradient, zero
    when idle. Sharded data parallelism (FSDP2) needs it: its reduce-scatter takes the same gradients from every
    rank, and an expert idle on one rank may be busy on another. Off, an idle expert's gradient stays ``None``."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(
            [LLaDA2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        )
        self.shared_experts = (
            LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared) if config.num_shared else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weight, _ = self.gate(x)
        out = self.routed(x, topk_idx, topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Vectorised dispatch: sort the (token, slot) pairs by expert, run each active expert once on its
        contiguous slice, weight, and scatter-add back. The only Python loop is over experts."""
        tokens, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of_slot = order // k
        # Fixed-shape count (bincount's output shape depends on the data, which torch.compile cannot trace);
        # the split sizes then need one host sync per layer, the dispatch's only graph break.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts = counts.index_add_(0, flat_expert, torch.ones_like(flat_expert)).tolist()
        sorted_x = x.index_select(0, token_of_slot)
        outputs = []
        for expert, chunk in zip(self.experts, sorted_x.split(counts), strict=True):
            if chunk.shape[0] or self.run_idle_experts:
                outputs.append(expert(chunk))
        sorted_y = torch.cat(outputs, dim=0)
        # Weighting and accumulation in fp32 like the released code (matters for bf16 models only).
        sorted_y = sorted_y.to(torch.float32) * topk_weight.reshape(-1)[order, None]
        out = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of_slot, sorted_y).to(x.dtype)


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (dense or MoE by layer index)."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        self.mlp = (
            LLaDA2MoeSparseMoeBlock(config)
            if config.is_moe_layer(layer_idx)
            else LLaDA2MoeMLP(config, config.intermediate_size)
        )
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config: LLaDA2MoeConfig
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LLaDA2MoeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)
        elif isinstance(module, LLaDA2MoeRotaryEmbedding):
            # Non-persistent buffer: after a meta-device build or `from_pretrained` it must be recomputed.
            init.copy_(module.inv_freq, rope_inv_freq(self.config, device=module.inv_freq.device))


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The transformer body: embeddings, decoder layers, final norm (``model.*`` in the checkpoints)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [LLaDA2MoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        """``input_ids`` ``[B, L]`` (or ``inputs_embeds``), optional mask (see ``prepare_attention_mask``) and
        ``position_ids`` (``[B, L]`` or ``[L]``; default ``0..L-1``, block diffusion repeats them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, length = hidden_states.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden_states.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None, :]
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype)
        mask = prepare_attention_mask(attention_mask, bsz, length, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """LLaDA 2.0 with its (untied) LM head; ``forward`` returns a ``MaskedLMOutput`` with fp32 logits."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any, **kwargs: Any
    ) -> LLaDA2MoeModelLM:
        """As ``PreTrainedModel.from_pretrained``; in addition a local folder in dFactory's merged-expert layout
        (``model_type: llada2_moe_veomni``) is converted on the fly by ``load_llada2_model``.
        (``AutoModelForMaskedLM`` cannot take that route: ``llada2_moe_veomni`` is not a registered type.)"""
        if detect_folder_layout(pretrained_model_name_or_path) is CheckpointLayout.MERGED:
            unsupported = sorted(set(kwargs) - {"dtype", "torch_dtype", "config"})
            if model_args or unsupported:
                raise ValueError(
                    "loading a merged-expert checkpoint supports only dtype= and config=, "
                    f"got {unsupported or model_args}"
                )
            return load_llada2_model(
                pretrained_model_name_or_path,
                dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
                config=kwargs.get("config"),
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_targets: int | torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Logits ``[B, L, V]`` (fp32) at every position; with ``labels`` (-100 = not a target) also the masked
        cross-entropy of ``anyorder_ray.training.objective.masked_cross_entropy`` (``num_targets`` /
        ``token_weights`` are passed through, e.g. the global target count under data parallelism).

        ``logits_mask`` (``[B, L]`` boolean): compute the LM head only at those positions and return logits ``[N, V]``
        in row-major order (``labels`` / ``token_weights`` are then selected the same way). A masked diffusion LM
        needs logits only at its targets; with a large vocabulary the head is a large share of the compute.

        ``use_cache`` / ``output_router_logits`` exist so dFactory-style calls (which pass ``False``) work: a
        bidirectional model has no KV cache, and router logits are not returned.
        """
        if use_cache or output_router_logits:
            raise ValueError("use_cache and output_router_logits are not supported (bidirectional model)")
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        if logits_mask is not None:
            hidden = hidden[logits_mask]
            labels = labels[logits_mask] if labels is not None else None
            token_weights = token_weights[logits_mask] if token_weights is not None else None
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = masked_cross_entropy(logits, labels, num_targets=num_targets, token_weights=token_weights)
        return MaskedLMOutput(loss=loss, logits=logits)


def compile_regions(model: LLaDA2MoeModelLM) -> LLaDA2MoeModelLM:
    """Regional ``torch.compile``, in place: every decoder layer's attention and norms and every dense SwiGLU (the
    dense MLP, each routed expert, the shared expert), each on its own with dynamic shapes (bucketed batches change
    length every step; an expert's token count changes every call). The MoE's routing and dispatch stay eager: its
    split sizes are data, which would break a whole-model graph and recompile it per expert load. Parameter names are
    unchanged (``nn.Module.compile`` keeps the module), so checkpoints read and write as eager ones."""
    for layer in model.model.layers:
        for region in (layer.attention, layer.input_layernorm, layer.post_attention_layernorm):
            region.compile(dynamic=True)
    for module in model.modules():
        if isinstance(module, LLaDA2MoeMLP):
            module.compile(dynamic=True)
    return model


def load_llada2_model(
    folder: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    config: LLaDA2MoeConfig | None = None,
) -> torch.nn.Module:
    """Build ``LLaDA2MoeModelLM`` from a per-expert or merged folder without a random init.

    The model is created on the ``meta`` device, checkpoint tensors are checked against it (names and shapes)
    and then assigned. ``dtype``: ``None`` -> fp32 (as ``from_pretrained``), ``"auto"`` -> the checkpoint's dtype,
    or a torch dtype. ``strict`` raises on missing or unexpected keys (shape mismatches always raise).
    ``config`` replaces the folder's ``config.json`` (which must still name a LLaDA 2.0 model type).
    """
    folder_config = read_llada2_config(folder)
    config = config or folder_config
    checkpoint = SafetensorsCheckpoint.open(folder)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    cast_to = torch.float32 if dtype is None else (None if dtype == "auto" else dtype)

    loaded: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in checkpoint.per_expert_items(config):
        if key in expected and tuple(tensor.shape) != tuple(expected[key]):
            mismatched.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[key])}")
            continue
        if cast_to is not None and tensor.is_floating_point():
            tensor = tensor.to(cast_to)
        loaded[key] = tensor.to(device)
    if mismatched:
        raise ValueError(
            f"shape mismatch between {folder} and its config.json ({len(mismatched)} tensors): "
            + "; ".join(sorted(mismatched)[:10])
        )
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {folder} does not match LLaDA2MoeModelLM: {len(missing)} missing keys "
            f"{missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}"
        )
    if missing:
        # Non-strict with gaps: materialise and randomly initialise everything, then copy what was loaded.
        model.to_empty(device=device)
        if cast_to is not None:
            model.to(cast_to)
        model.apply(model._init_weights)
        model.load_state_dict({k: v for k, v in loaded.items() if k in expected}, strict=False)
    else:
        # Every tensor present: adopt the loaded storage directly (no second copy of the model in memory).
        model.load_state_dict({k: v for k, v in loaded.items() if k in expected}, strict=True, assign=True)
    rotary = model.model.rotary_emb
    rotary.register_buffer("inv_freq", rope_inv_freq(config, device=device), persistent=False)
    model.eval()
    return model


__all__ = [
    "LLaDA2MoeAttention",
    "LLaDA2MoeDecoderLayer",
    "LLaDA2MoeGate",
    "LLaDA2MoeMLP",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDA2MoePreTrainedModel",
    "LLaDA2MoeRMSNorm",
    "LLaDA2MoeRotaryEmbedding",
    "LLaDA2MoeSparseMoeBlock",
    "apply_partial_rotary",
    "load_llada2_model",
    "prepare_attention_mask",
    "rope_inv_freq",
    "rotate_half",
]
