"""FSDP2 under Ray's TorchTrainer with 2 gloo workers on CPU: the sharded path trains like 1 unsharded worker,
resumes exactly from a sharded checkpoint, and exports a consolidated checkpoint that loads on its own.

Both tests are slow (a local Ray and TorchTrainer start-ups) and run under a hard time limit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HANG_GUARD_S
from ray import cloudpickle
from test_fault_tolerance import _assert_same, _log, _time_limit, _train_run

from anyorder_ray.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig, load_config
from anyorder_ray.data.batching import BatchMaker
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import TIMING_METRICS, train_step
from envs import EnvConfig

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
SMALL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip
OPTIM = TrainConfig(lr=3e-3, max_steps=6, lr_warmup_ratio=0.0, lr_decay_style="linear")
STEPS, RESUME_AT = 6, 3

# The workers run `_sharded_loop` from this test module, which they cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fit(config: dict, out: Path) -> Any:
    """Run ``_sharded_loop`` on 2 gloo workers (every checkpoint kept)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _sharded_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=out.name, storage_path=str(out.parent), checkpoint_config=CheckpointConfig(num_to_keep=None)
        ),
    )
    return trainer.fit()


def _sharded_loop(config: dict) -> None:
    """Train the fixed global batches of ``config["steps"]`` sharded: rank r takes micro-batches r, r + W, ...
    Checkpoints at ``RESUME_AT`` and at the end (with the HF export); rank 0 writes what the test checks."""
    import tempfile

    import ray.train
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from anyorder_ray.training.checkpoint import TrainingState
    from anyorder_ray.training.sharding import (
        build_sharded_model,
        load_local_shards,
        load_sharded_checkpoint,
        save_sharded_checkpoint,
    )

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = ModelConfig(model_path=config["model_path"])
    tokenizer = build_tokenizer(cfg, EnvConfig())  # the tokenizer that came with the checkpoint
    model = build_sharded_model(cfg, tokenizer, torch.device("cpu"), seed=0)

    # Each rank holds its torch.chunk of every weight, nothing more (the full model exists on no rank).
    shards = {}
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        shards[name] = [list(p.shape), list(p.to_local().shape)]
    read = load_local_shards(model, config["model_path"])  # loads the same values again, counting what it reads

    optimizer, scheduler = make_optimizer(model, OPTIM)
    step, losses = 0, {}
    if config.get("resume"):  # a checkpoint of another run (Train V2 resumes its own run's only)
        state = load_sharded_checkpoint(config["resume"], model, optimizer)
        scheduler.load_state_dict(state.scheduler)
        step = state.step
    while step < len(config["steps"]):
        mine = config["steps"][step][rank::world]
        stats = train_step(model, optimizer, scheduler, mine, OPTIM.max_grad_norm, torch.device("cpu"))
        step += 1
        loss = torch.tensor(stats.loss)  # each rank's share; their mean is the global token-mean
        dist.all_reduce(loss)
        losses[step] = float(loss) / world
        if step in (RESUME_AT, len(config["steps"])):
            state = TrainingState(step, {}, scheduler.state_dict(), ()) if rank == 0 else None
            with tempfile.TemporaryDirectory() as tmp:
                final = step == len(config["steps"])
                path = save_sharded_checkpoint(Path(tmp) / "ckpt", model, optimizer, tokenizer, state, export=final)
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
    model.eval()
    with torch.no_grad():
        probe = config["steps"][0][0]
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    gathered = [None] * world
    dist.all_gather_object(gathered, {"shards": shards, "read": read})
    if rank == 0:
        torch.save({"losses": losses, "logits": logits, "ranks": gathered}, config["out"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A LLaDA2 checkpoint folder (per-expert shards + tokenizer) and 6 steps of 4 fixed micro-batches."""
    from helpers import expert_trajectories

    from anyorder_ray.models.llada2_moe import save_llada2_checkpoint

    folder = tmp_path_factory.mktemp("llada2")
    tokenizer = build_tokenizer(ModelConfig(), EnvConfig())
    source = build_model(ModelConfig(overrides=SMALL), tokenizer, seed=11)
    save_llada2_checkpoint(source, folder, max_shard_bytes=40_000)
    tokenizer.save_pretrained(folder)
    maker = BatchMaker(DataConfig(), MaskingConfig("any_order", 0.5), UnitEncoder(tokenizer), tokenizer.pad_token_id,
                       seed=0)  # fmt: skip
    trajectories = expert_trajectories("GoToRedBallGrey", range(24))
    steps = [[maker.micro_batch(trajectories[(4 * s + i) % 24 :][:3]) for i in range(4)] for s in range(STEPS)]
    return folder, steps


def _reference(folder: Path, steps: list) -> tuple[dict[int, float], torch.Tensor]:
    """One unsharded worker on the same data and weights: every step's 4 micro-batches accumulated."""
    torch.set_num_threads(1)
    cfg = ModelConfig(model_path=str(folder))
    model = build_model(cfg, build_tokenizer(cfg, EnvConfig()))
    optimizer, scheduler = make_optimizer(model, OPTIM)
    losses = {}
    for i, micro in enumerate(steps, start=1):
        losses[i] = train_step(model, optimizer, scheduler, micro, OPTIM.max_grad_norm, torch.device("cpu")).loss
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=steps[0][0]["input_ids"], attention_mask=steps[0][0]["attention_mask"]).logits
    return losses, logits


def _resume_on_one_rank(folder: Path, steps: list, checkpoint: str) -> dict[int, float]:
    """Resume a sharded checkpoint in this process as a one-rank group and train the remaining steps."""
    import torch.distributed as dist

    from anyorder_ray.training.sharding import build_sharded_model, load_sharded_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = ModelConfig(model_path=str(folder))
        model = build_sharded_model(cfg, build_tokenizer(cfg, EnvConfig()), torch.device("cpu"), seed=0)
        optimizer, scheduler = make_optimizer(model, OPTIM)
        state = load_sharded_checkpoint(checkpoint, model, optimizer)
        scheduler.load_state_dict(state.scheduler)
        losses = {}
        for step in range(state.step + 1, len(steps) + 1):
            micro = steps[step - 1]  # all 4 micro-batches on the one rank
            losses[step] = train_step(model, optimizer, scheduler, micro, OPTIM.max_grad_norm, torch.device("cpu")).loss
        return losses
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_sharded_workers_train_like_one_resume_exactly_and_export(ray_local, data, tmp_path):
    from anyorder_ray.models.llada2_moe import (
        CheckpointLayout,
        LLaDA2MoeModelLM,
        SafetensorsCheckpoint,
        detect_folder_layout,
        load_llada2_model,
    )
    from anyorder_ray.training.sharding import SHARDED_STATE, is_sharded_checkpoint

    folder, steps = data
    base = {"model_path": str(folder), "steps": steps}
    with _time_limit(HANG_GUARD_S):
        full_result = _fit({**base, "out": str(tmp_path / "full.pt")}, tmp_path / "full")
        assert full_result.error is None
        by_step = {metrics["step"]: ckpt for ckpt, metrics in full_result.best_checkpoints}
        resume = {"resume": by_step[RESUME_AT].path, "out": str(tmp_path / "resumed.pt")}
        resumed = _fit({**base, **resume}, tmp_path / "resumed")
        assert resumed.error is None
    expected_losses, expected_logits = _reference(folder, steps)

    run = torch.load(tmp_path / "full.pt", weights_only=False)
    # Sharded: every parameter is split in torch.chunk pieces, and each rank read only its own rows from disk.
    source = load_llada2_model(folder)
    total = sum(p.numel() for p in source.parameters())
    buffers = sum(b.numel() for name, b in source.named_buffers() if name.endswith("expert_bias"))  # read whole
    for rank, info in enumerate(run["ranks"]):
        for name, (shape, local) in info["shards"].items():
            assert local == list(torch.empty(shape, device="meta").chunk(2)[rank].shape), name
        assert info["read"] == sum(torch.Size(local).numel() for _, local in info["shards"].values()) + buffers
        assert info["read"] < 0.6 * total
    assert sum(info["read"] for info in run["ranks"]) == total + 2 * buffers

    # 2 sharded workers == 1 unsharded worker with the same global batches (FSDP2 averages like DDP).
    assert sorted(run["losses"]) == list(range(1, STEPS + 1))
    assert [run["losses"][s] for s in range(1, STEPS + 1)] == pytest.approx(
        [expected_losses[s] for s in range(1, STEPS + 1)], rel=1e-5
    )
    assert run["losses"][STEPS] < run["losses"][1]
    torch.testing.assert_close(run["logits"], expected_logits, rtol=1e-4, atol=1e-4)

    # Resumed from the step-3 sharded checkpoint: the same losses from there on, bit for bit.
    again = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert sorted(again["losses"]) == list(range(RESUME_AT + 1, STEPS + 1))
    for s in range(RESUME_AT + 1, STEPS + 1):
        assert again["losses"][s] == run["losses"][s], s
    torch.testing.assert_close(again["logits"], run["logits"], rtol=0, atol=0)
    # The same 2-rank checkpoint resumed by a single rank (DCP reshards): the same losses again.
    single = _resume_on_one_rank(folder, steps, by_step[RESUME_AT].path)
    assert [single[s] for s in sorted(single)] == pytest.approx([run["losses"][s] for s in sorted(single)], rel=1e-5)

    # The final checkpoint: both ranks' DCP shards merged by Ray, plus the consolidated per-expert HF export.
    final = Path(full_result.checkpoint.path)
    assert is_sharded_checkpoint(final)
    assert sorted(p.name for p in (final / SHARDED_STATE).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert detect_folder_layout(final) is CheckpointLayout.PER_EXPERT
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in SafetensorsCheckpoint.open(final).weight_map
    for loaded in (load_llada2_model(final), LLaDA2MoeModelLM.from_pretrained(final)):
        with torch.no_grad():
            logits = loaded(input_ids=steps[0][0]["input_ids"], attention_mask=steps[0][0]["attention_mask"]).logits
        torch.testing.assert_close(logits, run["logits"], rtol=0, atol=1e-6)
    assert (
        build_tokenizer(ModelConfig(model_path=str(final)), EnvConfig()).get_vocab()
        == build_tokenizer(ModelConfig(), EnvConfig()).get_vocab()
    )


# -- the product loop --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_train_loop_resumes_after_a_killed_worker_and_exports(ray_local, tmp_path):
    """``train_loop_per_worker`` with ``data_parallel_mode: fsdp2`` on 2 workers: a worker killed after step 7 is
    restarted from the step-4 sharded checkpoint and reports what an uninterrupted run reports; the final
    checkpoint is an HF folder with the same weights in both runs; the eval actor gets the gathered weights."""
    from helpers import KillOnce
    from safetensors.torch import load_file

    from anyorder_ray.roles.trial import make_buffer, make_evaluator, make_rollout_actor

    ray = ray_local
    cfg = load_config(SMOKE, ["train.data_parallel_mode=fsdp2", "train.num_workers=2", "train.micro_batch_size=4",
                              "train.global_batch_size=16", "train.max_steps=8", "train.report_every=2",
                              "train.checkpoint_every=4", "train.cpus_per_worker=0.5", "train.torch_threads=1",
                              "train.max_failures=1", "data.num_demos=32", "data.min_buffer_size=32",
                              "data.bucket_pool_batches=4", "eval.every_steps=4", "eval.episodes=4",
                              "eval.final_episodes=4", "eval.heldout_trajectories=4"])  # fmt: skip
    with _time_limit(HANG_GUARD_S):
        buffer, buffer_name = make_buffer(cfg)
        producer = make_rollout_actor(cfg, 0, buffer_name)
        producers = [producer.run.remote()]
        ray.get(producers, timeout=HANG_GUARD_S)  # the fixed budget is full: both runs read the same 32 demos
        ray.kill(producer, no_restart=True)
        evaluator = make_evaluator(cfg)
        plain, killed = tmp_path / "plain", tmp_path / "killed"
        marker = tmp_path / "killed.marker"
        plain_result = _train_run(cfg, buffer, producers, plain, None, evaluator)
        ray.kill(evaluator, no_restart=True)
        killed_result = _train_run(cfg, buffer, producers, killed, KillOnce(step=7, marker=str(marker), rank=1))
        ray.kill(buffer, no_restart=True)
    assert plain_result.error is None and killed_result.error is None
    assert marker.exists()

    plain_log, killed_log = _log(plain), _log(killed)
    assert [r["train/step"] for r in plain_log] == [2, 4, 6, 8]
    assert plain_log[-1]["eval/final"] == 1 and plain_log[-1]["eval/step"] == 8  # gathered weights evaluated
    assert [r.get("train/step", r.get("resumed_from_step")) for r in killed_log] == [2, 4, 6, 4, 6, 8]
    by_step = {r["train/step"]: r for r in plain_log}
    for record in killed_log[:3] + killed_log[4:]:
        expected = by_step[record["train/step"]]
        for key in {k for k in record if k.startswith("train/")} - TIMING_METRICS:
            assert record[key] == expected[key], (record["train/step"], key)

    a, b = Path(plain_result.checkpoint.path), Path(killed_result.checkpoint.path)
    _assert_same(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), "final weights")
