"""The nnU-Net trainers of nnunet-losses (installed as the package ``nnunet_losses.trainers``).

This folder is what ``nnUNet_extTrainer`` points at (``nnunet-losses trainer-path``); nnU-Net imports
every module in it under its bare name, so it holds trainer modules only. For subclassing in Python::

    from nnunet_losses.trainers import nnUNetTrainerMime
"""

from .nnunet_losses_compound_trainers import (
    nnUNetTrainerDiceBICE,
    nnUNetTrainerDiceICE,
    nnUNetTrainerDiceIEpsCE,
    nnUNetTrainerLeafDiceCE,
    nnUNetTrainerMarginalDiceCE,
)
from .nnunet_losses_dice_trainers import (
    nnUNetTrainerDiceBCI,
    nnUNetTrainerDiceBI,
    nnUNetTrainerDiceCI,
    nnUNetTrainerDiceI,
    nnUNetTrainerDiceIEps,
)
from .nnunet_losses_label_marginal_trainers import nnUNetTrainerCEKL, nnUNetTrainerCEL1
from .nnunet_losses_mime_trainers import nnUNetTrainerMime, nnUNetTrainerNegativeMime
from .nnunet_losses_missing_label_trainers import nnUNetTrainerLeafDice, nnUNetTrainerMarginalDice

TRAINER_NAMES = (
    "nnUNetTrainerMime",
    "nnUNetTrainerNegativeMime",
    "nnUNetTrainerDiceI",
    "nnUNetTrainerDiceCI",
    "nnUNetTrainerDiceBI",
    "nnUNetTrainerDiceBCI",
    "nnUNetTrainerDiceIEps",
    "nnUNetTrainerMarginalDice",
    "nnUNetTrainerLeafDice",
    "nnUNetTrainerCEL1",
    "nnUNetTrainerCEKL",
    "nnUNetTrainerDiceICE",
    "nnUNetTrainerDiceBICE",
    "nnUNetTrainerDiceIEpsCE",
    "nnUNetTrainerMarginalDiceCE",
    "nnUNetTrainerLeafDiceCE",
)

__all__ = [
    "TRAINER_NAMES",
    "nnUNetTrainerCEKL",
    "nnUNetTrainerCEL1",
    "nnUNetTrainerDiceBCI",
    "nnUNetTrainerDiceBI",
    "nnUNetTrainerDiceBICE",
    "nnUNetTrainerDiceCI",
    "nnUNetTrainerDiceI",
    "nnUNetTrainerDiceICE",
    "nnUNetTrainerDiceIEps",
    "nnUNetTrainerDiceIEpsCE",
    "nnUNetTrainerLeafDice",
    "nnUNetTrainerLeafDiceCE",
    "nnUNetTrainerMarginalDice",
    "nnUNetTrainerMarginalDiceCE",
    "nnUNetTrainerMime",
    "nnUNetTrainerNegativeMime",
]
