"""nnunet-losses: the loss functions of recent Dice-loss research, exact to the papers, for nnU-Net v2.

Every loss is a pure function (math in its docstring) plus a thin ``nn.Module`` called with nnU-Net's
convention ``loss(x, y, loss_mask=None)``; see ``LOSSES.md`` of the project for the contract.
"""

from .dice import PhiDiceLoss, estimate_epsilon, phi_dice_loss
from .label_marginal import LabelMarginalLoss, label_marginal_loss, marginal_penalty
from .mime import (
    DynamicMimeLoss,
    MimeLoss,
    NegativeMimeLoss,
    dice_gradient_weights,
    dynamic_mime_loss,
    mime_loss,
    negative_mime_loss,
)
from .missing_labels import LeafDiceLoss, MarginalDiceLoss, leaf_dice_loss, marginal_dice_loss

__version__ = "0.1.0"

__all__ = [
    "DynamicMimeLoss",
    "LabelMarginalLoss",
    "LeafDiceLoss",
    "MarginalDiceLoss",
    "MimeLoss",
    "NegativeMimeLoss",
    "PhiDiceLoss",
    "dice_gradient_weights",
    "dynamic_mime_loss",
    "estimate_epsilon",
    "label_marginal_loss",
    "leaf_dice_loss",
    "marginal_dice_loss",
    "marginal_penalty",
    "mime_loss",
    "negative_mime_loss",
    "phi_dice_loss",
]
