"""BabyAI (minigrid) as a text world: levels by id, the ``BabyAIBot`` expert, lossless text observations.

The registry's adapter for ``env.world: babyai`` (``make_world``, ``vocabulary``, ``problems`` at the end of this
module); the library never imports this module directly.

Observation text (encoding ``"grid"``, 50 whitespace-separated words, always):

* word 0: the agent's absolute heading, one of ``east south west north`` (``obs["direction"]`` 0..3);
* words 1..49: the 7x7 egocentric view ``obs["image"]`` (indexed ``image[x, y]``), row by row from the
  farthest row ``y=0`` to the agent's own row ``y=6``, left to right (``x=0..6``) inside a row. The agent
  stands at ``x=3, y=6`` (word ``1 + 6*7 + 3 = 46``) facing up the view.

What the agent carries needs no extra word: minigrid draws the carried object into the image at the agent's
own cell (``MiniGridEnv.gen_obs_grid`` sets it there before encoding), and draws ``empty`` there otherwise;
``tests/test_babyai.py`` checks this after a real pickup.

Each cell is one word naming its (object type, colour, state) triple: a short name for the triples BabyAI
actually shows (``unseen``, ``empty``, ``wall``, ``ball_red``, ``door_blue_locked``, ...) and the general
form ``<type>_<colour>_<state>`` (e.g. ``wall_red_open``) for every other one of the 11*6*3 triples, so the
text is a bijection of the array even for odd inputs. ``parse_obs`` is the exact inverse. Actions are their
names (``ACTION_NAMES``); the mission string is the trajectory's goal text.

Encoding ``"compact"`` (same information, about 19 words instead of 50 on single-room levels): the heading,
then the same 49 cells in the same order, run-length encoded. A run of ``k >= 2`` equal background cells is
one word, ``empty_x3`` / ``wall_x7`` / ``unseen_x12``; a run of any other cell is its word followed by the count
word ``x<k>`` (``ball_red x2``); a run of one is the bare cell word. Runs may cross row ends. It is also a
bijection (``parse_obs`` inverts it and checks that the runs cover exactly 49 cells).

Trajectories hold ``obs_0, act_0, obs_1, ..., act_{T-1}, obs_T``: the final observation after the last
action is kept so every action has a world-model target.
"""

from __future__ import annotations

import contextlib
import difflib
import io
from collections.abc import Callable, Iterable
from enum import StrEnum

import gymnasium as gym
import minigrid  # noqa: F401  (importing registers the BabyAI-* ids with gymnasium)
import numpy as np
from minigrid.core.constants import COLOR_NAMES, IDX_TO_COLOR, IDX_TO_OBJECT, STATE_TO_IDX
from minigrid.envs.babyai.core.verifier import LOC_NAMES, OBJ_TYPES
from minigrid.utils.baby_ai_bot import BabyAIBot, DisappearedBoxError

from envs.base import ExpertUnavailable, StepResult
from envs.registry import EnvConfig

ACTION_NAMES: tuple[str, ...] = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
_ACTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(ACTION_NAMES)}

DIRECTION_NAMES: tuple[str, ...] = ("east", "south", "west", "north")  # minigrid DIR_TO_VEC order
_DIRECTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(DIRECTION_NAMES)}

VIEW_SIZE = 7
GRID_OBS_WORDS = 1 + VIEW_SIZE * VIEW_SIZE

_NUM_TYPES = len(IDX_TO_OBJECT)  # 11
_NUM_COLORS = len(IDX_TO_COLOR)  # 6
_NUM_STATES = len(STATE_TO_IDX)  # 3
_IDX_TO_STATE = {i: s for s, i in STATE_TO_IDX.items()}
_TRIPLE_LIMITS = np.array([_NUM_TYPES, _NUM_COLORS, _NUM_STATES], dtype=np.int64)

# The bot signals "I cannot solve this" by these; an episode that raises one is a failed episode.
_BOT_FAILURES: tuple[type[BaseException], ...] = (AssertionError, DisappearedBoxError)


class ObsEncoding(StrEnum):
    """How an observation is rendered as text (see the module docstring)."""

    GRID = "grid"
    COMPACT = "compact"


def _coerce_encoding(encoding: ObsEncoding | str) -> ObsEncoding:
    try:
        return ObsEncoding(encoding)
    except ValueError:
        allowed = [e.value for e in ObsEncoding]
        raise ValueError(f"unknown observation encoding {encoding!r}; allowed: {allowed}") from None


