"""The fused overlap-sums Function hands its forward's probabilities to the backward, which writes the
gradient into them. These tests pin down what that must never change: the gradient of a second
backward through the same graph, what is kept (and only when a gradient is wanted), and the
gradient of every target form against plain autograd."""

from __future__ import annotations

import pytest
import torch

import loss_registry
from nnunet_losses import MarginalDiceLoss, MimeLoss, PhiDiceLoss
from nnunet_losses.losses._inputs import prepare
from nnunet_losses.losses._overlap_sums import overlap_sums

pytestmark = pytest.mark.usefixtures("single_threaded")

TARGET_FORMS = [  # (activation, target attribute of the Case), as the losses take them (tests/loss_registry.py)
    (activation, form) for activation, forms in loss_registry.TARGET_FORMS.items() for form in forms
]


def overlap_node(loss: torch.Tensor):
    """The autograd node of ``OverlapSumsFunction`` in the graph of ``loss`` (the node is its ctx)."""
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "OverlapSumsFunctionBackward":
            return node
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no OverlapSumsFunction node in the graph")


def weighted_sums(x, target, mask, activation, background_row=False):
    """A scalar with distinct weights on every (b, c) sum, so that every output gets a gradient."""
    prepared = prepare(x, target, mask, activation, None)
    sums = overlap_sums(x, prepared, activation, background_row=background_row)
    weights = torch.arange(1.0, 1.0 + sums.intersection.numel(), dtype=x.dtype).view_as(sums.intersection)
    total = (weights * sums.intersection).sum() - (weights.flip(0) * sums.prediction).sum() / 3
    if background_row:
        total = total + (weights.sqrt() * sums.background_row).sum()
    return total


def plain_autograd_sums(x, target, mask, activation, background_row=False):
    """The same scalar with the one-hot target and plain autograd: the reference."""
    s = torch.softmax(x, 1) if activation == "softmax" else torch.sigmoid(x)
    m = torch.ones_like(x[:, :1]) if mask is None else mask
    intersection = (m * target * s).flatten(2).sum(-1)
    prediction = (m * s).flatten(2).sum(-1)
    weights = torch.arange(1.0, 1.0 + intersection.numel(), dtype=x.dtype).view_as(intersection)
    total = (weights * intersection).sum() - (weights.flip(0) * prediction).sum() / 3
    if background_row:
        row = (m * target[:, :1] * s).flatten(2).sum(-1)
        total = total + (weights.sqrt() * row).sum()
    return total


def case_target(case, form: str) -> torch.Tensor:
    return getattr(case, form)


# the background row (marginal Dice) exists for softmax only: overlap_sums refuses it for sigmoid
WITH_ROW = [(activation, form, row) for activation, form in TARGET_FORMS
            for row in ((False, True) if activation == "softmax" else (False,))]


@pytest.mark.parametrize("activation,form,background_row", WITH_ROW)
@pytest.mark.parametrize("mask", [False, True])
def test_gradient_equals_plain_autograd(make_case, activation, form, mask, background_row):
    case = make_case(spatial=(3, 4, 5), channels=4, mask=mask)
    target = case_target(case, form)
    reference_target = case.one_hot if form == "labels" else target
    x = case.x.clone().requires_grad_(True)
    x_ref = case.x.clone().requires_grad_(True)
    value = weighted_sums(x, target, case.mask, activation, background_row)
    reference = plain_autograd_sums(x_ref, reference_target, case.mask, activation, background_row)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(value, x)
    (grad_ref,) = torch.autograd.grad(reference, x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,form", TARGET_FORMS)
def test_second_backward_recomputes_the_consumed_probabilities(make_case, activation, form):
    case = make_case(spatial=(4, 5), channels=3, mask=True)
    x = case.x.clone().requires_grad_(True)
    value = weighted_sums(x, case_target(case, form), case.mask, activation)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x)
    assert first.abs().sum() > 0
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_probabilities_are_kept_until_the_backward_consumes_them(make_case):
    case = make_case(spatial=(4, 5), batch=2, channels=3)
    x = case.x.clone().requires_grad_(True)
    loss = PhiDiceLoss(phi="I")(x, case.labels)
    node = overlap_node(loss)
    assert node.probs.shape == (2, 3, 20)
    torch.testing.assert_close(node.probs, torch.softmax(case.x, 1).flatten(2))
    loss.backward()
    assert node.probs is None


