"""``ilora train`` (routing tuning from a YAML config), ``ilora analyze activations`` and ``ilora analyze merge``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ilora.errors import IloraError

TRAIN_EXAMPLE = """example:
  ilora train configs/train_tiny.yaml
  ilora train configs/train_tiny.yaml --set training.eps_kl=0 --set out=runs/norm_only
  ilora train configs/train_tiny.yaml --resume          # continue from <out>.run/checkpoint-*
"""

ANALYZE_EXAMPLE = """example:
  ilora analyze activations --model models/tiny --adapter runs/pong \\
      --data task=data/pong --data general=data/general --data "other games"=data/breakout --out runs/pong/activations
"""

INTERFERENCE_EXAMPLE = """example:
  ilora grams runs/pong/adapter --data data/pong/train        # once per adapter
  ilora analyze interference runs/pong/adapter runs/breakout/adapter \\
      --data Pong=data/pong/train --data Breakout=data/breakout/train --merged merged/two --out interference.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.config import describe

    train = subparsers.add_parser(
        "train",
        help="routing-tune one LoRA adapter (or plain LoRA) from a YAML config",
        description="Train a LoRA adapter with routing tuning: task rows -> LM loss, general rows -> KL + LoRA-norm.",
        epilog=TRAIN_EXAMPLE + "\nconfig keys:\n" + _describe_train_config(describe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config (see configs/train_*.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in <out>.run")
    train.add_argument("--overwrite", action="store_true", help="replace an existing <out> adapter folder")
    train.set_defaults(func=run_train)

    analyze = subparsers.add_parser("analyze", help="analyse trained adapters")
    sub = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    act = sub.add_parser(
        "activations",
        help="LoRA-B output norms per data type (Table 6) and a heatmap (Figure 5)",
        description="Mean squared LoRA-B output norm per LoRA layer and data type, and a heatmap of one layer.",
        epilog=ANALYZE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    act.add_argument("--model", required=True, help="base model folder or hub id")
    act.add_argument("--adapter", required=True, help="PEFT adapter folder")
    act.add_argument(
        "--data", action="append", required=True, metavar="[NAME=]DIR",
        help="a saved dataset (datasets.save_to_disk) of one data type; repeat for each type",
    )
    act.add_argument("--out", required=True, help="output folder (activations.json/.txt, heatmap.png)")
    act.add_argument("--layer", help="LoRA layer for the heatmap (default: first language-model layer)")
    act.add_argument("--limit", type=int, default=256, help="rows per data type (default 256)")
    act.add_argument("--batch-size", type=int, default=8)
    act.add_argument("--dtype", default="float32")
    act.add_argument("--device", default="cpu")
    act.set_defaults(func=run_analyze_activations)
    interference = sub.add_parser(
        "merge",
        help="how much an I-LoRA max-magnitude merge changes each adapter's delta",
        description="Per adapter: its truncated delta's norm, the share of merged entries taken from it and "
        "|merged - delta| / |delta|; then the adapters' pairwise cosines (all modules together).",
    )
    interference.add_argument("adapters", nargs="+", help="two or more PEFT LoRA adapter folders")
    interference.add_argument("--keep", type=float, default=0.8, help="I-LoRA keep ratio (default 0.8)")
    interference.add_argument("--json", type=Path, help="also write the numbers here")
    interference.set_defaults(func=run_analyze_merge)
    in_activations = sub.add_parser(
        "interference",
        help="how loud each adapter and merged state is on each task's inputs (from the adapters' Grams)",
        description="Per task i (ADAPTER i, measured on its --data rows with `ilora grams`): "
        "||dW_j X_i|| / ||dW_i X_i|| for every adapter j, and ||(dW_M - dW_i) X_i|| / ||dW_i X_i|| for every "
        "--merged state M, over all modules (the JSON also has them per module).",
        epilog=INTERFERENCE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    in_activations.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapters with grams.safetensors")
    in_activations.add_argument(
        "--data", action="append", required=True, metavar="GAME=DIR", help="task rows of the ADAPTER in the same position"
    )
    in_activations.add_argument("--merged", nargs="+", default=[], metavar="STATE", help="merged-state folders")
    in_activations.add_argument("--out", type=Path, help="also write the numbers (per module too) to this JSON file")
    in_activations.set_defaults(func=run_analyze_interference)


def _describe_train_config(describe) -> str:
    from ilora.routing.config import TrainConfig

    return describe(TrainConfig)


def run_train(args: argparse.Namespace) -> int:
    from ilora.config import load_yaml
    from ilora.routing.config import TrainConfig
    from ilora.routing.train import train_from_config

    config = load_yaml(TrainConfig, args.config, args.set)
    out = train_from_config(config, resume=args.resume, overwrite=args.overwrite)
    print(f"adapter -> {out}")
    return 0


def parse_data_arg(value: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder)."""
    name, sep, path = value.partition("=")
    return (name, Path(path)) if sep else (Path(value).name, Path(value))


def run_analyze_activations(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from ilora.routing.analyze import analyze_activations, format_table

    data = {}
    for value in args.data:
        name, path = parse_data_arg(value)
        if not path.is_dir():
            raise IloraError(f"--data {value}: {path} is not a folder saved with datasets.save_to_disk")
        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise IloraError(f"--data {value}: cannot load dataset ({err})") from err
        data[name] = ds.select(range(min(args.limit, len(ds))))
    table = analyze_activations(
        args.model, args.adapter, data, args.out, args.layer, args.batch_size, args.dtype, args.device
    )
    print(format_table(table["data"]))
    print(f"heatmap of {table['heatmap_layer']} -> {Path(args.out) / 'heatmap.png'}")
    return 0


def run_analyze_merge(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_write_text
    from ilora.merge.interference import format_interference, interference_stats, truncated_deltas

    if len(args.adapters) < 2:
        raise IloraError(f"analyze merge needs at least two adapters, got {len(args.adapters)}")
    stats = interference_stats([truncated_deltas(a, args.keep) for a in args.adapters])
    print(format_interference(args.adapters, stats))
    if args.json:
        atomic_write_text(args.json, json.dumps({"adapters": args.adapters, "keep": args.keep, **stats}, indent=1))
    return 0


def run_analyze_interference(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_write_text
    from ilora.merge.interference import adapter_interference, format_activation_interference

    if len(args.data) != len(args.adapters):
        raise IloraError(f"{len(args.adapters)} adapters but {len(args.data)} --data; give one GAME=DIR per adapter, in order")
    games = []
    for value in args.data:
        name, path = parse_data_arg(value)
        if not path.is_dir():
            raise IloraError(f"--data {value}: {path} is not a folder")
        games.append(name)
    if len(set(games)) != len(games):
        raise IloraError(f"--data: game names {games} repeat; name each GAME=DIR")
    if args.out is not None and not args.out.parent.is_dir():
        raise IloraError(f"--out {args.out}: folder {args.out.parent} does not exist")
    stats = adapter_interference(args.adapters, args.merged)
    print(format_activation_interference(games, stats))
    if args.out is not None:
        record = {"games": games, "data": [str(parse_data_arg(v)[1]) for v in args.data], **stats}
        atomic_write_text(args.out, json.dumps(record, indent=1))
        print(f"-> {args.out}")
    return 0
