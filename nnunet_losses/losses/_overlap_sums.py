"""The overlap sums every Dice and mime loss is a function of: per (sample, class), the intersection
``I = Σ m y s``, the prediction ``P = Σ m s``, the ground truth ``G = Σ m y`` and, for marginal Dice,
``R = Σ m y_0 s``. One fused autograd Function (eager) and its custom-operator twin (torch.compile)."""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import Prepared, compute_dtype, probabilities
from ._reductions import spatial_sum

def _overlap_forward(x, labels, target, mask, softmax: bool, background_row: bool):
    """The forward of :class:`_OverlapSums`: ``(I, P, R or None, probabilities (B, C, N))``."""
    dtype = compute_dtype(x)
    probs = probabilities(x, "softmax" if softmax else "sigmoid", dtype).flatten(2)  # (B, C, N)
    weights = None if mask is None else mask.flatten(1).to(dtype)  # (B, N)
    prediction = probs.sum(-1) if weights is None else torch.einsum("bcn,bn->bc", probs, weights)
    row = None
    if labels is not None:
        flat_labels = labels.flatten(1)
        at_label = probs.gather(1, flat_labels.unsqueeze(1)).squeeze(1)
        if weights is not None:
            at_label.mul_(weights)
        intersection = torch.zeros_like(prediction).scatter_add_(1, flat_labels, at_label)
        del at_label
        if background_row:
            row = torch.einsum("bcn,bn->bc", probs, _background_weights(flat_labels, weights, dtype))
    else:
        flat_target = target.flatten(2).to(dtype)
        overlap = probs * flat_target
        intersection = overlap.sum(-1) if weights is None else torch.einsum("bcn,bn->bc", overlap, weights)
        del overlap
        if background_row:
            on_background = flat_target[:, 0] if weights is None else flat_target[:, 0] * weights
            row = torch.einsum("bcn,bn->bc", probs, on_background)
    return intersection, prediction, row, probs


def _overlap_backward(probs, x, labels, target, mask, softmax: bool, grad_intersection, grad_prediction, grad_row):
    """The gradient of :class:`_OverlapSums` with respect to ``x``, written into ``probs`` (the
    forward's probabilities, overwritten) or, when ``probs`` is None, into freshly computed ones."""
    dtype = compute_dtype(x)
    if probs is None:
        probs = probabilities(x, "softmax" if softmax else "sigmoid", dtype).flatten(2)  # (B, C, N)
    zeros = probs.new_zeros(probs.shape[:2])
    g_int = zeros if grad_intersection is None else grad_intersection.to(dtype)  # (B, C)
    g_pred = zeros if grad_prediction is None else grad_prediction.to(dtype)
    weights = None if mask is None else mask.flatten(1).to(dtype)  # (B, N)
    if labels is not None:  # softmax only: sigmoid always has a region target
        # ∂/∂x_c = s_c (g^P_c + g^R_c y_0 - Σ_k g_k s_k) + [c = l] s_l g^I_l, written into the
        # probability tensor channel by channel; besides it, only (B, N) tensors are allocated
        flat_labels = labels.flatten(1)  # (B, N)
        at_label = probs.gather(1, flat_labels.unsqueeze(1)).squeeze(1)
        # the same weight for every class of a sample (the mime with scalar a, b): one read decides
        same_int, same_pred = (bool(v) for v in torch.stack([(g_int == g_int[:, :1]).all(),
                                                              (g_pred == g_pred[:, :1]).all()]).tolist())
        at_label.mul_(g_int[:, :1] if same_int else g_int.gather(1, flat_labels))  # s_l g^I_l
        if same_pred and grad_row is None:
            # Σ_k g^P_k s_k = g^P (the probabilities sum to 1): every channel's factor is -s_l g^I_l
            probs.mul_(at_label.neg().unsqueeze(1))
        else:
            mean = torch.einsum("bcn,bc->bn", probs, g_pred).add_(at_label)  # Σ_k g_k s_k
            on_background = None
            if grad_row is not None:
                g_row = grad_row.to(dtype)
                on_background = _background_weights(flat_labels, None, dtype)
                mean.addcmul_(on_background, torch.einsum("bcn,bc->bn", probs, g_row))
            factor = torch.empty_like(mean)  # one buffer for every channel
            for channel in range(probs.shape[1]):
                torch.sub(g_pred[:, channel:channel + 1], mean, out=factor)
                if on_background is not None:
                    factor.addcmul_(on_background, g_row[:, channel:channel + 1])
                probs[:, channel].mul_(factor)
            del mean, factor, on_background
        grad = probs.scatter_add_(1, flat_labels.unsqueeze(1), at_label.unsqueeze(1))
    else:
        # one-hot / region targets: g itself is the one other logits-sized tensor
        flat_target = target.flatten(2).to(dtype)
        g = (flat_target * g_int.unsqueeze(-1)).add_(g_pred.unsqueeze(-1))
        if grad_row is not None:
            g.addcmul_(flat_target[:, :1], grad_row.to(dtype).unsqueeze(-1))
        if softmax:
            mean = torch.zeros_like(g[:, 0])  # Σ_k g_k s_k, (B, N)
            for channel in range(probs.shape[1]):
                mean.addcmul_(g[:, channel], probs[:, channel])
            grad = probs.mul_(g.sub_(mean.unsqueeze(1)))
        else:
            g.mul_(probs)
            grad = probs.neg_().add_(1).mul_(g)  # g s (1 - s)
        del g
    if weights is not None:
        grad.mul_(weights.unsqueeze(1))
    return grad.view(x.shape).to(x.dtype)


