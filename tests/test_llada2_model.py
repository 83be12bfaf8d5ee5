"""LLaDA 2.0 MoE model: invariances, parity of fast paths with naive references, training sanity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anyorder_ray.models.llada2_moe import LLaDA2MoeConfig, LLaDA2MoeModelLM, llada2_config
from anyorder_ray.models.llada2_moe.modeling_llada2_moe import (
    LLaDA2MoeAttention,
    LLaDA2MoeGate,
    LLaDA2MoeMLP,
    LLaDA2MoeRotaryEmbedding,
    LLaDA2MoeSparseMoeBlock,
    apply_partial_rotary,
)
from anyorder_ray.training.objective import IGNORE_INDEX, masked_cross_entropy

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**overrides) -> LLaDA2MoeConfig:
    return llada2_config("tiny", vocab_size=VOCAB, **overrides)


def _model(seed: int = 0, **overrides) -> LLaDA2MoeModelLM:
    torch.manual_seed(seed)
    return LLaDA2MoeModelLM(_tiny(**overrides)).eval()


def _ids(batch: int, length: int, seed: int = 1, high: int = VOCAB - 2) -> torch.Tensor:
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- presets and configuration ----------------------------------------------------------------------------------
def test_tiny_preset_exercises_every_code_path_at_small_size() -> None:
    config = llada2_config("tiny", vocab_size=400)
    model = LLaDA2MoeModelLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= params <= 4_000_000
    layers = model.model.layers
    assert len(layers) >= 2 and config.first_k_dense_replace == 1
    assert isinstance(layers[0].mlp, LLaDA2MoeMLP)
    for layer in layers[1:]:
        moe = layer.mlp
        assert isinstance(moe, LLaDA2MoeSparseMoeBlock)
        assert moe.shared_experts is not None and moe.gate.expert_bias is not None
    assert 1 < config.topk_group < config.n_group  # group limiting actually restricts
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert 0 < config.rotary_dims < config.head_dim  # partial rotary
    assert (config.mask_token_id, config.pad_token_id) == (399, 398)


def test_presets_and_overrides_are_validated() -> None:
    with pytest.raises(ValueError, match=r"allowed: \['flash', 'mini', 'tiny'\]"):
        llada2_config("small")
    with pytest.raises(ValueError, match="hiden_size"):
        llada2_config("tiny", hiden_size=64)
    with pytest.raises(ValueError, match="mask_token_id"):
        llada2_config("mini", vocab_size=1000)  # released special ids fall outside a 1000-token vocabulary
    for bad in ({"norm_head": True}, {"score_function": "softmax"}, {"tie_word_embeddings": True}):
        with pytest.raises(ValueError):
            _tiny(**bad)
    with pytest.raises(ValueError, match="n_group"):
        _tiny(num_experts=6)
    with pytest.raises(ValueError, match="rope_scaling"):
        LLaDA2MoeConfig(rope_scaling={"type": "linear", "factor": 2.0})


# --- attention: bidirectionality, padding, masks ----------------------------------------------------------------
def test_bidirectional_a_late_token_changes_early_logits() -> None:
    model = _model()
    ids = _ids(1, 12)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % (VOCAB - 2)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
    earlier = ids.clone()
    earlier[0, 0] = (ids[0, 0] + 1) % (VOCAB - 2)
    with torch.no_grad():
        c = model(earlier).logits
    assert (a[0, -1] - c[0, -1]).abs().max() > 1e-4


def test_right_padding_does_not_change_real_token_logits() -> None:
    model = _model()
    config = model.config
    ids = _ids(1, 10)
    padded = torch.cat([ids, torch.full((1, 6), config.pad_token_id)], dim=1)
    keep = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    other_padding = padded.clone()
    other_padding[0, 10:] = _ids(1, 6, seed=7)[0]  # what sits in padded slots must not matter either
    with torch.no_grad():
        plain = model(ids).logits
        with_pad = model(padded, attention_mask=keep).logits
        with_other = model(other_padding, attention_mask=keep).logits
    torch.testing.assert_close(with_pad[:, :10], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_other[:, :10], plain, rtol=1e-5, atol=1e-5)
    # Without the mask the padding is attended to and the logits do move (the test can fail).
    with torch.no_grad():
        unmasked = model(padded).logits
    assert (unmasked[:, :10] - plain).abs().max() > 1e-4


def test_left_padding_with_shifted_positions_and_ragged_batch() -> None:
    model = _model()
    short, long = _ids(1, 7, seed=2), _ids(1, 11, seed=3)
    pad = model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long], 0)
    keep = torch.ones(2, 11, dtype=torch.long)
    keep[0, :4] = 0
    positions = torch.stack([torch.clamp(torch.arange(11) - 4, min=0), torch.arange(11)])
    with torch.no_grad():
        out = model(batch, attention_mask=keep, position_ids=positions).logits
        ref_short, ref_long = model(short).logits, model(long).logits
    torch.testing.assert_close(out[0:1, 4:], ref_short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2], ref_long, rtol=1e-5, atol=1e-5)


def _block_diagonal(lengths: list[int]) -> torch.Tensor:
    total = sum(lengths)
    keep = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        keep[start : start + n, start : start + n] = True
        start += n
    return keep


def test_packed_sequences_with_4d_masks_equal_separate_runs() -> None:
    model = _model()
    first, second = _ids(1, 6, seed=4), _ids(1, 9, seed=5)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    keep = _block_diagonal([6, 9])[None, None]
    additive = torch.zeros(1, 1, 15, 15).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        ref = torch.cat([model(first).logits, model(second).logits], dim=1)
        via_bool = model(packed, attention_mask=keep, position_ids=positions).logits
        via_additive = model(packed, attention_mask=additive, position_ids=positions).logits
    torch.testing.assert_close(via_bool, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_additive, ref, rtol=1e-5, atol=1e-5)


def test_4d_masks_agree_with_the_2d_keep_mask_and_never_nan() -> None:
    model = _model()
    ids = _ids(2, 8)
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[1, 5:] = 0
    four_d = keep.bool()[:, None, None, :].expand(2, 1, 8, 8)
    with torch.no_grad():
        two = model(ids, attention_mask=keep).logits
        four = model(ids, attention_mask=four_d).logits
        fully_masked = model(ids, attention_mask=torch.zeros(2, 8, dtype=torch.long)).logits
        neg_inf = model(ids, attention_mask=torch.full((2, 1, 8, 8), float("-inf"))).logits
    torch.testing.assert_close(two, four)
    assert torch.isfinite(fully_masked).all() and torch.isfinite(neg_inf).all()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 8))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate_pairs(x: torch.Tensor, pos: torch.Tensor, rot: int, theta: float) -> torch.Tensor:
    """Explicit 2-D rotation of channel pairs (i, i + rot/2), i < rot/2, by pos * theta^(-2i/rot)."""
    out = x.clone()
    half = rot // 2
    for i in range(half):
        angle = pos.double() * theta ** (-2 * i / rot)
        c, s = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = a * s + b * c
    return out


def test_attention_matches_a_naive_reference() -> None:
    """Fused QKV row order (Q heads, K heads, V heads), QK RMSNorm before RoPE, partial RoPE, GQA grouping."""
    torch.manual_seed(0)
    config = _tiny()
    attn = LLaDA2MoeAttention(config, layer_idx=0).eval()
    for norm in (attn.query_layernorm, attn.key_layernorm):
        norm.weight.data.uniform_(0.5, 1.5)
    rotary = LLaDA2MoeRotaryEmbedding(config)
    batch, length = 2, 7
    x = torch.randn(batch, length, config.hidden_size)
    positions = torch.arange(length)[None].expand(batch, -1)
    with torch.no_grad():
        fast = attn(x, rotary(positions, x.dtype))

        nq, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        w = attn.query_key_value.weight
        wq, wk, wv = w[: nq * d], w[nq * d : (nq + nkv) * d], w[(nq + nkv) * d :]
        heads = []
        for h in range(nq):
            g = h // (nq // nkv)  # query head h reads key/value head h // group_size
            q = _rms(x @ wq[h * d : (h + 1) * d].T, attn.query_layernorm.weight, config.rms_norm_eps)
            k = _rms(x @ wk[g * d : (g + 1) * d].T, attn.key_layernorm.weight, config.rms_norm_eps)
            v = x @ wv[g * d : (g + 1) * d].T
            q = _rotate_pairs(q, positions, config.rotary_dims, config.rope_theta)
            k = _rotate_pairs(k, positions, config.rotary_dims, config.rope_theta)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            heads.append(probs @ v)
        ref = attn.dense(torch.cat(heads, dim=-1))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_eager_attention_equals_sdpa_with_padding_and_4d_masks() -> None:
    """``attn_implementation: eager`` (the explicit softmax) and ``sdpa`` give the same logits and gradients, with a
    padded batch and with a packed 4-D mask; the choice is read at call time, so it can be set after the build."""
    model = _model()
    ids = _ids(2, 9)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, 6:] = 0
    block = _block_diagonal([4, 5])[None, None]
    positions = torch.cat([torch.arange(4), torch.arange(5)])[None]
    results = {}
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        model.zero_grad(set_to_none=True)
        padded = model(ids, attention_mask=keep).logits
        packed = model(ids[:1], attention_mask=block, position_ids=positions).logits
        (padded[keep.bool()].square().mean() + packed.square().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[implementation] = (padded[keep.bool()].detach(), packed.detach(), grads)
    (sdpa_pad, sdpa_packed, sdpa_grads), (eager_pad, eager_packed, eager_grads) = results["sdpa"], results["eager"]
    torch.testing.assert_close(eager_pad, sdpa_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager_packed, sdpa_packed, rtol=1e-5, atol=1e-5)
    assert len(eager_grads) == len(sdpa_grads) > 10
    for a, b in zip(eager_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.config._attn_implementation = "sdpa"


def test_logits_mask_computes_the_head_at_the_targets_only() -> None:
    model = _model()
    ids, labels = _ids(2, 9), torch.full((2, 9), -100)
    labels[0, 2], labels[1, [0, 5, 8]] = 3, torch.tensor([4, 5, 6])
    mask = labels != -100
    with torch.no_grad():
        full = model(ids, labels=labels)
        some = model(ids, labels=labels, logits_mask=mask)
    assert some.logits.shape == (4, full.logits.shape[-1])
    torch.testing.assert_close(some.logits, full.logits[mask])
    torch.testing.assert_close(some.loss, full.loss)


def test_the_model_config_key_selects_the_attention_implementation() -> None:
    from anyorder_ray.config import ModelConfig
    from anyorder_ray.models.factory import build_model, build_tokenizer
    from envs import EnvConfig

    cfg = ModelConfig(attn_implementation="eager", overrides={"num_hidden_layers": 2})
    model = build_model(cfg, build_tokenizer(cfg, EnvConfig()), seed=0)
    assert model.config._attn_implementation == "eager"
    assert all(layer.attention.config._attn_implementation == "eager" for layer in model.model.layers)


# --- partial rotary embedding ----------------------------------------------------------------------------------
def test_partial_rope_rotates_only_the_rotary_slice() -> None:
    config = _tiny()
    rotary = LLaDA2MoeRotaryEmbedding(config)
    rot = config.rotary_dims
    x = torch.randn(1, 5, 1, config.head_dim)
    cos, sin = rotary(torch.arange(5)[None], torch.float32)
    y = apply_partial_rotary(x, cos[:, :, None], sin[:, :, None])
    torch.testing.assert_close(y[..., rot:], x[..., rot:], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is the identity
    assert (y[:, 1:, :, :rot] - x[:, 1:, :, :rot]).abs().amax(dim=(-1, -2)).min() > 1e-3
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_partial_rope_scores_depend_on_relative_position_only() -> None:
    config = _tiny()
    rotary = LLaDA2MoeRotaryEmbedding(config)
    q, k = torch.randn(config.head_dim), torch.randn(config.head_dim)

    def score(pq: int, pk: int) -> torch.Tensor:
        cos, sin = rotary(torch.tensor([[pq, pk]]), torch.float64)
        rq = apply_partial_rotary(q.double(), cos[0, 0], sin[0, 0])
        rk = apply_partial_rotary(k.double(), cos[0, 1], sin[0, 1])
        return rq @ rk

    for offset in (0, 3, -5):
        base = score(10, 10 - offset)
        for shift in (1, 50, 1234):
            # Angles are computed in fp32 (as released), so equality holds to fp32 precision of the angle.
            torch.testing.assert_close(score(10 + shift, 10 - offset + shift), base, rtol=1e-5, atol=1e-5)
    assert abs(score(10, 7) - score(10, 9)) > 1e-3  # and it does depend on the offset


# --- MoE routing and dispatch ----------------------------------------------------------------------------------
def _naive_moe(block: LLaDA2MoeSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: route, run each selected expert on that one token, weight, add the shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    idx, weights, _ = block.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(idx.shape[1]):
            out[t] += weights[t, slot] * block.experts[int(idx[t, slot])](flat[t : t + 1])[0]
        out[t] += block.shared_experts(flat[t : t + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("tokens", [3, 40])  # 3 tokens leave most experts idle; 40 reach all of them
def test_vectorised_moe_dispatch_equals_naive_per_token_reference(tokens: int) -> None:
    torch.manual_seed(tokens)
    config = _tiny()
    block = LLaDA2MoeSparseMoeBlock(config)
    for p in block.parameters():  # 1/sqrt(fan_in): O(1) outputs, so a tight absolute tolerance is meaningful
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    torch.nn.init.normal_(block.gate.weight, std=0.1)  # router logits spread ~1.4: varied selections
    block.gate.expert_bias.normal_(std=0.2)
    x = torch.randn(1, tokens, config.hidden_size)
    with torch.no_grad():
        fast, naive = block(x), _naive_moe(block, x)
    assert naive.abs().max() > 0.5
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    # Gradients flow to every expert that received tokens, and only to those.
    block(x).sum().backward()
    used = set(block.gate(x.reshape(-1, x.shape[-1]))[0].flatten().tolist())
    for e, expert in enumerate(block.experts):
        assert (expert.up_proj.weight.grad is not None) == (e in used)
    # With run_idle_experts (sharded training) every expert gets a gradient: zero when it had no token.
    block.zero_grad(set_to_none=True)
    block.run_idle_experts = True
    out = block(x)
    torch.testing.assert_close(out, fast, rtol=0, atol=0)
    out.sum().backward()
    for e, expert in enumerate(block.experts):
        assert expert.up_proj.weight.grad is not None
        assert (float(expert.up_proj.weight.grad.abs().sum()) > 0) == (e in used)


def test_router_selects_within_the_best_groups() -> None:
    """Brute force: groups ranked by the sum of their two best biased scores, top-k experts inside the
    topk_group best groups; weights from unbiased scores, normalised, times routed_scaling_factor."""
    torch.manual_seed(0)
    config = _tiny()
    gate = LLaDA2MoeGate(config)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.expert_bias.normal_(std=0.3)
    x = torch.randn(64, config.hidden_size)
    idx, weights, logits = gate(x)
    per_group = config.num_experts // config.n_group
    for t in range(x.shape[0]):
        scores = torch.sigmoid(x[t] @ gate.weight.T)
        biased = scores + gate.expert_bias
        group_score = [sorted(biased[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(config.n_group)]
        best_groups = sorted(range(config.n_group), key=lambda g: -sum(group_score[g]))[: config.topk_group]
        allowed = [e for e in range(config.num_experts) if e // per_group in best_groups]
        expected = sorted(sorted(allowed, key=lambda e: -biased[e].item())[: config.num_experts_per_tok])
        assert sorted(idx[t].tolist()) == expected
        chosen = scores[idx[t]]
        torch.testing.assert_close(weights[t], chosen / chosen.sum() * config.routed_scaling_factor)
    assert logits.dtype == torch.float32


def test_expert_bias_changes_selection_but_not_combine_weights() -> None:
    torch.manual_seed(1)
    config = _tiny()
    gate = LLaDA2MoeGate(config)
    torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(32, config.hidden_size)
    favoured = 5
    idx_before, _, _ = gate(x)
    assert not (idx_before == favoured).any(dim=1).all()  # not chosen for every token without the bias
    gate.expert_bias[favoured] = 10.0  # larger than any sigmoid gap
    idx, weights, _ = gate(x)
    assert (idx == favoured).any(dim=1).all()
    scores = torch.sigmoid(x @ gate.weight.T)
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * config.routed_scaling_factor)
    # Had the bias leaked into the weights, the favoured expert would dominate every token's mix.
    slot = (idx == favoured).float().argmax(dim=1)
    assert weights.gather(1, slot[:, None]).max() < config.routed_scaling_factor * 0.9


# --- whole model ------------------------------------------------------------------------------------------------
def test_forward_loss_is_the_masked_objective() -> None:
    model = _model()
    ids = _ids(2, 10)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::3] = ids[:, ::3]
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 10, VOCAB) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.loss, masked_cross_entropy(out.logits, labels))
    torch.testing.assert_close(
        model(ids, labels=labels, num_targets=2).loss, masked_cross_entropy(out.logits, labels, 2)
    )


def test_variants_without_moe_or_shared_expert_or_qk_norm_run() -> None:
    for overrides in (
        {"first_k_dense_replace": 3},
        {"num_shared_experts": 0},
        {"use_qk_norm": False},
        {"use_qkv_bias": True, "use_bias": True},
    ):
        model = _model(**overrides)
        out = model(_ids(1, 5))
        assert torch.isfinite(out.logits).all(), overrides
    names = dict(_model(num_shared_experts=0).named_parameters())
    assert not any("shared_experts" in n for n in names)


def test_gradient_checkpointing_gives_identical_gradients() -> None:
    ids = _ids(2, 12)
    labels = torch.where(torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) < 0.5, ids, IGNORE_INDEX)
    labels[:, 0] = ids[:, 0]
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_forward_backward_close_to_fp32() -> None:
    model = _model()
    ids = _ids(2, 8)
    labels = ids.clone()
    with torch.no_grad():
        ref = model(ids).logits
    model = model.to(torch.bfloat16).train()
    out = model(ids, labels=labels)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.model.layers[1].mlp.gate.weight.grad.dtype == torch.bfloat16
    assert (out.logits.detach() - ref).abs().max() < 0.1 * ref.abs().max()


def test_rmsnorm_is_computed_in_fp32() -> None:
    from anyorder_ray.models.llada2_moe.modeling_llada2_moe import LLaDA2MoeRMSNorm

    norm = LLaDA2MoeRMSNorm(8).to(torch.bfloat16)
    x = (torch.randn(4, 8) * 300).to(torch.bfloat16)  # squares overflow bf16's precision, not fp32's
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def test_tiny_model_overfits_a_handful_of_masked_sequences() -> None:
    torch.manual_seed(0)
    config = llada2_config("tiny", vocab_size=VOCAB)
    model = LLaDA2MoeModelLM(config).train()
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, VOCAB - 2, (4, 24), generator=gen)
    masked = torch.rand(4, 24, generator=gen) < 0.4
    masked[:, 0] = True
    inputs = torch.where(masked, torch.full_like(clean, config.mask_token_id), clean)
    labels = torch.where(masked, clean, torch.full_like(clean, IGNORE_INDEX))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(VOCAB)  # starts near chance
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_logits_head_is_untied_and_predicts_in_place() -> None:
    model = _model()
    assert model.lm_head.weight.data_ptr() != model.model.word_embeddings.weight.data_ptr()
    # No shift: the logits at position i depend on the head applied to hidden state i.
    ids = _ids(1, 6)
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits, F.linear(hidden, model.lm_head.weight).float())
