"""The heuristic ε of nnUNetTrainerDiceIEps under DDP: two real processes (gloo) with uneven batch sizes, as
nnU-Net splits a global batch, agree on the mean over ALL samples of both ranks."""

from __future__ import annotations

import pytest
import torch

from nnunet_losses.training.class_counts import estimate_class_counts

WORLD_SIZE = 2

# rank 0 holds 1 sample, rank 1 holds 2 (one batch each, one output scale, 2x2, 3 classes)
RANK_TARGETS = [
    torch.tensor([[[[0, 1], [1, 1]]]], dtype=torch.float32),
    torch.tensor([[[[2, 2], [0, 0]]], [[[0, 0], [0, 0]]]], dtype=torch.float32),
]
# over the 3 samples: class 0: 1 + 2 + 4 = 7, class 1: 3, class 2: 2 -> (7/3, 1, 2/3); the mean of the two
# ranks' means, (1, 3, 0) and (3, 0, 1), would be (2, 1.5, 0.5) instead
GLOBAL_EPSILON = [7 / 3, 1.0, 2 / 3]


def _rank_main(rank: int, output_dir: str) -> None:
    epsilon = estimate_class_counts(iter([{"target": [RANK_TARGETS[rank]]}]), 1, num_classes=3,
                                         ignore_label=None, region_ignore_channel=False, device="cpu",
                                         progress=False)
    torch.save([e.tolist() for e in epsilon], f"{output_dir}/rank{rank}.pt")


def test_epsilon_is_the_mean_over_the_samples_of_all_ranks(tmp_path, run_ddp):
    run_ddp(_rank_main, str(tmp_path), world_size=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        (scale,) = torch.load(tmp_path / f"rank{rank}.pt")
        assert scale == pytest.approx(GLOBAL_EPSILON, abs=1e-12)
    # a single process sees only its own samples
    (alone,) = estimate_class_counts(iter([{"target": RANK_TARGETS[1]}]), 1, 3, None, False, progress=False)
    assert alone.tolist() == [3.0, 0.0, 1.0]
