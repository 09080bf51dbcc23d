"""From one of our losses to the loss nnU-Net's training loop calls, as ``nnUNetTrainer._build_loss``
does for DC+CE: targets and ignore label (:func:`loss_target_options`), nnU-Net's region target with
its ignore channel, ``torch.compile`` where nnU-Net compiles, and deep supervision with nnU-Net's
weights. Every trainer of ``trainers/`` builds its loss through :func:`assemble_loss`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn


def loss_target_options(trainer: nnUNetTrainer) -> dict:
    """The keywords that fit one of our losses to the trainer's targets.

    Label datasets: softmax, and nnU-Net's ignore label (in the ``(B, 1, ...)`` label map) passed as
    ``ignore_label``. Region datasets: sigmoid; nnU-Net puts the ignore label in an extra last channel
    of the region target instead, which :func:`assemble_loss` turns into ``loss_mask``.
    """
    label_manager = trainer.label_manager
    if label_manager.has_regions:
        return {"activation": "sigmoid"}
    return {"activation": "softmax", "ignore_label": label_manager.ignore_label}


def refuse_regions(trainer: nnUNetTrainer, why: str) -> None:
    """Stop at start-up (``_build_loss``) when a softmax-only loss meets a region dataset."""
    if trainer.label_manager.has_regions:
        raise ValueError(
            f"{type(trainer).__name__}: expected a dataset with mutually exclusive labels (softmax outputs), got a "
            f"region dataset (dataset.json 'labels' with regions and 'regions_class_order', sigmoid outputs): {why}"
        )


class RegionIgnoreChannel(nn.Module):
    """Calls ``loss`` with nnU-Net's region target split into regions and mask.

    With regions and an ignore label, nnU-Net's data pipeline appends the ignore label as the LAST
    channel of the region target (``ConvertSegmentationToRegionsTransform``); voxels where it is set
    do not count (the same convention as nnU-Net's ``DC_and_BCE_loss``).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        keep = y[:, -1:] == 0
        if loss_mask is not None:
            keep = keep & loss_mask.bool()
        return self.loss(x, y[:, :-1], loss_mask=keep)


class TrainerLossCall(nn.Module):
    """Calls ``call(loss, x, y, loss_mask)``: lets one trainer method decide how its loss is called
    (the missing-label trainers pass their per-sample label sets there)."""

    def __init__(self, loss: nn.Module, call: Callable):
        super().__init__()
        self.loss = loss
        self.call = call

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.call(self.loss, x, y, loss_mask)


class PerScaleDeepSupervision(nn.Module):
    """Deep supervision with one loss per output scale (nnU-Net's ``DeepSupervisionWrapper`` applies a
    single loss to every scale; the heuristic ε differs per scale). Same weights, same skipping of
    zero-weight outputs."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(losses) != len(weights):
            raise ValueError(f"losses: expected one loss per weight ({len(weights)}), got {len(losses)}")
        self.losses = nn.ModuleList(losses)
        self.weight_factors = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(w * loss(x, y) for w, loss, x, y in zip(self.weight_factors, self.losses, outputs, targets)
                   if w != 0.0)


def num_output_scales(trainer: nnUNetTrainer) -> int:
    """How many outputs the loss sees: one per deep-supervision scale, or 1 without deep supervision."""
    return len(trainer._get_deep_supervision_scales()) if trainer.enable_deep_supervision else 1


def deep_supervision_weights(trainer: nnUNetTrainer) -> Optional[np.ndarray]:
    """nnU-Net's deep-supervision weights (``nnUNetTrainer._build_loss``), None without deep supervision.

    ``1/2^i`` per scale i, the lowest resolution output weighted 0 -- or 1e-6 under DDP without
    ``torch.compile``, where a zero weight leaves parameters without gradient and DDP fails -- then
    normalised to sum 1.
    """
    if not trainer.enable_deep_supervision:
        return None
    weights = np.array([1 / (2**i) for i in range(num_output_scales(trainer))])
    weights[-1] = 1e-6 if (trainer.is_ddp and not trainer._do_i_compile()) else 0
    return weights / weights.sum()


def assemble_loss(trainer: nnUNetTrainer, loss: Union[nn.Module, Sequence[nn.Module]]) -> nn.Module:
    """Turn one of our losses into ``trainer.loss``, as ``nnUNetTrainer._build_loss`` does for DC+CE.

    ``loss`` is one module for every output scale, or a sequence with one module per scale
    (:func:`num_output_scales`). Each is adapted to nnU-Net's region target with the ignore label
    (:class:`RegionIgnoreChannel`), compiled where nnU-Net compiles (``trainer._do_i_compile()``),
    and the result wrapped for deep supervision with nnU-Net's weights.
    """
    per_scale = not isinstance(loss, nn.Module)
    losses = list(loss) if per_scale else [loss]
    if per_scale and len(losses) != num_output_scales(trainer):
        raise ValueError(
            f"loss: expected one loss per output scale ({num_output_scales(trainer)}), got {len(losses)}"
        )
    label_manager = trainer.label_manager
    if label_manager.has_regions and label_manager.ignore_label is not None:
        losses = [RegionIgnoreChannel(item) for item in losses]
    if trainer._do_i_compile():
        losses = [torch.compile(item) for item in losses]
    weights = deep_supervision_weights(trainer)
    if weights is None:
        return losses[0]
    if per_scale:
        return PerScaleDeepSupervision(losses, weights)
    return DeepSupervisionWrapper(losses[0], weights)
