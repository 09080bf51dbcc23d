"""Dice trainers with reduction Φ and smoothing ε (Tilborghs, Bertels et al., "The Dice loss in the
context of missing or empty labels: introducing Φ and ε"): nnU-Net with a pure soft Dice loss over the
subsets of Φ in place of DC+CE.

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_losses import PhiDiceLoss
from nnunet_losses.training.checkpoint import add_to_checkpoint, read_from_checkpoint
from nnunet_losses.training.heuristic_epsilon import (
    EPSILON_CHECKPOINT_KEY,
    epsilon_as_json,
    estimate_heuristic_epsilon,
)
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

    def _build_loss(self):
        return assemble_loss(self, self._phi_dice_loss())


class nnUNetTrainerDiceCI(nnUNetTrainerDiceI):
    """Φ = CI: one Dice term per image over all classes and voxels."""

    phi = "CI"


class nnUNetTrainerDiceBI(nnUNetTrainerDiceI):
    """Φ = BI: one Dice term per class over the whole (global, under DDP) batch; learns empty maps."""

    phi = "BI"


class nnUNetTrainerDiceBCI(nnUNetTrainerDiceI):
    """Φ = BCI: a single Dice term over batch, classes and voxels."""

    phi = "BCI"


class nnUNetTrainerDiceIEps(nnUNetTrainerDiceI):
    """Φ = I with the heuristic ε of §2.3: ε_c = the expected voxel count of class c in one training
    patch, estimated from ``epsilon_batches`` batches of this trainer's own training dataloader at the
    start of training, per class and per deep-supervision scale (averaged over DDP ranks), logged,
    stored in the checkpoints and reused on ``--c``. Learns empty maps."""

    epsilon_batches = 50
    heuristic_epsilon = None  # per output scale, a (C,) float64 tensor once estimated or restored

    def _build_loss(self):
        if self.phi not in ("I", "BI"):
            raise ValueError(f"{type(self).__name__}.phi: expected 'I' or 'BI' (a per-class epsilon needs one "
                             f"Dice term per class), got {self.phi!r}")
        self.epsilon_losses = [self._phi_dice_loss() for _ in range(num_output_scales(self))]
        if self.heuristic_epsilon is not None:
            self._apply_heuristic_epsilon()
        return assemble_loss(self, self.epsilon_losses)

    def _apply_heuristic_epsilon(self):
        for loss, epsilon in zip(self.epsilon_losses, self.heuristic_epsilon):
            loss.epsilon = epsilon.clone()

    def on_train_start(self):
        super().on_train_start()
        if self.heuristic_epsilon is not None:  # restored by load_checkpoint (--c)
            return
        self.print_to_log_file(f"Estimating the heuristic epsilon from {self.epsilon_batches} training batches...")
        self.heuristic_epsilon = estimate_heuristic_epsilon(
            self.dataloader_train, self.epsilon_batches, self.label_manager.num_segmentation_heads,
            ignore_label=None if self.label_manager.has_regions else self.label_manager.ignore_label,
            region_ignore_channel=self.label_manager.has_regions and self.label_manager.has_ignore_label,
            device=self.device, progress=self.local_rank == 0)
        self._apply_heuristic_epsilon()
        self.print_to_log_file("Heuristic epsilon estimated, per deep-supervision scale (rows) and class "
                               f"(columns): {epsilon_as_json(self.heuristic_epsilon)}")

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.heuristic_epsilon is not None:
            add_to_checkpoint(self, filename, EPSILON_CHECKPOINT_KEY, [e.tolist() for e in self.heuristic_epsilon])

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        stored = read_from_checkpoint(filename_or_checkpoint, EPSILON_CHECKPOINT_KEY)
        expected = (num_output_scales(self), self.label_manager.num_segmentation_heads)
        if stored is None or tuple(torch.tensor(stored).shape) != expected:
            self.print_to_log_file("The checkpoint holds no heuristic epsilon for this network (expected "
                                   f"{expected[0]} scales x {expected[1]} classes): it is estimated again.")
            self.heuristic_epsilon = None
            return
        self.heuristic_epsilon = [torch.tensor(values, dtype=torch.float64) for values in stored]
        self._apply_heuristic_epsilon()
        self.print_to_log_file("Heuristic epsilon reused from the checkpoint (not re-estimated), per "
                               f"deep-supervision scale (rows) and class (columns): "
                               f"{epsilon_as_json(self.heuristic_epsilon)}")
