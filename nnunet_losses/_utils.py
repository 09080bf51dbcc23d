"""Shared plumbing of every loss: input checks, targets, masks, probabilities, sums and reductions.

Every loss goes through the same few functions so that conventions (label maps vs one-hot targets,
masks, float32 sums, DDP batch reductions) are decided in exactly one place.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

ACTIVATIONS = ("softmax", "sigmoid")
PHIS = ("I", "CI", "BI", "BCI")

ClassValues = Union[float, Sequence[float], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# argument checks (called once, in __init__ or at the top of a pure function)
# ----------------------------------------------------------------------------------------------
def check_option(name: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; raise a ValueError with a suggestion if not."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {list(allowed)}, got {type(value).__name__} {value!r}")
    if value not in allowed:
        # a case slip ("L1", "bi") is the commonest typo and difflib scores it too low to suggest
        close = [a for a in allowed if a.lower() == value.lower()] or difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}{hint}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def check_ignore_label(value: object) -> Optional[int]:
    """nnU-Net's ignore label: None or an integer label value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints (from plans) are fine
        raise TypeError(f"ignore_label: expected None or an int label value, got {type(value).__name__} {value!r}")
    return int(value)


def check_optional_bool(name: str, value: object) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name}: expected None or a bool, got {type(value).__name__} {value!r}")
    return value


