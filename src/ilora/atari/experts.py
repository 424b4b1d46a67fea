"""Experts: anything that maps an :class:`Observation` to an action, and the built-in scripted ones.

A :class:`Policy` is any callable ``policy(observation) -> action`` where the action is a name,
an index, or a :class:`Decision` (name + reasoning text). A user's RL agent or a loaded
checkpoint becomes an expert by wrapping it in such a callable (optionally with ``reset()``,
called at every episode start).

The scripted experts read the console RAM through :mod:`ilora.atari.ram` and act on the
relation words of its :class:`~ilora.atari.ram.ObjectFacts`; their reasoning text is generated
from the same facts, so the answer's reasoning always explains the action it ends with.

:class:`EpisodeLoop` is the one episode loop: any policy on wrapped environments in lockstep,
one :class:`EpisodeRecord` per episode. :func:`run_episode` (an expert's single episode) and
:func:`~ilora.atari.evaluate.play_episodes` (scoring any policy) both run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import TimeLimit

from ilora.atari.envs import (
    AUTO_FIRE_REWARD,
    AUTO_FIRES,
    Observation,
    TwoFrameEnv,
    lost_life_or_point,
)
from ilora.atari.games import Game, get_game
from ilora.atari.ram import BOXING_VERTICAL, ObjectFacts, Point, object_facts
from ilora.errors import IloraError


@dataclass(frozen=True)
class Decision:
    """An action name and the reasoning behind it (empty for policies that give none)."""

    action: str
    reasoning: str = ""


Action = Decision | str | int


@runtime_checkable
class Policy(Protocol):
    """Anything that picks an action for an observation."""

    def __call__(self, observation: Observation) -> Action: ...


def to_decision(action: Action, action_names: tuple[str, ...]) -> Decision:
    """Normalise a policy's output (name, index or Decision) to a :class:`Decision`.

    Raises:
        IloraError: The name or index is not one of ``action_names``.
    """
    if isinstance(action, Decision):
        name = action.action
    elif isinstance(action, (int, np.integer)):
        if not 0 <= int(action) < len(action_names):
            raise IloraError(f"policy returned action index {action}; valid: 0..{len(action_names) - 1}")
        name = action_names[int(action)]
    else:
        name = str(action)
    if name not in action_names:
        raise IloraError(f"policy returned action {name!r}; valid: {', '.join(action_names)}")
    return action if isinstance(action, Decision) else Decision(name)


def reset_policy(policy: Policy) -> None:
    """Call the policy's ``reset()`` if it has one (stateful policies start each episode fresh)."""
    reset = getattr(policy, "reset", None)
    if callable(reset):
        reset()


class RandomPolicy:
    """Uniformly random actions from its own seeded generator (the 'random' reference agent)."""

    def __init__(self, action_names: tuple[str, ...], seed: int = 0) -> None:
        self.action_names = action_names
        self._rng = np.random.default_rng(seed)

    def __call__(self, observation: Observation) -> Decision:
        return Decision(self.action_names[int(self._rng.integers(len(self.action_names)))])


def _motion(before: Point | None, now: Point | None) -> str:
    """Words for how an object moved between the two frames."""
    if before is None or now is None:
        return "just appeared" if now is not None else "not visible"
    dx, dy = now[0] - before[0], now[1] - before[1]
    words = [w for w, on in (("up", dy < 0), ("down", dy > 0), ("left", dx < 0), ("right", dx > 0)) if on]
    return "moving " + "-".join(words) if words else "standing still"


def _where(point: Point) -> str:
    """A coarse screen region for a pixel position, for the reasoning text."""
    row = "top" if point[1] < 80 else "bottom" if point[1] > 150 else "middle"
    col = "left" if point[0] < 53 else "right" if point[0] > 106 else "centre"
    return f"{row} {col}" if (row, col) != ("middle", "centre") else "centre"


class ScriptedExpert:
    """Base of the RAM-reading experts: read the facts, pick an action, explain it."""

    game_name: str

    def __init__(self) -> None:
        self.game: Game = get_game(self.game_name)

    def act(self, facts: ObjectFacts) -> Decision:
        raise NotImplementedError

    def __call__(self, observation: Observation) -> Decision:
        return self.act(object_facts(self.game, *observation.rams))


