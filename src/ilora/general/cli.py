"""``ilora general``: write the built-in general vision-language rows as a saved dataset; ``ilora eval general``:
a model's accuracy on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.errors import IloraError

EXAMPLE = """example:
  ilora general --rows 1000 --out data/general                 # training rows (general_data of a train config)
  ilora general --rows 300 --split test --out data/general-test
  ilora general --rows 200 --families count,color --out data/scenes --preview scenes.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.general.data import ALL_FAMILIES

    p = subparsers.add_parser(
        "general",
        help="write procedural general vision-language rows (scenes, Atari frames) as a saved dataset",
        description="Draw general rows (the row contract: images, prompt, answer, task, source) and save them "
        "with datasets.save_to_disk. The train and test splits never ask about the same content.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, required=True, help="number of rows, shared equally by the families")
    p.add_argument("--out", required=True, help="output folder (datasets.load_from_disk)")
    p.add_argument("--seed", type=int, default=0, help="equal arguments give identical rows (default %(default)s)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which split (default %(default)s)")
    p.add_argument("--families", default=None,
                   help=f"comma-separated question families (default all: {','.join(ALL_FAMILIES)})")
    p.add_argument("--image-size", type=int, default=None, help="side of the scene images in pixels (default 96)")
    p.add_argument("--preview", default=None, help="also write a contact sheet of the first rows to this .png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run_general)

    ev = subparsers.add_parser("eval", help="evaluate a model")
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


def run_general(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_dir, check_output_file
    from ilora.general.data import (
        GeneralDataConfig,
        generate_general_rows,
        rows_to_dataset,
        validate_config,
    )
    from ilora.general.preview import save_contact_sheet

    if args.rows < 1:
        raise IloraError(f"--rows {args.rows}: must be at least 1")
    if Path(args.out).exists() and not args.overwrite:
        raise IloraError(f"{args.out}: output already exists (pass --overwrite to replace it)")
    if args.preview is not None:
        check_output_file(args.preview, "--preview")
        if not args.preview.endswith(".png"):
            raise IloraError(f"--preview {args.preview}: must end in .png")
    config = GeneralDataConfig()
    if args.families is not None:
        config.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if args.image_size is not None:
        config.image_size = args.image_size
    validate_config(config)
    rows = generate_general_rows(args.rows, args.seed, args.split, config=config, progress=True)
    with atomic_dir(args.out) as tmp:
        rows_to_dataset(rows).save_to_disk(str(tmp))
    print(f"{len(rows)} {args.split} rows -> {args.out} (datasets.load_from_disk)")
    if args.preview is not None:
        print(f"preview: {save_contact_sheet(rows[:16], args.preview)}")
    return 0


def run_eval_general(args: argparse.Namespace) -> int:
    from ilora.fileio import atomic_write_text, check_output_file, to_json
    from ilora.general.benchmark import accuracy_by_task, accuracy_table
    from ilora.general.data import generate_general_rows
    from ilora.models.load import load_vlm_with_adapter

    if args.json:
        check_output_file(args.json, "--json")
    model, processor = load_vlm_with_adapter(args.model, args.adapter)
    image_size = processor.image_processor.size.get("height", 96)
    rows = generate_general_rows(args.rows, args.seed, "test", image_size=image_size)
    scores = accuracy_by_task(model, processor, rows)
    print(accuracy_table(scores))
    if args.json:
        atomic_write_text(args.json, to_json(scores))
    return 0
