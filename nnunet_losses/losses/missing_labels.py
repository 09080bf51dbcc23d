r"""Losses for partially labelled data: marginal Dice (Shi et al.) and leaf Dice (Fidon et al.), as
described in Tilborghs et al. §2.1, and the cross-entropies of the same two ideas: Fidon et al.'s
marginal (label-set) cross-entropy and a leaf cross-entropy that drops the ambiguous voxels.

A sample's annotated label set :math:`A_b \subseteq \{1..C-1\}` says which foreground classes were
annotated; a voxel labelled 0 in a sample missing class c may really be c. It is passed as
``annotated``, a ``(B, C)`` boolean tensor (True: class c annotated in sample b; column 0, the
background, is ignored with softmax). Without it, both losses fall back to "class c is annotated in
sample b iff :math:`\sum_i y_{b,c,i} > 0`", which cannot tell an *empty* label from a *missing*
one: that conflation is exactly the point of Tilborghs et al.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import check_annotated, check_values, prepare
from ._options import (
    ACTIVATIONS,
    ClassValues,
    check_bool,
    check_ignore_label,
    check_option,
    class_values,
    per_class,
)
from ._overlap_sums import overlap_sums, overlap_sums_ground_truth
from ._reductions import masked_mean, soft_dice, voxel_count


def _resolve_annotated(annotated, ground_truth, softmax: bool) -> torch.Tensor:
    """The ``(B, C)`` annotated table: given (checked against the target) or the Σy > 0 fallback.

    With softmax a class with voxels cannot be missing, so that contradiction is refused. Sigmoid
    regions may legitimately have voxels and still be unannotated: a region made of several labels
    is incomplete (not annotated) when one of its labels was not annotated in that case.
    """
    present = ground_truth > 0
    if annotated is None:
        annotated = present.clone()
    elif softmax:
        contradiction = present & ~annotated
        contradiction[:, 0] = False
        check_values(~contradiction.any(), "annotated: expected every class with voxels in y to be marked annotated",
                     lambda: _first_contradiction(contradiction))
    if softmax:
        annotated = annotated.clone()
        annotated[:, 0] = True
    return annotated


def _first_contradiction(contradiction: torch.Tensor) -> str:
    sample, cls = (int(v) for v in contradiction.nonzero()[0])
    return f", got sample {sample} with voxels of class {cls} marked as not annotated"


def _refuse_sigmoid(activation, loss: str = "marginal Dice", alternative: str = "LeafDiceLoss"):
    if activation != "softmax":
        raise ValueError(
            f"activation: expected 'softmax' for {loss}, got 'sigmoid': marginalisation merges missing "
            f"classes into the background channel, which sigmoid regions do not have; use {alternative}"
        )


def _check_missing_label_options(epsilon, include_background, activation):
    check_bool("include_background", include_background)
    check_option("activation", activation, ACTIVATIONS)
    return class_values("epsilon", epsilon)


def marginal_dice_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    annotated: Optional[torch.Tensor] = None,
    *,
    epsilon: ClassValues = 1e-7,
    include_background: bool = True,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Marginal Dice loss (Shi et al.): missing classes are merged into the background before the Dice.

    For each sample b, the softmax *probabilities* (not logits, not their average) of the classes not
    in :math:`A_b` are added to the background channel,
    :math:`s'_{b,0} = s_{b,0} + \sum_{c \notin A_b} s_{b,c}`; the image-wise (Φ = I) soft Dice
    :math:`(2\sum y s + ε)/(\sum (y + s) + ε)` is then taken for the merged background (when
    ``include_background``, the default: that is where marginalisation acts) and for each annotated
    foreground class, and the loss is 1 minus the mean over all these (sample, class) terms.

    With every class annotated it equals ``phi_dice_loss(phi="I", include_background=...)``.
    Softmax only: sigmoid regions have no background to merge into. ``annotated=None`` uses the
    Σy > 0 fallback (module docstring). Range: :math:`[0, 1]`.

    Example:
        >>> x = torch.zeros(1, 3, 1, 2)                          # s = 1/3 everywhere
        >>> y = torch.tensor([[[[0, 1]]]])                       # class 2 missing: merged into background
        >>> d_bg = 2 * (2 / 3) / (1 + 4 / 3)                     # y0 = [1, 0], s0' = [2/3, 2/3]
        >>> d_1 = 2 * (1 / 3) / (1 + 2 / 3)
        >>> round(float(marginal_dice_loss(x, y, epsilon=0.0)), 6), round(1 - (d_bg + d_1) / 2, 6)
        (0.514286, 0.514286)
    """
    eps = _check_missing_label_options(epsilon, include_background, activation)
    _refuse_sigmoid(activation)
    return _marginal(x, y, loss_mask, annotated, eps, include_background, activation, ignore_label)


