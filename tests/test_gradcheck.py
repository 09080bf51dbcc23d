"""float64 ``torch.autograd.gradcheck`` of every loss on 2x3x4x4x4 inputs (both activations where allowed,
with and without a loss mask, label-map and one-hot targets), and module == function for every loss.

The numerical Jacobian of a full gradcheck costs 2 x 384 forward passes, so the full check runs once per
loss and activation on the richest path (loss mask, label map / regions, a missing class where the loss
has label sets); the other combinations run gradcheck's fast mode (a random projection of the same
comparison, what PyTorch's own operator tests use).
"""

from __future__ import annotations

import pytest
import torch

from loss_registry import TARGET_FORMS, variants

pytestmark = pytest.mark.usefixtures("single_threaded")

# every loss's configurations (tests/loss_registry.py): (id, loss, keyword arguments chosen so that they matter)
LOSSES = [(variant.id, loss, variant.resolve()) for loss, variant in variants("gradcheck")]


def inputs(make_case, activation, form, mask, label_sets):
    """x, target and extra keyword arguments; with label sets, class 2 is missing from sample 0."""
    case = make_case((4, 4, 4), batch=2, channels=3, seed=30, mask=mask)
    extra = {}
    if label_sets:
        case.labels[0][case.labels[0] == 2] = 0
        case.one_hot[0, 0] += case.one_hot[0, 2]
        case.one_hot[0, 2] = 0
        case.regions[0, 2] = 0
        annotated = torch.ones(2, 3, dtype=torch.bool)
        annotated[0, 2] = False
        extra["annotated"] = annotated
    return case.x.detach().requires_grad_(), case.target(activation, form), case.mask, extra


def target_forms(losses):
    """(loss, options, form) rows: label map and one-hot for softmax losses, regions for sigmoid ones."""
    return [pytest.param(loss, options, form, id=f"{name}-{form}") for name, loss, options in losses
            for form in TARGET_FORMS[options.get("activation", "softmax")]]


def richest(losses):
    """One row per loss: masked, label map (softmax) / regions (sigmoid)."""
    return [pytest.param(loss, options, TARGET_FORMS[options.get("activation", "softmax")][0], id=name)
            for name, loss, options in losses]


class PotentialValueOwnGradient(torch.autograd.Function):
    """Forward: the value of the loss's ``gradient_of`` (dynamic mime: the Φ-Dice loss); backward: the loss's
    own gradient. gradcheck compares the latter with finite differences of the former, i.e. checks that
    the loss's gradient is the derivative of that other loss (dynamic mime's is the Dice loss's)."""

    @staticmethod
    def forward(ctx, x, target, loss_mask, loss, options):
        ctx.save_for_backward(x)
        ctx.target, ctx.loss_mask, ctx.loss, ctx.options = target, loss_mask, loss, options
        return loss.gradient_of(x, target, loss_mask, **options)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(ctx.loss.function(x, ctx.target, ctx.loss_mask, **ctx.options), x)
        return grad * grad_output, None, None, None, None


def check_loss(make_case, loss, options, form, mask, fast_mode):
    """gradcheck of the loss's gradient against finite differences of its value, or of the value of its
    ``gradient_of`` where its value is not the potential of its gradient (dynamic mime: its weights are
    taken without gradient)."""
    activation = options.get("activation", "softmax")
    x, target, loss_mask, extra = inputs(make_case, activation, form, mask, loss.annotated)
    options = {**extra, **options}
    if loss.gradient_of is None:
        def value(logits):
            return loss.function(logits, target, loss_mask, **options)
    else:
        def value(logits):
            return PotentialValueOwnGradient.apply(logits, target, loss_mask, loss, options)
    assert torch.autograd.gradcheck(value, (x,), fast_mode=fast_mode)


@pytest.mark.parametrize("loss, options, form", richest(LOSSES))
def test_gradcheck_full(make_case, loss, options, form):
    check_loss(make_case, loss, options, form, mask=True, fast_mode=False)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("loss, options, form", target_forms(LOSSES))
def test_gradcheck_fast(make_case, loss, options, form, mask):
    check_loss(make_case, loss, options, form, mask=mask, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# module == function
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("loss, options, form", target_forms(LOSSES))
def test_module_equals_function(make_case, loss, options, form, mask):
    activation = options.get("activation", "softmax")
    x, target, loss_mask, extra = inputs(make_case, activation, form, mask, loss.annotated)
    module = loss.module(**options)

    def value_and_gradient(loss):
        value = loss(x)
        (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    from_module = value_and_gradient(lambda logits: module(logits, target, loss_mask, **extra))
    from_function = value_and_gradient(lambda logits: loss.function(logits, target, loss_mask, **extra, **options))
    torch.testing.assert_close(from_module, from_function, rtol=0, atol=0)
    assert float(from_function[1].abs().max()) > 0
