r"""``nnunet-losses evaluate``: the metrics the three papers report, on an nnU-Net prediction folder.

* **Dice per class** (all papers): nnU-Net's own ``compute_metrics_on_folder`` (its ``summary.json``);
  a case whose reference and prediction are both empty has no Dice (NaN, left out of means, as nnU-Net).
* **Volume difference** :math:`ΔV = (n_{pred} - n_{ref})\cdot v` in ml (Tilborghs Table 1), from
  nnU-Net's voxel counts and the voxel volume :math:`v = \prod \mathrm{spacing} / 1000` (mm³ → ml).
* **Detection of a group from the predicted volume** (Tilborghs Fig. 2): ROC curve and AUC
  (scikit-learn) of the predicted volume of each class as the score for "case belongs to the
  positive group" (e.g. HGG vs LGG), given a mapping of case identifiers to groups.
* **Class-wise expected calibration error** and reliability diagrams (Kervadec Fig. 3), from
  probabilities saved with ``--save_probabilities``: for class c every counted voxel is a
  prediction with confidence :math:`s_c` and outcome "voxel is c"; with M equal-width bins on
  [0, 1], :math:`\mathrm{ECE}_c = \sum_m \frac{n_m}{N} |\mathrm{acc}_m - \mathrm{conf}_m|`
  (acc: share of voxels of class c, conf: mean :math:`s_c`, pooled over all cases). Bins follow
  scikit-learn's ``calibration_curve(strategy="uniform")`` exactly (which gives acc and conf but not
  the bin counts the ECE needs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..nnunet_io import (
    case_identifier,
    cases_with_probabilities,
    channel_targets,
    label_manager_for,
    load_dataset_json,
    read_json_file,
    read_label_file,
    read_probabilities,
    read_segmentation,
    reader_writer_for,
    summary_class_names,
    UserInputError,
)
from .output import Table, files_moved_into_place, markdown_table, pyplot, save_figure, write_json, write_markdown
from ._subcommand import add_subcommand, print_done, progress as progress_bar, shown_items

COMMAND = "evaluate"
DEFAULT_BINS = 15
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------
def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in ml: the product of the spacing (mm) over 1000 (for a 2D image's two
    spacings: the pixel area in mm² / 1000)."""
    spacing = [float(v) for v in spacing]
    if not spacing or any(not math.isfinite(v) or v <= 0 for v in spacing):
        raise UserInputError(f"spacing: expected positive finite values in mm, got {spacing}")
    return float(np.prod(spacing)) / 1000.0


def volume_difference_ml(n_pred: float, n_ref: float, spacing: Sequence[float]) -> float:
    """ΔV = (predicted − reference voxel count) × voxel volume, in ml (positive: over-segmentation)."""
    return (float(n_pred) - float(n_ref)) * voxel_volume_ml(spacing)


# ----------------------------------------------------------------------------------------------
# group detection
# ----------------------------------------------------------------------------------------------
@dataclass
class Detection:
    """ROC of detecting ``positive`` from a score (predicted volume)."""

    positive: str
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    num_positive: int
    num_negative: int