def test_probabilities_are_freed_when_no_gradient_is_wanted_and_after_the_backward(make_case, monkeypatch):
    """The forward's probabilities are never kept past the call when no gradient is wanted (validation,
    inference), and are released by the backward that consumes them."""
    import weakref

    from nnunet_losses.losses import _overlap_sums as overlap_module

    alive = []
    original = overlap_module._overlap_sums_forward

    def spy(*arguments):
        result = original(*arguments)
        alive.append(weakref.ref(result[3]))  # the probabilities the Function could keep
        if result[5] is not None:
            alive.append(weakref.ref(result[5]))  # and the background row's [y = 0] weights
        return result

    monkeypatch.setattr(overlap_module, "_overlap_sums_forward", spy)
    case = make_case(spatial=(4, 5), channels=3)
    x = case.x.clone().requires_grad_(True)
    annotated = torch.ones(2, 3, dtype=torch.bool)
    annotated[0, 2] = False  # a missing class: the background row is computed
    labels = case.labels.clone()
    labels[0][labels[0] == 2] = 0
    with torch.no_grad():
        MarginalDiceLoss()(x, labels, None, annotated)  # logits that require grad, under no_grad
    MimeLoss()(case.x, case.labels)  # logits without requires_grad
    assert len(alive) == 3 and all(ref() is None for ref in alive)

    loss = MarginalDiceLoss()(x, labels, None, annotated)
    assert alive[-1]() is not None and alive[-2]() is not None  # both kept for the backward
    loss.backward()
    assert alive[-1]() is None  # the [y = 0] weights are gone once the backward has used them
    del loss

    loss = PhiDiceLoss(phi="I")(x, case.labels)
    assert alive[-1]() is not None  # kept for the backward
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0
    del grad, loss  # the gradient was written into them: gone with it and the graph
    assert alive[-1]() is None


# ------------------------------------------------------------------------------------------------
# torch.compile: the custom operator nnunet_losses::overlap_sums
# ------------------------------------------------------------------------------------------------
def operator_cases(make_case):
    case = make_case(spatial=(3, 4, 5), channels=4, mask=True, dtype=torch.float32)
    labels = case.labels
    return [
        (case.x, labels, None, None, True, False),
        (case.x, labels, None, case.mask, True, True),
        (case.x, None, case.one_hot, case.mask, True, True),
        (case.x, None, case.regions, None, False, False),
        (case.x.to(torch.bfloat16), labels, None, case.mask, True, False),
    ]


def test_overlap_sums_operator_passes_opcheck(make_case):
    """Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them."""
    for arguments in operator_cases(make_case):
        x = arguments[0].clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.nnunet_losses.overlap_sums.default, (x, *arguments[1:]))


def test_overlap_sums_operator_equals_the_function(make_case):
    from nnunet_losses.losses._overlap_sums import OverlapSumsFunction, overlap_sums_op

    for x, labels, target, mask, softmax, row in operator_cases(make_case):
        x_op, x_fn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        by_op = overlap_sums_op(x_op, labels, target, mask, softmax, row)
        by_function = OverlapSumsFunction.apply(x_fn, labels, target, mask, softmax, row)
        weights = torch.arange(1.0, 1.0 + by_op[0].numel()).view_as(by_op[0])
        total_op = sum((weights * t).sum() for t in by_op[:2]) + (by_op[2].sum() if row else 0)
        total_fn = sum((weights * t).sum() for t in by_function[:2]) + (by_function[2].sum() if row else 0)
        torch.testing.assert_close(total_op, total_fn, rtol=0, atol=0)
        total_op.backward()
        total_fn.backward()
        torch.testing.assert_close(x_op.grad, x_fn.grad, rtol=0, atol=0)


