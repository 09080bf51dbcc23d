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

from nnunet_losses import (
    DynamicMimeLoss,
    LabelMarginalLoss,
    LeafDiceLoss,
    MarginalDiceLoss,
    MimeLoss,
    NegativeMimeLoss,
    PhiDiceLoss,
    dynamic_mime_loss,
    label_marginal_loss,
    leaf_dice_loss,
    marginal_dice_loss,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

PHIS = ("I", "CI", "BI", "BCI")
# (id, pure function, module class, keyword arguments chosen so that they matter)
LOSSES = [
    ("mime", mime_loss, MimeLoss, dict(a=(0.5, 1.5, 3.0), b=(0.2, 0.05, 0.4))),
    ("mime-sigmoid", mime_loss, MimeLoss, dict(a=(0.5, 1.5, 3.0), activation="sigmoid")),
    ("negative_mime", negative_mime_loss, NegativeMimeLoss, dict(include_background=False)),
    *[(f"phi_dice-{phi}", phi_dice_loss, PhiDiceLoss, dict(phi=phi, epsilon=0.3)) for phi in PHIS],
    *[(f"phi_dice-{phi}-sigmoid", phi_dice_loss, PhiDiceLoss, dict(phi=phi, epsilon=0.3, activation="sigmoid"))
      for phi in PHIS],
    ("marginal_dice", marginal_dice_loss, MarginalDiceLoss, dict(epsilon=0.3)),
    ("leaf_dice", leaf_dice_loss, LeafDiceLoss, dict(epsilon=0.3, include_background=True)),
    ("leaf_dice-sigmoid", leaf_dice_loss, LeafDiceLoss, dict(epsilon=0.3, activation="sigmoid")),
    *[(f"label_marginal-{penalty}{suffix}", label_marginal_loss, LabelMarginalLoss,
       dict(penalty=penalty, tau=2.0, **extra))
      for penalty in ("l1", "kl", "dice_bias")
      for suffix, extra in (("", {}), ("-sigmoid", dict(activation="sigmoid")))],
]
# dynamic mime's value is not the potential of its gradient (its weights are taken without gradient):
# gradcheck compares its gradient with finite differences of the Dice loss value instead
DYNAMIC_MIME = [
    *[(f"dynamic_mime-{phi}", dynamic_mime_loss, DynamicMimeLoss, dict(phi=phi, epsilon=0.3)) for phi in PHIS],
    *[(f"dynamic_mime-{phi}-sigmoid", dynamic_mime_loss, DynamicMimeLoss,
       dict(phi=phi, epsilon=0.3, activation="sigmoid")) for phi in PHIS],
]
LABEL_SET_LOSSES = (marginal_dice_loss, leaf_dice_loss)


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
    """(id, ..., form) rows: label map and one-hot for softmax losses, regions for sigmoid ones."""
    rows = []
    for row in losses:
        options = row[-1]
        forms = ("regions",) if options.get("activation") == "sigmoid" else ("labels", "one_hot")
        rows += [pytest.param(*row[1:], form, id=f"{row[0]}-{form}") for form in forms]
    return rows


def richest(losses):
    """One row per loss: masked, label map (softmax) / regions (sigmoid)."""
    return [pytest.param(*row[1:], "regions" if row[-1].get("activation") == "sigmoid" else "labels", id=row[0])
            for row in losses]


def check_loss(make_case, function, options, form, mask, fast_mode):
    activation = options.get("activation", "softmax")
    x, target, loss_mask, extra = inputs(make_case, activation, form, mask, function in LABEL_SET_LOSSES)
    assert torch.autograd.gradcheck(lambda logits: function(logits, target, loss_mask, **extra, **options), (x,),
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("function, module_class, options, form", richest(LOSSES))
def test_gradcheck_full(make_case, function, module_class, options, form):
    check_loss(make_case, function, options, form, mask=True, fast_mode=False)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("function, module_class, options, form", target_forms(LOSSES))
def test_gradcheck_fast(make_case, function, module_class, options, form, mask):
    check_loss(make_case, function, options, form, mask=mask, fast_mode=True)


class DiceValueDynamicMimeGradient(torch.autograd.Function):
    """Forward: the Φ-Dice loss value; backward: dynamic mime's gradient. gradcheck compares the latter with
    finite differences of the former, i.e. checks that dynamic mime's gradient is the Dice loss's derivative."""

    @staticmethod
    def forward(ctx, x, target, loss_mask, options):
        ctx.save_for_backward(x)
        ctx.target, ctx.loss_mask, ctx.options = target, loss_mask, options
        return phi_dice_loss(x, target, loss_mask, **options)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(dynamic_mime_loss(x, ctx.target, ctx.loss_mask, **ctx.options), x)
        return grad * grad_output, None, None, None


def check_dynamic_mime(make_case, options, form, mask, fast_mode):
    x, target, loss_mask, _ = inputs(make_case, options.get("activation", "softmax"), form, mask, False)
    assert torch.autograd.gradcheck(lambda logits: DiceValueDynamicMimeGradient.apply(logits, target, loss_mask,
                                                                                      options), (x,),
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("function, module_class, options, form", richest(DYNAMIC_MIME))
def test_gradcheck_full_dynamic_mime(make_case, function, module_class, options, form):
    check_dynamic_mime(make_case, options, form, mask=True, fast_mode=False)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("function, module_class, options, form", target_forms(DYNAMIC_MIME))
def test_gradcheck_fast_dynamic_mime(make_case, function, module_class, options, form, mask):
    check_dynamic_mime(make_case, options, form, mask=mask, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# module == function
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("function, module_class, options, form", target_forms(LOSSES + DYNAMIC_MIME))
def test_module_equals_function(make_case, function, module_class, options, form, mask):
    activation = options.get("activation", "softmax")
    x, target, loss_mask, extra = inputs(make_case, activation, form, mask,
                                         module_class in (MarginalDiceLoss, LeafDiceLoss))
    module = module_class(**options)

    def value_and_gradient(loss):
        value = loss(x)
        (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    from_module = value_and_gradient(lambda logits: module(logits, target, loss_mask, **extra))
    from_function = value_and_gradient(lambda logits: function(logits, target, loss_mask, **extra, **options))
    torch.testing.assert_close(from_module, from_function, rtol=0, atol=0)
    assert float(from_function[1].abs().max()) > 0
