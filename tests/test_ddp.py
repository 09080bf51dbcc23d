"""Batch reductions under DDP use the global batch (docs/losses.md §2): two processes holding two samples
each give the value and, after DDP's gradient averaging, the gradient of one process holding all four.

Two real processes (torch.multiprocessing spawn) join a gloo process group on a free localhost port;
both the process group and the test itself time out instead of hanging.
"""

from __future__ import annotations

import pytest
import torch

from nnunet_losses import DynamicMimeLoss, PhiDiceLoss

WORLD_SIZE = 2
SAMPLES_PER_RANK = 2

# name -> (loss factory, whether its batch reduction is global under DDP)
CASES = {
    "dice_BI": (lambda: PhiDiceLoss(phi="BI"), True),
    "dice_BCI": (lambda: PhiDiceLoss(phi="BCI"), True),
    "dice_BI_per_class_eps_masked": (lambda: PhiDiceLoss(phi="BI", epsilon=[0.0, 2.0, 0.5]), True),
    "dice_BI_sigmoid": (lambda: PhiDiceLoss(phi="BI", activation="sigmoid"), True),
    "dynamic_mime_BI": (lambda: DynamicMimeLoss(phi="BI"), True),
    "dynamic_mime_BCI": (lambda: DynamicMimeLoss(phi="BCI", include_background=True), True),
    "dice_I": (lambda: PhiDiceLoss(phi="I"), False),
    "dice_BI_ddp_off": (lambda: PhiDiceLoss(phi="BI", ddp=False), False),
}


def make_inputs():
    """Four samples whose classes are unevenly spread, so that global and local sums differ: class 2
    appears only in samples 0 and 3 (one per rank), class 1 is absent from sample 1."""
    generator = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(WORLD_SIZE * SAMPLES_PER_RANK, 3, 6, 5, generator=generator)
    labels = torch.randint(0, 2, (4, 1, 6, 5), generator=generator)
    labels[1] = 0
    labels[0, 0, :2] = 2
    labels[3, 0, 4:, 1:] = 2
    regions = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    mask = (torch.rand(4, 1, 6, 5, generator=generator) < 0.7).float()
    return x, labels, regions, mask


def case_inputs(name, x, labels, regions, mask):
    target = regions if name.endswith("sigmoid") else labels
    return x, target, (mask if name.endswith("masked") else None)


def value_and_grad(loss, x, y, mask):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, y, mask)
    value.backward()
    return value.detach(), x.grad


def _rank_main(rank: int, output_dir: str) -> None:
    """One DDP rank: computes every case on its two samples and saves value and input gradient."""
    mine = slice(rank * SAMPLES_PER_RANK, (rank + 1) * SAMPLES_PER_RANK)
    inputs = make_inputs()
    results = {}
    for name, (factory, _) in CASES.items():
        x, y, mask = case_inputs(name, *inputs)
        results[name] = value_and_grad(factory(), x[mine], y[mine], None if mask is None else mask[mine])
    torch.save(results, f"{output_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory, run_ddp):
    output_dir = tmp_path_factory.mktemp("ddp")
    run_ddp(_rank_main, str(output_dir), world_size=WORLD_SIZE)
    return [torch.load(output_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", [name for name, (_, is_global) in CASES.items() if is_global])
def test_global_batch_reduction_equals_one_process(name, rank_results):
    factory, _ = CASES[name]
    x, y, mask = case_inputs(name, *make_inputs())
    value, grad = value_and_grad(factory(), x, y, mask)  # one process, all four samples

    rank_values = torch.stack([result[name][0] for result in rank_results])
    if name.startswith("dice"):
        # the Dice of the global subsets, identical on every rank
        torch.testing.assert_close(rank_values, value.expand(WORLD_SIZE), rtol=0, atol=1e-6)
    else:
        # the dynamic mime's value is a sum over the rank's own samples, scaled by the world size like
        # its gradient (below), so DDP's mean over ranks of the logged values is the global value
        torch.testing.assert_close(rank_values.mean(), value, rtol=0, atol=1e-6)

    # nnU-Net's AllGatherGrad sums every rank's gradient of the gathered sums in backward, and every
    # rank computed the same global loss: each rank's input gradient is WORLD_SIZE times its share of
    # the global gradient. DDP averages parameter gradients over ranks, dividing that factor back out,
    # so rank_grad / WORLD_SIZE is what one process holding the whole batch gets for the same samples.
    for rank, result in enumerate(rank_results):
        mine = slice(rank * SAMPLES_PER_RANK, (rank + 1) * SAMPLES_PER_RANK)
        # (gradients here are ~1e-3: a relative tolerance, tighter than an absolute 1e-6)
        torch.testing.assert_close(result[name][1] / WORLD_SIZE, grad[mine], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", [name for name, (_, is_global) in CASES.items() if not is_global])
def test_local_reduction_ignores_the_other_rank(name, rank_results):
    # Φ = I has no batch reduction, and ddp=False turns the gather off: each rank computes exactly what
    # a single process computes on the rank's two samples, gradient unscaled
    factory, _ = CASES[name]
    x, y, mask = case_inputs(name, *make_inputs())
    for rank, result in enumerate(rank_results):
        mine = slice(rank * SAMPLES_PER_RANK, (rank + 1) * SAMPLES_PER_RANK)
        value, grad = value_and_grad(factory(), x[mine], y[mine], None if mask is None else mask[mine])
        torch.testing.assert_close(result[name][0], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(result[name][1], grad, rtol=0, atol=1e-6)


def test_the_ranks_really_saw_different_data(rank_results):
    # guards the test itself: with identical local batches, "global == local" would hold trivially
    x, y, mask = case_inputs("dice_BI", *make_inputs())
    local = [value_and_grad(PhiDiceLoss(phi="BI"), x[k:k + 2], y[k:k + 2], None)[0] for k in (0, 2)]
    assert abs(float(local[0]) - float(local[1])) > 1e-3
    assert abs(float(rank_results[0]["dice_BI"][0]) - float(local[0])) > 1e-3
