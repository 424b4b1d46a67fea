"""Command ``ilora base``: build and pretrain the tiny default VLM."""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.config import describe, from_dict, load_yaml, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    from ilora.base.pretrain import BaseConfig

    base = sub.add_parser(
        "base",
        help="build and pretrain the tiny default VLM on general data",
        description="Build the tiny LLaVA-style VLM and pretrain it (full-parameter) on general "
        "scene questions and Atari frame grounding. Prints held-out accuracy per question family.",
        epilog="config keys (YAML or --set):\n" + describe(BaseConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    base.add_argument("--out", required=True, type=Path, help="folder for the pretrained model")
    base.add_argument("--config", type=Path, help="YAML with BaseConfig keys")
    base.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    base.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    base.set_defaults(func=run_base)


def run_base(args: argparse.Namespace) -> int:
    from ilora.base.pretrain import BaseConfig, pretrain_base
    from ilora.errors import IloraError
    from ilora.general.benchmark import accuracy_table

    if args.out.exists() and not args.overwrite:
        raise IloraError(f"{args.out}: already exists (use --overwrite to replace it)")
    config = load_yaml(BaseConfig, args.config, args.set) if args.config else from_dict(BaseConfig, parse_overrides(args.set), "--set")
    record = pretrain_base(config, args.out)
    print(accuracy_table(record["heldout"]))
    print(f"saved {args.out} ({record['seconds']:.0f} s)")
    return 0
