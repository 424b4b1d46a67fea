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
        "done with the same settings are skipped; the others run as Ray tasks, on this machine (workers "
        "at a time) or on a running Ray cluster (--address or RAY_ADDRESS) that sees the run folder.",
    )
    p.add_argument("config", type=Path, help="YAML preset, e.g. configs/default.yaml")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage or every stage under a prefix (e.g. train/routed, merge), and what depends on it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. eval.episodes=8")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray: stages as Ray tasks; local: this machine's worker processes (a saturated CPU where Ray's "
                   "node cannot start in time)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (auto, ray://HOST:PORT); default: RAY_ADDRESS when set, else this machine")
    p.add_argument("--gpus", type=float, default=0.0,
                   help="GPUs each model stage (training, play, Grams, merge search) holds on the cluster (0.5: two share one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ilora.config import load_yaml
    from ilora.experiment.config import ExperimentConfig
    from ilora.experiment.pipeline import ExecutionSettings, run_experiment

    config = load_yaml(ExperimentConfig, args.config, args.set)
    report = run_experiment(config, tuple(args.force), execution=ExecutionSettings(args.executor, args.address, args.gpus))
    print(f"report: {report}")
    return 0
