"""The ``nnunet-losses`` command: one entry point, one subcommand per tool.

Each tool module exposes ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` (called with the parsed arguments, returns an exit code) as the parser default. User errors
and interrupts are turned into one line on stderr and an exit status here, in one place
(:func:`nnunet_losses.commands._subcommand.run_reporting_errors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

from ._subcommand import EXIT_SIGINT, OneLineErrorParser, run_reporting_errors

# modules that register subcommands, in the order they appear in --help
SUBCOMMAND_MODULES: list[str] = [
    "nnunet_losses.commands.trainer_path",
    "nnunet_losses.commands.trainers",
    "nnunet_losses.commands.derive",
    "nnunet_losses.commands.merge",
    "nnunet_losses.commands.gradients",
    "nnunet_losses.commands.evaluation",
    "nnunet_losses.commands.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="nnunet-losses",
        description="Tools of nnunet-losses, the Dice-loss research losses as nnU-Net v2 trainers.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # nnU-Net's network library uses torch.jit.interface, which torch >= 2.9 warns about on import: not the
    # user's concern, and it would break the rule that an error is one line on stderr
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
    try:
        parser = build_parser()  # imports every subcommand (torch, nnU-Net): seconds in which Ctrl-C may come
    except KeyboardInterrupt:
        print("nnunet-losses: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return run_reporting_errors(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
