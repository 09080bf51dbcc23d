"""Hard to break (docs/validation.md): every bad input is a one-line error naming what was expected and
what was received, nothing is silently wrong.

* tensor values a host read decides (one-hot / region values, mask weights) and empty sizes, on every
  module of tests/loss_registry.py, messages matched verbatim; soft targets and weighted masks, which
  are valid, give the values their definitions say;
* the options of the two public helpers (``marginal_penalty``, ``dice_gradient_weights``);
* double backward (``create_graph=True``): float64 ``gradgradcheck`` where a loss supports it
  (:attr:`Loss.double_backward`), the refusal where it does not;
* a hypothesis test feeding bad values to every parameter of every public function and module
  (``nnunet_losses.__all__``): only ValueError / TypeError naming the parameter may come out, and a
  call that succeeds must have had a value docs/losses.md calls valid.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnunet_losses as nl
from loss_registry import MODULES, PHIS, TARGET_FORMS, variants
from nnunet_losses.losses import _inputs

pytestmark = pytest.mark.usefixtures("single_threaded")

ALL_MODULES = sorted(MODULES)


def exact(message: str) -> str:
    """A pytest.raises pattern that matches the whole ``message`` literally."""
    return re.escape(message) + "$"


@pytest.fixture
def batch():
    """Two 4x4 samples, 3 channels, every label used; the one-hot target as float."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator)
    labels = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 2], [0, 0, 0, 1], [2, 2, 1, 0]]).expand(2, 1, 4, 4).clone()
    return x, labels, torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()


# ------------------------------------------------------------------------------------------------
# tensor values and sizes, on every module
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MODULES)
def test_one_hot_values_outside_0_1(name, batch):
    x, _, one_hot = batch
    one_hot[0, 1, 0, 0], one_hot[1, 2, 3, 3] = 5.0, -1.0
    with pytest.raises(ValueError, match=exact("y: expected one-hot/region values in [0, 1], got values in [-1, 5]")):
        MODULES[name].module()(x, one_hot)


@pytest.mark.parametrize("name", ALL_MODULES)
def test_one_hot_with_nan(name, batch):
    x, _, one_hot = batch
    one_hot[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=exact("y: expected one-hot/region values in [0, 1], got NaN values")):
        MODULES[name].module()(x, one_hot)


@pytest.mark.parametrize("name", [name for name in ALL_MODULES if MODULES[name].sigmoid])
def test_region_values_outside_0_1_even_under_the_mask(name, batch):
    # masked voxels are checked too: their 0 weight would not cancel a NaN or keep an Inf out (0 · Inf = NaN)
    x, _, regions = batch
    regions[0, 2, 1, 1] = 2.0
    mask = torch.ones(2, 1, 4, 4)
    mask[0, 0, 1, 1] = 0
    with pytest.raises(ValueError, match=exact("y: expected one-hot/region values in [0, 1], got values in [0, 2]")):
        MODULES[name].module(activation="sigmoid")(x, regions, mask)


@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("bad, received", [(-1.0, "got values in [-1, 1]"), (float("inf"), "got values in [0, inf]"),
                                           (float("nan"), "got NaN values")])
def test_loss_mask_weights_negative_or_not_finite(name, bad, received, batch):
    x, labels, _ = batch
    mask = torch.ones(2, 1, 4, 4)
    mask[1, 0, 0, 2], mask[0, 0, 0, 0] = bad, 0.0
    message = f"loss_mask: expected finite weights >= 0 (1 = voxel counts), {received}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, labels, mask)


@pytest.mark.parametrize("name", ALL_MODULES)
def test_complex_loss_mask(name, batch):
    x, labels, _ = batch
    with pytest.raises(TypeError, match=exact("loss_mask: expected a real-valued tensor, got dtype torch.complex64")):
        MODULES[name].module()(x, labels, torch.ones(2, 1, 4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("name", ALL_MODULES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 4, 0), (0, 3, 0, 4)])
def test_empty_batch_or_patch(name, shape):
    # B = 0 or a spatial size of 0 has no loss to define (a mean over nothing): refused, not NaN or IndexError
    x = torch.zeros(shape)
    y = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.long)
    message = f"x: expected at least one sample, channel and voxel, got shape {shape}"
    with pytest.raises(ValueError, match=exact(message)):
        MODULES[name].module()(x, y)


