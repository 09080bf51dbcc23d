"""The CPU fast paths of the losses (issue #15) against plain autograd in float64.

Each one changes how a value is computed, never what it is:

* the label map is masked and range-checked in its own integer dtype (int16 from nnU-Net's
  dataloader), converted to int64 once, after the check;
* the overlap sums hand their forward's gather ``s_l`` to the backward (label map, no mask) and
  reduce over the channels one channel at a time instead of a strided bmm;
* the marginal Dice's background row hands its ``[y = 0]`` weights to the backward (label map, no
  mask), whose row term runs over the merged channels only;
* the ground-truth sums of a label map without a mask scatter an expanded 1, not a filled tensor;
* the sharpened probabilities of LabelMarginalLoss take ``exp`` with subnormal results flushed to 0
  (the CPU's exp leaves its vectorised kernel for them, about 20x slower);
* the marginal and leaf cross-entropies of a label map gather ``log s`` at the label instead of
  building a one-hot map, and the marginal one merges the background voxels' label sets only when a
  class is missing in the batch (always under torch.compile).
"""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_losses import (LabelMarginalLoss, LeafCrossEntropyLoss, MarginalCrossEntropyLoss, MarginalDiceLoss,
                           MimeLoss, PhiDiceLoss)
from nnunet_losses.losses._inputs import prepare
from nnunet_losses.losses._overlap_sums import overlap_sums_ground_truth
from nnunet_losses.losses.label_marginal import _exp_floor, exp_flushing_subnormals_
from test_label_marginal_fused import fused_sums, reference_sums
from test_overlap_sums import plain_autograd_sums, weighted_sums

pytestmark = pytest.mark.usefixtures("single_threaded")

LABEL_DTYPES = [torch.int16, torch.uint8, torch.int32, torch.int64, torch.float32]


def value_and_gradient(compute, x, *arguments):
    logits = x.clone().requires_grad_(True)
    value = compute(logits, *arguments)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


# ------------------------------------------------------------------------------------------------
# label maps in their own dtype
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("background_row", [False, True], ids=["I-P", "I-P-R"])
def test_overlap_sums_of_every_label_dtype_equal_plain_autograd(make_case, label_dtype, mask, background_row):
    """Distinct weights per (b, c): the per-class (channel-by-channel) backward, with the forward's
    gather handed over when there is no mask."""
    case = make_case(spatial=(3, 4, 5), channels=4, mask=mask)
    value, grad = value_and_gradient(weighted_sums, case.x, case.labels.to(label_dtype), case.mask, "softmax",
                                     background_row)
    reference, grad_ref = value_and_gradient(plain_autograd_sums, case.x, case.one_hot, case.mask, "softmax",
                                             background_row)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


