"""Hypothesis fuzzing of every loss: random small 2D/3D shapes, channel counts, label patterns (empty
classes, single-class and all-background images), masks (none, random, all zero, all one), softmax and
sigmoid where allowed, label maps and one-hot targets.

Properties: finite value and gradient; value inside the range its docstring states; module == pure
function; invariances that follow from the definitions (batch order, spatial order, label map vs
one-hot, logits of masked voxels, a common shift of the softmax logits); and per loss the identities
that must survive any input: the mime is a per-voxel sum, Φ = BI/BCI treat the batch as one image,
Φ = I/CI are means of per-sample losses, the dynamic mime has the Dice gradient, and the
missing-label losses reduce to the Φ = I Dice when every class is annotated.

Runs are reproducible (derandomize=True, no example database): CI sees the same examples every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loss_registry import Loss, Variant, variants
from nnunet_losses import MimeLoss, dynamic_mime_loss, leaf_dice_loss, marginal_dice_loss, phi_dice_loss

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLACK = 1e-5  # float32 sums over at most a few hundred voxels


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: torch.Tensor  # float32 logits (B, C, *spatial)
    y: torch.Tensor  # label map (B, 1, *spatial) or one-hot / regions (B, C, *spatial)
    mask: Optional[torch.Tensor]  # None or (B, 1, *spatial) of 0/1
    one_hot: torch.Tensor  # float (B, C, *spatial): the target as one-hot / regions, whatever y's form
    activation: str
    annotated: Optional[torch.Tensor]  # None or (B, C) bool, consistent with y under the mask

    @property
    def counted_target(self) -> torch.Tensor:
        return self.one_hot if self.mask is None else self.one_hot * self.mask


@st.composite
def batches(draw, sigmoid: bool = True, annotated: bool = False, one_hot: bool = True) -> Batch:
    activation = draw(st.sampled_from(["softmax", "sigmoid"] if sigmoid else ["softmax"]))
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 5 if ndim == 2 else 3)) for _ in range(ndim))
    size = (draw(st.integers(1, 3)), draw(st.integers(1 if activation == "sigmoid" else 2, 4)))
    batch, channels = size
    pattern = draw(st.sampled_from(["random", "empty_classes", "single_class", "background"]))
    mask_kind = draw(st.sampled_from(["none", "random", "zeros", "ones"]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    x = scale * torch.randn(batch, channels, *spatial, generator=generator)
    if activation == "softmax":
        if pattern == "random":
            labels = torch.randint(0, channels, (batch, 1, *spatial), generator=generator)
        elif pattern == "empty_classes":  # only background and class 1: classes 2.. are empty
            labels = torch.randint(0, 2, (batch, 1, *spatial), generator=generator)
        elif pattern == "single_class":  # one class fills the image, background included
            labels = torch.full((batch, 1, *spatial), draw(st.integers(0, channels - 1)))
        else:
            labels = torch.zeros(batch, 1, *spatial, dtype=torch.long)
        target = torch.nn.functional.one_hot(labels[:, 0], channels).movedim(-1, 1).float()
        y = target if (one_hot and draw(st.booleans())) else labels
    else:
        if pattern == "random":
            target = (torch.rand(batch, channels, *spatial, generator=generator) < 0.5).float()
        elif pattern == "empty_classes":  # the first region may have voxels, the others are empty
            target = torch.zeros(batch, channels, *spatial)
            target[:, 0] = (torch.rand(batch, *spatial, generator=generator) < 0.5).float()
        elif pattern == "single_class":
            target = torch.zeros(batch, channels, *spatial)
            target[:, draw(st.integers(0, channels - 1))] = 1
        else:
            target = torch.zeros(batch, channels, *spatial)
        y = target

    if mask_kind == "none":
        mask = None
    elif mask_kind == "random":
        mask = (torch.rand(batch, 1, *spatial, generator=generator) < 0.6).float()
    else:
        mask = torch.full((batch, 1, *spatial), 0.0 if mask_kind == "zeros" else 1.0)

    table = None
    if annotated and draw(st.booleans()):
        # a label set consistent with y: every class with counted voxels, plus random extra (empty) ones
        counted = target if mask is None else target * mask
        present = counted.flatten(2).sum(-1) > 0
        table = present | (torch.rand(batch, channels, generator=generator) < 0.5)
    return Batch(x, y, mask, target, activation, table)


def value_and_grad(loss: Callable, x: torch.Tensor, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args, **kwargs)
    value.backward()
    return value.detach(), x.grad


def grad_slack(grad: torch.Tensor) -> float:
    """Absolute tolerance for gradients: relative to the largest entry, with a floor for the rounding
    noise of gradients that are exactly 0 in exact arithmetic (e.g. a Dice of exactly 1)."""
    return SLACK * grad.abs().max().item() + 1e-7


def close(actual, expected, what: str, rtol: float = 1e-5, atol: float = SLACK):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# every loss (tests/loss_registry.py): module, function, its fuzz configurations and documented range
# ------------------------------------------------------------------------------------------------
FUZZED = {variant.id: (loss, variant) for loss, variant in variants("fuzz")}


def build(loss: Loss, variant: Variant, batch: Batch):
    """(module, function with the same options, options) for this batch's channel count and activation."""
    options = variant.resolve(batch.x.shape[1])
    if loss.sigmoid:
        options["activation"] = batch.activation
    extra = {"annotated": batch.annotated} if loss.annotated else {}

    module = loss.module(**options)

    def call_module(x, y, mask, **overrides):
        return module(x, y, mask, **{**extra, **overrides})

    def call_function(x, y, mask, **overrides):
        return loss.function(x, y, mask, **options, **{**extra, **overrides})

    return call_module, call_function, options


