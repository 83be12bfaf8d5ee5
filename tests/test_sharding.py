"""FSDP2 sharded training (``anyorder_ray.training.sharding``) in one process: a single-rank gloo group exercises the
same code as a multi-rank one (meta build, shard loading, DCP checkpoints, export); the 2-rank runs under Ray's
TorchTrainer are in ``test_sharding_ray.py``."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from helpers import expert_trajectories
from test_train_parts import SMALL
from torch.distributed.tensor import DTensor

from anyorder_ray.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig
from anyorder_ray.data.batching import BatchMaker
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM, load_llada2_model, save_llada2_checkpoint
from anyorder_ray.training.checkpoint import TrainingState, is_complete_checkpoint
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step
from anyorder_ray.training.sharding import (
    build_sharded_model,
    export_hf_checkpoint,
    gradient_sync,
    is_sharded,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    mixed_precision_policy,
    save_sharded_checkpoint,
)
from envs import EnvConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def group(one_torch_thread):
    """A one-rank gloo process group for this module only (other modules expect none)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(group):
    tokenizer = build_tokenizer(ModelConfig(), EnvConfig())
    maker = BatchMaker(DataConfig(), MaskingConfig("any_order", 0.5), UnitEncoder(tokenizer), tokenizer.pad_token_id,
                       seed=0)  # fmt: skip
    trajectories = expert_trajectories("GoToRedBallGrey", range(12))
    micro = [maker.micro_batch(trajectories[i : i + 3]) for i in range(0, 12, 3)]
    return tokenizer, micro


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(model, micro, steps: int, optimizer=None, scheduler=None):
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, TrainConfig(lr=3e-3, max_steps=10, lr_warmup_ratio=0.0))
    losses = [train_step(model, optimizer, scheduler, micro, 1.0, CPU).loss for _ in range(steps)]
    return losses, optimizer, scheduler


def test_mixed_precision_is_bf16_with_fp32_reduction_on_gpu_only(caplog):
    gpu = mixed_precision_policy(True, torch.device("cuda"))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(False, torch.device("cuda")).param_dtype is None
    with caplog.at_level(logging.WARNING):
        cpu = mixed_precision_policy(True, CPU)
    assert cpu.param_dtype is None and "ignored on CPU" in caplog.text


def test_gradient_sync_uses_no_sync_of_a_ddp_style_wrapper():
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)

        def no_sync(self):
            calls.append("no_sync")
            return torch.enable_grad()

    with gradient_sync(Wrapper(), enabled=False):
        pass
    with gradient_sync(Wrapper(), enabled=True), gradient_sync(torch.nn.Linear(2, 2), enabled=False):
        pass
    assert calls == ["no_sync"]


def test_sharded_preset_starts_from_the_unsharded_init(world):
    tokenizer, micro = world
    cfg = ModelConfig(overrides=SMALL)
    sharded = build_sharded_model(cfg, tokenizer, CPU, seed=3)
    plain = build_model(cfg, tokenizer, seed=3)
    assert is_sharded(sharded) and not is_sharded(plain)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    assert not any(p.is_meta for p in sharded.parameters())
    torch.testing.assert_close(_logits(sharded, micro[0]), _logits(plain, micro[0]), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["per_expert", "merged"])
def test_sharded_build_loads_model_path_in_either_layout(world, tmp_path, layout):
    tokenizer, micro = world
    source = build_model(ModelConfig(overrides=SMALL), tokenizer, seed=7)
    with torch.no_grad():  # a non-zero expert bias (a buffer), so that losing it would show in the logits
        source.model.layers[1].mlp.gate.expert_bias.normal_(std=0.5)
    save_llada2_checkpoint(source, tmp_path, layout=layout, max_shard_bytes=40_000)
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1

    from anyorder_ray.training.sharding import load_local_shards

    cfg = ModelConfig(model_path=str(tmp_path))
    sharded = build_sharded_model(cfg, tokenizer, CPU, seed=0)
    torch.testing.assert_close(_logits(sharded, micro[0]), _logits(source, micro[0]), rtol=0, atol=0)
    # One rank holds everything: it read exactly the model once, nothing twice.
    assert load_local_shards(sharded, tmp_path) == sum(t.numel() for t in source.state_dict().values())


