"""LLaDA 2.0 checkpoints: HF round trips, released naming (per-expert and dFactory merged), sharding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedTokenizerFast

from anyorder_ray.models.llada2_moe import (
    CheckpointLayout,
    LLaDA2MoeConfig,
    LLaDA2MoeModel,
    LLaDA2MoeModelLM,
    SafetensorsCheckpoint,
    convert_llada2_checkpoint,
    detect_folder_layout,
    llada2_config,
    load_llada2_model,
    merge_experts,
    read_llada2_config,
    save_llada2_checkpoint,
    split_experts,
)

PROJ = ("gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def released_key_shapes(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dense_inter: int,
    moe_inter: int,
    experts: int,
    shared: int,
    first_dense: int,
) -> dict[str, tuple[int, ...]]:
    """The released checkpoints' tensor names and shapes, written out from the published naming scheme
    (independently of the model code under test)."""
    out: dict[str, tuple[int, ...]] = {
        "model.word_embeddings.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "attention.query_key_value.weight"] = ((heads + 2 * kv_heads) * head_dim, hidden)
        out[p + "attention.query_layernorm.weight"] = (head_dim,)
        out[p + "attention.key_layernorm.weight"] = (head_dim,)
        out[p + "attention.dense.weight"] = (hidden, heads * head_dim)
        if i < first_dense:
            out[p + "mlp.gate_proj.weight"] = (dense_inter, hidden)
            out[p + "mlp.up_proj.weight"] = (dense_inter, hidden)
            out[p + "mlp.down_proj.weight"] = (hidden, dense_inter)
            continue
        out[p + "mlp.gate.weight"] = (experts, hidden)
        out[p + "mlp.gate.expert_bias"] = (experts,)
        for e in range(experts):
            out[p + f"mlp.experts.{e}.gate_proj.weight"] = (moe_inter, hidden)
            out[p + f"mlp.experts.{e}.up_proj.weight"] = (moe_inter, hidden)
            out[p + f"mlp.experts.{e}.down_proj.weight"] = (hidden, moe_inter)
        out[p + "mlp.shared_experts.gate_proj.weight"] = (moe_inter * shared, hidden)
        out[p + "mlp.shared_experts.up_proj.weight"] = (moe_inter * shared, hidden)
        out[p + "mlp.shared_experts.down_proj.weight"] = (hidden, moe_inter * shared)
    return out


def _shapes_of(config: LLaDA2MoeConfig) -> dict[str, tuple[int, ...]]:
    return released_key_shapes(
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dense_inter=config.intermediate_size,
        moe_inter=config.moe_intermediate_size,
        experts=config.num_experts,
        shared=config.num_shared_experts,
        first_dense=config.first_k_dense_replace,
    )


def _small_model(seed: int = 0) -> LLaDA2MoeModelLM:
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(llada2_config("tiny", vocab_size=48, num_hidden_layers=2)).eval()
    with torch.no_grad():  # a non-zero expert bias, so that losing it on the way would show in the logits
        model.model.layers[1].mlp.gate.expert_bias.normal_(std=0.5)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 46, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int) -> None:
    """Hand-written HF-style sharded folder: model-0000k-of-0000n.safetensors + index + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key].contiguous() for key in keys[k::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))


def _released_style_config(model: LLaDA2MoeModelLM, model_type: str) -> dict:
    """A config.json as the Hub / dFactory write it, including fields this implementation does not use."""
    c = model.config
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_shared_experts": c.num_shared_experts,
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "routed_scaling_factor": c.routed_scaling_factor,
        "first_k_dense_replace": c.first_k_dense_replace,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "partial_rotary_factor": c.partial_rotary_factor,
        "rotary_dim": c.rotary_dims,
        "rms_norm_eps": c.rms_norm_eps,
        # The released file names only pad_token_id (mask/eos default to the released ids); a small-vocabulary
        # checkpoint must carry its own.
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "mask_token_id": c.mask_token_id,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "use_qkv_bias": False,
        "use_bias": False,
        "norm_head": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "max_window_layers": 28,
        "embedding_dropout": 0.0,
        "output_dropout": 0.0,
        "attention_dropout": 0.0,
    }


