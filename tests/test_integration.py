"""The losses inside the machinery a training run puts around them: nnU-Net's DeepSupervisionWrapper,
torch.compile on CPU (no CUDA), dtype moves and state_dict of the modules' buffers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from loss_registry import LOSSES as REGISTRY
from loss_registry import PROPERTY_TESTS, variants
from nnunet_losses import MimeLoss, PhiDiceLoss, phi_dice_loss

CHANNELS = 3

# every loss's deep-supervision configurations (tests/loss_registry.py): id -> (loss, variant)
LOSSES = {variant.id: (loss, variant) for loss, variant in variants("integration")}


def nnunet_weights(scales: int) -> list:
    """nnU-Net's deep-supervision weights (nnUNetTrainer._build_loss, single process): 1/2^k, the
    lowest resolution weighted 0, normalised to sum 1."""
    weights = np.array([1 / (2**k) for k in range(scales)])
    weights[-1] = 0
    return list(weights / weights.sum())


def pyramid(scales: int, sigmoid: bool, seed: int):
    """Network outputs, targets and masks at ``scales`` resolutions, targets downsampled by taking every
    second voxel (what nnU-Net's nearest-neighbour target downsampling does for factors of 2)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CHANNELS, (2, 1, 16, 12), generator=generator)
    labels[1][labels[1] == 2] = 1  # sample 1 has no class 2 (marked missing where label sets are used)
    mask = (torch.rand(2, 1, 16, 12, generator=generator) < 0.8).float()
    outputs, targets, masks = [], [], []
    for k in range(scales):
        step = 2**k
        level_labels = labels[..., ::step, ::step]
        outputs.append(2 * torch.randn(2, CHANNELS, *level_labels.shape[2:], generator=generator))
        if sigmoid:
            targets.append(torch.nn.functional.one_hot(level_labels[:, 0], CHANNELS).movedim(-1, 1).float())
        else:
            targets.append(level_labels)
        masks.append(mask[..., ::step, ::step])
    return outputs, targets, masks


@pytest.mark.parametrize("scales", [2, 3])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_deep_supervision_wrapper_is_the_weighted_sum(name, scales):
    entry, variant = LOSSES[name]
    loss = entry.module(**variant.resolve(CHANNELS))
    outputs, targets, masks = pyramid(scales, sigmoid=variant.activation == "sigmoid", seed=scales)
    weights = nnunet_weights(scales)
    # the wrapper zips its list arguments, so MarginalDiceLoss/LeafDiceLoss get their annotated
    # table per scale as a fourth list (the label sets do not depend on the resolution)
    extra = []
    if entry.annotated:  # class 2 missing in sample 1 (pyramid() leaves no voxel of it there)
        annotated = torch.tensor([[True, True, True], [True, True, False]])
        extra = [[annotated] * scales]

    wrapped_outputs = [o.clone().requires_grad_(True) for o in outputs]
    value = DeepSupervisionWrapper(loss, weights)(wrapped_outputs, targets, masks, *extra)
    value.backward()

    separate_outputs = [o.clone().requires_grad_(True) for o in outputs]
    expected = sum(
        w * loss(o, t, m, *(e[k] for e in extra))
        for k, (w, o, t, m) in enumerate(zip(weights, separate_outputs, targets, masks))
        if w != 0
    )
    expected.backward()

    torch.testing.assert_close(value.detach(), expected.detach(), rtol=0, atol=1e-7)
    for k, (wrapped, separate) in enumerate(zip(wrapped_outputs, separate_outputs)):
        if weights[k] == 0:  # the wrapper does not even call the loss there: no gradient at all
            assert wrapped.grad is None
        else:
            torch.testing.assert_close(wrapped.grad, separate.grad, rtol=0, atol=1e-8)
    # and the scales really contribute: the loss differs between the two finest scales
    assert abs(float(loss(outputs[0], targets[0], masks[0], *(e[0] for e in extra)))
               - float(loss(outputs[1], targets[1], masks[1], *(e[1] for e in extra)))) > 1e-4


# ------------------------------------------------------------------------------------------------
# torch.compile on CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_loss",
    [lambda: PhiDiceLoss(phi="BI", epsilon=[0.5, 1.0, 2.0]), lambda: MimeLoss(a=[1.0, 1.9, 3.0], b=0.1)],
    ids=["PhiDiceLoss", "MimeLoss"],
)
def test_compiled_loss_equals_eager(make_loss):
    # inductor on CPU generates C++ and needs a C compiler (gcc); the loss keeps one graph break on
    # purpose (the label range check reads two numbers on the host), which compile handles
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(2, CHANNELS, 4, 6, 5, generator=generator)
    y = torch.randint(0, CHANNELS, (2, 1, 4, 6, 5), generator=generator)
    mask = (torch.rand(2, 1, 4, 6, 5, generator=generator) < 0.7).float()
    loss = make_loss()
    compiled = torch.compile(loss)

    x_eager = x.clone().requires_grad_(True)
    eager = loss(x_eager, y, mask)
    eager.backward()
    x_compiled = x.clone().requires_grad_(True)
    value = compiled(x_compiled, y, mask)
    value.backward()

    torch.testing.assert_close(value, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# buffers: dtype moves and state_dict
# ------------------------------------------------------------------------------------------------
# module -> (build from buffer values, buffer values), for every loss with buffers (tests/loss_registry.py:
# its `state`, every value exactly representable in float32, and `state_options`)
BUFFERED = {
    loss.module.__name__: (lambda v, loss=loss: loss.module(**loss.state_options, **v), dict(loss.state))
    for loss in REGISTRY.values() if loss.state
}


def other_values(values: dict) -> dict:
    """Same shapes, different numbers."""
    return {key: [9.0] * len(v) if isinstance(v, list) else 9.0 for key, v in values.items()}


def sample_batch(dtype=torch.float32):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, CHANNELS, 5, 4, generator=generator).to(dtype)
    y = torch.randint(0, CHANNELS, (2, 1, 5, 4), generator=generator)
    return x, y


