"""Bad input raises ValueError/TypeError naming what was expected and what was received (LOSSES.md,
"Common conventions"); options known at construction are refused at construction, not at the first
batch of a training run."""

import re

import numpy as np
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
    estimate_epsilon,
    label_marginal_loss,
    leaf_dice_loss,
    marginal_dice_loss,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)

# every module with its default options: the input checks are shared, so each must apply them
ALL_MODULES = {
    "MimeLoss": MimeLoss,
    "NegativeMimeLoss": NegativeMimeLoss,
    "DynamicMimeLoss": DynamicMimeLoss,
    "PhiDiceLoss": PhiDiceLoss,
    "MarginalDiceLoss": MarginalDiceLoss,
    "LeafDiceLoss": LeafDiceLoss,
    "LabelMarginalLoss": LabelMarginalLoss,
}
# the losses that allow activation="sigmoid" (regions)
SIGMOID_MODULES = ["MimeLoss", "DynamicMimeLoss", "PhiDiceLoss", "LeafDiceLoss", "LabelMarginalLoss"]


def exact(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` literally."""
    return re.escape(message)


@pytest.fixture
def batch():
    """Two 4x4 samples with 3 channels (background + 2 classes) and a label map using all labels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator)
    y = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 2], [0, 0, 0, 1], [2, 2, 1, 0]]).expand(2, 1, 4, 4).clone()
    return x, y


# ------------------------------------------------------------------------------------------------
# logits x
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 4), (1, 2, 3, 4, 4, 4)])
def test_wrong_rank_of_x(name, shape):
    x = torch.zeros(shape)
    y = torch.zeros(shape, dtype=torch.long)
    message = f"x: expected logits of shape (B, C, H, W) or (B, C, D, H, W), got shape {shape}"
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name]()(x, y)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize(
    "x, received",
    [
        (np.zeros((2, 3, 4, 4), dtype=np.float32), "ndarray"),
        ([[[[0.0]]]], "list"),
        (None, "NoneType"),
    ],
)
def test_x_not_a_tensor(name, x, received, batch):
    _, y = batch
    with pytest.raises(TypeError, match=exact(f"x: expected a torch.Tensor of logits, got {received}")):
        ALL_MODULES[name]()(x, y)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_x_not_floating_point(name, dtype, batch):
    _, y = batch
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=exact(f"x: expected floating-point logits, got dtype {dtype}")):
        ALL_MODULES[name]()(x, y)


@pytest.mark.parametrize("name", ["MimeLoss", "NegativeMimeLoss", "PhiDiceLoss", "LeafDiceLoss", "MarginalDiceLoss"])
def test_softmax_needs_two_channels(name):
    x = torch.zeros(2, 1, 4, 4)
    y = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=exact("x: expected at least 2 channels for activation='softmax'")):
        ALL_MODULES[name]()(x, y)


# ------------------------------------------------------------------------------------------------
# target y and loss_mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("y_shape", [(2, 1, 4, 5), (1, 1, 4, 4), (2, 1, 4, 4, 1), (2, 1, 4)])
def test_y_shape_does_not_fit_x(name, y_shape, batch):
    x, _ = batch
    message = (
        "y: expected a target of shape (2, 1, 4, 4) (label map) or (2, 3, 4, 4) (one-hot/regions) "
        f"for x of shape (2, 3, 4, 4), got shape {y_shape}"
    )
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name]()(x, torch.zeros(y_shape, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_y_with_wrong_channel_count(name, batch):
    x, _ = batch
    message = "y: expected 3 channels (one-hot/regions) or 1 channel (label map), got 2"
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name]()(x, torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_y_not_a_tensor(name, batch):
    x, y = batch
    with pytest.raises(TypeError, match=exact("y: expected a torch.Tensor target, got ndarray")):
        ALL_MODULES[name]()(x, y.numpy())


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 4), (2, 1, 4, 5), (1, 1, 4, 4), (2, 1, 1, 4, 4)])
def test_loss_mask_shape_does_not_fit(name, mask_shape, batch):
    x, y = batch
    message = f"loss_mask: expected shape (2, 1, 4, 4) (1 = voxel counts), got shape {mask_shape}"
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name]()(x, y, torch.ones(mask_shape))


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_loss_mask_not_a_tensor(name, batch):
    x, y = batch
    with pytest.raises(TypeError, match=exact("loss_mask: expected a torch.Tensor or None, got list")):
        ALL_MODULES[name]()(x, y, [[1.0]])


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("bad_label, value_range", [(3, "[0, 3]"), (7, "[0, 7]"), (-1, "[-1, 2]")])
def test_label_out_of_range(name, bad_label, value_range, batch):
    x, y = batch
    y[1, 0, 2, 3] = bad_label
    message = f"y: expected labels in [0, 2] for x with 3 channels, got values in {value_range}"
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name]()(x, y)


def test_label_out_of_range_mentions_the_ignore_label(batch):
    x, y = batch
    y[0, 0, 0, 0] = 5  # neither a class of x nor the ignore label 4
    message = "y: expected labels in [0, 2] for x with 3 channels (or the ignore label 4), got values in [0, 5]"
    with pytest.raises(ValueError, match=exact(message)):
        PhiDiceLoss(ignore_label=4)(x, y)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_ignore_label_needs_a_label_map(name, batch):
    x, y = batch
    one_hot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1)
    with pytest.raises(ValueError, match=exact("ignore_label: expected a (B, 1, ...) label map target")):
        ALL_MODULES[name](ignore_label=2)(x, one_hot)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
@pytest.mark.parametrize("ignore_label, received", [("3", "str '3'"), (2.0, "float 2.0"), (True, "bool True")])
def test_ignore_label_not_an_int_at_construction(name, ignore_label, received):
    with pytest.raises(TypeError, match=exact(f"ignore_label: expected None or an int label value, got {received}")):
        ALL_MODULES[name](ignore_label=ignore_label)


def test_ignore_label_not_an_int_in_the_pure_function(batch):
    x, y = batch
    with pytest.raises(TypeError, match=exact("ignore_label: expected None or an int label value, got float 1.5")):
        phi_dice_loss(x, y, ignore_label=1.5)


@pytest.mark.parametrize("name", SIGMOID_MODULES)
def test_sigmoid_with_a_label_map(name, batch):
    x, y = batch
    message = "y: expected a (B, 3, ...) region target for activation='sigmoid'"
    with pytest.raises(ValueError, match=exact(message)):
        ALL_MODULES[name](activation="sigmoid")(x, y)


# ------------------------------------------------------------------------------------------------
# numeric hyperparameters: a, b, epsilon, lam, tau
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MimeLoss(a=-1.0), "a: expected finite values >= 0, got -1.0"),
        (lambda: MimeLoss(b=-0.1), "b: expected finite values >= 0, got -0.1"),
        (lambda: MimeLoss(a=[1.0, -2.0, 1.0]), "a: expected finite values >= 0, got [1.0, -2.0, 1.0]"),
        (lambda: MimeLoss(b=torch.tensor([0.25, -0.5])), "b: expected finite values >= 0, got [0.25, -0.5]"),
        (lambda: MimeLoss(a=float("inf")), "a: expected finite values >= 0, got inf"),
        (lambda: PhiDiceLoss(epsilon=-1e-7), "epsilon: expected finite values >= 0, got -1e-07"),
        (lambda: PhiDiceLoss(epsilon=float("nan")), "epsilon: expected finite values >= 0, got nan"),
        (lambda: PhiDiceLoss(epsilon=[1.0, -1.0, 1.0]), "epsilon: expected finite values >= 0, got [1.0, -1.0, 1.0]"),
        (lambda: DynamicMimeLoss(epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda: MarginalDiceLoss(epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda: LeafDiceLoss(epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda: LabelMarginalLoss(lam=-0.5), "lam: expected a finite number >= 0, got -0.5"),
        (lambda: LabelMarginalLoss("kl", lam=float("nan")), "lam: expected a finite number >= 0, got nan"),
        (lambda: LabelMarginalLoss(tau=0), "tau: expected a finite number > 0, got 0.0"),
        (lambda: LabelMarginalLoss(tau=-10.0), "tau: expected a finite number > 0, got -10.0"),
        (lambda: LabelMarginalLoss(tau=float("inf")), "tau: expected a finite number > 0, got inf"),
        (lambda: PhiDiceLoss(epsilon=torch.ones(3, 1)),
         "epsilon: expected a scalar or one value per class (shape (C,)), got shape (3, 1)"),
        (lambda: MimeLoss(a=[]), "a: expected a scalar or one value per class (shape (C,)), got shape (0,)"),
    ],
)
def test_bad_number_at_construction(build, message):
    with pytest.raises(ValueError, match=exact(message)):
        build()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MimeLoss(a="1.9"), "a: expected a number, a sequence of numbers or a tensor, got str"),
        (lambda: MimeLoss(b=[0.1, "0.1"]), "b: expected a number or a sequence of numbers, got [0.1, '0.1']"),
        (lambda: MimeLoss(a=True), "a: expected a number, a sequence of numbers or a tensor, got bool"),
        (lambda: PhiDiceLoss(epsilon=torch.tensor([1 + 1j])),
         "epsilon: expected a real tensor, got dtype torch.complex64"),
        (lambda: LabelMarginalLoss(lam="1"), "lam: expected a number, got str '1'"),
        (lambda: LabelMarginalLoss(tau=None), "tau: expected a number, got NoneType None"),
        (lambda: PhiDiceLoss(include_background=1), "include_background: expected a bool, got int 1"),
        (lambda: MimeLoss(include_background="no"), "include_background: expected a bool, got str 'no'"),
        (lambda: LeafDiceLoss(include_background=None), "include_background: expected a bool, got NoneType None"),
    ],
)
def test_wrong_type_at_construction(build, message):
    with pytest.raises(TypeError, match=exact(message)):
        build()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: mime_loss(x, y, a=-1.0), "a: expected finite values >= 0, got -1.0"),
        (lambda x, y: phi_dice_loss(x, y, epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda x, y: dynamic_mime_loss(x, y, epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda x, y: marginal_dice_loss(x, y, epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda x, y: leaf_dice_loss(x, y, epsilon=-1.0), "epsilon: expected finite values >= 0, got -1.0"),
        (lambda x, y: label_marginal_loss(x, y, lam=-1.0), "lam: expected a finite number >= 0, got -1.0"),
        (lambda x, y: label_marginal_loss(x, y, tau=0.0), "tau: expected a finite number > 0, got 0.0"),
    ],
)
def test_bad_number_in_the_pure_function(call, message, batch):
    with pytest.raises(ValueError, match=exact(message)):
        call(*batch)


@pytest.mark.parametrize(
    "loss",
    [
        PhiDiceLoss(phi="I", epsilon=[1.0, 1.0]),
        PhiDiceLoss(phi="BI", epsilon=[1.0, 1.0, 1.0, 1.0]),
        DynamicMimeLoss(phi="BI", epsilon=[1.0, 1.0]),
        LeafDiceLoss(epsilon=[1.0, 1.0]),
        MarginalDiceLoss(epsilon=[1.0, 1.0]),
    ],
    ids=repr,
)
def test_per_class_epsilon_of_the_wrong_length(loss, batch):
    # the number of classes is known only when x arrives, so this one is refused at the first call
    count = loss.epsilon.numel()
    message = f"epsilon: expected one value per channel of x (3), got {count} values"
    with pytest.raises(ValueError, match=exact(message)):
        loss(*batch)


@pytest.mark.parametrize("build", [MimeLoss, lambda a: MimeLoss(b=a)], ids=["a", "b"])
def test_per_class_mime_weights_of_the_wrong_length(build, batch):
    with pytest.raises(ValueError, match=r"[ab]: expected one value per channel of x \(3\), got 2 values"):
        build([1.0, 1.0])(*batch)


@pytest.mark.parametrize("phi", ["CI", "BCI"])
@pytest.mark.parametrize(
    "build",
    [
        lambda phi: PhiDiceLoss(phi=phi, epsilon=[1.0, 2.0, 3.0]),
        lambda phi: DynamicMimeLoss(phi=phi, epsilon=[1.0, 2.0, 3.0]),
        lambda phi: phi_dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), phi=phi, epsilon=[1.0, 2.0, 3.0]),
    ],
    ids=["PhiDiceLoss", "DynamicMimeLoss", "phi_dice_loss"],
)
def test_per_class_epsilon_with_a_class_spanning_phi(phi, build):
    message = (
        f"epsilon: expected a single number for phi={phi!r} (its subsets span all classes), got 3 per-class values; "
        "per-class epsilon works with phi='I' or 'BI'"
    )
    with pytest.raises(ValueError, match=exact(message)):
        build(phi)


# ------------------------------------------------------------------------------------------------
# string options, with the "did you mean" hint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PhiDiceLoss(phi="bi"), "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got 'bi' (did you mean 'BI'?)"),
        (lambda: PhiDiceLoss(phi="BCl"),
         "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got 'BCl' (did you mean 'BCI'?)"),
        (lambda: DynamicMimeLoss(phi="ci"),
         "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got 'ci' (did you mean 'CI'?)"),
        (lambda: PhiDiceLoss(activation="softmx"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'softmx' (did you mean 'softmax'?)"),
        (lambda: MimeLoss(activation="Sigmoid"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'Sigmoid' (did you mean 'sigmoid'?)"),
        (lambda: LeafDiceLoss(activation="sigmod"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'sigmod' (did you mean 'sigmoid'?)"),
        (lambda: LabelMarginalLoss(activation="softmaxx"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'softmaxx' (did you mean 'softmax'?)"),
        (lambda: MarginalDiceLoss(activation="SOFTMAX"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'SOFTMAX' (did you mean 'softmax'?)"),
        (lambda: MimeLoss(reduction="mena"),
         "reduction: expected one of ['mean', 'sum'], got 'mena' (did you mean 'mean'?)"),
        (lambda: NegativeMimeLoss(reduction="Sum"),
         "reduction: expected one of ['mean', 'sum'], got 'Sum' (did you mean 'sum'?)"),
        (lambda: LabelMarginalLoss(penalty="L1"),
         "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'L1' (did you mean 'l1'?)"),
        (lambda: LabelMarginalLoss(penalty="kld"),
         "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'kld' (did you mean 'kl'?)"),
        (lambda: LabelMarginalLoss(penalty="dicebias"),
         "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'dicebias' (did you mean 'dice_bias'?)"),
    ],
)
def test_unknown_option_with_a_hint(build, message):
    with pytest.raises(ValueError, match=exact(message)):
        build()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PhiDiceLoss(phi="dice"), "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got 'dice'"),
        (lambda: MimeLoss(reduction="none"), "reduction: expected one of ['mean', 'sum'], got 'none'"),
        (lambda: LabelMarginalLoss(penalty="focal"), "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'focal'"),
    ],
)
def test_unknown_option_without_a_close_match_has_no_hint(build, message):
    with pytest.raises(ValueError, match=exact(message) + "$"):
        build()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PhiDiceLoss(phi=1), "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got int 1"),
        (lambda: MimeLoss(activation=None), "activation: expected one of ['softmax', 'sigmoid'], got NoneType None"),
        (lambda: LabelMarginalLoss(penalty=("l1",)),
         "penalty: expected one of ['l1', 'kl', 'dice_bias'], got tuple ('l1',)"),
    ],
)
def test_option_that_is_not_a_string(build, message):
    with pytest.raises(TypeError, match=exact(message)):
        build()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: phi_dice_loss(x, y, phi="bci"),
         "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got 'bci' (did you mean 'BCI'?)"),
        (lambda x, y: mime_loss(x, y, reduction="avg"), "reduction: expected one of ['mean', 'sum'], got 'avg'"),
        (lambda x, y: label_marginal_loss(x, y, penalty="KL"),
         "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'KL' (did you mean 'kl'?)"),
        (lambda x, y: leaf_dice_loss(x, y, activation="relu"),
         "activation: expected one of ['softmax', 'sigmoid'], got 'relu'"),
    ],
)
def test_unknown_option_in_the_pure_function(call, message, batch):
    with pytest.raises(ValueError, match=exact(message)):
        call(*batch)


# ------------------------------------------------------------------------------------------------
# softmax-only losses
# ------------------------------------------------------------------------------------------------
def test_negative_mime_refuses_sigmoid_at_construction():
    with pytest.raises(ValueError, match=exact("activation: expected 'softmax' for NegativeMimeLoss, got 'sigmoid'")):
        NegativeMimeLoss(activation="sigmoid")


def test_marginal_dice_refuses_sigmoid_at_construction():
    with pytest.raises(ValueError, match=exact("activation: expected 'softmax' for marginal Dice, got 'sigmoid'")):
        MarginalDiceLoss(activation="sigmoid")


@pytest.mark.parametrize(
    "call, message",
    [
        (negative_mime_loss, "activation: expected 'softmax' for NegativeMimeLoss, got 'sigmoid'"),
        (marginal_dice_loss, "activation: expected 'softmax' for marginal Dice, got 'sigmoid'"),
    ],
)
def test_softmax_only_functions_refuse_sigmoid(call, message):
    x = torch.zeros(1, 2, 2, 2)
    regions = torch.ones(1, 2, 2, 2)
    with pytest.raises(ValueError, match=exact(message)):
        call(x, regions, activation="sigmoid")


# ------------------------------------------------------------------------------------------------
# annotated label sets
# ------------------------------------------------------------------------------------------------
MISSING_LABEL_LOSSES = {"MarginalDiceLoss": MarginalDiceLoss, "LeafDiceLoss": LeafDiceLoss}


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
@pytest.mark.parametrize("shape", [(2, 2), (1, 3), (2, 3, 1), (6,)])
def test_annotated_of_the_wrong_shape(name, shape, batch):
    message = f"annotated: expected shape (2, 3) (samples x channels of x), got shape {shape}"
    with pytest.raises(ValueError, match=exact(message)):
        MISSING_LABEL_LOSSES[name]()(*batch, annotated=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_annotated_of_the_wrong_dtype(name, dtype, batch):
    message = f"annotated: expected a (B, C) tensor of dtype torch.bool, got dtype {dtype}"
    with pytest.raises(TypeError, match=exact(message)):
        MISSING_LABEL_LOSSES[name]()(*batch, annotated=torch.ones(2, 3, dtype=dtype))


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
def test_annotated_not_a_tensor(name, batch):
    message = "annotated: expected a (B, C) bool tensor or None, got list"
    with pytest.raises(TypeError, match=exact(message)):
        MISSING_LABEL_LOSSES[name]()(*batch, annotated=[[True, True, True]] * 2)


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
@pytest.mark.parametrize("sample, cls", [(0, 1), (1, 2)])
def test_annotated_contradicting_y(name, sample, cls, batch):
    # both samples contain classes 1 and 2; marking one of them as not annotated is a contradiction
    annotated = torch.ones(2, 3, dtype=torch.bool)
    annotated[sample, cls] = False
    message = (
        "annotated: expected every class with voxels in y to be marked annotated, "
        f"got sample {sample} with voxels of class {cls} marked as not annotated"
    )
    with pytest.raises(ValueError, match=exact(message)):
        MISSING_LABEL_LOSSES[name]()(*batch, annotated=annotated)


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
def test_annotated_contradicting_a_one_hot_y(name, batch):
    x, y = batch
    one_hot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1)
    annotated = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=exact("got sample 1 with voxels of class 2 marked as not annotated")):
        MISSING_LABEL_LOSSES[name]()(x, one_hot, annotated=annotated)


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
def test_annotated_contradiction_under_the_mask_is_not_an_error(name, batch):
    # the voxels of class 2 that are masked out do not count: with all of them masked, class 2 may be
    # marked missing, and the result is the loss of the same batch with class 2 relabelled background
    x, y = batch
    mask = (y != 2).float()
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    relabelled = torch.where(y == 2, 0, y)
    value = MISSING_LABEL_LOSSES[name]()(x, y, mask, annotated=annotated)
    expected = MISSING_LABEL_LOSSES[name]()(x, relabelled, mask, annotated=annotated)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MISSING_LABEL_LOSSES))
def test_background_column_of_annotated_is_ignored_with_softmax(name, batch):
    # column 0 (background) is documented as ignored with softmax: False there is no contradiction
    # although every sample has background voxels, and gives the same value as True
    x, y = batch
    annotated = torch.ones(2, 3, dtype=torch.bool)
    without_background = annotated.clone()
    without_background[:, 0] = False
    loss = MISSING_LABEL_LOSSES[name]()
    assert loss(x, y, annotated=without_background).item() == loss(x, y, annotated=annotated).item()


def test_annotated_region_with_voxels_may_be_missing_with_sigmoid():
    # with sigmoid, channel 0 is a region like the others, and a region with voxels may be unannotated
    # (a region made of several labels is incomplete when one of them was not annotated): no error,
    # its term is dropped. x = 0 gives s = 1/2 on 2x2 voxels, ε = 0:
    # region 0, y = [1, 1, 0, 0]: Dice = 2·1 / (2 + 2) = 1/2;  region 1, y = 1 everywhere: 2·2 / (2 + 4) = 2/3
    x = torch.zeros(1, 2, 2, 2)
    regions = torch.ones(1, 2, 2, 2)
    regions[0, 0, 1] = 0
    loss = LeafDiceLoss(epsilon=0.0, activation="sigmoid")
    assert loss(x, regions).item() == pytest.approx(1 - (1 / 2 + 2 / 3) / 2, abs=1e-6)
    assert loss(x, regions, annotated=torch.tensor([[False, True]])).item() == pytest.approx(1 - 2 / 3, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# estimate_epsilon
# ------------------------------------------------------------------------------------------------
LABEL_MAP = torch.tensor([[[[0, 1], [1, 2]]], [[[0, 0], [0, 0]]]])  # (2, 1, 2, 2), labels 0..2


@pytest.mark.parametrize("num_classes", [0, -3])
def test_estimate_epsilon_num_classes_value(num_classes):
    with pytest.raises(ValueError, match=exact(f"num_classes: expected an int >= 1, got {num_classes!r}")):
        estimate_epsilon([LABEL_MAP], num_classes)


@pytest.mark.parametrize("num_classes", [2.0, "3", True, None])
def test_estimate_epsilon_num_classes_type(num_classes):
    expected = f"num_classes: expected an int >= 1, got {type(num_classes).__name__} {num_classes!r}"
    with pytest.raises(TypeError, match=exact(expected)):
        estimate_epsilon([LABEL_MAP], num_classes)


def test_estimate_epsilon_empty_iterable():
    message = "targets: expected at least one batch of label maps, got an empty iterable"
    with pytest.raises(ValueError, match=exact(message)):
        estimate_epsilon([], 3)
    with pytest.raises(ValueError, match=exact(message)):
        estimate_epsilon(iter(()), 3)


@pytest.mark.parametrize(
    "targets", [LABEL_MAP, LABEL_MAP.numpy(), LABEL_MAP[:, :, None]], ids=["tensor", "ndarray", "5d"]
)
def test_estimate_epsilon_refuses_a_single_tensor(targets):
    # iterating a single (B, 1, 1, H, W) tensor would yield (1, 1, H, W) "batches" that pass the shape check
    message = (
        "targets: expected an iterable of (B, 1, *spatial) label maps (a list or a dataloader), got a single "
        f"{type(targets).__name__} of shape {tuple(targets.shape)}; wrap it in a list"
    )
    with pytest.raises(TypeError, match=exact(message)):
        estimate_epsilon(targets, 3)


def test_estimate_epsilon_refuses_a_non_iterable():
    with pytest.raises(TypeError, match=exact("targets: expected an iterable of (B, 1, *spatial) label maps, got int")):
        estimate_epsilon(5, 3)


@pytest.mark.parametrize("element, received", [([[0, 1]], "list"), (None, "NoneType"), (3.0, "float")])
def test_estimate_epsilon_element_not_a_tensor(element, received):
    message = f"targets[1]: expected a tensor or numpy array, got {received}"
    with pytest.raises(TypeError, match=exact(message)):
        estimate_epsilon([LABEL_MAP, element], 3)


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 1, 2), (2, 2, 2, 2), (1, 1, 2, 2, 2, 2)])
def test_estimate_epsilon_element_of_the_wrong_shape(shape):
    message = (
        "targets[0]: expected a (B, 1, *spatial) label map or a (B, 3, *spatial) target with 2 or 3 spatial axes, "
        f"got shape {shape}"
    )
    with pytest.raises(ValueError, match=exact(message)):
        estimate_epsilon([torch.zeros(shape, dtype=torch.long)], 3)


@pytest.mark.parametrize("bad_label, value_range", [(3, "[0, 3]"), (-1, "[-1, 2]")])
def test_estimate_epsilon_label_out_of_range(bad_label, value_range):
    second = LABEL_MAP.clone()
    second[1, 0, 1, 1] = bad_label
    message = f"targets[1]: expected labels in [0, 2], got values in {value_range}"
    with pytest.raises(ValueError, match=exact(message)):
        estimate_epsilon([LABEL_MAP, second], 3)


def test_estimate_epsilon_ignore_label_not_an_int():
    with pytest.raises(TypeError, match=exact("ignore_label: expected None or an int label value, got str 'x'")):
        estimate_epsilon([LABEL_MAP], 3, ignore_label="x")


def test_estimate_epsilon_accepts_the_ignore_label():
    # label 3 is the ignore label: not out of range, not counted. Sample 0 has {0: 1, 1: 2, 2: 0} counted
    # voxels (one 2 replaced by 3), sample 1 has 4 background voxels: means (1+4)/2, 2/2, 0/2.
    with_ignore = LABEL_MAP.clone()
    with_ignore[0, 0, 1, 1] = 3
    epsilon = estimate_epsilon([with_ignore], 3, ignore_label=3)
    torch.testing.assert_close(epsilon, torch.tensor([2.5, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: PhiDiceLoss(phi="BI", ddp="yes"),
    lambda: DynamicMimeLoss(phi="BI", ddp=1),
])
def test_ddp_flag_must_be_bool_or_none(make):
    with pytest.raises(TypeError, match="ddp: expected None or a bool, got"):
        make()
