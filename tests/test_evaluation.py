"""Evaluation with the papers' metrics: hand-derived ΔV, AUC and ECE, and a real prediction folder
evaluated with nnU-Net's own metric code."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnunet_losses.commands import cli
from nnunet_losses.commands import evaluation as ev

# ----------------------------------------------------------------------------------------------
# files in nnU-Net's format (shared with test_report.py)
# ----------------------------------------------------------------------------------------------
SPACING = (2.5, 2.0, 1.0)  # nnU-Net order (z, y, x) in mm: one voxel = 5 mm³ = 0.005 ml
SHAPE = (4, 6, 6)  # 144 voxels
DATASET_JSON = {"name": "Dataset042_Toy", "labels": {"background": 0, "organ": 1, "lesion": 2},
                "file_ending": ".nii.gz", "numTraining": 2, "channel_names": {"0": "CT"}}


def label_map(spans: dict) -> np.ndarray:
    """A (4, 6, 6) label map from {label: (start, stop)} ranges of the flattened volume."""
    flat = np.zeros(int(np.prod(SHAPE)), dtype=np.uint8)
    for label, (start, stop) in spans.items():
        flat[start:stop] = label
    return flat.reshape(SHAPE)


# case_a: reference organ 40 voxels [0, 40), lesion 10 [40, 50);
#         prediction organ 52 voxels [4, 56) (TP 36), lesion 4 [60, 64) (TP 0)
# case_b: organ 20 voxels [0, 20) predicted exactly; no lesion in reference or prediction
REFERENCES = {"case_a": label_map({1: (0, 40), 2: (40, 50)}), "case_b": label_map({1: (0, 20)})}
PREDICTIONS = {"case_a": label_map({1: (4, 56), 2: (60, 64)}), "case_b": label_map({1: (0, 20)})}


def write_seg(path, array, spacing=SPACING):
    """A segmentation written by nnU-Net's own SimpleITK writer."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    properties = {"spacing": list(spacing),
                  "sitk_stuff": {"spacing": tuple(spacing[::-1]), "origin": (0.0, 0.0, 0.0),
                                 "direction": tuple(np.eye(3).ravel())}}
    SimpleITKIO().write_seg(np.asarray(array, dtype=np.uint8), str(path), properties)


def uniform_probabilities() -> np.ndarray:
    return np.full((3, *SHAPE), 1 / 3, dtype=np.float32)


