r"""Mime, negative mime and dynamic mime losses (Kervadec & de Bruijne, "On the dice loss gradient and
the ways to mimic it").

The Dice loss gradient with respect to the probabilities is two-valued per class (eq. 6): a negative
value where the label is 1, a positive one elsewhere. A *linear* loss :math:`w_y^\top s` with the same
sign pattern supervises the network the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._autograd import first_order_only
from ._inputs import prepare
from ._options import (
    ACTIVATIONS,
    ClassValues,
    check_bool,
    check_ignore_label,
    check_option,
    check_phi_options,
    class_values,
    per_class,
)
from ._overlap_sums import overlap_sums
from ._reductions import reduce_phi, voxel_count
from .dice import PhiOptionsModule, _dice_gradient_weights
from .distributed import all_reduce_sum, ddp_active, world_size

REDUCTIONS = ("mean", "sum")
# the negative mime is the mime with a = 1, b = 0 (float64 like every checked weight, see class_values)
_NEGATIVE_MIME_A = torch.tensor(1.0, dtype=torch.float64)
_NEGATIVE_MIME_B = torch.tensor(0.0, dtype=torch.float64)
_NO_DOUBLE_BACKWARD = (
    "dynamic_mime_loss: expected a first-order backward, got create_graph=True: its weights are taken without "
    "gradient, so autograd's second derivative would not be the derivative of its gradient (the Phi-Dice "
    "gradient); for a gradient penalty use phi_dice_loss with the same options (the same gradient, exact "
    "second derivatives)"
)


def _check_mime_options(include_background, activation, reduction):
    check_bool("include_background", include_background)
    check_option("activation", activation, ACTIVATIONS)
    check_option("reduction", reduction, REDUCTIONS)


def mime_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    a: ClassValues = 1.9,
    b: ClassValues = 0.1,
    include_background: bool = True,
    activation: str = "softmax",
    reduction: str = "mean",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Mime loss (Kervadec & de Bruijne, eq. 8-9): a linear loss whose gradient mimics the Dice loss's.

    .. math::
        L = \frac{1}{N} \sum_{b,c,i} m_{b,i}\, w_{b,c,i}\, s_{b,c,i}, \qquad w = -a\,y + b\,(1 - y),

    so that :math:`\partial L / \partial s_{b,c,i} = -a_c/N` where :math:`y = 1` and :math:`+b_c/N`
    where :math:`y = 0` (masked voxels: 0). :math:`s` is the softmax (or sigmoid) of the logits ``x``,
    :math:`m` the ``loss_mask``. The paper's :math:`\omega_y = -2y + 0.1` is ``a=1.9, b=0.1``.

    ``reduction="mean"``: :math:`N` is the number of counted voxels over the batch (a per-voxel mean,
    like nnU-Net's cross-entropy, so nnU-Net's learning rate and gradient clipping stay sensible);
    ``reduction="sum"``: :math:`N = 1`, the paper's plain sum. ``a`` and ``b`` are numbers or one value
    per channel (§2.3: "pre-computed from the dataset's class distribution"). With
    ``include_background=False`` (softmax only) channel 0 gets :math:`w = 0`.

    Range (mean): :math:`[-\max_c a_c, \max_c b_c]` with softmax, :math:`[-C \max_c a_c, C \max_c b_c]` with
    sigmoid (C independent channels); everything masked gives 0.

    Args:
        x: logits ``(B, C, *spatial)``, 2D or 3D.
        y: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot / region target.
        loss_mask: optional ``(B, 1, *spatial)``, 1 = voxel counts.
        ignore_label: label value in ``y`` treated as masked (nnU-Net's ignore label).

    Example:
        >>> x = torch.zeros(1, 2, 2, 2)                      # uniform softmax: s = 0.5 everywhere
        >>> y = torch.tensor([[[[0, 1], [1, 1]]]])
        >>> mime_loss(x, y)                                  # per voxel: 0.5·(-1.9) + 0.5·0.1
        tensor(-0.9000)
    """
    _check_mime_options(include_background, activation, reduction)
    return _mime(x, y, loss_mask, class_values("a", a), class_values("b", b), include_background, activation,
                 reduction, ignore_label)