LOSSES = {
    "PhiDiceLoss(I)": lambda: PhiDiceLoss(phi="I"),
    "PhiDiceLoss(BCI)": lambda: PhiDiceLoss(phi="BCI"),
    "MimeLoss": MimeLoss,  # one weight for every class: the single-gather backward
    "MarginalDiceLoss": MarginalDiceLoss,  # the background row
    "LabelMarginalLoss(kl)": lambda: LabelMarginalLoss(penalty="kl"),
}


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("name", LOSSES)
def test_losses_give_the_int64_value_and_gradient_for_every_label_dtype(make_case, name, label_dtype, mask):
    case = make_case(spatial=(3, 4, 5), channels=4, mask=mask)
    loss = LOSSES[name]()
    value, grad = value_and_gradient(loss, case.x, case.labels.to(label_dtype), case.mask)
    reference, grad_ref = value_and_gradient(loss, case.x, case.labels, case.mask)
    torch.testing.assert_close(value, reference, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


@pytest.mark.parametrize("label_dtype", [torch.int16, torch.uint8, torch.int64])
def test_ignore_label_in_and_out_of_the_label_dtype(make_case, label_dtype):
    """An ignore label the dtype can hold is compared in that dtype; one it cannot hold (int16 and
    40000, uint8 and -1) goes through int64, where it matches no voxel."""
    case = make_case(spatial=(4, 5), channels=3)
    labels = case.labels.clone()
    labels[0, 0, :2] = 200
    prepared = prepare(case.x, labels.to(label_dtype), None, "softmax", 200)
    assert prepared.labels.dtype == torch.int64
    torch.testing.assert_close(prepared.mask.bool(), labels != 200)
    assert int(prepared.labels[0, 0, :2].abs().sum()) == 0  # ignored voxels set to 0
    out_of_range = -1 if label_dtype == torch.uint8 else 40000
    prepared = prepare(case.x, case.labels.to(label_dtype), None, "softmax", out_of_range)
    assert bool(prepared.mask.all())  # no voxel holds it
    torch.testing.assert_close(prepared.labels, case.labels, rtol=0, atol=0)


def test_an_ignore_label_keeps_the_weights_of_the_mask(make_case):
    """The ignore label zeroes its voxels' weights and leaves the others' as given (3 stays 3): the loss
    equals the one with those voxels' weights set to 0 by hand."""
    case = make_case(spatial=(4, 5), channels=3)
    labels = case.labels.clone()
    labels[0, 0, :2] = 200
    weights = torch.full(labels.shape, 3.0, dtype=case.x.dtype)
    weights[1] = 0.5
    prepared = prepare(case.x, labels, weights, "softmax", 200)
    torch.testing.assert_close(prepared.mask, weights * (labels != 200), rtol=0, atol=0)
    zeroed = torch.where(labels == 200, 0.0, weights)
    for loss in (PhiDiceLoss(ignore_label=200), MimeLoss(ignore_label=200)):
        torch.testing.assert_close(loss(case.x, labels, weights), type(loss)()(case.x, labels.clamp_max(2), zeroed))


@pytest.mark.parametrize("label_dtype", [torch.int16, torch.int32, torch.int64, torch.float32], ids=str)
def test_out_of_range_labels_name_the_same_range_in_every_dtype(make_case, label_dtype):
    case = make_case(spatial=(4, 5), channels=3)
    labels = case.labels.clone()
    labels[0, 0, 0, 0], labels[1, 0, 1, 1] = -2, 7
    with pytest.raises(ValueError) as error:
        PhiDiceLoss()(case.x, labels.to(label_dtype))
    assert str(error.value) == "y: expected labels in [0, 2] for x with 3 channels, got values in [-2, 7]"


@pytest.mark.parametrize("label_dtype", [torch.int16, torch.int64])
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
def test_ground_truth_sums_count_the_one_hot_target(make_case, label_dtype, mask):
    case = make_case(spatial=(3, 4, 5), channels=4, mask=mask)
    prepared = prepare(case.x, case.labels.to(label_dtype), case.mask, "softmax")
    weights = torch.ones_like(case.x[:, :1]) if case.mask is None else case.mask
    expected = (case.one_hot * weights).flatten(2).sum(-1)
    torch.testing.assert_close(overlap_sums_ground_truth(prepared, 4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["PhiDiceLoss(I)", "MimeLoss", "MarginalDiceLoss"])
def test_second_backward_recomputes_the_handed_over_gather(make_case, name):
    """The forward's ``s_l`` is consumed by the first backward like the probabilities: a second
    backward through the same graph gathers it again and gets the same gradient."""
    case = make_case(spatial=(4, 5), channels=3)
    x = case.x.clone().requires_grad_(True)
    value = LOSSES[name]()(x, case.labels.to(torch.int16))
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x)
    assert first.abs().sum() > 0
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def plain_marginal_dice(x, one_hot, annotated, mask, epsilon):
    """Marginal Dice from its definition, with plain autograd: the missing classes' probabilities added
    to the background channel, Φ = I soft Dice over the background and the annotated classes."""
    s = torch.softmax(x, 1)
    merged = (~annotated).to(x.dtype).view(*annotated.shape, *([1] * (x.ndim - 2)))
    merged[:, 0] = 1
    s_merged = torch.cat([(s * merged).sum(1, keepdim=True), s[:, 1:]], 1)
    m = torch.ones_like(x[:, :1]) if mask is None else mask
    intersection = (m * one_hot * s_merged).flatten(2).sum(-1)
    total = (m * (one_hot + s_merged)).flatten(2).sum(-1)
    dice = (2 * intersection + epsilon) / (total + epsilon)
    return 1 - dice[annotated].mean()  # column 0 is True: the merged background counts


@pytest.mark.parametrize("label_dtype", [torch.int16, torch.int64], ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
def test_marginal_dice_background_row_equals_plain_autograd(make_case, label_dtype, mask):
    """Sample 0 misses class 2, sample 1 class 4, sample 2 nothing: the row term runs over channels
    0, 2 and 4, each with a zero weight in some samples, and not at all over 1 and 3."""
    case = make_case(spatial=(3, 4, 5), batch=3, channels=5, mask=mask)
    labels = case.labels.clone()
    labels[0][labels[0] == 2] = 0
    labels[1][labels[1] == 4] = 0
    annotated = torch.ones(3, 5, dtype=torch.bool)
    annotated[0, 2] = annotated[1, 4] = False
    one_hot = torch.nn.functional.one_hot(labels[:, 0], 5).movedim(-1, 1).to(case.x.dtype)
    loss = MarginalDiceLoss(epsilon=0.3)
    value, grad = value_and_gradient(lambda x: loss(x, labels.to(label_dtype), case.mask, annotated), case.x)
    reference, grad_ref = value_and_gradient(lambda x: plain_marginal_dice(x, one_hot, annotated, case.mask, 0.3),
                                             case.x)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
    assert grad[0, 2].abs().sum() > 0 and grad[1, 4].abs().sum() > 0 and grad[2].abs().sum() > 0

    # the handed-over weights are consumed like s_l: a second backward computes them again, the same
    x = case.x.clone().requires_grad_(True)
    value = loss(x, labels.to(label_dtype), case.mask, annotated)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the label-set cross-entropies of a label map
# ------------------------------------------------------------------------------------------------
def plain_label_set_cross_entropies(x, labels, annotated, mask):
    """Marginal and leaf CE by their definitions: softmax probabilities, the label sets as a dense map."""
    batch, channels = x.shape[:2]
    per_sample = (batch, 1, *([1] * (x.ndim - 2)))
    s = x.softmax(1)
    one_hot = torch.nn.functional.one_hot(labels[:, 0], channels).movedim(-1, 1).bool()
    background = labels == 0
    missing = ~annotated
    missing[:, 0] = False
    label_set = one_hot | (background & missing.view(batch, channels, *per_sample[2:]))
    marginal = -torch.log((s * label_set).sum(1, keepdim=True) / label_set.sum(1, keepdim=True))
    leaf = -torch.log((s * one_hot).sum(1, keepdim=True))
    m = torch.ones_like(marginal) if mask is None else mask
    leaf_m = m * ~(background & missing.any(1).view(per_sample))
    return (m * marginal).sum() / m.sum(), (leaf_m * leaf).sum() / leaf_m.sum()


@pytest.mark.parametrize("label_dtype", [torch.int16, torch.int64], ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "weighted-mask"])
@pytest.mark.parametrize("missing", [True, False], ids=["classes-missing", "all-annotated"])
def test_label_set_cross_entropies_of_a_label_map_equal_plain_autograd(make_case, label_dtype, mask, missing):
    """Sample 0 misses class 2, sample 1 class 4, sample 2 nothing (or, all-annotated, no sample misses
    anything: the marginal CE skips the merge); the one-hot target (the other path) gives the same. The
    mask's weights run from 0 to 2.5, so a mean over 0/1 weights would not match."""
    case = make_case(spatial=(3, 4, 5), batch=3, channels=5, mask=mask)
    weights = None if not mask else case.mask * torch.linspace(0.5, 2.5, case.mask.numel()).view_as(case.mask)
    labels = case.labels.clone()
    annotated = torch.ones(3, 5, dtype=torch.bool)
    if missing:
        labels[0][labels[0] == 2] = 0
        labels[1][labels[1] == 4] = 0
        annotated[0, 2] = annotated[1, 4] = False
    one_hot = torch.nn.functional.one_hot(labels[:, 0], 5).movedim(-1, 1).to(case.x.dtype)
    references = [value_and_gradient(lambda x: plain_label_set_cross_entropies(x, labels, annotated, weights)[k],
                                     case.x) for k in (0, 1)]
    for loss, (reference, grad_ref) in zip((MarginalCrossEntropyLoss(), LeafCrossEntropyLoss()), references):
        for target in (labels.to(label_dtype), one_hot):
            value, grad = value_and_gradient(lambda x: loss(x, target, weights, annotated), case.x)
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("missing", [True, False], ids=["classes-missing", "all-annotated"])
def test_traced_marginal_cross_entropy_merges_always_and_equals_eager(make_case, missing):
    """Under torch.compile the merge runs without the host read; with nothing missing it is exact."""
    torch._dynamo.reset()
    case = make_case(spatial=(3, 4, 5), batch=2, channels=4)
    labels = case.labels.clone()
    annotated = torch.ones(2, 4, dtype=torch.bool)
    if missing:
        labels[0][labels[0] == 3] = 0
        annotated[0, 3] = False
    loss = MarginalCrossEntropyLoss()
    eager, grad_eager = value_and_gradient(lambda x: loss(x, labels, None, annotated), case.x)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    traced, grad_traced = value_and_gradient(lambda x: compiled(x, labels, None, annotated), case.x)
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_traced, grad_eager, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# exp with subnormal results flushed (the sharpened probabilities of LabelMarginalLoss)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exp_flushing_subnormals_is_exp_for_every_normal_result(dtype):
    tiny = torch.finfo(dtype).tiny
    floor, at_floor = _exp_floor(dtype)
    assert math.log(tiny) < floor < math.log(tiny) + 1e-3 and tiny <= at_floor <= 1.0002 * tiny
    t = torch.linspace(math.log(tiny) - 40, 3, 200_001, dtype=dtype)
    exact = t.exp()
    flushed = exp_flushing_subnormals_(t.clone())
    kept = exact > at_floor
    torch.testing.assert_close(flushed[kept], exact[kept], rtol=0, atol=0)
    assert bool((flushed[~kept] == 0).all())
    assert float(exact[~kept].max()) <= at_floor  # what is flushed is below 1.0002 x the smallest normal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["labels", "one_hot"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_sharpened_sums_with_subnormal_terms_equal_plain_autograd(dtype, kind, masked):
    """Logits 30·N(0, 1): most ``τ log s`` (τ = 10) lie far below log(smallest normal), the terms the
    fast exp flushes; value and gradient against the float64 reference, to float32 rounding."""
    generator = torch.Generator().manual_seed(3)
    shape = (2, 5, 6, 7)
    x64 = 30 * torch.randn(shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator)
    y = labels if kind == "labels" else torch.zeros(shape, dtype=torch.float64).scatter_(1, labels, 1)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=generator) < 0.6).to(torch.float64) if masked else None
    floor = _exp_floor(dtype)[0]
    assert float((10 * torch.log_softmax(x64, 1) < floor).double().mean()) > 0.1  # the slow path would be taken
    weights = torch.randn(shape[:2], generator=generator, dtype=torch.float64)

    def total(compute, logits, y, mask):
        ce, sums = compute(logits, y, mask, 10.0, "softmax")
        return 0.7 * ce + (weights.to(logits.dtype) * sums).sum()

    cast = (lambda t: None if t is None else t.to(dtype)) if dtype != torch.float64 else (lambda t: t)
    y_in = y if kind == "labels" else cast(y)
    value, grad = value_and_gradient(lambda z: total(fused_sums, z, y_in, cast(mask)), x64.to(dtype))
    reference, grad_ref = value_and_gradient(lambda z: total(reference_sums, z, y, mask), x64)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value.double(), reference, **tolerance)
    torch.testing.assert_close(grad.double(), grad_ref, **tolerance)
