"""The frame every analysis subcommand shares: its parser (help text laid out as written, the function
it runs), the one place that turns a user error or an interrupt into one line on stderr and an exit
status, and what it prints when done (its table, then one line per file written).

The error policy of every subcommand: a user error (a missing or invalid file, a bad option,
inconsistent inputs) is raised as :class:`UserInputError` (or is an ``OSError`` such as a missing file or
a permission denied) and :func:`run_reporting_errors` prints ``nnunet-losses COMMAND: error: MESSAGE``,
one line, exit status 2; anything else is a bug and keeps its traceback. SIGINT and SIGTERM end the
command through an exception, so every work folder is removed on the way out (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Callable, Iterator, NoReturn, Optional

from ..nnunet_io import UserInputError

__all__ = ["UserInputError", "OneLineErrorParser", "add_subcommand", "user_input", "run_reporting_errors",
           "progress", "print_done", "shown_items"]

USER_ERRORS = (UserInputError, OSError)
EXIT_USER_ERROR = 2  # argparse's convention
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that cleanup code runs."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_subcommand(subparsers, name: str, run: Callable[[argparse.Namespace], int], *, help: str,
                   description: str, epilog: str) -> argparse.ArgumentParser:
    """The subcommand's parser; ``run(args)`` is called with the parsed arguments and returns the exit code."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run)
    return parser


@contextlib.contextmanager
def user_input(what: Optional[str] = None) -> Iterator[None]:
    """The ValueErrors and TypeErrors of a lower room's checks on what the user gave (a label name, loss
    options, label sets) as :class:`UserInputError`, prefixed with ``what`` (e.g. ``"--loss mime:a=x"``)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if isinstance(error, UserInputError) and what is None:
            raise
        raise UserInputError(f"{what}: {error}" if what else str(error)) from error


def shown_items(items, shown: int = 5) -> str:
    """The first ``shown`` of ``items`` for a message, and how many more: ``a, b, c and 4 more``."""
    items = [str(item) for item in items]
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def describe_error(error: BaseException) -> str:
    """One line for a user error: its message, or for an OSError of the system the file and the reason."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _raise_terminated(signum, frame) -> NoReturn:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_reporting_errors(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``'s exit code; a user error is one line on stderr and exit status 2, an interrupt
    (SIGINT, SIGTERM) one line and 130 / 143."""
    outcome = None
    try:
        with _sigterm_raises():
            return int(run(args) or 0)
    except USER_ERRORS as error:
        outcome = (f"error: {describe_error(error)}", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        outcome = ("interrupted (SIGINT)", EXIT_SIGINT)
    except Terminated:
        outcome = ("terminated (SIGTERM)", EXIT_SIGTERM)
    message, code = outcome
    print(f"nnunet-losses {command}: {message}", file=sys.stderr)
    return code


def progress(items, desc: str, unit: str, show: bool = True):
    """tqdm's progress bar over ``items``, on a terminal only (never in logs or captured output) and erased
    when done, so that what stays on stderr is the command's one line, if any."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=None if show else True, leave=False)


def print_done(table: str, *written: str) -> int:
    """Print the result table and the lines naming what was written; exit code 0."""
    print(table)
    for line in written:
        print(line)
    return 0
