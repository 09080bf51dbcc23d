"""``--optimizer`` of the partial-label examples: nnU-Net's SGD, or Adam as in the papers' setup.

Tilborghs et al. train from No New-Net's setup, which uses Adam. With nnU-Net's default SGD (lr 1e-2,
momentum 0.99) a Dice-only network trained with the heuristic ε falls into predicting empty maps for
every case and never leaves (the softmax saturates, so the gradient that would pull the labelled
cases back vanishes); with Adam, whose steps do not shrink with the gradient, it learns the paper's
behaviour. ``adam`` trains ``<trainer>_adam``, an experiment by name (``nnunet-losses trainers``):
our loss with nnU-Net's own Adam configuration, lr 1e-3 (as ``nnUNetTrainerVanillaAdam1en3``).
``nnUNetTrainerDiceIEps`` trains with Adam by default, so ``sgd`` trains it as ``<trainer>_sgd``.
"""

from __future__ import annotations

import argparse

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_losses.trainers
from nnunet_losses.training.names import SEPARATOR, current_values

OPTIMIZERS = ("adam", "sgd", "own")


def add_optimizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="adam: the paper's optimizer, each trainer as <trainer>_adam (nnU-Net's Adam, lr 1e-3); "
                             "sgd: nnU-Net's default (SGD, lr 1e-2, momentum 0.99), with which the heuristic epsilon "
                             "predicts empty maps for every case; own: each trainer's default (nnU-Net's SGD, Adam "
                             "for nnUNetTrainerDiceIEps), what -tr <trainer> alone trains")


def trainer_name(trainer: str, optimizer: str) -> str:
    """The trainer name nnU-Net trains for ``trainer`` (ours or nnU-Net's ``nnUNetTrainer``, tokens allowed)
    with ``optimizer``: ``<trainer>_<optimizer>``, or ``trainer`` where that is its own optimizer already."""
    if optimizer == "own":
        return trainer
    base = trainer.split(SEPARATOR)[0]
    own = current_values(getattr(nnunet_losses.trainers, base, nnUNetTrainer))["optimizer"]
    return trainer if optimizer == own else f"{trainer}{SEPARATOR}{optimizer}"
