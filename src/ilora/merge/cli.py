"""``ilora merge``: merge PEFT LoRA adapters (or fold a new one into a merged state)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ilora.errors import IloraError

EXAMPLE = """example:
  ilora merge runs/pong/adapter runs/breakout/adapter --out merged/two --keep 0.8
  ilora merge merged/two runs/seaquest/adapter --out merged/three       # iterative
  ilora merge a b --method peft:ties --base builtin --out merged/ties --density 0.5
"""


EXPORT_WORST_SHOWN = 5  # modules listed after an export (a 7B model has 354; the JSON report has every one)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge LoRA adapters into one weight delta (I-LoRA or a baseline)",
        description="Merge PEFT LoRA adapters and/or a merged state into one dense ΔW per module.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="ADAPTER_OR_MERGED_DIR", help="inputs, in order (ties go to later ones)")
    p.add_argument("--out", help="output folder for the merged state")
    p.add_argument("--method", default="ilora", help="merge method (default: ilora); see --list-methods")
    add_method_option_flags(p)
    p.add_argument("--base", help="base model folder or 'builtin' (needed by peft:* and --save-model)")
    p.add_argument("--export-lora", type=int, metavar="RANK", help="also write OUT/lora_rankRANK, a PEFT adapter")
    p.add_argument("--save-model", action="store_true", help="also write OUT/model, the merged full model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--list-methods", action="store_true", help="print the merge methods and exit")
    p.set_defaults(func=run_merge)


def comma_floats(text: str) -> list[float]:
    """``--weights 1,0.5`` -> ``[1.0, 0.5]``."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers, e.g. 1,0.5") from None


def method_option_fields(skip: tuple[str, ...] = ()) -> dict[str, list[tuple[list[str], dataclasses.Field, Any]]]:
    """Every user option of the registered merge methods, as the methods' dataclasses declare it.

    Args:
        skip: option names left out.

    Returns:
        Option name -> ``(method names, field, field type)`` per distinct declaration (help text
        and default), in method-name order.
    """
    import typing

    from ilora.merge.registry import REGISTERED, available_methods, user_options

    options: dict[str, dict[tuple[str, str], tuple[list[str], dataclasses.Field, Any]]] = {}
    for name in available_methods():
        hints = typing.get_type_hints(REGISTERED[name][0])
        for f in user_options(name):
            if f.name not in skip:
                declared = options.setdefault(f.name, {})
                declared.setdefault((f.metadata["help"], repr(f.default)), ([], f, hints[f.name]))[0].append(name)
    return {option: list(declared.values()) for option, declared in sorted(options.items())}


def flag_type(tp: Any):
    """The argparse ``type`` of a method option declared as ``tp`` (``None`` allowed: unset)."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = (member for member in typing.get_args(tp) if member is not type(None))
    if tp == list[float]:
        return comma_floats
    if tp in (int, float, str):
        return tp
    raise TypeError(f"merge option type {tp} has no command-line form; give it one in flag_type")


def method_labels(names: list[str]) -> str:
    """``names`` for a help text, a family written ``peft:*`` when all of its methods are there."""
    from ilora.merge.registry import available_methods

    families = {name.split(":")[0] for name in names if ":" in name}
    whole = {f for f in families if all(n in names for n in available_methods() if n.startswith(f + ":"))}
    shown = [name for name in names if ":" not in name or name.split(":")[0] not in whole]
    return ", ".join(shown + [f"{f}:*" for f in sorted(whole)])


def add_method_option_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per merge-method option (``--svd-tol`` sets ``svd_tol``), its type, help and defaults
    read from the methods' dataclass fields, plus ``--option KEY=VALUE`` for any option."""
    for option, declarations in method_option_fields(skip).items():
        kinds = {flag_type(tp) for _, _, tp in declarations}
        if len(kinds) > 1:
            raise TypeError(f"merge option {option!r} is declared with different types by different methods")
        text = "; ".join(
            f"{method_labels(names)}: {f.metadata['help']}" + ("" if f.default is None else f" (default {f.default})")
            for names, f, _ in declarations
        )
        parser.add_argument(
            "--" + option.replace("_", "-"),
            dest=option,
            type=kinds.pop(),
            metavar=option.upper(),
            help=text.replace("%", "%%"),
        )
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any method option")


