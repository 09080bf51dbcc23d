"""The label-set cross-entropies (nnunet_losses/losses/missing_labels.py): Fidon et al.'s marginal CE and
the leaf CE, on hand-checkable values, against torch's and nnU-Net's CE with every class annotated,
against the marginalised distribution computed the naive way, by float64 gradcheck, the "annotated iff
present" fallback and their refusals (the registry's property tests run on them too)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

from nnunet_losses import LeafCrossEntropyLoss, MarginalCrossEntropyLoss, leaf_cross_entropy, marginal_cross_entropy

pytestmark = pytest.mark.usefixtures("single_threaded")

LN2 = math.log(2)
LABEL_SET_LOSSES = [marginal_cross_entropy, leaf_cross_entropy]


def value_and_gradient(loss, x):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x)
    value.backward()
    return value.detach(), x.grad


def hand_case():
    """s = (1/2, 1/4, 1/4) at every voxel of two 1x3 samples; sample 1 misses class 2.

    sample 0, y = [0, 1, 2] (all annotated): terms -ln s_y = ln 2, 2 ln 2, 2 ln 2
    sample 1, y = [0, 1, 0], class 2 missing: the background voxels have S = {0, 2}:
      marginal: -ln((1/2 + 1/4) / 2) = ln(8/3) on each, 2 ln 2 on the class-1 voxel
      leaf: the background voxels are ambiguous and dropped
    """
    x = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log().view(1, 3, 1, 1).expand(2, 3, 1, 3).clone()
    y = torch.tensor([[[[0, 1, 2]]], [[[0, 1, 0]]]])
    annotated = torch.tensor([[True, True, True], [True, True, False]])
    return x, y, annotated


def test_marginal_cross_entropy_closed_form_value():
    x, y, annotated = hand_case()
    expected = (LN2 + 2 * LN2 + 2 * LN2 + math.log(8 / 3) + 2 * LN2 + math.log(8 / 3)) / 6
    assert marginal_cross_entropy(x, y, annotated=annotated).item() == pytest.approx(expected, abs=1e-12)


def test_leaf_cross_entropy_closed_form_value():
    x, y, annotated = hand_case()
    assert leaf_cross_entropy(x, y, annotated=annotated).item() == pytest.approx(7 * LN2 / 4, abs=1e-12)


def test_marginal_cross_entropy_closed_form_gradient():
    # dL/dx_c = (s_c - [c in S] s_c / sum_S s) / N, N = 6 voxels
    x, y, annotated = hand_case()
    _, grad = value_and_gradient(lambda x: marginal_cross_entropy(x, y, annotated=annotated), x)
    s = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    merged_background = (s - torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64) / 0.75) / 6  # S = {0, 2}
    plain_background = (s - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) / 6  # S = {0}
    torch.testing.assert_close(grad[1, :, 0, 0], merged_background, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad[0, :, 0, 0], plain_background, rtol=0, atol=1e-15)


def test_leaf_cross_entropy_gives_ambiguous_voxels_no_gradient():
    x, y, annotated = hand_case()
    _, grad = value_and_gradient(lambda x: leaf_cross_entropy(x, y, annotated=annotated), x)
    assert torch.count_nonzero(grad[1, :, 0, 0]) == 0 and torch.count_nonzero(grad[1, :, 0, 2]) == 0
    s = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(grad[1, :, 0, 1], (s - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)) / 4)


# ------------------------------------------------------------------------------------------------
# every class annotated: the cross-entropy of torch and of nnU-Net
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LABEL_SET_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("annotated_given", [True, False], ids=["annotated", "fallback"])
def test_with_every_class_annotated_it_is_torch_cross_entropy(make_case, loss, annotated_given):
    case = make_case((4, 5, 6), seed=3)
    assert all(bool((case.labels[b] == c).any()) for b in range(2) for c in range(3))  # the fallback sees them all
    annotated = torch.ones(2, 3, dtype=torch.bool) if annotated_given else None
    ours = value_and_gradient(lambda x: loss(x, case.labels, annotated=annotated), case.x)
    torch_ce = value_and_gradient(lambda x: F.cross_entropy(x, case.labels[:, 0]), case.x)
    torch.testing.assert_close(ours, torch_ce, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LABEL_SET_LOSSES, ids=lambda f: f.__name__)
def test_with_every_class_annotated_it_is_nnunet_cross_entropy_with_the_ignore_label(make_case, loss):
    case = make_case((4, 5, 6), seed=4, mask=True)
    with_ignore = torch.where(case.mask.bool(), case.labels, 7).double()  # nnU-Net's float label maps
    ours = value_and_gradient(lambda x: loss(x, with_ignore, annotated=torch.ones(2, 3, dtype=torch.bool),
                                             ignore_label=7), case.x)
    nnunet = value_and_gradient(lambda x: RobustCrossEntropyLoss(ignore_index=7)(x, with_ignore), case.x)
    torch.testing.assert_close(ours, nnunet, rtol=1e-12, atol=1e-14)


def test_sigmoid_leaf_cross_entropy_with_every_region_annotated_is_bce_with_logits(make_case):
    case = make_case((4, 5), seed=5)
    everything = torch.ones(2, 3, dtype=torch.bool)
    ours = value_and_gradient(lambda x: leaf_cross_entropy(x, case.regions, annotated=everything, activation="sigmoid"),
                              case.x)
    bce = value_and_gradient(lambda x: F.binary_cross_entropy_with_logits(x, case.regions), case.x)
    torch.testing.assert_close(ours, bce, rtol=1e-12, atol=1e-14)


def test_sigmoid_leaf_cross_entropy_drops_the_unannotated_regions(make_case):
    case = make_case((4, 5), seed=6, mask=True)
    annotated = torch.tensor([[True, False, True], [False, True, True]])
    keep = annotated[:, :, None, None].double() * case.mask
    expected = (F.binary_cross_entropy_with_logits(case.x, case.regions, reduction="none") * keep).sum() / keep.sum()
    value = leaf_cross_entropy(case.x, case.regions, case.mask, annotated=annotated, activation="sigmoid")
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# marginal CE == CE of the marginalised distribution, computed the naive way
# ------------------------------------------------------------------------------------------------
def missing_class_case(make_case, mask):
    """Class 2 missing in sample 0 (relabelled background there), everything annotated in sample 1."""
    case = make_case((3, 4, 5), seed=8, mask=mask)
    labels = case.labels.clone()
    labels[0][labels[0] == 2] = 0
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    return case, labels, annotated


def naive_label_sets(labels, annotated):
    """(B, C, ...) 0/1: the voxel's class, plus the missing classes on background voxels (a Python loop)."""
    sets = F.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    for b in range(labels.shape[0]):
        for c in range(3):
            if not annotated[b, c]:
                sets[b, c] = (labels[b, 0] == 0).double()
    return sets


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_marginal_cross_entropy_is_the_cross_entropy_of_the_marginalised_distribution(make_case, mask):
    # Fidon et al.'s marginalisation: target and probability of a label set spread evenly over its classes
    case, labels, annotated = missing_class_case(make_case, mask)
    sets = naive_label_sets(labels, annotated)
    weights = torch.ones_like(labels, dtype=torch.float64) if case.mask is None else case.mask

    def naive(x):
        s = torch.softmax(x, 1)
        size = sets.sum(1, keepdim=True)
        spread = torch.where(sets > 0, (s * sets).sum(1, keepdim=True) / size, s)
        per_voxel = -(sets / size * torch.log(spread)).sum(1, keepdim=True)
        return (per_voxel * weights).sum() / weights.sum()

    ours = value_and_gradient(lambda x: marginal_cross_entropy(x, labels, case.mask, annotated=annotated), case.x)
    torch.testing.assert_close(ours, value_and_gradient(naive, case.x), rtol=1e-12, atol=1e-14)


