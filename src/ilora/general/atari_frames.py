"""Frames of Atari games under a random policy, with game-agnostic questions.

Frames come from ``gymnasium`` + ``ale_py`` directly (210x160 RGB, the original screen).
The split is by episode *and* by pixels: a frame is in a split only if both its episode's
``(game, episode seed)`` key and its own pixels hash to that split. So a held-out frame
never shares an episode with a training frame, and never equals one either (episodes of a
game do pass through identical screens, e.g. before a serve). Nothing is written to disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ilora.errors import IloraError
from ilora.general.splits import Split, content_key, family_rng, split_of

# Games with varied screens; the experiment's own games can be left out by the caller.
DEFAULT_GAMES: tuple[str, ...] = (
    "Alien", "Asterix", "BattleZone", "Bowling", "Boxing", "Breakout", "ChopperCommand",
    "CrazyClimber", "DemonAttack", "Enduro", "Freeway", "Frostbite", "MsPacman", "Pong",
    "Qbert", "Riverraid", "Seaquest", "Skiing", "SpaceInvaders", "Tennis",
)  # fmt: skip

LUMA = np.array([0.299, 0.587, 0.114])
# Mean luma (0-255) above / below which a screen is "bright" / "dark"; frames in between
# are not asked about, so the answer is never a coin flip near a threshold.
BRIGHT_ABOVE, DARK_BELOW = 85.0, 55.0


@dataclass(frozen=True)
class AtariFrame:
    """One screen: the game it is from, the episode it came from and the pixels."""

    game: str
    episode_seed: int
    step: int
    pixels: np.ndarray  # (210, 160, 3) uint8
    digest: str  # hash of the pixels


def pixels_digest(pixels: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class FrameSampling:
    """How frames are drawn from random-policy episodes."""

    frames_per_episode: int = 8
    # random steps before the first kept frame; the minimum skips the start screens that
    # every episode of a game shares
    min_warmup_steps: int = 30
    max_warmup_steps: int = 150
    min_stride: int = 4  # env steps between kept frames (each step is 4 emulator frames in v5)
    max_stride: int = 16


def make_env(game: str):
    """``ALE/<game>-v5`` with RGB observations and no sticky actions, or an IloraError naming the game.

    Without sticky actions an episode is (almost: a few games keep state across resets)
    a function of its action sequence, which is what the split hashes.
    """
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    try:
        return gym.make(f"ALE/{game}-v5", repeat_action_probability=0.0)
    except gym.error.Error as err:
        raise IloraError(f"game {game!r}: not an ALE game id ({err})") from err


def episode_frames(game: str, seed: int, split: Split, sampling: FrameSampling) -> Iterator[AtariFrame]:
    """An endless stream of frames of ``game`` from random-policy episodes whose key falls in ``split``.

    Each episode's actions come from its own ``episode_seed``, the episode's split key;
    a sampled frame is kept only if its pixels hash to ``split`` too.
    The emulator is seeded once per stream (a seeded reset reloads the ROM, ~0.1 s) and
    later episodes start with a plain reset (~5 ms).
    """
    stream = family_rng(seed, "atari", game)
    env = make_env(game)
    try:
        env.reset(seed=int(stream.integers(2**31)))
        n_actions = env.action_space.n
        while True:
            episode_seed = int(stream.integers(2**63))
            if split_of(content_key(("atari", game, episode_seed))) != split:
                continue
            actions = np.random.default_rng(episode_seed)
            env.reset()
            steps_to_next = int(actions.integers(sampling.min_warmup_steps, sampling.max_warmup_steps + 1))
            step = kept = 0
            while kept < sampling.frames_per_episode:
                obs, _, terminated, truncated, _ = env.step(int(actions.integers(n_actions)))
                step += 1
                if terminated or truncated:
                    break
                steps_to_next -= 1
                if steps_to_next == 0:
                    digest = pixels_digest(obs)
                    if split_of(content_key(("atari_frame", game, digest))) == split:
                        yield AtariFrame(game, episode_seed, step, obs, digest)
                        kept += 1
                    steps_to_next = int(actions.integers(sampling.min_stride, sampling.max_stride + 1))
    finally:
        env.close()


def interleaved_frames(
    games: tuple[str, ...] | list[str], seed: int, split: Split, sampling: FrameSampling
) -> Iterator[AtariFrame]:
    """Frames round-robin over ``games`` (one frame of each in turn) so every game is equally common."""
    if not games:
        raise IloraError("games: the Atari frame families need at least one game")
    streams = [episode_frames(g, seed, split, sampling) for g in games]
    try:
        while True:
            for stream in streams:
                yield next(stream)
    finally:
        for stream in streams:
            stream.close()


# name -> (frame -> (prompt, answer) or None when the frame cannot carry the question)
AtariFamily = Callable[[AtariFrame], "tuple[str, str] | None"]
ATARI_FAMILIES: dict[str, AtariFamily] = {}


def register_atari_family(name: str) -> Callable[[AtariFamily], AtariFamily]:
    def add(fn: AtariFamily) -> AtariFamily:
        ATARI_FAMILIES[name] = fn
        return fn

    return add


@register_atari_family("atari_game")
def game_question(frame: AtariFrame) -> tuple[str, str]:
    """Which game a screen is from; the answer is the ALE game name, e.g. ``SpaceInvaders``."""
    return "Which game is this?", frame.game


def screen_brightness(pixels: np.ndarray) -> float:
    """Mean luma of an RGB frame, 0-255."""
    return float((pixels.reshape(-1, 3) @ LUMA).mean())


@register_atari_family("atari_brightness")
def brightness_question(frame: AtariFrame) -> tuple[str, str] | None:
    """Whether a screen is mostly dark or bright (skipped near the threshold)."""
    luma = screen_brightness(frame.pixels)
    if DARK_BELOW <= luma <= BRIGHT_ABOVE:
        return None
    return "Is the screen mostly dark or bright?", "bright" if luma > BRIGHT_ABOVE else "dark"


def atari_prompt_vocabulary(games: tuple[str, ...] | list[str]) -> list[str]:
    """Every prompt/answer text the Atari families can produce for ``games``."""
    return ["Which game is this?", "Is the screen mostly dark or bright?", "dark", "bright", *games]