def check_properties(name: str, batch: Batch):
    entry, variant = FUZZED[name]
    loss, function, options = build(entry, variant, batch)
    x, y, mask = batch.x, batch.y, batch.mask

    value, grad = value_and_grad(loss, x, y, mask)
    assert torch.isfinite(value), f"loss {value}"
    assert torch.isfinite(grad).all(), "gradient with NaN/Inf"

    low, high = entry.value_range(x, y, mask, batch.activation, {**entry.defaults, **options})
    assert low - SLACK <= float(value) <= high + SLACK, f"{float(value)} outside [{low}, {high}]"

    close(function(x, y, mask), value, "module == function", rtol=0, atol=0)

    # batch order does not matter (every loss sums or averages over samples)
    order = torch.arange(x.shape[0] - 1, -1, -1)
    permuted = {"annotated": batch.annotated[order]} if batch.annotated is not None else {}
    value_p, grad_p = value_and_grad(loss, x[order], y[order], None if mask is None else mask[order], **permuted)
    close(value_p, value, "batch permutation: value")
    close(grad_p, grad[order], "batch permutation: gradient", atol=grad_slack(grad))

    # spatial order does not matter (every sum runs over all voxels)
    axes = tuple(range(2, x.ndim))
    value_f, grad_f = value_and_grad(loss, x.flip(axes), y.flip(axes), None if mask is None else mask.flip(axes))
    close(value_f, value, "spatial flip: value")
    close(grad_f, grad.flip(axes), "spatial flip: gradient", atol=grad_slack(grad))

    # a label map and its one-hot encoding are the same target
    if batch.activation == "softmax":
        value_o, grad_o = value_and_grad(loss, x, batch.one_hot, mask)
        close(value_o, value, "one-hot vs label map: value")
        close(grad_o, grad, "one-hot vs label map: gradient", atol=grad_slack(grad))

    if mask is not None:
        # logits of masked voxels cannot matter: same value, and no gradient reaches them
        noise = 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        value_m = loss(x + noise * (1 - mask), y, mask)
        close(value_m, value, "changing masked logits")
        assert torch.count_nonzero(grad * (1 - mask)) == 0, "gradient on masked voxels"

    if batch.activation == "softmax":
        # softmax (and the tempered softmax of the label-marginal penalty) ignores a per-voxel shift
        shift = 3 * torch.randn((x.shape[0], 1, *x.shape[2:]), generator=torch.Generator().manual_seed(1))
        close(loss(x + shift, y, mask), value, "common shift of the logits", rtol=1e-4, atol=1e-4)


def _make_test(name: str):
    spec, _ = FUZZED[name]

    @FUZZ
    @given(batch=batches(sigmoid=spec.sigmoid, annotated=spec.annotated))
    def test(batch):
        check_properties(name, batch)

    test.__name__ = f"test_properties_{name}"
    return test


# one test per loss, so a failure names the loss and each loss gets its own examples
for _name in FUZZED:
    globals()[f"test_properties_{_name}"] = _make_test(_name)


