"""Mime and negative mime trainers (Kervadec & de Bruijne, "On the dice loss gradient and the ways to
mimic it"): nnU-Net with a linear loss whose gradient mimics the Dice loss's, in place of DC+CE.

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_losses import MimeLoss, NegativeMimeLoss
from nnunet_losses.training.loss_assembly import assemble_loss, loss_target_options, refuse_regions


class nnUNetTrainerMime(nnUNetTrainer):
    """Mime loss ``Σ w·s / N``, ``w = -a·y + b·(1-y)`` (paper eq. 9; ``a=1.9, b=0.1`` is its
    ``ω = -2y + 0.1``). ``a``/``b`` may be per-class sequences. Labels (softmax) and regions (sigmoid)."""

    a = 1.9
    b = 0.1
    include_background = True
    reduction = "mean"  # per-voxel mean keeps nnU-Net's learning rate and gradient clipping sensible

    def _build_loss(self):
        return assemble_loss(self, MimeLoss(a=self.a, b=self.b, include_background=self.include_background,
                                            reduction=self.reduction, **loss_target_options(self)))


class nnUNetTrainerNegativeMime(nnUNetTrainer):
    """Negative mime ``-Σ y·s / N`` (paper eq. 10). Labels (softmax) only."""

    include_background = True
    reduction = "mean"

    def _build_loss(self):
        refuse_regions(self, "with independent sigmoid regions the negative mime is minimised by predicting "
                             "everything as foreground; use nnUNetTrainerMime")
        return assemble_loss(self, NegativeMimeLoss(include_background=self.include_background,
                                                    reduction=self.reduction, **loss_target_options(self)))