class PongExpert(ScriptedExpert):
    """Keeps the paddle level with the ball: ball above -> up (RIGHT), below -> down (LEFT)."""

    game_name = "Pong"
    MOVES: ClassVar[dict[str, tuple[str, str]]] = {"above": ("RIGHT", "move my paddle up"), "below": ("LEFT", "move my paddle down")}

    def act(self, facts: ObjectFacts) -> Decision:
        relation = facts.relations["ball_vs_paddle"]
        ball_before, ball = facts.objects["ball"]
        if relation == "none":
            return Decision("NOOP", "No ball is in play; I wait for the serve. Action rule: nothing to hit, so I stay.")
        scene = f"The ball is in the {_where(ball)} of the screen, {_motion(ball_before, ball)}."
        if relation == "level":
            return Decision("NOOP", f"{scene} It is level with my paddle, so the paddle is in place to hit it back; I hold still.")
        action, how = self.MOVES[relation]
        return Decision(action, f"{scene} It is {relation} my paddle; to hit it back before it passes I {how}.")


class BreakoutExpert(ScriptedExpert):
    """Launches a ball when none is in play (FIRE), otherwise keeps the paddle under the ball."""

    game_name = "Breakout"

    def act(self, facts: ObjectFacts) -> Decision:
        relation = facts.relations["ball_vs_paddle"]
        ball_before, ball = facts.objects["ball"]
        if relation == "none":
            return Decision("FIRE", "No ball is in play. The rules say FIRE launches a new ball, so I press FIRE.")
        scene = f"The ball is in the {_where(ball)} of the screen, {_motion(ball_before, ball)}."
        if relation == "level":
            return Decision("NOOP", f"{scene} It is straight above the paddle, so the paddle will catch it; I stay.")
        return Decision(
            relation.upper(),
            f"{scene} It is {relation} of the paddle; I move the paddle {relation} to bounce it back before it passes.",
        )


class FreewayExpert(ScriptedExpert):
    """Moves the chicken up unless a car is about to pass through its next lane, then waits."""

    game_name = "Freeway"

    def act(self, facts: ObjectFacts) -> Decision:
        _, chicken = facts.objects["chicken"]
        scene = f"The chicken is in the {_where(chicken)} of the road."
        if facts.relations["next_lane"] == "car":
            _, car = facts.objects["car in next lane"]
            return Decision(
                "NOOP",
                f"{scene} A car in the next lane is about to pass in front of it (car at {_where(car)}); "
                "a hit pushes the chicken back, so I wait.",
            )
        return Decision("UP", f"{scene} The next lane is clear; each crossing scores, so I move up.")


class BoxingExpert(ScriptedExpert):
    """Presses toward the opponent, lining a glove up with it; punches as a glove comes in line.

    Chosen from the three relations of the object text alone (side, vertical; distance is not
    needed), so a cloned agent sees everything it acts on. Picked in a sweep of such mappings
    on seeds apart from the evaluation's: stepping toward the opponent pins it against the ropes
    (the largest gain); with a glove in line, punching while moving away from that glove (top
    glove -> DOWNFIRE, bottom -> UPFIRE) lands more than a still punch; punching at any other
    time draws counter-punches. ``ilora experts --games Boxing --episodes 16 --seed 20000
    --max-steps 500 --random-episodes 16`` measures it against random play.
    """

    game_name = "Boxing"
    # Vertical word -> (vertical part of the action, fires, why).
    PLAN: ClassVar[dict[str, tuple[str, bool, str]]] = {
        "above": ("UP", False, "move up to bring a glove in line"),
        "top glove": ("DOWN", True, "punch with the top glove while slipping down"),
        "high centre": ("DOWN", False, "move down so my top glove lines up"),
        "low centre": ("UP", False, "move up so my bottom glove lines up"),
        "bottom glove": ("UP", True, "punch with the bottom glove while slipping up"),
        "below": ("DOWN", False, "move down to bring a glove in line"),
    }

    def act(self, facts: ObjectFacts) -> Decision:
        side, distance, vertical = (facts.relations[k] for k in ("side", "distance", "vertical"))
        scene = f"The opponent is to my {side}, {distance}; {BOXING_VERTICAL[vertical].replace('your', 'my')}."
        move, fire, why = self.PLAN[vertical]
        if fire:
            return Decision(move + "FIRE", f"{scene} A glove is in line, so I {why}.")
        return Decision(
            move + side.upper(), f"{scene} I {why} and step {side} to keep the opponent pinned near the ropes."
        )