def group_detection(scores: Mapping[str, float], groups: Mapping[str, str], positive: str,
                    higher_is_positive: bool = True) -> Detection:
    """ROC curve and AUC (scikit-learn) of ``scores`` (case → predicted volume) for "case is in group
    ``positive``"; cases without a group are left out. ``higher_is_positive=False`` when a small
    volume indicates the group (e.g. detecting LGG by a missing enhancing tumour)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    known = sorted(set(groups.values()))
    if positive not in known:
        raise UserInputError(f"positive group: expected one of {known}, got {positive!r}")
    cases = [c for c in scores if c in groups]
    truth = np.array([groups[c] == positive for c in cases], dtype=int)
    if truth.sum() == 0 or truth.sum() == len(truth):
        raise UserInputError(f"groups: expected cases of group {positive!r} and of other groups among the "
                             f"{len(cases)} evaluated cases with a group, got {int(truth.sum())} positive")
    values = np.array([scores[c] for c in cases], dtype=np.float64)
    values = values if higher_is_positive else -values
    fpr, tpr, thresholds = roc_curve(truth, values)
    return Detection(positive, fpr, tpr, thresholds, float(roc_auc_score(truth, values)), int(truth.sum()),
                     int(len(truth) - truth.sum()))


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
class CalibrationBins:
    """Running per-class reliability histogram: per bin the voxel count, Σ confidence and Σ hits.

    ``add`` takes one case at a time (``(C, *spatial)`` probabilities and 0/1 targets), so whole
    datasets are pooled without holding them in memory.
    """

    def __init__(self, num_classes: int, num_bins: int = DEFAULT_BINS, class_names: Optional[Sequence[str]] = None):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise UserInputError(f"num_bins: expected an int >= 1, got {num_bins!r}")
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {self.class_names}")
        self.num_bins = num_bins
        self.edges = np.linspace(0.0, 1.0, num_bins + 1)
        self.counts = np.zeros((num_classes, num_bins), dtype=np.int64)
        self.confidence = np.zeros((num_classes, num_bins))
        self.hits = np.zeros((num_classes, num_bins))

    def add(self, probabilities: np.ndarray, target: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        target = np.asarray(target)
        if probabilities.shape != target.shape or probabilities.shape[0] != self.counts.shape[0]:
            raise ValueError(f"calibration: expected probabilities and targets of shape ({self.counts.shape[0]}, "
                             f"*spatial), got {probabilities.shape} and {target.shape}")
        if probabilities.size and (probabilities.min() < 0 or probabilities.max() > 1):
            raise UserInputError(f"calibration: expected probabilities in [0, 1], got values in "
                                 f"[{probabilities.min()}, {probabilities.max()}]")
        for c in range(probabilities.shape[0]):
            p, y = probabilities[c], target[c]
            if mask is not None:
                p, y = p[mask], y[mask]
            p, y = p.ravel(), y.ravel().astype(np.float64)
            bins = np.searchsorted(self.edges[1:-1], p)  # scikit-learn's calibration_curve binning
            self.counts[c] += np.bincount(bins, minlength=self.num_bins)
            self.confidence[c] += np.bincount(bins, weights=p, minlength=self.num_bins)
            self.hits[c] += np.bincount(bins, weights=y, minlength=self.num_bins)

    def reliability(self, c: int):
        """``(mean confidence, accuracy, count)`` of the non-empty bins of class ``c``."""
        filled = self.counts[c] > 0
        n = self.counts[c][filled]
        return self.confidence[c][filled] / n, self.hits[c][filled] / n, n

    def ece(self, c: int) -> float:
        """Expected calibration error of class ``c``; NaN without voxels."""
        total = self.counts[c].sum()
        if total == 0:
            return float("nan")
        return float(np.abs(self.hits[c] - self.confidence[c]).sum() / total)  # Σ n_m |acc_m - conf_m| / N

    def classwise_ece(self) -> list:
        return [self.ece(c) for c in range(self.counts.shape[0])]

    def merge(self, other: "CalibrationBins") -> None:
        """Add another histogram with the same classes and bins (e.g. another fold)."""
        if other.class_names != self.class_names or other.num_bins != self.num_bins:
            raise ValueError(f"calibration: expected classes {self.class_names} in {self.num_bins} bins, got "
                             f"{other.class_names} in {other.num_bins}")
        self.counts += other.counts
        self.confidence += other.confidence
        self.hits += other.hits


# ----------------------------------------------------------------------------------------------
# a prediction folder
# ----------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: str
    dice: dict  # class name -> Dice (NaN: reference and prediction empty)
    n_pred: dict
    n_ref: dict
    spacing: tuple
    delta_v_ml: dict = field(default_factory=dict)
    predicted_volume_ml: dict = field(default_factory=dict)


@dataclass
class FolderEvaluation:
    """Per-case metrics of one prediction folder, and the pooled calibration when probabilities exist."""

    folder: str
    class_names: list
    cases: list
    calibration: Optional[CalibrationBins] = None

    def values(self, metric: str, name: str, cases: Optional[set] = None) -> np.ndarray:
        return np.array([getattr(r, metric)[name] for r in self.cases if cases is None or r.case in cases],
                        dtype=np.float64)

    def summary(self, groups: Optional[Mapping[str, str]] = None) -> list:
        """Rows ``{"group", "n", "<metric> <class>": (mean, std)}`` for all cases and each group."""
        selections = [("all", None)]
        if groups:
            for group in sorted(set(groups.values())):
                selections.append((group, {c for c, g in groups.items() if g == group}))
        rows = []
        for group, cases in selections:
            row = {"group": group, "n": sum(1 for r in self.cases if cases is None or r.case in cases)}
            if row["n"] == 0:
                continue
            for metric in ("dice", "delta_v_ml"):
                for name in self.class_names:
                    row[f"{metric} {name}"] = mean_std(self.values(metric, name, cases))
            if self.calibration is not None and group == "all":  # pooled over voxels: no spread over cases
                for name in self.class_names:
                    row[f"ece {name}"] = (self.calibration.ece(self.calibration.class_names.index(name)), float("nan"))
            rows.append(row)
        return rows


def mean_std(values: np.ndarray) -> tuple:
    """Mean and (population) standard deviation over the non-NaN values; NaN when there are none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