def _marginal(x, y, loss_mask, annotated, eps, include_background, activation, ignore_label):
    # options already checked (by marginal_dice_loss or the module's __init__)
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    annotated = check_annotated(annotated, x.shape[0], x.shape[1], x.device)
    # the table first (it needs only the labels): a batch that misses nothing costs a plain Φ = I Dice
    ground_truth = overlap_sums_ground_truth(prepared, x.shape[1])
    annotated = _resolve_annotated(annotated, ground_truth, softmax=True)
    missing = ~annotated  # column 0 is False
    if not torch.compiler.is_compiling() and not bool(missing.any()):  # (compiled: no host read, always merge)
        intersection, prediction, _, _ = overlap_sums(x, prepared, activation)
    else:
        intersection, prediction, _, background_row = overlap_sums(x, prepared, activation, background_row=True)
        # merged background s'_0 = Σ_{c in Z} s_c, Z = {0} ∪ missing; a missing class has no voxels (refused
        # otherwise), so y'_0 = y_0 and I'_0 = Σ_{c in Z} Σ_i m y_0 s_c, P'_0 = Σ_{c in Z} P_c, G'_0 = G_0
        merged = missing.to(prepared.dtype)
        merged[:, 0] = 1
        merged_intersection = (background_row * merged).sum(1, keepdim=True)
        merged_prediction = (prediction * merged).sum(1, keepdim=True)
        intersection = torch.cat([merged_intersection, intersection[:, 1:]], 1)
        prediction = torch.cat([merged_prediction, prediction[:, 1:]], 1)
    eps = per_class("epsilon", eps, x.shape[1], intersection)
    keep = annotated.clone()
    keep[:, 0] = include_background
    return masked_mean(1 - soft_dice(intersection, prediction, ground_truth, eps), keep)


