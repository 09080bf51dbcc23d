"""Reductions shared by the losses: spatial sums, the soft Dice of (B, C) sums and its gradient's two
values, the Φ reductions, the masked mean, the voxel count, and the DDP sums over the global batch."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

def spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every spatial axis, leaving ``(B, C)``."""
    return t.sum(dim=tuple(range(2, t.ndim)), dtype=torch.float32 if t.dtype != torch.float64 else None)



def ddp_active(ddp: Optional[bool]) -> bool:
    """Whether batch reductions run over the global batch: ``ddp`` is not False and a process group
    with more than one rank exists (``ddp=None`` or ``True`` on a single process gathers nothing)."""
    if ddp is False:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def batch_total(t: torch.Tensor, gather: bool) -> torch.Tensor:
    """Sum a ``(B, ...)`` tensor over the batch, and over all DDP ranks when ``gather``.

    The gather keeps the gradient the way nnU-Net's ``AllGatherGrad`` does: each rank receives
    ``world_size`` times its share of the global gradient, which DDP's gradient averaging turns back
    into exactly the gradient of one process holding the whole global batch.
    """
    local = t.sum(0)
    if not gather:
        return local
    from nnunetv2.utilities.ddp_allgather import AllGatherGrad

    return AllGatherGrad.apply(local).sum(0)


def soft_dice(intersection: torch.Tensor, prediction: torch.Tensor, ground_truth: torch.Tensor, epsilon) -> torch.Tensor:
    """``(2 I + ε) / (P + G + ε)``, denominators clamped at 1e-8 like nnU-Net (only matters for ε = 0)."""
    return (2 * intersection + epsilon) / (prediction + ground_truth + epsilon).clamp_min(1e-8)


def reduce_phi(stats: Sequence[torch.Tensor], phi: str, gather: bool) -> Sequence[torch.Tensor]:
    """Reduce ``(B, C)`` sums to the subsets of Φ: I → (B, C), CI → (B,), BI → (C,), BCI → ()."""
    if phi in ("BI", "BCI"):
        stacked = batch_total(torch.stack(stats, 0).transpose(0, 1), gather)  # (3, C)
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

