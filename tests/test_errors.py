"""Bad input raises ValueError/TypeError naming what was expected and what was received (docs/losses.md,
"Common conventions"); options known at construction are refused at construction, not at the first
batch of a training run."""

import inspect
import re

import numpy as np
import pytest
import torch

import nnunet_losses
from loss_registry import LOSSES, MODULES, OPTIONS
from nnunet_losses import DynamicMimeLoss, LeafDiceLoss, PhiDiceLoss, estimate_epsilon, phi_dice_loss

# every module (tests/loss_registry.py), by class name: the input checks are shared, so each must apply them
ALL_MODULES = sorted(MODULES)
SIGMOID_MODULES = [name for name in ALL_MODULES if MODULES[name].sigmoid]  # they allow activation="sigmoid"
MISSING_LABEL_LOSSES = [name for name in ALL_MODULES if MODULES[name].annotated]  # they take `annotated`


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
# the registry the property tests read: every public loss, with its true options
# ------------------------------------------------------------------------------------------------
def test_the_registry_has_every_public_loss():
    public = [getattr(nnunet_losses, name) for name in nnunet_losses.__all__]
    modules = {value.__name__ for value in public if isinstance(value, type) and issubclass(value, torch.nn.Module)}
    assert modules == set(MODULES)
    assert all(loss.function.__name__ in nnunet_losses.__all__ for loss in LOSSES.values())


@pytest.mark.parametrize("name", ALL_MODULES)
def test_the_registry_has_the_options_of_the_signatures(name):
    loss = MODULES[name]
    for callable_ in (loss.module, loss.function):
        parameters = inspect.signature(callable_).parameters.values()
        options = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
        assert list(options.items()) == list(loss.defaults.items()), callable_.__name__
    for forward in (loss.module.forward, loss.function):
        assert ("annotated" in inspect.signature(forward).parameters) == loss.annotated
    # every option has invalid values to test, and every buffer is an option
    assert all(option in OPTIONS or option in loss.invalid for option in loss.defaults)
    assert set(loss.state) <= set(loss.defaults)


# ------------------------------------------------------------------------------------------------
# logits x
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 4), (1, 2, 3, 4, 4, 4)])
def test_wrong_rank_of_x(name, shape):
    x = torch.zeros(shape)
    y = torch.zeros(shape, dtype=torch.long)
    message = f"x: expected logits of shape (B, C, H, W) or (B, C, D, H, W), got shape {shape}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, y)


@pytest.mark.parametrize("name", ALL_MODULES)
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
        MODULES[name].module()(x, y)


@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_x_not_floating_point(name, dtype, batch):
    _, y = batch
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=exact(f"x: expected floating-point logits, got dtype {dtype}")):
        MODULES[name].module()(x, y)


@pytest.mark.parametrize("name", ALL_MODULES)
def test_softmax_needs_two_channels(name):
    x = torch.zeros(2, 1, 4, 4)
    y = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=exact("x: expected at least 2 channels for activation='softmax'")):
        MODULES[name].module()(x, y)


# ------------------------------------------------------------------------------------------------
# target y and loss_mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("y_shape", [(2, 1, 4, 5), (1, 1, 4, 4), (2, 1, 4, 4, 1), (2, 1, 4)])
def test_y_shape_does_not_fit_x(name, y_shape, batch):
    x, _ = batch
    message = (
        "y: expected a target of shape (2, 1, 4, 4) (label map) or (2, 3, 4, 4) (one-hot/regions) "
        f"for x of shape (2, 3, 4, 4), got shape {y_shape}"
    )
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, torch.zeros(y_shape, dtype=torch.long))


@pytest.mark.parametrize("name", ALL_MODULES)
def test_y_with_wrong_channel_count(name, batch):
    x, _ = batch
    message = "y: expected 3 channels (one-hot/regions) or 1 channel (label map), got 2"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("name", ALL_MODULES)
def test_y_not_a_tensor(name, batch):
    x, y = batch
    with pytest.raises(TypeError, match=exact("y: expected a torch.Tensor target, got ndarray")):
        MODULES[name].module()(x, y.numpy())


@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 4), (2, 1, 4, 5), (1, 1, 4, 4), (2, 1, 1, 4, 4)])
def test_loss_mask_shape_does_not_fit(name, mask_shape, batch):
    x, y = batch
    message = f"loss_mask: expected shape (2, 1, 4, 4) (1 = voxel counts), got shape {mask_shape}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, y, torch.ones(mask_shape))


@pytest.mark.parametrize("name", ALL_MODULES)
def test_loss_mask_not_a_tensor(name, batch):
    x, y = batch
    with pytest.raises(TypeError, match=exact("loss_mask: expected a torch.Tensor or None, got list")):
        MODULES[name].module()(x, y, [[1.0]])


@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("bad_label, value_range", [(3, "[0, 3]"), (7, "[0, 7]"), (-1, "[-1, 2]")])
def test_label_out_of_range(name, bad_label, value_range, batch):
    x, y = batch
    y[1, 0, 2, 3] = bad_label
    message = f"y: expected labels in [0, 2] for x with 3 channels, got values in {value_range}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, y)


def test_label_out_of_range_mentions_the_ignore_label(batch):
    x, y = batch
    y[0, 0, 0, 0] = 5  # neither a class of x nor the ignore label 4
    message = "y: expected labels in [0, 2] for x with 3 channels (or the ignore label 4), got values in [0, 5]"
    with pytest.raises(ValueError, match=exact(message)):
        PhiDiceLoss(ignore_label=4)(x, y)


