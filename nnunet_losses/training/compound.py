"""Dice + cross-entropy, as nnU-Net's default loss combines them: one of our Dice losses plus nnU-Net's
own cross-entropy (``DC_and_CE_loss``: ``RobustCrossEntropyLoss`` with the ignore label) or binary
cross-entropy for regions (``DC_and_BCE_loss``), or plus one of our label-set cross-entropies. The
compound trainers (``trainers/nnunet_losses_compound_trainers.py``) build their loss per output scale
with :class:`DiceAndCrossEntropy`, then through :func:`~.loss_assembly.assemble_loss` as every trainer.
"""

from __future__ import annotations

from typing import Optional

import torch
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn


class DiceAndCrossEntropy(nn.Module):
    """``weight_dice · dice(x, y, loss_mask) + weight_ce · cross_entropy(x, y, loss_mask)``.

    Further keywords of the call (the missing-label trainers' ``annotated``) reach both terms. A term
    weighted 0 is not computed, as in nnU-Net's ``DC_and_CE_loss``.
    """

    def __init__(self, dice: nn.Module, cross_entropy: nn.Module, weight_dice: float = 1.0, weight_ce: float = 1.0):
        super().__init__()
        self.dice = dice
        self.cross_entropy = cross_entropy
        self.weight_dice = float(weight_dice)
        self.weight_ce = float(weight_ce)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                **label_sets) -> torch.Tensor:
        total = 0.0
        if self.weight_dice != 0:
            total = total + self.weight_dice * self.dice(x, y, loss_mask, **label_sets)
        if self.weight_ce != 0:
            total = total + self.weight_ce * self.cross_entropy(x, y, loss_mask, **label_sets)
        return total

    def extra_repr(self) -> str:
        return f"weight_dice={self.weight_dice}, weight_ce={self.weight_ce}"


class NnUNetCrossEntropy(nn.Module):
    """nnU-Net's CE term of ``DC_and_CE_loss`` for label maps: ``RobustCrossEntropyLoss`` with the
    ignore label as ``ignore_index``, and 0 when every voxel of the batch is ignored (where torch's
    mean would be NaN). Label datasets carry their ignore label in the map, so no ``loss_mask`` comes."""

    def __init__(self, ignore_label: Optional[int] = None):
        super().__init__()
        self.ignore_label = ignore_label
        self.cross_entropy = RobustCrossEntropyLoss(**({} if ignore_label is None else {"ignore_index": ignore_label}))

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if loss_mask is not None:
            raise ValueError("loss_mask: expected None (nnU-Net's cross-entropy of label maps takes the ignore "
                             "label from the map), got a tensor")
        if self.ignore_label is not None and not bool((y != self.ignore_label).any()):
            return torch.zeros((), device=x.device)
        return self.cross_entropy(x, y)


class NnUNetBinaryCrossEntropy(nn.Module):
    """nnU-Net's BCE term of ``DC_and_BCE_loss`` for regions: BCE-with-logits averaged over voxels and
    regions; with a mask (nnU-Net's ignore channel), the masked sum over voxels and regions divided by
    the number of counted voxels, exactly as nnU-Net does (C times the unmasked mean's scale)."""

    def __init__(self):
        super().__init__()
        self.mean = nn.BCEWithLogitsLoss()
        self.per_voxel = nn.BCEWithLogitsLoss(reduction="none")

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if loss_mask is None:
            return self.mean(x, y.float())
        mask = loss_mask.bool()
        return (self.per_voxel(x, y.float()) * mask).sum() / torch.clip(mask.sum(), min=1e-8)


def nnunet_cross_entropy(trainer: nnUNetTrainer) -> nn.Module:
    """The cross-entropy term nnU-Net's ``_build_loss`` pairs with its Dice for this trainer's dataset."""
    label_manager = trainer.label_manager
    if label_manager.has_regions:
        return NnUNetBinaryCrossEntropy()
    return NnUNetCrossEntropy(label_manager.ignore_label)


def with_nnunet_cross_entropy(trainer: nnUNetTrainer, dice: nn.Module) -> DiceAndCrossEntropy:
    """``dice`` + nnU-Net's cross-entropy, weighted by ``trainer.weight_dice`` and ``trainer.weight_ce``."""
    return DiceAndCrossEntropy(dice, nnunet_cross_entropy(trainer), trainer.weight_dice, trainer.weight_ce)
