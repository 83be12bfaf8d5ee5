"""TextWorld as a text world: generated games in a cached pool per split, the re-planning expert, the game's own text.

The registry's adapter for ``env.world: textworld`` (``make_world``, ``vocabulary``, ``problems`` at the end of this
module); the library never imports this module directly. Needs the ``textworld`` extra (``pip install -e
'.[textworld]'``); without it ``problems`` says so and nothing else here can run.

Levels. ``env.level`` is a TextWorld challenge followed by any of its ``tw-make`` options, e.g. ``tw-simple``,
``tw-coin_collector --level 10`` or ``tw-cooking --recipe 2 --take 1 --open``. Options left out take
``DEFAULT_OPTIONS`` (then the challenge's own defaults). ``TextWorldWorld.level`` is the canonical form with every
setting spelt out, so two spellings of one distribution share their games.

Games and splits. Games are generated with the challenge's own ``make`` and ``compile_game`` (what ``tw-make`` runs),
once, into ``<game_dir>/textworld-<version>/<level>/<split>/`` (``game_dir`` defaults to
``~/.cache/anyorder_ray/textworld``, or ``$XDG_CACHE_HOME/anyorder_ray/textworld``), and reused by every later run and
process. ``env.split`` picks the pool:

* ``train``: the training games;
* ``heldout``: other games of the same distribution (other generation seeds);
* ``test``: the challenge's own held-out distribution, where it has one (``tw-simple --test``: foods never seen in
  training; ``tw-cooking --split test``: unseen foods and preparations). ``train`` and ``heldout`` of ``tw-cooking``
  draw from its ``--split train`` distribution, so none of the test foods ever appears in them.

An episode seed picks a game: index ``seed % env.num_games`` of the split's pool, or ``seed`` itself when
``num_games`` is None (every seed its own game). Game ``i`` of a split is generated with the ``tw-make`` seed
``game_seed(split, i)`` (a ``SeedSequence`` of the split and the index, so the pools of different splits never share
a generation seed), the first time an episode needs it; ``prepare_games`` generates a whole pool ahead, printing its
progress. Generation writes into a temporary folder and renames, so concurrent actors never see half a game.

Observations. A raw observation is ``TextObs(feedback, description, inventory)``: what the last command printed, the
room's description (``look``) and the inventory, each as the game reports it, cleaned (``clean_text``: the ``>``
prompt and the status bar dropped, each line stripped, runs of blank lines cut to one). A part the feedback already
contains is left empty (after a move the feedback is the new room's description). At reset the feedback is the
game's introduction without the TextWorld banner and without the objective (that is the episode's mission).
``serialize`` joins the three parts with ``PART_SEPARATOR`` (blank lines only: the world tokenizer never sees it) and
``parse`` splits them back exactly.

Actions are commands (strings). ``valid_actions()`` is the game's admissible commands in the current state; there is
no fixed action set, so ``action_names`` is empty. The expert is ``policy_commands``, which TextWorld re-plans after
every step from the actual game state, so ``expert_action()`` answers from any state (after off-policy actions too).
An episode ends when the game is won (``success``), lost, or after ``max_episode_steps`` commands
(``DEFAULT_MAX_STEPS`` when unset). The step reward is the change in the game's score.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import io
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from envs.base import ExpertUnavailable, StepResult
from envs.registry import EnvConfig

try:
    import textworld
    import textworld.challenges
    from jericho.jericho import UnsupportedGameWarning
    from textworld.generator import compile_game
except ImportError:  # the optional extra; ``problems`` reports it
    textworld = None

INSTALL_HINT = "TextWorld is not installed: pip install -e '.[textworld]'"

SPLITS: tuple[str, ...] = ("train", "heldout", "test")
_SPLIT_CODES: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}

# Options a bare challenge name gets (the challenges that require some options have no defaults of their own).
DEFAULT_OPTIONS: dict[str, tuple[str, ...]] = {
    "tw-simple": ("--rewards", "dense", "--goal", "detailed"),
    "tw-coin_collector": ("--level", "5"),
    "tw-treasure_hunter": ("--level", "5"),
    "tw-cooking": ("--recipe", "1", "--take", "1"),
}
# How each split is drawn: extra settings per challenge; a challenge without a "test" entry has no test distribution.
_SPLIT_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "tw-simple": {"train": {"test": False}, "heldout": {"test": False}, "test": {"test": True}},
    "tw-cooking": {"train": {"split": "train"}, "heldout": {"split": "train"}, "test": {"split": "test"}},
    "tw-coin_collector": {"train": {}, "heldout": {}},
    "tw-treasure_hunter": {"train": {}, "heldout": {}},
}
# Settings that ``env.split`` controls, never the level string.
_SPLIT_OPTIONS: frozenset[str] = frozenset({"test", "split"})
# Ranges the challenges check only when a game is generated (their ``--help`` states them).
_LEVEL_RANGES: dict[str, tuple[int, int]] = {"tw-coin_collector": (1, 300), "tw-treasure_hunter": (1, 30)}

DEFAULT_MAX_STEPS = 100
PART_SEPARATOR = "\n\n\n"


def _require_textworld() -> None:
    if textworld is None:
        raise ImportError(INSTALL_HINT)


@contextlib.contextmanager
def _quiet_jericho() -> Iterator[None]:
    """Jericho warns on every load of a TextWorld game that it cannot read the score from the story file itself;
    TextWorld's own state tracking supplies the score, so the warning says nothing about these games."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedGameWarning)
        yield


