"""The heuristic ε of nnUNetTrainerDiceIEps under DDP: two real processes (gloo) with uneven batch sizes, as
nnU-Net splits a global batch, agree on the mean over ALL samples of both ranks."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_losses_tools.trainer_support import estimate_heuristic_epsilon

WORLD_SIZE = 2
GROUP_TIMEOUT_S = 60
TEST_TIMEOUT_S = 180

# rank 0 holds 1 sample, rank 1 holds 2 (one batch each, one output scale, 2x2, 3 classes)
RANK_TARGETS = [
    torch.tensor([[[[0, 1], [1, 1]]]], dtype=torch.float32),
    torch.tensor([[[[2, 2], [0, 0]]], [[[0, 0], [0, 0]]]], dtype=torch.float32),
]
# over the 3 samples: class 0: 1 + 2 + 4 = 7, class 1: 3, class 2: 2 -> (7/3, 1, 2/3); the mean of the two
# ranks' means, (1, 3, 0) and (3, 0, 1), would be (2, 1.5, 0.5) instead
GLOBAL_EPSILON = [7 / 3, 1.0, 2 / 3]


def _rank_main(rank: int, port: int, output_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        epsilon = estimate_heuristic_epsilon(iter([{"target": [RANK_TARGETS[rank]]}]), 1, num_classes=3,
                                             ignore_label=None, region_ignore_channel=False, device="cpu",
                                             progress=False)
        torch.save([e.tolist() for e in epsilon], f"{output_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_epsilon_is_the_mean_over_the_samples_of_all_ranks(tmp_path):
    context = mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TEST_TIMEOUT_S
    while not context.join(timeout=1):  # raises with the rank's traceback if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:  # only the processes this test spawned
                if process.is_alive():
                    process.kill()
            pytest.fail(f"DDP ranks did not finish within {TEST_TIMEOUT_S} s")
    for rank in range(WORLD_SIZE):
        (scale,) = torch.load(tmp_path / f"rank{rank}.pt")
        assert scale == pytest.approx(GLOBAL_EPSILON, abs=1e-12)
    # a single process sees only its own samples
    (alone,) = estimate_heuristic_epsilon(iter([{"target": RANK_TARGETS[1]}]), 1, 3, None, False, progress=False)
    assert alone.tolist() == [3.0, 0.0, 1.0]