# --- key names and shapes ---------------------------------------------------------------------------------------
def test_mini_on_meta_has_exactly_the_released_names_and_shapes() -> None:
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(llada2_config("mini"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = released_key_shapes(
        vocab=157184,
        hidden=2048,
        layers=20,
        heads=16,
        kv_heads=4,
        head_dim=128,
        dense_inter=5120,
        moe_inter=512,
        experts=256,
        shared=1,
        first_dense=1,
    )
    assert got.keys() == expected.keys()
    assert got == expected
    total = sum(p.numel() for p in model.parameters())
    assert 16.0e9 < total < 16.5e9  # "16B total parameters"
    assert all(p.is_meta for p in model.parameters())  # no memory was allocated


def test_flash_preset_sizes() -> None:
    config = llada2_config("flash")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert (config.intermediate_size, config.moe_intermediate_size) == (9216, 1024)
    assert (config.mask_token_id, config.pad_token_id, config.eos_token_id) == (156895, 156892, 156892)
    shapes = _shapes_of(config)
    total = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("expert_bias"))
    assert 100e9 < total < 105e9  # "100B total parameters"


def test_released_config_json_loads_and_equals_the_mini_preset(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(llada2_config("mini", num_hidden_layers=2))
    data = _released_style_config(model, "llada2_moe")
    data["num_hidden_layers"] = 20
    del data["eos_token_id"], data["mask_token_id"]  # as in the released file
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LLaDA2MoeConfig)
    mini = llada2_config("mini")
    for field in (
        "hidden_size",
        "num_experts",
        "n_group",
        "topk_group",
        "rotary_dims",
        "head_dim",
        "num_key_value_heads",
        "routed_scaling_factor",
        "rope_theta",
        "pad_token_id",
        "mask_token_id",
        "eos_token_id",
    ):
        assert getattr(loaded, field) == getattr(mini, field), field
    dfactory = dict(data, model_type="llada2_moe_veomni")
    (tmp_path / "config.json").write_text(json.dumps(dfactory))
    assert read_llada2_config(tmp_path).hidden_size == 2048


def test_saved_config_uses_released_field_names(tmp_path: Path) -> None:
    model = _small_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llada2_moe"
    for field in (
        "num_experts",
        "num_experts_per_tok",
        "num_shared_experts",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "moe_intermediate_size",
        "first_k_dense_replace",
        "partial_rotary_factor",
        "rope_theta",
        "head_dim",
        "num_key_value_heads",
        "use_qkv_bias",
        "mask_token_id",
        "pad_token_id",
    ):
        assert field in saved, field


# --- round trips ------------------------------------------------------------------------------------------------
def test_save_pretrained_and_auto_classes_round_trip(tmp_path: Path) -> None:
    model = _small_model()
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(reloaded, LLaDA2MoeModelLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(_logits(reloaded.eval()), _logits(model), rtol=0, atol=0)
    body = AutoModel.from_pretrained(tmp_path)
    assert isinstance(body, LLaDA2MoeModel)
    with torch.no_grad():
        torch.testing.assert_close(body(_ids()).last_hidden_state, model.model(_ids()).last_hidden_state)


def test_hand_written_sharded_per_expert_checkpoint_loads_exactly(tmp_path: Path) -> None:
    model = _small_model()
    state = model.state_dict()
    tensors = {key: state[key].clone() for key in _shapes_of(model.config)}  # names from the published scheme
    _write_shards(tmp_path, tensors, _released_style_config(model, "llada2_moe"), shards=3)

    assert detect_folder_layout(tmp_path) is CheckpointLayout.PER_EXPERT
    ours = load_llada2_model(tmp_path)  # strict: raises on any missing / unexpected key
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=0)
    hf, info = LLaDA2MoeModelLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(hf.eval()), _logits(model), rtol=0, atol=0)