def test_sharded_training_with_accumulation_and_checkpointing_equals_plain(world):
    tokenizer, micro = world
    cfg = ModelConfig(overrides=SMALL)
    sharded = build_sharded_model(cfg, tokenizer, CPU, seed=0, activation_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in sharded.model.layers)
    plain = build_model(cfg, tokenizer, seed=0)
    sharded_losses, _, _ = _train(sharded, micro, 3)
    plain_losses, _, _ = _train(plain, micro, 3)
    assert sharded_losses == pytest.approx(plain_losses, rel=1e-5)
    assert sharded_losses[-1] < sharded_losses[0]
    torch.testing.assert_close(_logits(sharded, micro[0]), _logits(plain, micro[0]), rtol=1e-4, atol=1e-5)


def test_every_expert_gets_a_gradient_on_every_rank_even_when_idle(world):
    """FSDP2 reduce-scatters a layer's gradients as one collective: a rank that sent no token to an expert must
    still contribute (zeros), or the ranks' collectives disagree in size."""
    tokenizer, micro = world
    model = build_sharded_model(ModelConfig(overrides=SMALL), tokenizer, CPU, seed=0)
    ids = micro[0]["input_ids"][:1, :2]  # 2 tokens x top-2: most of the 8 experts stay idle
    model(input_ids=ids).logits.sum().backward()
    experts = model.model.layers[1].mlp.experts
    grads = [e.up_proj.weight.grad for e in experts]
    assert all(g is not None for g in grads)
    assert any(float(g.full_tensor().abs().sum()) == 0 for g in grads)  # idle ones: exactly zero
    model.zero_grad(set_to_none=True)


def test_sharded_checkpoint_resumes_and_exports_a_loadable_hf_folder(world, tmp_path):
    tokenizer, micro = world
    cfg = ModelConfig(overrides=SMALL)
    model = build_sharded_model(cfg, tokenizer, CPU, seed=0)
    _, optimizer, scheduler = _train(model, micro, 2)
    state = TrainingState(2, {}, scheduler.state_dict(), ())
    path = save_sharded_checkpoint(tmp_path / "ckpt", model, optimizer, tokenizer, state)
    assert is_sharded_checkpoint(path) and is_complete_checkpoint(path)
    expected, _, _ = _train(model, micro, 2, optimizer, scheduler)

    fresh = build_sharded_model(cfg, tokenizer, CPU, seed=99)
    fresh_opt, fresh_sched = make_optimizer(fresh, TrainConfig(lr=3e-3, max_steps=10, lr_warmup_ratio=0.0))
    restored = load_sharded_checkpoint(path, fresh, fresh_opt)
    fresh_sched.load_state_dict(restored.scheduler)
    assert restored.step == 2
    resumed, _, _ = _train(fresh, micro, 2, fresh_opt, fresh_sched)
    assert resumed == expected  # weights, Adam moments and LR position all restored exactly

    out = tmp_path / "export"
    files = export_hf_checkpoint(fresh, out, tokenizer)
    assert files and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    for loaded in (load_llada2_model(out), LLaDA2MoeModelLM.from_pretrained(out)):
        torch.testing.assert_close(_logits(loaded, micro[1]), _logits(fresh, micro[1]), rtol=0, atol=0)


def test_a_ddp_checkpoint_is_refused_by_the_sharded_loader(world, tmp_path):
    tokenizer, _ = world
    model = build_sharded_model(ModelConfig(overrides=SMALL), tokenizer, CPU, seed=0)
    optimizer, _ = make_optimizer(model, TrainConfig())
    with pytest.raises(FileNotFoundError, match="data_parallel_mode=ddp"):
        load_sharded_checkpoint(tmp_path, model, optimizer)
