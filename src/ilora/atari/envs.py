"""The two-frame view of a running game, as gymnasium wrappers: what a policy sees at each agent step.

The benchmark's observation is two native 210x160 RGB frames ``frame_skip`` emulator frames
apart (the later one is the frame to act on), plus the console RAM at both frames, which the
object-state text and the scripted experts read.

:func:`wrapped_env` stacks the wrappers on the game's ALE environment: :class:`TwoFrames`
(observations become :class:`Observation` s), :class:`LifeLoss` (``info["lives_lost"]`` from the
lives counter across the step) and, when asked, :class:`FireOnReset`. The episode cap is the
ALE's own ``max_num_frames_per_episode``: the step that reaches it returns ``truncated=True``,
as gymnasium's ``TimeLimit`` would, counted in emulator frames. :class:`TwoFrameEnv` drives such
a stack one step at a time and returns :class:`Transition` s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from ilora.atari.games import (
    DEFAULT_FRAME_SKIP,
    DEFAULT_MAX_EPISODE_FRAMES,
    DEFAULT_REPEAT_ACTION_PROBABILITY,
    Game,
    get_game,
    make_env,
)

# Info keys the wrappers add (never part of Observation.info, which is the ALE's own).
LIVES_LOST = "lives_lost"
AUTO_FIRES = "auto_fires"
AUTO_FIRE_REWARD = "auto_fire_reward"


@dataclass(frozen=True)
class Observation:
    """What a policy sees at one agent step.

    Attributes:
        frames: ``(earlier, later)`` RGB frames, each ``(210, 160, 3)`` uint8; act on ``later``.
            At the first step of an episode both are the reset frame.
        rams: ``(earlier, later)`` console RAM (128 uint8) at the same two moments.
        info: The environment's info dict for the later frame (``lives``, ``frame_number``...).
        game: The game being played.
    """

    frames: tuple[np.ndarray, np.ndarray]
    rams: tuple[np.ndarray, np.ndarray]
    info: dict
    game: Game

    @property
    def frame(self) -> np.ndarray:
        return self.frames[1]

    @property
    def ram(self) -> np.ndarray:
        return self.rams[1]


@dataclass(frozen=True)
class Transition:
    """The result of one agent step: the next observation and what happened on the way."""

    observation: Observation
    reward: float
    terminated: bool
    truncated: bool
    life_lost: bool  # a life was lost, or (Pong-like games) the opponent won the point

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


def lost_life_or_point(game: Game, reward: float, info: dict) -> bool:
    """A step's setback: a life lost (``info["lives_lost"]`` from :class:`LifeLoss`), or in games where a
    lost point ends the rally (Pong) a negative reward."""
    return bool(info[LIVES_LOST]) or (game.point_loss_ends_rally and reward < 0)


class TwoFrames(gym.Wrapper):
    """Observations become :class:`Observation` s: the frame before the step and after it, and the RAM at both.

    The previous observation is kept in ``last`` (settable, for environments restored from an
    emulator snapshot). The wrapped environment must be the game's ALE environment (its RAM is read).

    Args:
        env: The ALE environment of ``game``.
        game: The game, recorded in every observation.
        frame_skip: Emulator frames per step of ``env``; kept for the episode loop's frame count.
    """

    def __init__(self, env: gym.Env, game: Game, frame_skip: int) -> None:
        super().__init__(env)
        self.game = game
        self.frame_skip = frame_skip
        self.last: Observation | None = None

    def _ram(self) -> np.ndarray:
        return self.env.unwrapped.ale.getRAM().copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Observation, dict]:
        frame, info = self.env.reset(seed=seed, options=options)
        ram = self._ram()
        self.last = Observation((frame, frame), (ram, ram), dict(info), self.game)
        return self.last, info

    def step(self, action: int) -> tuple[Observation, float, bool, bool, dict]:
        if self.last is None:
            raise RuntimeError("call reset() before step()")
        frame, reward, terminated, truncated, info = self.env.step(action)
        previous = self.last
        self.last = Observation((previous.frame, frame), (previous.ram, self._ram()), dict(info), self.game)
        return self.last, reward, terminated, truncated, info


class LifeLoss(gym.Wrapper):
    """Adds ``info["lives_lost"]``: the ALE's lives counter went down during this step.

    The count before the step is read from the emulator, not remembered, so it stays right when
    the emulator's state is restored between steps.
    """

    def step(self, action: int) -> tuple[object, float, bool, bool, dict]:
        lives = self.env.unwrapped.ale.lives()
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated, truncated, {**info, LIVES_LOST: info.get("lives", 0) < lives}


class FireOnReset(gym.Wrapper):
    """The FireReset convention: press FIRE after a reset and after every lost life, in games that have FIRE.

    The reward of a step stays the chosen action's; the automatic presses are reported apart, in
    ``info["auto_fires"]`` (presses made) and ``info["auto_fire_reward"]`` (their reward), so a
    record can tell the policy's steps from the presses. A press after a lost life that ends the
    episode ends it. Needs :class:`LifeLoss` below it.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()
        self.fire: int | None = meanings.index("FIRE") if "FIRE" in meanings else None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[object, dict]:
        observation, info = self.env.reset(seed=seed, options=options)
        if self.fire is None:
            return observation, {**info, AUTO_FIRES: 0, AUTO_FIRE_REWARD: 0.0}
        # The episode is played from after the press even if the press reached the frame cap
        # (only a cap under two steps can): a reset has no way to report an ended episode.
        observation, reward, _, _, info = self.env.step(self.fire)
        return observation, {**info, AUTO_FIRES: 1, AUTO_FIRE_REWARD: float(reward)}

    def step(self, action: int) -> tuple[object, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.fire is None or terminated or truncated or not info[LIVES_LOST]:
            return observation, reward, terminated, truncated, {**info, AUTO_FIRES: 0, AUTO_FIRE_REWARD: 0.0}
        observation, fire_reward, terminated, truncated, fire_info = self.env.step(self.fire)
        # The step's own life loss is what it reports; the press's info (lives, frame) is the latest.
        return observation, reward, terminated, truncated, {
            **fire_info, LIVES_LOST: True, AUTO_FIRES: 1, AUTO_FIRE_REWARD: float(fire_reward),
        }


def wrapped_env(
    game: Game | str,
    *,
    frame_skip: int = DEFAULT_FRAME_SKIP,
    repeat_action_probability: float = DEFAULT_REPEAT_ACTION_PROBABILITY,
    max_episode_frames: int = DEFAULT_MAX_EPISODE_FRAMES,
    full_action_space: bool = False,
    fire_on_reset: bool = False,
) -> gym.Env:
    """The game's ALE environment under :class:`TwoFrames` and :class:`LifeLoss` (and :class:`FireOnReset`).

    Args:
        game: The game (or its name).
        frame_skip: Emulator frames per step; also the distance between the two frames.
        repeat_action_probability: Sticky-action probability (v5 default 0.25).
        max_episode_frames: Episode cap in emulator frames (the step reaching it is truncated).
        full_action_space: All 18 actions instead of the minimal set.
        fire_on_reset: Add :class:`FireOnReset`.

    Returns:
        The gymnasium environment; its observations are :class:`Observation` s.
    """
    game = get_game(game)
    env = make_env(
        game,
        frame_skip=frame_skip,
        full_action_space=full_action_space,
        repeat_action_probability=repeat_action_probability,
        max_episode_frames=max_episode_frames,
    )
    env = LifeLoss(TwoFrames(env, game, frame_skip))
    return FireOnReset(env) if fire_on_reset else env


@dataclass
class TwoFrameEnv:
    """A :func:`wrapped_env` stack driven one step at a time: ``reset`` gives an :class:`Observation`,
    ``step`` a :class:`Transition`.

    Args:
        game: The game (or its name).
        frame_skip: Emulator frames per agent step; also the distance between the two frames.
        repeat_action_probability: Sticky-action probability (v5 default 0.25).
        max_episode_frames: Episode cap in emulator frames.
        full_action_space: All 18 actions instead of the minimal set.
    """

    game: Game | str
    frame_skip: int = DEFAULT_FRAME_SKIP
    repeat_action_probability: float = DEFAULT_REPEAT_ACTION_PROBABILITY
    max_episode_frames: int = DEFAULT_MAX_EPISODE_FRAMES
    full_action_space: bool = False
    _env: gym.Env = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.game = get_game(self.game)
        self._env = wrapped_env(
            self.game,
            frame_skip=self.frame_skip,
            repeat_action_probability=self.repeat_action_probability,
            max_episode_frames=self.max_episode_frames,
            full_action_space=self.full_action_space,
        )
        self.action_names: tuple[str, ...] = tuple(self._env.unwrapped.get_action_meanings())

    @property
    def wrapped(self) -> gym.Env:
        """The gymnasium stack ``reset`` and ``step`` drive (wrap it further to play it in the episode loop)."""
        return self._env

    @property
    def _last(self) -> Observation | None:
        """The latest observation (set by a subclass that restores an emulator snapshot)."""
        return self._env.get_wrapper_attr("last")

    @_last.setter
    def _last(self, observation: Observation) -> None:
        self._env.set_wrapper_attr("last", observation)

    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode (seeded episodes are reproducible on their own)."""
        observation, _ = self._env.reset(seed=seed)
        return observation

    def step(self, action: int | str) -> Transition:
        """Repeat ``action`` (an index or a name) for ``frame_skip`` frames."""
        index = self.action_names.index(action) if isinstance(action, str) else int(action)
        observation, reward, terminated, truncated, info = self._env.step(index)
        life_lost = lost_life_or_point(self.game, reward, info)
        return Transition(observation, float(reward), bool(terminated), bool(truncated), life_lost)

    def close(self) -> None:
        self._env.close()
