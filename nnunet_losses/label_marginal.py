r"""Label-marginal penalties (Liu et al., "The hidden label-marginal biases of segmentation losses"):
cross-entropy plus an explicit penalty between ground-truth and predicted class proportions."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import (
    ACTIVATIONS,
    check_ignore_label,
    check_option,
    check_scalar,
    ground_truth_sums,
    prepare,
    spatial_sum,
)

PENALTIES = ("l1", "kl", "dice_bias")
DEFAULT_LAMBDA = {"l1": 1.0, "kl": 0.1, "dice_bias": 0.01}
_LOG_FLOOR = 1e-8  # keeps log(p̂) finite when a predicted class proportion underflows to 0


def marginal_penalty(y_hat: torch.Tensor, p_hat: torch.Tensor, penalty: str = "l1", activation: str = "softmax",
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The penalty :math:`R(\hat y, \hat p)` on ``(B, C)`` class proportions, averaged over images.

    * ``"l1"``: :math:`\frac{1}{BC}\sum_{b,c} |\hat y_{b,c} - \hat p_{b,c}|` -- averaged over classes as in
      the authors' code (λ = 1 was tuned with it); the paper's Table 1 writes the sum over classes,
      which is C times larger. :math:`\partial R/\partial \hat p = \mathrm{sign}(\hat p - \hat y)/(BC)`.
    * ``"kl"``: :math:`\frac{1}{B}\sum_b \sum_c \hat y \log(\hat y / \hat p)` (0 log 0 = 0, :math:`\hat p`
      floored at 1e-8), :math:`\partial R/\partial \hat p = -\hat y/(B \hat p)`. With sigmoid regions
      (proportions that need not sum to 1) the Bernoulli KL of each region,
      :math:`\hat y\log\frac{\hat y}{\hat p} + (1-\hat y)\log\frac{1-\hat y}{1-\hat p}`, summed over regions.
    * ``"dice_bias"``: the Dice loss's hidden bias (paper eq. 1, DB),
      :math:`\frac{1}{BC}\sum_{b,c} \log(\hat p + \hat y)`.

    ``valid``: optional ``(B,)`` bool, images to average over (those with at least one counted voxel).

    Example:
        >>> y_hat, p_hat = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
        >>> float(marginal_penalty(y_hat, p_hat, "l1"))      # (0.25 + 0.25) / 2
        0.25
        >>> round(float(marginal_penalty(y_hat, p_hat, "kl")), 6)   # 0.75 ln 1.5 + 0.25 ln 0.5
        0.130812
    """
    if penalty == "l1":
        per_image = (y_hat - p_hat).abs().mean(1)
    elif penalty == "kl":
        per_image = (torch.xlogy(y_hat, y_hat) - y_hat * p_hat.clamp_min(_LOG_FLOOR).log()).sum(1)
        if activation == "sigmoid":
            rest_y, rest_p = 1 - y_hat, 1 - p_hat
            per_image = per_image + (torch.xlogy(rest_y, rest_y) - rest_y * rest_p.clamp_min(_LOG_FLOOR).log()).sum(1)
    else:
        per_image = (p_hat + y_hat).clamp_min(_LOG_FLOOR).log().mean(1)
    if valid is None:
        return per_image.mean()
    keep = valid.to(per_image.dtype)
    return (per_image * keep).sum() / keep.sum().clamp_min(1)


def _check_label_marginal_options(penalty, lam, tau, activation):
    check_option("penalty", penalty, PENALTIES)
    check_option("activation", activation, ACTIVATIONS)
    lam = DEFAULT_LAMBDA[penalty] if lam is None else check_scalar("lam", lam)
    return lam, check_scalar("tau", tau, positive=True)


