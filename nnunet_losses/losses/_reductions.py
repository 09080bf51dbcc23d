"""Reductions shared by the losses: spatial sums, the soft Dice of (B, C) sums, the Φ reductions (over
the global batch under DDP, through :mod:`.distributed`), the masked mean and the voxel count."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .distributed import batch_sum


def spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every spatial axis, leaving ``(B, C)``."""
    return t.sum(dim=tuple(range(2, t.ndim)), dtype=torch.float32 if t.dtype != torch.float64 else None)


def channel_dot(a: torch.Tensor, b: torch.Tensor, channels: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``Σ_c a_c b_c`` per voxel of ``(B, C, N)`` tensors (``b`` may be ``(B, C, 1)``), ``(B, 1, N)``, one
    channel at a time: no logits-sized product, and no bmm over the strided channel axis. ``channels``:
    only these (non-empty; the others' ``b`` is known to be 0)."""
    first, *rest = range(a.shape[1]) if channels is None else channels
    total = a[:, first:first + 1] * b[:, first:first + 1]
    for channel in rest:
        total.addcmul_(a[:, channel:channel + 1], b[:, channel:channel + 1])
    return total


def dice_denominator(prediction: torch.Tensor, ground_truth: torch.Tensor, epsilon) -> torch.Tensor:
    """``P + G + ε``, clamped at 1e-8 like nnU-Net (only matters for ε = 0)."""
    return (prediction + ground_truth + epsilon).clamp_min(1e-8)


def soft_dice(intersection: torch.Tensor, prediction: torch.Tensor, ground_truth: torch.Tensor, epsilon) -> torch.Tensor:
    """``(2 I + ε) / (P + G + ε)`` (denominator: :func:`dice_denominator`)."""
    return (2 * intersection + epsilon) / dice_denominator(prediction, ground_truth, epsilon)


def reduce_phi(stats: Sequence[torch.Tensor], phi: str, gather: bool) -> Sequence[torch.Tensor]:
    """Reduce ``(B, C)`` sums to the subsets of Φ: I → (B, C), CI → (B,), BI → (C,), BCI → ()."""
    if phi in ("BI", "BCI"):
        stacked = batch_sum(torch.stack(stats, 0).transpose(0, 1), gather=gather)  # (3, C)
        stats = tuple(stacked.unbind(0))
    if phi in ("CI", "BCI"):
        stats = tuple(s.sum(-1) for s in stats)
    return stats


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``keep``; 0 (with zero gradient) when nothing is kept."""
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


def voxel_count(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Number of counted voxels over the batch (``N`` of the mime losses), at least 1."""
    if mask is None:
        return torch.tensor(float(x.shape[0] * x[0, 0].numel()), device=x.device)
    return mask.sum(dtype=torch.float32 if mask.dtype != torch.float64 else None).clamp_min(1)
