"""The block layout: every query of a window in one sequence, each exactly the query encoded alone."""

from __future__ import annotations

import pytest
import torch
from helpers import expert_trajectories, world_tokenizer

from anyorder_ray.data.encoding import UnitEncoder, block_keep, collate, encode_blocks, model_inputs
from anyorder_ray.data.masking import UnitRole
from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM, llada2_config
from envs.trajectory import Trajectory, Unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder():
    return UnitEncoder(world_tokenizer())


@pytest.fixture(scope="module")
def episodes():
    return expert_trajectories("GoToLocal", range(4))


def _model(encoder: UnitEncoder) -> LLaDA2MoeModelLM:
    tok = encoder.tokenizer
    torch.manual_seed(0)
    config = llada2_config("tiny", vocab_size=len(tok), mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                           num_hidden_layers=2)  # fmt: skip
    return LLaDA2MoeModelLM(config).eval()


def _target_logits(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(**model_inputs(batch, "cpu")).logits
    return [logits[row][batch["labels"][row] != -100] for row in range(len(logits))]


def test_the_mask_is_block_causal():
    # mission (0), clean units 0..2 (2, 4, 6), target blocks of units 1 and 3 (5, 9), padding (-1)
    blocks = torch.tensor([[0, 0, 2, 2, 4, 6, 5, 9, 9, -1]])
    keep = block_keep(blocks)[0, 0]
    see = {q: {k for k in range(10) if keep[q, k]} for q in range(10)}
    assert see[0] == see[1] == {0, 1}  # the mission sees itself
    assert see[2] == {0, 1, 2, 3} and see[4] == {0, 1, 2, 3, 4}  # clean unit i: mission and clean units <= i
    assert see[5] == {0, 1, 2, 3, 4, 5}  # clean unit 2
    assert see[6] == {0, 1, 2, 3, 6}  # target block of unit 1: clean unit 0 only, and itself
    assert see[7] == see[8] == {0, 1, 2, 3, 4, 5, 7, 8}  # target block of unit 3: clean units 0..2
    assert see[9] == set()  # padding sees nothing (the model opens such rows to keep them finite)
    assert not keep[:, 6:9].any(dim=1)[[0, 1, 2, 3, 4, 5]].any()  # no clean token sees a target block


def test_every_query_in_the_packed_sequence_equals_the_query_encoded_alone(encoder, episodes):
    """Each target block's logits equal those of 'units before it, then it masked' encoded alone, in a padded batch
    of several episodes; actions and observations alike."""
    model = _model(encoder)
    packed, alone = [], []
    for traj in episodes:
        targets = list(range(1, len(traj.units)))  # every unit after the first: both kinds of query
        packed.append(encode_blocks(traj.mission, traj.units, targets, encoder, 2048))
        alone += [encode_blocks(traj.mission, traj.units[: j + 1], [j], encoder, 2048) for j in targets]
    packed_logits = torch.cat(_target_logits(model, collate(packed, 0)))
    alone_logits = torch.cat(_target_logits(model, collate(alone, 0)))
    assert packed_logits.shape == alone_logits.shape and packed_logits.shape[0] > 40
    torch.testing.assert_close(packed_logits, alone_logits, rtol=1e-4, atol=1e-4)


def test_a_packed_query_does_not_see_its_own_unit_or_anything_after_it(encoder, episodes):
    model = _model(encoder)
    traj = episodes[0]
    j = 3  # an action with context before and units after
    base = encode_blocks(traj.mission, traj.units, [j, len(traj.units) - 1], encoder, 2048)
    changed_units = list(traj.units)
    other = "right" if traj.units[j].text != "right" else "left"
    changed_units[j] = Unit("act", other, traj.units[j].step)  # the answer itself, in the clean stream
    changed_units[j + 1] = Unit("obs", traj.units[0].text, traj.units[j + 1].step)  # and a later observation
    changed = encode_blocks(traj.mission, changed_units, [j, len(traj.units) - 1], encoder, 2048)
    first = [b[: len(traj.units[j].text.split())] for b in _target_logits(model, collate([base, changed], 0))]
    torch.testing.assert_close(first[0], first[1])  # the query of unit j is blind to unit j and what follows


def test_roles_positions_and_windowing(encoder):
    traj = Trajectory.from_steps("go to the red ball", "t", 0, ["north wall", "east wall", "west wall"],
                                 ["left", "right"], True)  # fmt: skip
    ex = encode_blocks(traj.mission, traj.units, [1, 3], encoder, 2048)
    assert ex.roles == (UnitRole.VISIBLE, UnitRole.TARGET, UnitRole.VISIBLE, UnitRole.TARGET, UnitRole.DROPPED)
    assert ex.num_targets == 2 and ex.num_target_units == 2
    sizes = {"mission": 6, "obs": 3, "act": 2}  # separator + words
    clean = sizes["mission"] + sizes["obs"] + sizes["act"] + sizes["obs"]  # up to the last target, exclusive
    assert len(ex) == clean + 2 * sizes["act"]
    # The block of unit 1 repeats the positions unit 1 has in the clean stream; unit 3's continue the stream.
    assert ex.position_ids[clean : clean + 2] == ex.position_ids[9:11] == [9, 10]
    assert ex.position_ids[clean + 2 :] == [14, 15]
    short = encode_blocks(traj.mission, traj.units, [1, 3], encoder, 15)  # 18 tokens: drops unit 0
    assert (
        short.roles[:4] == (UnitRole.DROPPED, UnitRole.TARGET, UnitRole.VISIBLE, UnitRole.TARGET) and len(short) == 15
    )
    shorter = encode_blocks(traj.mission, traj.units, [1, 3], encoder, 12)  # and then unit 1 with its query
    assert shorter.roles[:4] == (UnitRole.DROPPED, UnitRole.DROPPED, UnitRole.VISIBLE, UnitRole.TARGET)
    with pytest.raises(ValueError, match="too small"):
        encode_blocks(traj.mission, traj.units, [3], encoder, 7)  # the mission (6) and the query (2)
    with pytest.raises(ValueError, match="at least one target"):
        encode_blocks(traj.mission, traj.units, [], encoder, 64)
    with pytest.raises(ValueError, match="cannot collate block-layout and sequence-layout"):
        from anyorder_ray.data.encoding import encode_units

        collate([ex, encode_units(traj.mission, traj.units, [UnitRole.VISIBLE] * 4 + [UnitRole.TARGET], encoder,
                                  64)], 0)  # fmt: skip


def test_a_block_arm_trains_every_query_of_its_mode_and_is_evaluated_in_the_same_layout(encoder, episodes):
    import numpy as np

    from anyorder_ray.config import ConfigError, DataConfig, MaskingConfig
    from anyorder_ray.data.batching import BatchMaker
    from anyorder_ray.evaluation.nll import heldout_nll, nll_queries
    from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery

    arm = MaskingConfig("causal", layout="block")
    assert arm.label() == "causal+block" and not arm.uses_mask_prob()
    assert MaskingConfig("cut_focus", 0.3, layout="block", loss_norm="unit").label() == "cut_focus+block+unit"
    with pytest.raises(ConfigError, match="layout block serves the modes causal, prefix, cut_focus"):
        MaskingConfig("any_order", layout="block")
    maker = BatchMaker(DataConfig(window_steps=4, max_seq_len=1024), arm, encoder, 0, seed=0)
    traj = episodes[0]
    example = maker.example(traj)
    targets = [i for i, r in enumerate(example.roles) if r is UnitRole.TARGET]
    assert targets and all(example.roles and traj.units[i].kind == "act" for i in targets) and example.blocks
    prefix = BatchMaker(DataConfig(window_steps=4, max_seq_len=1024), MaskingConfig("prefix", layout="block"),
                        encoder, 0, seed=0).example(traj)  # fmt: skip
    assert all(traj.units[i].kind == "obs" for i, r in enumerate(prefix.roles) if r is UnitRole.TARGET)
    assert len(maker.micro_batch(episodes)["block_mask"].shape) == 4

    # The policy's query and the NLL queries use the block layout too, and score like the packed example does.
    model = _model(encoder)
    world, action = nll_queries(traj, encoder, history_steps=3, max_length=1024, layout="block")
    assert all(q.blocks is not None for q in world + action) and len(action) == traj.num_actions
    scorer = ActionScorer(encoder, ("left", "right", "forward", "pickup", "drop", "toggle", "done"), 3, 1024, "block")
    t = traj.num_actions - 1  # the last action: its query has the most history
    query = PolicyQuery.at(traj, t)
    scored = scorer.log_probs(model, [query])[0]
    packed = encode_blocks(traj.mission, traj.units[: 2 * t + 2], [2 * t + 1], encoder, 1024)
    logits = _target_logits(model, collate([packed], 0))[0]
    expected = torch.log_softmax(logits.float(), -1)[
        0, encoder.tokenizer.convert_tokens_to_ids(list(scorer.action_names))
    ]
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)
    stats = heldout_nll(model, encoder, episodes[:2], 3, 1024, layout="block")
    assert np.isfinite(stats.world_model_nll) and np.isfinite(stats.action_nll)