class _OverlapSums(torch.autograd.Function):
    r"""Per (b, c) sums of the probabilities, straight from the logits, with a closed-form backward.

    ``I = Σ_i m y s`` (intersection), ``P = Σ_i m s`` (prediction) and, for marginal Dice,
    ``R = Σ_i m y_0 s`` (each channel's probability summed over the background voxels). Every loss of
    the package is a function of these (B, C) tables, so one Function serves them all: the forward
    never builds a one-hot map for label-map targets (the intersection is a gather + scatter-add),
    and the backward writes the gradient into the probability tensor itself:
    with :math:`g_{c,i} = m_i (g^P_c + g^I_c y_{c,i} + g^R_c y_{0,i})`,
    softmax: :math:`∂/∂x_c = s_c (g_c - Σ_k g_k s_k)`; sigmoid: :math:`∂/∂x_c = g_c s_c (1 - s_c)`.

    The forward's probabilities are handed to the backward (when the logits need a gradient), which
    consumes them in place: one logits-sized tensor lives from the forward to the end of the
    backward, and the softmax runs once. A second backward through the same graph
    (``retain_graph=True``) finds them consumed and recomputes them from the saved logits.
    Under ``torch.compile`` the custom operator ``nnunet_losses::overlap_sums`` runs instead (see
    :func:`overlap_stats`).
    """

    @staticmethod
    def forward(ctx, x, labels, target, mask, softmax: bool, background_row: bool):
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):  # sums stay float32 under autocast
            intersection, prediction, row, probs = _overlap_forward(x, labels, target, mask, softmax, background_row)
        ctx.save_for_backward(x, labels, target, mask)
        ctx.softmax = softmax
        # not saved with save_for_backward: the backward overwrites it (see the class docstring)
        ctx.probs = probs if ctx.needs_input_grad[0] else None
        return intersection, prediction, row

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction, grad_row):
        x, labels, target, mask = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None  # consumed: a second backward recomputes them
        with torch.autocast(x.device.type, enabled=False):
            grad = _overlap_backward(probs, x, labels, target, mask, ctx.softmax, grad_intersection,
                                     grad_prediction, grad_row)
        return grad, None, None, None, None, None