EXPERTS: dict[str, Callable[[], ScriptedExpert]] = {
    cls.game_name: cls for cls in (PongExpert, BreakoutExpert, FreewayExpert, BoxingExpert)
}


def get_expert(game: str | Game) -> ScriptedExpert:
    """The built-in scripted expert for ``game``.

    Raises:
        IloraError: No scripted expert exists for the game; lists those that do.
    """
    name = get_game(game).name
    if name not in EXPERTS:
        raise IloraError(
            f"no scripted expert for {name}; built-in experts: {', '.join(sorted(EXPERTS))} "
            "(any other game needs a policy: --policy random or --policy module:Name)"
        )
    return EXPERTS[name]()


# The policy names ``load_policy`` knows besides ``module:Name``.
POLICY_NAMES = ("expert", "random")


def load_policy(spec: str, game: str | Game, seed: int = 0) -> Policy:
    """The policy a command line names.

    Args:
        spec: ``"expert"`` (the game's scripted expert), ``"random"`` (uniform over the game's
            actions, seeded), or ``"module:Name"`` / ``"path/to/file.py:Name"``: a class, built
            with the :class:`~ilora.atari.games.Game` if its constructor takes an argument and
            with none otherwise, or a function or object that is itself the policy
            (``policy(observation) -> action name, index or Decision``). A module is imported
            with the current folder first on the path, as ``python -m`` does.
        game: The game the policy plays.
        seed: Seed of the random policy.

    Returns:
        A :class:`Policy`.

    Raises:
        IloraError: The game has no scripted expert, the module or name cannot be loaded, or
            what it names is not callable.
    """
    import importlib
    import importlib.util
    import inspect
    import sys
    from pathlib import Path

    game = get_game(game)
    if spec == "expert":
        return get_expert(game)
    if spec == "random":
        return RandomPolicy(game.action_names, seed=seed)
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise IloraError(f"--policy {spec!r}: expected {', '.join(POLICY_NAMES)} or module:Name (or file.py:Name)")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise IloraError(f"--policy {spec}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(str(Path.cwd()))
    except ImportError as err:
        raise IloraError(f"--policy {spec}: cannot import {where} ({err})") from err
    target = getattr(module, name, None)
    if target is None:
        raise IloraError(f"--policy {spec}: {where} has no attribute {name!r}")
    if inspect.isclass(target):
        takes_game = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(target).parameters.values()
        )
        target = target(game) if takes_game else target()
    if not isinstance(target, Policy):
        raise IloraError(f"--policy {spec}: {type(target).__name__} is not callable as policy(observation)")
    return target


@dataclass
class EpisodeRecord:
    """One finished episode.

    Attributes:
        episode: Episode index ``k`` (its seed is the run's ``k``-th seed).
        seed: The seed its environment was reset with.
        score: Total reward.
        length: Agent steps (decisions) taken; automatic FIRE presses are not counted.
        frames: Emulator frames played.
        invalid_answers: Steps whose answer named no valid action (played as NOOP).
        capped: Ended by the frame cap (or a step cap) rather than by the game.
        action_counts: Decisions per action name (automatic FIRE presses excluded).
        auto_fires: FIRE presses made by :class:`~ilora.atari.envs.FireOnReset`, not by the policy.
    """

    episode: int
    seed: int
    score: float = 0.0
    length: int = 0
    frames: int = 0
    invalid_answers: int = 0
    capped: bool = False
    action_counts: dict[str, int] = field(default_factory=dict)
    auto_fires: int = 0

    @property
    def invalid_rate(self) -> float:
        return self.invalid_answers / self.length if self.length else 0.0

    @property
    def fire_rate(self) -> float:
        """Share of decisions pressing FIRE (alone or with a direction): Breakout's launch rate."""
        fires = sum(n for name, n in self.action_counts.items() if "FIRE" in name)
        return fires / self.length if self.length else 0.0

    @property
    def counts_zero(self) -> bool:
        """The paper's rule: no valid answer in the whole episode, or the 30-minute cap was hit."""
        return self.capped or (self.length > 0 and self.invalid_answers == self.length)


