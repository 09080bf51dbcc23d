"""The overlap sums every Dice and mime loss is a function of: per (sample, class), the intersection
``I = Σ m y s``, the prediction ``P = Σ m s``, the ground truth ``G = Σ m y`` and, for marginal Dice,
``R = Σ m y_0 s`` (the background row). One entry point, :func:`overlap_sums`, returning
:class:`OverlapSums`; behind it one fused autograd Function (:class:`OverlapSumsFunction`, eager) and
its custom-operator twin ``nnunet_losses::overlap_sums`` (:func:`overlap_sums_op`, torch.compile)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._autograd import differentiable_gradient
from ._inputs import Prepared, compute_dtype, probabilities
from ._reductions import channel_dot, spatial_sum


class OverlapSums(NamedTuple):
    """The ``(B, C)`` tables of :func:`overlap_sums`; ``ground_truth`` and ``background_row`` are None
    unless asked for."""

    intersection: torch.Tensor
    prediction: torch.Tensor
    ground_truth: Optional[torch.Tensor]
    background_row: Optional[torch.Tensor]


def overlap_sums(x: torch.Tensor, prepared: Prepared, activation: str, *, ground_truth: bool = False,
                 background_row: bool = False) -> OverlapSums:
    """Per (b, c): the intersection ``Σ m·y·s`` and the prediction ``Σ m·s`` from the logits ``x`` (with
    gradient), and when asked the ground truth ``Σ m·y`` (:func:`overlap_sums_ground_truth`, no
    gradient) and the background row ``Σ m·y_0·s`` (softmax only). See :class:`OverlapSumsFunction`."""
    if background_row and activation != "softmax":
        raise ValueError("background_row: expected activation='softmax' (sigmoid regions have no background)")
    labels, target, mask = prepared.labels, prepared.target, prepared.mask
    softmax = activation == "softmax"
    if torch.compiler.is_compiling():  # opaque to the compiler; eager keeps the Function's single softmax
        intersection, prediction, row = overlap_sums_op(x, labels, target, mask, softmax, background_row)
        row = row if background_row else None
    else:
        intersection, prediction, row = OverlapSumsFunction.apply(x, labels, target, mask, softmax, background_row)
    truth = overlap_sums_ground_truth(prepared, x.shape[1]) if ground_truth else None
    return OverlapSums(intersection, prediction, truth, row)


@torch.no_grad()
def overlap_sums_ground_truth(prepared: Prepared, num_channels: int) -> torch.Tensor:
    """``G = Σ_i m·y`` per (b, c), alone (no logits needed), without building a one-hot map for label
    maps: for losses that need it before (or instead of) the probability sums."""
    labels, mask = prepared.labels, prepared.mask
    if labels is None:
        target = prepared.target
        return spatial_sum(target if mask is None else target * mask)
    # without a mask every voxel counts 1: an expanded scalar, not a filled label-sized tensor
    weights = torch.ones((), dtype=prepared.dtype, device=labels.device).expand(labels.shape) if mask is None \
        else mask.to(prepared.dtype)
    sums = torch.zeros(labels.shape[0], num_channels, dtype=prepared.dtype, device=labels.device)
    return sums.scatter_add_(1, labels.flatten(1), weights.flatten(1))


def _overlap_sums_forward(x, labels, target, mask, softmax: bool, background_row: bool):
    """The forward of :class:`OverlapSumsFunction`: ``(I, P, R or None, probabilities (B, C, N), s at the
    label (B, N) or None, [y = 0] (B, N) or None)``; the last two are what the backward would compute
    again, returned for a label map without a mask (with one they are weighted in place)."""
    dtype = compute_dtype(x)
    probs = probabilities(x, "softmax" if softmax else "sigmoid", dtype).flatten(2)  # (B, C, N)
    weights = None if mask is None else mask.flatten(1).to(dtype)  # (B, N)
    prediction = probs.sum(-1) if weights is None else torch.einsum("bcn,bn->bc", probs, weights)
    row = at_label = on_background = None
    if labels is not None:
        flat_labels = labels.flatten(1)
        at_label = probs.gather(1, flat_labels.unsqueeze(1)).squeeze(1)
        intersection = torch.zeros_like(prediction).scatter_add_(
            1, flat_labels, at_label if weights is None else at_label.mul_(weights))
        at_label = at_label if weights is None else None
        if background_row:
            on_background = _background_weights(flat_labels, weights, dtype)
            row = torch.einsum("bcn,bn->bc", probs, on_background)
            on_background = on_background if weights is None else None
    else:
        flat_target = target.flatten(2).to(dtype)
        overlap = probs * flat_target
        intersection = overlap.sum(-1) if weights is None else torch.einsum("bcn,bn->bc", overlap, weights)
        del overlap
        if background_row:
            background = flat_target[:, 0] if weights is None else flat_target[:, 0] * weights
            row = torch.einsum("bcn,bn->bc", probs, background)
    return intersection, prediction, row, probs, at_label, on_background


def _overlap_sums_backward(probs, x, labels, target, mask, softmax: bool, grad_intersection, grad_prediction,
                           grad_row, at_label=None, on_background=None):
    """The gradient of :class:`OverlapSumsFunction` with respect to ``x``, written into ``probs`` (the
    forward's probabilities, overwritten) or, when ``probs`` is None, into freshly computed ones;
    ``at_label``, ``on_background``: the forward's ``s`` at the label, consumed too, and its ``[y = 0]``
    (only with ``probs``)."""
    dtype = compute_dtype(x)
    if probs is None:
        probs = probabilities(x, "softmax" if softmax else "sigmoid", dtype).flatten(2)  # (B, C, N)
        at_label = on_background = None
    zeros = probs.new_zeros(probs.shape[:2])
    g_int = zeros if grad_intersection is None else grad_intersection.to(dtype)  # (B, C)
    g_pred = zeros if grad_prediction is None else grad_prediction.to(dtype)
    g_row = None if grad_row is None else grad_row.to(dtype)
    if labels is not None:  # softmax only: sigmoid always has a region target
        grad = _gradient_at_labels(probs, labels.flatten(1), g_int, g_pred, g_row, at_label, on_background)
    else:
        grad = _gradient_at_target(probs, target.flatten(2).to(dtype), g_int, g_pred, g_row, softmax)
    if mask is not None:
        grad.mul_(mask.flatten(1).to(dtype).unsqueeze(1))  # the weights m, (B, 1, N)
    return grad.view(x.shape).to(x.dtype)


def _gradient_at_labels(probs, flat_labels, g_int, g_pred, g_row, at_label=None, on_background=None):
    """The unmasked softmax gradient for a label map ``(B, N)``, written into ``probs``:
    ∂/∂x_c = s_c (g^P_c + g^R_c y_0 - Σ_k g_k s_k) + [c = l] s_l g^I_l, channel by channel; besides
    the probabilities, only (B, N) tensors are allocated. ``at_label`` (``s_l``, overwritten) and
    ``on_background`` (``[l = 0]``): the forward's, else computed here."""
    if at_label is None:
        at_label = probs.gather(1, flat_labels.unsqueeze(1)).squeeze(1)
    # one host read decides: the same weight for every class of a sample (the mime with scalar a, b),
    # and which channels have a background-row weight (marginal Dice: the merged ones only)
    checks = [(g_int == g_int[:, :1]).all().view(1), (g_pred == g_pred[:, :1]).all().view(1)]
    if g_row is not None:
        checks.append((g_row != 0).any(0))
    same_int, same_pred, *row_used = (bool(v) for v in torch.cat(checks).tolist())
    row_channels = [channel for channel, used in enumerate(row_used) if used]
    at_label.mul_(g_int[:, :1] if same_int else g_int.gather(1, flat_labels))  # s_l g^I_l
    if same_pred and not row_channels:
        # Σ_k g^P_k s_k = g^P (the probabilities sum to 1): every channel's factor is -s_l g^I_l
        probs.mul_(at_label.neg().unsqueeze(1))
    else:
        # channel by channel: an einsum over the C axis is a strided bmm, 3x slower on the CPU
        mean = channel_dot(probs, g_pred.unsqueeze(-1)).squeeze(1).add_(at_label)  # Σ_k g_k s_k
        if row_channels:
            if on_background is None:
                on_background = _background_weights(flat_labels, None, probs.dtype)
            mean.addcmul_(on_background, channel_dot(probs, g_row.unsqueeze(-1), row_channels).squeeze(1))
        factor = torch.empty_like(mean)  # one buffer for every channel
        row_set = set(row_channels)
        for channel in range(probs.shape[1]):
            torch.sub(g_pred[:, channel:channel + 1], mean, out=factor)
            if channel in row_set:
                factor.addcmul_(on_background, g_row[:, channel:channel + 1])
            probs[:, channel].mul_(factor)
        del mean, factor, on_background
    return probs.scatter_add_(1, flat_labels.unsqueeze(1), at_label.unsqueeze(1))


def _gradient_at_target(probs, flat_target, g_int, g_pred, g_row, softmax: bool):
    """The unmasked gradient for a one-hot / region target ``(B, C, N)``, written into ``probs``;
    g itself is the one other logits-sized tensor."""
    g = (flat_target * g_int.unsqueeze(-1)).add_(g_pred.unsqueeze(-1))
    if g_row is not None:
        g.addcmul_(flat_target[:, :1], g_row.unsqueeze(-1))
    if softmax:
        mean = torch.zeros_like(g[:, 0])  # Σ_k g_k s_k, (B, N)
        for channel in range(probs.shape[1]):
            mean.addcmul_(g[:, channel], probs[:, channel])
        return probs.mul_(g.sub_(mean.unsqueeze(1)))
    g.mul_(probs)
    return probs.neg_().add_(1).mul_(g)  # g s (1 - s)


class OverlapSumsFunction(torch.autograd.Function):
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
    backward, and the softmax runs once (with a label map and no mask the forward's gather ``s_l``,
    1/C of that, is handed over too: the backward's first gather; and for the background row its
    ``[y = 0]`` weights, another 1/C). A second backward through the same graph
    (``retain_graph=True``) finds them consumed and recomputes them from the saved logits. Under
    ``create_graph=True`` the backward differentiates the forward retraced with autograd instead
    (:func:`~._autograd.differentiable_gradient`), so double backward has exact second derivatives.
    Under ``torch.compile`` the custom operator ``nnunet_losses::overlap_sums`` runs instead (see
    :func:`overlap_sums`).
    """

    @staticmethod
    def forward(ctx, x, labels, target, mask, softmax: bool, background_row: bool):
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):  # sums stay float32 under autocast
            intersection, prediction, row, probs, at_label, on_background = _overlap_sums_forward(
                x, labels, target, mask, softmax, background_row)
        ctx.save_for_backward(x, labels, target, mask)
        ctx.softmax = softmax
        # not saved with save_for_backward: the backward overwrites them (see the class docstring)
        ctx.probs = probs if ctx.needs_input_grad[0] else None
        ctx.at_label = at_label if ctx.needs_input_grad[0] else None
        ctx.on_background = on_background if ctx.needs_input_grad[0] else None
        return intersection, prediction, row

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction, grad_row):
        x, labels, target, mask = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None  # consumed: a second backward recomputes them
        at_label, ctx.at_label = ctx.at_label, None
        on_background, ctx.on_background = ctx.on_background, None
        if torch.is_grad_enabled():  # create_graph=True: a gradient with second derivatives
            grad = differentiable_gradient(
                lambda x: _overlap_sums_forward(x, labels, target, mask, ctx.softmax, grad_row is not None)[:3],
                x, (grad_intersection, grad_prediction, grad_row))
            return grad, None, None, None, None, None
        with torch.autocast(x.device.type, enabled=False):
            grad = _overlap_sums_backward(probs, x, labels, target, mask, ctx.softmax, grad_intersection,
                                          grad_prediction, grad_row, at_label, on_background)
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
def overlap_sums_op(x: torch.Tensor, labels: Optional[torch.Tensor], target: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor], softmax: bool,
                    background_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        intersection, prediction, row = _overlap_sums_forward(x, labels, target, mask, softmax, background_row)[:3]
    return intersection, prediction, (torch.zeros_like(prediction) if row is None else row)


@overlap_sums_op.register_fake
def _(x, labels, target, mask, softmax, background_row):
    table = x.new_empty(x.shape[:2], dtype=compute_dtype(x))
    return table, torch.empty_like(table), torch.empty_like(table)


@torch.library.custom_op("nnunet_losses::overlap_sums_backward", mutates_args=())
def overlap_sums_backward_op(x: torch.Tensor, labels: Optional[torch.Tensor], target: Optional[torch.Tensor],
                             mask: Optional[torch.Tensor], softmax: bool, grad_intersection: Optional[torch.Tensor],
                             grad_prediction: Optional[torch.Tensor],
                             grad_row: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return _overlap_sums_backward(None, x, labels, target, mask, softmax, grad_intersection, grad_prediction,
                                      grad_row)


@overlap_sums_backward_op.register_fake
def _(x, labels, target, mask, softmax, grad_intersection, grad_prediction, grad_row):
    return torch.empty_like(x)


def _overlap_sums_setup_context(ctx, inputs, output):
    x, labels, target, mask, softmax, background_row = inputs
    ctx.save_for_backward(x, labels, target, mask)
    ctx.softmax, ctx.background_row = softmax, background_row


def _overlap_sums_op_backward(ctx, grad_intersection, grad_prediction, grad_row):
    x, labels, target, mask = ctx.saved_tensors
    grad = overlap_sums_backward_op(x, labels, target, mask, ctx.softmax, grad_intersection, grad_prediction,
                                    grad_row if ctx.background_row else None)
    return grad, None, None, None, None, None


overlap_sums_op.register_autograd(_overlap_sums_op_backward, setup_context=_overlap_sums_setup_context)