def label_marginal_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    penalty: str = "l1",
    lam: Optional[float] = None,
    tau: float = 10.0,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Cross-entropy plus a label-marginal penalty (Liu et al., eq. 5): :math:`CE + λ R(\hat y, \hat p)`.

    Per image b and class c, over the counted voxels only (:math:`n_b` of them):

    .. math::
        \hat y_{b,c} = \frac{1}{n_b}\sum_i y_{b,c,i}, \qquad
        \hat p_{b,c} = \frac{1}{n_b}\sum_i \mathrm{softmax}(τ x)_{b,c,i}

    (temperature τ only for :math:`\hat p`, paper App. C, τ = 10; background included). :math:`R` is
    :func:`marginal_penalty` (``"l1"``, ``"kl"`` or ``"dice_bias"``, the paper's DiceBiasCE).
    ``lam=None`` takes the paper's tuned weights: 1.0 for l1, 0.1 for kl, and 0.01 for dice_bias
    (its accuracy dropped for λ ≥ 0.1). Images with no counted voxel are left out of the penalty.

    CE is nnU-Net's: the mean over counted voxels of the cross-entropy of the logits (softmax,
    equal to ``RobustCrossEntropyLoss`` with the ignore label), or of binary cross-entropy with
    logits over voxels and regions (sigmoid). With ``lam=0`` the loss is exactly that CE. (With
    regions *and* a mask, nnU-Net's ``DC_and_BCE_loss`` divides the masked sum over all regions by the
    voxel count only, C times the mean it takes without a mask; we take the mean in both cases.)
    Range: :math:`[0, \infty)` for l1 and kl.

    Example:
        >>> x = torch.zeros(1, 2, 1, 2)                      # s = 0.5: CE = log 2, p̂ = (0.5, 0.5)
        >>> y = torch.tensor([[[[0, 0]]]])                   # ŷ = (1, 0): L1 = (0.5 + 0.5) / 2
        >>> round(float(label_marginal_loss(x, y)), 4), round(0.6931 + 0.5, 4)
        (1.1931, 1.1931)
    """
    lam, tau = _check_label_marginal_options(penalty, lam, tau, activation)
    return _label_marginal(x, y, loss_mask, penalty, lam, tau, activation, ignore_label)


def _label_marginal(x, y, loss_mask, penalty, lam, tau, activation, ignore_label):
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    logits = x.to(prepared.dtype)
    mask = prepared.mask
    if activation == "softmax":
        if prepared.labels is not None:
            voxel_ce = F.cross_entropy(logits, prepared.labels[:, 0], reduction="none").unsqueeze(1)
        else:
            voxel_ce = F.cross_entropy(logits, prepared.target, reduction="none").unsqueeze(1)
    else:  # mean over voxels and regions
        voxel_ce = F.binary_cross_entropy_with_logits(logits, prepared.target, reduction="none").mean(1, keepdim=True)
    if mask is None:
        ce = voxel_ce.mean()
    else:
        ce = (voxel_ce * mask).sum() / mask.sum().clamp_min(1)
    if lam == 0:
        return ce

    sharpened = torch.softmax(tau * logits, 1) if activation == "softmax" else torch.sigmoid(tau * logits)
    if mask is not None:
        sharpened = sharpened * mask
        counted = spatial_sum(mask)  # (B, 1)
    else:
        counted = torch.full((x.shape[0], 1), float(x[0, 0].numel()), dtype=prepared.dtype, device=x.device)
    valid = counted[:, 0] > 0
    counted = counted.clamp_min(1)
    p_hat = spatial_sum(sharpened) / counted
    y_hat = ground_truth_sums(prepared, x.shape[1]) / counted
    return ce + lam * marginal_penalty(y_hat, p_hat, penalty, activation, valid)


class LabelMarginalLoss(nn.Module):
    """Module form of :func:`label_marginal_loss`: ``CE + lam * R`` with ``R`` in ``"l1"``, ``"kl"``,
    ``"dice_bias"``."""

    def __init__(self, penalty: str = "l1", lam: Optional[float] = None, tau: float = 10.0,
                 activation: str = "softmax", ignore_label: Optional[int] = None):
        super().__init__()
        self.lam, self.tau = _check_label_marginal_options(penalty, lam, tau, activation)
        self.penalty = penalty
        self.activation = activation
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _label_marginal(x, y, loss_mask, self.penalty, self.lam, self.tau, self.activation, self.ignore_label)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}, lam={self.lam}, tau={self.tau}, activation={self.activation!r}"