def leaf_dice_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    annotated: Optional[torch.Tensor] = None,
    *,
    epsilon: ClassValues = 1e-7,
    include_background: bool = False,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Leaf Dice loss (Fidon et al.): the Dice terms of missing classes are dropped.

    Image-wise (Φ = I) soft Dice per (sample, class); the terms of classes not in :math:`A_b` are
    dropped (their subsets become ∅), and in a sample missing any class the background term is
    dropped too (its voxels are ambiguous). The loss is 1 minus the mean over all remaining
    (sample, class) terms; with none left it is 0 with zero gradient (not NaN).

    With sigmoid every channel is a region and column 0 of ``annotated`` counts like the others.
    With every class annotated it equals ``phi_dice_loss(phi="I", include_background=...)``.
    ``annotated=None`` uses the Σy > 0 fallback (module docstring). Range: :math:`[0, 1]`.

    Example:
        >>> x = torch.zeros(1, 3, 1, 2)                          # s = 1/3 everywhere
        >>> y = torch.tensor([[[[0, 1]]]])                       # class 2 missing: its term is dropped
        >>> round(float(leaf_dice_loss(x, y, epsilon=0.0)), 6), round(1 - 2 * (1 / 3) / (1 + 2 / 3), 6)
        (0.6, 0.6)
    """
    eps = _check_missing_label_options(epsilon, include_background, activation)
    return _leaf(x, y, loss_mask, annotated, eps, include_background, activation, ignore_label)


def _leaf(x, y, loss_mask, annotated, eps, include_background, activation, ignore_label):
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    annotated = check_annotated(annotated, x.shape[0], x.shape[1], x.device)
    intersection, prediction, ground_truth, _ = overlap_sums(x, prepared, activation, ground_truth=True)
    softmax = activation == "softmax"
    keep = _resolve_annotated(annotated, ground_truth, softmax)
    if softmax:
        keep[:, 0] = include_background & keep[:, 1:].all(1)
    eps = per_class("epsilon", eps, x.shape[1], intersection)
    return masked_mean(1 - soft_dice(intersection, prediction, ground_truth, eps), keep)


class MarginalDiceLoss(nn.Module):
    """Module form of :func:`marginal_dice_loss` (softmax only);
    ``forward(x, y, loss_mask=None, annotated=None)``."""

    def __init__(self, *, epsilon: ClassValues = 1e-7, include_background: bool = True, activation: str = "softmax",
                 ignore_label: Optional[int] = None):
        super().__init__()
        self.register_buffer("epsilon", _check_missing_label_options(epsilon, include_background, activation))
        _refuse_sigmoid(activation)  # at construction, not at the first batch
        self.include_background = include_background
        self.activation = activation
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _marginal(x, y, loss_mask, annotated, self.epsilon, self.include_background, self.activation,
                         self.ignore_label)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon.tolist()}, include_background={self.include_background}"


class LeafDiceLoss(nn.Module):
    """Module form of :func:`leaf_dice_loss`; ``forward(x, y, loss_mask=None, annotated=None)``."""

    def __init__(self, *, epsilon: ClassValues = 1e-7, include_background: bool = False, activation: str = "softmax",
                 ignore_label: Optional[int] = None):
        super().__init__()
        self.register_buffer("epsilon", _check_missing_label_options(epsilon, include_background, activation))
        self.include_background = include_background
        self.activation = activation
        self.ignore_label = check_ignore_label(ignore_label)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _leaf(x, y, loss_mask, annotated, self.epsilon, self.include_background, self.activation,
                     self.ignore_label)

    def extra_repr(self) -> str:
        return (f"epsilon={self.epsilon.tolist()}, include_background={self.include_background}, "
                f"activation={self.activation!r}")


# ------------------------------------------------------------------------------------------------
# cross-entropy on label sets
# ------------------------------------------------------------------------------------------------
def _check_cross_entropy_options(activation, ignore_label, marginal: bool):
    check_option("activation", activation, ACTIVATIONS)
    if marginal:
        _refuse_sigmoid(activation, "marginal cross-entropy", "LeafCrossEntropyLoss")
    return check_ignore_label(ignore_label)


def marginal_cross_entropy(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    annotated: Optional[torch.Tensor] = None,
    *,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Marginal (label-set) cross-entropy (Fidon et al.): a voxel's label stands for a set of classes.

    The label set :math:`S_{b,i}` of voxel i of sample b is its own class when that is a foreground
    class, and :math:`\{0\} \cup U_b` for a background voxel, :math:`U_b` being the classes not in
    :math:`A_b` (a background voxel may be any of them). With :math:`s = \mathrm{softmax}(x)`, over the
    :math:`N` counted voxels (the per-voxel mean of nnU-Net's CE):

    .. math::
        L = \frac{1}{N}\sum_{b,i} m_{b,i}\Big(-\log \sum_{c \in S_{b,i}} s_{b,c,i} + \log |S_{b,i}|\Big)

    computed as :math:`\log|S| - \mathrm{logsumexp}_{c \in S} \log s_c` from ``log_softmax(x)`` gathered
    at the label of a label map (never made one-hot), as :math:`\mathrm{logsumexp}_c\, x -
    \mathrm{logsumexp}_{c \in S}\, x + \log|S|` for a one-hot target; never as the log of a sum of
    probabilities.
    Gradient: :math:`\partial L/\partial x_c = m (s_c - [c \in S]\, s_c / \sum_{k \in S} s_k)/N`. With
    every class annotated (:math:`|S| = 1`) it is nnU-Net's CE (``RobustCrossEntropyLoss``, the ignore
    label included).

    Reference vs code: :math:`+\log|S|` is Fidon et al.'s definition (their code's marginalisation
    spreads the set's probability and its target evenly over the set's classes, so a voxel's term is
    :math:`-\log(\frac{1}{|S|}\sum_{c\in S} s_c)`); it is a constant per voxel, the gradient is that of
    the merged CE :math:`-\log\sum_{c \in S} s_c`. They add 1e-10 to :math:`e^{x}` before the log and
    average per image, then over images; we compute exactly and take the mean over the batch's counted
    voxels (the same without a mask). Softmax only; ``annotated=None`` uses the Σy > 0 fallback
    (module docstring). Range: :math:`[0, \infty)`; everything masked: 0.

    Example:
        >>> import math
        >>> x = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 3, 1, 1).expand(1, 3, 1, 2)  # s = (1/2, 1/4, 1/4)
        >>> y = torch.tensor([[[[0, 1]]]])                   # class 2 missing: S = {0, 2} on the background voxel
        >>> round(float(marginal_cross_entropy(x, y)), 6), round(-(math.log(0.75 / 2) + math.log(0.25)) / 2, 6)
        (1.183562, 1.183562)
    """
    ignore_label = _check_cross_entropy_options(activation, ignore_label, marginal=True)
    return _marginal_cross_entropy(x, y, loss_mask, annotated, ignore_label)


