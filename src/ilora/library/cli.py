"""``ilora library``: a skill library of LoRA adapters with its merged model (``ilora.library``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ilora.errors import IloraError
from ilora.merge.cli import add_method_option_flags, method_options

# A library merges every skill at weight 1 (``compose`` fits weights): no ``--weights`` flag.
LIBRARY_FIXED_OPTIONS = ("weights",)

EXAMPLE = """example:
  ilora library init skills --base builtin                       # I-LoRA, folding skills in one by one
  ilora library add skills pong runs/pong/adapter --data data/pong/heldout
  ilora library add skills breakout runs/breakout/adapter
  ilora library list skills
  ilora library remove skills breakout                           # says whether it subtracted or rebuilt
  ilora library build skills --method task_arithmetic            # other settings: rebuilt from every skill
  ilora library compose skills --task-data data/freeway/train --out composed/freeway --new-rank 4
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "library",
        help="a skill library: named LoRA adapters, their merged model, composition for a new task",
        description="A folder of named skills (adapter, held-out rows, Grams, scores) and their merged state. "
        "Every change is atomic, logged with its inputs' sha256, and refused while another runs.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="library_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="make an empty library", description="Make an empty library folder DIR.")
    init.add_argument("dir", metavar="DIR", help="the new library folder")
    init.add_argument("--base", required=True, help="the skills' base model: 'builtin', a folder or a cached hub id")
    add_merge_options(init)
    init.set_defaults(func=run_init)

    add = sub.add_parser(
        "add",
        help="add a skill and fold it into the merged state",
        description="Copy ADAPTER (and its held-out rows, Grams, scores) into the library as skill NAME and "
        "fold it into the merged state (or rebuild it, for one-shot methods).",
    )
    add.add_argument("dir", metavar="DIR", help="the library")
    add.add_argument("name", metavar="NAME", help="the skill's name (letters, digits, '_', '-', '.')")
    add.add_argument("adapter", metavar="ADAPTER", help="its PEFT LoRA adapter folder")
    add.add_argument("--data", metavar="HELDOUT", help="its held-out rows (datasets.save_to_disk folder), copied")
    add.add_argument("--grams", action="store_true", help="keep ADAPTER/grams.safetensors (for data-aware merges)")
    add.add_argument("--scores", metavar="JSON", help="its single-task scores (e.g. `ilora play --json` output)")
    add.set_defaults(func=run_add)

    remove = sub.add_parser(
        "remove",
        help="take a skill out (subtracted where the method is linear, else rebuilt)",
        description="Remove skill NAME: subtracted from the merged state where the method is linear in its "
        "inputs (task_arithmetic), else the merged state is rebuilt from the remaining skills.",
    )
    remove.add_argument("dir", metavar="DIR", help="the library")
    remove.add_argument("name", metavar="NAME", help="the skill to remove")
    remove.set_defaults(func=run_remove)

    listing = sub.add_parser("list", help="one line per skill", description="The skills, in the order they were added.")
    listing.add_argument("dir", metavar="DIR", help="the library")
    listing.set_defaults(func=run_list)

    show = sub.add_parser("show", help="the library in full: settings, skills, merged state, operations")
    show.add_argument("dir", metavar="DIR", help="the library")
    show.add_argument("--ops", type=int, default=10, help="last operations shown (default %(default)s)")
    show.set_defaults(func=run_show)

    build = sub.add_parser(
        "build",
        help="rebuild the merged state (with new merge settings)",
        description="Rebuild the merged state from every skill. --method starts new settings from that "
        "method's defaults; without it, the given options change the current ones. Later changes use them.",
    )
    build.add_argument("dir", metavar="DIR", help="the library")
    add_merge_options(build, method_default=None)
    build.set_defaults(func=run_build)

    compose = sub.add_parser(
        "compose",
        help="fit a weight per skill (and a new small adapter) on a new task's rows (PSEC)",
        description="Fit one weight per skill, and optionally a new LoRA adapter, on the new task's rows "
        "(answer-token loss); write W = sum_i w_i dW_i (+ the new adapter) as a PEFT adapter --out.",
    )
    compose.add_argument("dir", metavar="DIR", help="the library")
    compose.add_argument("--task-data", required=True, metavar="D", help="the new task's rows (datasets.save_to_disk)")
    compose.add_argument("--out", required=True, metavar="A", help="the composed PEFT adapter folder to write")
    compose.add_argument("--skills", type=comma_names, help="comma-separated skills to compose (default: all)")
    compose.add_argument("--rows", type=int, help="first task rows fitted on (default 256)")
    compose.add_argument("--steps", type=int, help="optimiser steps (default 100)")
    compose.add_argument("--batch-size", type=int, help="rows per step (default 8)")
    compose.add_argument("--lr", type=float, help="learning rate of the skills' weights (default 0.05)")
    compose.add_argument("--init-weight", type=float, help="starting weight of every skill (default 1/skills)")
    compose.add_argument("--new-rank", type=int, help="rank of a new LoRA adapter trained with them (default 0: none)")
    compose.add_argument("--new-alpha", type=float, help="lora_alpha of the new adapter (default 2 x rank)")
    compose.add_argument("--new-lr", type=float, help="learning rate of the new adapter (default 1e-3)")
    compose.add_argument("--seed", type=int, help="seed of the row order and the new adapter (default 0)")
    compose.add_argument("--device", help="torch device (default cpu)")
    compose.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    compose.set_defaults(func=run_compose)


