"""FSDP2 bf16 mixed precision, which only runs on a GPU (the CPU path keeps fp32: bf16 trained the default model slower
there, ``TrainConfig.enable_mixed_precision``); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from anyorder_ray.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig
from anyorder_ray.data.batching import BatchMaker
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_tokenizer
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step
from anyorder_ray.training.sharding import build_sharded_model
from envs import EnvConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group for this module only."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bf16_compute_with_fp32_master_weights_trains_like_fp32(nccl_group):
    from helpers import expert_trajectories

    tokenizer = build_tokenizer(ModelConfig(), EnvConfig())
    maker = BatchMaker(DataConfig(), MaskingConfig("any_order", 0.5), UnitEncoder(tokenizer), tokenizer.pad_token_id,
                       seed=0)  # fmt: skip
    trajectories = expert_trajectories("GoToRedBallGrey", range(16))
    micro = [maker.micro_batch(trajectories[i : i + 8]) for i in (0, 8)]
    device = torch.device("cuda")
    losses = {}
    for mixed in (False, True):
        model = build_sharded_model(ModelConfig(overrides=SMALL), tokenizer, device, seed=0, mixed_precision=mixed,
                                    activation_checkpointing=True)  # fmt: skip
        compute = []
        layer = model.model.layers[0].attention.query_key_value
        layer.register_forward_pre_hook(lambda module, args, seen=compute: seen.append(module.weight.dtype))
        optimizer, scheduler = make_optimizer(model, TrainConfig(lr=3e-3, max_steps=10, lr_warmup_ratio=0.0))
        losses[mixed] = [train_step(model, optimizer, scheduler, micro, 1.0, device).loss for _ in range(5)]
        assert compute[0] == (torch.bfloat16 if mixed else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # sharded master weights stay fp32
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=5e-2)
