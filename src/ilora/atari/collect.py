"""Rollouts of a policy (a scripted expert, or any :class:`~ilora.atari.experts.Policy`) -> a Hugging
Face ``datasets`` dataset of two-frame prompts and answers, with its :class:`~ilora.prompt_settings.PromptSettings`.

Each row is one agent step: ``images`` (the earlier and later native 210x160 RGB frames,
``frame_skip`` emulator frames apart), ``context`` (the game's constant text, placed before the
images: :func:`~ilora.atari.prompts.build_context`), ``prompt`` (the per-step text after the
images: :func:`~ilora.atari.prompts.build_step_prompt`), ``answer`` (reasoning + ``Action: NAME``,
or direct), the ``action`` name and metadata (``game``, ``episode``, ``step``, ``score_so_far``,
``object_text``, ``reasoning``). Following the paper, the opening steps and the steps that lead
into a lost life (or lost point) are removed; steps around rare actions (Breakout's FIRE) are
always kept, and can be repeated for label balance.

Episode ``i`` is played from ``reset(seed=seed + i)``, so each episode is reproducible on its own;
that is what makes collection resumable: episodes already on disk are kept, missing ones are
played, and the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ilora.atari.envs import TwoFrameEnv
from ilora.atari.experts import POLICY_NAMES, Policy, Step, load_policy, run_episode
from ilora.atari.games import (
    DEFAULT_FRAME_SKIP,
    DEFAULT_REPEAT_ACTION_PROBABILITY,
    get_game,
)
from ilora.atari.prompts import build_answer, build_context, build_step_prompt
from ilora.atari.ram import READERS, has_object_text
from ilora.atari.ram import object_text as ram_object_text
from ilora.config import field, to_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_dir, atomic_write_text

# The record is shared by every layer; collect re-exports it (and ROW_LAYOUT) for its readers.
from ilora.prompt_settings import PROMPT_SETTINGS_FILE, ROW_LAYOUT, PromptSettings, read_prompt_settings  # noqa: F401


def prompt_settings_of(config: CollectConfig) -> PromptSettings:
    """The :class:`~ilora.prompt_settings.PromptSettings` of the rows ``config`` collects."""
    return PromptSettings((config.game,), config.object_text, config.reasoning, config.frame_skip, ROW_LAYOUT)


def collected_dataset(path: str | Path) -> Path:
    """The ``datasets`` folder of a collection: ``path`` itself, or ``path/dataset`` when ``path``
    is the folder ``ilora collect --out`` wrote."""
    path = Path(path)
    if (path / "collect_config.json").is_file() and (path / "dataset").is_dir():
        return path / "dataset"
    return path


@dataclass
class CollectConfig:
    """How expert data is collected for one game."""

    game: str = field("Pong", help="Catalogued game name (see ilora.atari.games.GAMES).")
    episodes: int = field(10, help="Number of episodes to play.")
    seed: int = field(0, help="Episode i is played from reset(seed=seed + i).")
    policy: str = field(
        "expert", help=f"Who plays: {' or '.join(POLICY_NAMES)} or module:Name (ilora.atari.experts.load_policy)."
    )
    # The default experiment's prompt (configs/default.yaml: object text on, direct answers):
    # the shipped base learns a game from it in minutes, and its play ranks direct answers.
    object_text: bool = field(True, help="Put the RAM object-state text in the prompt.")
    reasoning: bool = field(False, help="Answers give reasoning before 'Action: NAME' (else direct).")
    max_steps: int | None = field(None, help="Cap on agent steps per episode (None: the env's frame cap).")
    drop_first: int = field(8, help="Opening agent steps removed from every episode.")
    drop_before_failure: int = field(
        8, help="Agent steps removed before (and including) each lost life or lost point."
    )
    rare_share: float = field(
        0.02, help="An action taken in fewer than this share of an episode's steps counts as rare."
    )
    rare_window: int = field(2, help="Steps within this distance of a rare action are never removed.")
    rare_repeat: int = field(1, help="Rows whose action is rare are written this many times (label balance).")
    frame_skip: int = field(DEFAULT_FRAME_SKIP, help="Emulator frames per step = distance between the two images.")
    repeat_action_probability: float = field(
        DEFAULT_REPEAT_ACTION_PROBABILITY, help="Sticky-action probability (ALE v5 default 0.25; 0 = deterministic)."
    )

    def __post_init__(self) -> None:
        self.game = get_game(self.game).name
        for name in ("episodes", "rare_repeat"):
            if getattr(self, name) < 1:
                raise IloraError(f"collect: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("drop_first", "drop_before_failure", "rare_window"):
            if getattr(self, name) < 0:
                raise IloraError(f"collect: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise IloraError(f"collect: max_steps must be >= 1, got {self.max_steps}")
        # Checked here, not at the first row: the rows are built after the whole episode is played.
        if self.object_text and not has_object_text(self.game):
            raise IloraError(
                f"collect: object_text needs a RAM reader and {self.game} has none "
                f"(games with one: {', '.join(sorted(READERS))}); use --no-object-text"
            )


def dataset_features():
    """The row schema shared by every collected dataset."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "images": List(Image()),
            "context": Value("string"),
            "prompt": Value("string"),
            "answer": Value("string"),
            "action": Value("string"),
            "game": Value("string"),
            "episode": Value("int32"),
            "step": Value("int32"),
            "score_so_far": Value("float32"),
            "object_text": Value("bool"),
            "reasoning": Value("bool"),
        }
    )


