"""Gameplay videos: the frame the policy acted on, beside the answer it gave (GIF or MP4).

:class:`EpisodeRecorder` is an ``on_step`` callback for :func:`ilora.atari.evaluate.play_episodes`
that keeps one episode's frames and decisions; :func:`save_video` renders each step as the game
frame (scaled up) with a text panel beside it — step, score, action, and the model's answer
(its reasoning) wrapped — and writes a GIF (Pillow) or an MP4 (needs ``imageio-ffmpeg``).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ilora.atari.evaluate import StepEvent
from ilora.errors import IloraError

VIDEO_SUFFIXES = (".gif", ".mp4")
PANEL_WIDTH = 360
SCALE = 2
FONT_SIZE = 13


@dataclass(frozen=True)
class VideoStep:
    """One rendered step: the frame acted on and what was shown beside it."""

    frame: np.ndarray
    step: int
    score: float
    action: str
    valid: bool
    answer: str


@dataclass
class EpisodeRecorder:
    """Keeps the steps of one episode from a :func:`play_episodes` run (use as ``on_step``).

    Args:
        episode: Which episode to record (episode indices are fixed by the run's seeds).
        max_steps: Stop recording after this many steps (frames are kept in memory).
    """

    episode: int = 0
    max_steps: int = 2000
    steps: list[VideoStep] = field(default_factory=list)

    def __call__(self, event: StepEvent) -> None:
        if event.episode != self.episode or len(self.steps) >= self.max_steps:
            return
        self.steps.append(
            VideoStep(
                frame=event.observation.frame,
                step=event.step,
                score=event.score,
                action=event.decision.action,
                valid=event.valid,
                answer=event.decision.reasoning,
            )
        )


def render_step(step: VideoStep, game: str, font=None) -> np.ndarray:
    """The frame scaled by ``SCALE`` with the text panel on its right, as an RGB array."""
    from PIL import Image, ImageDraw, ImageFont

    font = font or ImageFont.load_default(size=FONT_SIZE)
    frame = Image.fromarray(step.frame).resize(
        (step.frame.shape[1] * SCALE, step.frame.shape[0] * SCALE), Image.Resampling.NEAREST
    )
    canvas = Image.new("RGB", (frame.width + PANEL_WIDTH, frame.height), (16, 16, 16))
    canvas.paste(frame, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y, line = frame.width + 10, 8, FONT_SIZE + 4
    header = [f"{game}  step {step.step}", f"score {step.score:g}", f"action {step.action}"]
    if not step.valid:
        header.append("(answer invalid: played NOOP)")
    for text in header:
        draw.text((x, y), text, fill=(255, 255, 255) if step.valid else (255, 120, 120), font=font)
        y += line
    y += line // 2
    chars = max(8, int((PANEL_WIDTH - 20) / (FONT_SIZE * 0.55)))
    for text in textwrap.wrap(step.answer or "(empty answer)", chars):
        if y + line > canvas.height:
            break
        draw.text((x, y), text, fill=(190, 220, 190), font=font)
        y += line
    return np.asarray(canvas)


def check_video_path(path: str | os.PathLike) -> Path:
    """Refuse a video path this module cannot write, before anything is played.

    Raises:
        IloraError: The suffix is not ``.gif``/``.mp4``, or MP4 is asked without ``imageio-ffmpeg``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise IloraError(f"{path}: video must end in {' or '.join(VIDEO_SUFFIXES)}")
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError as err:
            raise IloraError(f"{path}: writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); .gif works without") from err
    return path


def save_video(steps: list[VideoStep], path: str | os.PathLike, game: str, fps: int = 15) -> Path:
    """Write the recorded steps as a GIF or MP4 (chosen by the suffix), atomically.

    Args:
        steps: Recorded steps, in order.
        path: Destination ending in ``.gif`` or ``.mp4``.
        game: Game name for the panel.
        fps: Playback frames per second (one video frame per agent step).

    Returns:
        The written path.

    Raises:
        IloraError: Unknown suffix, nothing recorded, or MP4 without ``imageio-ffmpeg``.
    """
    import imageio.v3 as iio

    path = check_video_path(path)
    suffix = path.suffix.lower()
    if not steps:
        raise IloraError(f"{path}: no step was recorded, nothing to write")
    frames = np.stack([render_step(s, game) for s in steps])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{suffix}")
    try:
        if suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
