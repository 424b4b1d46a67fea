"""The `ilora` command line: a thin shell over library functions.

Each subpackage owns its commands in its own ``cli.py`` through ``register(subparsers)``;
this module only gathers them, so adding a command never touches another area's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ilora import __version__
from ilora.errors import IloraError

# Modules whose ``register(subparsers)`` adds commands, in the order `--help` lists them; a
# module's ``register_analyses(subparsers)``, where it has one, adds ``ilora analyze`` commands.
COMMAND_MODULES = (
    "ilora.experiment.cli",  # experiment
    "ilora.base.cli",  # base
    "ilora.general.cli",  # general, eval general
    "ilora.atari.cli",  # collect, play, experts, games
    "ilora.routing.cli",  # train, analyze activations
    "ilora.routing.select_cli",  # select-play, analyze selection
    "ilora.merge.cli",  # merge, grams, analyze merge / interference
    "ilora.library.cli",  # library
    "ilora.experiment.tune_cli",  # tune-merge
    "ilora.rl.cli",  # rl
    "ilora.experiment.rl_compare",  # rl-compare
)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in one line, like every other input error (the usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ilora",
        description="Routing-tuned LoRA adapters, iteratively merged (I-LoRA), and the Atari benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"ilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a missing command module
                raise
    for module in modules:
        module.register(sub)
    analyze = sub.add_parser("analyze", help="analyse trained adapters and merges")
    analyses = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for module in modules:
        if hasattr(module, "register_analyses"):
            module.register_analyses(analyses)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except IloraError as err:
        print(f"ilora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ilora {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