def keep_mask(actions: list[str], failures: list[bool], config: CollectConfig) -> np.ndarray:
    """Which steps of an episode become rows.

    Args:
        actions: The action taken at each step.
        failures: Whether each step's transition lost a life (or a point).
        config: Supplies the drop windows and the rare-action rule.

    Returns:
        Boolean mask over steps.
    """
    n = len(actions)
    keep = np.ones(n, dtype=bool)
    keep[: config.drop_first] = False
    for t in np.flatnonzero(failures):
        keep[max(0, t - config.drop_before_failure + 1) : t + 1] = False
    counts = Counter(actions)
    rare = {a for a, c in counts.items() if c < config.rare_share * n}
    for t in (t for t, a in enumerate(actions) if a in rare):
        keep[max(0, t - config.rare_window) : t + config.rare_window + 1] = True
    return keep


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class _StepRecord:
    """What collection keeps of a step: PNG-encoded frames (not arrays) keep long episodes small."""

    pngs: tuple[bytes, bytes]
    rams: tuple[np.ndarray, np.ndarray]
    action: str
    reasoning: str
    reward: float
    life_lost: bool


class _Recorder:
    """``on_step`` callback for :func:`run_episode` that encodes each frame once."""

    def __init__(self) -> None:
        self.records: list[_StepRecord] = []
        self._last: tuple[np.ndarray, bytes] | None = None  # the previous later frame and its PNG

    def _encode(self, frame: np.ndarray) -> bytes:
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        return _png(frame)

    def __call__(self, step: Step) -> None:
        earlier, later = step.observation.frames
        pngs = (self._encode(earlier), _png(later) if later is not earlier else self._encode(earlier))
        self._last = (later, pngs[1])
        d = step.decision
        self.records.append(_StepRecord(pngs, step.observation.rams, d.action, d.reasoning, step.reward, step.life_lost))


def episode_rows(records: list[_StepRecord], index: int, config: CollectConfig) -> dict[str, list]:
    """Columns (images as PNG bytes) for the kept steps of one episode."""
    actions = [r.action for r in records]
    keep = keep_mask(actions, [r.life_lost for r in records], config)
    rare = {a for a, c in Counter(actions).items() if c < config.rare_share * len(actions)}
    context = build_context(config.game, frame_skip=config.frame_skip)
    prompt_plain = build_step_prompt(reasoning=config.reasoning)
    columns: dict[str, list] = {name: [] for name in dataset_features()}
    score = 0.0
    if config.reasoning and any(keep[t] and not r.reasoning.strip() for t, r in enumerate(records)):
        raise IloraError(
            "collect: reasoning answers asked for, but the policy gave no reasoning text with its actions; "
            "collect direct answers (--no-reasoning)"
        )
    for t, record in enumerate(records):
        if keep[t]:
            prompt = (
                build_step_prompt(object_text=ram_object_text(config.game, *record.rams), reasoning=config.reasoning)
                if config.object_text
                else prompt_plain
            )
            row = {
                "images": [{"bytes": png, "path": None} for png in record.pngs],
                "context": context,
                "prompt": prompt,
                "answer": build_answer(record.reasoning if config.reasoning else None, record.action),
                "action": record.action,
                "game": config.game,
                "episode": index,
                "step": t,
                "score_so_far": score,
                "object_text": config.object_text,
                "reasoning": config.reasoning,
            }
            for _ in range(config.rare_repeat if record.action in rare else 1):
                for name, value in row.items():
                    columns[name].append(value)
        score += record.reward
    return columns


