"""Configuration of the LLaDA 2.0 MoE masked-diffusion language model.

Field names and meanings follow the released ``config.json`` of inclusionAI/LLaDA2.0-mini / -flash (and the
copies dFactory ships under ``configs/model_configs/``), so a released config loads into this class and a config
saved by this class reads naturally next to them. The defaults are the LLaDA2.0-mini values.

Fields the released file carries but the released modeling code never reads (``embedding_dropout``,
``output_dropout``, ``max_window_layers``, ``use_sliding_window``, ``sliding_window``, ``use_cache``) are kept for
round-tripping only. Values the architecture does not implement (a non-sigmoid router, ``norm_head``, tied
embeddings, RoPE scaling, split-QKV attention) are rejected instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

MODEL_TYPE = "llada2_moe"
# dFactory (VeOmni) marks checkpoints whose experts are stacked per layer with this model_type.
MERGED_MODEL_TYPE = "llada2_moe_veomni"


class LLaDA2MoeConfig(PreTrainedConfig):
    """LLaDA 2.0 MoE configuration (defaults: LLaDA2.0-mini).

    Attention: fused QKV, ``num_attention_heads`` query heads and ``num_key_value_heads`` key/value heads of
    ``head_dim`` each, per-head RMSNorm on Q and K, rotary embedding on the first
    ``head_dim * partial_rotary_factor`` channels of every head. MLP: dense SwiGLU of ``intermediate_size`` in the
    first ``first_k_dense_replace`` layers, then ``num_experts`` routed SwiGLU experts of ``moe_intermediate_size``
    (``num_experts_per_tok`` active, chosen within ``topk_group`` of ``n_group`` groups) plus
    ``num_shared_experts`` always-on experts fused into one MLP of ``moe_intermediate_size * num_shared_experts``.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-6
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None
    use_cache: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    pad_token_id: int | None = 156892
    eos_token_id: int | None = 156892
    mask_token_id: int | None = 156895
    num_experts: int = 256
    num_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    router_dtype: str = "fp32"
    moe_router_enable_expert_bias: bool = True
    output_router_logits: bool = False
    using_split_qkv_in_self_attention: bool = False
    norm_softmax: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # The released config.json says `"rope_scaling": null`; only plain RoPE exists in this architecture, so a
        # non-null value is an error rather than something to hand to transformers' RoPE standardisation.
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:
            raise ValueError(f"LLaDA2MoeConfig supports only plain RoPE (rope_scaling=null), got {rope_scaling!r}")
        # dFactory's configuration class treats 0 / None as "one KV head per query head".
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    # --- derived values ---------------------------------------------------------------------------------------
    @property
    def rotary_dims(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through unchanged)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_shared(self) -> int:
        return int(self.num_shared_experts or 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` uses the sparse MoE block (else the dense SwiGLU MLP)."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_replace

    # --- validation -------------------------------------------------------------------------------------------
    def _check(self) -> None:
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        if problems:  # the checks below do arithmetic on these
            raise ValueError("invalid LLaDA2MoeConfig: " + "; ".join(problems))

        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({self.num_key_value_heads}) for grouped-query attention",
        )
        rot = self.rotary_dims
        need(
            0 < rot <= self.head_dim and rot % 2 == 0,
            f"head_dim * partial_rotary_factor must be an even number in (0, head_dim], got {rot}",
        )
        need(
            self.rotary_dim is None or self.rotary_dim == rot,
            f"rotary_dim ({self.rotary_dim}) disagrees with head_dim * partial_rotary_factor ({rot})",
        )
        need(self.hidden_act in ACT2FN, f"hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
            f"got {self.first_k_dense_replace}",
        )
        need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            need(
                self.moe_intermediate_size > 0,
                f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}",
            )
            need(
                self.n_group > 0 and self.num_experts % self.n_group == 0,
                f"num_experts ({self.num_experts}) must be a positive multiple of n_group ({self.n_group})",
            )
            per_group = self.num_experts // max(self.n_group, 1)
            # A group's score is the sum of its two best experts, so each group needs at least two.
            need(per_group >= 2, f"each expert group needs >= 2 experts, got {per_group}")
            need(
                1 <= self.topk_group <= self.n_group,
                f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}",
            )
            need(
                1 <= self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok must be in [1, topk_group * experts_per_group = "
                f"{self.topk_group * per_group}], got {self.num_experts_per_tok}",
            )
            need(self.num_shared >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        need(
            self.score_function == "sigmoid",
            f"score_function must be 'sigmoid' (the released router), got {self.score_function!r}",
        )
        need(
            self.router_dtype in ("fp32", "float32"),
            f"router_dtype must be 'fp32' (the router always runs in fp32), got {self.router_dtype!r}",
        )
        need(not self.norm_head, "norm_head=True is not part of the released architecture")
        need(not self.tie_word_embeddings, "LLaDA 2.0 has an untied lm_head: tie_word_embeddings must be False")
        need(
            not self.using_split_qkv_in_self_attention,
            "using_split_qkv_in_self_attention=True is not supported (the released checkpoints use fused QKV)",
        )
        need(
            0.0 <= self.attention_dropout < 1.0,
            f"attention_dropout must be in [0, 1), got {self.attention_dropout}",
        )
        for name in ("pad_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            need(
                value is None or (isinstance(value, int) and 0 <= value < self.vocab_size),
                f"{name} must be None or in [0, vocab_size={self.vocab_size}), got {value!r}",
            )
        if problems:
            raise ValueError("invalid LLaDA2MoeConfig: " + "; ".join(problems))


__all__ = ["MERGED_MODEL_TYPE", "MODEL_TYPE", "LLaDA2MoeConfig"]