def nnunet_summary(pred_folder: PathLike, gt_folder: PathLike, dataset_json: Mapping, output_file: PathLike,
                   num_processes: Optional[int] = None) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` on the prediction folder (writes ``output_file``)."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    file_ending = dataset_json["file_ending"]
    predictions = segmentation_files(pred_folder, file_ending, "predictions")
    if not predictions:
        raise FileNotFoundError(f"predictions: expected {file_ending} files in {str(pred_folder)!r}, got none")
    missing = [p for p in predictions if not os.path.isfile(os.path.join(gt_folder, p))]
    if missing:
        raise FileNotFoundError(f"ground truth: expected {missing[0]!r} (and {len(missing) - 1} more) in "
                                f"{str(gt_folder)!r} for the predictions of {str(pred_folder)!r}")
    if num_processes is not None and (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                                      or num_processes < 1):
        raise UserInputError(f"--num-processes: expected an integer >= 1, got {num_processes!r}")
    manager = label_manager_for(dataset_json)
    labels_or_regions = manager.foreground_regions if manager.has_regions else manager.foreground_labels
    reader = reader_writer_for(os.path.join(pred_folder, predictions[0]), dataset_json)
    return compute_metrics_on_folder(str(gt_folder), str(pred_folder), str(output_file), reader, file_ending,
                                     labels_or_regions, manager.ignore_label,
                                     num_processes or min(default_num_processes, len(predictions)))


def segmentation_files(folder: PathLike, file_ending: str, what: str) -> list:
    """The names of the ``file_ending`` files in ``folder``, sorted; ``what`` names the folder in errors."""
    if not os.path.isdir(folder):
        got = "a file" if os.path.exists(folder) else "no folder"
        raise UserInputError(f"{what}: expected a folder of {file_ending} segmentations, got {got} at {str(folder)!r}")
    return sorted(p for p in os.listdir(folder) if p.endswith(file_ending) and os.path.isfile(os.path.join(folder, p)))


def missing_predictions(pred_folder: PathLike, gt_folder: PathLike, file_ending: str, allow_missing: bool) -> list:
    """The ground-truth cases without a prediction; an error naming them unless ``allow_missing``."""
    predicted = set(segmentation_files(pred_folder, file_ending, "predictions"))
    references = segmentation_files(gt_folder, file_ending, "ground truth")
    missing = [case_identifier(name, file_ending) for name in references if name not in predicted]
    if missing and not allow_missing:
        raise UserInputError(f"predictions: expected one for every case of the ground truth {str(gt_folder)!r}, got "
                             f"none for {len(missing)} of {len(references)}: {shown_items(missing)} (--allow-missing "
                             "evaluates the others)")
    return missing


def evaluate_summary(summary: Mapping, pred_folder: PathLike, dataset_json: Mapping,
                     num_bins: int = DEFAULT_BINS, calibration: bool = True, progress: bool = True,
                     allow_missing: bool = False) -> FolderEvaluation:
    """Per-case Dice and ΔV from an nnU-Net ``summary.json`` (as loaded by json), the spacing read from
    the predictions in ``pred_folder``; calibration from ``pred_folder/<case>.npz`` when the cases have
    them (some cases without one: an error naming them, or with ``allow_missing`` no calibration)."""
    file_ending = dataset_json["file_ending"]
    per_case = summary.get("metric_per_case") if isinstance(summary, Mapping) else None
    if not per_case or not isinstance(per_case, list):
        raise UserInputError(f"summary: expected at least one case in 'metric_per_case' of {str(pred_folder)!r}")
    keys = list(per_case[0]["metrics"].keys())
    class_names = summary_class_names(dataset_json, keys)
    reader = None
    cases = []
    for entry in progress_bar(per_case, f"evaluating {Path(pred_folder).parent.name}/{Path(pred_folder).name}", "case",
                              progress and len(per_case) >= 20):
        case = case_identifier(entry["prediction_file"], file_ending)
        prediction = os.path.join(pred_folder, case + file_ending)  # the folder may have moved since
        if not os.path.isfile(prediction):
            raise FileNotFoundError(f"prediction: expected {prediction!r} (listed in the summary.json), got no file")
        reader = reader or reader_writer_for(prediction, dataset_json)
        _, properties = read_label_file(reader, prediction)
        cases.append(_case_result(case, entry["metrics"], dict(zip(keys, class_names)),
                                  _physical_spacing(properties["spacing"])))
    evaluation = FolderEvaluation(str(pred_folder), class_names, cases)
    if calibration:
        evaluation.calibration = _calibration(per_case, pred_folder, dataset_json, num_bins, progress, allow_missing)
    return evaluation


def _case_result(case: str, metrics: Mapping, names: Mapping[str, str], spacing: tuple) -> CaseResult:
    """One case's Dice, voxel counts and volumes per class, from its entry of nnU-Net's summary."""
    result = CaseResult(case, {}, {}, {}, spacing)
    for key, name in names.items():
        m = metrics[key]
        dice = m.get("Dice")
        result.dice[name] = float("nan") if dice is None else float(dice)
        result.n_pred[name], result.n_ref[name] = float(m["n_pred"]), float(m["n_ref"])
        result.delta_v_ml[name] = volume_difference_ml(m["n_pred"], m["n_ref"], spacing)
        result.predicted_volume_ml[name] = float(m["n_pred"]) * voxel_volume_ml(spacing)
    return result


def _physical_spacing(spacing: Sequence[float]) -> tuple:
    """The image's spacing without the dummy axis nnU-Net's readers put in front of 2D images (999 x
    the largest in-plane spacing for NIfTI and friends, 999 for PNG/TIFF)."""
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) == 3 and spacing[0] >= 999 * max(spacing[1:]):
        return spacing[1:]
    return spacing


def _calibration(per_case, pred_folder, dataset_json, num_bins, progress, allow_missing) -> Optional[CalibrationBins]:
    file_ending = dataset_json["file_ending"]
    items = cases_with_probabilities(per_case, pred_folder, file_ending)
    if not items:
        return None  # predicted without --save_probabilities
    if len(items) < len(per_case):  # calibration pools every case's voxels: all or nothing
        found = {case for case, _, _ in items}
        missing = [c for c in (case_identifier(e["prediction_file"], file_ending) for e in per_case) if c not in found]
        if allow_missing:
            return None
        raise UserInputError(f"probabilities: expected a CASE.npz (and its reference) for every case of "
                             f"{str(pred_folder)!r} or for none, got none for {len(missing)} of {len(per_case)}: "
                             f"{shown_items(missing)} (--allow-missing leaves the calibration out)")
    bins = None
    for case, npz, reference in progress_bar(items, "calibration", "case", progress and len(items) >= 20):
        probabilities = read_probabilities(npz)
        label_map, _ = read_segmentation(reference, dataset_json)
        targets = channel_targets(label_map, probabilities.shape, dataset_json)
        if bins is None:
            bins = CalibrationBins(probabilities.shape[0], num_bins, targets.channels.names)
        bins.add(probabilities, targets.target, targets.mask)
    return bins


def detections(evaluation: FolderEvaluation, groups: Mapping[str, str], positive: str,
               higher_is_positive: bool = True) -> dict:
    """Class name → :class:`Detection` from the predicted volume of that class."""
    result = {}
    for name in evaluation.class_names:
        scores = {r.case: r.predicted_volume_ml[name] for r in evaluation.cases}
        result[name] = group_detection(scores, groups, positive, higher_is_positive)
    return result


def load_groups(source: Union[None, PathLike, Mapping]) -> Optional[dict]:
    """Case identifier → group, from a JSON file ``{"case_001": "LGG", ...}`` or a mapping."""
    if source is None:
        return None
    where = ""
    if not isinstance(source, Mapping):
        where = f" in {str(source)!r}"
        source = read_json_file(source, "groups")
    if not isinstance(source, Mapping) or not all(isinstance(v, str) for v in source.values()):
        raise UserInputError('groups: expected a mapping {"case_001": "LGG", ...} of case identifiers to group names, '
                             f"got {_json_kind(source)}{where}")
    return dict(source)


def _json_kind(value) -> str:
    if isinstance(value, Mapping):
        return "a mapping with values of type " + ", ".join(sorted({type(v).__name__ for v in value.values()}))
    return type(value).__name__


def load_groups_to_detect(source: Union[None, PathLike, Mapping], positive: Optional[str]) -> Optional[dict]:
    """:func:`load_groups`, and with groups the group to detect, ``positive``, one of them, is required."""
    groups = load_groups(source)
    if groups is not None and positive not in set(groups.values()):
        raise UserInputError(f"positive: expected the group to detect, one of {sorted(set(groups.values()))}, "
                             f"got {positive!r}")
    return groups


def check_group_cases(groups: Optional[Mapping[str, str]], known_cases, source: Union[None, PathLike, Mapping],
                      where: str) -> None:
    """Every case of ``groups`` is one of ``known_cases`` (those of the ground truth ``where``)."""
    if groups is None:
        return
    unknown = sorted(set(groups) - set(known_cases))
    if unknown:
        named = "" if isinstance(source, Mapping) else f" in {str(source)!r}"
        raise UserInputError(f"groups: expected case identifiers of the {len(set(known_cases))} cases of {where}, got "
                             f"unknown {shown_items(unknown)}{named}")


# ----------------------------------------------------------------------------------------------
# plots and tables
# ----------------------------------------------------------------------------------------------
def plot_roc(curves: Mapping[str, Mapping[str, Detection]], path: PathLike, dpi: int = 80) -> Path:
    """One panel per class, one ROC curve per model (``curves[model][class]``), AUC in the legend."""
    plt = pyplot()
    class_names = list(next(iter(curves.values())).keys())
    fig, axes = plt.subplots(1, len(class_names), figsize=(3.6 * len(class_names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], class_names):
        for model, per_class in curves.items():
            d = per_class[name]
            axis.plot(d.fpr, d.tpr, label=f"{model} (AUC {d.auc:.2f})")
        axis.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        positive = next(iter(curves.values()))[name].positive
        axis.set(title=f"{name}: detect {positive}", xlabel="false positive rate", ylabel="true positive rate",
                 xlim=(0, 1), ylim=(0, 1.02))
        axis.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi)


def plot_reliability(calibrations: Mapping[str, CalibrationBins], class_names: Sequence[str], path: PathLike,
                     dpi: int = 80) -> Path:
    """Reliability diagrams (accuracy vs confidence per bin), one panel per class, one line per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(class_names), figsize=(3.4 * len(class_names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], class_names):
        for model, bins in calibrations.items():
            c = bins.class_names.index(name)
            confidence, accuracy, _ = bins.reliability(c)
            axis.plot(confidence, accuracy, marker="o", ms=3, label=f"{model} (ECE {bins.ece(c):.3f})")
        axis.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        axis.set(title=name, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        axis.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, dpi)


def format_mean_std(value: tuple, digits: int = 3) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(rows_by_model: Mapping[str, list], class_names: Sequence[str]) -> Table:
    """``(header, rows)`` of strings: one row per (model, group), Dice / ΔV [ml] / ECE per class."""
    metrics = [("dice", "Dice", 3), ("delta_v_ml", "ΔV [ml]", 2), ("ece", "ECE", 4)]
    present = [m for m in metrics if any(f"{m[0]} {class_names[0]}" in row for rows in rows_by_model.values()
                                         for row in rows)]
    header = ["model", "group", "n"] + [f"{label} {name}" for _, label, _ in present for name in class_names]
    table = []
    for model, rows in rows_by_model.items():
        for row in rows:
            cells = [model, row["group"], str(row["n"])]
            for key, _, digits in present:
                for name in class_names:
                    value = row.get(f"{key} {name}")
                    cells.append("–" if value is None else format_mean_std(value, digits))
            table.append(cells)
    return Table(header, table)


def evaluation_json(evaluation: FolderEvaluation, groups=None, detection=None) -> dict:
    data = {
        "folder": evaluation.folder,
        "classes": evaluation.class_names,
        "cases": [vars(r) for r in evaluation.cases],
        "summary": evaluation.summary(groups),
    }
    if evaluation.calibration is not None:
        data["classwise_ece"] = dict(zip(evaluation.calibration.class_names, evaluation.calibration.classwise_ece()))
        data["num_bins"] = evaluation.calibration.num_bins
    if detection:
        data["detection"] = {name: {"positive": d.positive, "auc": d.auc, "num_positive": d.num_positive,
                                    "num_negative": d.num_negative} for name, d in detection.items()}
    return data


def evaluate_folder(pred_folder: PathLike, gt_folder: PathLike, dataset_json: Union[Mapping, PathLike],
                    out_dir: PathLike, groups: Union[None, PathLike, Mapping] = None, positive: Optional[str] = None,
                    higher_is_positive: bool = True, num_bins: int = DEFAULT_BINS,
                    num_processes: Optional[int] = None, allow_missing: bool = False) -> dict:
    """Evaluate an nnU-Net prediction folder against a ground-truth folder and write to ``out_dir``:
    ``summary.json`` (nnU-Net's), ``metrics.json``, ``metrics.md`` and the PNGs (``roc.png`` with
    groups, ``reliability.png`` with saved probabilities). Returns the paths and the evaluation.

    Every case of the ground truth needs a prediction (``allow_missing``: the others are evaluated and
    the missing ones listed), every case of ``groups`` must be one of the ground truth. The files are
    written out of sight and moved into ``out_dir`` at the end: a failure leaves nothing."""
    dataset_json = load_dataset_json(dataset_json)
    file_ending = dataset_json["file_ending"]
    group_of_case = load_groups_to_detect(groups, positive)
    missing = missing_predictions(pred_folder, gt_folder, file_ending, allow_missing)
    references = segmentation_files(gt_folder, file_ending, "ground truth")
    check_group_cases(group_of_case, [case_identifier(name, file_ending) for name in references], groups,
                      f"the ground truth {str(gt_folder)!r}")
    with files_moved_into_place(out_dir) as work:
        nnunet_summary(pred_folder, gt_folder, dataset_json, work / "summary.json", num_processes)
        summary = json.loads((work / "summary.json").read_text())  # string keys, as in nnU-Net's validation folders
        evaluation = evaluate_summary(summary, pred_folder, dataset_json, num_bins, allow_missing=allow_missing)
        outcome = _write_evaluation(evaluation, work, Path(pred_folder).name, group_of_case, positive,
                                    higher_is_positive, missing)
    outcome["paths"] = {"summary": Path(out_dir) / "summary.json",
                        **{name: Path(out_dir) / path.name for name, path in outcome["paths"].items()}}
    return outcome


def _write_evaluation(evaluation: FolderEvaluation, out_dir: Path, model: str, groups: Optional[dict],
                      positive: Optional[str], higher_is_positive: bool, missing: Sequence[str]) -> dict:
    """The plots, ``metrics.md`` and ``metrics.json`` of an evaluation in ``out_dir``."""
    paths = {}
    detection = None
    if groups is not None:
        detection = detections(evaluation, groups, positive, higher_is_positive)
        paths["roc"] = plot_roc({model: detection}, out_dir / "roc.png")
    if evaluation.calibration is not None:
        paths["reliability"] = plot_reliability({model: evaluation.calibration}, evaluation.class_names,
                                                out_dir / "reliability.png")
    text = summary_table({model: evaluation.summary(groups)}, evaluation.class_names).markdown()
    if missing:
        text += (f"\n\nNot evaluated (no prediction, --allow-missing): {len(missing)} of "
                 f"{len(missing) + len(evaluation.cases)} cases of the ground truth: {', '.join(missing)}")
    if detection:
        text += "\n\n" + markdown_table(["class", f"AUC detecting {positive} from the predicted volume"],
                                        [[n, f"{d.auc:.3f}"] for n, d in detection.items()])
    paths["table"] = write_markdown(text, out_dir / "metrics.md")
    data = {**evaluation_json(evaluation, groups, detection), "missing_predictions": list(missing)}
    paths["metrics"] = write_json(data, out_dir / "metrics.json")
    return {"paths": paths, "evaluation": evaluation, "detection": detection, "table": text}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_group_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("group detection (Tilborghs Fig. 2)")
    group.add_argument("--groups", metavar="JSON",
                       help='JSON file mapping case identifiers to groups, e.g. {"case_001": "HGG", "case_002": '
                            '"LGG"}; adds per-group rows to the table and a ROC curve per class')
    group.add_argument("--positive", metavar="GROUP",
                       help="the group to detect from the predicted volume of each class (required with --groups)")
    group.add_argument("--lower-is-positive", action="store_true",
                       help="a SMALL predicted volume indicates the positive group (default: a large one)")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS,
                        help=f"number of equal-width confidence bins of the calibration (default {DEFAULT_BINS})")
    parser.add_argument("--allow-missing", action="store_true",
                        help="when some cases (report: some folds) have no prediction, evaluate those that have "
                             "one: the others are listed and n counts the evaluated ones; calibration is left out "
                             "when some .npz are missing. Without it, a missing prediction is an error")


def _run(args: argparse.Namespace) -> int:
    outcome = evaluate_folder(args.predictions, args.ground_truth, args.dataset_json, args.output, args.groups,
                              args.positive, not args.lower_is_positive, args.bins, args.num_processes,
                              args.allow_missing)
    return print_done(outcome["table"], *(f"wrote {name}: {path}" for name, path in outcome["paths"].items()))


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers, COMMAND, _run,
        help="Dice, volume difference (ml), group detection ROC/AUC and class-wise ECE of a prediction folder",
        description=textwrap.dedent("""\
            Evaluate an nnU-Net prediction folder with the metrics of the three papers:
              Dice per class   nnU-Net's own compute_metrics_on_folder (summary.json)
              dV [ml]          (predicted - reference voxels) x voxel volume (spacing product / 1000)
              ROC / AUC        detecting a group of cases (--groups, --positive) from the predicted
                               volume of each class (Tilborghs et al. Fig. 2)
              class-wise ECE   with reliability diagrams, when the folder has the .npz probabilities of
                               nnUNetv2_predict --save_probabilities (Kervadec et al. Fig. 3): per class,
                               sum over bins of n_bin/N * |accuracy - mean confidence|, pooled over cases
            Tables give mean +- standard deviation over cases; a class empty in both reference and
            prediction has no Dice (left out, as in nnU-Net)."""),
        epilog="example: nnunet-losses evaluate pred/ --ground-truth $nnUNet_raw/Dataset001_X/labelsTs "
               "--dataset-json $nnUNet_raw/Dataset001_X/dataset.json --groups groups.json --positive HGG -o eval/",
    )
    parser.add_argument("predictions", help="folder of predicted segmentations (nnUNetv2_predict's output)")
    parser.add_argument("--ground-truth", required=True, metavar="DIR",
                        help="folder of reference segmentations with the same file names (e.g. labelsTs)")
    parser.add_argument("--dataset-json", required=True, metavar="JSON",
                        help="the dataset's dataset.json (labels or regions, ignore label, file ending)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder: summary.json (nnU-Net's), metrics.json, metrics.md, roc.png, "
                             "reliability.png")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="processes of nnU-Net's metric computation (default: nnU-Net's default, at most "
                             "one per case)")
    add_group_arguments(parser)