# ---------------------------------------------------------------------------------------------------------
# Levels: a challenge and its tw-make options.


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Level:
    """A parsed ``env.level``: the challenge, its settings (split options excluded) and the canonical name."""

    challenge: str
    settings: tuple[tuple[str, Any], ...]
    name: str

    def settings_for(self, split: str) -> dict[str, Any]:
        """The ``make`` settings of this level's games of ``split``."""
        return {**dict(self.settings), **_SPLIT_SETTINGS[self.challenge][split]}

    @property
    def slug(self) -> str:
        """The level as a folder name."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", self.name).strip("-")


def challenges() -> tuple[str, ...]:
    """The challenges this adapter generates games for."""
    return tuple(_SPLIT_SETTINGS)


def parse_level(level: str) -> Level:
    """Parse ``"<challenge> [tw-make options]"``; ValueError naming close matches or the bad option."""
    _require_textworld()
    words = level.split()
    if not words or words[0] not in _SPLIT_SETTINGS:
        name = words[0] if words else ""
        close = difflib.get_close_matches(name, challenges(), n=3, cutoff=0.5)
        raise ValueError(
            f"unknown TextWorld challenge {name!r} in level {level!r}; allowed: {', '.join(challenges())}"
            + (f" (close matches: {close})" if close else "")
        )
    challenge, options = words[0], words[1:]
    _, _, add_arguments = textworld.challenges.CHALLENGES[challenge]
    parser = _Parser(prog=challenge, add_help=False)
    add_arguments(parser)
    actions = [a for a in parser._actions if a.option_strings]
    for word in options:
        dest = next((a.dest for a in actions if word.split("=")[0] in a.option_strings), None)
        if dest in _SPLIT_OPTIONS:
            raise ValueError(f"level {level!r}: {word} is chosen by env.split ({', '.join(SPLITS)}), not the level")
    try:
        settings = vars(parser.parse_args([*DEFAULT_OPTIONS[challenge], *options]))
    except ValueError as e:
        raise ValueError(f"level {level!r}: {e}") from None
    if challenge in _LEVEL_RANGES:
        lo, hi = _LEVEL_RANGES[challenge]
        if not lo <= settings["level"] <= hi:
            raise ValueError(f"level {level!r}: {challenge} --level must be in {lo}..{hi}, got {settings['level']}")
    canonical = [challenge]
    for action in actions:
        value = settings[action.dest]
        if action.dest in _SPLIT_OPTIONS or value is None or value is False:
            continue
        canonical += [action.option_strings[-1]] if value is True else [action.option_strings[-1], str(value)]
    kept = tuple((k, v) for k, v in settings.items() if k not in _SPLIT_OPTIONS)
    return Level(challenge=challenge, settings=kept, name=" ".join(canonical))


# ---------------------------------------------------------------------------------------------------------
# The game pool of a (level, split): generated once, cached on disk.


def default_game_dir() -> Path:
    """``$XDG_CACHE_HOME/anyorder_ray/textworld``, or ``~/.cache/anyorder_ray/textworld`` (read when called)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anyorder_ray" / "textworld"