@dataclass(frozen=True)
class StepEvent:
    """What :class:`EpisodeLoop` hands its ``on_step`` callback after each agent step."""

    env_index: int
    episode: int
    step: int  # agent step within the episode, from 0
    observation: Observation  # the observation the decision was made on
    decision: Decision
    valid: bool
    reward: float
    score: float  # the episode's score after this step (automatic FIRE presses after it not included)
    life_lost: bool  # a life was lost, or (Pong-like games) the opponent won the point


@dataclass
class Rollouts:
    """What an :class:`EpisodeLoop` played: finished episodes, emulator errors, where the time went."""

    records: list[EpisodeRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    policy_seconds: float = 0.0
    env_seconds: float = 0.0


class EpisodeLoop:
    """Episodes played with one policy on wrapped environments in lockstep.

    Each round, the policy answers every running environment at once (``act_batch``, e.g. the
    VLM agent with one batched model call) or one by one (a plain :class:`Policy`, whose
    ``reset()`` runs at every episode start, so a stateful plain policy needs one environment),
    in the order of the environments; then each environment steps. An environment whose episode
    ends starts the next episode at once, so episode ``k`` runs from ``reset(seed=seeds[k])``
    whichever environment plays it.

    Args:
        policy: A batch policy or a plain :class:`Policy`. Decisions may carry ``valid=False``
            (an unparsed answer played as NOOP); it is counted.
        envs: :func:`~ilora.atari.envs.wrapped_env` stacks of one game and settings (further
            wrapped as the run needs: :class:`~ilora.atari.envs.FireOnReset`, ``TimeLimit``).
        seeds: One reset seed per episode to play.
        see: What the policy sees of an observation (default: the observation itself).
        on_step: Called after every agent step with a :class:`StepEvent`.
        catch_env_errors: Record an emulator error and drop its environment (the episodes
            finished so far and those the other environments finish are kept) instead of raising.
    """

    def __init__(
        self,
        policy: Policy,
        envs: Sequence[gym.Env],
        seeds: Sequence[int],
        *,
        see: Callable[[Observation], Observation] | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
        catch_env_errors: bool = True,
    ) -> None:
        self.policy = policy
        self.envs = envs
        self.seeds = seeds
        self.see = see
        self.on_step = on_step
        self.catch_env_errors = catch_env_errors
        self.action_names = tuple(envs[0].unwrapped.get_action_meanings())
        self.frame_skip: int = envs[0].get_wrapper_attr("frame_skip")
        self.batched = callable(getattr(policy, "act_batch", None))
        self.played = Rollouts()
        self.next_episode = 0
        # Per running environment: its episode's record and the observation to decide on.
        self.running: dict[int, tuple[EpisodeRecord, Observation]] = {}

    def run(self, progress: str | None = None) -> Rollouts:
        """Play every episode; ``progress`` is the label of a progress bar over finished episodes (none if ``None``)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.seeds), desc=progress, unit="ep", disable=progress is None)
        try:
            for i in range(len(self.envs)):
                self._start(i)
            while self.running:
                order = sorted(self.running)
                seen = [self._seen(self.running[i][1]) for i in order]
                for i, observation, decision in zip(order, seen, self._decide(seen)):
                    if self._step(i, observation, decision):
                        bar.update(1)
                        self._start(i)
        finally:
            bar.close()
        self.played.records.sort(key=lambda r: r.episode)
        return self.played

    def _seen(self, observation: Observation) -> Observation:
        return observation if self.see is None else self.see(observation)

    def _decide(self, seen: list[Observation]) -> list[Decision]:
        start = time.perf_counter()
        if self.batched:
            decisions = self.policy.act_batch(seen)
        else:
            decisions = [to_decision(self.policy(observation), self.action_names) for observation in seen]
        self.played.policy_seconds += time.perf_counter() - start
        return decisions

    def _env_call(self, i: int, record: EpisodeRecord, call: Callable[[], tuple]) -> tuple | None:
        """``call()`` on environment ``i``, timed; an emulator error drops the environment (``None``)."""
        start = time.perf_counter()
        try:
            return call()
        except Exception as err:  # the emulator's own errors are not ours to classify
            if not self.catch_env_errors:
                raise
            self.running.pop(i, None)
            self.played.errors.append(f"environment {i} in episode {record.episode}: {type(err).__name__}: {err}")
            return None
        finally:
            self.played.env_seconds += time.perf_counter() - start

    def _add_auto_fires(self, record: EpisodeRecord, info: dict) -> None:
        fires = info.get(AUTO_FIRES, 0)
        record.auto_fires += fires
        record.score += info.get(AUTO_FIRE_REWARD, 0.0)
        record.frames += fires * self.frame_skip

    def _start(self, i: int) -> None:
        """Start the next episode (if any is left) on environment ``i``."""
        if self.next_episode >= len(self.seeds):
            return
        record = EpisodeRecord(episode=self.next_episode, seed=self.seeds[self.next_episode])
        self.next_episode += 1
        if not self.batched:
            reset_policy(self.policy)
        reset = self._env_call(i, record, lambda: self.envs[i].reset(seed=record.seed))
        if reset is not None:
            observation, info = reset
            self._add_auto_fires(record, info)
            self.running[i] = (record, observation)

    def _step(self, i: int, observation: Observation, decision: Decision) -> bool:
        """Play ``decision`` on environment ``i`` (``observation``: what it was decided on); True if the episode ended."""
        record = self.running[i][0]
        stepped = self._env_call(i, record, lambda: self.envs[i].step(self.action_names.index(decision.action)))
        if stepped is None:
            return False
        after, reward, terminated, truncated, info = stepped
        reward = float(reward)
        valid = bool(getattr(decision, "valid", True))
        step = record.length
        record.length += 1
        record.frames += self.frame_skip
        record.score += reward
        record.invalid_answers += not valid
        record.action_counts[decision.action] = record.action_counts.get(decision.action, 0) + 1
        if self.on_step is not None:
            life_lost = lost_life_or_point(after.game, reward, info)
            self.on_step(StepEvent(i, record.episode, step, observation, decision, valid, reward, record.score, life_lost))
        self._add_auto_fires(record, info)
        if terminated or truncated:
            record.capped = bool(truncated and not terminated)
            self.played.records.append(record)
            del self.running[i]
            return True
        self.running[i] = (record, after)
        return False


@dataclass(frozen=True)
class Step:
    """One agent step of a rollout: what was seen, what was decided, what followed."""

    observation: Observation
    decision: Decision
    reward: float
    life_lost: bool


@dataclass(frozen=True)
class Episode:
    """A finished (or capped) rollout."""

    score: float
    steps: list[Step]  # empty unless recorded
    length: int
    truncated: bool  # hit the environment's frame cap or the step cap


def run_episode(
    policy: Policy,
    env: TwoFrameEnv,
    seed: int,
    *,
    max_steps: int | None = None,
    record: bool = False,
    on_step: Callable[[Step], None] | None = None,
) -> Episode:
    """Play one episode of ``env`` with ``policy`` from ``reset(seed=seed)`` (an :class:`EpisodeLoop` of one).

    Args:
        policy: Any :class:`Policy`; its ``reset()`` (if any) is called first.
        env: The two-frame environment.
        seed: Episode seed (the episode is reproducible from it alone).
        max_steps: Stop after this many agent steps (counted as truncated).
        record: Keep every :class:`Step` (frames included) in the result.
        on_step: Called with every :class:`Step` as it happens (to keep a compact record instead).

    Returns:
        The episode's score, length and (if recorded) steps.

    Raises:
        Exception: The emulator's errors, as raised.
    """
    steps: list[Step] = []

    def keep(event: StepEvent) -> None:
        step = Step(event.observation, event.decision, event.reward, event.life_lost)
        if record:
            steps.append(step)
        if on_step is not None:
            on_step(step)

    wrapped = env.wrapped if max_steps is None else TimeLimit(env.wrapped, max_steps)
    played = EpisodeLoop(policy, [wrapped], [seed], on_step=keep, catch_env_errors=False).run()
    (episode,) = played.records
    return Episode(episode.score, steps, episode.length, episode.capped)


# Two-sided 97.5% Student-t quantiles for small samples (df = n - 1); the normal 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student t; 0 for a single value).

    Args:
        values: Per-episode scores.

    Returns:
        ``(mean, half_width)``.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise IloraError("mean_ci95: no values")
    if x.size == 1:
        return float(x[0]), 0.0
    t = _T975[x.size - 2] if x.size - 2 < len(_T975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / np.sqrt(x.size))
