"""``--optimizer`` of the partial-label examples: nnU-Net's SGD, or Adam as in the papers' setup.

Tilborghs et al. train from No New-Net's setup, which uses Adam. With nnU-Net's default SGD (lr 1e-2,
momentum 0.99) a Dice-only network trained with the heuristic ε falls into predicting empty maps for
every case and never leaves (the softmax saturates, so the gradient that would pull the labelled
cases back vanishes); with Adam, whose steps do not shrink with the gradient, it learns the paper's
behaviour. ``adam`` trains ``<trainer>Adam`` of ``paper_optimizer/`` (our loss + nnU-Net's
``nnUNetTrainerVanillaAdam1en3``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, List, Optional

ADAM_TRAINER_FOLDER = Path(__file__).resolve().parent / "paper_optimizer"
ADAM_SUFFIX = "Adam"
OPTIMIZERS = ("adam", "sgd")


def add_optimizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="adam: the paper's optimizer, nnU-Net's nnUNetTrainerVanillaAdam1en3 (Adam, lr 1e-3) "
                             "combined with each trainer (paper_optimizer/); sgd: nnU-Net's default (SGD, lr 1e-2, "
                             "momentum 0.99), with which the heuristic epsilon predicts empty maps for every case")


def trainer_name(trainer: str, optimizer: str) -> str:
    """The trainer nnU-Net trains for ``trainer`` with ``optimizer``."""
    return trainer + ADAM_SUFFIX if optimizer == "adam" else trainer


def unknown_for_optimizer(trainers: Iterable[str], optimizer: str) -> List[str]:
    """The trainers that have no ``<trainer>Adam`` (with adam, only the trainers of nnunet-losses do)."""
    if optimizer != "adam":
        return []
    from nnunet_losses.trainers import TRAINER_NAMES

    return [t for t in trainers if t not in TRAINER_NAMES]


def trainer_folders(current: Optional[str], optimizer: str) -> str:
    """A value of ``nnUNet_extTrainer``: ``current`` plus our trainers and, with adam, ``paper_optimizer/``."""
    from nnunet_losses.training.discovery import with_trainer_folder

    value = with_trainer_folder(current)
    return with_trainer_folder(value, str(ADAM_TRAINER_FOLDER)) if optimizer == "adam" else value