def game_seed(split: str, index: int) -> int:
    """The ``tw-make --seed`` of game ``index`` of ``split`` (a 32-bit draw, disjoint streams per split)."""
    if index < 0:
        raise ValueError(f"game index must be >= 0, got {index}")
    return int(np.random.SeedSequence([_SPLIT_CODES[split], index]).generate_state(1, np.uint32)[0])


def generate_game(level: Level, split: str, seed: int, path: Path) -> Path:
    """Generate the game of ``level``/``split`` with ``tw-make`` seed ``seed`` as ``path`` (``.z8``) plus its
    ``.json`` (which the expert and the admissible commands need). Written via a temporary folder and renamed,
    so a reader (another actor) never sees a partial game; returns the ``.z8`` path."""
    _require_textworld()
    _, make, _ = textworld.challenges.CHALLENGES[level.challenge]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".generating-") as tmp:
        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(Path(tmp) / path.stem)
        options.file_ext = ".z8"
        with contextlib.redirect_stdout(io.StringIO()), _quiet_jericho():
            game = make(settings=level.settings_for(split), options=options)
            z8 = Path(compile_game(game, options))
        os.replace(z8.with_suffix(".json"), path.with_suffix(".json"))
        os.replace(z8, path)  # last: the .z8 existing means the game is complete
    return path


@dataclasses.dataclass(frozen=True)
class GamePool:
    """The games of one level and split, under ``root``; game ``i`` is ``game_<i>.z8``, generated on first use."""

    level: Level
    split: str
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / f"textworld-{textworld.__version__}" / self.level.slug / self.split

    def path(self, index: int) -> Path:
        return self.folder / f"game_{index:06d}.z8"

    def ensure(self, index: int, *, verbose: bool = True) -> Path:
        """The path of game ``index``, generating it first if it is not in the cache."""
        path = self.path(index)
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            start = time.perf_counter()
            generate_game(self.level, self.split, game_seed(self.split, index), path)
            if verbose:
                print(
                    f"[textworld] generated game {index} of {self.level.name!r} ({self.split}) in "
                    f"{time.perf_counter() - start:.1f}s: {path}",
                    flush=True,
                )
        return path


def _pool(cfg: EnvConfig) -> GamePool:
    return GamePool(parse_level(cfg.level), cfg.split, Path(cfg.game_dir) if cfg.game_dir else default_game_dir())


def prepare_games(cfg: EnvConfig, indices: Iterable[int]) -> list[Path]:
    """Generate (or find in the cache) games ``indices`` of ``cfg``'s pool, printing progress; their paths."""
    _raise_problems(cfg)
    pool = _pool(cfg)
    indices = list(indices)
    paths, generated, start = [], 0, time.perf_counter()
    for n, index in enumerate(indices, start=1):
        cached = pool.path(index).is_file()
        paths.append(pool.ensure(index, verbose=False))
        generated += not cached
        if not cached:
            rate = (time.perf_counter() - start) / generated
            print(
                f"[textworld] {pool.level.name!r} ({cfg.split}): {n}/{len(indices)} games ready, "
                f"{generated} generated ({rate:.1f}s each) in {pool.folder}",
                flush=True,
            )
    return paths


# ---------------------------------------------------------------------------------------------------------
# Observation text.


class TextObs(NamedTuple):
    """One raw observation: the last command's feedback, the room description and the inventory (each may be "")."""

    feedback: str
    description: str
    inventory: str