def collect_episode(config: CollectConfig, index: int, policy: Policy | None = None, env: TwoFrameEnv | None = None):
    """Play episode ``index`` with ``policy`` (default: ``config.policy``, the random one seeded
    with the episode's seed so that each episode is reproducible on its own).

    Returns:
        ``(dataset, summary)``: the episode's rows as a ``datasets.Dataset`` and a summary dict
        (score, length, removed steps, the expert's and the rows' action histograms).
    """
    from datasets import Dataset

    own_env = env is None
    env = env or TwoFrameEnv(
        config.game, frame_skip=config.frame_skip, repeat_action_probability=config.repeat_action_probability
    )
    recorder = _Recorder()
    try:
        policy = policy if policy is not None else load_policy(config.policy, config.game, seed=config.seed + index)
        episode = run_episode(policy, env, config.seed + index, max_steps=config.max_steps, on_step=recorder)
    finally:
        if own_env:
            env.close()
    columns = episode_rows(recorder.records, index, config)
    actions = [r.action for r in recorder.records]
    summary = {
        "episode": index,
        "seed": config.seed + index,
        "score": episode.score,
        "length": episode.length,
        "truncated": episode.truncated,
        "rows": len(columns["action"]),
        "removed": episode.length - len(set(columns["step"])),
        "expert_actions": dict(sorted(Counter(actions).items())),
        "row_actions": dict(sorted(Counter(columns["action"]).items())),
    }
    return Dataset.from_dict(columns, features=dataset_features()), summary


def collect_dataset(
    game: str,
    episodes: int,
    seed: int = 0,
    *,
    policy: Policy | str | None = None,
    progress: bool = True,
    **options,
):
    """Collect ``episodes`` episodes of ``game`` in memory and return them as one ``datasets.Dataset``.

    Args:
        game: Catalogued game name.
        episodes: Number of episodes.
        seed: Episode ``i`` is played from ``reset(seed=seed + i)``.
        policy: Any :class:`~ilora.atari.experts.Policy`, or a name for
            :func:`~ilora.atari.experts.load_policy` (``CollectConfig.policy``); default the scripted expert.
        progress: Show a tqdm bar.
        **options: Further :class:`CollectConfig` fields (``object_text``, ``reasoning``, ``max_steps``...).

    Returns:
        The rows of all episodes, in episode order.
    """
    from datasets import concatenate_datasets
    from tqdm.auto import tqdm

    if isinstance(policy, str):
        options, policy = {**options, "policy": policy}, None
    config = CollectConfig(game=game, episodes=episodes, seed=seed, **options)
    policy = policy if policy is not None else shared_policy(config)  # refused before any episode is played
    env = TwoFrameEnv(config.game, frame_skip=config.frame_skip, repeat_action_probability=config.repeat_action_probability)
    parts = []
    try:
        for index in tqdm(range(episodes), desc=f"collect {config.game}", unit="episode", disable=not progress):
            parts.append(collect_episode(config, index, policy, env)[0])
    finally:
        env.close()
    return concatenate_datasets(parts)


