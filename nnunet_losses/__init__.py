"""nnunet-losses: the loss functions of recent Dice-loss research, exact to the papers, for nnU-Net v2.

``import nnunet_losses`` gives the losses (pure PyTorch, :mod:`nnunet_losses.losses`); the rest of the
package is imported on demand: :mod:`nnunet_losses.training` (what nnU-Net's training imports through
the trainers), :mod:`nnunet_losses.commands` (the ``nnunet-losses`` command), and
:mod:`nnunet_losses.trainers` (the folder ``nnUNet_extTrainer`` points at). The contract of the losses
is ``docs/losses.md``, the layout ``docs/architecture.md``.
"""

from .losses import *  # noqa: F401,F403 -- the public loss API, listed in losses.__all__
from .losses import __all__

__version__ = "0.1.0"