def check_scalar(name: str, value: object, *, positive: bool = False) -> float:
    """A finite non-negative (or strictly positive) Python number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = not (value == value and abs(value) != float("inf")) or value < 0 or (positive and value == 0)
    if bad:
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name}: expected {need}, got {value!r}")
    return value


def class_values(name: str, value: ClassValues) -> torch.Tensor:
    """A scalar or one value per class, as a float64 tensor of shape () or (C,); all values >= 0."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{name}: expected a real tensor, got dtype {value.dtype}")
        tensor = value.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        tensor = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name}: expected a number or a sequence of numbers, got {value!r}")
        tensor = torch.tensor([float(v) for v in value], dtype=torch.float64)
    else:
        raise TypeError(f"{name}: expected a number, a sequence of numbers or a tensor, got {type(value).__name__}")
    if tensor.ndim > 1 or (tensor.ndim == 1 and tensor.numel() == 0):
        raise ValueError(f"{name}: expected a scalar or one value per class (shape (C,)), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise ValueError(f"{name}: expected finite values >= 0, got {tensor.tolist()}")
    return tensor


def per_class(name: str, values: torch.Tensor, num_channels: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a () or (C,) buffer to (C,) in ``like``'s dtype/device, checking C."""
    if values.ndim == 1 and values.numel() != num_channels:
        raise ValueError(
            f"{name}: expected one value per channel of x ({num_channels}), got {values.numel()} values"
        )
    return values.to(device=like.device, dtype=like.dtype).expand(num_channels)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
class Prepared:
    """What every loss needs from ``(x, y, loss_mask)``.

    ``labels`` is the integer label map ``(B, 1, *spatial)`` when one was given (masked voxels set to
    0), else None; ``mask`` is None or a float ``(B, 1, *spatial)`` tensor; ``target`` is the float
    one-hot / region tensor shaped like ``x``: given by the caller, or built from ``labels`` (under
    ``no_grad``) only when a loss asks for it -- the overlap sums never need it.
    """

    def __init__(self, labels, given_target, mask, dtype, shape, device):
        self.labels = labels
        self.mask = mask
        self.dtype = dtype
        self._target = given_target
        self._shape = shape
        self._device = device

    @property
    def target(self) -> torch.Tensor:
        if self._target is None:
            with torch.no_grad():
                self._target = torch.zeros(self._shape, device=self._device, dtype=self.dtype)
                self._target.scatter_(1, self.labels, 1)
        return self._target

    @property
    def given_target(self) -> Optional[torch.Tensor]:
        """The caller's one-hot/region target (None for a label map)."""
        return None if self.labels is not None else self._target


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits (sums are always taken in float32), float64 stays."""
    return torch.promote_types(x.dtype, torch.float32)


def check_logits(x: object, activation: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of logits, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected floating-point logits, got dtype {x.dtype}")
    if x.ndim not in (4, 5):
        raise ValueError(f"x: expected logits of shape (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if activation == "softmax" and x.shape[1] < 2:
        raise ValueError(
            f"x: expected at least 2 channels for activation='softmax' (background + classes), got {x.shape[1]}; "
            "use activation='sigmoid' for a single foreground channel"
        )
    return x


def _with_channel_dim(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # nnU-Net also accepts (B, *spatial) label maps and masks
    return t.unsqueeze(1) if t.ndim == x.ndim - 1 else t


def prepare(
    x: torch.Tensor,
    y: object,
    loss_mask: object = None,
    activation: str = "softmax",
    ignore_label: Optional[int] = None,
) -> Prepared:
    """Check ``x``, ``y`` and ``loss_mask`` and turn ``y`` into a float one-hot / region target.

    * softmax: ``y`` is a ``(B, 1, *spatial)`` label map with values in ``[0, C-1]`` (or
      ``ignore_label``), or a ``(B, C, *spatial)`` one-hot target.
    * sigmoid: ``y`` is a ``(B, C, *spatial)`` region target (0/1 per channel).

    Float label maps (nnU-Net's dataloader may deliver them) are rounded to the nearest integer;
    ``loss_mask`` values other than 0/1 act as per-voxel weights (not checked: that would cost a sync).
    """
    check_logits(x, activation)
    ignore_label = check_ignore_label(ignore_label)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a torch.Tensor target, got {type(y).__name__}")
    if y.is_complex():
        raise TypeError(f"y: expected a real-valued target, got dtype {y.dtype}")
    received = tuple(y.shape)  # errors name the shape the caller passed, not the one with a channel axis added
    y = _with_channel_dim(y, x)
    num_channels = x.shape[1]
    if y.ndim != x.ndim or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"y: expected a target of shape {(x.shape[0], 1, *x.shape[2:])} (label map) or {tuple(x.shape)} "
            f"(one-hot/regions) for x of shape {tuple(x.shape)}, got shape {received}"
        )
    is_label_map = y.shape[1] == 1 and not (activation == "sigmoid" and num_channels == 1)
    if not is_label_map and y.shape[1] != num_channels:
        raise ValueError(
            f"y: expected {num_channels} channels (one-hot/regions) or 1 channel (label map), got {y.shape[1]}"
        )
    if activation == "sigmoid" and is_label_map:
        raise ValueError(
            f"y: expected a (B, {num_channels}, ...) region target for activation='sigmoid' (every channel is a "
            f"region, as nnU-Net's region datasets), got a label map of shape {received}"
        )

    mask = None
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor):
            raise TypeError(f"loss_mask: expected a torch.Tensor or None, got {type(loss_mask).__name__}")
        received = tuple(loss_mask.shape)
        loss_mask = _with_channel_dim(loss_mask, x)
        if loss_mask.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(
                f"loss_mask: expected shape {(x.shape[0], 1, *x.shape[2:])} (1 = voxel counts), "
                f"got shape {received}"
            )
        mask = loss_mask

    dtype = compute_dtype(x)
    with torch.no_grad():
        labels = None
        if is_label_map:
            labels = y if not y.is_floating_point() else y.round()
            labels = labels.long()
            if ignore_label is not None:
                keep = labels != ignore_label
                mask = keep if mask is None else (mask.bool() & keep)
            if mask is not None:
                labels = torch.where(mask.bool(), labels, 0)
            # out-of-range labels would corrupt scatter/gather: check them, except inside torch.compile,
            # where the host sync would break the graph (nnU-Net compiles the loss on CUDA)
            if labels.numel() and not torch.compiler.is_compiling():
                lo, hi = torch.aminmax(labels)
                lo, hi = int(lo), int(hi)  # one host sync; out-of-range labels would corrupt scatter_
                if lo < 0 or hi >= num_channels:
                    raise ValueError(
                        f"y: expected labels in [0, {num_channels - 1}] for x with {num_channels} channels"
                        + (f" (or the ignore label {ignore_label})" if ignore_label is not None else "")
                        + f", got values in [{lo}, {hi}]"
                    )
            target = None
        else:
            if ignore_label is not None:
                raise ValueError(
                    "ignore_label: expected a (B, 1, ...) label map target to find the ignore label in, got a "
                    f"one-hot/region target of shape {tuple(y.shape)}; pass loss_mask instead"
                )
            target = y.to(dtype)
        if mask is not None:
            mask = mask.to(dtype)
    return Prepared(labels, target, mask, dtype, x.shape, x.device)


def probabilities(x: torch.Tensor, activation: str, dtype: torch.dtype) -> torch.Tensor:
    """softmax over channels or sigmoid per channel, in float32 (float64 stays float64)."""
    if activation == "softmax":
        return torch.softmax(x, 1, dtype=dtype)  # converts on the fly: no float32 copy of half logits
    return torch.sigmoid(x) if x.dtype == dtype else x.to(dtype).sigmoid_()


def check_annotated(annotated: object, batch: int, num_channels: int, device: torch.device) -> Optional[torch.Tensor]:
    """``annotated``: None or a ``(B, C)`` boolean tensor (True = class c annotated in sample b)."""
    if annotated is None:
        return None
    if not isinstance(annotated, torch.Tensor):
        raise TypeError(f"annotated: expected a (B, C) bool tensor or None, got {type(annotated).__name__}")
    if annotated.dtype != torch.bool:
        raise TypeError(f"annotated: expected a (B, C) tensor of dtype torch.bool, got dtype {annotated.dtype}")
    if annotated.shape != (batch, num_channels):
        raise ValueError(
            f"annotated: expected shape ({batch}, {num_channels}) (samples x channels of x), "
            f"got shape {tuple(annotated.shape)}"
        )
    return annotated.to(device)


# ----------------------------------------------------------------------------------------------
# sums and reductions
# ----------------------------------------------------------------------------------------------
def spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every spatial axis, leaving ``(B, C)``."""
    return t.sum(dim=tuple(range(2, t.ndim)), dtype=torch.float32 if t.dtype != torch.float64 else None)


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


def label_counts(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample voxel count of each class of a ``(B, 1, *spatial)`` label map: ``(B, num_classes)``."""
    flat = label_map.reshape(label_map.shape[0], -1).long()
    counts = torch.zeros(flat.shape[0], num_classes, dtype=torch.float64, device=flat.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