def test_hand_written_dfactory_merged_checkpoint_loads_exactly(tmp_path: Path) -> None:
    model = _small_model()
    config = model.config
    state = model.state_dict()
    tensors = {}
    for key, value in state.items():
        if ".mlp.experts." not in key:
            tensors[key] = value.clone()
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        for proj in PROJ:  # dFactory: [E, I, H] for gate/up, [E, H, I] for down, key without ".weight"
            per_expert = [
                state[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] for e in range(config.num_experts)
            ]
            tensors[f"model.layers.{layer}.mlp.experts.{proj}"] = torch.stack(per_expert)
    assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (
        config.num_experts,
        config.hidden_size,
        config.moe_intermediate_size,
    )
    _write_shards(tmp_path, tensors, _released_style_config(model, "llada2_moe_veomni"), shards=2)

    assert detect_folder_layout(tmp_path) is CheckpointLayout.MERGED
    torch.testing.assert_close(_logits(load_llada2_model(tmp_path)), _logits(model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(LLaDA2MoeModelLM.from_pretrained(tmp_path)), _logits(model), rtol=0, atol=0)
    # The project's factory passes its own config (and a dtype) to from_pretrained.
    with_config = LLaDA2MoeModelLM.from_pretrained(tmp_path, config=read_llada2_config(tmp_path), dtype=torch.float32)
    torch.testing.assert_close(_logits(with_config), _logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="device_map"):
        LLaDA2MoeModelLM.from_pretrained(tmp_path, device_map="cpu")


def test_converter_writes_both_layouts_and_round_trips(tmp_path: Path) -> None:
    model = _small_model()
    config = model.config
    src = tmp_path / "hub"
    save_llada2_checkpoint(model, src, max_shard_bytes=2_000_000)
    (src / "tokenizer.json").write_text("{}")
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 1

    merged = tmp_path / "merged"
    convert_llada2_checkpoint(src, merged, "merged", max_shard_bytes=3_000_000)
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llada2_moe_veomni"
    assert (merged / "tokenizer.json").is_file()
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_proj" in index
    assert not any(".experts.0." in key for key in index)
    stacked = load_file(merged / index["model.layers.1.mlp.experts.up_proj"])["model.layers.1.mlp.experts.up_proj"]
    assert stacked.shape == (config.num_experts, config.moe_intermediate_size, config.hidden_size)
    torch.testing.assert_close(stacked[3], model.model.layers[1].mlp.experts[3].up_proj.weight.detach())

    back = tmp_path / "back"
    convert_llada2_checkpoint(merged, back, CheckpointLayout.PER_EXPERT)
    assert json.loads((back / "config.json").read_text())["model_type"] == "llada2_moe"
    reloaded = AutoModelForMaskedLM.from_pretrained(back)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_merge_and_split_are_inverse() -> None:
    model = _small_model()
    state = model.state_dict()
    merged = merge_experts(state, model.config)
    assert sum(1 for key in merged if ".experts." in key) == 3 * (model.config.num_hidden_layers - 1)
    split = split_experts(merged, model.config)
    assert split.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(split[key], state[key], rtol=0, atol=0)
    incomplete = {k: v for k, v in state.items() if ".experts.7." not in k}
    with pytest.raises(ValueError, match="incomplete expert sets"):
        merge_experts(incomplete, model.config)


# --- clear errors -----------------------------------------------------------------------------------------------
@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    save_llada2_checkpoint(_small_model(), folder, max_shard_bytes=2_000_000)
    return folder


def test_missing_shard_is_named(sharded: Path) -> None:
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_llada2_model(sharded)


def test_truncated_shard_is_reported(sharded: Path) -> None:
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_llada2_model(sharded)


def test_shape_mismatch_is_reported(sharded: Path) -> None:
    config = json.loads((sharded / "config.json").read_text())
    config["moe_intermediate_size"] *= 2
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch.*experts\.0\.gate_proj"):
        load_llada2_model(sharded)


def test_other_architecture_is_rejected(sharded: Path) -> None:
    config = json.loads((sharded / "config.json").read_text())
    config["model_type"] = "llama"
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'llama'.*allowed: \['llada2_moe', 'llada2_moe_veomni'\]"):
        load_llada2_model(sharded)


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    model = _small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.gate.expert_bias"]
    state["model.layers.1.mlp.router.weight"] = torch.zeros(3)
    folder = tmp_path / "odd"
    _write_shards(folder, state, _released_style_config(model, "llada2_moe"), shards=1)
    with pytest.raises(ValueError, match=r"1 missing keys.*expert_bias.*1 unexpected keys.*router"):
        load_llada2_model(folder)
    lenient = load_llada2_model(folder, strict=False)
    torch.testing.assert_close(lenient.lm_head.weight, model.lm_head.weight)


def test_unknown_layout_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"allowed: \['per_expert', 'merged'\]"):
        save_llada2_checkpoint(_small_model(), tmp_path, layout="stacked")


def test_load_in_bf16_and_checkpoint_dtype(tmp_path: Path) -> None:
    model = _small_model().to(torch.bfloat16)
    save_llada2_checkpoint(model, tmp_path)
    assert load_llada2_model(tmp_path, dtype="auto").lm_head.weight.dtype == torch.bfloat16
    assert load_llada2_model(tmp_path).lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(
        load_llada2_model(tmp_path, dtype=torch.bfloat16).lm_head.weight, model.lm_head.weight, rtol=0, atol=0
    )


