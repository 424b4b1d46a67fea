"""Command ``ilora experiment CONFIG``: the end-to-end experiment."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="run (or resume) the end-to-end experiment of a YAML config",
        description="Base model -> expert data -> plain / routed / joint adapters -> merges with every "
        "method -> play every model on every game -> REPORT.md with the paper's tables. Stages already "
        "done with the same settings are skipped.",
    )
    p.add_argument("config", type=Path, help="YAML preset, e.g. configs/default.yaml")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage or every stage under a prefix (e.g. train/routed, merge), and what depends on it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. eval.episodes=8")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ilora.config import load_yaml
    from ilora.experiment.config import ExperimentConfig
    from ilora.experiment.pipeline import run_experiment

    config = load_yaml(ExperimentConfig, args.config, args.set)
    report = run_experiment(config, tuple(args.force))
    print(f"report: {report}")
    return 0
