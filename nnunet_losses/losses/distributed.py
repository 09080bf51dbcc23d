"""Sums over the global batch under DDP: the one place the losses (batch reductions Φ = BI, BCI) and
training (the heuristic ε, averaged over ranks) talk to ``torch.distributed``.

A floor of the losses' room like its ``_`` modules (it imports nothing of the room), public because
:mod:`nnunet_losses.training` needs it too. Without a process group of more than one rank every sum
here is the local one; see ``docs/losses.md`` §2 for why batch reductions must be global.

Example:
    >>> ddp_active(None), world_size()                   # a single process: nothing to gather
    (False, 1)
    >>> batch_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), gather=False)
    tensor([4., 6.])
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def ddp_active(ddp: Optional[bool] = None) -> bool:
    """Whether sums run over the global batch: ``ddp`` is not False and a process group with more than
    one rank exists (``ddp=None`` or ``True`` on a single process gathers nothing)."""
    if ddp is False:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of DDP ranks, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def batch_sum(t: torch.Tensor, *, gather: bool) -> torch.Tensor:
    """Sum a ``(B, ...)`` tensor over the batch, and over all DDP ranks when ``gather``, with gradient.

    The gather keeps the gradient the way nnU-Net's ``AllGatherGrad`` does: each rank receives
    ``world_size`` times its share of the global gradient, which DDP's gradient averaging turns back
    into exactly the gradient of one process holding the whole global batch.
    """
    local = t.sum(0)
    if not gather:
        return local
    from nnunetv2.utilities.ddp_allgather import AllGatherGrad

    return AllGatherGrad.apply(local).sum(0)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all DDP ranks, without gradient, as a new tensor (``t`` is left as it is).
    Needs a process group (check :func:`ddp_active` first); NCCL reduces CUDA tensors only."""
    total = t.detach().clone()
    dist.all_reduce(total)
    return total
