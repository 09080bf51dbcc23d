"""Compound trainers: the papers' Dice terms inside nnU-Net's compound, Dice + cross-entropy, weight 1
each as in nnU-Net's default ``DC_and_CE_loss`` (they compete with ``nnUNetTrainer``, not with the
Dice-only trainers).

- Φ-Dice (Tilborghs et al.) + nnU-Net's own cross-entropy: ``RobustCrossEntropyLoss`` with the ignore
  label for label datasets, BCE-with-logits as ``DC_and_BCE_loss`` for region datasets.
- Marginal Dice + marginal cross-entropy, leaf Dice + marginal cross-entropy (Fidon et al.'s
  ``MarginalizedDiceCE`` and ``LeafDiceCE``): both terms get the same per-case label sets
  (``MissingLabelTrainer``).

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

from torch import nn

from nnunet_losses import LeafCrossEntropyLoss, MarginalCrossEntropyLoss
from nnunet_losses.trainers.nnunet_losses_dice_trainers import nnUNetTrainerDiceI, nnUNetTrainerDiceIEps
from nnunet_losses.trainers.nnunet_losses_missing_label_trainers import (
    nnUNetTrainerLeafDice,
    nnUNetTrainerMarginalDice,
)
from nnunet_losses.training.compound import DiceAndCrossEntropy, with_nnunet_cross_entropy
from nnunet_losses.training.loss_assembly import loss_target_options


class _WithNnUNetCrossEntropy:
    """Adds nnU-Net's cross-entropy to the Dice term of each output scale (the Dice trainers' ``_scale_loss``;
    the heuristic-ε trainer keeps the Dice terms themselves in ``epsilon_losses`` and sets ε there)."""

    weight_dice = 1.0
    weight_ce = 1.0

    def _scale_loss(self, dice: nn.Module) -> nn.Module:
        return with_nnunet_cross_entropy(self, dice)


class nnUNetTrainerDiceICE(_WithNnUNetCrossEntropy, nnUNetTrainerDiceI):
    """Φ = I Dice (ε = 1e-7, background left out) + nnU-Net's cross-entropy, weight 1 each."""


class nnUNetTrainerDiceBICE(nnUNetTrainerDiceICE):
    """Φ = BI Dice (one term per class over the global batch) + nnU-Net's cross-entropy."""

    phi = "BI"


class nnUNetTrainerDiceIEpsCE(_WithNnUNetCrossEntropy, nnUNetTrainerDiceIEps):
    """Φ = I Dice with the heuristic ε of each output scale (``nnUNetTrainerDiceIEps``) + nnU-Net's
    cross-entropy, with nnU-Net's SGD: the CE term keeps the labelled structures from being suppressed
    everywhere, which is why the Dice-only heuristic-ε trainer needs Adam."""

    optimizer_name = "sgd"


class _WithLabelSetCrossEntropy:
    """Adds a label-set cross-entropy to the missing-label Dice of each output scale; the trainer's call
    (``call_missing_label_loss``) hands the batch's label sets to both terms."""

    weight_dice = 1.0
    weight_ce = 1.0

    def _missing_label_loss(self) -> nn.Module:
        # softmax: the marginal CE, as Fidon et al.'s code pairs it with both Dice terms; on the background
        # voxels of a case that misses a class it still pushes the annotated classes down, where the leaf
        # CE drops those voxels (docs/losses.md §3). Regions: each sigmoid channel is its own binary
        # problem, and a region not annotated simply has no term (the leaf BCE).
        cross_entropy = LeafCrossEntropyLoss if self.label_manager.has_regions else MarginalCrossEntropyLoss
        return DiceAndCrossEntropy(super()._missing_label_loss(), cross_entropy(**loss_target_options(self)),
                                   self.weight_dice, self.weight_ce)


class nnUNetTrainerMarginalDiceCE(_WithLabelSetCrossEntropy, nnUNetTrainerMarginalDice):
    """Marginal Dice + marginal cross-entropy (Fidon et al.'s ``MarginalizedDiceCE``). Labels (softmax) only."""


class nnUNetTrainerLeafDiceCE(_WithLabelSetCrossEntropy, nnUNetTrainerLeafDice):
    """Leaf Dice + marginal cross-entropy, as Fidon et al.'s ``LeafDiceCE``. Labels (softmax) and regions
    (sigmoid: + the BCE of the annotated regions)."""
