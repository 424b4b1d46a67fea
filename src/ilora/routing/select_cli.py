"""``ilora select-play`` (play with a skill chosen per step from several routed adapters) and
``ilora analyze selection`` (how often a rule picks each game's own adapter on held-out rows).

They live at the routing level because the selector measures LoRA outputs (routing's hooks);
the play loop and the agent come from ``ilora.atari``, which cannot import routing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ilora.errors import IloraError

SELECT_PLAY_EXAMPLE = """example:
  ilora select-play --model builtin --adapters Pong=runs/default/routed/Pong Breakout=runs/default/routed/Breakout \\
      --game Breakout --select norm --episodes 4
  ilora select-play --model builtin --adapters Pong=A Breakout=B --game Pong --select gate \\
      --gate-data Pong=data/pong-val Breakout=data/breakout-val
"""

ANALYZE_EXAMPLE = """example:
  ilora analyze selection --model builtin --adapters Pong=A Breakout=B --data Pong=data/pong-test \\
      --data Breakout=data/breakout-test --select norm --json selection.json
"""


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    """The options both commands share: the base, the skills, the rule and the gate."""
    from ilora.routing.select import GATE_FEATURES, SELECTION_RULES, GateConfig

    g = GateConfig()
    p.add_argument("--model", required=True, help="base model folder, 'builtin' (the shipped tiny base) or a cached hub id")
    p.add_argument("--adapters", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="the skills: routed LoRA adapter folders, each named (default: its folder's name); "
                        "name them after their games for 'oracle' and for the accuracy")
    p.add_argument("--select", required=True, choices=SELECTION_RULES,
                   help="norm: each adapter's own LoRA output norm on the prompt, the loudest acts (no training); "
                        "gate: a classifier trained on --gate-data; oracle: the game's own adapter")
    p.add_argument("--gate-data", nargs="+", default=[], metavar="NAME=DIR",
                   help="--select gate: rows of each skill to train the gate on (a datasets.save_to_disk folder "
                        "or what ilora collect wrote), one per skill")
    p.add_argument("--gate-rows", type=int, default=64, help="first rows of each --gate-data set used (default %(default)s)")
    p.add_argument("--gate-features", choices=GATE_FEATURES, default=g.features,
                   help="hidden: the base's last hidden state pooled over the prompt; norms: the adapters' norms "
                        "(default %(default)s)")
    p.add_argument("--gate-hidden-units", type=int, default=g.hidden_units,
                   help="0: logistic regression; > 0: an MLP with one hidden layer this wide (default %(default)s)")
    p.add_argument("--gate-seed", type=int, default=g.seed, help="seed of the gate's initialisation (default %(default)s)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16, auto")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")


def _skills(args: argparse.Namespace) -> dict[str, Path]:
    from ilora.config import parse_named_path
    from ilora.routing.select import check_skill_names

    named = [parse_named_path(value) for value in args.adapters]
    check_skill_names([name for name, _ in named])
    return dict(named)


def _gate(args: argparse.Namespace, skills: dict[str, Path]):
    """The gate's settings and training rows (``None, None`` unless ``--select gate``), read and checked."""
    from ilora.config import parse_named_path
    from ilora.routing.cli import saved_rows
    from ilora.routing.select import GateConfig

    if args.select != "gate":
        if args.gate_data:
            raise IloraError(f"--gate-data: only used with --select gate (got --select {args.select})")
        return None, None
    if args.gate_rows < 1:
        raise IloraError(f"--gate-rows {args.gate_rows}: must be at least 1")
    named = dict(parse_named_path(value) for value in args.gate_data)
    unknown, missing = sorted(set(named) - set(skills)), [s for s in skills if s not in named]
    if unknown or missing:
        raise IloraError(f"--gate-data: one NAME=DIR per skill {sorted(skills)}; unknown {unknown}, missing {missing}")
    config = GateConfig(features=args.gate_features, hidden_units=args.gate_hidden_units, seed=args.gate_seed)
    rows = {name: saved_rows("--gate-data", str(path), args.gate_rows) for name, path in named.items()}
    return config, rows


