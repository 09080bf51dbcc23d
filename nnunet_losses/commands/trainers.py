"""``nnunet-losses trainers [NAME]``: our trainers and the tokens their names take
(:mod:`nnunet_losses.training.names`), or what one trainer name stands for."""

from __future__ import annotations

import argparse
import json
import sys

from ..training.discovery import enable_trainers
from ..training.names import TOKENS, TrainerNameError, accepted_tokens, find_trainer, token_form

COMMAND = "trainers"


def grammar_table() -> str:
    """The tokens of the grammar, one line each, in their canonical order."""
    return "\n".join(f"  {token_form(token):<14} {token.describe}" for token in TOKENS)


def list_trainers() -> str:
    """Every trainer of nnunet-losses with the tokens it takes and their current values."""
    import nnunet_losses.trainers as trainers

    sections = [f"Tokens after any trainer's name, joined by '_', in this order (nnU-Net's own trainers take the "
                f"optimizer, lr, ep and it tokens):\n{grammar_table()}"]
    for name in trainers.TRAINER_NAMES:
        sections.append(f"{name}\n{accepted_tokens(getattr(trainers, name))}")
    return "\n\n".join(sections)


def describe(name: str) -> str:
    """What ``name`` stands for: the settings of a name with tokens, or a trainer's tokens and values."""
    enable_trainers()
    trainer = find_trainer(name)  # a name with tokens that do not resolve raises TrainerNameError here
    if trainer is None:
        raise ValueError(f"{name}: expected the name of a trainer nnU-Net finds (its own or ours, with or without "
                         "tokens), got none of that name")
    record = getattr(trainer, "name_settings", None)  # only classes built from a name with tokens have it
    return f"{name}\n{accepted_tokens(trainer)}" if record is None else json.dumps(record, indent=2)


def _run(args: argparse.Namespace) -> int:
    try:
        print(list_trainers() if args.name is None else describe(args.name))
    except TrainerNameError as error:
        print(f"nnunet-losses {COMMAND}: error: {error.reason} (`nnunet-losses {COMMAND} {error.trainer.__name__}` "
              "lists the tokens it accepts)", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"nnunet-losses {COMMAND}: error: {error}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="list our trainers and the tokens of trainer names, or resolve one name",
        description=("Experiments by name: -tr <trainer>_<token>_<token>... sets hyperparameters, optimizer, "
                     "learning rate, epochs and iterations of any trainer, e.g. nnUNetTrainerMime_a1.5_b0.2, "
                     "nnUNetTrainerDiceIEps_adam_8ep_60it, nnUNetTrainer_adam_lr3e-4_100ep. Without NAME: every "
                     "trainer of nnunet-losses with its tokens and current values. With NAME: the settings it "
                     "stands for (what the training log, debug.json and the checkpoint record)."),
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="a trainer name, with or without tokens")
    parser.set_defaults(func=_run)
