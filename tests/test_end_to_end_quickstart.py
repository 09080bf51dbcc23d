"""examples/quickstart.py as a newcomer runs it (tiny settings): nnU-Net's real commands, the per-class
Dice table from nnU-Net's evaluation, reuse of finished steps on a second run. About 2 minutes
on 2 CPU cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
TINY = ["--epochs", "1", "--iterations", "1", "--trainers", "nnUNetTrainerCEKL", "--cases", "5", "--test-cases", "2",
        "--device", "cpu"]


def quickstart(work_dir: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(QUICKSTART), "--work-dir", str(work_dir), *options],
                          capture_output=True, text=True, timeout=1200)


def test_quickstart_trains_predicts_and_prints_nnunet_dice_then_reuses_its_work(tmp_path):
    first = quickstart(tmp_path, *TINY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = first.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trainer "))
    assert lines[header].split() == ["trainer", "organ", "(1)", "lesion", "(2)", "vessel", "(3)", "mean"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2:] if line.startswith("nnUNetTrainer")}
    assert set(rows) == {"nnUNetTrainerCEKL_1ep_1it"}
    for trainer, cells in rows.items():
        # the table shows nnU-Net's own evaluation (summary.json of compute_metrics_on_folder)
        summary = json.loads((tmp_path / "predictions" / trainer / "summary.json").read_text())
        expected = [summary["mean"][label]["Dice"] for label in ("1", "2", "3")] + \
                   [summary["foreground_mean"]["Dice"]]
        assert cells == [f"{value:.3f}" for value in expected]
    training_logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "logs").glob("train_*.log")}
    assert len(training_logs) == 1
    # it ends with the comparison report: an index page with the model's table and its plots
    report = tmp_path / "report"
    assert f"Comparison report (open in a browser): {report / 'index.html'}" in first.stdout
    index = (report / "index.html").read_text()
    assert "nnUNetTrainerCEKL_1ep_1it" in (report / "metrics.md").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert "curves.png" in pngs and all(name in index for name in pngs)

    second = quickstart(tmp_path, *TINY)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("Reusing the trained") == 1 and "Reusing the dataset" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "logs").glob("train_*.log")} == training_logs
    assert second.stdout.splitlines()[-5:] == first.stdout.splitlines()[-5:]  # the same table


def test_quickstart_never_touches_another_dataset_with_its_id(tmp_path):
    other = tmp_path / "nnUNet_raw" / "Dataset990_Mine"
    other.mkdir(parents=True)
    (other / "dataset.json").write_text("{}")
    result = quickstart(tmp_path, *TINY)
    assert result.returncode == 1
    assert "--dataset-id: dataset_id: expected an ID that is free in" in result.stderr
    assert "already used by Dataset990_Mine" in result.stderr
    assert [p.name for p in other.iterdir()] == ["dataset.json"]
    assert not (tmp_path / "nnUNet_raw" / "Dataset990_Quickstart").exists()


def test_quickstart_help_explains_every_option():
    result = subprocess.run([sys.executable, str(QUICKSTART), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--work-dir", "--trainers", "--epochs", "--iterations", "--cases", "--test-cases",
                   "--dataset-id", "--device", "--seed"):
        assert option in result.stdout


def test_every_default_row_says_what_it_shows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_module", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.ROW_MEANINGS) == set(module.DEFAULT_TRAINERS)
    assert module.parse_args([]).trainers == list(module.DEFAULT_TRAINERS)
