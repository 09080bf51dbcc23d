"""The comparison report on trainer folders in nnU-Net's real format: checkpoints holding the
'logging' dict of nnU-Net's own logger, validation folders with .nii.gz predictions and the
summary.json of nnU-Net's own metric code."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from nnunet_losses.commands import cli
from nnunet_losses.commands.report import load_training_log, write_report
from test_evaluation import (
    DATASET_JSON,
    PREDICTIONS,
    REFERENCES,
    label_map,
    uniform_probabilities,
    write_prediction_folder,
)

CONFIG = "nnUNetPlans__3d_fullres"
# pseudo Dice per epoch -> nnU-Net's EMA: 0.2, 0.9·0.2 + 0.1·0.5 = 0.23, 0.9·0.23 + 0.1·0.6 = 0.267
PSEUDO_DICE = [0.2, 0.5, 0.6]


def write_trainer_fold(results, gt_folder, trainer, fold, predictions, pseudo_dice, probabilities=None):
    """A fold folder as nnUNetv2_train leaves it: checkpoint_final.pth, validation/ with summary.json,
    dataset.json and plans.json in the trainer folder."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    trainer_folder = results / DATASET_JSON["name"] / f"{trainer}__{CONFIG}"
    fold_folder = trainer_folder / f"fold_{fold}"
    validation = fold_folder / "validation"
    write_prediction_folder(validation, gt_folder, predictions, REFERENCES, probabilities)
    compute_metrics_on_folder(str(gt_folder), str(validation), str(validation / "summary.json"), SimpleITKIO(),
                              ".nii.gz", [1, 2], None, num_processes=1)
    (trainer_folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (trainer_folder / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))

    logger = MetaLogger(str(fold_folder), resume=False)  # logged per epoch as nnUNetTrainer does
    for epoch, dice in enumerate(pseudo_dice):
        logger.log("epoch_start_timestamps", 100.0 + epoch, epoch)
        logger.log("train_losses", 1.0 - 0.2 * epoch, epoch)
        logger.log("lrs", 0.01, epoch)
        logger.log("mean_fg_dice", dice, epoch)
        logger.log("dice_per_class_or_region", [dice, dice], epoch)
        logger.log("val_losses", 0.9 - 0.2 * epoch, epoch)
        logger.log("epoch_end_timestamps", 101.0 + epoch, epoch)
    checkpoint = {"network_weights": {"w": torch.zeros(2)}, "optimizer_state": {}, "grad_scaler_state": None,
                  "logging": logger.get_checkpoint(), "_best_ema": max(logger.get_value("ema_fg_dice", None)),
                  "current_epoch": len(pseudo_dice), "init_args": {}, "trainer_name": trainer,
                  "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(checkpoint, fold_folder / "checkpoint_final.pth")
    return fold_folder


# model B: case_a perfect; case_b organ 18 of its 20 voxels (Dice 36/38, ΔV -2 voxels = -0.01 ml)
PREDICTIONS_B = {"case_a": REFERENCES["case_a"], "case_b": label_map({1: (0, 18)})}


@pytest.fixture(scope="module")
def written_models(tmp_path_factory):
    """Written once per module (nnU-Net's metric code starts worker processes, which takes seconds)."""
    root = tmp_path_factory.mktemp("models")
    results, gt = root / "nnUNet_results", root / "gt_segmentations"
    a = write_trainer_fold(results, gt, "nnUNetTrainer", 0, PREDICTIONS, PSEUDO_DICE,
                           {c: uniform_probabilities() for c in PREDICTIONS})
    b = write_trainer_fold(results, gt, "nnUNetTrainerMime", 0, PREDICTIONS_B, [0.3, 0.4])
    return results, a, b


@pytest.fixture
def two_models(written_models, tmp_path):
    """A private copy of the two fold folders (the references stay where summary.json points)."""
    import shutil

    results, a, b = written_models
    shutil.copytree(results, tmp_path / "nnUNet_results")
    return tuple(tmp_path / "nnUNet_results" / p.relative_to(results) for p in (a, b))


def test_training_log_from_checkpoint(two_models):
    log = load_training_log(two_models[0])
    assert log["mean_fg_dice"] == PSEUDO_DICE
    assert log["ema_fg_dice"] == pytest.approx([0.2, 0.23, 0.267])
    assert log["_checkpoint"] == "checkpoint_final.pth"


def test_report(two_models, tmp_path):
    groups = {"case_a": "HGG", "case_b": "LGG"}
    report = write_report(two_models, tmp_path / "report", groups=groups, positive="HGG")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
            for line in report.table.splitlines()[2:]}
    # model A (= test_evaluation's folder): organ Dice 72/92 and 1, lesion 0 (case_b has none);
    # ΔV organ 0.06 and 0 ml, lesion -0.03 and 0 ml; ECE organ |60/288 - 1/3|, lesion |10/288 - 1/3|
    assert rows[("nnUNetTrainer", "all")].endswith(
        "| 2 | 0.891 ± 0.109 | 0.000 ± 0.000 | 0.03 ± 0.03 | -0.01 ± 0.01 | 0.1250 | 0.2986 |")
    assert rows[("nnUNetTrainer", "HGG")].endswith("| 1 | 0.783 ± 0.000 | 0.000 ± 0.000 | 0.06 ± 0.00 | -0.03 ± 0.00 | – | – |")
    # model B: organ Dice 1 and 36/38 = 0.947; lesion 1 (case_b none); ΔV organ 0 and -0.01
    assert rows[("nnUNetTrainerMime", "all")].endswith(
        "| 2 | 0.974 ± 0.026 | 1.000 ± 0.000 | -0.01 ± 0.01 | 0.00 ± 0.00 | – | – |")
    assert rows[("nnUNetTrainerMime", "LGG")].endswith("| 1 | 0.947 ± 0.000 | – | -0.01 ± 0.00 | 0.00 ± 0.00 | – | – |")

    assert set(report.images) == {"roc", "curves", "reliability", "gradients"}
    for path in report.images.values():
        assert path.parent == report.out_dir and path.stat().st_size > 2000
        image = __import__("matplotlib.image").image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100

    index = report.index_md.read_text()
    assert "# Loss comparison: Dataset042_Toy" in index
    assert "| nnUNetTrainer | " in index and "| 0.267 |" in index  # final EMA pseudo Dice of model A
    for picture in ("roc.png", "curves.png", "reliability.png"):
        assert f"]({picture})" in index
    html = report.index_html.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<img ") == 4
    assert "<td>0.891 ± 0.109</td>" in html
    for source in re.findall(r'src="([^"]+)"', html):
        assert (report.out_dir / source).is_file()

    metrics = json.loads(report.metrics.read_text())
    # predicted volumes separate the groups for model A (organ 0.26 vs 0.10 ml), and for model B
    # (organ 0.20 vs 0.09 ml; lesion 0.05 ml vs none)
    assert metrics["models"]["nnUNetTrainer"]["auc"] == {"organ": 1.0, "lesion": 1.0}
    assert metrics["models"]["nnUNetTrainerMime"]["auc"] == {"organ": 1.0, "lesion": 1.0}