@pytest.mark.parametrize("name", [name for name in ALL_MODULES if MODULES[name].sigmoid])
def test_no_channel(name):
    with pytest.raises(ValueError, match=exact("x: expected at least one sample, channel and voxel, got shape (2, 0, 4, 4)")):
        MODULES[name].module(activation="sigmoid")(torch.zeros(2, 0, 4, 4), torch.zeros(2, 0, 4, 4))


def test_soft_targets_are_valid_and_linear_in_the_mime(batch):
    # values in [0, 1] need not be 0/1 (label smoothing): the mime is linear in y, so the loss of the mean
    # of two one-hot targets is the mean of their losses
    x, labels, one_hot = batch
    other = torch.nn.functional.one_hot((labels[:, 0] + 1) % 3, 3).movedim(-1, 1).float()
    loss = nl.MimeLoss(a=[0.5, 1.9, 3.0], b=0.2)
    torch.testing.assert_close(loss(x, (one_hot + other) / 2), (loss(x, one_hot) + loss(x, other)) / 2)


def test_mask_weights_count_a_voxel_that_many_times(batch):
    # weights other than 0/1 are valid: weight 2 counts a voxel twice (mime, reduction="sum")
    x, labels, _ = batch
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 2.0
    loss = nl.MimeLoss(reduction="sum")
    expected = loss(x[:1], labels[:1]) + 2 * loss(x[1:], labels[1:])
    torch.testing.assert_close(loss(x, labels, mask), expected)


def test_value_checks_off_the_cpu_are_asynchronous(monkeypatch):
    # no host read on a device: the check becomes torch._assert_async with the expected-part of the message
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, message: calls.append((ok.device.type, message)))
    ok = torch.tensor(False, device="meta")
    _inputs.check_values(ok, "y: expected one-hot/region values in [0, 1]", lambda: pytest.fail("read on the host"))
    assert calls == [("meta", "y: expected one-hot/region values in [0, 1]")]


# ------------------------------------------------------------------------------------------------
# the options and tables of the two public helpers
# ------------------------------------------------------------------------------------------------
PROPORTIONS = torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([[0.5, 0.5], [0.25, 0.75]])


@pytest.mark.parametrize("options, error, message", [
    (dict(penalty="L1"), ValueError, "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'L1' (did you mean 'l1'?)"),
    (dict(penalty="focal"), ValueError, "penalty: expected one of ['l1', 'kl', 'dice_bias'], got 'focal'"),
    (dict(penalty=None), TypeError, "penalty: expected one of ['l1', 'kl', 'dice_bias'], got NoneType None"),
    (dict(activation="relu"), ValueError, "activation: expected one of ['softmax', 'sigmoid'], got 'relu'"),
    (dict(valid=torch.ones(2)), TypeError, "valid: expected None or a (2,) bool tensor, got dtype torch.float32"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), ValueError,
     "valid: expected shape (2,) (one per image of y_hat), got shape (3,)"),
])
def test_marginal_penalty_options(options, error, message):
    with pytest.raises(error, match=exact(message)):
        nl.marginal_penalty(*PROPORTIONS, **options)


@pytest.mark.parametrize("y_hat, p_hat, error, message", [
    (PROPORTIONS[0], PROPORTIONS[1][:1], ValueError, "p_hat: expected the shape of y_hat (2, 2), got shape (1, 2)"),
    (torch.zeros(0, 2), torch.zeros(0, 2), ValueError, "y_hat: expected a (B, C) tensor with B, C >= 1, got shape (0, 2)"),
    (PROPORTIONS[0][0], PROPORTIONS[1][0], ValueError, "y_hat: expected a (B, C) tensor with B, C >= 1, got shape (2,)"),
    ([[0.5, 0.5]], PROPORTIONS[1], TypeError, "y_hat: expected a floating-point (B, C) tensor of class proportions, got list"),
    (PROPORTIONS[0], torch.ones(2, 2, dtype=torch.long), TypeError,
     "p_hat: expected a floating-point (B, C) tensor of class proportions, got dtype torch.int64"),
    (PROPORTIONS[0], PROPORTIONS[1] * 4 - 1, ValueError, "p_hat: expected class proportions in [0, 1], got values in [0, 2]"),
    (PROPORTIONS[0] * float("nan"), PROPORTIONS[1], ValueError, "y_hat: expected class proportions in [0, 1], got NaN values"),
])
def test_marginal_penalty_proportions(y_hat, p_hat, error, message):
    with pytest.raises(error, match=exact(message)):
        nl.marginal_penalty(y_hat, p_hat)