# ------------------------------------------------------------------------------------------------
# per-loss identities under fuzzing
# ------------------------------------------------------------------------------------------------
@FUZZ
@given(
    batch=batches(),
    voxel=st.integers(0, 10_000),
    include_background=st.booleans(),
)
def test_mime_masking_a_voxel_removes_exactly_its_contribution(batch, voxel, include_background):
    # the mime is linear in s: with reduction="sum" each counted voxel adds Σ_c w_c s_c, w = b - (a + b) y
    x, y = batch.x, batch.y
    channels = x.shape[1]
    a = torch.tensor([0.5 + k for k in range(channels)], dtype=torch.float64)
    b = torch.tensor([0.2 * (k + 1) for k in range(channels)], dtype=torch.float64)
    loss = MimeLoss(a=a.clone(), b=b.clone(), include_background=include_background, activation=batch.activation,
                    reduction="sum")
    mask = torch.ones((x.shape[0], 1, *x.shape[2:])) if batch.mask is None else batch.mask
    sample, index = divmod(voxel % mask[:, 0].numel(), mask[0, 0].numel())
    without = mask.clone()
    without[sample].view(-1)[index] = 0

    value, grad = value_and_grad(loss, x, y, mask)
    value_without, grad_without = value_and_grad(loss, x, y, without)

    if batch.activation == "softmax":
        probs = torch.softmax(x.double(), 1)
        if not include_background:  # channel 0 gets w = 0
            a[0] = b[0] = 0
    else:
        probs = torch.sigmoid(x.double())
    view = (1, -1) + (1,) * (x.ndim - 2)
    weights = b.view(view) - (a + b).view(view) * batch.one_hot.double()
    contribution = (weights * probs)[sample].sum(0).view(-1)[index] * mask[sample].view(-1)[index]
    close(value - value_without, contribution.float(), "removed contribution", atol=1e-4)

    # and only that voxel's gradient changes, to exactly zero
    grad_v = grad_without.movedim(1, -1)[sample].reshape(-1, channels)
    assert torch.count_nonzero(grad_v[index]) == 0
    expected = grad.clone()
    expected.movedim(1, -1)[sample].view(-1, channels)[index] = 0
    close(grad_without, expected, "other voxels' gradients", rtol=0, atol=0)


@FUZZ
@given(batch=batches(), phi=st.sampled_from(["I", "CI"]), include_background=st.booleans())
def test_image_wise_dice_is_the_mean_over_samples(batch, phi, include_background):
    # Φ = I and CI have subsets inside one sample each, and the same number per sample
    options = {"phi": phi, "include_background": include_background, "activation": batch.activation}
    value = phi_dice_loss(batch.x, batch.y, batch.mask, **options)
    per_sample = [
        phi_dice_loss(batch.x[k:k + 1], batch.y[k:k + 1], None if batch.mask is None else batch.mask[k:k + 1],
                      **options)
        for k in range(batch.x.shape[0])
    ]
    close(value, torch.stack(per_sample).mean(), "mean over samples")


def side_by_side(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The samples of a batch laid next to each other along the last axis: one image, batch size 1."""
    return None if t is None else torch.cat(t.unbind(0), -1).unsqueeze(0)


@FUZZ
@given(batch=batches(), batch_phi=st.sampled_from(["BI", "BCI"]), include_background=st.booleans())
def test_batch_reductions_treat_the_batch_as_one_image(batch, batch_phi, include_background):
    # BI sums each class over samples and voxels, BCI over everything: exactly I and CI of one image
    # made of all samples side by side; the same holds for the dynamic mime (value and gradient)
    image_phi = {"BI": "I", "BCI": "CI"}[batch_phi]
    options = {"include_background": include_background, "activation": batch.activation}
    x, y, mask = batch.x, batch.y, batch.mask
    for function in (phi_dice_loss, dynamic_mime_loss):
        value, grad = value_and_grad(function, x, y, mask, phi=batch_phi, **options)
        value_one, grad_one = value_and_grad(function, side_by_side(x), side_by_side(y), side_by_side(mask),
                                             phi=image_phi, **options)
        close(value_one, value, f"{function.__name__}: value")
        close(grad_one, side_by_side(grad), f"{function.__name__}: gradient",
              atol=grad_slack(grad))


@FUZZ
@given(batch=batches(), phi=st.sampled_from(["I", "CI", "BI", "BCI"]), include_background=st.booleans(),
       epsilon=st.sampled_from([0.0, 1e-7, 1.0, 50.0]))
def test_dynamic_mime_has_the_dice_gradient(batch, phi, include_background, epsilon):
    options = {"phi": phi, "epsilon": epsilon, "include_background": include_background, "activation": batch.activation}
    _, grad_dice = value_and_grad(phi_dice_loss, batch.x, batch.y, batch.mask, **options)
    _, grad_mime = value_and_grad(dynamic_mime_loss, batch.x, batch.y, batch.mask, **options)
    close(grad_mime, grad_dice, "gradient", rtol=1e-4, atol=grad_slack(grad_dice))


@FUZZ
@given(batch=batches(annotated=True), include_background=st.booleans(), epsilon=st.sampled_from([0.0, 1e-7, 2.0]))
def test_missing_label_losses_with_every_class_annotated_are_the_image_wise_dice(batch, include_background, epsilon):
    x, y, mask = batch.x, batch.y, batch.mask
    everything = torch.ones(x.shape[:2], dtype=torch.bool)
    options = {"epsilon": epsilon, "include_background": include_background}
    dice = phi_dice_loss(x, y, mask, phi="I", activation=batch.activation, **options)
    leaf = leaf_dice_loss(x, y, mask, annotated=everything, activation=batch.activation, **options)
    close(leaf, dice, "leaf Dice")
    if batch.activation == "softmax":
        close(marginal_dice_loss(x, y, mask, annotated=everything, **options), dice, "marginal Dice")