def test_folds_are_pooled(two_models, tmp_path):
    import shutil

    fold_0, other_model = two_models
    fold_1 = fold_0.parent / "fold_1"  # model B's fold as a second fold of model A
    shutil.copytree(other_model, fold_1)
    report = write_report([fold_1.parent], tmp_path / "report", gradient_losses=None)
    (row,) = report.table.splitlines()[2:]
    # organ Dice over 4 cases: 72/92, 1, 1, 36/38
    organ = np.array([72 / 92, 1, 1, 36 / 38])
    assert f"| 4 | {organ.mean():.3f} ± {organ.std():.3f} |" in row
    # two folds: 3 and 2 epochs, final EMA 0.267 and 0.9·0.3 + 0.1·0.4 = 0.31
    assert "| 2 | 3, 2 | 0.267, 0.310 |" in report.index_md.read_text()


def test_report_command(two_models, tmp_path, capsys):
    code = cli.main(["report", *map(str, two_models), "-o", str(tmp_path / "out"), "--no-gradients",
                     "--title", "Mime vs CE+Dice"])
    assert code == 0
    assert "| nnUNetTrainerMime | all | 2 | 0.974 ± 0.026 |" in capsys.readouterr().out
    assert "<h1>Mime vs CE+Dice</h1>" in (tmp_path / "out" / "index.html").read_text()
    assert not list((tmp_path / "out").glob("gradients_*"))


def test_report_errors(two_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected fold_\\*/validation/summary.json or a checkpoint"):
        write_report([tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="expected at least one"):
        write_report([], tmp_path / "out")
    other = json.loads((two_models[1].parent / "dataset.json").read_text())
    other["labels"] = {"background": 0, "liver": 1}
    (two_models[1].parent / "dataset.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="expected models of one dataset"):
        write_report(two_models, tmp_path / "out", gradient_losses=None)