def _mime(x, y, loss_mask, a, b, include_background, activation, reduction, ignore_label):
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    intersection, prediction, _, _ = overlap_sums(x, prepared, activation)  # no ground truth needed
    a = per_class("a", a, x.shape[1], intersection)
    b = per_class("b", b, x.shape[1], intersection)
    first = 1 if (activation == "softmax" and not include_background) else 0
    # Σ_{b,c,i} m w s with w = b - (a + b) y is linear in the overlap sums: Σ_c b_c P_c - (a_c + b_c) I_c
    total = (b[first:] * prediction[:, first:] - (a + b)[first:] * intersection[:, first:]).sum()
    if reduction == "sum":
        return total
    return total / voxel_count(x, prepared.mask).to(total.dtype)


def negative_mime_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    include_background: bool = True,
    activation: str = "softmax",
    reduction: str = "mean",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Negative mime (Kervadec & de Bruijne, eq. 10): :math:`L_{NM} = -\frac{1}{N} y^\top s`.

    The mime with ``a = 1, b = 0``: :math:`\partial L/\partial s = -1/N` on the label, 0 elsewhere.
    For mutually exclusive classes only (softmax): the classes compete through the softmax, which is
    the implicit regularisation of §2.4. With sigmoid regions it has a trivial minimiser (everything
    foreground), so ``activation="sigmoid"`` is refused. Range (mean): :math:`[-1, 0]`.

    Example:
        >>> x = torch.zeros(1, 2, 2, 2)
        >>> y = torch.tensor([[[[0, 1], [1, 1]]]])
        >>> negative_mime_loss(x, y)                         # -mean of s at the label = -0.5
        tensor(-0.5000)
    """
    _check_negative_mime_options(include_background, activation, reduction)
    return _mime(x, y, loss_mask, _NEGATIVE_MIME_A, _NEGATIVE_MIME_B, include_background, activation, reduction,
                 ignore_label)


def _check_negative_mime_options(include_background, activation, reduction):
    _check_mime_options(include_background, activation, reduction)
    if activation != "softmax":
        raise ValueError(
            "activation: expected 'softmax' for NegativeMimeLoss, got 'sigmoid': with independent sigmoid "
            "regions -y.s is minimised by predicting everything as foreground; use MimeLoss (b > 0) instead"
        )


def dynamic_mime_loss(
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
    r"""Dynamic mime: the mime whose weights are the Dice loss gradient's two values, recomputed every call.

    .. math::
        L = \sum_{φ \in Φ} \left( b_φ \sum_{ω \in φ} m\, s_ω - (a_φ + b_φ) \sum_{ω \in φ} m\, y_ω s_ω \right)

    with :math:`a_φ, b_φ` from :func:`~nnunet_losses.dice_gradient_weights` taken without gradient. Its gradient
    with respect to :math:`s` (hence to the logits) is *exactly* that of
    ``phi_dice_loss(x, y, phi=phi, epsilon=epsilon, include_background=include_background)``: a
    living proof of the paper's analysis that the Dice loss supervises as a weighted negative of the
    label. Its *value* is the linear mime :math:`w^\top s`, not a Dice value: per subset
    :math:`(εP - 2I(G + ε)) / (|Φ| D^2)`, so the range is :math:`[-1/2, 1/4]` (positive only for an
    empty subset with ε > 0).

    Under DDP with ``phi`` in BI/BCI the sums are global and the loss is scaled by the world size, so
    that after DDP's gradient averaging the gradient equals that of one process with the whole batch
    (the same convention as nnU-Net's ``AllGatherGrad``).

    Example:
        >>> x = torch.zeros(1, 2, 1, 2)                      # s = 0.5 everywhere
        >>> y = torch.tensor([[[[1, 0]]]])                   # class 1: I = 0.5, U = 2
        >>> # a = 2/2 - 1/4 = 0.75, b = 2·0.5/4 = 0.25: L = b·Σs - (a+b)·I = 0.25 - 0.5
        >>> dynamic_mime_loss(x, y, epsilon=0.0)
        tensor(-0.2500)
    """
    eps = check_phi_options(phi, epsilon, include_background, activation, ddp)
    return _dynamic_mime(x, y, loss_mask, phi, eps, include_background, activation, ddp, ignore_label)


def _dynamic_mime(x, y, loss_mask, phi, eps, include_background, activation, ddp, ignore_label):
    # options already checked (by dynamic_mime_loss or the module's __init__): no host copy per call
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    intersection, prediction, ground_truth, _ = overlap_sums(x, prepared, activation, ground_truth=True)
    first = 1 if (activation == "softmax" and not include_background) else 0
    intersection, prediction, ground_truth = intersection[:, first:], prediction[:, first:], ground_truth[:, first:]
    eps = per_class("epsilon", eps, x.shape[1], intersection)[first:]
    gather = phi in ("BI", "BCI") and ddp_active(ddp)
    with torch.no_grad():
        stats = reduce_phi((intersection.detach(), prediction.detach(), ground_truth), phi, gather=False)
        if gather:
            stats = tuple(all_reduce_sum(s) for s in stats)
        eps_phi = eps if phi in ("I", "BI") else eps[0]
        num_subsets = {"I": intersection.numel(), "CI": x.shape[0], "BI": intersection.shape[1], "BCI": 1}[phi]
        a, b = _dice_gradient_weights(*stats, eps_phi, num_subsets)
        a, b = _to_batch_class(a, phi, intersection.shape), _to_batch_class(b, phi, intersection.shape)
        if gather:
            a, b = a * world_size(), b * world_size()
    return first_order_only((b * prediction - (a + b) * intersection).sum(), _NO_DOUBLE_BACKWARD)


def _to_batch_class(values: torch.Tensor, phi: str, shape) -> torch.Tensor:
    """Broadcast per-subset values back to the ``(B, C)`` table of sums."""
    if phi == "CI":
        values = values[:, None]
    return values.expand(shape)


class MimeLoss(nn.Module):
    """Module form of :func:`mime_loss`; ``a`` and ``b`` (scalars or per class) are buffers."""

    def __init__(self, *, a: ClassValues = 1.9, b: ClassValues = 0.1, include_background: bool = True,
                 activation: str = "softmax", reduction: str = "mean", ignore_label: Optional[int] = None):
        super().__init__()
        _check_mime_options(include_background, activation, reduction)
        self.register_buffer("a", class_values("a", a))
        self.register_buffer("b", class_values("b", b))
        self.include_background = include_background
        self.activation = activation
        self.reduction = reduction
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _mime(x, y, loss_mask, self.a, self.b, self.include_background, self.activation, self.reduction,
                     self.ignore_label)

    def extra_repr(self) -> str:
        return (f"a={self.a.tolist()}, b={self.b.tolist()}, include_background={self.include_background}, "
                f"activation={self.activation!r}, reduction={self.reduction!r}")


class NegativeMimeLoss(nn.Module):
    """Module form of :func:`negative_mime_loss` (softmax only)."""

    def __init__(self, *, include_background: bool = True, activation: str = "softmax", reduction: str = "mean",
                 ignore_label: Optional[int] = None):
        super().__init__()
        _check_negative_mime_options(include_background, activation, reduction)
        self.include_background = include_background
        self.activation = activation
        self.reduction = reduction
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _mime(x, y, loss_mask, _NEGATIVE_MIME_A, _NEGATIVE_MIME_B, self.include_background, self.activation,
                     self.reduction, self.ignore_label)

    def extra_repr(self) -> str:
        return f"include_background={self.include_background}, reduction={self.reduction!r}"


class DynamicMimeLoss(PhiOptionsModule):
    """Module form of :func:`dynamic_mime_loss` (the options of :class:`~nnunet_losses.PhiDiceLoss`)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _dynamic_mime(x, y, loss_mask, self.phi, self.epsilon, self.include_background, self.activation,
                             self.ddp, self.ignore_label)
