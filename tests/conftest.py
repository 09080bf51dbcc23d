"""Shared fixtures of the loss tests: seeded random cases in every target form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch


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


@pytest.fixture(scope="module")
def single_threaded():
    """One intra-op thread for a module of tests on tiny tensors: they gain nothing from threads, and on a
    busy 2-core machine each threaded op can wait milliseconds for a core (use with
    ``pytestmark = pytest.mark.usefixtures("single_threaded")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
