"""The losses: one pure function per loss (its math in the docstring) and a thin ``nn.Module``, called
with nnU-Net's convention ``loss(x, y, loss_mask=None)``. Pure PyTorch; of nnU-Net only its
``AllGatherGrad`` (batch reductions under DDP, in :mod:`nnunet_losses.losses.distributed`). The contract
is ``docs/losses.md``."""

from .dice import PhiDiceLoss, dice_gradient_weights, estimate_epsilon, phi_dice_loss
from .label_marginal import LabelMarginalLoss, label_marginal_loss, marginal_penalty
from .mime import (
    DynamicMimeLoss,
    MimeLoss,
    NegativeMimeLoss,
    dynamic_mime_loss,
    mime_loss,
    negative_mime_loss,
)
from .missing_labels import (
    LeafCrossEntropyLoss,
    LeafDiceLoss,
    MarginalCrossEntropyLoss,
    MarginalDiceLoss,
    leaf_cross_entropy,
    leaf_dice_loss,
    marginal_cross_entropy,
    marginal_dice_loss,
)

__all__ = [
    "DynamicMimeLoss",
    "LabelMarginalLoss",
    "LeafCrossEntropyLoss",
    "LeafDiceLoss",
    "MarginalCrossEntropyLoss",
    "MarginalDiceLoss",
    "MimeLoss",
    "NegativeMimeLoss",
    "PhiDiceLoss",
    "dice_gradient_weights",
    "dynamic_mime_loss",
    "estimate_epsilon",
    "label_marginal_loss",
    "leaf_cross_entropy",
    "leaf_dice_loss",
    "marginal_cross_entropy",
    "marginal_dice_loss",
    "marginal_penalty",
    "mime_loss",
    "negative_mime_loss",
    "phi_dice_loss",
]
