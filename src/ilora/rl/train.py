"""One ``ilora rl`` run: check the inputs, train with GRPO in the game, checkpoint, save the adapter.

:func:`train_rl` is the library entry point. Checkpoints go to ``<out>.run/checkpoint-<update>``
(the last one is kept; ``resume=True`` continues from it with the same settings), and the
adapter is written atomically to ``out`` as a standard PEFT adapter folder that ``ilora play``,
``ilora merge`` and the experiment read like a cloned one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ilora.atari.games import Game, get_game
from ilora.config import to_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_dir, to_json
from ilora.rl.config import GRPOSettings

SETTINGS_FILE = "rl_settings.json"
LOG_FILE = "rl_log.json"
PLOT_FILE = "rl_log.png"
WEIGHTS_FILE = "lora.safetensors"
STATE_FILE = "state.pt"
# Per-update numbers drawn in rl_log.png, where logged.
PLOTTED = ("return", "entropy", "kl", "clip_fraction", "general_kl", "general_norm")


def check_inputs(
    game: Game | str,
    base: str | os.PathLike,
    settings: GRPOSettings,
    out: str | os.PathLike,
    init_adapter: str | os.PathLike | None = None,
    general: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[Game, list | None]:
    """Refuse, before any model is loaded, what :func:`train_rl` could not use.

    Returns:
        The game, and the general rows (a dataset) when ``general`` is given.
    """
    from ilora.prompt_settings import PROMPT_SETTINGS_FILE, read_prompt_settings
    from ilora.atari.ram import READERS, has_object_text
    from ilora.models.adapter import check_lora_adapter, check_modules_fit
    from ilora.models.load import model_weight_shapes, resolve_dtype, resolve_model_path

    game = get_game(game)
    if settings.object_text and not has_object_text(game):
        raise IloraError(f"object_text: no RAM reader for {game.name}; games with one: {', '.join(sorted(READERS))}")
    resolve_dtype(settings.dtype)
    resolve_model_path(base)
    if init_adapter is not None:
        try:
            check_modules_fit(check_lora_adapter(init_adapter), model_weight_shapes(base), init_adapter, base)
        except IloraError as err:
            raise IloraError(f"--init-adapter: {err}") from err
        recorded = read_prompt_settings(init_adapter)
        differ = [] if recorded is None else prompt_settings(game, settings).differences(recorded)
        if differ:
            raise IloraError(f"--init-adapter {init_adapter}: trained on another prompt than this run's "
                             f"({', '.join(differ)}: this run's vs its {PROMPT_SETTINGS_FILE})")
    out = Path(out)
    if out.exists() and not (overwrite or resume):
        raise IloraError(f"{out}: output already exists (pass --overwrite to replace it, or --resume to continue it)")
    run_dir = out.with_name(out.name + ".run")
    if run_dir.exists() and not (overwrite or resume):
        raise IloraError(f"{run_dir}: holds an earlier run's checkpoints (pass --resume to continue it, or "
                         "--overwrite to start over)")
    rows = None
    if general is not None:
        from ilora.routing.config import DataSpec
        from ilora.routing.train import load_sources

        rows = load_sources([DataSpec(str(general))], "general", "--general")[0].rows
        if len(rows) == 0:
            raise IloraError(f"--general {general}: no rows")
        if settings.eps_kl == 0 and settings.eps_norm == 0:
            raise IloraError("--general given but eps_kl = eps_norm = 0: its rows would get no loss")
    return game, rows


def train_rl(
    game: Game | str,
    base: str | os.PathLike,
    settings: GRPOSettings,
    out: str | os.PathLike,
    *,
    init_adapter: str | os.PathLike | None = None,
    general: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train a LoRA adapter on ``game`` with GRPO from the agent's own play.

    Args:
        game: the game (or its name).
        base: base model folder, ``builtin`` or a cached hub id.
        settings: the run's settings.
        out: the adapter folder, written atomically: ``adapter_config.json``,
            ``adapter_model.safetensors``, ``rl_settings.json`` (what was trained, how),
            ``rl_log.json`` (numbers per update), ``rl_log.png``, ``trained_on.json`` and
            ``prompt_settings.json`` (the prompt it was trained with, which ``ilora play`` reads).
        init_adapter: a LoRA adapter to continue (e.g. a cloned one; its rank and targets are
            kept); default: a new LoRA from ``settings``.
        general: a saved dataset of general rows (``datasets.save_to_disk``): routing tuning's KL and
            LoRA-B norm terms on them join the loss ("routed RL").
        resume: continue from the last checkpoint in ``<out>.run`` (same inputs and settings).
        overwrite: replace an existing ``out``.
        progress: show a progress bar over frames.

    Returns:
        ``out``.
    """
    from tqdm.auto import tqdm
    from transformers.trainer_utils import get_last_checkpoint

    from ilora.models.load import load_vlm
    from ilora.rl.env import BranchingEnv, GroupRollouts
    from ilora.rl.grpo import GeneralRowTerms, GRPOLearner
    from ilora.routing.lora import apply_lora, load_adapter
    from ilora.routing.train import TRAINED_ON_FILE, trained_on

    game, general_rows = check_inputs(game, base, settings, out, init_adapter, general, resume, overwrite)
    out = Path(out)
    run_dir = out.with_name(out.name + ".run")
    record = {
        "game": game.name,
        "base": str(base),
        "init_adapter": None if init_adapter is None else str(init_adapter),
        "general": None if general is None else str(general),
        "settings": to_dict(settings),
    }
    checkpoint = get_last_checkpoint(str(run_dir)) if resume and run_dir.is_dir() else None
    if checkpoint is not None:
        check_same_run(run_dir / SETTINGS_FILE, record)
    elif resume:
        print(f"ilora rl: no checkpoint in {run_dir}, starting from scratch")

    model, processor = load_vlm(base, settings.dtype, settings.device)
    if init_adapter is not None:
        model = load_adapter(model, init_adapter, trainable=True)
    else:
        model = apply_lora(model, settings.lora_r, settings.lora_alpha, 0.0, None, settings.lora_parts, settings.seed)
    if checkpoint is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # only with --overwrite or --resume (check_inputs)
        run_dir.mkdir(parents=True)
        (run_dir / SETTINGS_FILE).write_text(to_json(record))
    general_terms = None
    if general_rows is not None:
        general_terms = GeneralRowTerms(model, processor, general_rows, settings, str(run_dir))
    learner = GRPOLearner(model, processor, game, settings, general_terms)

    def make_env() -> BranchingEnv:
        return BranchingEnv(game, repeat_action_probability=settings.repeat_action_probability,
                            max_episode_frames=settings.max_episode_frames)

    rollouts = GroupRollouts(
        make_env, learner.action_names, settings.groups, settings.group_size, settings.horizon, settings.seed,
        stop_on_life_loss=settings.stop_on_life_loss, fire_on_reset=settings.fire_on_reset,
    )
    log: list[dict[str, Any]] = []
    if checkpoint is not None:
        log = load_checkpoint(Path(checkpoint), learner, rollouts)
    frames = log[-1]["frames"] if log else 0
    bar = tqdm(total=settings.frames, initial=frames, unit="frame", unit_scale=True, desc=f"{game.name} GRPO",
               disable=not progress)
    try:
        while frames < settings.frames:
            batch = rollouts.collect(learner.sample)
            stats = learner.update(batch)
            frames += batch.frames
            log.append({"update": len(log) + 1, "frames": frames, **stats, "episode_scores": batch.episode_scores})
            bar.update(min(batch.frames, settings.frames - bar.n))  # the last update may pass the budget
            bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("return", "entropy", "kl")})
            if settings.save_every and len(log) % settings.save_every == 0 and frames < settings.frames:
                save_checkpoint(run_dir, learner, rollouts, log)
    finally:
        bar.close()
        rollouts.close()
    with atomic_dir(out) as tmp:
        learner.model.save_pretrained(tmp)
        (tmp / SETTINGS_FILE).write_text(to_json(record))
        (tmp / LOG_FILE).write_text(to_json(log))
        plot_log(log, tmp / PLOT_FILE)
        prompt_settings(game, settings).write(tmp)
        (tmp / TRAINED_ON_FILE).write_text(json.dumps(trained_on(base, [], init_adapter), indent=1))
    return out