def test_marginal_penalty_still_computes_each_penalty():
    # the checks changed nothing: per image |ŷ - p̂| averaged over classes: (0.25, 0.25) -> 0.25
    assert nl.marginal_penalty(*PROPORTIONS, penalty="l1").item() == pytest.approx(0.25)
    # dice_bias: mean of log(p̂ + ŷ) = (log 1.25 + log 0.75 + log 0.75 + log 1.25) / 4
    expected = (2 * math.log(1.25) + 2 * math.log(0.75)) / 4
    assert nl.marginal_penalty(*PROPORTIONS, penalty="dice_bias").item() == pytest.approx(expected)


TABLES = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]]), torch.tensor([[2.0, 4.0]])


@pytest.mark.parametrize("tables, options, error, message", [
    (TABLES, dict(epsilon=0.0, num_subsets=0), ValueError, "num_subsets: expected an int >= 1, got 0"),
    (TABLES, dict(epsilon=0.0, num_subsets=2.0), TypeError, "num_subsets: expected an int >= 1, got float 2.0"),
    (TABLES, dict(epsilon=-1.0, num_subsets=2), ValueError, "epsilon: expected a finite number >= 0, got -1.0"),
    (TABLES, dict(epsilon=torch.tensor([0.5, -1.0]), num_subsets=2), ValueError,
     "epsilon: expected finite values >= 0, got values in [-1, 0.5]"),
    (TABLES, dict(epsilon=torch.ones(3), num_subsets=2), ValueError,
     "epsilon: expected a number or a floating-point tensor that broadcasts to (1, 2), got a tensor of dtype "
     "torch.float32 and shape (3,)"),
    ((TABLES[0], TABLES[1][0], TABLES[2]), dict(epsilon=0.0, num_subsets=2), ValueError,
     "prediction: expected the shape of intersection (1, 2), got shape (2,)"),
    ((TABLES[0], TABLES[1], -TABLES[2]), dict(epsilon=0.0, num_subsets=2), ValueError,
     "ground_truth: expected finite sums >= 0, got values in [-4, -2]"),
    ((TABLES[0].long(), *TABLES[1:]), dict(epsilon=0.0, num_subsets=2), TypeError,
     "intersection: expected a floating-point tensor of sums, got dtype torch.int64"),
])
def test_dice_gradient_weights_arguments(tables, options, error, message):
    with pytest.raises(error, match=exact(message)):
        nl.dice_gradient_weights(*tables, **options)


def test_dice_gradient_weights_with_a_per_class_epsilon():
    # ε per class broadcasts over the rows: class 1, I = 2, D = 2 + 4 + 1 = 7, two subsets: b = 5/98, a = 2/14 - b
    a, b = nl.dice_gradient_weights(*TABLES, epsilon=torch.tensor([0.0, 1.0]), num_subsets=2)
    torch.testing.assert_close(b[0, 1], torch.tensor(5 / 98))
    torch.testing.assert_close(a[0, 1], torch.tensor(2 / 14 - 5 / 98))


