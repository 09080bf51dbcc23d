"""Smoke run of the benchmarks: they run and report every loss and trainer of the package.

No timing assertions: speed is measured by ``benchmarks/``, never by tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import nnunet_losses
from nnunet_losses.losses._options import PHIS
from nnunet_losses.losses.label_marginal import PENALTIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _loss_classes():
    return sorted(name for name in nnunet_losses.__all__
                  if isinstance(getattr(nnunet_losses, name), type)
                  and issubclass(getattr(nnunet_losses, name), torch.nn.Module))


def test_quick_loss_benchmark_reports_every_loss(tmp_path):
    out = tmp_path / "losses.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_losses.py"), "--quick", "--shapes", "quick2d", "--repeats", "1",
         "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["shape"] == [4, 3, 48, 48]  # quick2d with --quick's 3 classes
    results = {entry["loss"]: entry for entry in setting["results"]}

    expected = [f"PhiDiceLoss(phi={phi})" for phi in PHIS] + [f"LabelMarginalLoss({p})" for p in PENALTIES]
    for cls in _loss_classes():  # a loss added to the package without a benchmark row fails here
        expected += [name for name in results if name.split("(")[0] == cls] or [cls]
    expected += ["copy floor: x.clone()", "nnU-Net default: DC_and_CE_loss", "nnU-Net Dice, batch_dice=False",
                 "nnU-Net Dice, batch_dice=True", "nnU-Net CE"]
    for name in expected:
        assert name in results, f"{name} missing from the benchmark"
        entry = results[name]
        assert entry["error"] is None, f"{name}: {entry['error']}"
        assert entry["median_ms"] > 0 and entry["extra_peak_mib"] > 0
        assert f"| {name} |" in completed.stdout  # the printed table has the row
    # MONAI is the `bench` extra: measured where installed, else said so
    monai = results["MONAI DiceCELoss"]
    assert monai["error"] is None or "not installed" in monai["error"]

    # the CPU memory measurement, checked on the one case with a known answer: a copy allocates exactly
    # one tensor of the logits' size (4*3*48*48 float32 = 110592 bytes) and nothing else
    assert results["copy floor: x.clone()"]["extra_peak_mib"] * 2**20 == 4 * 3 * 48 * 48 * 4


def test_training_benchmark_names_trainers_nnunet_finds(monkeypatch):
    # the trainer list of bench_training.py is LOSSES.md §5; a renamed trainer would silently drop out
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("nnUNet_extTrainer", os.environ.get("nnUNet_extTrainer", ""))  # restored afterwards
    import bench_training

    assert len(bench_training.TRAINERS) == 11
    assert bench_training.missing_trainers([bench_training.BASELINE, *bench_training.TRAINERS]) == []
    assert bench_training.short_run_name("nnUNetTrainerMime", 4, 20) == "nnUNetTrainerMime_4ep_20it"