# --- reading slices and writing streams (what a sharded trainer does) --------------------------------------------
@pytest.mark.parametrize("layout", ["per_expert", "merged"])
def test_row_reader_reads_rows_of_any_tensor_by_its_per_expert_name(tmp_path: Path, layout: str) -> None:
    model = _small_model()
    save_llada2_checkpoint(model, tmp_path, layout=layout, max_shard_bytes=500_000)
    state = model.state_dict()
    with SafetensorsCheckpoint.open(tmp_path).row_reader() as reader:
        assert sorted(reader.keys()) == sorted(state)
        for key in ("model.layers.1.mlp.experts.5.down_proj.weight", "model.word_embeddings.weight",
                    "model.norm.weight", "model.layers.1.mlp.gate.expert_bias"):  # fmt: skip
            full = state[key]
            assert reader.shape(key) == list(full.shape)
            torch.testing.assert_close(reader.rows(key, 3, 7), full[3:7], rtol=0, atol=0)
            assert reader.rows(key, full.shape[0], full.shape[0]).shape[0] == 0
        with pytest.raises(KeyError, match="experts.9"):
            reader.rows("model.layers.1.mlp.experts.9.up_proj.weight", 0, 1)


def test_save_streams_key_tensor_pairs(tmp_path: Path) -> None:
    model = _small_model()
    seen = []

    def pairs():
        for key, value in model.state_dict().items():
            seen.append(key)
            yield key, value

    save_llada2_checkpoint(pairs(), tmp_path, config=model.config, max_shard_bytes=500_000)
    assert len(seen) == len(model.state_dict())
    torch.testing.assert_close(_logits(load_llada2_model(tmp_path)), _logits(model), rtol=0, atol=0)


# --- a released folder with its own tokenizer drives training and the text world --------------------------------
def _bpe_tokenizer_like_llada2() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained here, with the LLaDA2.0 special tokens (eos = pad = <|endoftext|>, mask = <|mask|>)
    placed after the learned vocabulary, as in the released tokenizer (ids 156892 and 156895 there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from envs import EnvConfig, world_vocabulary

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [
        " ".join(world_vocabulary(EnvConfig())),
        "Mission: go to the red ball Observation: Action: left right forward",
    ] * 5
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    core.add_special_tokens(["<|endoftext|>", "<|role_start|>", "<|mask|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>"
    )


def test_model_path_loads_a_released_folder_with_its_tokenizer_and_the_world_uses_it(tmp_path: Path) -> None:
    from helpers import expert_trajectories

    from anyorder_ray.config import load_config
    from anyorder_ray.data.batching import BatchMaker
    from anyorder_ray.data.encoding import UnitEncoder
    from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
    from anyorder_ray.training.objective import masked_cross_entropy

    folder = tmp_path / "LLaDA2.0-tiny"
    tokenizer = _bpe_tokenizer_like_llada2()
    tokenizer.save_pretrained(folder)
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)  # the embedding is padded past the tokenizer, as the released 157184 rows are
    config = llada2_config("tiny", vocab_size=len(tokenizer) + 13, num_hidden_layers=2, pad_token_id=pad_id,
                           eos_token_id=pad_id, mask_token_id=3)  # fmt: skip
    source = LLaDA2MoeModelLM(config).eval()
    state = source.state_dict()
    _write_shards(folder, {k: state[k].clone() for k in _shapes_of(source.config)},
                  _released_style_config(source, "llada2_moe"), shards=3)  # fmt: skip

    # The sweep's config names only the folder: model and tokenizer both come from it.
    cfg = load_config(Path(__file__).resolve().parent.parent / "tune_configs" / "smoke.yaml",
                      [f"model.model_path={folder}"])  # fmt: skip
    loaded_tokenizer = build_tokenizer(cfg.model, cfg.env)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.mask_token_id == mask_id
    assert build_model_config(cfg.model, loaded_tokenizer).mask_token_id == mask_id  # not config.json's 3
    model = build_model(cfg.model, loaded_tokenizer).eval()
    # Same weights; memory-mapped tensors may take another BLAS path, hence a last-bit tolerance.
    torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=1e-6)

    # The text world encodes through that tokenizer: its markers, its mask id, and nothing unknown to it.
    encoder = UnitEncoder(loaded_tokenizer)
    assert not encoder.markers.dedicated and encoder.mask_id == mask_id
    maker = BatchMaker(cfg.data, cfg.masking, encoder, loaded_tokenizer.pad_token_id, seed=0)
    trajectories = expert_trajectories(cfg.env.level, range(4))
    batch = maker.micro_batch(trajectories)
    targets = batch["labels"] != -100
    assert targets.any() and bool((batch["input_ids"][targets] == mask_id).all())
    assert int(batch["input_ids"].max()) < len(loaded_tokenizer)
    example = maker.example(trajectories[0])
    visible = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == -100]
    assert "Observation:" in loaded_tokenizer.decode(visible)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(masked_cross_entropy(logits, batch["labels"]))