_PROMPT_AND_STATUS = re.compile(r"\n>[^\n]*\s*\Z")  # the ">" prompt and the status bar ("-= Kitchen =-3/4")
_BANNER_LINE = re.compile(r"[\s_|\\/$<>]*")  # TextWorld's ASCII-art banner is drawn with these characters only
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """The game's text without the prompt and status bar, each line stripped, runs of blank lines cut to one."""
    text = _PROMPT_AND_STATUS.sub("", text)
    text = "\n".join(line.strip() for line in text.split("\n")).strip()
    return _BLANK_RUNS.sub("\n\n", text)


def strip_intro(text: str, objective: str) -> str:
    """The game's introduction without the leading banner lines and the objective that follows them."""
    lines = text.split("\n")
    while lines and _BANNER_LINE.fullmatch(lines[0]):
        lines.pop(0)
    text = clean_text("\n".join(lines))
    objective = clean_text(objective)
    if objective and text.startswith(objective):
        text = text[len(objective) :].strip()
    return text


def serialize_obs(obs: TextObs) -> str:
    """``obs`` as one text: the three parts joined by ``PART_SEPARATOR``."""
    for name, part in zip(TextObs._fields, obs, strict=True):
        if PART_SEPARATOR in part or part != part.strip():
            raise ValueError(f"TextObs.{name} must be cleaned text (see clean_text), got {part!r}")
    return PART_SEPARATOR.join(obs)


def parse_obs(text: str) -> TextObs:
    """Exact inverse of ``serialize_obs``."""
    parts = text.split(PART_SEPARATOR)
    if len(parts) != 3:
        raise ValueError(f"observation text must have 3 parts separated by {PART_SEPARATOR!r}, got {len(parts)}")
    obs = TextObs(*parts)
    if serialize_obs(obs) != text:
        raise ValueError("observation text is not in canonical form (a part has leading or trailing whitespace)")
    return obs


def _observation(feedback: str, state: Any) -> TextObs:
    description = clean_text(state["description"] or "")
    inventory = clean_text(state["inventory"] or "")
    return TextObs(
        feedback,
        "" if description in feedback else description,
        "" if inventory in feedback else inventory,
    )


# ---------------------------------------------------------------------------------------------------------
# The runner.