def method_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The method options given on the command line (only those set; ``--option`` last)."""
    from ilora.config import parse_overrides

    options = {k: getattr(args, k) for k in method_option_fields(skip) if getattr(args, k, None) is not None}
    for key, value in parse_overrides(args.option).items():
        if isinstance(value, dict):
            raise IloraError(f"--option {key}: nested keys are not method options")
        options[key] = value
    return options


def run_merge(args: argparse.Namespace) -> int:
    from ilora.merge import available_methods, merge_adapters
    from ilora.merge.export import EXPORT_REPORT, merged_prompt_settings

    if args.list_methods:
        print("\n".join(available_methods()))
        return 0
    if not args.inputs or not args.out:
        raise IloraError("merge: give ADAPTER_OR_MERGED_DIR... and --out DIR")
    try:
        prompt = merged_prompt_settings(args.inputs)
    except IloraError as err:
        raise IloraError(f"{err}: a merged model is played with one prompt; merge adapters trained on the same one") from err
    state = merge_adapters(
        args.inputs,
        args.method,
        base=args.base,
        out=args.out,
        overwrite=args.overwrite,
        export_lora_rank=args.export_lora,
        save_model=args.save_model,
        **method_options(args),
    )
    print(f"merged {len(args.inputs)} input(s) with {args.method}: {len(state.deltas)} modules -> {state.path}")
    if args.export_lora is not None:
        folder = Path(args.out) / f"lora_rank{args.export_lora}"
        report = json.loads((folder / EXPORT_REPORT).read_text())
        worst = sorted(report["modules"].items(), key=lambda item: -item[1])[:EXPORT_WORST_SHOWN]
        print(f"  export rank {args.export_lora}, worst modules: " + ", ".join(f"{m} {e:.3g}" for m, e in worst))
        print(f"exported LoRA rank {args.export_lora} -> {folder}: overall relative error {report['relative_error']:.4g}")
    if args.save_model:
        print(f"merged model -> {Path(args.out) / 'model'} (its model card: README.md)")
    if prompt is not None:
        print(f"prompt of the inputs: {', '.join(prompt.games)}, object_text={prompt.object_text}, "
              f"reasoning={prompt.reasoning} (prompt_settings.json in the exported adapter and model)")
    return 0


INTERFERENCE_EXAMPLE = """example:
  ilora grams runs/pong/adapter --data data/pong/train        # once per adapter
  ilora analyze interference runs/pong/adapter runs/breakout/adapter \\
      --data Pong=data/pong/train --data Breakout=data/breakout/train --merged merged/two --out interference.json
"""


def register_analyses(sub: argparse._SubParsersAction) -> None:
    """``ilora analyze merge`` (weight space) and ``ilora analyze interference`` (activations)."""
    from ilora.merge.ilora import ILoRAMerge

    weight_space = sub.add_parser(
        "merge",
        help="how much an I-LoRA max-magnitude merge changes each adapter's delta",
        description="Per adapter: its truncated delta's norm, the share of merged entries taken from it and "
        "|merged - delta| / |delta|; then the adapters' pairwise cosines (all modules together).",
    )
    weight_space.add_argument("adapters", nargs="+", help="two or more PEFT LoRA adapter folders")
    keep = ILoRAMerge.__dataclass_fields__["keep"].default
    weight_space.add_argument("--keep", type=float, default=keep, help=f"I-LoRA keep ratio (default {keep})")
    weight_space.add_argument("--json", type=Path, help="also write the numbers here")
    weight_space.set_defaults(func=run_analyze_merge)
    activations = sub.add_parser(
        "interference",
        help="how loud each adapter and merged state is on each task's inputs (from the adapters' Grams)",
        description="Per task i (ADAPTER i, measured on its --data rows with `ilora grams`): "
        "||dW_j X_i|| / ||dW_i X_i|| for every adapter j, and ||(dW_M - dW_i) X_i|| / ||dW_i X_i|| for every "
        "--merged state M, over all modules (the JSON also has them per module).",
        epilog=INTERFERENCE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    activations.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapters with grams.safetensors")
    activations.add_argument(
        "--data", action="append", required=True, metavar="GAME=DIR", help="task rows of the ADAPTER in the same position"
    )
    activations.add_argument("--merged", nargs="+", default=[], metavar="STATE", help="merged-state folders")
    activations.add_argument("--out", type=Path, help="also write the numbers (per module too) to this JSON file")
    activations.set_defaults(func=run_analyze_interference)


def run_analyze_merge(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_write_text
    from ilora.merge.interference import (
        format_interference,
        interference_stats,
        truncated_deltas,
    )

    if len(args.adapters) < 2:
        raise IloraError(f"analyze merge needs at least two adapters, got {len(args.adapters)}")
    stats = interference_stats([truncated_deltas(a, args.keep) for a in args.adapters])
    print(format_interference(args.adapters, stats))
    if args.json:
        atomic_write_text(args.json, json.dumps({"adapters": args.adapters, "keep": args.keep, **stats}, indent=1))
    return 0


def run_analyze_interference(args: argparse.Namespace) -> int:
    from ilora.config import parse_named_path
    from ilora.fileio import atomic_write_text
    from ilora.merge.interference import (
        adapter_interference,
        format_activation_interference,
    )

    if len(args.data) != len(args.adapters):
        raise IloraError(f"{len(args.adapters)} adapters but {len(args.data)} --data; give one GAME=DIR per adapter, in order")
    games = []
    for value in args.data:
        name, path = parse_named_path(value)
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
        record = {"games": games, "data": [str(parse_named_path(v)[1]) for v in args.data], **stats}
        atomic_write_text(args.out, json.dumps(record, indent=1))
        print(f"-> {args.out}")
    return 0
