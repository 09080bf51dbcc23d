"""The heuristic ε of Tilborghs et al. §2.3 as ``nnUNetTrainerDiceIEps`` uses it: estimated from the
trainer's own training dataloader, per class and deep-supervision scale, averaged over DDP ranks."""

from __future__ import annotations

import json
from typing import Iterator, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..losses import estimate_epsilon
from ..losses.distributed import all_reduce_sum, ddp_active

EPSILON_CHECKPOINT_KEY = "heuristic_epsilon"


def _target_scales(target) -> list:
    return list(target) if isinstance(target, (list, tuple)) else [target]


def estimate_heuristic_epsilon(batches: Iterator[dict], num_batches: int, num_classes: int,
                               ignore_label: Optional[int], region_ignore_channel: bool,
                               device: Union[str, torch.device] = "cpu", progress: bool = True) -> List[torch.Tensor]:
    """ε per output scale: each class's mean voxel count per training patch, over ``num_batches``
    batches of an nnU-Net dataloader (``batch['target']``: one tensor, or one per deep-supervision
    scale), averaged over DDP ranks when a process group exists.

    ``region_ignore_channel``: the region targets carry nnU-Net's ignore channel last (dropped; the
    regions are 0 on ignored voxels). Label maps skip ``ignore_label`` voxels. ``device``: where the
    DDP all-reduce runs (the trainer's device: NCCL reduces CUDA tensors only).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"epsilon_batches: expected an int >= 1, got {num_batches!r}")
    totals: Optional[List[torch.Tensor]] = None
    samples = 0
    for _ in tqdm(range(num_batches), desc="heuristic epsilon", disable=not progress):
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


def epsilon_as_json(per_scale: Sequence[torch.Tensor]) -> str:
    """One scale per row, one value per class; exact (JSON floats round-trip)."""
    return json.dumps([[float(v) for v in scale] for scale in per_scale])
