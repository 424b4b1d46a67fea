"""Frames of Atari games under a random policy, with game-agnostic questions.

Frames come from ``ale_py`` (210x160 RGB, the original screen, 4 emulator frames per
step as in the ``ALE/<Game>-v5`` environments).
The split is by episode *and* by pixels: a frame is in a split only if both its episode's
``(game, episode seed)`` key and its own pixels hash to that split. So a held-out frame
never shares an episode with a training frame, and never equals one either (episodes of a
game do pass through identical screens, e.g. before a serve). Nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import re
import warnings
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
    """How frames are drawn from random-policy episodes (steps are ``FRAME_SKIP`` emulator frames, as in v5)."""

    frames_per_episode: int = 16
    # random steps before the first kept frame; the minimum skips the start screens that
    # every episode of a game shares
    min_warmup_steps: int = 30
    max_warmup_steps: int = 150
    min_stride: int = 3  # steps between sampled frames
    max_stride: int = 10
    max_episode_steps: int = 5_000


FRAME_SKIP = 4  # emulator frames per agent step, as in the ALE v5 environments


def rom_name(game: str) -> str:
    """ALE's ROM name of a v5 game id: ``SpaceInvaders`` -> ``space_invaders``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


def make_emulator(game: str, seed: int):
    """A seeded ALE emulator of ``game`` without sticky actions, or an IloraError naming the game.

    ALE is used directly rather than through ``gym.make``: the gym env loads the ROM twice
    to honour a seed (~0.1 s each), and renders every step. Without sticky actions an
    episode is (almost: a few games keep state across resets) a function of its actions.
    """
    import ale_py
    from ale_py import roms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_rom_path warns and returns None for unknown names
        path = roms.get_rom_path(rom_name(game))
    if path is None:
        raise IloraError(f"game {game!r}: not an ALE game (use v5 ids such as 'Pong', 'SpaceInvaders')")
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(path)
    return ale


def episode_frames(game: str, seed: int, split: Split, sampling: FrameSampling) -> Iterator[AtariFrame]:
    """An endless stream of frames of ``game`` from random-policy episodes in ``split``.

    Each episode's actions come from its own ``episode_seed``, the episode's split key;
    a sampled frame is kept only if its pixels hash to ``split`` too.
    """
    stream = family_rng(seed, "atari", game)
    ale = make_emulator(game, int(stream.integers(2**31)))
    action_set = ale.getMinimalActionSet()
    while True:
        episode_seed = int(stream.integers(2**63))
        if split_of(content_key(("atari", game, episode_seed))) != split:
            continue
        actions = np.random.default_rng(episode_seed)
        ale.reset_game()
        steps_to_next = int(actions.integers(sampling.min_warmup_steps, sampling.max_warmup_steps + 1))
        kept = 0
        for step in range(1, sampling.max_episode_steps + 1):
            action = action_set[actions.integers(len(action_set))]
            for _ in range(FRAME_SKIP):
                ale.act(action)
            if ale.game_over():
                break
            steps_to_next -= 1
            if steps_to_next > 0:
                continue
            steps_to_next = int(actions.integers(sampling.min_stride, sampling.max_stride + 1))
            pixels = ale.getScreenRGB()
            digest = pixels_digest(pixels)
            if split_of(content_key(("atari_frame", game, digest))) == split:
                yield AtariFrame(game, episode_seed, step, pixels, digest)
                kept += 1
                if kept == sampling.frames_per_episode:
                    break


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