def shared_policy(config: CollectConfig) -> Policy | None:
    """``config.policy`` loaded once for every episode; ``None`` for the random policy, which
    :func:`collect_episode` seeds per episode (it is still loaded here, so a bad name fails first).

    Raises:
        IloraError: The policy cannot be loaded (e.g. the game has no scripted expert).
    """
    policy = load_policy(config.policy, config.game, seed=config.seed)
    return None if config.policy == "random" else policy


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def collect_to_disk(
    config: CollectConfig, out: str | Path, policy: Policy | None = None, progress: bool = True, overwrite: bool = False
) -> dict:
    """Collect into ``out`` resumably; write the merged dataset to ``out/dataset``.

    Layout: ``out/collect_config.json`` (the settings; a resume must match them),
    ``out/episodes/episode_NNNNN/`` (one saved dataset + ``summary.json`` per episode, each
    written to a temporary directory and renamed), ``out/dataset/`` (all episodes, loadable with
    ``datasets.load_from_disk``, with the :class:`~ilora.prompt_settings.PromptSettings` of its rows in
    ``prompt_settings.json``) and ``out/summary.json`` (scores, removed steps, action histograms).

    ``policy`` plays instead of ``config.policy`` (which then only names it in the settings).

    ``overwrite`` allows a rerun with fewer episodes than ``out`` holds: the dataset then has
    only the first ``config.episodes``; the other episode folders stay on disk for a later rerun.

    Returns:
        The overall summary (also written to ``out/summary.json``).

    Raises:
        IloraError: ``out`` holds a collection made with different settings, or more episodes
            than asked for (without ``overwrite``), or is a file; the game has no expert.
    """
    from datasets import concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IloraError(f"{out}: exists and is not a directory")
    policy = policy if policy is not None else shared_policy(config)  # refused before anything is written
    settings = to_dict(config)
    config_path = out / "collect_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        previous.setdefault("policy", "expert")  # collections older than the option were all the expert's
        differ = sorted(k for k in settings if k != "episodes" and previous.get(k) != settings[k])
        if differ:
            raise IloraError(
                f"{config_path}: the existing collection used different settings for {differ}; "
                "use another --out or the same settings to resume"
            )
    finished = [int(f.parent.name.removeprefix("episode_")) for f in out.glob("episodes/episode_*/summary.json")]
    if finished and max(finished) >= config.episodes and not overwrite:
        raise IloraError(
            f"{out}: holds {max(finished) + 1} episodes; --episodes {config.episodes} would rewrite its dataset "
            "with fewer (pass --overwrite to do that; the other episode folders are kept)"
        )
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    _write_json(config_path, settings)

    env = TwoFrameEnv(config.game, frame_skip=config.frame_skip, repeat_action_probability=config.repeat_action_probability)
    summaries, parts = [], []
    try:
        bar = tqdm(range(config.episodes), desc=f"collect {config.game}", unit="episode", disable=not progress)
        for index in bar:
            folder = out / "episodes" / f"episode_{index:05d}"
            if not (folder / "summary.json").exists():  # resumable: finished episodes are kept
                dataset, summary = collect_episode(config, index, policy, env)
                with atomic_dir(folder) as tmp:
                    dataset.save_to_disk(str(tmp))
                    _write_json(tmp / "summary.json", summary)
            summaries.append(json.loads((folder / "summary.json").read_text()))
            parts.append(load_from_disk(str(folder)))
            if "context" not in parts[-1].column_names:
                raise IloraError(
                    f"{folder}: collected with the old prompt layout (no 'context' column: the rules and "
                    "actions came after the images); collect into a new --out"
                )
            bar.set_postfix(score=summaries[-1]["score"], rows=summaries[-1]["rows"])
    finally:
        env.close()

    with atomic_dir(out / "dataset") as tmp:
        concatenate_datasets(parts).save_to_disk(str(tmp))
        prompt_settings_of(config).write(tmp)
    summary = summarize(summaries, config)
    _write_json(out / "summary.json", summary)
    return summary


def summarize(episodes: list[dict], config: CollectConfig) -> dict:
    """Scores, row counts and action histograms over a collection's episode summaries."""
    row_actions: Counter = Counter()
    expert_actions: Counter = Counter()
    for e in episodes:
        row_actions.update(e["row_actions"])
        expert_actions.update(e["expert_actions"])
    scores = [e["score"] for e in episodes]
    return {
        "game": config.game,
        "config": dataclasses.asdict(config),
        "episodes": len(episodes),
        "scores": scores,
        "mean_score": float(np.mean(scores)) if scores else None,
        "rows": sum(e["rows"] for e in episodes),
        "removed_steps": sum(e["removed"] for e in episodes),
        "row_actions": dict(sorted(row_actions.items())),
        "expert_actions": dict(sorted(expert_actions.items())),
    }
