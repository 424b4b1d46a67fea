"""Scoring any policy on a game: many environments in lockstep, per-episode records, a summary.

One path scores everything the experiment compares — a VLM agent, a scripted expert, a random
policy — so their numbers are comparable by construction:

- :func:`play_episodes` runs ``n_envs`` wrapped environments side by side in the episode loop
  (:class:`~ilora.atari.experts.EpisodeLoop`). Each step, the policy answers all running
  environments at once (:class:`~ilora.atari.agent.BatchPolicy`, e.g. the VLM agent with one
  batched model call) or one by one (any plain :class:`~ilora.atari.experts.Policy`). Episode
  ``k`` always starts from ``reset(seed=seed + k)`` whichever environment plays it, so results
  do not depend on ``n_envs`` for a policy that answers each observation on its own.
- :func:`summarize` turns the records into the reported numbers: mean score with a 95% Student-t
  interval, the human-normalised score, the invalid-answer rate, the action histogram, and the
  paper's rule (an episode that produced no valid answer, or hit the frame cap, scores 0) beside
  the plain mean.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ilora.atari.envs import Observation, wrapped_env
from ilora.atari.experts import EpisodeLoop, EpisodeRecord, Policy, StepEvent, mean_ci95
from ilora.atari.games import (
    DEFAULT_FRAME_SKIP,
    DEFAULT_MAX_EPISODE_FRAMES,
    DEFAULT_REPEAT_ACTION_PROBABILITY,
    Game,
    get_game,
)
from ilora.errors import IloraError
from ilora.fileio import to_json


@dataclass
class PlayResult:
    """The records of a run, what it was run with, where its time went, and any emulator error."""

    game: str
    records: list[EpisodeRecord]
    settings: dict
    errors: list[str] = field(default_factory=list)
    policy_seconds: float = 0.0
    env_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return sum(r.length for r in self.records)


def _policy_settings(policy) -> dict:
    settings = getattr(policy, "settings", None)
    return dict(settings) if isinstance(settings, dict) else {"policy": type(policy).__name__}


def play_episodes(
    policy: Policy,
    game: Game | str,
    n_episodes: int,
    seed: int = 0,
    *,
    n_envs: int = 8,
    max_frames: int = DEFAULT_MAX_EPISODE_FRAMES,
    fire_on_reset: bool = False,
    blank_frames: bool = False,
    frame_skip: int = DEFAULT_FRAME_SKIP,
    repeat_action_probability: float = DEFAULT_REPEAT_ACTION_PROBABILITY,
    on_step: Callable[[StepEvent], None] | None = None,
    progress: bool = True,
) -> PlayResult:
    """Play ``n_episodes`` episodes of ``game`` with ``policy`` on ``n_envs`` environments in lockstep.

    Args:
        policy: A batch policy (``act_batch(observations)``, e.g. :class:`~ilora.atari.agent.VLMAgent`)
            or any plain policy (called per observation; its ``reset()`` runs at every episode
            start, so a stateful plain policy needs ``n_envs=1``). Decisions may carry
            ``valid=False`` (an unparsed answer played as NOOP); it is counted.
        game: The game or its name.
        n_episodes: Episodes to finish; finished environments restart until all have started.
        seed: Episode ``k`` is reset with ``seed + k``.
        n_envs: Environments run side by side (at most ``n_episodes`` are created).
        max_frames: Episode cap in emulator frames (default 108,000 = the paper's 30 minutes).
        fire_on_reset: The FireReset convention (:class:`~ilora.atari.envs.FireOnReset`): press
            FIRE automatically after a reset and after every lost life (games with FIRE only). It
            changes scores a lot in Breakout-like games (a cloned agent that never launches the
            ball scores 0), so it is recorded in the settings and reported with every score.
        blank_frames: Replace both frames by black frames before the policy sees them (the RAM is
            untouched): the "does the model read the images" check.
        frame_skip: Emulator frames per step, also the distance between the two frames.
        repeat_action_probability: Sticky actions (v5 default 0.25).
        on_step: Called after every agent step with a :class:`~ilora.atari.experts.StepEvent` (videos, traces).
        progress: Show a progress bar over finished episodes.

    Returns:
        A :class:`PlayResult`. If the emulator fails, the failing environment is dropped, the
        error is recorded in ``errors`` and the episodes finished so far (and those the other
        environments go on to finish) are kept.
    """
    game = get_game(game)
    if n_episodes < 1:
        raise IloraError(f"n_episodes must be >= 1, got {n_episodes}")
    if n_envs < 1:
        raise IloraError(f"n_envs must be >= 1, got {n_envs}")
    if max_frames < frame_skip:
        raise IloraError(f"max_frames ({max_frames}) must be at least one step of {frame_skip} frames")
    envs = [
        wrapped_env(
            game,
            frame_skip=frame_skip,
            repeat_action_probability=repeat_action_probability,
            max_episode_frames=max_frames,
            fire_on_reset=fire_on_reset,
        )
        for _ in range(min(n_envs, n_episodes))
    ]
    settings = {
        **_policy_settings(policy),
        "game": game.name,
        "episodes": n_episodes,
        "seed": seed,
        "n_envs": len(envs),
        "max_frames": max_frames,
        "frame_skip": frame_skip,
        "repeat_action_probability": repeat_action_probability,
        "fire_on_reset": fire_on_reset,
        "blank_frames": blank_frames,
    }
    loop = EpisodeLoop(
        policy, envs, [seed + k for k in range(n_episodes)], see=_blank if blank_frames else None, on_step=on_step
    )
    try:
        played = loop.run(f"{game.name} episodes" if progress else None)
    finally:
        for env in envs:
            env.close()
    return PlayResult(game.name, played.records, settings, played.errors, played.policy_seconds, played.env_seconds)


def _blank(observation: Observation) -> Observation:
    black = np.zeros_like(observation.frames[1])
    return dataclasses.replace(observation, frames=(black, black))


@dataclass(frozen=True)
class Summary:
    """The reported numbers for one game and one policy.

    ``ci_low``/``ci_high``: 95% Student-t interval of the mean score, ``mean ± t(0.975, n-1)·s/√n``
    (:func:`ilora.atari.experts.mean_ci95`, the same interval the expert table reports; zero
    width for a single episode, so read it with ``episodes``).
    ``mean_zero_rule``: the mean when episodes that produced no valid answer or hit the frame
    cap count 0 (the paper's rule); ``hns``/``hns_zero_rule``: their human-normalised values.
    """

    game: str
    episodes: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    median: float
    hns: float
    mean_zero_rule: float
    hns_zero_rule: float
    zero_rule_episodes: int
    capped_episodes: int
    invalid_rate: float
    never_parsed: bool
    fire_rate: float
    mean_length: float
    action_share: dict[str, float]
    random_score: float
    human_score: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(records: Sequence[EpisodeRecord], game: Game | str) -> Summary:
    """The reported numbers for a run's records (see :class:`Summary`).

    Raises:
        IloraError: No episode finished (nothing to summarise).
    """
    game = get_game(game)
    if not records:
        raise IloraError(f"{game.name}: no finished episode to summarise")
    scores = np.array([r.score for r in records], dtype=float)
    zeroed = np.array([0.0 if r.counts_zero else r.score for r in records])
    steps = sum(r.length for r in records)
    invalid = sum(r.invalid_answers for r in records)
    counts: Counter = Counter()
    for r in records:
        counts.update(r.action_counts)
    mean, half = mean_ci95(scores)
    return Summary(
        game=game.name,
        episodes=len(records),
        mean=mean,
        std=float(scores.std(ddof=1)) if len(scores) > 1 else math.nan,
        ci_low=mean - half,
        ci_high=mean + half,
        median=float(np.median(scores)),
        hns=game.human_normalized(mean),
        mean_zero_rule=float(zeroed.mean()),
        hns_zero_rule=game.human_normalized(float(zeroed.mean())),
        zero_rule_episodes=sum(r.counts_zero for r in records),
        capped_episodes=sum(r.capped for r in records),
        invalid_rate=invalid / steps if steps else 0.0,
        never_parsed=steps > 0 and invalid == steps,
        fire_rate=sum(n for name, n in counts.items() if "FIRE" in name) / steps if steps else 0.0,
        mean_length=steps / len(records),
        action_share={name: counts[name] / steps for name in game.action_names if steps},
        random_score=game.random_score,
        human_score=game.human_score,
    )


def save_result(path: str | os.PathLike, result: PlayResult, summary: Summary) -> Path:
    """Write the summary, the run's settings, its errors and every episode record as JSON (atomically)."""
    path = Path(path)
    payload = {
        "summary": summary.to_dict(),
        "settings": result.settings,
        "errors": result.errors,
        "records": [dataclasses.asdict(r) for r in result.records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(to_json(payload))  # strict JSON: a one-episode std is NaN, written as null
    tmp.replace(path)
    return path


def format_summary(summary: Summary, settings: dict | None = None) -> str:
    """A plain-text table of the summary (and the run's settings that change scores)."""
    s = summary
    lines = [
        f"game                 {s.game}",
        f"episodes             {s.episodes}",
        f"score                {s.mean:.2f}  (95% CI {s.ci_low:.2f} .. {s.ci_high:.2f}; median {s.median:.2f})",
        f"human-normalised     {s.hns:.3f}  (random {s.random_score:g}, human {s.human_score:g})",
        (
            f"paper's zero rule    {s.mean_zero_rule:.2f}  (HNS {s.hns_zero_rule:.3f}; "
            f"{s.zero_rule_episodes} episode(s) counted 0, {s.capped_episodes} capped)"
        ),
        f"invalid answers      {100 * s.invalid_rate:.2f}% of steps",
        f"FIRE rate            {100 * s.fire_rate:.2f}% of steps",
        f"mean length          {s.mean_length:.1f} steps",
        "actions              " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s.action_share.items()),
    ]
    if s.never_parsed:
        lines.append("WARNING              no answer named a valid action: every step was played as NOOP")
    if settings:
        shown = ("policy", "model", "adapter", "mode", "reasoning", "object_text", "fire_on_reset", "blank_frames", "max_frames", "seed")
        lines.append("settings             " + ", ".join(f"{k}={settings[k]}" for k in shown if k in settings))
    return "\n".join(lines)


@dataclass(frozen=True)
class PlayPrompt:
    """The game and prompt a VLM agent plays with, and what to warn the user about.

    Attributes:
        game: The game's name.
        object_text: The object-state text is in the prompt.
        reasoning: The agent asks for reasoning answers (generate mode only).
        mode: ``"score"`` or ``"generate"`` (see :class:`~ilora.atari.agent.VLMAgent`).
        warnings: One line per setting the user chose against the recorded one.
    """

    game: str
    object_text: bool
    reasoning: bool
    mode: str
    warnings: tuple[str, ...] = ()


def recorded_prompt(model: str | os.PathLike, adapter: str | os.PathLike | None):
    """The prompt settings an adapter (or a merged model folder) was trained with, and where they are.

    Args:
        model: The model folder, ``builtin`` or a hub id (a folder of ``ilora merge --save-model``
            records its inputs' settings).
        adapter: A PEFT adapter folder (``ilora train`` records its task data's settings), or ``None``.

    Returns:
        ``(settings, where)``: the :class:`~ilora.prompt_settings.PromptSettings` (``None`` when
        neither folder records any) and the folder(s) they come from.

    Raises:
        IloraError: The model and the adapter record different prompts, or a record is malformed.
    """
    from ilora.prompt_settings import combine_prompt_settings, read_prompt_settings

    folders = [str(f) for f in (model, adapter) if f is not None and Path(f).is_dir()]
    named = [(folder, read_prompt_settings(folder)) for folder in folders]
    settings = combine_prompt_settings(named)
    return settings, " and ".join(where for where, s in named if s is not None)


def play_prompt(
    recorded,
    where: str = "",
    *,
    game: str | None = None,
    object_text: bool | None = None,
    reasoning: bool | None = None,
    mode: str | None = None,
) -> PlayPrompt:
    """The prompt to play with: what the user asked for, the recorded settings for the rest.

    Without a record, the defaults are the plain ones: no object text, score mode with direct
    answers (generate mode asks for reasoning). A recorded prompt the agent cannot reproduce
    (another row layout or frame skip) is refused; a setting the user gave against the record
    is played as asked, with a warning.

    Args:
        recorded: The :class:`~ilora.prompt_settings.PromptSettings` the model was trained with, or ``None``.
        where: The folder(s) the record comes from, for messages.
        game: ``--game``; default the recorded game when there is exactly one.
        object_text: ``--object-text`` / ``--no-object-text``, or ``None``.
        reasoning: ``--reasoning`` / ``--no-reasoning``, or ``None``.
        mode: ``--mode``, or ``None``: generate when reasoning answers are played, else score.

    Returns:
        The :class:`PlayPrompt`.

    Raises:
        IloraError: No game given or recorded, or a record the agent cannot play.
    """
    from ilora.prompt_settings import PROMPT_SETTINGS_FILE, ROW_LAYOUT

    notes = []
    if recorded is not None:
        record = f"{where}/{PROMPT_SETTINGS_FILE}" if where else PROMPT_SETTINGS_FILE
        if recorded.row_layout != ROW_LAYOUT:
            raise IloraError(
                f"{record}: trained on rows of layout {recorded.row_layout}, and play builds layout {ROW_LAYOUT}; "
                "retrain on newly collected data"
            )
        if recorded.frame_skip != DEFAULT_FRAME_SKIP:
            raise IloraError(
                f"{record}: trained on frames {recorded.frame_skip} apart, and the agent's prompt and play use "
                f"{DEFAULT_FRAME_SKIP}"
            )
    if game is None:
        if recorded is None or len(recorded.games) != 1:
            trained = f" ({where} was trained on {', '.join(recorded.games)})" if recorded is not None else ""
            raise IloraError(f"--game: name the game to play{trained}")
        game = recorded.games[0]
    game = get_game(game).name
    if recorded is not None and game not in recorded.games:
        notes.append(f"{where} was trained on {', '.join(recorded.games)}; playing {game} as asked")

    def choose(name: str, given: bool | None, default: bool) -> bool:
        if given is None:
            return getattr(recorded, name) if recorded is not None else default
        if recorded is not None and given != getattr(recorded, name):
            notes.append(f"{where} was trained with {name}={getattr(recorded, name)}; playing {name}={given} as asked")
        return given

    object_text = choose("object_text", object_text, False)
    if mode == "score" and reasoning is None and recorded is not None and recorded.reasoning:
        notes.append(f"{where} was trained on reasoning answers; --mode score ranks direct answers as asked")
        reasoning = False
    else:
        reasoning = choose("reasoning", reasoning, mode == "generate")
    return PlayPrompt(game, object_text, reasoning, mode or ("generate" if reasoning else "score"), tuple(notes))
