"""``nnunet-losses trainer-path``: the folder of our trainers, for nnU-Net's ``nnUNet_extTrainer``
(:mod:`nnunet_losses.training.discovery` does the work; this module is its command line)."""

from __future__ import annotations

import argparse
import os

from ..training.discovery import ENV_VAR, trainer_folder, with_trainer_folder


def _trainer_path(args: argparse.Namespace) -> int:
    print(with_trainer_folder(os.environ.get(ENV_VAR)) if args.append else trainer_folder())
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "trainer-path",
        help="print the folder of our trainers, for nnU-Net's nnUNet_extTrainer",
        description=(
            "Print the folder holding the nnunet-losses trainers (nnUNetTrainerMime, nnUNetTrainerDiceBI, ...), "
            f"for nnU-Net's {ENV_VAR} environment variable: "
            f"`export {ENV_VAR}=$(nnunet-losses trainer-path --append)`. Then `nnUNetv2_train ... -tr "
            "nnUNetTrainerMime` and `nnUNetv2_predict ... -tr nnUNetTrainerMime` find them. In Python, call "
            "nnunet_losses.training.discovery.enable_trainers() instead."
        ),
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help=(
            f"print the current ${ENV_VAR} with the folder appended (separated by {os.pathsep!r}, not repeated if "
            "already there), so other external trainer folders stay available"
        ),
    )
    parser.set_defaults(func=_trainer_path)