# ------------------------------------------------------------------------------------------------
# double backward (create_graph=True), as a gradient penalty asks
# ------------------------------------------------------------------------------------------------
def tiny_inputs(loss, options, form):
    """float64 (2, 3, 2, 3) logits, a target of ``form``, a mask and, with label sets, class 2 missing
    from sample 0."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 2, 3), generator=generator)
    mask = (torch.rand(2, 1, 2, 3, generator=generator) < 0.7).double()
    extra = {}
    if loss.annotated:
        labels[0][labels[0] == 2] = 0
        extra["annotated"] = torch.tensor([[True, True, False], [True, True, True]])
    if form == "regions":
        target = (torch.rand(2, 3, 2, 3, generator=generator) < 0.5).double()
        if loss.annotated:
            target[0, 2] = 0
    elif form == "one_hot":
        target = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    else:
        target = labels
    return x, target, mask, {**extra, **options}


DOUBLE_BACKWARD = [
    pytest.param(loss, variant.resolve(), form, id=f"{variant.id}-{form}")
    for loss, variant in variants("gradcheck")
    for form in TARGET_FORMS[variant.resolve().get("activation", "softmax")]
]


@pytest.mark.parametrize("loss, options, form", [p for p in DOUBLE_BACKWARD if p.values[0].double_backward])
def test_double_backward_has_exact_second_derivatives(loss, options, form):
    x, target, mask, options = tiny_inputs(loss, options, form)
    assert torch.autograd.gradgradcheck(lambda logits: loss.function(logits, target, mask, **options), (x,))
    # and the first-order gradient is the same with and without create_graph
    (plain,) = torch.autograd.grad(loss.function(x, target, mask, **options), x)
    (graph,) = torch.autograd.grad(loss.function(x, target, mask, **options), x, create_graph=True)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss, options, form", [p for p in DOUBLE_BACKWARD if not p.values[0].double_backward])
def test_double_backward_refused(loss, options, form):
    x, target, mask, options = tiny_inputs(loss, options, form)
    message = (
        "dynamic_mime_loss: expected a first-order backward, got create_graph=True: its weights are taken without "
        "gradient, so autograd's second derivative would not be the derivative of its gradient (the Phi-Dice "
        "gradient); for a gradient penalty use phi_dice_loss with the same options (the same gradient, exact "
        "second derivatives)"
    )
    for value in (loss.function(x, target, mask, **options), loss.module(**options)(x, target, mask)):
        with pytest.raises(RuntimeError, match=exact(message)):
            torch.autograd.grad(value, x, create_graph=True)
    # the workaround it names: the same first-order gradient, with second derivatives
    (grad,) = torch.autograd.grad(loss.function(x, target, mask, **options), x)
    (workaround,) = torch.autograd.grad(loss.gradient_of(x, target, mask, **options), x, create_graph=True)
    torch.testing.assert_close(workaround.detach(), grad, rtol=1e-10, atol=1e-12)


def test_gradient_penalty_trains_the_second_order_term():
    # loss + ‖∂loss/∂x‖²: its gradient is the mime's gradient plus 2 H g, which differs from the mime's
    # gradient alone (the term that was silently dropped)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 2, 3), generator=generator)
    value = nl.mime_loss(x, y)
    (grad,) = torch.autograd.grad(value, x, create_graph=True)
    (total,) = torch.autograd.grad(value + (grad**2).sum(), x)
    (first,) = torch.autograd.grad(nl.mime_loss(x, y), x)
    assert float((total - first).abs().max()) > 1e-6


# ------------------------------------------------------------------------------------------------
# bad values for every parameter of every public function and module (nnunet_losses.__all__)
# ------------------------------------------------------------------------------------------------
def _x():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))


LABELS = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 2], [0, 0, 0, 1], [2, 2, 1, 0]]).expand(2, 1, 4, 4).clone()
# a valid value of every parameter that has no default
VALID = {
    "x": _x(), "y": LABELS, "y_hat": PROPORTIONS[0], "p_hat": PROPORTIONS[1],
    "intersection": TABLES[0], "prediction": TABLES[1], "ground_truth": TABLES[2], "epsilon": 0.5, "num_subsets": 2,
    "targets": [torch.zeros(2, 1, 4, 4, dtype=torch.long)], "num_classes": 3,
}


def _number(value, positive=False) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 if positive else value >= 0))


def _one_of(*allowed):
    return lambda value: isinstance(value, str) and value in allowed


def _count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 1 <= value < 2**63


# the values docs/losses.md calls valid, per parameter (of those the bad-value strategy can draw); any
# parameter not listed accepts none of them
ACCEPTS = {
    "a": _number, "b": _number, "epsilon": _number, "lam": lambda v: v is None or _number(v),
    "tau": lambda v: _number(v, positive=True),
    "kl_knee": lambda v: _number(v) and v == 0,  # with the default penalty "l1" only 0 (the knee is the KL's)
    "include_background": lambda v: isinstance(v, bool), "ddp": lambda v: v is None or isinstance(v, bool),
    "ignore_label": lambda v: v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                            and -(2**63) <= v < 2**63),
    "phi": _one_of(*PHIS), "activation": _one_of("softmax"), "reduction": _one_of("mean", "sum"),
    "penalty": _one_of("l1", "kl", "dice_bias"), "num_subsets": _count, "num_classes": _count,
    "loss_mask": lambda v: v is None, "annotated": lambda v: v is None, "valid": lambda v: v is None,
}

NAN, INF = float("nan"), float("inf")
BAD_VALUES = (
    None, True, False, 0, -1, -7, 2**63, 2**64, 0.0, -0.0, -1.5, NAN, INF, -INF, 1 + 2j, np.float64(NAN),
    "", "nan", " softmax", "softmax ", "SOFTMAX", "Sigmoid", "Mean", "SUM", "L1", "KL", "Dice_Bias", "bi", "i",
    b"l1", b"abc", [], (), [NAN], [-1.0], [INF, 1.0, 1.0], [1.0, "x"], [[1.0]], {}, {"a": 1}, object(),
    np.array([1.0, 2.0, 3.0]), torch.tensor(NAN), torch.tensor([-1.0]), torch.tensor([]), torch.tensor([True]),
    torch.full((3,), NAN), torch.ones(2, 3, dtype=torch.long),
)


def bad_values(default):
    """The shared pool, random numbers and text, and the default's own spelling in the wrong case."""
    strategies = [st.sampled_from(BAD_VALUES), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-10, 10), st.text(max_size=6)]
    if isinstance(default, str):
        strategies.append(st.sampled_from([default.upper(), default.title(), default + " ", default[:-1]]))
    return st.one_of(*strategies)


