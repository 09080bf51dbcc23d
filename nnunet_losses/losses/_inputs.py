"""The inputs of every loss: ``(x, y, loss_mask)`` checked and prepared once per call (label map or
one-hot / region target, ignore label, mask, float32 compute dtype), and the probabilities."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ._options import check_ignore_label


class Prepared(NamedTuple):
    """What every loss needs from ``(x, y, loss_mask)``, checked (see :func:`prepare`).

    Exactly one of ``labels`` and ``target`` is set: ``labels`` the integer label map
    ``(B, 1, *spatial)`` when one was given (masked voxels set to 0), ``target`` the caller's float
    one-hot / region target shaped like ``x`` otherwise; no one-hot map is ever built from a label
    map (the overlap sums gather and scatter instead). ``mask`` is None or a float
    ``(B, 1, *spatial)`` tensor (the ignore label folded in), ``dtype`` the compute dtype.
    """

    labels: Optional[torch.Tensor]
    target: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    dtype: torch.dtype


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
    if x.numel() == 0:  # an empty batch, channel axis or patch has no loss to define (docs/validation.md)
        raise ValueError(f"x: expected at least one sample, channel and voxel, got shape {tuple(x.shape)}")
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
    """Check ``x``, ``y`` and ``loss_mask`` once per call, and prepare them for the sums.

    * softmax: ``y`` is a ``(B, 1, *spatial)`` label map with values in ``[0, C-1]`` (or
      ``ignore_label``), or a ``(B, C, *spatial)`` one-hot target.
    * sigmoid: ``y`` is a ``(B, C, *spatial)`` region target (0/1 per channel).

    Float label maps (nnU-Net's dataloader may deliver them) are rounded to the nearest integer;
    ``loss_mask`` values other than 0/1 act as per-voxel weights. The values are checked as
    docs/validation.md says (:func:`check_values`): labels in ``[0, C-1]``, one-hot / region values in
    ``[0, 1]``, mask weights finite and ``>= 0``.
    """
    check_logits(x, activation)
    ignore_label = check_ignore_label(ignore_label)
    y, is_label_map = _checked_target(x, y, activation)
    mask = _checked_mask(x, loss_mask)
    dtype = compute_dtype(x)
    with torch.no_grad():
        labels = target = None
        if is_label_map:
            labels, mask = _prepared_labels(y, mask, ignore_label, x.shape[1])
        else:
            if ignore_label is not None:
                raise ValueError(
                    "ignore_label: expected a (B, 1, ...) label map target to find the ignore label in, got a "
                    f"one-hot/region target of shape {tuple(y.shape)}; pass loss_mask instead"
                )
            target = y.to(dtype)
            # masked voxels included: 0 · NaN would still be NaN
            check_range(target, "y: expected one-hot/region values in [0, 1]", lambda lo, hi: (lo >= 0) & (hi <= 1))
        if mask is not None:
            mask = mask.to(dtype)
    return Prepared(labels, target, mask, dtype)


def _checked_target(x: torch.Tensor, y: object, activation: str) -> Tuple[torch.Tensor, bool]:
    """``y`` with its channel axis, and whether it is a label map (else one-hot / regions)."""
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
    return y, is_label_map


def _checked_mask(x: torch.Tensor, loss_mask: object) -> Optional[torch.Tensor]:
    """``loss_mask`` with its channel axis (None stays None), shape checked against ``x``."""
    if loss_mask is None:
        return None
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask: expected a torch.Tensor or None, got {type(loss_mask).__name__}")
    if loss_mask.is_complex():
        raise TypeError(f"loss_mask: expected a real-valued tensor, got dtype {loss_mask.dtype}")
    received = tuple(loss_mask.shape)
    loss_mask = _with_channel_dim(loss_mask, x)
    if loss_mask.shape != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(
            f"loss_mask: expected shape {(x.shape[0], 1, *x.shape[2:])} (1 = voxel counts), "
            f"got shape {received}"
        )
    # a negative weight can make the Dice denominators cross zero
    check_range(loss_mask, "loss_mask: expected finite weights >= 0 (1 = voxel counts)",
                lambda lo, hi: (lo >= 0) & (hi < float("inf")))
    return loss_mask


def _prepared_labels(y: torch.Tensor, mask: Optional[torch.Tensor], ignore_label: Optional[int],
                     num_channels: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The integer label map (masked voxels set to 0, range checked) and the mask with the ignore
    label folded in. Runs under ``no_grad``."""
    labels = y if _keeps_label_dtype(y, ignore_label) else (y.round() if y.is_floating_point() else y).long()
    if ignore_label is not None:
        keep = labels != ignore_label
        mask = keep if mask is None else mask * keep  # weights other than 0/1 stay weights
    if mask is not None:
        labels = torch.where(mask.bool(), labels, 0)
    if not torch.compiler.is_compiling():  # out-of-range labels would corrupt scatter_ and gather
        lo, hi = torch.aminmax(labels)
        expected = (f"y: expected labels in [0, {num_channels - 1}] for x with {num_channels} channels"
                    + (f" (or the ignore label {ignore_label})" if ignore_label is not None else ""))
        check_values((lo >= 0) & (hi < num_channels), expected, lambda: f", got values in [{int(lo)}, {int(hi)}]")
    return labels.long(), mask


def _keeps_label_dtype(y: torch.Tensor, ignore_label: Optional[int]) -> bool:
    """Whether the label map can be masked and range-checked in its own integer dtype before the one
    conversion to int64 (the same values: an int16 map is 1/4 of the bytes to read, so its aminmax
    runs about 10x faster than over the int64 copy). Not for floats (rounded first), nor for an
    ignore label that the dtype cannot hold (the comparison would wrap)."""
    if y.is_floating_point() or y.dtype == torch.bool:
        return False
    info = torch.iinfo(y.dtype)
    return ignore_label is None or info.min <= ignore_label <= info.max


def check_values(ok: torch.Tensor, expected: str, received: Callable[[], str]) -> None:
    """A check of tensor values that only a host read could decide (docs/validation.md): ``ok`` is a
    bool scalar tensor, ``expected`` the message's ``name: expected …``. On the CPU, eager: a
    ValueError ``expected + received()`` (``received`` formats what was found, read only on failure).
    Elsewhere (CUDA) and inside torch.compile, ``torch._assert_async(ok, expected)``: no host sync, the
    failure surfaces at the device's next synchronisation. Callers skip value checks inside
    torch.compile where docs/validation.md says so."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(expected + received())
    else:
        torch._assert_async(ok, expected)


def received_range(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> str:
    """``", got values in [low, high]"`` (or ``", got NaN values"``) for a failed range check."""
    if bool(torch.isnan(values).any()):
        return ", got NaN values"
    return f", got values in [{float(low):g}, {float(high):g}]"


def check_range(values: torch.Tensor, expected: str, within: Callable) -> None:
    """:func:`check_values` of ``within(min, max)`` (a bool tensor) over every element of ``values``,
    naming the range found; bool tensors are in range by type, and nothing is read inside torch.compile."""
    if values.dtype == torch.bool or torch.compiler.is_compiling():
        return
    # axes in memory order: a permuted tensor (one_hot(...).movedim(-1, 1)) reduces as fast as a contiguous one
    in_memory_order = values.detach().permute(sorted(range(values.ndim), key=lambda axis: -values.stride(axis)))
    lo, hi = torch.aminmax(in_memory_order)
    check_values(within(lo, hi), expected, lambda: received_range(values, lo, hi))


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


def label_counts(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample voxel count of each class of a ``(B, 1, *spatial)`` label map: ``(B, num_classes)``."""
    flat = label_map.reshape(label_map.shape[0], -1).long()
    counts = torch.zeros(flat.shape[0], num_classes, dtype=torch.float64, device=flat.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
