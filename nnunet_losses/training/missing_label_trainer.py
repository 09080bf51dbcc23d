"""The base of the missing-label trainers (marginal and leaf Dice): each training and validation batch
hands its ``(B, C)`` table of annotated labels to the loss; on a merged dataset (``nnunet-losses merge``)
training cases can be drawn per source (:attr:`MissingLabelTrainer.source_sampling`)."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from ..nnunet_io import CASE_SOURCES_KEY, case_sources
from .label_sets import ANNOTATED_LABELS_KEY, AnnotatedTable, check_label_maps

# per-case weight n_s ** -exponent for a case of a source with n_s training cases: "sqrt" (MultiTalent's
# weighting: a source is drawn in proportion to sqrt(n_s)), "uniform" (every source equally often)
SOURCE_SAMPLING_EXPONENTS = {"sqrt": 0.5, "uniform": 1.0}


def source_sampling_probabilities(identifiers: Sequence[str], sources: Mapping[str, str], mode: str) -> np.ndarray:
    """The probability of drawing each of ``identifiers`` (nnU-Net's ``sampling_probabilities``): a case of
    a source with n training cases among ``identifiers`` weighs ``n ** -exponent`` (see
    :data:`SOURCE_SAMPLING_EXPONENTS`), normalised to sum to 1.

    >>> source_sampling_probabilities(["a1", "a2", "a3", "a4", "b1"], {"a1": "A", "a2": "A", "a3": "A",
    ...                               "a4": "A", "b1": "B"}, "sqrt").round(3).tolist()
    [0.167, 0.167, 0.167, 0.167, 0.333]

    (weights 4 x 1/2 and 1 x 1: source A is drawn 2/3 of the time, sqrt(4) / (sqrt(4) + sqrt(1))).
    """
    if mode not in SOURCE_SAMPLING_EXPONENTS:
        raise ValueError(f"source_sampling: expected None or one of {sorted(SOURCE_SAMPLING_EXPONENTS)}, got {mode!r}")
    counts = Counter(sources[case] for case in identifiers)
    weights = np.array([counts[sources[case]] ** -SOURCE_SAMPLING_EXPONENTS[mode] for case in identifiers])
    return weights / weights.sum()


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
    # None: nnU-Net's draw (every training case equally likely); "sqrt" / "uniform": cases drawn per source of
    # a merged dataset (dataset.json "case_sources"), see source_sampling_probabilities
    source_sampling: Optional[str] = None
    _sampled_dataset = None  # the training split's dataset while get_dataloaders builds its loaders

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

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._sampled_dataset = dataset_tr
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        """nnU-Net's loaders; with :attr:`source_sampling` its training loader gets ``sampling_probabilities``
        per source (nnU-Net's ``get_dataloaders`` builds both loaders itself: its ``nnUNetDataLoader`` is
        replaced, during the call only, by one that adds them for the training split)."""
        if self.source_sampling is None:
            return super().get_dataloaders()
        from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

        original = trainer_module.nnUNetDataLoader

        def data_loader(data, *args, **kwargs):
            if data is self._sampled_dataset:
                kwargs["sampling_probabilities"] = self._source_sampling_probabilities(list(data.identifiers))
            return original(data, *args, **kwargs)

        trainer_module.nnUNetDataLoader = data_loader
        try:
            return super().get_dataloaders()
        finally:
            trainer_module.nnUNetDataLoader = original
            self._sampled_dataset = None

    def _source_sampling_probabilities(self, identifiers: list) -> np.ndarray:
        sources = case_sources(self.dataset_json, identifiers)
        if sources is None:
            raise ValueError(f"source_sampling: expected a merged dataset (dataset.json '{CASE_SOURCES_KEY}', "
                             f"written by nnunet-losses merge), got a dataset.json without it")
        probabilities = source_sampling_probabilities(identifiers, sources, self.source_sampling)
        per_source = Counter()
        for case, probability in zip(identifiers, probabilities):
            per_source[sources[case]] += probability
        shares = ", ".join(f"{name} {share:.3f} ({sum(sources[c] == name for c in identifiers)} cases)"
                           for name, share in sorted(per_source.items()))
        self.print_to_log_file(f"Training cases drawn per source ({self.source_sampling}): {shares}")
        return probabilities

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