def _arguments(callable_) -> dict:
    """Every parameter of ``callable_`` (a function or an nn.Module's __init__/forward) with its
    default or a valid value."""
    parameters = [p for p in inspect.signature(callable_).parameters.values() if p.name != "self"]
    return {p.name: VALID[p.name] if p.default is inspect.Parameter.empty else p.default for p in parameters}


def _call_with(public, parameter, value):
    """Call ``public`` (a function, or a module: construct, then forward) with ``parameter`` set to
    ``value`` and valid arguments elsewhere."""
    if not (isinstance(public, type) and issubclass(public, torch.nn.Module)):
        return public(**{**_arguments(public), parameter: value})
    options, forward = _arguments(public), _arguments(public.forward)
    (options if parameter in options else forward)[parameter] = value
    return public(**options)(**forward)


PUBLIC = [getattr(nl, name) for name in nl.__all__]
BAD_INPUT = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _parameters(public) -> list:
    if isinstance(public, type):
        return sorted({*_arguments(public), *_arguments(public.forward)})
    return sorted(_arguments(public))


@pytest.mark.parametrize("public", PUBLIC, ids=nl.__all__)
@BAD_INPUT
@given(data=st.data())
def test_bad_values_are_refused_naming_the_parameter(public, data):
    parameter = data.draw(st.sampled_from(_parameters(public)), label="parameter")
    defaults = {**_arguments(public), **(_arguments(public.forward) if isinstance(public, type) else {})}
    value = data.draw(bad_values(defaults[parameter]), label="value")
    try:
        _call_with(public, parameter, value)
    except (ValueError, TypeError) as error:
        assert str(error).startswith((f"{parameter}:", f"{parameter}[")), (
            f"{public.__name__}({parameter}={value!r}): the message does not name {parameter}: {error}")
        assert "\n" not in str(error), f"{public.__name__}({parameter}={value!r}): not one line: {error}"
    else:
        assert ACCEPTS.get(parameter, lambda v: False)(value), (
            f"{public.__name__}({parameter}={value!r}) was accepted, but docs/losses.md does not call it valid")


def test_the_bad_value_test_reaches_every_parameter():
    # every parameter of every public callable is one the strategy draws for (a test that never picked a
    # parameter could not fail on it)
    names = {name for public in PUBLIC for name in _parameters(public)}
    assert names <= set(ACCEPTS) | set(VALID) | {"x", "y"}
    assert {"penalty", "activation", "num_subsets", "valid", "annotated", "tau", "targets"} <= names
