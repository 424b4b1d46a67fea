"""The two-frame view of a running game: what a policy sees at each agent step.

The benchmark's observation is two native 210x160 RGB frames ``frame_skip`` emulator frames
apart (the later one is the frame to act on), plus the console RAM at both frames, which the
object-state text and the scripted experts read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ilora.atari.games import (
    DEFAULT_FRAME_SKIP,
    DEFAULT_MAX_EPISODE_FRAMES,
    DEFAULT_REPEAT_ACTION_PROBABILITY,
    Game,
    get_game,
    make_env,
)


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


@dataclass
class TwoFrameEnv:
    """An ALE environment that keeps the previous frame and RAM, yielding :class:`Observation` s.

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
    _env: object = field(init=False, repr=False)
    _last: Observation | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.game = get_game(self.game)
        self._env = make_env(
            self.game,
            frame_skip=self.frame_skip,
            full_action_space=self.full_action_space,
            repeat_action_probability=self.repeat_action_probability,
            max_episode_frames=self.max_episode_frames,
        )
        self.action_names: tuple[str, ...] = tuple(self._env.unwrapped.get_action_meanings())

    def _ram(self) -> np.ndarray:
        return self._env.unwrapped.ale.getRAM().copy()

    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode (seeded episodes are reproducible on their own)."""
        frame, info = self._env.reset(seed=seed)
        ram = self._ram()
        self._last = Observation((frame, frame), (ram, ram), dict(info), self.game)
        return self._last

    def step(self, action: int | str) -> Transition:
        """Repeat ``action`` (an index or a name) for ``frame_skip`` frames."""
        if self._last is None:
            raise RuntimeError("call reset() before step()")
        index = self.action_names.index(action) if isinstance(action, str) else int(action)
        frame, reward, terminated, truncated, info = self._env.step(index)
        previous = self._last
        self._last = Observation((previous.frame, frame), (previous.ram, self._ram()), dict(info), self.game)
        lives_lost = info.get("lives", 0) < previous.info.get("lives", 0)
        point_lost = self.game.point_loss_ends_rally and reward < 0
        return Transition(self._last, float(reward), bool(terminated), bool(truncated), lives_lost or point_lost)

    def close(self) -> None:
        self._env.close()