def test_marginal_cross_entropy_is_the_merged_cross_entropy_plus_log_of_the_set_size(make_case):
    # -log Σ_S s (the CE after merging the set into one class) + log |S|: the same gradient as the merged CE
    case, labels, annotated = missing_class_case(make_case, mask=False)
    sets = naive_label_sets(labels, annotated)

    def merged(x):
        return -(torch.softmax(x, 1) * sets).sum(1).log().mean()

    value, grad = value_and_gradient(lambda x: marginal_cross_entropy(x, labels, annotated=annotated), case.x)
    merged_value, merged_grad = value_and_gradient(merged, case.x)
    torch.testing.assert_close(value, merged_value + sets.sum(1).log().mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, merged_grad, rtol=1e-10, atol=1e-14)


def test_marginal_cross_entropy_is_stable_for_large_logits():
    # logits of ±1000 in float32: a sum of probabilities would underflow to log(0); logsumexp does not
    x = torch.tensor([[[[1000.0]], [[-1000.0]], [[-999.0]]]])
    y = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    missing = torch.tensor([[True, True, False]])
    value = marginal_cross_entropy(x, y, annotated=missing)
    assert torch.isfinite(value) and value.item() == pytest.approx(math.log(2), abs=1e-5)  # s_0 + s_2 = 1, |S| = 2
    fully = marginal_cross_entropy(-x, y, annotated=torch.ones(1, 3, dtype=torch.bool))
    # -log s_0 = logsumexp(-1000, 1000, 999) + 1000 = 2000 + log(1 + 1/e)
    assert fully.item() == pytest.approx(2000 + math.log(1 + math.exp(-1)), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# gradcheck, the fallback, nothing left
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LABEL_SET_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_float64_gradcheck_with_a_missing_class(make_case, loss, mask):
    case, labels, annotated = missing_class_case(make_case, mask)
    x = case.x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, case.mask, annotated=annotated), (x,))
    assert torch.autograd.gradgradcheck(lambda x: loss(x, labels, case.mask, annotated=annotated), (x,))


