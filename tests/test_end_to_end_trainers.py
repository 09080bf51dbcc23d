"""Our trainers through nnU-Net's real commands on tiny generated 2D datasets: nnUNetv2_plan_and_preprocess,
nnUNetv2_train -device cpu (short runs), nnUNetv2_predict and nnUNetv2_export_model_to_zip, with the
trainers found the documented way (``nnUNet_extTrainer=$(nnunet-losses trainer-path --append)``).

About 6 minutes on 2 CPU cores: planning ~1 min, each training ~1 min (most of it nnU-Net's final
validation and process start-up), each prediction ~30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_losses.commands.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

LABELS_ID, REGIONS_ID = 951, 952
COMMAND_TIMEOUT_S = 900
PREDICT_IN_PYTHON = """
import sys, torch
from nnunet_losses.training.discovery import enable_trainers
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
enable_trainers()
predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
predictor.initialize_from_trained_model_folder(sys.argv[1], (0,))
predictor.predict_from_files(sys.argv[2], sys.argv[3], num_processes_preprocessing=1,
                             num_processes_segmentation_export=1)
"""


def script(name: str) -> str:
    return str(Path(sysconfig.get_path("scripts")) / name)


class NnUNet:
    """Runs nnU-Net's commands in a private nnUNet_raw/preprocessed/results, logging each to a file."""

    def __init__(self, root: Path):
        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in ("raw", "preprocessed", "results"))
        environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
        environment.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                           nnUNet_results=str(self.results), nnUNet_def_n_proc="1")
        # the documented line: export nnUNet_extTrainer=$(nnunet-losses trainer-path --append)
        environment["nnUNet_extTrainer"] = subprocess.run(
            [script("nnunet-losses"), "trainer-path", "--append"], env=environment, check=True, capture_output=True,
            text=True).stdout.strip()
        self.environment = environment
        self.count = 0

    def run(self, *command: str, light_augmentation: bool = True) -> str:
        environment = dict(self.environment)
        if light_augmentation:  # not while planning: nnU-Net 2.8 passes it to torch.set_num_threads there
            environment["nnUNet_n_proc_DA"] = "0"
        self.count += 1
        log = self.root / f"{self.count:02d}_{command[0]}.log"
        with open(log, "w") as handle:
            result = subprocess.run([script(command[0]), *command[1:]], env=environment, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT_S, cwd=self.root)
        output = log.read_text()
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
        return output

    def fold_folder(self, dataset: str, trainer: str) -> Path:
        return self.results / dataset / f"{trainer}__nnUNetPlans__2d" / "fold_0"


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """Two planned and preprocessed datasets: labels (4 softmax outputs) and regions with ignore label."""
    runner = NnUNet(tmp_path_factory.mktemp("end_to_end"))
    labels = write_synthetic_dataset(runner.raw, LABELS_ID, "E2ELabels", num_training=10, num_test=2, seed=1)
    regions = write_synthetic_dataset(runner.raw, REGIONS_ID, "E2ERegions", num_training=10, num_test=2, seed=2,
                                      regions=True, ignore_label=True)
    runner.run("nnUNetv2_plan_and_preprocess", "-d", str(LABELS_ID), str(REGIONS_ID), "-c", "2d", "-np", "1",
               "-npfp", "1", light_augmentation=False)
    runner.labels, runner.regions = labels, regions
    return runner


def checkpoint_of(folder: Path) -> dict:
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def assert_predictions(output: Path, dataset, allowed_values) -> None:
    for case in dataset.test_cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.images_test / f"{case}_0000.nii.gz")))
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}.nii.gz")))
        assert prediction.shape == image.shape
        assert set(np.unique(prediction).tolist()) <= set(allowed_values)


