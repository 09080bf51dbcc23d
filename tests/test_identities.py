"""Reduces-to identities: where a loss's definition coincides with nnU-Net's, PyTorch's or another of our
losses, value and gradient are equal (seeded random 2D and 3D inputs, with and without a loss mask)."""

from __future__ import annotations

import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from loss_registry import variants
from nnunet_losses import (
    LabelMarginalLoss,
    PhiDiceLoss,
    leaf_dice_loss,
    marginal_dice_loss,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

SPATIAL = {"2d": (6, 6), "3d": (4, 4, 4)}
# nnU-Net takes its sums in float32 whatever the input dtype, so comparisons with it run in float32
NNUNET_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
GRADIENT_TOLERANCE_FLOAT32 = dict(rtol=1e-4, atol=1e-8)
EXACT = dict(rtol=1e-12, atol=1e-14)  # float64, same arithmetic up to summation order


def value_and_gradient(loss_of_logits, x: torch.Tensor):
    x = x.detach().requires_grad_()
    value = loss_of_logits(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def assert_same(ours, theirs, value_tolerance, gradient_tolerance=None):
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), **value_tolerance)
    torch.testing.assert_close(ours[1], theirs[1], **(gradient_tolerance or value_tolerance))
    assert float(ours[1].abs().max()) > 0  # a real gradient


# ----------------------------------------------------------------------------------------------
# Φ-Dice == nnU-Net's MemoryEfficientSoftDiceLoss (its value is -dice)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("include_background", [False, True], ids=["nobg", "bg"])
@pytest.mark.parametrize("phi", ["I", "BI"])
def test_phi_dice_equals_nnunet_soft_dice(make_case, phi, include_background, spatial, mask):
    case = make_case(SPATIAL[spatial], mask=mask, seed=10, dtype=torch.float32)
    nnunet = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=phi == "BI",
                                         do_bg=include_background, smooth=1e-5, ddp=False)
    ours = PhiDiceLoss(phi=phi, epsilon=1e-5, include_background=include_background, ddp=False)
    assert_same(value_and_gradient(lambda x: ours(x, case.labels, case.mask), case.x),
                value_and_gradient(lambda x: 1 + nnunet(x, case.labels, loss_mask=case.mask), case.x),
                NNUNET_TOLERANCE, GRADIENT_TOLERANCE_FLOAT32)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("phi", ["I", "BI"])
def test_sigmoid_phi_dice_equals_nnunet_region_dice(make_case, phi, spatial, mask):
    case = make_case(SPATIAL[spatial], mask=mask, seed=11, dtype=torch.float32)
    # regions: nnU-Net's trainer uses do_bg=True, every channel is a foreground region
    nnunet = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=phi == "BI", do_bg=True, smooth=1e-5,
                                         ddp=False)
    ours = PhiDiceLoss(phi=phi, epsilon=1e-5, activation="sigmoid", ddp=False)
    assert_same(value_and_gradient(lambda x: ours(x, case.regions, case.mask), case.x),
                value_and_gradient(lambda x: 1 + nnunet(x, case.regions, loss_mask=case.mask), case.x),
                NNUNET_TOLERANCE, GRADIENT_TOLERANCE_FLOAT32)


# ----------------------------------------------------------------------------------------------
# LabelMarginalLoss(lam=0) == nnU-Net's cross-entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("penalty", ["l1", "kl", "dice_bias"])
def test_label_marginal_without_penalty_equals_nnunet_cross_entropy(make_case, penalty, spatial):
    case = make_case(SPATIAL[spatial], seed=12)
    target = case.labels.to(torch.float64)  # nnU-Net's dataloader hands float label maps to the loss
    ours = LabelMarginalLoss(penalty=penalty, lam=0)
    assert_same(value_and_gradient(lambda x: ours(x, target), case.x),
                value_and_gradient(lambda x: RobustCrossEntropyLoss()(x, target), case.x), EXACT)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_label_marginal_without_penalty_equals_nnunet_cross_entropy_with_ignore_label(make_case, spatial):
    case = make_case(SPATIAL[spatial], seed=13, mask=True)
    ignore = 3  # C = 3 classes, label 3 is nnU-Net's ignore label
    target = torch.where(case.mask.bool(), case.labels, ignore).to(torch.float64)
    ours = LabelMarginalLoss(penalty="kl", lam=0, ignore_label=ignore)
    assert_same(value_and_gradient(lambda x: ours(x, target), case.x),
                value_and_gradient(lambda x: RobustCrossEntropyLoss(ignore_index=ignore)(x, target), case.x), EXACT)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_sigmoid_label_marginal_without_penalty_equals_bce_with_logits(make_case, spatial):
    case = make_case(SPATIAL[spatial], seed=14)
    ours = LabelMarginalLoss(penalty="l1", lam=0, activation="sigmoid")
    assert_same(value_and_gradient(lambda x: ours(x, case.regions), case.x),
                value_and_gradient(lambda x: torch.nn.BCEWithLogitsLoss()(x, case.regions), case.x), EXACT)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_sigmoid_label_marginal_masked_cross_entropy_is_mean_over_counted_voxels_and_regions(make_case, spatial):
    # the mean over counted (voxel, region) pairs, consistent with the unmasked BCEWithLogitsLoss above
    case = make_case(SPATIAL[spatial], seed=15, mask=True)
    ours = LabelMarginalLoss(penalty="l1", lam=0, activation="sigmoid")

    def reference(x):
        per_element = torch.nn.BCEWithLogitsLoss(reduction="none")(x, case.regions)
        return (per_element * case.mask).sum() / (case.mask.sum() * x.shape[1])

    assert_same(value_and_gradient(lambda x: ours(x, case.regions, case.mask), case.x),
                value_and_gradient(reference, case.x), EXACT)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("penalty", ["l1", "kl", "dice_bias"])