# ---------------------------------------------------------------------------------------------------------
# Cell words: a table over every (type, colour, state) triple, indexed by code = t*18 + c*3 + s.


def _cell_word(t: int, c: int, s: int) -> str:
    typ, col, st = IDX_TO_OBJECT[t], IDX_TO_COLOR[c], _IDX_TO_STATE[s]
    # The exact triples minigrid's encode() emits for these objects get the shortest names.
    singletons = {("unseen", "red", "open"), ("empty", "red", "open"), ("wall", "grey", "open")}
    singletons |= {("goal", "green", "open"), ("lava", "red", "open")}
    if (typ, col, st) in singletons:
        return typ
    if typ in ("key", "ball", "box", "floor") and st == "open":
        return f"{typ}_{col}"
    # Doors (all states) and every odd triple: the general three-part form. Short names have fewer parts
    # (or are doors), so no general-form word can collide with one of them.
    return f"{typ}_{col}_{st}"


def _build_cell_table() -> tuple[list[str], dict[str, int], np.ndarray]:
    words: list[str] = []
    triples: list[tuple[int, int, int]] = []
    for t in range(_NUM_TYPES):
        for c in range(_NUM_COLORS):
            for s in range(_NUM_STATES):
                words.append(_cell_word(t, c, s))
                triples.append((t, c, s))
    index = {w: i for i, w in enumerate(words)}
    if len(index) != len(words):  # a naming bug would make the text lossy: fail at import, loudly
        raise AssertionError("cell words are not a bijection of (type, colour, state) triples")
    return words, index, np.asarray(triples, dtype=np.uint8)


_CELL_WORDS, _CELL_INDEX, _CODE_TO_TRIPLE = _build_cell_table()
_CODE_WEIGHTS = np.array([_NUM_COLORS * _NUM_STATES, _NUM_STATES, 1], dtype=np.int64)


def cell_words() -> list[str]:
    """All 198 cell words, in code order (type-major, then colour, then state)."""
    return list(_CELL_WORDS)


# ---------------------------------------------------------------------------------------------------------
# Serialization.


def _serialize_grid(image: np.ndarray, direction: int) -> str:
    if image.shape != (VIEW_SIZE, VIEW_SIZE, 3):
        raise ValueError(f"obs['image'] must have shape (7, 7, 3), got {image.shape}")
    if not 0 <= direction < len(DIRECTION_NAMES):
        raise ValueError(f"obs['direction'] must be in 0..3, got {direction}")
    # (x, y, 3) -> rows y=0..6 of cells x=0..6.
    cells = image.transpose(1, 0, 2).reshape(-1, 3).astype(np.int64)
    if (cells < 0).any() or (cells >= _TRIPLE_LIMITS).any():
        bad = cells[((cells < 0) | (cells >= _TRIPLE_LIMITS)).any(axis=1)][0].tolist()
        raise ValueError(
            f"cell triple {bad} out of range: type 0..{_NUM_TYPES - 1}, colour 0..{_NUM_COLORS - 1}, "
            f"state 0..{_NUM_STATES - 1}"
        )
    codes = (cells @ _CODE_WEIGHTS).tolist()
    words = _CELL_WORDS
    return DIRECTION_NAMES[direction] + " " + " ".join([words[k] for k in codes])


def _parse_grid(text: str) -> tuple[np.ndarray, int]:
    words = text.split()
    if len(words) != GRID_OBS_WORDS:
        raise ValueError(f"grid observation text must have {GRID_OBS_WORDS} words, got {len(words)}")
    direction = _DIRECTION_INDEX.get(words[0])
    if direction is None:
        raise ValueError(f"first word must be a direction {DIRECTION_NAMES}, got {words[0]!r}")
    codes = []
    for i, w in enumerate(words[1:], start=1):
        k = _CELL_INDEX.get(w)
        if k is None:
            close = difflib.get_close_matches(w, _CELL_WORDS, n=3)
            raise ValueError(f"word {i} ({w!r}) is not a cell word; close matches: {close}")
        codes.append(k)
    cells = _CODE_TO_TRIPLE[codes].reshape(VIEW_SIZE, VIEW_SIZE, 3)  # (y, x, 3)
    return np.ascontiguousarray(cells.transpose(1, 0, 2)), direction


