"""AnyOrderMaskSampler: mode semantics, validation, reproducibility, statistical properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyorder_ray.data.masking import (
    BLOCK_MODES,
    IWM_STAGES,
    AnyOrderMaskSampler,
    MaskMode,
    UnitRole,
    block_targets,
    unlabelled_units,
)

V, T, D = UnitRole.VISIBLE, UnitRole.TARGET, UnitRole.DROPPED


def alternating(n: int) -> tuple[str, ...]:
    """Kinds of a trajectory with n units: obs, act, obs, ..."""
    return tuple("obs" if i % 2 == 0 else "act" for i in range(n))


# Trajectories as the project produces them: start with an observation, at least one action.
traj_kinds = st.integers(min_value=2, max_value=40).map(alternating)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
probs = st.floats(min_value=0.01, max_value=1.0)
PROP = settings(max_examples=150, deadline=None)


# --- validation ------------------------------------------------------------------------------------


def test_unknown_mode_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="causal.*prefix.*any_order.*obs_only.*act_only.*mixture"):
        AnyOrderMaskSampler("random")


@pytest.mark.parametrize("p", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_mask_prob_outside_unit_interval_rejected(p: float) -> None:
    with pytest.raises(ValueError, match=r"mask_prob must be in \(0, 1\]"):
        AnyOrderMaskSampler("any_order", mask_prob=p)


@pytest.mark.parametrize("rng", [(0.0, 0.5), (0.6, 0.5), (0.2, 1.2)])
def test_bad_mixture_range_rejected(rng: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="mixture_range"):
        AnyOrderMaskSampler("mixture", mixture_range=rng)


def test_strings_and_enums_accepted_and_exposed() -> None:
    s = AnyOrderMaskSampler("obs_only", mask_prob=1.0)
    assert s.mode is MaskMode.OBS_ONLY and s.mask_prob == 1.0
    assert AnyOrderMaskSampler(MaskMode.PREFIX).mode is MaskMode.PREFIX


@pytest.mark.parametrize(
    ("mode", "kinds", "match"),
    [
        ("causal", ("obs",), "at least one action"),
        ("prefix", ("obs", "act"), "observation after some action"),
        ("prefix", ("act", "act"), "observation after some action"),
        ("obs_only", ("act",), "at least one observation"),
        ("act_only", ("obs",), "at least one action"),
        ("action_focus", ("obs",), "at least one action"),
        ("cut_focus", ("obs",), "at least two units"),
        ("iwm", ("obs", "act"), "observation after an action"),
        ("any_order", (), "empty"),
        ("any_order", ("obs", "reward"), "must be one of"),
    ],
)
def test_impossible_inputs_raise(mode: str, kinds: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AnyOrderMaskSampler(mode, seed=0).sample(kinds)


# --- reproducibility -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MaskMode))
def test_seeded_reproducible_and_fresh_each_call(mode: MaskMode) -> None:
    kinds = alternating(21)
    a, b = AnyOrderMaskSampler(mode, seed=7), AnyOrderMaskSampler(mode, seed=7)
    draws_a = [a.sample(kinds) for _ in range(30)]
    assert draws_a == [b.sample(kinds) for _ in range(30)]
    # Each call draws a fresh mask: 30 draws of one trajectory are not all the same.
    assert len(set(draws_a)) > 1
    assert draws_a != [AnyOrderMaskSampler(mode, seed=8).sample(kinds) for _ in range(30)]


# --- properties --------------------------------------------------------------------------------------


@PROP
@given(mode=st.sampled_from(list(MaskMode)), kinds=traj_kinds, seed=seeds, p=probs)
def test_every_mode_yields_a_target(mode: MaskMode, kinds: tuple[str, ...], seed: int, p: float) -> None:
    if mode in (MaskMode.PREFIX, MaskMode.IWM) and len(kinds) < 3:
        return  # obs, act: nothing after the only cut (covered by test_impossible_inputs_raise)
    roles = AnyOrderMaskSampler(mode, mask_prob=p, seed=seed).sample(kinds)
    assert len(roles) == len(kinds)
    assert T in roles


@PROP
@given(kinds=traj_kinds, seed=seeds)
def test_causal_keeps_nothing_after_its_target(kinds: tuple[str, ...], seed: int) -> None:
    roles = AnyOrderMaskSampler("causal", seed=seed).sample(kinds)
    (t,) = [i for i, r in enumerate(roles) if r is T]
    assert kinds[t] == "act"
    assert all(r is V for r in roles[:t])
    assert all(r is D for r in roles[t + 1 :])  # no unit after the target is in the input


@PROP
@given(kinds=st.integers(min_value=3, max_value=40).map(alternating), seed=seeds)
def test_prefix_targets_exactly_observations_after_cut(kinds: tuple[str, ...], seed: int) -> None:
    roles = AnyOrderMaskSampler("prefix", seed=seed).sample(kinds)
    assert D not in roles
    first = roles.index(T)
    cut = first - 1  # the cut sits right after an action, so the first target follows it
    assert kinds[cut] == "act"
    assert all(r is V for r in roles[: cut + 1])
    assert [i for i, r in enumerate(roles) if r is T] == [i for i in range(cut + 1, len(kinds)) if kinds[i] == "obs"]


@PROP
@given(mode=st.sampled_from(["obs_only", "act_only"]), kinds=traj_kinds, seed=seeds, p=probs)
def test_kind_restricted_modes_never_target_other_kind(mode: str, kinds: tuple[str, ...], seed: int, p: float) -> None:
    roles = AnyOrderMaskSampler(mode, mask_prob=p, seed=seed).sample(kinds)
    own = mode.removesuffix("_only")
    assert all(kinds[i] == own for i, r in enumerate(roles) if r is T)
    assert D not in roles


@pytest.mark.parametrize("p", [0.15, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 4, 40])
def test_any_order_target_fraction_matches_p(p: float, n: int) -> None:
    """Empirical fraction vs. Bernoulli(p) conditioned on >= 1 target: p / (1 - (1-p)^n)."""
    draws = 4000
    sampler = AnyOrderMaskSampler("any_order", mask_prob=p, seed=1234)
    kinds = alternating(n)
    count = sum(sampler.sample(kinds).count(T) for _ in range(draws))
    expected = p / (1 - (1 - p) ** n)
    # Per-unit variance is at most p(1-p)/(1-(1-p)^n); 5 standard errors of the mean (units are positively
    # correlated only through the >=1 conditioning, which lowers variance for small n).
    se = math.sqrt(expected * (1 - min(expected, 1.0)) / (draws * n)) + 1e-9
    assert abs(count / (draws * n) - expected) <= 5 * se + 1e-3


def test_any_order_conditioning_on_one_target_exact_small_case() -> None:
    # Two units, p = 0.5: P(both | >= 1) = 0.25 / 0.75 = 1/3; each single pattern 1/3.
    sampler = AnyOrderMaskSampler("any_order", mask_prob=0.5, seed=3)
    n = 6000
    counts: dict[tuple[UnitRole, ...], int] = {}
    for _ in range(n):
        r = sampler.sample(("obs", "act"))
        counts[r] = counts.get(r, 0) + 1
    assert set(counts) == {(T, T), (T, V), (V, T)}
    for c in counts.values():
        assert abs(c / n - 1 / 3) < 5 * math.sqrt((1 / 3) * (2 / 3) / n)


def test_mask_prob_one_targets_everything_eligible() -> None:
    kinds = alternating(9)
    assert AnyOrderMaskSampler("any_order", mask_prob=1.0, seed=0).sample(kinds) == (T,) * 9
    obs = AnyOrderMaskSampler("obs_only", mask_prob=1.0, seed=0).sample(kinds)
    assert obs == tuple(T if k == "obs" else V for k in kinds)
    act = AnyOrderMaskSampler("act_only", mask_prob=1.0, seed=0).sample(kinds)
    assert act == tuple(T if k == "act" else V for k in kinds)


def test_causal_and_prefix_choices_are_uniform() -> None:
    kinds = alternating(9)  # actions at 1, 3, 5, 7; prefix cuts after acts 1, 3, 5, 7 all have a later obs
    draws = 4000
    for mode in ("causal", "prefix"):
        sampler = AnyOrderMaskSampler(mode, seed=5)
        firsts = [sampler.sample(kinds).index(T) for _ in range(draws)]
        expected_positions = [1, 3, 5, 7] if mode == "causal" else [2, 4, 6, 8]
        assert sorted(set(firsts)) == expected_positions
        for pos in expected_positions:
            assert abs(firsts.count(pos) / draws - 0.25) < 5 * math.sqrt(0.25 * 0.75 / draws)


def test_mixture_draws_mask_prob_from_its_range() -> None:
    kinds = alternating(60)
    low = AnyOrderMaskSampler("mixture", seed=0, mixture_range=(0.05, 0.1))
    high = AnyOrderMaskSampler("mixture", seed=0, mixture_range=(0.9, 1.0))
    low_frac = [low.sample(kinds).count(T) / 60 for _ in range(300)]
    high_frac = [high.sample(kinds).count(T) / 60 for _ in range(300)]
    assert max(low_frac) < 0.3 and min(high_frac) > 0.7
    # Wide range: per-call fractions spread far more than a fixed p would allow.
    wide = AnyOrderMaskSampler("mixture", seed=0, mixture_range=(0.05, 1.0))
    fracs = [wide.sample(kinds).count(T) / 60 for _ in range(300)]
    assert min(fracs) < 0.2 and max(fracs) > 0.85


def test_mixture_with_degenerate_range_is_any_order() -> None:
    kinds = alternating(15)
    mix = AnyOrderMaskSampler("mixture", seed=11, mixture_range=(0.3, 0.3))
    ao = AnyOrderMaskSampler("any_order", mask_prob=0.3, seed=11)
    assert [mix.sample(kinds) for _ in range(20)] == [ao.sample(kinds) for _ in range(20)]


@PROP
@given(kinds=traj_kinds, seed=seeds, p=probs)
def test_action_focus_always_targets_a_cut_action_and_drops_the_rest(
    kinds: tuple[str, ...], seed: int, p: float
) -> None:
    roles = AnyOrderMaskSampler("action_focus", mask_prob=p, seed=seed).sample(kinds)
    kept = [i for i, r in enumerate(roles) if r is not D]
    cut = kept[-1]
    assert kept == list(range(cut + 1))  # a prefix of the trajectory, nothing after the cut
    assert kinds[cut] == "act" and roles[cut] is T  # the policy query is always trained


def test_action_focus_masks_earlier_units_with_p_and_cuts_uniformly() -> None:
    kinds = alternating(9)  # actions at 1, 3, 5, 7
    draws = 4000
    sampler = AnyOrderMaskSampler("action_focus", mask_prob=0.3, seed=4)
    cuts, earlier_targets, earlier_units = [], 0, 0
    for _ in range(draws):
        roles = sampler.sample(kinds)
        cut = max(i for i, r in enumerate(roles) if r is not D)
        cuts.append(cut)
        earlier_targets += roles[:cut].count(T)
        earlier_units += cut
    for pos in (1, 3, 5, 7):
        assert abs(cuts.count(pos) / draws - 0.25) < 5 * math.sqrt(0.25 * 0.75 / draws)
    frac = earlier_targets / earlier_units
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / earlier_units)


@pytest.mark.parametrize("q", [0.0, 0.25, 1.0])
def test_causal_prob_mixes_in_the_causal_mask_with_probability_q(q: float) -> None:
    kinds = alternating(21)
    draws = 3000
    sampler = AnyOrderMaskSampler("any_order", mask_prob=0.5, seed=9, causal_prob=q)

    def is_causal(roles: tuple[UnitRole, ...]) -> bool:
        targets = [i for i, r in enumerate(roles) if r is T]
        if len(targets) != 1 or kinds[targets[0]] != "act":
            return False
        t = targets[0]
        return all(r is V for r in roles[:t]) and roles[t + 1 :] == (D,) * (len(kinds) - t - 1)

    # An any_order draw never drops units, so a causal draw (except one cut at the last unit, which is an
    # observation here) is recognisable exactly.
    frac = sum(is_causal(sampler.sample(kinds)) for _ in range(draws)) / draws
    assert abs(frac - q) <= 5 * math.sqrt(max(q * (1 - q), 1e-4) / draws) + (0.0 if q in (0, 1) else 1e-3)


def test_causal_prob_zero_leaves_the_mask_stream_unchanged_and_is_validated() -> None:
    kinds = alternating(11)
    plain, mixed = AnyOrderMaskSampler("any_order", seed=3), AnyOrderMaskSampler("any_order", seed=3, causal_prob=0)
    assert [plain.sample(kinds) for _ in range(20)] == [mixed.sample(kinds) for _ in range(20)]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="causal_prob"):
            AnyOrderMaskSampler("any_order", causal_prob=bad)


@PROP
@given(kinds=traj_kinds, seed=seeds, p=probs)
def test_cut_focus_targets_the_last_kept_unit_after_the_first(kinds: tuple[str, ...], seed: int, p: float) -> None:
    roles = AnyOrderMaskSampler("cut_focus", mask_prob=p, seed=seed).sample(kinds)
    kept = [i for i, r in enumerate(roles) if r is not D]
    cut = kept[-1]
    assert kept == list(range(cut + 1)) and cut >= 1 and roles[cut] is T


def test_cut_focus_cuts_uniformly_at_actions_and_observations() -> None:
    kinds = alternating(5)  # obs act obs act obs: cuts at 1..4, half of them at observations
    draws = 4000
    sampler = AnyOrderMaskSampler("cut_focus", mask_prob=0.3, seed=2)
    cuts = [max(i for i, r in enumerate(sampler.sample(kinds)) if r is not D) for _ in range(draws)]
    for pos in (1, 2, 3, 4):
        assert abs(cuts.count(pos) / draws - 0.25) < 5 * math.sqrt(0.25 * 0.75 / draws)


# --- unlabelled actions (early-experience branches) ----------------------------------------------------------------

MODE_STAGES = [(m, "world_model") for m in MaskMode if m is not MaskMode.IWM] + [(MaskMode.IWM, s) for s in IWM_STAGES]


@PROP
@given(
    mode_stage=st.sampled_from(MODE_STAGES),
    n=st.integers(min_value=2, max_value=30),
    data=st.data(),
    seed=seeds,
    p=probs,
    q=st.sampled_from([0.0, 0.5]),
)
def test_an_unlabelled_action_is_never_a_target_in_any_mode_or_layout(mode_stage, n, data, seed, p, q) -> None:
    """Every mode (iwm in each stage) in the sequence layout over 20 draws, and every block mode: an action that is not
    a label is never a target. A mode left with no target it may train raises (the config keeps such modes away from
    branches); otherwise there is a target."""
    mode, stage = mode_stage
    kinds = alternating(n)
    acts = [i for i, k in enumerate(kinds) if k == "act"]
    unlabelled = data.draw(st.sets(st.sampled_from(acts), min_size=1))
    sampler = AnyOrderMaskSampler(mode, mask_prob=p, seed=seed, causal_prob=q, iwm_stage=stage)
    for _ in range(20):
        try:
            roles = sampler.sample(kinds, unlabelled)
        except ValueError as e:
            assert "masking needs" in str(e)
            continue
        assert T in roles and not any(roles[i] is T for i in unlabelled), (roles, unlabelled)
    if mode.value in BLOCK_MODES:
        try:
            targets = block_targets(mode, kinds, unlabelled, stage)
        except ValueError as e:
            assert "masking needs" in str(e)
        else:
            assert targets and not set(targets) & unlabelled


BRANCH = alternating(5)  # obs_0 act_0 obs_1 act' obs': one expert step of history, the alternative, what it led to
ALT = unlabelled_units([True, False])


def test_unlabelled_units_are_the_actions_that_are_not_labels() -> None:
    assert set(ALT) == {3} and unlabelled_units([True, True]) == frozenset()
    assert unlabelled_units([False, True, False]) == {1, 5}
    with pytest.raises(ValueError, match="must be action units"):
        AnyOrderMaskSampler("any_order", seed=0).sample(BRANCH, {2})


def test_what_each_mode_trains_on_a_branch() -> None:
    draws = 300

    def roles_of(mode: str, **kwargs) -> set[tuple[UnitRole, ...]]:
        sampler = AnyOrderMaskSampler(mode, mask_prob=0.5, seed=1, **kwargs)
        return {sampler.sample(BRANCH, ALT) for _ in range(draws)}

    for stage in IWM_STAGES:  # iwm: the alternative's next observation, everything before it visible, in every stage
        assert roles_of("iwm", iwm_stage=stage) == {(V, V, V, V, T)}
    assert roles_of("causal") == {(V, T, D, D, D)}  # only the expert prefix's action
    assert all(r[3] is D for r in roles_of("action_focus"))  # cut at the prefix action: the alternative is dropped
    prefix = roles_of("prefix")
    assert prefix == {(V, V, T, V, T), (V, V, V, V, T)}  # cut after act_0 or after the alternative: obs' always
    cut_focus = roles_of("cut_focus")
    assert {max(i for i, r in enumerate(roles) if r is not D) for roles in cut_focus} == {1, 2, 4}  # never at 3
    assert any(roles[4] is T and roles[3] is V for roles in cut_focus)  # the world-model query, alternative visible
    any_order = roles_of("any_order")
    assert all(r[3] is V for r in any_order) and any(r[4] is T for r in any_order)
    assert block_targets("causal", BRANCH, ALT) == [1] and block_targets("prefix", BRANCH, ALT) == [2, 4]
    assert block_targets("cut_focus", BRANCH, ALT) == [1, 2, 4] and block_targets("iwm", BRANCH, ALT) == [4]


def test_iwm_on_a_demo_predicts_a_next_observation_then_imitates() -> None:
    kinds = alternating(9)  # obs act obs act obs act obs act obs: next observations at 2, 4, 6, 8
    world = AnyOrderMaskSampler("iwm", seed=3, iwm_stage="world_model")
    targets = []
    for _ in range(2000):
        roles = world.sample(kinds)
        (t,) = [i for i, r in enumerate(roles) if r is T]
        assert kinds[t] == "obs" and roles[:t] == (V,) * t and roles[t + 1 :] == (D,) * (len(kinds) - t - 1)
        targets.append(t)
    for pos in (2, 4, 6, 8):  # a uniformly random step's next observation
        assert abs(targets.count(pos) / 2000 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 2000)
    for stage in ("imitation", "mixture"):  # a demo gets the causal mask, drawn as causal draws it
        iwm, causal = AnyOrderMaskSampler("iwm", seed=4, iwm_stage=stage), AnyOrderMaskSampler("causal", seed=4)
        assert [iwm.sample(kinds) for _ in range(50)] == [causal.sample(kinds) for _ in range(50)]
    assert block_targets("iwm", kinds, iwm_stage="world_model") == block_targets("prefix", kinds)
    assert block_targets("iwm", kinds, iwm_stage="imitation") == block_targets("causal", kinds)
