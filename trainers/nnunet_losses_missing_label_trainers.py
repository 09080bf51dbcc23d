"""Missing-label Dice trainers: marginal Dice (Shi et al.) and leaf Dice (Fidon et al.), as described
in Tilborghs et al. §2.1, in place of nnU-Net's DC+CE.

A partially labelled dataset's label sets (dataset.json "annotated_labels") are checked when training
starts and reach the loss per sample, from nnU-Net's batch keys (``MissingLabelTrainer``); without
them a class counts as annotated in an image iff it has voxels there (the losses' fallback).

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

from torch import nn

from nnunet_losses import LeafDiceLoss, MarginalDiceLoss
from nnunet_losses.training.loss_assembly import (
    TrainerLossCall,
    assemble_loss,
    loss_target_options,
    refuse_regions,
)
from nnunet_losses.training.missing_label_trainer import MissingLabelTrainer


class nnUNetTrainerMarginalDice(MissingLabelTrainer):
    """Marginal Dice: the probabilities of an image's missing classes are merged into its background
    before an image-wise Dice. Labels (softmax) only."""

    epsilon = 1e-7
    include_background = True  # the merged background is where marginalisation acts

    def _missing_label_loss(self) -> nn.Module:
        """The loss of one output scale, called with the batch's label sets (the compound trainers add CE)."""
        return MarginalDiceLoss(epsilon=self.epsilon, include_background=self.include_background,
                                **loss_target_options(self))

    def _build_loss(self):
        refuse_regions(self, "marginal Dice merges missing classes into the background channel, which region "
                             "outputs do not have; use nnUNetTrainerLeafDice")
        return assemble_loss(self, TrainerLossCall(self._missing_label_loss(), self.call_missing_label_loss))


class nnUNetTrainerLeafDice(MissingLabelTrainer):
    """Leaf Dice: the Dice terms of an image's missing classes (and its background, if any class is
    missing) are dropped. Labels (softmax) and regions (sigmoid)."""

    epsilon = 1e-7
    # the background is a leaf label (Fidon et al.), kept in the fully annotated images: without any
    # term for it a Dice-only network can settle on a missing class everywhere in the background,
    # which only the weak false-positive gradient of that class's annotated images pushes back
    # (seen with Adam in examples/partial_labels: ring Dice 0.12 and 0.82 in two runs)
    include_background = True

    def _missing_label_loss(self) -> nn.Module:
        """The loss of one output scale, called with the batch's label sets (the compound trainers add CE)."""
        return LeafDiceLoss(epsilon=self.epsilon, include_background=self.include_background,
                            **loss_target_options(self))

    def _build_loss(self):
        return assemble_loss(self, TrainerLossCall(self._missing_label_loss(), self.call_missing_label_loss))