def write_prediction_folder(folder, gt_folder, predictions=PREDICTIONS, references=REFERENCES, probabilities=None):
    """Reference and predicted segmentations (+ the .npz/.pkl of --save_probabilities if given)."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    gt_folder.mkdir(parents=True, exist_ok=True)
    for case, reference in references.items():
        write_seg(gt_folder / f"{case}.nii.gz", reference)
    for case, prediction in predictions.items():
        write_seg(folder / f"{case}.nii.gz", prediction)
        if probabilities is not None:
            np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities[case])
            with open(folder / f"{case}.pkl", "wb") as handle:
                pickle.dump({"spacing": list(SPACING)}, handle)


# ----------------------------------------------------------------------------------------------
# volume difference
# ----------------------------------------------------------------------------------------------
def test_voxel_volume_and_volume_difference():
    assert ev.voxel_volume_ml(SPACING) == pytest.approx(0.005)  # 2.5 · 2 · 1 mm³ / 1000
    assert ev.volume_difference_ml(52, 40, SPACING) == pytest.approx(0.06)  # 12 voxels more
    assert ev.volume_difference_ml(4, 10, (1.0, 1.0)) == pytest.approx(-0.006)  # 2D: mm² / 1000


def test_class_names_of_summary_keys_are_those_of_the_output_channels():
    # nnU-Net's summary.json keys a region as str(tuple) and a label as str(int); a region of one label
    # ([2]) may be keyed either way; an unnamed one keeps its key
    from nnunet_losses.nnunet_io import output_channels, summary_class_names

    dataset_json = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [3, 2], "enhancing": [3]},
                    "regions_class_order": [1, 2, 3]}
    assert output_channels(dataset_json).names == ["whole", "core", "enhancing"]
    assert summary_class_names(dataset_json, ["(1, 2, 3)", "(3, 2)", "(3,)", "3", "(4,)"]) == [
        "whole", "core", "enhancing", "enhancing", "(4,)"]


def test_dummy_2d_axis_is_not_a_spacing():
    assert ev._physical_spacing((999.0, 1.0, 1.0)) == (1.0, 1.0)  # nnU-Net's PNG reader
    assert ev._physical_spacing((0.7 * 999, 0.7, 0.5)) == (0.7, 0.5)  # a 2D NIfTI read by SimpleITKIO
    assert ev._physical_spacing(SPACING) == SPACING


@pytest.mark.parametrize("spacing", [(1.0, 0.0, 1.0), (), (1.0, float("nan"))])
def test_bad_spacing(spacing):
    with pytest.raises(ValueError, match="expected positive finite values"):
        ev.voxel_volume_ml(spacing)


# ----------------------------------------------------------------------------------------------
# group detection
# ----------------------------------------------------------------------------------------------
GROUPS = {"a": "HGG", "b": "HGG", "c": "LGG", "d": "LGG"}


def test_auc_is_one_for_separated_volumes():
    volumes = {"a": 10.0, "b": 12.0, "c": 1.0, "d": 2.0}
    detection = ev.group_detection(volumes, GROUPS, "HGG")
    assert detection.auc == 1.0 and (detection.num_positive, detection.num_negative) == (2, 2)
    assert ev.group_detection(volumes, GROUPS, "LGG", higher_is_positive=False).auc == 1.0
    assert ev.group_detection(volumes, GROUPS, "LGG").auc == 0.0  # the wrong direction inverts the ranking


def test_auc_is_half_for_identical_volumes():
    detection = ev.group_detection(dict.fromkeys(GROUPS, 3.0), GROUPS, "HGG")
    assert detection.auc == 0.5
    np.testing.assert_array_equal(detection.tpr, [0.0, 1.0])  # one threshold: nothing or everything


def test_auc_hand_computed():
    # positives {4, 2}, negatives {3, 1}: of the 4 (positive, negative) pairs, 3 are ordered right
    volumes = {"a": 4.0, "b": 2.0, "c": 3.0, "d": 1.0}
    assert ev.group_detection(volumes, GROUPS, "HGG").auc == pytest.approx(0.75)


def test_cases_without_group_are_left_out():
    volumes = {"a": 10.0, "b": 12.0, "c": 1.0, "d": 2.0, "x": 100.0}
    assert ev.group_detection(volumes, {**GROUPS}, "HGG").num_negative == 2


def test_detection_errors():
    with pytest.raises(ValueError, match=r"expected one of \['HGG', 'LGG'\], got 'GBM'"):
        ev.group_detection({"a": 1.0}, GROUPS, "GBM")
    with pytest.raises(ValueError, match="expected cases of group 'HGG' and of other groups"):
        ev.group_detection({"a": 1.0, "b": 2.0}, GROUPS, "HGG")


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
def two_class(foreground_probability, is_foreground):
    """(2, N) probabilities and one-hot targets from class-1 probabilities and 0/1 labels."""
    p = np.asarray(foreground_probability, dtype=np.float64)
    y = np.asarray(is_foreground)
    return np.stack([1 - p, p]), np.stack([1 - y, y])


def test_ece_is_zero_when_calibrated():
    # confidence 0.25 with 1 of 4 voxels foreground, 0.75 with 3 of 4: accuracy = confidence in both bins
    probabilities, target = two_class([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    bins = ev.CalibrationBins(2)
    bins.add(probabilities, target)
    assert bins.classwise_ece() == [pytest.approx(0.0, abs=1e-15)] * 2


def test_ece_hand_computed_when_miscalibrated():
    # class 1: confidence 0.9 on 10 voxels of which 5 are class 1, 0.1 on 10 voxels of which none:
    #   ECE = 10/20·|0.5 - 0.9| + 10/20·|0.0 - 0.1| = 0.2 + 0.05 = 0.25
    # class 0: confidence 0.1 on the first 10 (5 are class 0), 0.9 on the others (all class 0):
    #   ECE = 10/20·|0.5 - 0.1| + 10/20·|1.0 - 0.9| = 0.25
    probabilities, target = two_class([0.9] * 10 + [0.1] * 10, [1] * 5 + [0] * 15)
    bins = ev.CalibrationBins(2, num_bins=10)
    bins.add(probabilities[:, :7], target[:, :7])  # two cases, pooled
    bins.add(probabilities[:, 7:], target[:, 7:])
    assert bins.classwise_ece() == [pytest.approx(0.25), pytest.approx(0.25)]
    confidence, accuracy, counts = bins.reliability(1)
    np.testing.assert_allclose(confidence, [0.1, 0.9])
    np.testing.assert_allclose(accuracy, [0.0, 0.5])
    np.testing.assert_array_equal(counts, [10, 10])


def test_ece_respects_the_mask():
    probabilities, target = two_class([0.9] * 10 + [0.1] * 10, [1] * 5 + [0] * 15)
    keep = np.arange(20) >= 10  # only the well-calibrated 0.1 voxels... accuracy 0 vs confidence 0.1
    bins = ev.CalibrationBins(2)
    bins.add(probabilities, target, keep)
    assert bins.ece(1) == pytest.approx(0.1)


@pytest.mark.parametrize("num_bins", [5, 15])
def test_bins_are_scikit_learns(num_bins):
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=500), np.linspace(0, 1, num_bins + 1)])  # bin edges included
    y = (rng.uniform(size=p.size) < p).astype(int)
    bins = ev.CalibrationBins(2, num_bins)
    bins.add(*two_class(p, y))
    confidence, accuracy, _ = bins.reliability(1)
    expected_accuracy, expected_confidence = calibration_curve(y, p, n_bins=num_bins, strategy="uniform")
    np.testing.assert_allclose(accuracy, expected_accuracy)
    np.testing.assert_allclose(confidence, expected_confidence)


def test_calibration_errors():
    with pytest.raises(ValueError, match=r"expected probabilities in \[0, 1\]"):
        ev.CalibrationBins(2).add(np.full((2, 3), 1.5), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"expected probabilities and targets of shape \(2, \*spatial\)"):
        ev.CalibrationBins(2).add(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="expected an int >= 1"):
        ev.CalibrationBins(2, num_bins=0)


# ----------------------------------------------------------------------------------------------
# a prediction folder, end to end
# ----------------------------------------------------------------------------------------------
def test_evaluate_folder(tmp_path):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt",
                            probabilities={c: uniform_probabilities() for c in PREDICTIONS})
    (tmp_path / "groups.json").write_text(json.dumps({"case_a": "HGG", "case_b": "LGG"}))
    outcome = ev.evaluate_folder(tmp_path / "pred", tmp_path / "gt", DATASET_JSON, tmp_path / "out",
                                 groups=tmp_path / "groups.json", positive="HGG", num_processes=1)
    evaluation = outcome["evaluation"]
    a, b = sorted(evaluation.cases, key=lambda r: r.case)
    assert evaluation.class_names == ["organ", "lesion"]
    assert a.dice == {"organ": pytest.approx(2 * 36 / (40 + 52)), "lesion": 0.0}
    assert b.dice["organ"] == 1.0 and math.isnan(b.dice["lesion"])  # empty in both: no Dice (nnU-Net)
    assert a.delta_v_ml == {"organ": pytest.approx(0.06), "lesion": pytest.approx(-0.03)}
    assert b.delta_v_ml == {"organ": 0.0, "lesion": 0.0}
    assert a.spacing == pytest.approx(SPACING)

    summary = {row["group"]: row for row in evaluation.summary(json.loads((tmp_path / "groups.json").read_text()))}
    dice_a = 72 / 92
    assert summary["all"]["dice organ"] == pytest.approx(((dice_a + 1) / 2, (1 - dice_a) / 2))
    assert summary["all"]["dice lesion"] == (0.0, 0.0)  # case_b has none
    assert summary["all"]["delta_v_ml organ"] == pytest.approx((0.03, 0.03))
    assert summary["HGG"]["n"] == 1 and summary["HGG"]["delta_v_ml lesion"] == pytest.approx((-0.03, 0.0))

    # uniform s = 1/3 everywhere: one bin per class, ECE = |share of the class's voxels - 1/3|
    # voxels of 288: background 94 + 124, organ 40 + 20, lesion 10 + 0
    ece = evaluation.calibration.classwise_ece()
    assert ece == pytest.approx([abs(218 / 288 - 1 / 3), abs(60 / 288 - 1 / 3), abs(10 / 288 - 1 / 3)])

    # predicted organ volume 0.26 ml (HGG) vs 0.10 ml (LGG), lesion 0.02 vs 0: both separate the groups
    assert {name: d.auc for name, d in outcome["detection"].items()} == {"organ": 1.0, "lesion": 1.0}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["cases"][1]["dice"]["lesion"] is None  # NaN written as null
    nnunet_summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # nnU-Net's own file
    assert nnunet_summary["metric_per_case"][0]["metrics"]["1"]["TP"] == 36
    for png in ("roc.png", "reliability.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| HGG | 1 | 0.783 ± 0.000 | 0.000 ± 0.000 | 0.06 ± 0.00 | -0.03 ± 0.00 |" in table


def test_evaluate_command(tmp_path, capsys):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    code = cli.main(["evaluate", str(tmp_path / "pred"), "--ground-truth", str(tmp_path / "gt"), "--dataset-json",
                     str(tmp_path / "dataset.json"), "-o", str(tmp_path / "out"), "--num-processes", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| pred | all | 2 | 0.891 ± 0.109 | 0.000 ± 0.000 | 0.03 ± 0.03 | -0.01 ± 0.01 |" in printed
    assert not (tmp_path / "out" / "reliability.png").exists()  # no probabilities saved


def test_evaluate_folder_errors(tmp_path):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt", references={"case_a": REFERENCES["case_a"]})
    with pytest.raises(FileNotFoundError, match="expected 'case_b.nii.gz'"):
        ev.evaluate_folder(tmp_path / "pred", tmp_path / "gt", DATASET_JSON, tmp_path / "out")
    with pytest.raises(ValueError, match="expected the group to detect"):
        ev.evaluate_folder(tmp_path / "pred", tmp_path / "gt", DATASET_JSON, tmp_path / "out", groups={"a": "x"})
    with pytest.raises(ValueError, match="expected a mapping"):
        ev.load_groups({"case_a": 3})
