"""``ilora train`` (routing tuning from a YAML config) and ``ilora analyze activations``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.errors import IloraError

TRAIN_EXAMPLE = """example:
  ilora train configs/train_tiny.yaml
  ilora train configs/train_tiny.yaml --set training.eps_kl=0 --set out=runs/norm_only
  ilora train configs/train_tiny.yaml --resume          # continue from <out>.run/checkpoint-*

The adapter folder gets the task datasets' prompt_settings.json (what `ilora collect` recorded),
so `ilora play --adapter OUT` plays with the prompt it was trained on.
"""

ANALYZE_EXAMPLE = """example:
  ilora analyze activations --model builtin --adapter runs/pong \\
      --data task=data/pong --data general=data/general --data "other games"=data/breakout --out runs/pong-activations
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="routing-tune one LoRA adapter (or plain LoRA) from a YAML config",
        description="Train a LoRA adapter with routing tuning: task rows -> LM loss, general rows -> KL + LoRA-norm.",
        epilog=TRAIN_EXAMPLE + "\nconfig keys:\n" + _describe_train_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config (see configs/train_*.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in <out>.run")
    train.add_argument("--overwrite", action="store_true", help="replace an existing <out> adapter folder")
    train.set_defaults(func=run_train)
    register_grams(subparsers)



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
        help="a saved dataset (datasets.save_to_disk, or the folder ilora collect wrote) of one data type; repeat for "
        "each type",
    )
    act.add_argument("--out", required=True, help="output folder (activations.json/.txt, heatmap.png)")
    act.add_argument("--layer", help="LoRA layer for the heatmap (default: first language-model layer)")
    act.add_argument("--limit", type=int, default=256, help="rows per data type (default 256)")
    act.add_argument("--batch-size", type=int, default=8)
    act.add_argument("--dtype", default="float32")
    act.add_argument("--device", default="cpu")
    act.set_defaults(func=run_analyze_activations)


def _describe_train_config() -> str:
    """The config keys with their real defaults (required ones marked), then the training presets."""
    import dataclasses

    from ilora.routing.config import TRAIN_PRESETS, TrainConfig

    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            default = f"= {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"= {f.default_factory()!r}"
        else:
            default = "(required)"
        lines.append(f"  {f.name} {default}: {f.metadata.get('help', '')}")
    lines.append("\ntraining presets (chosen by the model; the config's training keys update them):")
    for name, who in (("builtin", "the shipped base, model: builtin"), ("paper", "any other model")):
        lines.append(f"  {name} ({who}): " + ", ".join(f"{k}={v}" for k, v in TRAIN_PRESETS[name].items()))
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    from ilora.config import load_yaml
    from ilora.routing.config import TrainConfig
    from ilora.routing.train import train_from_config

    config = load_yaml(TrainConfig, args.config, args.set)
    out = train_from_config(config, resume=args.resume, overwrite=args.overwrite)
    print(f"adapter -> {out}")
    return 0


def run_analyze_activations(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from ilora.atari.collect import collected_dataset
    from ilora.config import parse_named_path
    from ilora.routing.analyze import analyze_activations, format_table

    data = {}
    for value in args.data:
        name, path = parse_named_path(value)
        path = collected_dataset(path)
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


GRAMS_EXAMPLE = """example:
  ilora grams runs/pong --data data/pong --general data/general --rows 256
"""


def register_grams(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grams",
        help="measure an adapter's input Grams per LoRA module (for data-aware merges and interference)",
        description="Mean input Gram XᵀX/count of every LoRA module on the adapter's task rows (and general "
        "rows), measured in base + adapter; written to ADAPTER/grams.safetensors.",
        epilog=GRAMS_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter folder")
    p.add_argument("--data", required=True, metavar="TASK_DIR",
                   help="the adapter's task rows (datasets.save_to_disk, or the folder ilora collect wrote)")
    p.add_argument("--general", metavar="DIR", help="general rows (datasets.save_to_disk)")
    p.add_argument("--rows", type=int, default=256, help="first rows of each dataset used (default 256)")
    p.add_argument("--base", help="base model (default: the adapter config's base_model_name_or_path)")
    p.add_argument("--out", help="Grams file (default: ADAPTER/grams.safetensors)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_grams)


def saved_rows(flag: str, path: str, limit: int):
    """The first ``limit`` rows of a ``datasets.save_to_disk`` folder of example rows."""
    from datasets import Dataset, load_from_disk

    from ilora.atari.collect import collected_dataset

    path = collected_dataset(path)
    if not Path(path).is_dir():
        raise IloraError(f"{flag} {path}: not a folder saved with datasets.save_to_disk")
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise IloraError(f"{flag} {path}: cannot load dataset ({err})") from err
    if not isinstance(ds, Dataset):
        raise IloraError(f"{flag} {path}: a DatasetDict; give one split's folder")
    missing = sorted({"prompt", "answer"} - set(ds.column_names))
    if missing:
        raise IloraError(f"{flag} {path}: rows lack {missing}; expected example rows (images, prompt, answer)")
    if len(ds) == 0:
        raise IloraError(f"{flag} {path}: no rows")
    return ds.select(range(min(limit, len(ds))))


def run_grams(args: argparse.Namespace) -> int:
    from ilora.routing.grams import compute_adapter_grams
    from ilora.merge.io import LoraAdapter

    if args.rows < 1:
        raise IloraError(f"--rows {args.rows}: must be at least 1")
    if args.batch_size < 1:
        raise IloraError(f"--batch-size {args.batch_size}: must be at least 1")
    LoraAdapter(args.adapter)  # a bad adapter folder fails before any data or model is read
    task = saved_rows("--data", args.data, args.rows)
    general = saved_rows("--general", args.general, args.rows) if args.general else None
    out = compute_adapter_grams(args.base, args.adapter, task, general, args.out, args.batch_size, args.device)
    kinds = f"{len(task)} task" + (f" and {len(general)} general" if general is not None else "")
    print(f"Grams of {args.adapter} on {kinds} rows -> {out}")
    return 0