# Run-length ("compact") encoding. Background cells get one merged word per run; other cells a count word.
_RUN_CELLS: tuple[str, ...] = ("empty", "wall", "unseen")
_CELLS = VIEW_SIZE * VIEW_SIZE
_RUN_WORDS: dict[str, tuple[str, int]] = {
    f"{cell}_x{k}": (cell, k) for cell in _RUN_CELLS for k in range(2, _CELLS + 1)
}
_COUNT_WORDS: dict[str, int] = {f"x{k}": k for k in range(2, _CELLS + 1)}


def _serialize_compact(image: np.ndarray, direction: int) -> str:
    words = _serialize_grid(image, direction).split()
    out = [words[0]]
    i = 1
    while i < len(words):
        j = i
        while j + 1 < len(words) and words[j + 1] == words[i]:
            j += 1
        cell, k = words[i], j - i + 1
        if k == 1:
            out.append(cell)
        elif cell in _RUN_CELLS:
            out.append(f"{cell}_x{k}")
        else:
            out += [cell, f"x{k}"]
        i = j + 1
    return " ".join(out)


def _parse_compact(text: str) -> tuple[np.ndarray, int]:
    words = text.split()
    if not words:
        raise ValueError("compact observation text is empty")
    cells: list[str] = []
    for i, w in enumerate(words[1:], start=1):
        if w in _RUN_WORDS:
            cell, k = _RUN_WORDS[w]
            cells += [cell] * k
        elif w in _COUNT_WORDS:
            if i == 1 or words[i - 1] in _RUN_WORDS or words[i - 1] in _COUNT_WORDS:
                raise ValueError(f"word {i} ({w!r}) is a count but does not follow a cell word")
            cells += [cells[-1]] * (_COUNT_WORDS[w] - 1)
        else:
            cells.append(w)
    if len(cells) != _CELLS:
        raise ValueError(f"compact observation text covers {len(cells)} cells, must cover exactly {_CELLS}")
    image, direction = _parse_grid(" ".join([words[0], *cells]))
    canonical = _serialize_compact(image, direction)
    if canonical.split() != words:  # e.g. "empty x2" for "empty_x2", or a run split in two
        raise ValueError(f"compact observation text is not in canonical form; the same view is {canonical!r}")
    return image, direction


_SERIALIZERS: dict[ObsEncoding, Callable[[np.ndarray, int], str]] = {
    ObsEncoding.GRID: _serialize_grid,
    ObsEncoding.COMPACT: _serialize_compact,
}
_PARSERS: dict[ObsEncoding, Callable[[str], tuple[np.ndarray, int]]] = {
    ObsEncoding.GRID: _parse_grid,
    ObsEncoding.COMPACT: _parse_compact,
}
_ENCODING_WORDS: dict[ObsEncoding, Callable[[], list[str]]] = {
    ObsEncoding.GRID: lambda: list(DIRECTION_NAMES) + list(_CELL_WORDS),
    ObsEncoding.COMPACT: lambda: list(DIRECTION_NAMES) + list(_CELL_WORDS) + list(_RUN_WORDS) + list(_COUNT_WORDS),
}


def serialize_obs(obs: dict, encoding: ObsEncoding | str = ObsEncoding.GRID) -> str:
    """Render ``obs["image"]`` (uint8 7x7x3) and ``obs["direction"]`` as text (format: module docstring)."""
    enc = _coerce_encoding(encoding)
    return _SERIALIZERS[enc](np.asarray(obs["image"]), int(obs["direction"]))


def parse_obs(text: str, encoding: ObsEncoding | str = ObsEncoding.GRID) -> tuple[np.ndarray, int]:
    """Exact inverse of ``serialize_obs``: returns ``(image uint8 (7, 7, 3), direction 0..3)``."""
    return _PARSERS[_coerce_encoding(encoding)](text)


# ---------------------------------------------------------------------------------------------------------
# Vocabulary.

# Mission words, from the surface() methods of minigrid/envs/babyai/core/verifier.py:
#   ObjDesc:   "a|the [colour] <type|object> [in front of you | behind you | on your left|right]"
#   instrs:    "go to X", "open X", "pick up X", "put X next to Y"
#   sequences: "A, then B", "A after you B", "A and B"
_MISSION_GRAMMAR_WORDS: tuple[str, ...] = (
    "go", "to", "open", "pick", "up", "put", "next",
    "a", "the", "object",
    "in", "front", "of", "you", "behind", "on", "your",
    "then", "after", "and",
)  # fmt: skip
# The project tokenizer splits punctuation into tokens of its own; missions use only the comma.
MISSION_PUNCTUATION: tuple[str, ...] = (",",)