def test_compiled_losses_call_the_operator_without_graph_breaks(make_case):
    """The compiler sees the operator, not the Function's inside (whose in-place backward it would
    re-plan with buffers of its own), and the marginal Dice's host reads are gone from the graph."""
    torch._dynamo.reset()
    case = make_case(spatial=(4, 5, 6), channels=4, dtype=torch.float32)
    annotated = torch.tensor([[True, True, False, True], [True, True, True, True]])
    labels = case.labels.clone()
    labels[0][labels[0] == 2] = 0  # sample 0 misses class 2: marginal Dice merges it
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes])
        return graph_module.forward

    for loss in (PhiDiceLoss(phi="BI"), MimeLoss(), MarginalDiceLoss()):
        graphs.clear()
        extra = (None, annotated) if isinstance(loss, MarginalDiceLoss) else ()
        x = case.x.clone().requires_grad_(True)
        compiled = torch.compile(loss, backend=backend)
        value = compiled(x, labels, *extra)
        value.backward()
        x_eager = case.x.clone().requires_grad_(True)
        eager = loss(x_eager, labels, *extra)
        eager.backward()
        torch.testing.assert_close(value, eager)
        torch.testing.assert_close(x.grad, x_eager.grad)
        targets = [target for graph in graphs for target in graph]
        assert any("nnunet_losses.overlap_sums" in t for t in targets), type(loss).__name__
        assert not any("OverlapSumsFunction" in t for t in targets), type(loss).__name__
        # one graph, unless prepare's label-range check (a host read, skipped when compiling) came back
        assert len(graphs) == 1, (type(loss).__name__, len(graphs))


def test_compiled_marginal_dice_still_refuses_a_contradicting_table(make_case):
    torch._dynamo.reset()
    case = make_case(spatial=(4, 5), channels=3, dtype=torch.float32)
    annotated = torch.tensor([[True, True, False], [True, True, True]])  # sample 0 has class-2 voxels
    assert bool((case.labels[0] == 2).any())
    compiled = torch.compile(MarginalDiceLoss(), backend="eager")
    with pytest.raises(RuntimeError, match="annotated: expected every class with voxels in y to be marked annotated"):
        compiled(case.x, case.labels, None, annotated)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("uniform", ["both", "intersection", "prediction"])
def test_gradient_with_the_same_weight_for_every_class(make_case, mask, uniform):
    """The backward's shortcut for weights equal across the classes of a sample (the mime with scalar
    a, b: Σ_k g_k s_k = g) against plain autograd; sample 1 gets other weights than sample 0."""
    case = make_case(spatial=(3, 4, 5), channels=4, mask=mask)
    per_sample = torch.tensor([[0.7], [-1.3]], dtype=case.x.dtype)
    varied = torch.tensor([[0.2, -0.4, 1.1, 0.3], [0.5, 0.5, -0.6, 2.0]], dtype=case.x.dtype)
    w_int = per_sample if uniform in ("both", "intersection") else varied
    w_pred = 0.4 * per_sample if uniform in ("both", "prediction") else varied.flip(1)
    x = case.x.clone().requires_grad_(True)
    sums = overlap_sums(x, prepare(x, case.labels, case.mask, "softmax", None), "softmax")
    value = (w_int * sums.intersection).sum() + (w_pred * sums.prediction).sum()
    x_ref = case.x.clone().requires_grad_(True)
    s = torch.softmax(x_ref, 1)
    m = torch.ones_like(s[:, :1]) if case.mask is None else case.mask
    reference = (w_int * (m * case.one_hot * s).flatten(2).sum(-1)).sum() + (w_pred * (m * s).flatten(2).sum(-1)).sum()
    (grad,) = torch.autograd.grad(value, x)
    (grad_ref,) = torch.autograd.grad(reference, x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
