"""The fused cross-entropy + sharpened-probability Function of LabelMarginalLoss against plain autograd.

The reference below is the textbook pipeline (``F.cross_entropy`` / BCE with logits plus
``softmax(τ x)`` / ``sigmoid(τ x)`` sums, differentiated by autograd), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nnunet_losses.losses.label_marginal as label_marginal
from loss_registry import TARGET_FORMS
from nnunet_losses import label_marginal_loss
from nnunet_losses.losses._inputs import prepare
from nnunet_losses.losses.label_marginal import _CrossEntropyAndMarginals

TOLERANCE = dict(rtol=1e-10, atol=1e-12)
SHAPE = (3, 4, 5, 6, 7)  # B, C, D, H, W


def make_inputs(kind: str, masked: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = SHAPE
    x = 3 * torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, channels, (batch, 1, *spatial), generator=generator)
    if kind == "labels":
        y = labels
    elif kind == "one_hot":
        y = torch.zeros(SHAPE, dtype=torch.float64).scatter_(1, labels, 1)
    else:  # regions
        y = (torch.rand(SHAPE, generator=generator) < 0.4).to(torch.float64)
    mask = None
    if masked:
        mask = (torch.rand(batch, 1, *spatial, generator=generator) < 0.6).to(torch.float64)
        mask[1] = 0  # an image without a counted voxel
    return x, y, mask


def reference_sums(x, y, mask, tau, activation):
    """(Σ m CE, Σ_i m q_{b,c,i}) by plain autograd; sigmoid CE summed over regions."""
    weights = torch.ones_like(x[:, :1]) if mask is None else mask
    if activation == "softmax":
        if y.shape[1] == 1:
            voxel_ce = F.cross_entropy(x, y[:, 0], reduction="none").unsqueeze(1)
        else:
            voxel_ce = F.cross_entropy(x, y, reduction="none").unsqueeze(1)
        sharpened = torch.softmax(tau * x, 1)
    else:
        voxel_ce = F.binary_cross_entropy_with_logits(x, y, reduction="none").sum(1, keepdim=True)
        sharpened = torch.sigmoid(tau * x)
    return (voxel_ce * weights).sum(), (sharpened * weights).flatten(2).sum(-1)


def fused_sums(x, y, mask, tau, activation, keep=True):
    prepared = prepare(x, y, mask, activation)
    return _CrossEntropyAndMarginals.apply(x, prepared.labels, prepared.target, prepared.mask,
                                           activation == "softmax", tau, keep)


# (target kind, activation): the target forms the losses take (tests/loss_registry.py)
CASES = [(kind, activation) for activation, kinds in TARGET_FORMS.items() for kind in kinds]


@pytest.fixture(params=[1 << 22, 37], ids=["one-slice", "many-slices"])
def chunk_elements(request, monkeypatch):
    # 37 elements: slices of 3 voxels at B*C = 12, the last one shorter -- the slicing must not matter
    monkeypatch.setattr(label_marginal, "_CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("tau", [10.0, 0.5, 100.0])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("kind,activation", CASES)
def test_fused_sums_and_gradient_equal_plain_autograd(kind, activation, masked, tau, chunk_elements):
    x, y, mask = make_inputs(kind, masked)
    weights = torch.randn(SHAPE[:2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for compute in (fused_sums, reference_sums):
        logits = x.clone().requires_grad_()
        ce, sums = compute(logits, y, mask, tau, activation)
        (grad,) = torch.autograd.grad(0.7 * ce + (weights * sums).sum(), logits)
        results.append((ce.detach(), sums.detach(), grad))
    (ce, sums, grad), (ce_ref, sums_ref, grad_ref) = results
    torch.testing.assert_close(ce, ce_ref, **TOLERANCE)
    torch.testing.assert_close(sums, sums_ref, **TOLERANCE)
    torch.testing.assert_close(grad, grad_ref, **TOLERANCE)
    assert float(grad.abs().max()) > 0
    if masked:  # masked voxels get no gradient at all
        assert float(grad[1].abs().max()) == 0


@pytest.mark.parametrize("kind,activation", CASES)
def test_cross_entropy_only_when_tau_is_none(kind, activation):
    x, y, mask = make_inputs(kind, masked=True, seed=3)
    logits = x.clone().requires_grad_()
    ce, sums = fused_sums(logits, y, mask, None, activation)
    assert sums is None
    (grad,) = torch.autograd.grad(ce, logits)
    reference = x.clone().requires_grad_()
    ce_ref, _ = reference_sums(reference, y, mask, 1.0, activation)
    (grad_ref,) = torch.autograd.grad(ce_ref, reference)
    torch.testing.assert_close(ce.detach(), ce_ref.detach(), **TOLERANCE)
    torch.testing.assert_close(grad, grad_ref, **TOLERANCE)


@pytest.mark.parametrize("kind,activation", CASES)
def test_loss_with_ignore_label_and_mask_equals_plain_autograd(kind, activation):
    # the whole loss (l1 penalty) against the reference, with an all-masked image in the batch
    x, y, mask = make_inputs(kind, masked=True, seed=4)
    ignore = None
    if kind == "labels":  # the ignore label instead of the mask
        ignore = SHAPE[1]
        y = torch.where(mask.bool(), y, ignore)
        mask_for_loss = None
    else:
        mask_for_loss = mask
    tau, lam = 10.0, 0.6

    def reference(logits):
        target = y if kind != "labels" else torch.where(mask.bool(), y, 0)
        ce_sum, sums = reference_sums(logits, target, mask, tau, activation)
        regions = 1 if activation == "softmax" else SHAPE[1]
        ce = ce_sum / (mask.sum() * regions)
        counted = mask.flatten(2).sum(-1)  # (B, 1)
        one_hot = target if kind != "labels" else torch.zeros(SHAPE, dtype=x.dtype).scatter_(1, target, 1)
        y_hat = (one_hot * mask).flatten(2).sum(-1) / counted.clamp_min(1)
        p_hat = sums / counted.clamp_min(1)
        valid = (counted[:, 0] > 0).to(x.dtype)
        per_image = (y_hat - p_hat).abs().mean(1)
        return ce + lam * (per_image * valid).sum() / valid.sum()

    values = []
    def ours(logits):
        return label_marginal_loss(logits, y, mask_for_loss, penalty="l1", lam=lam, tau=tau, activation=activation,
                                   ignore_label=ignore)

    for loss in (ours, reference):
        logits = x.clone().requires_grad_()
        value = loss(logits)
        (grad,) = torch.autograd.grad(value, logits)
        values.append((value.detach(), grad))
    torch.testing.assert_close(values[0][0], values[1][0], **TOLERANCE)
    torch.testing.assert_close(values[0][1], values[1][1], **TOLERANCE)
    assert float(values[0][1][1].abs().max()) == 0  # the image without counted voxels


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("kind,activation", CASES)
def test_gradcheck(kind, activation, masked, chunk_elements):
    generator = torch.Generator().manual_seed(5)
    shape = (2, 3, 4, 4, 4)
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=generator)
    if kind == "labels":
        y = labels
    elif kind == "one_hot":
        y = torch.zeros(shape, dtype=torch.float64).scatter_(1, labels, 1)
    else:
        y = (torch.rand(shape, generator=generator) < 0.5).to(torch.float64)
    mask = (torch.rand(2, 1, 4, 4, 4, generator=generator) < 0.7).to(torch.float64) if masked else None
    prepared = prepare(x, y, mask, activation)

    def function(logits):
        return _CrossEntropyAndMarginals.apply(logits, prepared.labels, prepared.target, prepared.mask,
                                               activation == "softmax", 2.0, True)

    assert torch.autograd.gradcheck(function, (x,), fast_mode=True)


@pytest.mark.parametrize("kind,activation", CASES)
def test_second_backward_with_retain_graph_gives_the_same_gradient(kind, activation, chunk_elements):
    x, y, mask = make_inputs(kind, masked=True, seed=6)
    logits = x.clone().requires_grad_()
    value = label_marginal_loss(logits, y, mask, penalty="kl", lam=0.3, tau=10.0, activation=activation)
    (first,) = torch.autograd.grad(value, logits, retain_graph=True)
    (second,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(second, first, rtol=0, atol=1e-15)
    assert float(first.abs().max()) > 0


def test_log_probabilities_are_kept_only_when_a_gradient_will_be_needed():
    x, y, _ = make_inputs("labels", masked=False, seed=7)
    prepared = prepare(x, y)
    logits = x.clone().requires_grad_()

    def output_node(keep):
        ce, _ = _CrossEntropyAndMarginals.apply(logits, prepared.labels, None, None, True, 10.0, keep)
        return ce, ce.grad_fn

    ce, node = output_node(True)
    assert node.log_probs is not None and node.log_probs.shape == (3, 4, 5 * 6 * 7)
    torch.autograd.grad(ce, logits)
    assert node.log_probs is None  # used up as the gradient buffer

    with torch.no_grad():  # the loss decides "keep" from the grad mode: nothing is kept
        value = label_marginal_loss(logits, y)
    assert value.grad_fn is None
    kept = []
    original = _CrossEntropyAndMarginals.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        kept.append(ctx.log_probs)
        return out

    try:
        _CrossEntropyAndMarginals.forward = staticmethod(spy)
        with torch.no_grad():
            label_marginal_loss(logits, y)
        label_marginal_loss(x, y)  # logits that need no gradient
        label_marginal_loss(logits, y)
    finally:
        _CrossEntropyAndMarginals.forward = staticmethod(original)
    assert kept[0] is None and kept[1] is None and kept[2] is not None


def test_float32_under_autocast_returns_float32_sums_and_a_gradient_in_the_logits_dtype():
    x, y, mask = make_inputs("labels", masked=True, seed=8)
    logits = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = label_marginal_loss(logits, y, mask, penalty="l1")
    (grad,) = torch.autograd.grad(value, logits)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    reference = label_marginal_loss(logits.detach().to(torch.float32), y, mask, penalty="l1")
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
