"""Dice trainers with reduction Φ and smoothing ε (Tilborghs, Bertels et al., "The Dice loss in the
context of missing or empty labels: introducing Φ and ε"): nnU-Net with a pure soft Dice loss over the
subsets of Φ in place of DC+CE.

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_losses import PhiDiceLoss
from nnunet_losses.training.class_counts import ClassCountsFromSampler
from nnunet_losses.training.names import OwnOptimizer
from nnunet_losses.training.loss_assembly import assemble_loss, loss_target_options, num_output_scales


class nnUNetTrainerDiceI(nnUNetTrainer):
    """Φ = I: one Dice term per (image, class). With a negligible ε, classes absent from an image get
    (almost) no gradient there: empty labels are ignored rather than learned."""

    phi = "I"
    epsilon = 1e-7  # a number, or one value per output channel (phi I or BI)
    include_background = False

    def _phi_dice_loss(self) -> PhiDiceLoss:
        return PhiDiceLoss(phi=self.phi, epsilon=self.epsilon, include_background=self.include_background,
                           ddp=self.is_ddp, **loss_target_options(self))

    def _scale_loss(self, dice: PhiDiceLoss) -> nn.Module:
        """What one output scale is trained with, given its Dice term (the compound trainers add CE)."""
        return dice

    def _build_loss(self):
        return assemble_loss(self, self._scale_loss(self._phi_dice_loss()))


class nnUNetTrainerDiceCI(nnUNetTrainerDiceI):
    """Φ = CI: one Dice term per image over all classes and voxels."""

    phi = "CI"


class nnUNetTrainerDiceBI(nnUNetTrainerDiceI):
    """Φ = BI: one Dice term per class over the whole (global, under DDP) batch; learns empty maps."""

    phi = "BI"


class nnUNetTrainerDiceBCI(nnUNetTrainerDiceI):
    """Φ = BCI: a single Dice term over batch, classes and voxels."""

    phi = "BCI"


class nnUNetTrainerDiceIEps(ClassCountsFromSampler, OwnOptimizer, nnUNetTrainerDiceI):
    """Φ = I with the heuristic ε of §2.3: ε_c = the expected voxel count of class c in one training
    patch, estimated from ``count_batches`` batches of this trainer's own training dataloader at the
    start of training, per class and per deep-supervision scale (averaged over DDP ranks), logged,
    stored in the checkpoints and reused on ``--c``. Learns empty maps.

    Trained with Adam (nnU-Net's ``nnUNetTrainerVanillaAdam1en3``), as the paper's No New-Net setup:
    under nnU-Net's SGD (``-tr nnUNetTrainerDiceIEps_sgd``) the large ε suppresses the structure
    everywhere before the network tells emptied and labelled images apart, and the saturated softmax
    leaves SGD steps too small to recover (README, partial labels: Dice 0 in both groups)."""

    optimizer_name = "adam"

    _class_counts_key = "heuristic_epsilon"
    _class_counts_name = "heuristic epsilon"
    _estimated_attributes = ("epsilon",)  # not a setting: `eps` tokens are refused

    def _build_loss(self):
        if self.phi not in ("I", "BI"):
            raise ValueError(f"{type(self).__name__}.phi: expected 'I' or 'BI' (a per-class epsilon needs one "
                             f"Dice term per class), got {self.phi!r}")
        self.epsilon_losses = [self._phi_dice_loss() for _ in range(num_output_scales(self))]  # the Dice terms
        if self.class_counts is not None:
            self._use_class_counts()
        return assemble_loss(self, [self._scale_loss(dice) for dice in self.epsilon_losses])

    def _use_class_counts(self):
        for loss, epsilon in zip(self.epsilon_losses, self.class_counts):
            loss.epsilon = epsilon.clone()
