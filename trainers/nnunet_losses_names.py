"""Experiments by name: ``-tr <trainer>_<token>_<token>...``, e.g. ``nnUNetTrainerMime_a1.5_b0.2``,
``nnUNetTrainerDiceIEps_adam_8ep_60it`` or ``nnUNetTrainer_adam_lr3e-4_100ep``: any trainer nnU-Net
finds (ours or its own), with the hyperparameters, optimizer, learning rate and budget its tokens
give (the grammar: ``nnunet_losses.training.names``; ``nnunet-losses trainers`` lists it). The name
differs per experiment, so its output folder does too, and ``nnUNetv2_predict -tr`` finds the same
class again by that name.

nnU-Net asks every module in this folder for the trainer name; this one answers through a module
``__getattr__`` (PEP 562): AttributeError for names that are not ours, so nnU-Net looks elsewhere,
and an error that names the token for names whose tokens do not resolve.
"""

import nnunet_losses.trainers
from nnunet_losses.training.names import find_trainer, trainer_from_name


def __getattr__(name: str) -> type:
    # our own trainers as users import them (nnU-Net's lookup would import a second copy of their module
    # under its bare name), so that nnUNetTrainerMime_sgd subclasses nnunet_losses.trainers.nnUNetTrainerMime
    ours = nnunet_losses.trainers
    return trainer_from_name(name, find=lambda base: getattr(ours, base) if base in ours.TRAINER_NAMES
                             else find_trainer(base), known=ours.TRAINER_NAMES + ("nnUNetTrainer",))