def _dedupe(words: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def mission_vocabulary() -> list[str]:
    """Every word (and punctuation token) a BabyAI mission can contain, in a fixed order."""
    loc_words = [w for loc in LOC_NAMES for w in loc.split()]
    return _dedupe([*_MISSION_GRAMMAR_WORDS, *OBJ_TYPES, *COLOR_NAMES, *loc_words, *MISSION_PUNCTUATION])


def world_vocabulary() -> list[str]:
    """Every word the BabyAI world can produce: action names, observation words of every encoding, and
    mission words. Deterministic order; no duplicates."""
    obs_words = [w for enc in ObsEncoding for w in _ENCODING_WORDS[enc]()]
    return _dedupe([*ACTION_NAMES, *obs_words, *mission_vocabulary()])


# ---------------------------------------------------------------------------------------------------------
# Levels and environments.


def babyai_levels() -> tuple[str, ...]:
    """All registered ``BabyAI-*`` ids, sorted."""
    return tuple(sorted(k for k in gym.envs.registry if k.startswith("BabyAI-")))


def normalize_level(name: str) -> str:
    """Full gymnasium id for ``name``: accepts ``"BabyAI-GoToLocal-v0"``, ``"BabyAI-GoToLocal"`` or
    ``"GoToLocal"``. Raises ValueError with close matches for an unknown level."""
    levels = babyai_levels()
    known = set(levels)
    bare = name.removeprefix("BabyAI-")
    for candidate in (name, f"BabyAI-{bare}", f"BabyAI-{bare}-v0"):
        if candidate in known:
            return candidate
    short = {lvl.removeprefix("BabyAI-").removesuffix("-v0"): lvl for lvl in levels}
    close = difflib.get_close_matches(bare.removesuffix("-v0"), list(short), n=5, cutoff=0.5)
    raise ValueError(
        f"unknown BabyAI level {name!r}; close matches: {[short[c] for c in close]} "
        f"({len(levels)} levels registered, see envs.babyai.babyai_levels())"
    )


def reset_env(env: gym.Env, seed: int) -> dict:
    """``env.reset(seed=seed)`` with minigrid's level-generation chatter ("Sampling rejected: ...")
    swallowed; minigrid writes it with ``print``, so redirecting ``sys.stdout`` is enough."""
    with contextlib.redirect_stdout(io.StringIO()):
        obs, _ = env.reset(seed=seed)
    return obs


def make_env(level: str, seed: int | None = None, max_steps: int | None = None) -> gym.Env:
    """The unwrapped minigrid env for ``level`` (full id or short name), reset with ``seed`` when given.

    ``max_steps`` fixes the episode cap (the env truncates there); by default BabyAI sizes it per mission.
    The env is unwrapped because the bot reads its internals and gymnasium's checker wrappers cost time.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    kwargs = {} if max_steps is None else {"max_steps": max_steps}
    env = gym.make(normalize_level(level), disable_env_checker=True, **kwargs).unwrapped
    if seed is not None:
        reset_env(env, seed)
    return env


# ---------------------------------------------------------------------------------------------------------
# The runner.


class BabyAIWorld:
    """A BabyAI level as a ``World``: reset by seed, step by action name, optional bot expert.

    With ``expert=True`` a fresh ``BabyAIBot`` is built after every reset and told every action actually
    taken (the bot must see each step to keep its plan valid, even when it is not asked), so
    ``expert_action()`` is correct under any policy. Eval actors that only need the environment pass
    ``expert=False``: the bot's planning is most of the per-step cost.
    """

    def __init__(
        self,
        level: str,
        *,
        max_steps: int | None = None,
        encoding: ObsEncoding | str = ObsEncoding.GRID,
        expert: bool = True,
    ) -> None:
        self.level = normalize_level(level)
        self.encoding = _coerce_encoding(encoding)
        self._serialize = _SERIALIZERS[self.encoding]
        self._env = make_env(self.level, max_steps=max_steps)
        self._use_expert = expert
        self._bot: BabyAIBot | None = None
        self._bot_error: BaseException | None = None
        self._suggestion: int | None = None  # the bot's answer for the current state, once asked
        self._last_action: int | None = None
        self._obs: dict | None = None
        self._done = True
        self._success = False
        self.mission = ""
        self.num_steps = 0

    @property
    def action_names(self) -> tuple[str, ...]:
        return ACTION_NAMES

    @property
    def env(self) -> gym.Env:
        """The underlying unwrapped minigrid env."""
        return self._env

    @property
    def raw_obs(self) -> dict:
        """The last raw minigrid observation (``image``, ``direction``, ``mission``)."""
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return self._obs

    @property
    def done(self) -> bool:
        return self._done

    @property
    def success(self) -> bool:
        """The episode terminated with a positive reward (BabyAI's success: the mission was completed)."""
        return self._success

    def valid_actions(self) -> tuple[str, ...]:
        return ACTION_NAMES

    def reset(self, seed: int) -> tuple[str, str]:
        self._obs = reset_env(self._env, seed)
        self.mission = self._obs["mission"]
        self.num_steps = 0
        self._done = False
        self._success = False
        self._last_action = None
        self._suggestion = None
        self._bot_error = None
        # The bot reads the freshly generated level, so it must be built after reset.
        self._bot = BabyAIBot(self._env) if self._use_expert else None
        return self.serialize(self._obs), self.mission

    def _consult_bot(self) -> None:
        if self._bot is None or self._suggestion is not None:
            return
        try:
            self._suggestion = int(self._bot.replan(self._last_action))
        except _BOT_FAILURES as e:  # the bot gives up on this episode; the env itself is fine
            self._bot_error = e
            self._bot = None

    def expert_action(self) -> str:
        """The bot's action for the current state. Raises ``ExpertUnavailable`` if the bot gave up this episode."""
        if self._done:
            raise RuntimeError("episode is over; call reset()")
        if not self._use_expert:
            raise RuntimeError("this BabyAIWorld was built with expert=False")
        self._consult_bot()
        if self._suggestion is None:
            raise ExpertUnavailable(f"the bot gave up on this episode: {self._bot_error!r}") from self._bot_error
        return ACTION_NAMES[self._suggestion]

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("episode is over; call reset()")
        a = _ACTION_INDEX.get(action)
        if a is None:
            raise ValueError(f"unknown action {action!r}; allowed: {ACTION_NAMES}")
        self._consult_bot()  # keep the bot in sync even when nobody asked it this step
        self._obs, reward, terminated, truncated, _ = self._env.step(a)
        self._last_action = a
        self._suggestion = None
        self.num_steps += 1
        self._done = bool(terminated or truncated)
        self._success = bool(terminated and reward > 0)
        return StepResult(self._serialize(self._obs["image"], self._obs["direction"]), float(reward),
                          bool(terminated), bool(truncated))  # fmt: skip

    def serialize(self, obs: dict) -> str:
        return self._serialize(np.asarray(obs["image"]), int(obs["direction"]))

    def parse(self, text: str) -> tuple[np.ndarray, int]:
        return _PARSERS[self.encoding](text)


# ---------------------------------------------------------------------------------------------------------
# The adapter (see ``envs.registry``).


def make_world(cfg: EnvConfig, expert: bool = True) -> BabyAIWorld:
    """A ``BabyAIWorld`` for ``cfg``: its level, episode cap and observation encoding."""
    return BabyAIWorld(cfg.level, max_steps=cfg.max_episode_steps, encoding=cfg.obs_encoding, expert=expert)


def evaluation_config(cfg: EnvConfig) -> EnvConfig:
    """``cfg`` itself: every seed generates its own level, and evaluation seeds (>= 1e9) are never training seeds."""
    return cfg


def vocabulary(cfg: EnvConfig) -> list[str]:
    """``world_vocabulary()``: the same for every level and encoding, so one tokenizer serves them all."""
    return world_vocabulary()


def problems(cfg: EnvConfig) -> list[str]:
    """What is wrong with ``cfg.level``, ``cfg.obs_encoding`` (close matches for a misspelt level) and ``cfg.split``."""
    out = []
    try:
        normalize_level(cfg.level)
    except ValueError as e:
        out.append(f"env.level: {e}; set env.level to one of them")
    allowed = [e.value for e in ObsEncoding]
    if cfg.obs_encoding not in allowed:
        out.append(f"env.obs_encoding {cfg.obs_encoding!r} is unknown; allowed: {', '.join(allowed)}")
    if cfg.split != "train":
        out.append(
            f"env.split {cfg.split!r}: BabyAI has no game pools (every seed generates its own level; evaluation "
            "plays seeds from eval.seed_start, never training seeds); leave env.split at 'train' and change "
            "env.level for another distribution"
        )
    return out