def prompt_settings(game: Game, settings: GRPOSettings):
    """The prompt the run plays with (direct answers, scored), as :mod:`ilora.prompt_settings` records it,
    so that ``ilora play`` plays the adapter with it."""
    from ilora.prompt_settings import PromptSettings

    return PromptSettings((game.name,), settings.object_text, reasoning=False)


def check_same_run(settings_file: Path, record: dict) -> None:
    """Refuse to resume a run whose game, model, adapters or settings were others."""
    if not settings_file.is_file():
        raise IloraError(f"{settings_file}: missing, cannot tell what the checkpoints in its folder are")
    saved = json.loads(settings_file.read_text())
    differ = sorted(k for k in record if k != "settings" and saved.get(k) != record[k])
    differ += sorted(f"settings.{k}" for k in record["settings"] if saved.get("settings", {}).get(k) != record["settings"][k])
    if differ:
        raise IloraError(f"--resume: the checkpoints in {settings_file.parent} are of another run ({', '.join(differ)} differ)")


def save_checkpoint(run_dir: Path, learner, rollouts, log: list[dict]) -> Path:
    """``run_dir/checkpoint-<update>``: the LoRA weights, the optimiser, the sampler, the running
    episodes and the log; older checkpoints are removed once it is complete."""
    import torch
    from safetensors.torch import save_file

    path = run_dir / f"checkpoint-{len(log)}"
    with atomic_dir(path) as tmp:
        save_file(learner.trainable_state(), str(tmp / WEIGHTS_FILE))
        torch.save({"learner": learner.state(), "rollouts": rollouts.state(), "log": log}, tmp / STATE_FILE)
    for old in run_dir.glob("checkpoint-*"):
        if old != path and old.is_dir():
            shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, learner, rollouts) -> list[dict]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its log."""
    import torch
    from safetensors.torch import load_file

    learner.load_trainable_state(load_file(str(path / WEIGHTS_FILE)))
    state = torch.load(path / STATE_FILE, weights_only=False)  # our own file: emulator states are pickled
    learner.load_state(state["learner"])
    rollouts.load_state(state["rollouts"])
    return state["log"]


def plot_log(log: list[dict], path: Path) -> None:
    """One panel per logged number of :data:`PLOTTED` against emulator frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(k in entry for entry in log)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([e["frames"] for e in log if key in e], [e[key] for e in log if key in e], marker=".", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("frames")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
