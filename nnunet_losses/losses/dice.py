r"""Dice loss with reduction Φ and smoothing ε (Tilborghs, Bertels et al., "The Dice loss in the context
of missing or empty labels: introducing Φ and ε"), and the heuristic ε of its §2.3."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ._inputs import check_range, label_counts, prepare
from ._options import (ClassValues, check_count, check_ignore_label, check_phi_options, check_scalar, per_class,
                       type_or_dtype)
from ._overlap_sums import overlap_sums
from ._reductions import dice_denominator, reduce_phi, soft_dice
from .distributed import ddp_active


def phi_dice_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    phi: str = "I",
    epsilon: ClassValues = 1e-7,
    include_background: bool = False,
    activation: str = "softmax",
    ddp: Optional[bool] = None,
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Soft Dice loss over the subsets of a reduction Φ (Tilborghs et al., eq. 3).

    .. math::
        DL = 1 - \frac{1}{|Φ|} \sum_{φ \in Φ} \frac{2 \sum_{ω \in φ} y_ω s_ω + ε}{\sum_{ω \in φ} (y_ω + s_ω) + ε}

    with :math:`ω = (b, c, i)` and the sums running over counted voxels (``loss_mask`` = 1) only.
    The subsets φ of Φ: ``"I"`` one per (sample, class), ``"CI"`` one per sample (all classes and
    voxels), ``"BI"`` one per class (all samples and voxels), ``"BCI"`` a single one.
    Its gradient is two-valued per subset (eq. 4):

    .. math::
        \frac{\partial DL}{\partial s_ω} = -\frac{1}{|Φ|}\left(\frac{2 y_ω}{U_φ + ε}
            - \frac{2 I_φ + ε}{(U_φ + ε)^2}\right), \quad U_φ = \sum_φ (y + s),\ I_φ = \sum_φ y s.

    With ε negligible (1e-7) and Φ = I, a class absent from a sample's label gets a negligible
    gradient there (missing labels are ignored); with Φ = BI (B > 1) or a large ε (the heuristic
    :func:`estimate_epsilon`) empty maps are learned. ``epsilon`` is a number or, for ``"I"``/``"BI"``,
    one value per channel of ``x`` that enters only its own class's term.

    The background channel (softmax channel 0) is left out of the mean unless ``include_background``;
    with sigmoid every channel is a foreground region and is always included. Batch reductions
    (``"BI"``, ``"BCI"``) run over the global batch under DDP (``ddp=None``: whenever a process group
    with more than one rank exists), with nnU-Net's ``AllGatherGrad``.

    ``phi="I"``/``"BI"`` with ``epsilon=e`` equals ``1 +`` nnU-Net's
    ``MemoryEfficientSoftDiceLoss(batch_dice=False/True, smooth=e, do_bg=include_background)``.

    Range: :math:`[0, 1]`.

    Example:
        >>> x = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): s = 0.5 everywhere
        >>> y = torch.tensor([[[[1, 0]]]])                    # class 1 on the first voxel
        >>> phi_dice_loss(x, y, epsilon=0.0)                  # 1 - 2·0.5 / (1 + 1)
        tensor(0.5000)
    """
    eps = check_phi_options(phi, epsilon, include_background, activation, ddp)
    return _phi_dice(x, y, loss_mask, phi, eps, include_background, activation, ddp, ignore_label)


def _phi_dice(x, y, loss_mask, phi, eps, include_background, activation, ddp, ignore_label):
    # options already checked (by phi_dice_loss or the module's __init__)
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    first = 1 if (activation == "softmax" and not include_background) else 0
    sums = overlap_sums(x, prepared, activation, ground_truth=True)
    # excluded means left out of the mean, not weighted 0 inside it
    stats = tuple(s[:, first:] for s in (sums.intersection, sums.prediction, sums.ground_truth))
    eps = per_class("epsilon", eps, x.shape[1], stats[0])[first:]
    stats = reduce_phi(stats, phi, gather=phi in ("BI", "BCI") and ddp_active(ddp))
    if phi in ("CI", "BCI"):
        eps = eps[0]
    return 1 - soft_dice(*stats, eps).mean()


