"""Commands ``ilora base`` (pretrain the default VLM) and ``ilora eval general``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.config import describe, from_dict, load_yaml, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    from ilora.models.pretrain import BaseConfig

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

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="what", metavar="WHAT", required=True)
    general = ev_sub.add_parser(
        "general",
        help="accuracy on the built-in general vision-language benchmark (held-out split)",
        description="Exact-match accuracy on the held-out split of the built-in general data. For real "
        "models, see the README's lmms-eval recipe (llava_interleave_bench).",
    )
    general.add_argument("--model", required=True, help="model folder, 'builtin' or a cached hub id (a merged model works)")
    general.add_argument("--adapter", help="a PEFT adapter folder to apply")
    general.add_argument("--rows", type=int, default=600, help="held-out rows to score")
    general.add_argument("--seed", type=int, default=0, help="seed of the held-out rows")
    general.add_argument("--json", type=Path, help="also write the scores to this file")
    general.set_defaults(func=run_eval_general)


def run_base(args: argparse.Namespace) -> int:
    from ilora.errors import IloraError
    from ilora.models.pretrain import BaseConfig, pretrain_base

    if args.out.exists() and not args.overwrite:
        raise IloraError(f"{args.out}: already exists (use --overwrite to replace it)")
    config = load_yaml(BaseConfig, args.config, args.set) if args.config else from_dict(BaseConfig, parse_overrides(args.set), "--set")
    record = pretrain_base(config, args.out)
    print_accuracy(record["heldout"])
    print(f"saved {args.out} ({record['seconds']:.0f} s)")
    return 0


def run_eval_general(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_write_text, check_output_file, to_json
    from ilora.general.data import generate_general_rows
    from ilora.models.load import load_vlm_merged
    from ilora.models.pretrain import accuracy_by_task

    if args.json:
        check_output_file(args.json, "--json")
    model, processor = load_vlm_merged(args.model, args.adapter)
    image_size = processor.image_processor.size.get("height", 96)
    rows = generate_general_rows(args.rows, args.seed, "test", image_size=image_size)
    scores = accuracy_by_task(model, processor, rows)
    print_accuracy(scores)
    if args.json:
        atomic_write_text(args.json, to_json(scores))
    return 0


def print_accuracy(scores: dict) -> None:
    """One line per question family: accuracy, its 95% CI, the majority-answer rate and the count."""
    rows = [("overall", scores["overall"])] + sorted(scores["per_task"].items())
    print(f"{'family':<22}{'accuracy':>9}  {'95% CI':<15}{'majority':>9}{'n':>6}")
    for name, s in rows:
        ci = f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]"
        print(f"{name:<22}{s['accuracy']:>9.3f}  {ci:<15}{s['majority_rate']:>9.3f}{s['n']:>6}")
