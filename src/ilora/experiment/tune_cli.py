"""``ilora tune-merge``: search merge settings (method, options, per-skill weights) by reward."""

from __future__ import annotations

import argparse

from ilora.errors import IloraError

EXAMPLE = """example:
  ilora tune-merge runs/pong/adapter runs/breakout/adapter --base builtin \\
      --data Pong=data/pong/heldout --data Breakout=data/breakout/heldout --general data/general/test \\
      --trials 24 --strategy qlearning --strategy tpe --objective min --out tuned
  ilora tune-merge ... --trials 48 --out tuned --resume      # continue the record to 48 trials
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.config import describe
    from ilora.experiment.tune_merge import OBJECTIVES, STRATEGIES, TuneSettings

    p = subparsers.add_parser(
        "tune-merge",
        help="search merge settings of routed adapters by their reward on held-out rows",
        description="Each trial merges the adapters with one setting (method, options, per-skill weights) and "
        "scores agreement with the expert and answer margin on each game's held-out rows, and general accuracy, "
        "against the unmerged references; Q-learning (RL-Fusion) and/or TPE (Optuna) search the settings. "
        "Writes OUT/trials-<strategy>.jsonl, OUT/best-reward.png and OUT/best.yaml (with its `ilora merge` command).",
        epilog=EXAMPLE + "\nsettings (--config YAML keys, --set KEY=VALUE):\n" + describe(TuneSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapters, one per game")
    p.add_argument("--base", required=True, help="base model folder or 'builtin'")
    p.add_argument("--data", action="append", required=True, metavar="GAME=HELDOUT_DIR",
                   help="held-out expert rows of the ADAPTER in the same position (datasets.save_to_disk)")
    p.add_argument("--general", metavar="DIR", help="general benchmark rows (datasets.save_to_disk); omit to leave "
                   "general accuracy out of the reward")
    p.add_argument("--config", metavar="YAML", help="TuneSettings preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--trials", type=int, help="trials per strategy, the default setting's included")
    p.add_argument("--strategy", action="append", choices=STRATEGIES, help="search strategy (repeat for both)")
    p.add_argument("--objective", choices=OBJECTIVES, help="min or mean reward over games (and general accuracy)")
    p.add_argument("--seed", type=int, help="seed of the strategies' random draws")
    p.add_argument("--out", required=True, help="output folder (with --resume: the search to continue)")
    p.add_argument("--resume", action="store_true", help="continue the record in --out")
    p.set_defaults(func=run_tune_merge)


def run_tune_merge(args: argparse.Namespace) -> int:
    from ilora.config import deep_update, from_dict, parse_named_path, parse_overrides, read_yaml_mapping, to_dict
    from ilora.experiment.tune_merge import GENERAL_COLUMNS, HELDOUT_COLUMNS, TuneSettings, check_rows, tune_merge
    from ilora.routing.cli import saved_rows

    # The preset and --set update the defaults as `extends` does: options.ties.density=[...] keeps ilora's keep values.
    data = deep_update(to_dict(TuneSettings()), read_yaml_mapping(args.config) if args.config else {})
    data = deep_update(data, parse_overrides(args.set))
    flags = {"trials": args.trials, "strategies": args.strategy, "objective": args.objective, "seed": args.seed}
    data.update({k: v for k, v in flags.items() if v is not None})
    settings = from_dict(TuneSettings, data, args.config or "tune settings")
    if len(args.data) != len(args.adapters):
        raise IloraError(f"{len(args.adapters)} adapters but {len(args.data)} --data; give one GAME=DIR per adapter, in order")
    heldout = {}
    for value in args.data:
        game, path = parse_named_path(value)
        if game in heldout:
            raise IloraError(f"--data {value}: game {game} given twice; one GAME=DIR per adapter")
        heldout[game] = check_rows(saved_rows("--data", str(path), settings.rows), HELDOUT_COLUMNS, f"--data {path}")
    general = None
    if args.general is not None:
        rows = saved_rows("--general", args.general, settings.general_rows)
        general = check_rows(rows, GENERAL_COLUMNS, f"--general {args.general}")
    result = tune_merge(args.adapters, args.base, heldout, args.out, settings, general, resume=args.resume)
    for strategy, best in result.best_per_strategy.items():
        print(f"{strategy}: best {settings.objective} reward {best:.4g} in {settings.trials} trials")
    print(f"default setting: {settings.objective} reward {result.default_objective:.4g}")
    print(f"best ({result.strategy}, trial {result.trial}): {result.method} {result.options}")
    print(f"record -> {result.out}; replay the best merge with:\n  {result.command}")
    return 0