def add_merge_options(p: argparse.ArgumentParser, method_default: str | None = "ilora") -> None:
    """The merge-settings flags of ``init`` and ``build``."""
    default = f" (default {method_default})" if method_default else " (default: the library's)"
    p.add_argument("--method", default=method_default, help="merge method, see `ilora merge --list-methods`" + default)
    add_method_option_flags(p, skip=LIBRARY_FIXED_OPTIONS)
    p.add_argument(
        "--iterative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold each new skill into the merged state (default: where the method takes a merged state); "
        "--no-iterative merges every skill at once",
    )


def comma_names(text: str) -> list[str]:
    """``--skills pong,breakout`` -> ``["pong", "breakout"]``."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated skill names")
    return names


def print_entry(entry: dict) -> None:
    """One line saying what an operation did to the merged state."""
    merged = entry["merged"] or "none (no skill)"
    print(f"{entry['op']} #{entry['seq']}: {entry['how']} ({entry['why']}); merged state {merged}; skills: "
          + (", ".join(entry["skills"]) or "none"))


def run_init(args: argparse.Namespace) -> int:
    from ilora.library.store import init_library, merge_settings

    settings = merge_settings(args.method, method_options(args, skip=LIBRARY_FIXED_OPTIONS), args.iterative)
    library = init_library(args.dir, args.base, settings)
    mode = "iterative" if settings.iterative else "one merge of every skill"
    print(f"library {library.root}: base {library.base}, merged with {settings.method} ({mode})")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from ilora.library.store import SkillLibrary

    print_entry(SkillLibrary(args.dir).add(args.name, args.adapter, args.data, args.grams, args.scores))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ilora.library.store import SkillLibrary

    print_entry(SkillLibrary(args.dir).remove(args.name))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from ilora.library.store import SkillLibrary, merge_settings

    library = SkillLibrary(args.dir)
    current = library.settings
    if args.method is None:
        options = {**current.options, **method_options(args, skip=LIBRARY_FIXED_OPTIONS)}
        iterative = current.iterative if args.iterative is None else args.iterative
        settings = merge_settings(current.method, options, iterative)
    else:
        settings = merge_settings(args.method, method_options(args, skip=LIBRARY_FIXED_OPTIONS), args.iterative)
    print_entry(library.build(settings))
    return 0


def skill_line(skill) -> str:
    """A skill in one line: name, adapter hash, rank and modules, held-out rows, Grams, scores."""
    from ilora.merge.io import LoraAdapter

    adapter = LoraAdapter(skill.adapter)
    ranks = sorted({adapter.rank(m) for m in adapter.modules})
    parts = [
        f"{skill.name:<16}",
        f"sha256 {skill.adapter_sha256[:12]}",
        f"r={'/'.join(map(str, ranks))} on {len(adapter.modules)} modules",
        f"held-out rows {skill.data['heldout_rows']}" if skill.heldout else "no held-out rows",
        "Grams" if skill.grams else "no Grams",
    ]
    if skill.scores is not None:
        score = skill.scores.get("mean")
        parts.append(f"score {score:.2f}" if isinstance(score, (int, float)) else "scores recorded")
    return "  ".join(parts)


def run_list(args: argparse.Namespace) -> int:
    from ilora.library.store import SkillLibrary

    library = SkillLibrary(args.dir)
    skills = library.skills()
    for skill in skills:
        print(skill_line(skill))
    if not skills:
        print(f"{library.root}: no skills (add one with `ilora library add {args.dir} NAME ADAPTER`)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ilora.library.store import SkillLibrary
    from ilora.merge.io import load_merged_state

    if args.ops < 0:
        raise IloraError(f"--ops {args.ops}: must be 0 or more")
    library = SkillLibrary(args.dir)
    settings = library.settings
    print(f"library   {library.root}")
    print(f"base      {library.base}")
    mode = "iterative (skills folded in, in order)" if settings.iterative else "one merge of every skill"
    print(f"merge     {settings.method} {json.dumps(settings.options)} {mode}")
    merged = library.merged_state()
    if merged is None:
        print("merged    none (no skill)")
    else:
        state = load_merged_state(merged)
        print(f"merged    {merged} ({len(state.deltas)} modules, from {len(state.meta.get('inputs', []))} input(s))")
    print(f"skills    {len(library.skills())}")
    for skill in library.skills():
        print("  " + skill_line(skill))
        print(f"    adapter {skill.adapter}" + (f"; held-out {skill.heldout}" if skill.heldout else ""))
    operations = library.operations()
    shown = operations[-args.ops :] if args.ops else []
    print(f"operations {len(operations)}" + (f" (last {len(shown)})" if shown else ""))
    for entry in shown:
        what = entry["op"] + (f" {entry['skill']}" if "skill" in entry else "")
        how = f": {entry['how']} ({entry['why']})" if "how" in entry else ""
        print(f"  #{entry['seq']} {entry['time']} {what}{how}")
    return 0


def run_compose(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ilora.config import from_dict
    from ilora.library.compose import ComposeConfig, compose_skills

    given = {f.name: getattr(args, f.name) for f in fields(ComposeConfig) if getattr(args, f.name) is not None}
    config = from_dict(ComposeConfig, given, "compose")
    record = compose_skills(args.dir, args.task_data, args.out, config, overwrite=args.overwrite)
    weights = ", ".join(f"{s['name']} {s['weight']:.3f}" for s in record["skills"])
    loss = record["loss"]
    print(f"weights: {weights}" + (f" + new adapter (rank {config.new_rank})" if config.new_rank else ""))
    print(f"answer loss on the {record['rows']} task rows: base {loss['base']:.4f}, "
          f"start {loss['start']:.4f}, fitted {loss['fitted']:.4f}")
    print(f"composed adapter -> {Path(args.out)}")
    return 0