def run_select_play(args: argparse.Namespace) -> int:
    from ilora.atari.evaluate import (
        format_summary,
        play_episodes,
        play_prompt,
        save_result,
        summarize,
    )
    from ilora.fileio import check_output_file
    from ilora.models.load import resolve_model_path
    from ilora.prompt_settings import combine_prompt_settings, read_prompt_settings
    from ilora.routing.select import SkillPolicy, SkillSelector

    if args.json:
        check_output_file(args.json, "--json")
    for flag in ("episodes", "envs"):
        if getattr(args, flag) < 1:
            raise IloraError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    resolve_model_path(args.model)
    skills = _skills(args)
    folders = [args.model, *map(str, skills.values())]
    named = [(folder, read_prompt_settings(folder)) for folder in folders if Path(folder).is_dir()]
    where = " and ".join(folder for folder, settings in named if settings is not None)
    prompt = play_prompt(combine_prompt_settings(named), where, game=args.game, object_text=args.object_text, mode="score")
    for note in prompt.warnings:
        print(f"ilora select-play: warning: {note}", file=sys.stderr)
    if args.select == "oracle" and prompt.game not in skills:
        raise IloraError(f"--select oracle: no skill is named {prompt.game}; skills: {sorted(skills)}")
    gate_config, gate_rows = _gate(args, skills)
    selector = SkillSelector.load(args.model, skills, args.select, object_text=prompt.object_text, dtype=args.dtype,
                                  device=args.device)
    gate_summary = selector.fit_gate(gate_rows, gate_config) if gate_rows is not None else None
    if gate_summary is not None:
        print(f"gate: {gate_summary['features']} features, training accuracy {gate_summary['train_accuracy']:.3f} "
              f"on {sum(gate_summary['rows'].values())} rows")
    policy = SkillPolicy(selector, prompt.game, source={"model": str(args.model), "adapters": {k: str(v) for k, v in skills.items()}})
    result = play_episodes(
        policy, prompt.game, args.episodes, args.seed, n_envs=args.envs, max_frames=args.max_frames,
        fire_on_reset=args.fire_on_reset,
    )
    result.settings["chosen"] = dict(policy.chosen)
    result.settings["gate_fit"] = gate_summary
    for error in result.errors:
        print(f"emulator error (finished episodes kept): {error}")
    if not result.records:
        raise IloraError(f"{prompt.game}: no episode finished ({len(result.errors)} emulator error(s))")
    summary = summarize(result.records, prompt.game)
    print(format_summary(summary, result.settings))
    steps = max(sum(policy.chosen.values()), 1)
    print("skills chosen        " + ", ".join(f"{k} {100 * n / steps:.1f}%" for k, n in policy.chosen.items()))
    print(f"selection + scoring  {policy.seconds / steps * 1000:.2f} ms per decision")
    if args.json:
        print(f"results: {save_result(args.json, result, summary)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``ilora select-play``."""
    from ilora.atari.games import DEFAULT_MAX_EPISODE_FRAMES

    p = subparsers.add_parser(
        "select-play",
        help="play a game with several routed adapters, one chosen per step from the input (no merge)",
        description="Every step, each environment's prompt picks one skill adapter (its LoRA output norm, a trained "
        "gate, or the game's own), and that adapter ranks the actions as ilora play --mode score does.",
        epilog=SELECT_PLAY_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_selection_args(p)
    p.add_argument("--game", default=None, help="game to play (default: the adapters' recorded game, when only one)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to play (default %(default)s)")
    p.add_argument("--envs", type=int, default=8, help="environments answered in one batched call (default %(default)s)")
    p.add_argument("--object-text", action=argparse.BooleanOptionalAction, default=None,
                   help="RAM object-state text in the prompt (default: as the adapters were trained)")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_EPISODE_FRAMES,
                   help="episode cap in emulator frames (default %(default)s)")
    p.add_argument("--fire-on-reset", action="store_true", help="press FIRE after a reset and each lost life")
    p.add_argument("--seed", type=int, default=0, help="episode i uses seed + i (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the summary, settings (skills chosen) and episodes here")
    p.set_defaults(func=run_select_play)


def run_analyze_selection(args: argparse.Namespace) -> int:
    from ilora.config import parse_named_path
    from ilora.fileio import atomic_write_text, check_output_file, to_json
    from ilora.models.load import resolve_model_path
    from ilora.routing.cli import saved_rows
    from ilora.routing.select import selection_accuracy

    if args.json:
        check_output_file(args.json, "--json")
    for flag in ("rows", "batch_size"):
        if getattr(args, flag) < 1:
            raise IloraError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    resolve_model_path(args.model)
    skills = _skills(args)
    data = dict(parse_named_path(value) for value in args.data)
    gate_data = {
        name for name, path in map(parse_named_path, args.gate_data) if name in data and data[name].resolve() == path.resolve()
    }
    if gate_data:
        raise IloraError(f"--gate-data {sorted(gate_data)}: the same folder as --data; train the gate on other rows")
    gate_config, gate_rows = _gate(args, skills)
    heldout = {name: saved_rows("--data", str(path), args.rows) for name, path in data.items()}
    result = selection_accuracy(
        args.model, skills, heldout, args.select, gate_rows=gate_rows, gate=gate_config, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device,
    )
    print(format_selection(result))
    if args.json:
        atomic_write_text(args.json, to_json(result))
        print(f"results: {args.json}")
    return 0


def format_selection(result: dict) -> str:
    """A plain-text table of :func:`~ilora.routing.select.selection_accuracy`'s result."""

    def share(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"rule {result['rule']}; skills {', '.join(result['skills'])}"]
    if result["gate"] is not None:
        lines.append(f"gate: {result['gate']['features']} features, training accuracy {result['gate']['train_accuracy']:.3f}")
    lines.append(f"{'game':<12} {'rows':>5} {'accuracy':>9} {'agreement':>10} {'ms/decision':>12} {'merged ms':>10}  chosen")
    for game, g in result["games"].items():
        chosen = ", ".join(f"{k} {n}" for k, n in g["chosen"].items())
        lines.append(
            f"{game:<12} {g['rows']:>5} {share(g['accuracy']):>9} {g['agreement']:>10.3f} "
            f"{1000 * g['seconds_per_decision']:>12.2f} {1000 * g['merged_seconds_per_decision']:>10.2f}  {chosen}"
        )
    lines.append(
        f"overall accuracy {share(result['accuracy'])}; {1000 * result['seconds_per_decision']:.2f} ms per decision, "
        f"{result['cost_ratio']:.2f}x the merged model's {1000 * result['merged_seconds_per_decision']:.2f} ms"
    )
    return "\n".join(lines)


def register_analyses(sub: argparse._SubParsersAction) -> None:
    """``ilora analyze selection``."""
    p = sub.add_parser(
        "selection",
        help="how often a selection rule picks each game's own adapter on held-out rows, and its cost",
        description="Per game: the share of held-out rows on which the rule chooses the adapter named after the "
        "game, the decisions' agreement with the rows' actions, and seconds per decision beside a merged "
        "(base-sized) model deciding the same rows.",
        epilog=ANALYZE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_selection_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="GAME=DIR",
                   help="held-out rows of each game (a datasets.save_to_disk folder or what ilora collect wrote)")
    p.add_argument("--rows", type=int, default=64, help="first rows of each --data set used (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per decision call, as environments in play (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the result here (JSON)")
    p.set_defaults(func=run_analyze_selection)