@pytest.mark.parametrize("name", ALL_MODULES)
def test_ignore_label_needs_a_label_map(name, batch):
    x, y = batch
    one_hot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1)
    with pytest.raises(ValueError, match=exact("ignore_label: expected a (B, 1, ...) label map target")):
        MODULES[name].module(ignore_label=2)(x, one_hot)


@pytest.mark.parametrize("name", SIGMOID_MODULES)
def test_sigmoid_with_a_label_map(name, batch):
    x, y = batch
    message = "y: expected a (B, 3, ...) region target for activation='sigmoid'"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module(activation="sigmoid")(x, y)


# ------------------------------------------------------------------------------------------------
# options: every invalid value of every option of every loss (tests/loss_registry.py: OPTIONS and each
# loss's own), with the "did you mean" hint for string options
# ------------------------------------------------------------------------------------------------
INVALID_OPTIONS = [
    pytest.param(loss, option, invalid, id=f"{loss.module.__name__}-{option}-{index}")
    for loss in LOSSES.values()
    for index, (option, invalid) in enumerate(loss.invalid_values())
]


@pytest.mark.parametrize("loss, option, invalid", INVALID_OPTIONS)
def test_invalid_option_at_construction(loss, option, invalid):
    with pytest.raises(invalid.error, match=invalid.pattern):
        loss.module(**invalid.others, **{option: invalid.value})


@pytest.mark.parametrize("loss, option, invalid", INVALID_OPTIONS)
def test_invalid_option_in_the_pure_function(loss, option, invalid, batch):
    with pytest.raises(invalid.error, match=invalid.pattern):
        loss.function(*batch, **invalid.others, **{option: invalid.value})


@pytest.mark.parametrize("name", [name for name in ALL_MODULES if not MODULES[name].sigmoid])
def test_softmax_only_losses_refuse_sigmoid_regions(name):
    loss = MODULES[name]
    (refusal,) = [invalid for invalid in loss.invalid["activation"] if invalid.value == "sigmoid"]
    with pytest.raises(refusal.error, match=refusal.pattern):
        loss.module(activation="sigmoid")
    with pytest.raises(refusal.error, match=refusal.pattern):
        loss.function(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), activation="sigmoid")


@pytest.mark.parametrize("loss, option", [
    pytest.param(loss, option, id=f"{loss.module.__name__}-{option}")
    for loss in LOSSES.values() for option in loss.state
])
def test_per_class_values_of_the_wrong_length(loss, option, batch):
    # the number of classes is known only when x arrives, so this one is refused at the first call
    message = f"{option}: expected one value per channel of x (3), got 2 values"
    with pytest.raises(ValueError, match=exact(message)):
        loss.module(**{option: [1.0, 1.0]})(*batch)


@pytest.mark.parametrize(
    "loss",
    [
        PhiDiceLoss(phi="BI", epsilon=[1.0, 1.0, 1.0, 1.0]),
        DynamicMimeLoss(phi="BI", epsilon=[1.0, 1.0]),
    ],
    ids=repr,
)
def test_per_class_epsilon_of_the_wrong_length_with_a_batch_phi(loss, batch):
    count = loss.epsilon.numel()
    message = f"epsilon: expected one value per channel of x (3), got {count} values"
    with pytest.raises(ValueError, match=exact(message)):
        loss(*batch)


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
# annotated label sets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
@pytest.mark.parametrize("shape", [(2, 2), (1, 3), (2, 3, 1), (6,)])
def test_annotated_of_the_wrong_shape(name, shape, batch):
    message = f"annotated: expected shape (2, 3) (samples x channels of x), got shape {shape}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(*batch, annotated=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_annotated_of_the_wrong_dtype(name, dtype, batch):
    message = f"annotated: expected a (B, C) tensor of dtype torch.bool, got dtype {dtype}"
    with pytest.raises(TypeError, match=exact(message)):
        MODULES[name].module()(*batch, annotated=torch.ones(2, 3, dtype=dtype))


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
def test_annotated_not_a_tensor(name, batch):
    message = "annotated: expected a (B, C) bool tensor or None, got list"
    with pytest.raises(TypeError, match=exact(message)):
        MODULES[name].module()(*batch, annotated=[[True, True, True]] * 2)


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
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
        MODULES[name].module()(*batch, annotated=annotated)


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
def test_annotated_contradicting_a_one_hot_y(name, batch):
    x, y = batch
    one_hot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1)
    annotated = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=exact("got sample 1 with voxels of class 2 marked as not annotated")):
        MODULES[name].module()(x, one_hot, annotated=annotated)


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
def test_annotated_contradiction_under_the_mask_is_not_an_error(name, batch):
    # the voxels of class 2 that are masked out do not count: with all of them masked, class 2 may be
    # marked missing, and the result is the loss of the same batch with class 2 relabelled background
    x, y = batch
    mask = (y != 2).float()
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    relabelled = torch.where(y == 2, 0, y)
    value = MODULES[name].module()(x, y, mask, annotated=annotated)
    expected = MODULES[name].module()(x, relabelled, mask, annotated=annotated)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", MISSING_LABEL_LOSSES)
def test_background_column_of_annotated_is_ignored_with_softmax(name, batch):
    # column 0 (background) is documented as ignored with softmax: False there is no contradiction
    # although every sample has background voxels, and gives the same value as True
    x, y = batch
    annotated = torch.ones(2, 3, dtype=torch.bool)
    without_background = annotated.clone()
    without_background[:, 0] = False
    loss = MODULES[name].module()
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
