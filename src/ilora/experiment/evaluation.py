"""Scoring one model of the experiment: play every game, the general benchmark, offline agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ilora.experiment.config import EvalSettings, ExperimentConfig

PLAY_SEED_OFFSET = 20_000  # play episodes never reuse a training episode's seed
VIDEO_STEPS = 240


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def own_episodes(e: EvalSettings) -> int:
    """Episodes of the references and of a single-game adapter on its own game."""
    return e.own_game_episodes or e.episodes


def play(
    policy, game: str, e: EvalSettings, seed: int, folder: Path, tag: str, blank: bool = False, video: bool = False,
    episodes: int | None = None,
) -> dict:
    """Play ``episodes`` (default ``e.episodes``) of ``game``; save the result JSON (and a GIF); return the summary."""
    from ilora.atari.evaluate import play_episodes, save_result, summarize

    recorder = None
    if video:
        from ilora.atari.video import EpisodeRecorder

        recorder = EpisodeRecorder(episode=0, max_steps=VIDEO_STEPS)
    episodes = episodes or e.episodes
    result = play_episodes(
        policy,
        game,
        episodes,
        seed + PLAY_SEED_OFFSET,
        n_envs=min(e.n_envs, episodes),
        max_frames=e.max_frames,
        fire_on_reset=e.fire_on_reset,
        blank_frames=blank,
        on_step=recorder,
        progress=False,
    )
    summary = summarize(result.records, game)
    save_result(folder / f"{tag}.json", result, summary)
    if recorder is not None and recorder.steps:
        from ilora.atari.video import save_video

        save_video(recorder.steps, folder / f"{tag}.gif", game)
    out = summary.to_dict()
    out["scores"] = [r.score for r in result.records]
    out["errors"] = result.errors
    out["steps_per_second"] = result.steps / max(1e-9, result.policy_seconds + result.env_seconds)
    return out


def evaluate_reference(game: str, e: EvalSettings, seed: int, folder: Path) -> dict:
    """Random and scripted-expert scores under the same cap and settings as the agents."""
    from ilora.atari.experts import RandomPolicy, get_expert
    from ilora.atari.games import get_game

    names = get_game(game).action_names
    n = own_episodes(e)
    return {
        "random": play(RandomPolicy(names, seed), game, e, seed, folder, "random", episodes=n),
        "expert": play(get_expert(game), game, e, seed, folder, "expert", episodes=n),
    }


def action_agreement(agent, rows, n: int) -> dict:
    """Share of the first ``n`` held-out expert rows where ``agent`` (a
    :class:`~ilora.atari.agent.VLMAgent`) takes the expert's action, deciding as it does in play
    (an unparsed answer counts as a miss)."""
    rows = [rows[i] for i in range(min(n, len(rows)))]
    if not rows:
        return {"n": 0, "agreement": None}
    hits = [d.valid and d.action == r["action"] for d, r in zip(agent.decide_rows(rows), rows)]
    return {"n": len(rows), "agreement": sum(hits) / len(hits)}


def answer_margins(agent, rows, n: int, batch_size: int = 32) -> dict:
    """How surely ``agent`` (a :class:`~ilora.atari.agent.VLMAgent`) prefers the expert's action
    on the first ``n`` held-out expert rows, with the play-time answer scores (``score_rows``).

    Args:
        agent: the agent; its game's action names index the scores.
        rows: rows with ``images``, ``context``, ``prompt`` and the expert's ``action``.
        n: rows used (the first ``n``).
        batch_size: rows per model call.

    Returns:
        ``{"n", "margins": [score(expert action) − best other action's score], "positive":
        share of margins > 0, "mean": mean margin}`` (``None`` share and mean without rows).
    """
    import torch

    rows = [rows[i] for i in range(min(n, len(rows)))]
    unknown = sorted({r["action"] for r in rows} - set(agent.action_names))
    if unknown:
        from ilora.errors import IloraError

        raise IloraError(f"rows label actions {unknown} that {agent.game.name} does not have")
    labels = [agent.action_names.index(r["action"]) for r in rows]
    margins: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            scores = agent.score_rows(rows[start : start + batch_size]).float()
            label = torch.tensor(labels[start : start + batch_size], device=scores.device)
            own = scores.gather(1, label[:, None]).squeeze(1)
            others = scores.scatter(1, label[:, None], float("-inf")).amax(1)
            margins += (own - others).tolist()
    if not margins:
        return {"n": 0, "margins": [], "positive": None, "mean": None}
    return {
        "n": len(margins),
        "margins": margins,
        "positive": sum(m > 0 for m in margins) / len(margins),
        "mean": sum(margins) / len(margins),
    }


def evaluate_model(
    base_path: str,
    spec,
    games: list[str],
    e: EvalSettings,
    cfg: ExperimentConfig,
    folder: Path,
    heldout: dict[str, Any],
    general,
    own_game: str | None = None,
    blank_check: bool = False,
) -> dict:
    """Play ``games`` with one model, score the general benchmark and offline agreement.

    ``own_game`` (a single-game adapter's game) is played ``own_episodes(e)`` times; with
    ``blank_check`` also ``e.episodes`` times with blanked frames, and its first episode is
    saved as a GIF.

    Returns:
        ``{"play": {game: summary}, "blank": {game: summary}, "agreement": {game: ...},
        "margin": {game: answer margins without the per-row list}, "general": overall stats}``.
    """
    from ilora.atari.agent import VLMAgent
    from ilora.general.benchmark import score_general
    from ilora.merge.export import load_vlm_merged
    from ilora.models.predict import generate_answers

    model, processor = load_vlm_merged(base_path, spec.adapter, spec.merged, cfg.train.dtype, resolve_device(cfg.device))
    mode = "generate" if cfg.data.reasoning else "score"
    out: dict[str, Any] = {"play": {}, "blank": {}, "agreement": {}, "margin": {}}
    for game in games:
        agent = VLMAgent(model, processor, game, mode=mode, object_text=cfg.data.object_text)
        own = game == own_game
        episodes = own_episodes(e) if own else e.episodes
        out["play"][game] = play(agent, game, e, cfg.seed, folder, game, video=own and blank_check, episodes=episodes)
        if own and blank_check:
            # A check of whether the images matter, not a retention denominator: e.episodes suffice.
            out["blank"][game] = play(agent, game, e, cfg.seed, folder, f"{game}-blank", blank=True)
        out["agreement"][game] = action_agreement(agent, heldout[game], e.agreement_rows)
        out["margin"][game] = {k: v for k, v in answer_margins(agent, heldout[game], e.agreement_rows).items() if k != "margins"}
    scores = score_general(lambda batch: generate_answers(model, processor, batch), general)
    out["general"] = scores["overall"]
    (folder / "scores.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def evaluate_selection(
    base_path: str,
    adapters: dict[str, Path],
    rule: str,
    cfg: ExperimentConfig,
    folder: Path,
    heldout: dict[str, Any],
    gate_rows: dict[str, list[dict]] | None = None,
) -> dict:
    """Play every game with a skill chosen per step by ``rule`` among ``adapters`` (game -> routed
    adapter), and measure the rule on held-out rows.

    Args:
        base_path: the base model.
        adapters: game -> routed adapter folder (the skills, named after their games).
        rule: ``norm``, ``gate`` or ``oracle`` (:mod:`ilora.routing.select`).
        cfg: the experiment's settings (play, prompt, dtype, device, the gate's training).
        folder: where the play results go.
        heldout: game -> held-out rows; the first ``eval.agreement_rows`` measure the rule.
        gate_rows: game -> rows the gate is trained on (``gate`` only; apart from those measured).

    Returns:
        ``{"play": {game: summary}, "chosen": {game: {skill: decisions}}, "seconds_per_decision":
        {game: seconds}, "selection": selection_accuracy's result}``.
    """
    from ilora.routing.select import SkillPolicy, SkillSelector, selection_accuracy

    e, device = cfg.eval, resolve_device(cfg.device)
    games = list(adapters)
    accuracy = selection_accuracy(
        base_path, adapters, heldout, rule, gate_rows=gate_rows, gate=cfg.selection.gate,
        rows_per_game=e.agreement_rows, batch_size=e.n_envs, dtype=cfg.train.dtype, device=device,
    )
    selector = SkillSelector.load(base_path, adapters, rule, object_text=cfg.data.object_text, dtype=cfg.train.dtype,
                                  device=device)
    if rule == "gate":
        selector.fit_gate(gate_rows, cfg.selection.gate, batch_size=e.n_envs)  # the gate measured above
    out: dict[str, Any] = {"play": {}, "chosen": {}, "seconds_per_decision": {}, "selection": accuracy}
    for game in games:
        policy = SkillPolicy(selector, game)
        out["play"][game] = play(policy, game, e, cfg.seed, folder, game)
        out["chosen"][game] = policy.chosen
        out["seconds_per_decision"][game] = policy.seconds / max(1, sum(policy.chosen.values()))
    selector.remove_hooks()
    (folder / "scores.json").write_text(json.dumps(out, indent=1, default=str))
    return out
