"""Shared fixtures of the tests: seeded random cases in every target form, a synthetic dataset planned
by nnU-Net, and real DDP process groups."""

from __future__ import annotations

import datetime
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class Case:
    """Random logits with a label map, its one-hot form, random regions and an optional mask."""

    x: torch.Tensor  # (B, C, *spatial) logits
    labels: torch.Tensor  # (B, 1, *spatial) int64 label map
    one_hot: torch.Tensor  # (B, C, *spatial) one-hot of labels, x's dtype
    regions: torch.Tensor  # (B, C, *spatial) independent 0/1 regions, x's dtype
    mask: Optional[torch.Tensor]  # (B, 1, *spatial) 0/1 in x's dtype, or None

    def target(self, activation: str = "softmax", form: str = "labels") -> torch.Tensor:
        """The target a loss takes: regions for sigmoid, the label map or its one-hot for softmax."""
        if activation == "sigmoid":
            return self.regions
        return self.labels if form == "labels" else self.one_hot


def one_hot_of(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, *spatial) label map -> (B, C, *spatial) one-hot."""
    return torch.nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).to(dtype)


@pytest.fixture
def make_case():
    """Factory: ``make_case(spatial=(4, 4, 4), batch=2, channels=3, seed=0, mask=False)`` -> :class:`Case`.

    Everything comes from one seeded generator, so a (spatial, batch, channels, seed, mask) tuple
    always gives the same tensors. Masks keep about 70% of the voxels.
    """

    def make(spatial=(4, 4, 4), batch=2, channels=3, seed=0, mask=False, dtype=torch.float64) -> Case:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, channels, *spatial, generator=generator, dtype=dtype)
        labels = torch.randint(0, channels, (batch, 1, *spatial), generator=generator)
        regions = (torch.rand(batch, channels, *spatial, generator=generator) < 0.4).to(dtype)
        loss_mask = (torch.rand(batch, 1, *spatial, generator=generator) < 0.7).to(dtype) if mask else None
        return Case(x, labels, one_hot_of(labels, channels, dtype), regions, loss_mask)

    return make


@pytest.fixture
def one_hot():
    """``one_hot(labels, num_classes, dtype)``: a (B, 1, *spatial) label map as a (B, C, *spatial) one-hot."""
    return one_hot_of


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """Empty nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``tmp_path``, set in the environment for
    this test; returns the nnUNet_raw folder."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    return tmp_path / "nnUNet_raw"


@pytest.fixture(scope="module")
def single_threaded():
    """One intra-op thread for a module of tests on tiny tensors: they gain nothing from threads, and on a
    busy 2-core machine each threaded op can wait milliseconds for a core (use with
    ``pytestmark = pytest.mark.usefixtures("single_threaded")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# a synthetic dataset planned and preprocessed by nnU-Net's own API
# ------------------------------------------------------------------------------------------------
@dataclass
class PlannedDataset:
    raw: Path
    preprocessed: Path
    results: Path
    name: str
    plans: dict
    dataset_json: dict

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """nnU-Net's folders for one test, single-process data loading, no compile."""
        for name, path in (("nnUNet_raw", self.raw), ("nnUNet_preprocessed", self.preprocessed),
                           ("nnUNet_results", self.results)):
            monkeypatch.setenv(name, str(path))
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
        monkeypatch.delenv("nnUNet_compile", raising=False)


@pytest.fixture(scope="session")
def plan_synthetic_dataset():
    """``plan(root, dataset_id, name, edit_raw=None, **dataset_options)`` -> :class:`PlannedDataset`:
    nnU-Net folders under ``root``, a 5-case synthetic 2D dataset
    (:func:`nnunet_losses.commands.synthetic.write_synthetic_dataset`), ``edit_raw(raw_dataset_folder)``
    if given, then nnU-Net's fingerprint, plan and 2d preprocessing (no training)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    from nnunet_losses.commands.synthetic import write_synthetic_dataset

    def plan(root: Path, dataset_id: int, name: str, edit_raw: Optional[Callable[[Path], None]] = None,
             **dataset_options) -> PlannedDataset:
        paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        with pytest.MonkeyPatch.context() as patch:
            for variable, path in paths.items():
                path.mkdir()
                patch.setenv(variable, str(path))
            dataset = write_synthetic_dataset(paths["nnUNet_raw"], dataset_id, name, num_training=5, num_test=0,
                                              **dataset_options)
            if edit_raw is not None:
                edit_raw(dataset.folder)
            extract_fingerprint_dataset(dataset_id, num_processes=1, verbose=False, show_progress_bar=False)
            plan_experiment_dataset(dataset_id)
            preprocess_dataset(dataset_id, configurations=("2d",), num_processes=[1], show_progress_bar=False)
        preprocessed = paths["nnUNet_preprocessed"] / dataset.name
        return PlannedDataset(paths["nnUNet_raw"], paths["nnUNet_preprocessed"], paths["nnUNet_results"],
                              dataset.name, json.loads((preprocessed / "nnUNetPlans.json").read_text()),
                              json.loads((preprocessed / "dataset.json").read_text()))

    return plan


# ------------------------------------------------------------------------------------------------
# real DDP process groups (gloo, CPU)
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _in_process_group(rank: int, port: int, world_size: int, group_timeout_s: float, target: Callable,
                      arguments: tuple) -> None:
    """One spawned rank: joins the gloo group, runs ``target(rank, *arguments)`` on one thread, leaves."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=group_timeout_s))
    try:
        torch.set_num_threads(1)
        target(rank, *arguments)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def run_ddp():
    """``run(target, *arguments, world_size=2)``: ``target(rank, *arguments)`` in ``world_size`` spawned
    processes of one gloo process group (``target`` must be a module-level function). A failing rank
    fails the test with its traceback; ranks that hang are killed after 180 s and the test fails."""

    def run(target: Callable, *arguments, world_size: int = 2, group_timeout_s: float = 60,
            test_timeout_s: float = 180) -> None:
        context = mp.spawn(_in_process_group, args=(_free_port(), world_size, group_timeout_s, target, arguments),
                           nprocs=world_size, join=False)
        deadline = time.monotonic() + test_timeout_s
        while not context.join(timeout=1):  # raises with the rank's traceback if a rank failed
            if time.monotonic() > deadline:
                for process in context.processes:  # only the processes this test spawned
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"DDP ranks did not finish within {test_timeout_s} s")

    return run
