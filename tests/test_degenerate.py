"""Valid but degenerate input gives a finite loss and finite gradients, never NaN/Inf (docs/losses.md,
"Common conventions"): empty classes, empty patches, everything masked, samples without any annotated
class, saturated half-precision logits, bfloat16 logits and float32 logits under CPU bfloat16 autocast
(sums and result in float32)."""

import pytest
import torch

from loss_registry import variants
from nnunet_losses import LeafDiceLoss, MarginalDiceLoss

BATCH, CHANNELS = 2, 4

# every loss (tests/loss_registry.py) in the configurations that stress different code paths: ε = 0 (no
# smoothing, the clamped denominator alone keeps 0/0 away), per-class ε, background in or out, sum vs mean
ALL_LOSSES = {variant.id: (loss, variant) for loss, variant in variants("degenerate")}


def build(name: str):
    loss, variant = ALL_LOSSES[name]
    return loss.module(**variant.resolve(CHANNELS))


def degenerate_case(case: str, spatial: tuple):
    """A degenerate ``(labels, loss_mask)`` pair: labels ``(B, 1, *spatial)``, mask None or ``(B, 1, *spatial)``."""
    generator = torch.Generator().manual_seed(0)
    random_labels = torch.randint(0, CHANNELS, (BATCH, 1, *spatial), generator=generator)
    mask = None
    if case == "empty_classes":  # classes 2 and 3 absent from every sample
        labels = torch.randint(0, 2, (BATCH, 1, *spatial), generator=generator)
    elif case == "empty_patch":  # all background
        labels = torch.zeros(BATCH, 1, *spatial, dtype=torch.long)
    elif case == "single_class":  # one foreground class fills the patch: background is empty
        labels = torch.full((BATCH, 1, *spatial), 2)
    elif case == "all_masked":
        labels, mask = random_labels, torch.zeros(BATCH, 1, *spatial)
    elif case == "one_voxel_counted":
        labels, mask = random_labels, torch.zeros(BATCH, 1, *spatial)
        mask.view(BATCH, -1)[1, 3] = 1
    elif case == "sample_masked_out":  # sample 0 entirely ignored, sample 1 normal
        labels, mask = random_labels, torch.ones(BATCH, 1, *spatial)
        mask[0] = 0
    else:
        raise AssertionError(case)
    return labels, mask


CASES = ["empty_classes", "empty_patch", "single_class", "all_masked", "one_voxel_counted", "sample_masked_out"]
SPATIAL = [(5, 6), (3, 4, 5)]


def target_for(name: str, labels: torch.Tensor) -> torch.Tensor:
    """Label map for softmax losses, one region per channel (one-hot) for sigmoid ones."""
    if ALL_LOSSES[name][1].activation == "sigmoid":
        return torch.nn.functional.one_hot(labels[:, 0], CHANNELS).movedim(-1, 1).float()
    return labels


def saturated_logits(spatial: tuple, dtype: torch.dtype) -> torch.Tensor:
    """±60 logits where every channel takes both signs: +60 where (voxel index + channel) is even."""
    voxel = torch.arange(torch.Size(spatial).numel()).view(1, 1, *spatial)
    channel = torch.arange(CHANNELS).view(1, CHANNELS, *([1] * len(spatial)))
    sign = 1 - 2 * ((voxel + channel) % 2)
    return (60.0 * sign).expand(BATCH, CHANNELS, *spatial).to(dtype)


def value_and_grad(loss, x, y, mask, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = loss(x, y, mask)
    value.backward()
    return value.detach(), x.grad


def logit_variants(spatial):
    """(description, logits, under autocast?) -- the low-precision inputs a training run may send."""
    generator = torch.Generator().manual_seed(1)
    normal = 3 * torch.randn(BATCH, CHANNELS, *spatial, generator=generator)
    return [
        ("float32", normal, False),
        ("float16 ±60", saturated_logits(spatial, torch.float16), False),
        ("bfloat16 ±60", saturated_logits(spatial, torch.bfloat16), False),
        ("bfloat16", normal.to(torch.bfloat16), False),
        ("float32 under bfloat16 autocast", normal, True),
    ]


@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_finite_value_and_gradient(name, case, spatial):
    labels, mask = degenerate_case(case, spatial)
    y = target_for(name, labels)
    loss = build(name)
    for description, x, autocast in logit_variants(spatial):
        value, grad = value_and_grad(loss, x, y, mask, autocast)
        assert torch.isfinite(value), f"{description}: loss {value}"
        assert torch.isfinite(grad).all(), f"{description}: gradient with NaN/Inf"
        assert grad.dtype == x.dtype, f"{description}: gradient dtype {grad.dtype} for logits {x.dtype}"
        # the sums (hence the result) are float32 whatever the logits' precision
        assert value.dtype == torch.float32, f"{description}: result dtype {value.dtype}"
        # low-precision logits are upcast before anything is computed, so the value is that of the
        # float32 copy of the same logits, and autocast changes nothing in the loss
        reference, reference_grad = value_and_grad(loss, x.float(), y, mask)
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6, msg=description)
        torch.testing.assert_close(grad.float(), reference_grad.to(grad.dtype).float(), rtol=0, atol=0, msg=description)