def test_float64_gradcheck_of_sigmoid_leaf_cross_entropy(make_case):
    case = make_case((3, 4), seed=9, mask=True)
    x = case.x.detach().requires_grad_()
    annotated = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: leaf_cross_entropy(x, case.regions, case.mask, annotated=annotated, activation="sigmoid"), (x,))


@pytest.mark.parametrize("loss", LABEL_SET_LOSSES, ids=lambda f: f.__name__)
def test_without_label_sets_a_class_is_annotated_iff_present(make_case, loss):
    case, labels, _ = missing_class_case(make_case, mask=True)
    present = torch.stack([torch.bincount(labels[b][case.mask[b].bool()], minlength=3) > 0 for b in range(2)])
    assert not present[0, 2] and present[1].all()
    torch.testing.assert_close(loss(case.x, labels, case.mask), loss(case.x, labels, case.mask, annotated=present),
                               rtol=0, atol=0)


def test_leaf_cross_entropy_with_every_voxel_ambiguous_is_zero_with_zero_gradient():
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    y = torch.zeros(1, 1, 2, 2, dtype=torch.long)  # only background, class 1 and 2 missing (fallback)
    value, grad = value_and_gradient(lambda x: leaf_cross_entropy(x, y), x)
    assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_modules_equal_the_functions():
    x, y, annotated = hand_case()
    assert MarginalCrossEntropyLoss(ignore_label=5)(x, y, annotated=annotated).item() == \
        marginal_cross_entropy(x, y, annotated=annotated, ignore_label=5).item()
    assert LeafCrossEntropyLoss()(x, y, None, annotated).item() == leaf_cross_entropy(x, y, annotated=annotated).item()


# ------------------------------------------------------------------------------------------------
# refusals, verbatim
# ------------------------------------------------------------------------------------------------
SIGMOID_REFUSAL = ("activation: expected 'softmax' for marginal cross-entropy, got 'sigmoid': marginalisation merges "
                   "missing classes into the background channel, which sigmoid regions do not have; use "
                   "LeafCrossEntropyLoss")


def test_marginal_cross_entropy_refuses_sigmoid_at_construction_and_in_the_function():
    with pytest.raises(ValueError, match=re.escape(SIGMOID_REFUSAL) + "$"):
        MarginalCrossEntropyLoss(activation="sigmoid")
    with pytest.raises(ValueError, match=re.escape(SIGMOID_REFUSAL) + "$"):
        marginal_cross_entropy(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), activation="sigmoid")


@pytest.mark.parametrize("build", [MarginalCrossEntropyLoss, LeafCrossEntropyLoss], ids=lambda c: c.__name__)
def test_unknown_activation_and_bad_ignore_label_are_refused_at_construction(build):
    message = "activation: expected one of ['softmax', 'sigmoid'], got 'softmx' (did you mean 'softmax'?)"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        build(activation="softmx")
    with pytest.raises(TypeError, match=re.escape("ignore_label: expected None or an int label value, got str '3'")):
        build(ignore_label="3")


@pytest.mark.parametrize("loss", LABEL_SET_LOSSES, ids=lambda f: f.__name__)
def test_label_sets_that_contradict_the_labels_are_refused(loss):
    x, y, _ = hand_case()
    annotated = torch.tensor([[True, True, False], [True, True, True]])  # sample 0 has voxels of class 2
    message = ("annotated: expected every class with voxels in y to be marked annotated, got sample 0 with voxels "
               "of class 2 marked as not annotated")
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        loss(x, y, annotated=annotated)
    with pytest.raises(ValueError, match=re.escape("annotated: expected shape (2, 3) (samples x channels of x), "
                                                   "got shape (2, 2)")):
        loss(x, y, annotated=torch.ones(2, 2, dtype=torch.bool))
