"""The frame every analysis subcommand shares: its parser (help text laid out as written, the function
it runs) and what it prints when done (its table, then one line per file written)."""

from __future__ import annotations

import argparse
from typing import Callable


def add_subcommand(subparsers, name: str, run: Callable[[argparse.Namespace], int], *, help: str,
                   description: str, epilog: str) -> argparse.ArgumentParser:
    """The subcommand's parser; ``run(args)`` is called with the parsed arguments and returns the exit code."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run)
    return parser


def print_done(table: str, *written: str) -> int:
    """Print the result table and the lines naming what was written; exit code 0."""
    print(table)
    for line in written:
        print(line)
    return 0
