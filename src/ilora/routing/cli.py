"""``ilora train`` (routing tuning from a YAML config) and ``ilora analyze activations``."""

from __future__ import annotations

import argparse
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



def register_analyses(sub: argparse._SubParsersAction) -> None:
    """``ilora analyze activations``."""
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