def _label_set_inputs(x, y, loss_mask, annotated, activation, ignore_label):
    """The checked inputs and the resolved ``(B, C)`` annotated table."""
    prepared = prepare(x, y, loss_mask, activation, ignore_label)
    annotated = check_annotated(annotated, x.shape[0], x.shape[1], x.device)
    ground_truth = overlap_sums_ground_truth(prepared, x.shape[1])
    return prepared, _resolve_annotated(annotated, ground_truth, softmax=activation == "softmax")


def _per_voxel(table: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(B, C)`` (or ``(B,)``) table broadcastable against ``(B, C, *spatial)``."""
    return table.view(table.shape[0], -1, *([1] * (ndim - 2)))


def _masked_voxel_mean(values: torch.Tensor, weights: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``Σ w·v / Σ w`` (at least 1 in the denominator, as :func:`voxel_count`): 0 when nothing counts."""
    if weights is None:
        return values.sum() / voxel_count(x, None)
    return (values * weights).sum() / voxel_count(x, weights)


def _background_label_sets(annotated: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bool: the label set of a background voxel of sample b, ``{0} ∪ U_b``."""
    label_set = ~annotated
    label_set[:, 0] = True
    return label_set


def _marginal_cross_entropy(x, y, loss_mask, annotated, ignore_label):
    prepared, annotated = _label_set_inputs(x, y, loss_mask, annotated, "softmax", ignore_label)
    with torch.autocast(x.device.type, enabled=False):  # float32 under autocast, as every loss
        logits = x.to(prepared.dtype)
        if prepared.labels is None:
            per_voxel = _marginal_cross_entropy_of_target(logits, prepared.target, annotated)
        else:
            per_voxel = _marginal_cross_entropy_of_labels(logits, prepared.labels, annotated)
        return _masked_voxel_mean(per_voxel, prepared.mask, x)


def _marginal_cross_entropy_of_labels(logits, labels, annotated):
    """Per voxel, from a label map and without a one-hot map: ``-log s_l``, and on the background voxels
    of a sample missing classes ``-logsumexp_{c ∈ {0} ∪ U_b} log s_c + log |S_b|``, over the channels
    some sample's background set holds (the background and the batch's missing classes) only."""
    log_probs = logits.log_softmax(1)
    per_voxel = -log_probs.gather(1, labels)
    label_set = _background_label_sets(annotated)
    if torch.compiler.is_compiling():  # no host read: every channel
        merged_channels = torch.arange(label_set.shape[1], device=label_set.device)
    else:
        merged_channels = label_set.any(0).nonzero()[:, 0]
        if len(merged_channels) == 1:  # nothing missing: nnU-Net's CE
            return per_voxel
    label_set = label_set[:, merged_channels]
    outside = torch.zeros(label_set.shape, dtype=log_probs.dtype, device=log_probs.device)
    outside.masked_fill_(~label_set, float("-inf"))
    in_set = log_probs.index_select(1, merged_channels) + _per_voxel(outside, logits.ndim)
    set_size = _per_voxel(label_set.sum(1).to(log_probs.dtype), logits.ndim)
    return torch.where(labels == 0, set_size.log() - in_set.logsumexp(1, keepdim=True), per_voxel)


def _marginal_cross_entropy_of_target(logits, target, annotated):
    """Per voxel, from a one-hot target: ``logsumexp_c x - logsumexp_{c ∈ S} x + log |S|``."""
    label_set = _label_sets(target, annotated)
    in_set = logits.masked_fill(~label_set, float("-inf")).logsumexp(1, keepdim=True)
    set_size = label_set.sum(1, keepdim=True).to(logits.dtype)
    per_voxel = logits.logsumexp(1, keepdim=True) - in_set + set_size.log()
    has_class = (target > 0).any(1, keepdim=True)  # a one-hot voxel without any class adds nothing
    return torch.where(has_class, per_voxel, torch.zeros_like(per_voxel))


@torch.no_grad()
def _label_sets(target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` bool: class c is in the voxel's label set (its class; on background voxels
    also the image's missing classes). A voxel of a one-hot target without any class gets every class:
    its term is dropped, and the logsumexp over the set stays finite."""
    label_set = (target > 0) | ((target[:, :1] > 0) & _per_voxel(~annotated, target.ndim))
    return label_set | ~label_set.any(1, keepdim=True)


def leaf_cross_entropy(
    x: torch.Tensor,
    y: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    annotated: Optional[torch.Tensor] = None,
    *,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> torch.Tensor:
    r"""Leaf cross-entropy: the cross-entropy of the voxels whose label is not ambiguous.

    With softmax, a background voxel of a sample missing any class (:math:`A_b \ne \{1..C-1\}`) is
    ambiguous and does not count; every other counted voxel (:math:`V`, weights :math:`m`) is plain CE:

    .. math::
        L = \frac{\sum_{b,i \in V} m_{b,i}\,(-\log s_{b,y_{b,i},i})}{\sum_{b,i \in V} m_{b,i}}

    With sigmoid every channel is a region: the binary cross-entropy terms of the (sample, region) pairs
    not annotated are dropped, and the mean runs over the counted voxels of the annotated regions. With
    nothing left, 0 with zero gradient. With every class annotated it is nnU-Net's CE
    (``RobustCrossEntropyLoss``, the ignore label included) or BCE-with-logits averaged over voxels and
    regions. ``annotated=None`` uses the Σy > 0 fallback (module docstring).

    Reference vs code: Fidon et al.'s code has no leaf cross-entropy: their ``LeafDiceCE`` pairs the
    leaf Dice with the *marginal* cross-entropy (:func:`marginal_cross_entropy`). This one is the leaf
    Dice's idea applied to the CE: ambiguous voxels drop out instead of being marginalised.
    Range: :math:`[0, \infty)`; everything masked: 0.

    Example:
        >>> import math
        >>> x = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 3, 1, 1).expand(1, 3, 1, 2)  # s = (1/2, 1/4, 1/4)
        >>> y = torch.tensor([[[[0, 1]]]])                   # class 2 missing: the background voxel is dropped
        >>> round(float(leaf_cross_entropy(x, y)), 6), round(-math.log(0.25), 6)
        (1.386294, 1.386294)
    """
    ignore_label = _check_cross_entropy_options(activation, ignore_label, marginal=False)
    return _leaf_cross_entropy(x, y, loss_mask, annotated, activation, ignore_label)


@torch.no_grad()
def _leaf_weights(background: torch.Tensor, annotated: torch.Tensor, mask: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """Per-voxel weights of the softmax leaf CE, ``(B, 1, ...)``: 0 on the background voxels (``background``,
    bool) of a sample missing any class, else the mask's weight."""
    any_missing = _per_voxel(~annotated[:, 1:].all(1), background.ndim)
    weights = (~(background & any_missing)).to(dtype)
    return weights if mask is None else weights * mask


def _leaf_cross_entropy(x, y, loss_mask, annotated, activation, ignore_label):
    prepared, annotated = _label_set_inputs(x, y, loss_mask, annotated, activation, ignore_label)
    with torch.autocast(x.device.type, enabled=False):
        logits = x.to(prepared.dtype)
        if activation == "sigmoid":  # every region counts where annotated
            weights = _per_voxel(annotated, x.ndim).to(prepared.dtype).expand_as(prepared.target)
            weights = weights if prepared.mask is None else weights * prepared.mask
            per_voxel = F.binary_cross_entropy_with_logits(logits, prepared.target, reduction="none")
        elif prepared.labels is not None:  # a label map: log s at the label, no one-hot map
            weights = _leaf_weights(prepared.labels == 0, annotated, prepared.mask, prepared.dtype)
            per_voxel = -logits.log_softmax(1).gather(1, prepared.labels)
        else:
            weights = _leaf_weights(prepared.target[:, :1] > 0, annotated, prepared.mask, prepared.dtype)
            per_voxel = -(prepared.target * logits.log_softmax(1)).sum(1, keepdim=True)
        return _masked_voxel_mean(per_voxel, weights, x)


class _LabelSetCrossEntropyModule(nn.Module):
    """The module form shared by the label-set cross-entropies: options checked at construction."""

    _marginal = False

    def __init__(self, *, activation: str = "softmax", ignore_label: Optional[int] = None):
        super().__init__()
        self.ignore_label = _check_cross_entropy_options(activation, ignore_label, marginal=self._marginal)
        self.activation = activation

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._marginal:
            return _marginal_cross_entropy(x, y, loss_mask, annotated, self.ignore_label)
        return _leaf_cross_entropy(x, y, loss_mask, annotated, self.activation, self.ignore_label)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, ignore_label={self.ignore_label}"


class MarginalCrossEntropyLoss(_LabelSetCrossEntropyModule):
    """Module form of :func:`marginal_cross_entropy` (softmax only);
    ``forward(x, y, loss_mask=None, annotated=None)``."""

    _marginal = True


class LeafCrossEntropyLoss(_LabelSetCrossEntropyModule):
    """Module form of :func:`leaf_cross_entropy`; ``forward(x, y, loss_mask=None, annotated=None)``."""