class PhiOptionsModule(nn.Module):
    """Stores and checks the options shared by the Φ losses (:class:`PhiDiceLoss`,
    :class:`~nnunet_losses.DynamicMimeLoss`); ``epsilon`` (scalar or per class) is a buffer, so a
    trainer can overwrite it in place (heuristic ε) and it follows ``.to(device)`` and ``state_dict``."""

    def __init__(self, *, phi: str = "I", epsilon: ClassValues = 1e-7, include_background: bool = False,
                 activation: str = "softmax", ddp: Optional[bool] = None, ignore_label: Optional[int] = None):
        super().__init__()
        self.register_buffer("epsilon", check_phi_options(phi, epsilon, include_background, activation, ddp))
        self.phi = phi
        self.include_background = include_background
        self.activation = activation
        self.ddp = ddp
        self.ignore_label = check_ignore_label(ignore_label)

    def extra_repr(self) -> str:
        eps = self.epsilon.tolist()
        return (f"phi={self.phi!r}, epsilon={eps}, include_background={self.include_background}, "
                f"activation={self.activation!r}")


class PhiDiceLoss(PhiOptionsModule):
    """Module form of :func:`phi_dice_loss`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _phi_dice(x, y, loss_mask, self.phi, self.epsilon, self.include_background, self.activation, self.ddp,
                         self.ignore_label)


def dice_gradient_weights(intersection: torch.Tensor, prediction: torch.Tensor, ground_truth: torch.Tensor, *,
                          epsilon, num_subsets) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The two values of the Dice loss gradient per subset φ (Tilborghs eq. 4, Kervadec eq. 6).

    With :math:`D = U + ε`, :math:`U = Σ_φ (y + s)`, :math:`I = Σ_φ y s`:
    :math:`a = \frac{1}{|Φ|}\left(\frac{2}{D} - \frac{2I + ε}{D^2}\right)` (minus the gradient where
    :math:`y = 1`) and :math:`b = \frac{2I + ε}{|Φ| D^2}` (the gradient where :math:`y = 0`).
    With ε = 0 and one subset: :math:`a = 2(U-I)/U^2`, :math:`b = 2I/U^2` (eq. 6).

    Example:
        >>> I, P, G = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)   # U = 8
        >>> a, b = dice_gradient_weights(I, P, G, epsilon=0.0, num_subsets=1)
        >>> float(a), float(b)                                                   # 2·6/64, 2·2/64
        (0.1875, 0.0625)
    """
    epsilon = _checked_dice_tables(intersection, prediction, ground_truth, epsilon)
    return _dice_gradient_weights(intersection, prediction, ground_truth, epsilon,
                                  check_count("num_subsets", num_subsets))


def _checked_dice_tables(intersection, prediction, ground_truth, epsilon):
    """The tables of :func:`dice_gradient_weights`: real tensors of one shape, sums >= 0 (values as
    docs/validation.md says), ε a number >= 0 (returned as a float) or a tensor of such that broadcasts
    to them (returned as it is)."""
    for name, table in (("intersection", intersection), ("prediction", prediction), ("ground_truth", ground_truth)):
        if not isinstance(table, torch.Tensor) or not table.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor of sums, got {type_or_dtype(table)}")
        if table.shape != intersection.shape:
            raise ValueError(f"{name}: expected the shape of intersection {tuple(intersection.shape)}, "
                             f"got shape {tuple(table.shape)}")
        check_range(table, f"{name}: expected finite sums >= 0",
                    lambda lo, hi: (lo >= 0) & (hi < float("inf")))
    if not isinstance(epsilon, torch.Tensor):
        return check_scalar("epsilon", epsilon)
    if not epsilon.is_floating_point() or epsilon.ndim > intersection.ndim or any(
            e not in (1, t) for e, t in zip(epsilon.shape[::-1], intersection.shape[::-1])):
        raise ValueError(f"epsilon: expected a number or a floating-point tensor that broadcasts to "
                         f"{tuple(intersection.shape)}, got a tensor of dtype {epsilon.dtype} and shape "
                         f"{tuple(epsilon.shape)}")
    check_range(epsilon, "epsilon: expected finite values >= 0", lambda lo, hi: (lo >= 0) & (hi < float("inf")))
    return epsilon


