"""Each class's mean voxel count per training patch, estimated from the trainer's own training dataloader:
the heuristic ε of ``nnUNetTrainerDiceIEps`` (Tilborghs et al. §2.3) and the class-balanced weights of
the mime trainers (Kervadec & de Bruijne §2.3, "pre-computed based on the dataset's class distribution").

Counted at the start of training, per class and deep-supervision scale, averaged over DDP ranks, logged,
stored in every checkpoint and reused on ``--c`` (:class:`ClassCountsFromSampler`).
"""

from __future__ import annotations

import json
from typing import Iterator, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..losses import estimate_epsilon
from ..losses.distributed import all_reduce_sum, ddp_active
from .checkpoint import add_to_checkpoint, read_from_checkpoint
from .loss_assembly import num_output_scales


def _target_scales(target) -> list:
    return list(target) if isinstance(target, (list, tuple)) else [target]


def estimate_class_counts(batches: Iterator[dict], num_batches: int, num_classes: int,
                          ignore_label: Optional[int], region_ignore_channel: bool,
                          device: Union[str, torch.device] = "cpu", progress: bool = True,
                          description: str = "class counts") -> List[torch.Tensor]:
    """Each class's mean voxel count per patch, per output scale: over ``num_batches`` batches of an
    nnU-Net dataloader (``batch['target']``: one tensor, or one per deep-supervision scale), averaged
    over DDP ranks when a process group exists.

    ``region_ignore_channel``: the region targets carry nnU-Net's ignore channel last (dropped; the
    regions are 0 on ignored voxels). Label maps skip ``ignore_label`` voxels. ``device``: where the
    DDP all-reduce runs (the trainer's device: NCCL reduces CUDA tensors only).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"count_batches: expected an int >= 1, got {num_batches!r}")
    totals: Optional[List[torch.Tensor]] = None
    samples = 0
    for _ in tqdm(range(num_batches), desc=description, disable=not progress):
        targets = _target_scales(next(batches)["target"])
        if region_ignore_channel:
            targets = [t[:, :-1] for t in targets]
        batch_size = targets[0].shape[0]
        # estimate_epsilon gives the batch mean; weight it by the batch size (DDP ranks may differ)
        sums = [estimate_epsilon([t], num_classes, ignore_label=ignore_label) * batch_size for t in targets]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        samples += batch_size
    if ddp_active():
        packed = torch.cat([torch.stack(totals).flatten(), torch.tensor([float(samples)], dtype=torch.float64)])
        packed = all_reduce_sum(packed.to(device)).cpu()
        samples = float(packed[-1])
        totals = list(packed[:-1].view(len(totals), num_classes).unbind(0))
    return [total / samples for total in totals]


def per_scale_as_json(per_scale: Sequence[torch.Tensor]) -> str:
    """One scale per row, one value per class; exact (JSON floats round-trip)."""
    return json.dumps([[float(v) for v in scale] for scale in per_scale])


def balanced_class_scales(counts: torch.Tensor) -> torch.Tensor:
    r"""Per-class factors :math:`k_c = \frac{\sum_j n_j}{C\, n_c}` from mean voxel counts :math:`n_c`.

    The Dice loss's gradient for class c scales as :math:`1/(|y_c| + |s_c|)`, inversely with the class's
    size, which is what lets it learn small structures; a mime with :math:`k_c a, k_c b` in place of
    :math:`a, b` keeps that ratio between classes. The mean factor over the voxels is 1
    (:math:`\sum_c f_c k_c = 1` with :math:`f_c = n_c / \sum_j n_j`), so the loss keeps the scale the
    trainer's learning rate and gradient clipping were set for. A class never sampled (:math:`n_c = 0`)
    is counted as the rarest sampled class, so its factor stays finite.
    """
    counts = counts.to(torch.float64)
    if not (counts > 0).any():
        raise ValueError(f"class counts: expected at least one class with voxels, got {counts.tolist()}")
    counts = torch.where(counts > 0, counts, counts[counts > 0].min())
    return counts.sum() / (counts.numel() * counts)


class ClassCountsFromSampler:
    """Mixin for an ``nnUNetTrainer`` whose loss needs :func:`estimate_class_counts`: estimated from
    ``count_batches`` batches of its training dataloader in ``on_train_start``, handed to
    ``_use_class_counts``, logged, kept in every checkpoint under ``_class_counts_key`` and reused, not
    re-estimated, on ``--c``. Subclasses set ``_class_counts_key`` and ``_class_counts_name`` (for the log)
    and implement ``_use_class_counts``."""

    count_batches = 50
    class_counts = None  # per output scale, a (C,) float64 tensor once estimated or restored
    _class_counts_key = "class_counts"
    _class_counts_name = "class counts"

    def _use_class_counts(self) -> None:
        raise NotImplementedError

    def _needs_class_counts(self) -> bool:
        """False where the trainer's settings make the counts unused (nothing estimated, stored or restored)."""
        return True

    def _log_class_counts(self, verb: str) -> None:
        self.print_to_log_file(f"{self._class_counts_name[0].upper()}{self._class_counts_name[1:]} {verb}, per "
                               f"deep-supervision scale (rows) and class (columns): "
                               f"{per_scale_as_json(self.class_counts)}")

    def on_train_start(self):
        super().on_train_start()
        if self.class_counts is not None or not self._needs_class_counts():  # restored by load_checkpoint (--c)
            return
        self.print_to_log_file(f"Estimating the {self._class_counts_name} from {self.count_batches} training batches...")
        label_manager = self.label_manager
        self.class_counts = estimate_class_counts(
            self.dataloader_train, self.count_batches, label_manager.num_segmentation_heads,
            ignore_label=None if label_manager.has_regions else label_manager.ignore_label,
            region_ignore_channel=label_manager.has_regions and label_manager.has_ignore_label,
            device=self.device, progress=self.local_rank == 0, description=self._class_counts_name)
        self._use_class_counts()
        self._log_class_counts("estimated")

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.class_counts is not None:
            add_to_checkpoint(self, filename, self._class_counts_key, [c.tolist() for c in self.class_counts])

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if not self._needs_class_counts():
            return
        stored = read_from_checkpoint(filename_or_checkpoint, self._class_counts_key)
        expected = (num_output_scales(self), self.label_manager.num_segmentation_heads)
        if stored is None or tuple(torch.tensor(stored).shape) != expected:
            self.print_to_log_file(f"The checkpoint holds no {self._class_counts_name} for this network (expected "
                                   f"{expected[0]} scales x {expected[1]} classes): it is estimated again.")
            self.class_counts = None
            return
        self.class_counts = [torch.tensor(values, dtype=torch.float64) for values in stored]
        self._use_class_counts()
        self._log_class_counts("reused from the checkpoint (not re-estimated)")