def test_label_marginal_skips_fully_masked_images(make_case, penalty, activation):
    # image 1 has no counted voxel: it adds nothing (no CE, no penalty term, not in the image count)
    case = make_case(SPATIAL["2d"], seed=16, mask=True)
    mask = case.mask.clone()
    mask[1] = 0
    target = case.target(activation)
    loss = LabelMarginalLoss(penalty=penalty, activation=activation)
    both_value, both_grad = value_and_gradient(lambda x: loss(x, target, mask), case.x)
    first_value, first_grad = value_and_gradient(lambda x: loss(x, target[:1], mask[:1]), case.x[:1])
    torch.testing.assert_close(both_value, first_value, **EXACT)
    torch.testing.assert_close(both_grad[:1], first_grad, **EXACT)
    assert torch.equal(both_grad[1], torch.zeros_like(both_grad[1]))


# ----------------------------------------------------------------------------------------------
# Marginal and leaf Dice with every class annotated == Φ = I Dice
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotated_given", [True, False], ids=["annotated", "fallback"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("include_background", [False, True], ids=["nobg", "bg"])
@pytest.mark.parametrize("loss", [marginal_dice_loss, leaf_dice_loss], ids=["marginal", "leaf"])
def test_missing_label_dice_with_every_class_annotated_equals_image_wise_dice(make_case, loss, include_background,
                                                                             spatial, mask, annotated_given):
    case = make_case(SPATIAL[spatial], mask=mask, seed=17)
    # the fallback (annotated iff present) needs every class in every sample's counted voxels
    counted_labels = case.one_hot if case.mask is None else case.one_hot * case.mask
    assert bool(counted_labels.sum(tuple(range(2, case.x.ndim))).gt(0).all())
    annotated = torch.ones(2, 3, dtype=torch.bool) if annotated_given else None
    options = dict(epsilon=1e-3, include_background=include_background)
    assert_same(value_and_gradient(lambda x: loss(x, case.labels, case.mask, annotated=annotated, **options), case.x),
                value_and_gradient(lambda x: phi_dice_loss(x, case.labels, case.mask, phi="I", **options), case.x),
                EXACT)


@pytest.mark.parametrize("include_background", [False, True], ids=["nobg", "bg"])
def test_sigmoid_leaf_dice_with_every_region_annotated_equals_image_wise_dice(make_case, include_background):
    case = make_case(SPATIAL["3d"], seed=18, mask=True)
    annotated = torch.ones(2, 3, dtype=torch.bool)
    options = dict(epsilon=1e-3, include_background=include_background, activation="sigmoid")
    assert_same(
        value_and_gradient(lambda x: leaf_dice_loss(x, case.regions, case.mask, annotated=annotated, **options),
                           case.x),
        value_and_gradient(lambda x: phi_dice_loss(x, case.regions, case.mask, phi="I", **options), case.x), EXACT)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("missing", [1, 2])