def _dice_gradient_weights(intersection, prediction, ground_truth, epsilon, num_subsets):
    denominator = dice_denominator(prediction, ground_truth, epsilon)
    b = (2 * intersection + epsilon) / (num_subsets * denominator**2)
    a = 2 / (num_subsets * denominator) - b
    return a, b


def estimate_epsilon(targets: Iterable, num_classes: int, *, ignore_label: Optional[int] = None) -> torch.Tensor:
    r"""The heuristic ε of Tilborghs et al. §2.3: :math:`ε_c = \mathbb{E}\left[\sum_i y_{b,c,i}\right]`.

    The mean, over every sample of every batch in ``targets`` (empty samples included, as zeros), of
    each class's voxel count: the expected foreground volume of class c in one sample as the network
    sees it. In nnU-Net, feed it the training dataloader's patches (the network never sees whole
    volumes), once per deep-supervision scale.

    Args:
        targets: an iterable of ``(B, 1, *spatial)`` label maps (tensors or numpy arrays), or of
            ``(B, num_classes, *spatial)`` region / one-hot targets.
        num_classes: number of channels of the network output.
        ignore_label: label value that is not counted (nnU-Net's ignore label), for label maps.

    Returns:
        float64 tensor ``(num_classes,)``.

    Example:
        >>> maps = [torch.tensor([[[[0, 1], [1, 2]]], [[[0, 0], [0, 0]]]])]  # 2 samples, 2x2
        >>> estimate_epsilon(maps, num_classes=3)                            # (1+4)/2, (2+0)/2, (1+0)/2
        tensor([2.5000, 1.0000, 0.5000], dtype=torch.float64)
    """
    num_classes = check_count("num_classes", num_classes)
    ignore_label = check_ignore_label(ignore_label)
    # iterating one tensor would walk its samples, and a (B, 1, 1, H, W) batch would pass the shape check
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"targets: expected an iterable of (B, 1, *spatial) label maps (a list or a dataloader), got a single "
            f"{type(targets).__name__} of shape {tuple(targets.shape)}; wrap it in a list"
        )
    if not isinstance(targets, Iterable):
        raise TypeError(f"targets: expected an iterable of (B, 1, *spatial) label maps, got {type(targets).__name__}")
    totals = torch.zeros(num_classes, dtype=torch.float64)
    samples = 0
    for index, target in enumerate(targets):
        counts = _class_counts(index, target, num_classes, ignore_label)
        totals += counts.sum(0)
        samples += counts.shape[0]
    if samples == 0:
        raise ValueError("targets: expected at least one batch of label maps, got an empty iterable")
    return totals / samples


def _class_counts(index: int, target: object, num_classes: int, ignore_label: Optional[int]) -> torch.Tensor:
    """Each class's voxel count per sample of ``targets[index]``, checked: float64 ``(B, num_classes)``."""
    if isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"targets[{index}]: expected a tensor or numpy array, got {type(target).__name__}")
    if target.ndim not in (4, 5) or target.shape[1] not in (1, num_classes):
        raise ValueError(
            f"targets[{index}]: expected a (B, 1, *spatial) label map or a (B, {num_classes}, *spatial) "
            f"target with 2 or 3 spatial axes, got shape {tuple(target.shape)}"
        )
    target = target.detach().cpu()
    if target.shape[1] != 1 or num_classes == 1:
        return target.reshape(target.shape[0], target.shape[1], -1).to(torch.float64).sum(-1)
    labels = target.round().long() if target.is_floating_point() else target.long()
    counted = labels if ignore_label is None else labels[labels != ignore_label]
    if counted.numel() and (counted.min() < 0 or counted.max() >= num_classes):
        raise ValueError(
            f"targets[{index}]: expected labels in [0, {num_classes - 1}], "
            f"got values in [{int(counted.min())}, {int(counted.max())}]"
        )
    if ignore_label is not None:  # ignored voxels go to an extra bin that is dropped
        labels = torch.where(labels == ignore_label, num_classes, labels)
    return label_counts(labels, num_classes + 1)[:, :num_classes]