# what everything masked gives (each configuration's ``everything_masked``): no counted voxel means no
# gradient at all, and a value fixed by the definitions -- mimes and CE: an empty sum, 0; Dice with ε > 0:
# (0 + ε)/(0 + ε) = 1, loss 0; Dice with ε = 0: 0 / clamp(0) = 0, loss 1 (marginal Dice keeps its merged
# background term, leaf Dice keeps no term since nothing is present: loss 0 by definition)
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_everything_masked(name):
    labels, mask = degenerate_case("all_masked", (5, 6))
    x = 3 * torch.randn(BATCH, CHANNELS, 5, 6, generator=torch.Generator().manual_seed(2))
    value, grad = value_and_grad(build(name), x, target_for(name, labels), mask)
    assert value.item() == pytest.approx(ALL_LOSSES[name][1].everything_masked, abs=1e-6)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_masked_out_sample_gets_no_gradient(name):
    # sample 0 is entirely masked: whatever the loss, its logits cannot matter
    labels, mask = degenerate_case("sample_masked_out", (5, 6))
    x = 3 * torch.randn(BATCH, CHANNELS, 5, 6, generator=torch.Generator().manual_seed(3))
    _, grad = value_and_grad(build(name), x, target_for(name, labels), mask)
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[1]) > 0


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_leaf_dice_without_any_annotated_class(include_background, activation):
    # no (sample, class) term is left: the loss is 0 with a zero gradient, not 0/0 = NaN
    labels = torch.zeros(BATCH, 1, 5, 6, dtype=torch.long)
    x = 3 * torch.randn(BATCH, CHANNELS, 5, 6, generator=torch.Generator().manual_seed(4))
    if activation == "sigmoid":
        y = torch.zeros(BATCH, CHANNELS, 5, 6)  # every region empty, so none counts as annotated
    else:
        y = labels
    loss = LeafDiceLoss(include_background=include_background, activation=activation)
    for annotated in (None, torch.zeros(BATCH, CHANNELS, dtype=torch.bool)):
        x_ = x.clone().requires_grad_(True)
        value = loss(x_, y, annotated=annotated)
        value.backward()
        assert value.item() == 0.0
        assert torch.count_nonzero(x_.grad) == 0


def test_leaf_dice_sample_without_annotated_class_does_not_count():
    # sample 0 has no annotated class (all background, nothing annotated): it gets a zero gradient and
    # the batch's loss is that of sample 1 alone (its terms are the only ones in the mean)
    generator = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(BATCH, CHANNELS, 5, 6, generator=generator)).requires_grad_(True)
    labels = torch.randint(0, CHANNELS, (BATCH, 1, 5, 6), generator=generator)
    labels[0] = 0
    annotated = torch.tensor([[False] * CHANNELS, [True] * CHANNELS])
    loss = LeafDiceLoss(include_background=True)
    value = loss(x, labels, annotated=annotated)
    value.backward()
    assert torch.count_nonzero(x.grad[0]) == 0
    alone = loss(x[1:].detach(), labels[1:], annotated=annotated[1:])
    torch.testing.assert_close(value.detach(), alone, rtol=0, atol=1e-7)


def test_marginal_dice_sample_with_every_class_missing():
    # every foreground class missing: all probability mass is merged into the background, whose target
    # covers the whole patch, so the merged background Dice is 2n/(n + n) = 1 and the loss 0
    x = (3 * torch.randn(BATCH, CHANNELS, 5, 6, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    labels = torch.zeros(BATCH, 1, 5, 6, dtype=torch.long)
    annotated = torch.zeros(BATCH, CHANNELS, dtype=torch.bool)
    value = MarginalDiceLoss(epsilon=0.0)(x, labels, annotated=annotated)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() < 1e-6