@pytest.mark.parametrize("name", sorted(BUFFERED))
def test_state_dict_holds_the_buffers(name):
    build, values = BUFFERED[name]
    state = build(values).state_dict()
    assert sorted(state) == sorted(values)
    for key, expected in values.items():
        torch.testing.assert_close(state[key], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(BUFFERED))
def test_load_state_dict_restores_the_values(name):
    # what a trainer relies on to restore e.g. the heuristic ε of a checkpoint: a module built with
    # other values computes, after load_state_dict, exactly what the saved one computed
    build, values = BUFFERED[name]
    saved, fresh = build(values), build(other_values(values))
    x, y = sample_batch()
    assert not torch.equal(fresh(x, y), saved(x, y))
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh(x, y), saved(x, y))


@pytest.mark.parametrize("name", sorted(BUFFERED))
def test_buffers_follow_dtype_moves(name):
    build, values = BUFFERED[name]
    loss = build(values)
    x, y = sample_batch(torch.float64)
    reference = loss(x, y)

    assert loss.to(torch.float64) is loss  # nn.Module.to moves in place
    for key in values:
        assert getattr(loss, key).dtype == torch.float64
    result = loss(x, y)
    assert result.dtype == torch.float64  # float64 logits keep float64 sums
    torch.testing.assert_close(result, reference, rtol=0, atol=0)

    copied = copy.deepcopy(loss).to(torch.float32)
    for key, expected in values.items():
        buffer = getattr(copied, key)
        assert buffer.dtype == torch.float32
        torch.testing.assert_close(buffer, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)
        assert getattr(loss, key).dtype == torch.float64  # the original is untouched
    # the values are exact in float32, so the float32 buffers give the same float64 loss
    torch.testing.assert_close(copied(x, y), reference, rtol=0, atol=1e-12)


def test_heuristic_epsilon_written_into_the_buffer():
    # a trainer builds the loss first and writes the estimated ε later: in place (copy_) when the
    # shape is known, or by assigning a new tensor to the buffer (scalar -> per class); either way the
    # loss uses it and state_dict carries it
    x, y = sample_batch()
    estimated = torch.tensor([0.0, 12.0, 3.0], dtype=torch.float64)
    expected = phi_dice_loss(x, y, phi="I", epsilon=estimated.tolist())

    in_place = PhiDiceLoss(phi="I", epsilon=[1.0, 1.0, 1.0])
    in_place.epsilon.copy_(estimated)
    torch.testing.assert_close(in_place(x, y), expected, rtol=0, atol=0)

    assigned = PhiDiceLoss(phi="I")
    assigned.epsilon = estimated.clone()
    torch.testing.assert_close(assigned(x, y), expected, rtol=0, atol=0)
    torch.testing.assert_close(assigned.state_dict()["epsilon"], estimated, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_state_dict_holds_the_buffers_and_nothing_else(name):
    # in every configuration of every property test, and with the defaults: a module without
    # hyperparameter tensors (negative mime, label-marginal) has an empty state_dict
    loss = REGISTRY[name]
    configurations = [{}] + [variant.resolve(CHANNELS) for test in PROPERTY_TESTS
                             for entry, variant in variants(test) if entry is loss]
    for options in configurations:
        assert sorted(loss.module(**options).state_dict()) == sorted(loss.state), options