def _background_weights(flat_labels: torch.Tensor, weights: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``m·[y = 0]`` per voxel, ``(B, N)``: the weights of marginal Dice's background row."""
    on_background = (flat_labels == 0).to(dtype)
    return on_background if weights is None else on_background.mul_(weights)


# ----------------------------------------------------------------------------------------------
# the same sums as a custom operator, for torch.compile: the compiler sees one opaque call (its
# output shapes come from the fake implementations) instead of tracing into the Function and
# re-planning the in-place backward with buffers of its own (1.5-2.7x the eager peak memory)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nnunet_losses::overlap_sums", mutates_args=())
def _overlap_sums_op(x: torch.Tensor, labels: Optional[torch.Tensor], target: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], softmax: bool,
                     background_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        intersection, prediction, row, _ = _overlap_forward(x, labels, target, mask, softmax, background_row)
    return intersection, prediction, (torch.zeros_like(prediction) if row is None else row)


@_overlap_sums_op.register_fake
def _(x, labels, target, mask, softmax, background_row):
    table = x.new_empty(x.shape[:2], dtype=compute_dtype(x))
    return table, torch.empty_like(table), torch.empty_like(table)


@torch.library.custom_op("nnunet_losses::overlap_sums_backward", mutates_args=())
def _overlap_sums_backward_op(x: torch.Tensor, labels: Optional[torch.Tensor], target: Optional[torch.Tensor],
                              mask: Optional[torch.Tensor], softmax: bool, grad_intersection: Optional[torch.Tensor],
                              grad_prediction: Optional[torch.Tensor],
                              grad_row: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return _overlap_backward(None, x, labels, target, mask, softmax, grad_intersection, grad_prediction, grad_row)


@_overlap_sums_backward_op.register_fake
def _(x, labels, target, mask, softmax, grad_intersection, grad_prediction, grad_row):
    return torch.empty_like(x)


def _overlap_sums_setup_context(ctx, inputs, output):
    x, labels, target, mask, softmax, background_row = inputs
    ctx.save_for_backward(x, labels, target, mask)
    ctx.softmax, ctx.background_row = softmax, background_row


def _overlap_sums_op_backward(ctx, grad_intersection, grad_prediction, grad_row):
    x, labels, target, mask = ctx.saved_tensors
    grad = _overlap_sums_backward_op(x, labels, target, mask, ctx.softmax, grad_intersection, grad_prediction,
                                     grad_row if ctx.background_row else None)
    return grad, None, None, None, None, None


_overlap_sums_op.register_autograd(_overlap_sums_op_backward, setup_context=_overlap_sums_setup_context)


@torch.no_grad()
def ground_truth_sums(prepared: "Prepared", num_channels: int) -> torch.Tensor:
    """``Σ_i m·y`` per (b, c), without building a one-hot map for label maps."""
    labels, mask = prepared.labels, prepared.mask
    if labels is None:
        target = prepared.given_target
        return spatial_sum(target if mask is None else target * mask)
    weights = torch.ones_like(labels, dtype=prepared.dtype) if mask is None else mask.to(prepared.dtype)
    sums = torch.zeros(labels.shape[0], num_channels, dtype=prepared.dtype, device=labels.device)
    return sums.scatter_add_(1, labels.flatten(1), weights.flatten(1))


def probability_sums(x: torch.Tensor, prepared: "Prepared", activation: str, background_row: bool = False):
    """Per (b, c): intersection ``Σ m·y·s``, prediction ``Σ m·s`` and, with ``background_row``,
    ``Σ m·y_0·s`` (else None) -- from the logits ``x``, see :class:`_OverlapSums`."""
    if background_row and activation != "softmax":
        raise ValueError("background_row: expected activation='softmax' (sigmoid regions have no background)")
    labels, target, mask = prepared.labels, prepared.given_target, prepared.mask
    if torch.compiler.is_compiling():  # opaque to the compiler; eager keeps the Function's single softmax
        intersection, prediction, row = _overlap_sums_op(x, labels, target, mask, activation == "softmax",
                                                         background_row)
        return intersection, prediction, (row if background_row else None)
    return _OverlapSums.apply(x, labels, target, mask, activation == "softmax", background_row)


def overlap_stats(x: torch.Tensor, prepared: "Prepared", activation: str, background_row: bool = False,
                  ground_truth: Optional[torch.Tensor] = None):
    """:func:`probability_sums` and the ground truth ``Σ m·y`` (no gradient): ``(I, P, G)``, or
    ``(I, P, G, R)`` with ``background_row``. ``ground_truth``: the caller's :func:`ground_truth_sums`,
    when it needed them first."""
    intersection, prediction, row = probability_sums(x, prepared, activation, background_row)
    if ground_truth is None:
        ground_truth = ground_truth_sums(prepared, x.shape[1])
    if background_row:
        return intersection, prediction, ground_truth, row
    return intersection, prediction, ground_truth