def test_softmax_trainer_trains_predicts_and_exports(nnunet, tmp_path):
    # an experiment by name: loss hyperparameters and a short budget in one -tr name; the mime's own Adam
    trainer = "nnUNetTrainerMime_a1.5_b0.2_1ep_2it"
    nnunet.run("nnUNetv2_train", str(LABELS_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    folder = nnunet.fold_folder(nnunet.labels.name, trainer)
    checkpoint = checkpoint_of(folder)
    assert checkpoint["trainer_name"] == trainer and checkpoint["current_epoch"] == 1
    assert (folder / "validation" / "summary.json").is_file()
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "train_loss" in log and "Epoch 1" not in log  # one epoch
    # the settings the name stands for, in the checkpoint, debug.json and the log; the loss and optimizer used them
    settings = {"a": 1.5, "b": 0.2, "include_background": True, "reduction": "mean", "class_weights": "annealed",
                "b_ramp": 0.25, "count_batches": 50, "optimizer": "adam", "lr": 0.001, "epochs": 1, "iterations": 2}
    assert checkpoint["name_settings"] == {"trainer": trainer, "base": "nnUNetTrainerMime", "settings": settings}
    debug = json.loads((folder / "debug.json").read_text())
    assert "'lr': 0.001" in debug["name_settings"] and "MimeLoss(a=1.5, b=0.2," in debug["loss"]
    assert debug["initial_lr"] == "0.001" and "Adam" in debug["optimizer"] and "amsgrad: False" in debug["optimizer"]
    assert f"Settings of the trainer name {trainer}: {settings}" in log
    # the class-balanced weights: counted from the training batches, stored, a / b = 1.5 / 0.2 per class
    counts = np.array(checkpoint["mime_class_counts"])
    assert counts.shape == (4, 4) and counts[0].sum() == pytest.approx(64 * 64)
    assert "Class-balanced mime weights (annealed: the balancing factors of a to the power 1, of b to the power 0), " \
           "per deep-supervision scale (rows) and class (columns)" in log

    output = tmp_path / "predicted"
    nnunet.run("nnUNetv2_predict", "-i", str(nnunet.labels.images_test), "-o", str(output), "-d", str(LABELS_ID),
               "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
               "--disable_progress_bar")
    assert_predictions(output, nnunet.labels, {0, 1, 2, 3})

    # the same model from Python, as in a clinical pipeline: enable_trainers() instead of a shell export
    from_python = tmp_path / "predicted_from_python"
    environment = {k: v for k, v in nnunet.environment.items() if k != "nnUNet_extTrainer"}
    subprocess.run([sys.executable, "-c", PREDICT_IN_PYTHON, str(folder.parent), str(nnunet.labels.images_test),
                    str(from_python)], env=environment, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    for case in nnunet.labels.test_cases:
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(from_python / f"{case}.nii.gz"))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}.nii.gz"))))

    archive = tmp_path / "model.zip"
    nnunet.run("nnUNetv2_export_model_to_zip", "-d", str(LABELS_ID), "-o", str(archive), "-c", "2d", "-tr", trainer,
               "-f", "0")
    names = zipfile.ZipFile(archive).namelist()
    assert f"{nnunet.labels.name}/{trainer}__nnUNetPlans__2d/fold_0/checkpoint_final.pth" in names


def test_region_dataset_with_ignore_label_trains_with_sigmoid_dice_and_predicts(nnunet, tmp_path):
    trainer = "nnUNetTrainerDiceBI_1ep_2it"
    nnunet.run("nnUNetv2_train", str(REGIONS_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    folder = nnunet.fold_folder(nnunet.regions.name, trainer)
    debug = json.loads((folder / "debug.json").read_text())
    # the loss nnU-Net trained with: Φ = BI over the 3 sigmoid regions, ignore channel turned into a mask
    assert "RegionIgnoreChannel" in debug["loss"] and "phi='BI'" in debug["loss"]
    assert "activation='sigmoid'" in debug["loss"]
    output = tmp_path / "predicted"
    nnunet.run("nnUNetv2_predict", "-i", str(nnunet.regions.images_test), "-o", str(output), "-d", str(REGIONS_ID),
               "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
               "--disable_progress_bar")
    # regions become labels again through regions_class_order (1, 2, 3); the ignore label is never predicted
    assert_predictions(output, nnunet.regions, {0, 1, 2, 3})


def test_heuristic_epsilon_is_estimated_stored_and_reused_on_continue(nnunet):
    trainer = "nnUNetTrainerDiceIEps_adamw_1ep_2it"  # --c finds the named class (and its optimizer) again
    nnunet.run("nnUNetv2_train", str(LABELS_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    folder = nnunet.fold_folder(nnunet.labels.name, trainer)
    (first_log,) = folder.glob("training_log_*.txt")
    assert "Estimating the heuristic epsilon from 50 training batches" in first_log.read_text()
    stored = checkpoint_of(folder)["heuristic_epsilon"]
    # one row per deep-supervision output (4), one value per class (4); a 64x64 patch has 4096 voxels
    assert np.array(stored).shape == (4, 4)
    assert sum(stored[0]) == pytest.approx(64 * 64) and sum(stored[1]) == pytest.approx(32 * 32)
    assert all(value > 0 for value in stored[0])  # every class appears in the patches

    output = nnunet.run("nnUNetv2_train", str(LABELS_ID), "2d", "0", "-tr", trainer, "-device", "cpu", "--c")
    marker = "Heuristic epsilon reused from the checkpoint (not re-estimated), per deep-supervision scale (rows) " \
             "and class (columns): "
    (line,) = [line for line in output.splitlines() if marker in line]
    assert json.loads(line.split(marker, 1)[1]) == stored
    assert "Estimating the heuristic epsilon" not in output
    assert checkpoint_of(folder)["heuristic_epsilon"] == stored
