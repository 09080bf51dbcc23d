"""Double backward (``torch.autograd.grad(..., create_graph=True)``, as a gradient penalty asks) for the
losses' custom autograd Functions (docs/validation.md, "Double backward").

The fused backwards write the gradient into buffers autograd never sees, so under ``create_graph=True``
(grad mode on inside a backward) they hand over to :func:`differentiable_gradient`, which retraces
their forward with autograd: the gradient is then a graph of its own, with exact second derivatives.
A loss whose gradient is not the derivative of its value (dynamic mime) refuses instead
(:func:`first_order_only`)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def differentiable_gradient(forward: Callable[[torch.Tensor], Sequence[Optional[torch.Tensor]]], x: torch.Tensor,
                            grads: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``Σ_k grads[k] · ∂forward(x)[k]/∂x`` as a differentiable graph (in ``x`` and ``grads``), from
    ``forward`` rerun with autograd and float32 sums (autocast off); None where nothing reaches ``x``.
    For a Function's backward when ``torch.is_grad_enabled()``, i.e. ``create_graph=True``."""
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        outputs = forward(x)
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if out is not None and grad is not None]
    if not pairs:
        return None
    (grad,) = torch.autograd.grad([out for out, _ in pairs], x, [grad for _, grad in pairs], create_graph=True,
                                  allow_unused=True)
    return grad


class _FirstOrderOnly(torch.autograd.Function):
    """The identity, whose backward refuses ``create_graph=True`` with ``ctx.refusal``."""

    @staticmethod
    def forward(ctx, value, refusal: str):
        ctx.refusal = refusal
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(ctx.refusal)
        return grad, None


def first_order_only(value: torch.Tensor, refusal: str) -> torch.Tensor:
    """``value``, whose backward raises ``RuntimeError(refusal)`` under ``create_graph=True``: for a loss
    whose gradient autograd would differentiate wrongly. Eager only: torch.compile refuses double
    backward itself."""
    if torch.compiler.is_compiling() or not value.requires_grad:
        return value
    return _FirstOrderOnly.apply(value, refusal)
