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

# each subcommand and the module that registers it, in the order they appear in --help. Only the named
# command's module is imported: the trainers' listing imports nnU-Net's trainer (7 of its 12 s on a
# 2-core machine), which `evaluate` or a mistyped option should not wait for.
SUBCOMMANDS: dict[str, str] = {
    "trainer-path": "nnunet_losses.commands.trainer_path",
    "trainers": "nnunet_losses.commands.trainers",
    "derive-partial": "nnunet_losses.commands.derive",
    "merge": "nnunet_losses.commands.merge",
    "gradients": "nnunet_losses.commands.gradients",
    "evaluate": "nnunet_losses.commands.evaluation",
    "report": "nnunet_losses.commands.report",
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``command`` alone when it is one of :data:`SUBCOMMANDS`."""
    parser = OneLineErrorParser(
        prog="nnunet-losses",
        description="Tools of nnunet-losses, the Dice-loss research losses as nnU-Net v2 trainers.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    modules = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else list(SUBCOMMANDS.values())
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # nnU-Net's network library uses torch.jit.interface, which torch >= 2.9 warns about on import: not the
    # user's concern, and it would break the rule that an error is one line on stderr
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # the command is the first argument (the top level has no option but --help); imports torch and
        # nnU-Net: seconds in which Ctrl-C may come
        parser = build_parser(argv[0] if argv else None)
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