@pytest.mark.parametrize("layout", ["block", "sequence"])
def test_onpolicy_mode_trains_the_policy_query_on_on_policy_segments_and_the_arm_on_demos(encoder, episodes, layout):
    """masking.onpolicy_mode causal: a dagger segment (provenance on_policy) gets only action targets, in either layout;
    the demos keep the arm's world-model targets; without it both get the arm's."""
    import dataclasses

    from anyorder_ray.config import ConfigError, DataConfig, MaskingConfig
    from anyorder_ray.data.batching import BatchMaker
    from envs.trajectory import Provenance

    mode = "cut_focus" if layout == "block" else "any_order"
    arm = MaskingConfig(mode, 0.5, layout=layout, onpolicy_mode="causal")
    assert arm.label().endswith("+onpolicy_causal")
    demo = episodes[0]
    segment = dataclasses.replace(demo, provenance=Provenance("on_policy", policy_version=3, beta=0.0))
    data = DataConfig(window_steps=4, max_seq_len=1024)

    def target_kinds(masking: MaskingConfig, traj: Trajectory, draws: int = 40) -> set[str]:
        maker = BatchMaker(data, masking, encoder, 0, seed=0)
        kinds = set()
        for _ in range(draws):
            ex = maker.example(traj)
            kinds |= {traj.units[i].kind for i, r in enumerate(ex.roles) if r is UnitRole.TARGET}
        return kinds

    assert target_kinds(arm, segment) == {"act"}
    assert target_kinds(arm, demo) == {"act", "obs"}
    assert target_kinds(dataclasses.replace(arm, onpolicy_mode=None), segment) == {"act", "obs"}
    with pytest.raises(ConfigError, match="layout block serves the modes"):
        MaskingConfig("cut_focus", layout="block", onpolicy_mode="any_order")
    with pytest.raises(ConfigError, match="onpolicy_mode 'nope' is unknown"):
        MaskingConfig("any_order", onpolicy_mode="nope")
