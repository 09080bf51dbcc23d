"""The base of the missing-label trainers (marginal and leaf Dice): each training and validation batch
hands its ``(B, C)`` table of annotated labels to the loss."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from .label_sets import ANNOTATED_LABELS_KEY, AnnotatedTable, check_label_maps


class MissingLabelTrainer(nnUNetTrainer):
    """Base of the marginal and leaf Dice trainers: their loss call is :meth:`call_missing_label_loss`.

    A partially labelled dataset (dataset.json ``"annotated_labels"``, see
    :mod:`nnunet_losses.training.label_sets`) has its label sets checked when training starts (an error
    names the case), compared with the label maps of the fold's partially annotated cases (a label with
    voxels that the set marks as not annotated is an error naming case and label), and turned into an
    :class:`AnnotatedTable`; every training and validation batch
    then gets its ``(B, C)`` ``annotated`` table from nnU-Net's ``batch['keys']``, the same table at
    every deep-supervision scale. nnU-Net's own ``train_step`` / ``validation_step`` run unchanged
    (AMP, gradient clipping, the online pseudo-Dice). Without the key the loss gets ``annotated=None``:
    its "class c annotated in sample b iff present" fallback.
    """

    annotated_table: Optional[AnnotatedTable] = None  # None: no label sets, the losses' fallback
    batch_annotated: Optional[torch.Tensor] = None  # the current batch's table, set around each step

    def on_train_start(self):
        # before nnU-Net's start (dataloaders, worker processes): bad label sets fail fast
        self.annotated_table = self._build_annotated_table()
        if self.annotated_table is not None:
            self._check_label_maps(self.annotated_table)
        super().on_train_start()

    def _build_annotated_table(self) -> Optional[AnnotatedTable]:
        if ANNOTATED_LABELS_KEY not in self.dataset_json:
            self.print_to_log_file(f"No '{ANNOTATED_LABELS_KEY}' in dataset.json: every class counts as annotated "
                                   "in a sample iff present there (annotated iff present).")
            return None
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = self.preprocessed_dataset_folder
        identifiers = infer_dataset_class(folder).get_identifiers(folder)
        table = AnnotatedTable(self.dataset_json, identifiers, self.label_manager.num_segmentation_heads,
                               self.label_manager)
        partial = int((~table(identifiers).all(dim=1)).sum())
        self.print_to_log_file(f"Label sets from dataset.json '{ANNOTATED_LABELS_KEY}': {partial} of the "
                               f"{len(identifiers)} training cases are partially annotated.")
        return table

    def _check_label_maps(self, table: AnnotatedTable) -> None:
        """Read the label maps of this fold's partially annotated cases (training and validation split)
        and stop if one has voxels of a label its set marks as not annotated (:func:`check_label_maps`).
        Unchecked, the softmax losses would refuse the contradiction mid-training, whenever a batch first
        draws that case; with regions it would silently drop the case's terms of a region that is there."""
        # Every DDP rank scans (only the few partially annotated cases): each then raises the same error
        # and exits, where a rank-0-only scan would leave the other ranks waiting at nnU-Net's barrier.
        train_cases, validation_cases = self.do_split()  # nnU-Net's split (sets self.dataset_class)
        fold_cases = sorted(set(train_cases) | set(validation_cases))
        dataset = self.dataset_class(self.preprocessed_dataset_folder, identifiers=list(fold_cases))
        scanned = check_label_maps(self.dataset_json, table.label_sets, lambda case: dataset.load_case(case)[1],
                                   cases=fold_cases, label_manager=self.label_manager,
                                   progress=self.local_rank == 0)
        shown = ", ".join(scanned[:10]) + (f", ... ({len(scanned) - 10} more)" if len(scanned) > 10 else "")
        self.print_to_log_file(
            f"Label maps checked against their label sets: {len(scanned)} partially annotated case(s) of fold "
            f"{self.fold} ({shown or 'none'}), no contradiction.")

    @contextlib.contextmanager
    def _label_sets_of(self, batch: dict):
        """Makes the batch's table available to :meth:`call_missing_label_loss` during one step."""
        if self.annotated_table is not None:
            self.batch_annotated = self.annotated_table(batch["keys"], self.device)
        try:
            yield
        finally:
            self.batch_annotated = None

    def train_step(self, batch: dict) -> dict:
        with self._label_sets_of(batch):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._label_sets_of(batch):
            return super().validation_step(batch)

    def call_missing_label_loss(self, loss: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One output scale's loss with the current batch's label sets (None: the loss's fallback)."""
        return loss(x, y, loss_mask=loss_mask, annotated=self.batch_annotated)
