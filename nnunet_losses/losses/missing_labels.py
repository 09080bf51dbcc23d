r"""Dice losses for partially labelled data: marginal Dice (Shi et al.) and leaf Dice (Fidon et al.),
as described in Tilborghs et al. §2.1.

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
from ._reductions import masked_mean, soft_dice


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


def _refuse_sigmoid(activation):
    if activation != "softmax":
        raise ValueError(
            "activation: expected 'softmax' for marginal Dice, got 'sigmoid': marginalisation merges missing "
            "classes into the background channel, which sigmoid regions do not have; use LeafDiceLoss"
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