class TextWorldWorld:
    """A TextWorld level's pool of games as a ``World``: reset by seed (which picks the game), step by command.

    One game is loaded at a time; a reset to another game loads it into the same interpreter. With
    ``expert=False`` TextWorld does not plan ``policy_commands`` (it still tracks the state for the admissible
    commands).
    """

    def __init__(
        self,
        level: str,
        *,
        split: str = "train",
        num_games: int | None = None,
        game_dir: str | Path | None = None,
        max_steps: int | None = None,
        expert: bool = True,
    ) -> None:
        _require_textworld()
        parsed = parse_level(level)
        if split not in _SPLIT_SETTINGS[parsed.challenge]:
            raise ValueError(f"split {split!r} is not available for {parsed.challenge}: {_split_hint(parsed)}")
        if num_games is not None and num_games < 1:
            raise ValueError(f"num_games must be >= 1 or None, got {num_games}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        self.level = parsed.name
        self.split = split
        self.num_games = num_games
        self.max_steps = max_steps or DEFAULT_MAX_STEPS
        self.pool = GamePool(parsed, split, Path(game_dir) if game_dir is not None else default_game_dir())
        self._use_expert = expert
        self._infos = textworld.EnvInfos(
            description=True, inventory=True, objective=True, score=True, won=True, lost=True,
            admissible_commands=True, policy_commands=expert,
        )  # fmt: skip
        self._env: Any = None
        self._game_path: Path | None = None
        self._state: Any = None
        self._obs: TextObs | None = None
        self._score = 0
        self._done = True
        self._won = False
        self._lost = False
        self.mission = ""
        self.num_steps = 0

    @property
    def action_names(self) -> tuple[str, ...]:
        """Empty: TextWorld has no fixed action set (the commands of a state are ``valid_actions()``)."""
        return ()

    def game_index(self, seed: int) -> int:
        """The pool index of the game that episode ``seed`` plays."""
        if seed < 0:
            raise ValueError(f"episode seed must be >= 0, got {seed}")
        return seed % self.num_games if self.num_games is not None else seed

    @property
    def game_path(self) -> Path:
        """The ``.z8`` file of the current episode's game."""
        if self._game_path is None:
            raise RuntimeError("call reset() first")
        return self._game_path

    @property
    def raw_obs(self) -> TextObs:
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return self._obs

    @property
    def done(self) -> bool:
        return self._done

    @property
    def success(self) -> bool:
        """The game was won (TextWorld's own check: every quest of the game completed)."""
        return self._won

    @property
    def lost(self) -> bool:
        """The game was lost (an unrecoverable state, e.g. the needed food eaten)."""
        return self._lost

    def valid_actions(self) -> tuple[str, ...]:
        if self._state is None:
            raise RuntimeError("call reset() first")
        return tuple(self._state["admissible_commands"] or ())

    def reset(self, seed: int) -> tuple[str, str]:
        path = self.pool.ensure(self.game_index(seed))
        with _quiet_jericho():
            if self._env is None:
                self._env = textworld.start(str(path), request_infos=self._infos)
            elif path != self._game_path:
                self._env.load(str(path))
        self._game_path = path
        self._state = self._env.reset()
        self.mission = clean_text(self._state["objective"] or "")
        self._obs = _observation(strip_intro(self._state["feedback"], self.mission), self._state)
        self._score = int(self._state["score"] or 0)
        self._done = self._won = self._lost = False
        self.num_steps = 0
        return self.serialize(self._obs), self.mission

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("episode is over; call reset()")
        if not isinstance(action, str) or not action.strip():
            raise ValueError(f"an action is a non-empty command string, got {action!r}")
        self._state, score, _ = self._env.step(action)
        self.num_steps += 1
        reward, self._score = float(score - self._score), int(score)
        self._won, self._lost = bool(self._state["won"]), bool(self._state["lost"])
        terminated = self._won or self._lost
        truncated = not terminated and self.num_steps >= self.max_steps
        self._done = terminated or truncated
        self._obs = _observation(clean_text(self._state["feedback"]), self._state)
        return StepResult(self.serialize(self._obs), reward, terminated, truncated)

    def expert_action(self) -> str:
        """The first of TextWorld's re-planned ``policy_commands``; ``ExpertUnavailable`` when it has none."""
        if self._done:
            raise RuntimeError("episode is over; call reset()")
        if not self._use_expert:
            raise RuntimeError("this TextWorldWorld was built with expert=False")
        policy = self._state["policy_commands"] or []
        if not policy:
            raise ExpertUnavailable(f"TextWorld has no winning policy from this state of {self.game_path.name}")
        return policy[0]

    def serialize(self, obs: TextObs) -> str:
        return serialize_obs(obs)

    def parse(self, text: str) -> TextObs:
        return parse_obs(text)

    def close(self) -> None:
        """Stop the game interpreter."""
        if self._env is not None:
            self._env.close()
            self._env = None
            self._game_path = None


# ---------------------------------------------------------------------------------------------------------
# Vocabulary: every word the games of a challenge can print or take as a command.

# The world tokenizer's pre-tokenisation (anyorder_ray.data.tokenization): word runs, and each other
# non-space character on its own.
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")

# Text the interpreter and Inform 7's standard library print, which no TextWorld file holds: parser replies to
# commands that are not admissible, the end-of-game lines, the score notices.
_ENGINE_TEXT = """
    That's not a verb I recognise. I didn't understand that sentence. You can't see any such thing.
    You can't go that way. I only understood you as far as wanting to. You can only do that to something animate.
    That noun did not make sense in this context. You seem to want to talk to someone, but I can't see whom.
    Please give one of the answers above. I beg your pardon? What do you want to examine? Nothing is on sale.
    You can't use multiple objects with that verb. Taken. Dropped. You have nothing. You are carrying nothing.
    You are carrying: Your score has just gone up by one point. Your score has just gone up by points.
    Your score has just gone down by one point. You scored out of a possible, in turns. turn.
    *** The End *** *** You lost! *** Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?
    (first taking the) (first opening the) (first unlocking the) (with the) That's already open. That's already closed.
    You open the, revealing. You lack the dexterity. It isn't locked. That doesn't seem to be something you can unlock.
    It's locked. You see nothing special about. You find nothing of interest. That's hardly portable.
    You already have that. You'll have to get out of the first. You aren't feeling especially drowsy. Time passes.
    Nothing obvious happens. You can't reach into. That's fixed in place. You're carrying too many things already.
    The is closed. It is empty. The is empty. There is nothing on the. You need to be holding before you can put it
    into something else. Putting things on the would achieve nothing. That can't contain things. That seems to be a
    part of. You can't put something inside itself. Please answer yes or no. Are you sure you want to quit?
    Are you sure you want to restart? You jump on the spot. That's plainly inedible. You're plainly inedible.
    Your interpreter does not provide "undo". Sorry! You are always self-aware. There is no reply. Violence isn't the
    answer to this one. You achieve nothing by this. You would achieve nothing by this. That was a rhetorical
    question. You must supply a noun. You must name something more substantial. Keep your mind on the game. Real
    adventurers do not use such language. Quite. You smell nothing unexpected. You hear nothing unexpected. You feel
    nothing unexpected. You taste nothing unexpected. Your singing is abominable. Talking to yourself. Ok. Oops.
    That's not something you can enter. You can only get into something free-standing. But you aren't in anything at
    the moment. What do you want to? Which do you mean, or? There are none at all available! Nothing to do!
    You can't put something on top of itself. That's not a direction. You'll have to say which compass direction to go
    in. That seems to belong to. Digging would achieve nothing here. Cutting that up would achieve little. You are
    unable to. That would be less than courteous. Nothing practical results from your prayer. You can't reach.
"""


def _literal_text(source: str) -> str:
    """Every string literal of a Python source file (the challenge's names and templates, the Inform 7 code)."""
    nodes = ast.walk(ast.parse(source))
    return "\n".join(n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _text_sources(challenge: str) -> list[tuple[str, bool]]:
    """The texts a challenge's games are made from, each with whether it names things (a text grammar or the
    generator's literals, whose nouns the grammars pluralise): its data files (text grammars, logic with their
    Inform 7 messages), TextWorld's default ones, the string literals of its generator and of the Inform 7 writer,
    and ``_ENGINE_TEXT``."""
    package = Path(textworld.__file__).parent
    module = textworld.challenges.CHALLENGES[challenge][1].__module__
    challenge_dir = Path(__import__(module, fromlist=["_"]).__file__).parent
    files = sorted(p for d in (challenge_dir, package / "generator" / "data") for p in d.rglob("*") if p.is_file())
    kept = [p for p in files if p.suffix in (".twg", ".twl", ".json")]
    texts = [(p.read_text(errors="replace"), p.suffix == ".twg") for p in kept]
    texts += [(_literal_text(p.read_text()), True) for p in sorted(challenge_dir.glob("*.py"))]
    texts.append((_literal_text((package / "generator" / "inform7" / "world2inform7.py").read_text()), False))
    return [*texts, (_ENGINE_TEXT, False)]


@cache
def challenge_vocabulary(challenge: str) -> tuple[str, ...]:
    """Every word (and punctuation token) the games of ``challenge`` can produce, sorted.

    An over-approximation built from the texts the games are generated from (``_text_sources``) with the world
    tokenizer's split, each word also capitalised (sentence starts, title-cased room names) and lower-cased, each
    naming word also with a plural s, plus the numbers 0..999 (scores, move counts). Independent of which games are
    in the cache, so every process builds the same tokenizer. ``tests/test_textworld.py`` checks that it covers every
    mission, observation and command of expert episodes and of off-policy play.
    """
    _require_textworld()
    words: set[str] = set()
    for text, names in _text_sources(challenge):
        for w in _WORD_OR_PUNCT.findall(text):
            words.update((w, w[:1].upper() + w[1:], w.lower()))
            if names and w.isalpha():  # "(name-n)s": the grammars make plurals by appending an s
                words.add(w.lower() + "s")
    words.update(str(n) for n in range(1000))
    return tuple(sorted(words))


# ---------------------------------------------------------------------------------------------------------
# The adapter (see ``envs.registry``).


def _split_hint(level: Level) -> str:
    available = list(_SPLIT_SETTINGS[level.challenge])
    note = "" if "test" in available else f" ({level.challenge} has no test distribution)"
    return f"allowed: {', '.join(available)}{note}"


def problems(cfg: EnvConfig) -> list[str]:
    """What is wrong with ``cfg`` for TextWorld: the extra not installed, the level, the split, BabyAI's keys."""
    if textworld is None:
        return [INSTALL_HINT]
    out = []
    try:
        level = parse_level(cfg.level)
    except ValueError as e:
        out.append(f"env.level: {e}")
        level = None
    if cfg.split not in SPLITS:
        out.append(f"env.split {cfg.split!r} is unknown; allowed: {', '.join(SPLITS)}")
    elif level is not None and cfg.split not in _SPLIT_SETTINGS[level.challenge]:
        out.append(f"env.split {cfg.split!r} is not available for {level.challenge}; {_split_hint(level)}")
    default_encoding = EnvConfig.__dataclass_fields__["obs_encoding"].default
    if cfg.obs_encoding != default_encoding:
        out.append(
            f"env.obs_encoding {cfg.obs_encoding!r}: TextWorld observations are the game's own text; leave "
            "obs_encoding unset"
        )
    if cfg.game_dir is not None and Path(cfg.game_dir).exists() and not Path(cfg.game_dir).is_dir():
        out.append(f"env.game_dir {cfg.game_dir!r} exists and is not a folder")
    return out


def _raise_problems(cfg: EnvConfig) -> None:
    found = problems(cfg)
    if found:
        raise ValueError("invalid TextWorld env config: " + "; ".join(found))


def make_world(cfg: EnvConfig, expert: bool = True) -> TextWorldWorld:
    """A ``TextWorldWorld`` for ``cfg``: its level, split, pool size, game cache and episode cap."""
    _raise_problems(cfg)
    return TextWorldWorld(
        cfg.level, split=cfg.split, num_games=cfg.num_games, game_dir=cfg.game_dir,
        max_steps=cfg.max_episode_steps, expert=expert,
    )  # fmt: skip


def prepare(cfg: EnvConfig) -> list[Path]:
    """The games of ``cfg``'s fixed pool (``num_games``), generated now where missing. Without a pool every seed is its
    own game: nothing can be built ahead, so nothing is."""
    if cfg.num_games is None:
        return []
    return prepare_games(cfg, range(cfg.num_games))


def evaluation_config(cfg: EnvConfig) -> EnvConfig:
    """Evaluation plays the ``heldout`` games when training plays ``train`` (with ``num_games`` set, an evaluation
    seed would otherwise pick a training game); a run trained on ``heldout`` or ``test`` is evaluated on its own
    split."""
    return dataclasses.replace(cfg, split="heldout") if cfg.split == "train" else cfg


def vocabulary(cfg: EnvConfig) -> list[str]:
    """``challenge_vocabulary`` of ``cfg.level``'s challenge: the same for every option, split and game."""
    _raise_problems(cfg)
    return list(challenge_vocabulary(parse_level(cfg.level).challenge))


def words_of(texts: Sequence[str]) -> list[str]:
    """The world tokenizer's words of ``texts`` (for coverage checks and word counts)."""
    return [w for text in texts for w in _WORD_OR_PUNCT.findall(text)]