def test_marginal_dice_is_image_wise_dice_of_the_merged_probabilities(make_case, missing, mask):
    # Shi et al.: one sample missing class `missing`; its probability is added to the background and the
    # Dice is taken over the C - 1 merged channels (the missing class has no voxels in y).
    case = make_case(SPATIAL["3d"], seed=19, batch=1, mask=mask)
    labels = torch.where(case.labels == missing, 0, case.labels)
    annotated = torch.ones(1, 3, dtype=torch.bool)
    annotated[0, missing] = False
    kept = [c for c in range(3) if c != missing]
    merged_labels = labels.clone()
    merged_labels[labels == kept[1]] = 1  # the remaining foreground class becomes channel 1 of the merged map

    def merged_dice(x):
        s = torch.softmax(x, 1)
        merged = torch.cat([s[:, :1] + s[:, missing:missing + 1], s[:, kept[1]:kept[1] + 1]], 1)
        # log of probabilities as logits: softmax(log p) = p
        return phi_dice_loss(merged.log(), merged_labels, case.mask, phi="I", epsilon=1e-3, include_background=True)

    assert_same(value_and_gradient(lambda x: marginal_dice_loss(x, labels, case.mask, annotated=annotated,
                                                                epsilon=1e-3), case.x),
                value_and_gradient(merged_dice, case.x), dict(rtol=1e-10, atol=1e-13))


# ----------------------------------------------------------------------------------------------
# Identities between our own losses and options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("include_background", [False, True], ids=["nobg", "bg"])
def test_negative_mime_is_mime_with_a_1_b_0(make_case, include_background, reduction, mask):
    case = make_case(SPATIAL["2d"], seed=20, mask=mask)
    options = dict(include_background=include_background, reduction=reduction)
    assert_same(value_and_gradient(lambda x: negative_mime_loss(x, case.labels, case.mask, **options), case.x),
                value_and_gradient(lambda x: mime_loss(x, case.labels, case.mask, a=1.0, b=0.0, **options), case.x),
                EXACT)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("phi", ["I", "CI"])
def test_batch_reductions_with_one_sample_equal_image_reductions(make_case, phi, spatial):
    # B = 1: BI has the subsets of I, BCI those of CI
    case = make_case(SPATIAL[spatial], seed=21, batch=1)
    batch_phi = {"I": "BI", "CI": "BCI"}[phi]
    assert_same(value_and_gradient(lambda x: phi_dice_loss(x, case.labels, phi=batch_phi, epsilon=0.3), case.x),
                value_and_gradient(lambda x: phi_dice_loss(x, case.labels, phi=phi, epsilon=0.3), case.x), EXACT)


@pytest.mark.parametrize("phi", ["I", "BI"])
def test_class_reductions_with_one_class_equal_their_per_class_reductions(make_case, phi):
    # one foreground class (C = 2, background excluded): CI has the subsets of I, BCI those of BI
    case = make_case(SPATIAL["3d"], seed=22, channels=2)
    class_phi = {"I": "CI", "BI": "BCI"}[phi]
    assert_same(value_and_gradient(lambda x: phi_dice_loss(x, case.labels, phi=class_phi, epsilon=0.3), case.x),
                value_and_gradient(lambda x: phi_dice_loss(x, case.labels, phi=phi, epsilon=0.3), case.x), EXACT)


# every loss that takes a label map (tests/loss_registry.py): (name, module class, arguments chosen so
# that they matter)
SOFTMAX_LOSSES = [(variant.id, loss.module, variant.resolve()) for loss, variant in variants("identities")]
SOFTMAX_LOSS_IDS = [name for name, _, _ in SOFTMAX_LOSSES]


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name, loss_class, options", SOFTMAX_LOSSES, ids=SOFTMAX_LOSS_IDS)
def test_label_map_and_one_hot_targets_agree(make_case, name, loss_class, options, mask):
    case = make_case(SPATIAL["3d"], seed=23, mask=mask)
    loss = loss_class(**options)
    assert_same(value_and_gradient(lambda x: loss(x, case.labels, case.mask), case.x),
                value_and_gradient(lambda x: loss(x, case.one_hot, case.mask), case.x), EXACT)


@pytest.mark.parametrize("name, loss_class, options", SOFTMAX_LOSSES, ids=SOFTMAX_LOSS_IDS)
def test_ignore_label_equals_loss_mask(make_case, name, loss_class, options):
    # nnU-Net's ignore label: voxels labelled 3 (C = 3) count exactly like loss_mask = 0
    case = make_case(SPATIAL["3d"], seed=24, mask=True)
    with_ignore = torch.where(case.mask.bool(), case.labels, 3)
    ignoring = loss_class(**options, ignore_label=3)
    masking = loss_class(**options)
    assert_same(value_and_gradient(lambda x: ignoring(x, with_ignore), case.x),
                value_and_gradient(lambda x: masking(x, case.labels, case.mask), case.x), EXACT)
