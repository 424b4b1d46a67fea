"""``ilora rl``: train a LoRA adapter with GRPO from the agent's own play in the game."""

from __future__ import annotations

import argparse

RL_EXAMPLE = """example:
  ilora rl --game Boxing --base builtin --out runs/rl/boxing --config configs/rl.yaml
  ilora rl --game Boxing --base builtin --init-adapter runs/boxing/adapter --out runs/rl/boxing-from-clone \\
      --config configs/rl.yaml --set beta=0.1
  ilora rl ... --general data/general/train      # routed RL: routing tuning's terms on general rows
  ilora rl ... --resume                           # continue from <out>.run/checkpoint-*
  ilora play --model builtin --adapter runs/rl/boxing --game Boxing --object-text --fire-on-reset --episodes 8
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.config import describe
    from ilora.rl.config import GRPOSettings

    p = subparsers.add_parser(
        "rl",
        help="train a LoRA adapter with GRPO from the agent's own play in the real game",
        description="On-policy GRPO in the ALE: groups of continuations from cloned emulator states, "
        "group-normalised advantages, a clipped ratio loss on the action distribution (the softmax over the "
        "action names' scores the agent plays with), a KL to the weights the run starts from; LoRA only.",
        epilog=RL_EXAMPLE + "\nsettings (YAML keys of --config, or --set KEY=VALUE):\n" + describe(GRPOSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--game", required=True, help="game name, e.g. Boxing")
    p.add_argument("--base", required=True, help="base model folder, 'builtin' (the shipped tiny base) or a cached hub id")
    p.add_argument("--out", required=True, help="adapter output folder (checkpoints go to <out>.run)")
    p.add_argument("--init-adapter", help="LoRA adapter to continue from, e.g. a cloned one (default: a new LoRA)")
    p.add_argument("--general", help="general rows (datasets.save_to_disk folder): add routing tuning's KL and "
                   "LoRA-B norm terms on them (routed RL)")
    p.add_argument("--config", help="YAML file of settings (see configs/rl.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>.run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out> (and its <out>.run)")
    p.set_defaults(func=run_rl)


def run_rl(args: argparse.Namespace) -> int:
    from ilora.config import from_dict, load_yaml, parse_overrides
    from ilora.rl.config import GRPOSettings
    from ilora.rl.train import train_rl

    if args.config:
        settings = load_yaml(GRPOSettings, args.config, args.set)
    else:
        settings = from_dict(GRPOSettings, parse_overrides(args.set), "--set")
    out = train_rl(
        args.game, args.base, settings, args.out, init_adapter=args.init_adapter, general=args.general,
        resume=args.resume, overwrite=args.overwrite,
    )
    print(f"adapter -> {out}")
    return 0
