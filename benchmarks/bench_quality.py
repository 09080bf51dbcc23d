#!/usr/bin/env python
"""Training quality: held-out Dice and validation curves of ``nnUNetv2_train`` with each of our trainers,
next to nnU-Net's ``nnUNetTrainer``, ``nnUNetTrainerDiceLoss`` and ``nnUNetTrainerCELoss``.

A campaign is every (dataset, trainer, budget, repeat) run. Each run is nnU-Net's own pipeline, as a
user would run it: ``nnUNetv2_train <id> <configuration> 0 -tr <trainer>_<E>ep_<I>it`` (a short run
by name: E epochs of I iterations), ``nnUNetv2_predict`` on the held-out test cases (``imagesTs``),
and nnU-Net's ``compute_metrics_on_folder`` against ``labelsTs``. A run stores one record:

* per-class Dice on the held-out test cases (nnU-Net's mean over cases; a case where reference and
  prediction are both empty has no Dice), per case too, and nnU-Net's fold-0 validation Dice;
* the validation curve: nnU-Net's pseudo-Dice per epoch against training iterations (the
  ``logging`` of ``checkpoint_final.pth``: ``mean_fg_dice``, ``ema_fg_dice``,
  ``dice_per_class_or_region``) and the losses;
* the wall time of training, prediction and evaluation, and the machine.

Records are written to ``--results`` after EACH run (a temporary file renamed over the old one), so
an interrupted campaign loses at most the run in progress; a second call with the same options skips
every finished (dataset, trainer, budget, repeat) and runs the rest. Repeats differ only by
nnU-Net's unseeded sampling and initialisation: same dataset, same plans, each repeat in its own
``nnUNet_results`` folder.

The datasets are generated (seeded, so a lost work folder is rebuilt identically): organ (large),
lesion (small, absent from some images), vessel (thin); ``synthetic2d`` by
``nnunet_losses.commands.synthetic.write_synthetic_dataset``, ``synthetic3d`` by this script.

Examples::

    python benchmarks/bench_quality.py --dry-run                          # the plan, and what is done
    python benchmarks/bench_quality.py                                    # the campaign (hours; resumable)
    python benchmarks/bench_quality.py --trainers nnUNetTrainer nnUNetTrainerMime --budgets 1x2 \\
        --repeats 1 --datasets synthetic2d --work-dir /tmp/q --results /tmp/q/quality.json   # smoke run
    python benchmarks/bench_quality.py --summarize                        # tables (.md) and curves (.png)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from nnunet_losses.trainers import TRAINER_NAMES
from nnunet_losses.training.names import SEPARATOR, match_token, short_run_name

from _common import describe_machine, machine_info, markdown_table, source_version, write_json
from bench_training import missing_trainers, nnunet_command, nnunet_environment, run_logged

BASELINE = "nnUNetTrainer"
DICE_REFERENCE = "nnUNetTrainerDiceLoss"
CE_REFERENCE = "nnUNetTrainerCELoss"
REFERENCES = (BASELINE, DICE_REFERENCE, CE_REFERENCE)
# the second check: each of our trainers against nnU-Net's single-loss trainer of its family
FAMILY_REFERENCE = {
    "nnUNetTrainerMime": DICE_REFERENCE,
    "nnUNetTrainerNegativeMime": DICE_REFERENCE,
    "nnUNetTrainerDiceI": DICE_REFERENCE,
    "nnUNetTrainerDiceCI": DICE_REFERENCE,
    "nnUNetTrainerDiceBI": DICE_REFERENCE,
    "nnUNetTrainerDiceBCI": DICE_REFERENCE,
    "nnUNetTrainerDiceIEps": DICE_REFERENCE,
    "nnUNetTrainerMarginalDice": DICE_REFERENCE,
    "nnUNetTrainerLeafDice": DICE_REFERENCE,
    "nnUNetTrainerCEL1": CE_REFERENCE,
    "nnUNetTrainerCEKL": CE_REFERENCE,
    # the compound trainers compete with nnU-Net's own Dice + CE
    "nnUNetTrainerDiceICE": BASELINE,
    "nnUNetTrainerDiceBICE": BASELINE,
    "nnUNetTrainerDiceIEpsCE": BASELINE,
    "nnUNetTrainerMarginalDiceCE": BASELINE,
    "nnUNetTrainerLeafDiceCE": BASELINE,
}
DEFAULT_TRAINERS = REFERENCES + tuple(TRAINER_NAMES)
DEFAULT_BUDGETS = "5x25,20x25"  # a quick look and the quickstart's budget (20 x 25: where the lesion is learned)
TOLERANCE = 0.03  # the first check: per class, at most this much below nnUNetTrainer
FOUND_AT = 0.5  # a class is found in the epoch its validation pseudo-Dice first reaches this
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "quality_cpu.json"
FOLD = "0"

LABELS = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
INTENSITIES = (0.0, 1.0, 2.5, -1.5)  # mean intensity of background, organ, lesion, vessel
NOISE = 0.35
LESION_EVERY = 3  # 3D: every third case has no lesion (in the training and in the test cases)


# ----------------------------------------------------------------------------------------------
# what a campaign is: datasets, budgets, runs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """A generated dataset: what is written (the generator's arguments) and how nnU-Net trains it."""

    key: str  # the name in options and records
    dataset_id: int
    short_name: str  # DatasetXXX_<short_name>
    configuration: str
    dimensions: int
    size: int  # side in pixels / voxels
    training_cases: int
    test_cases: int
    seed: int


DATASETS = {
    spec.key: spec for spec in (
        # seed 5: the lesion (present with probability 0.6) in 13 of the 20 training and 6 of the 10 test cases
        DatasetSpec("synthetic2d", 981, "QualitySynthetic2D", "2d", 2, 64, 20, 10, seed=5),
        DatasetSpec("synthetic3d", 982, "QualitySynthetic3D", "3d_fullres", 3, 32, 12, 6, seed=0),
    )
}


@dataclass(frozen=True, order=True)
class Budget:
    """``EPOCHSxITERATIONS``: E epochs of I training iterations (and I // 5 validation ones)."""

    epochs: int
    iterations: int

    @property
    def label(self) -> str:
        return f"{self.epochs}x{self.iterations}"

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations


@dataclass(frozen=True)
class Run:
    """One ``nnUNetv2_train`` + predict + evaluate of a campaign."""

    dataset: str
    trainer: str  # as given: a trainer name, possibly with tokens (nnUNetTrainerMime_adam), no budget
    budget: Budget
    repeat: int

    @property
    def key(self) -> tuple:
        return self.dataset, self.trainer, self.budget.label, self.repeat

    @property
    def run_name(self) -> str:
        """The ``-tr`` name: ``<trainer>_<E>ep_<I>it``."""
        return short_run_name(self.trainer, self.budget.epochs, self.budget.iterations)


def parse_budget(text: str) -> Budget:
    found = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if found is None or min(int(found[1]), int(found[2])) < 1:
        raise ValueError(f"--budgets: expected EPOCHSxITERATIONS with both >= 1, such as 5x25, got {text!r}")
    return Budget(int(found[1]), int(found[2]))


def split_list(values: Iterable[str], separator: Optional[str] = ",") -> list:
    """Option values given as ``a,b c`` (``separator=None``: only spaces): every item once, in order."""
    items = [item.strip() for value in values for item in value.split(separator)]
    return list(dict.fromkeys(item for item in items if item))


def check_trainer_has_no_budget(trainer: str) -> None:
    """The budget comes from ``--budgets``: a trainer name must not carry ``<E>ep``/``<I>it`` tokens."""
    for part in trainer.split(SEPARATOR)[1:]:
        matched = match_token(part)
        if matched is not None and matched[0].key in ("epochs", "iterations"):
            raise ValueError(f"--trainers: expected names without an epochs/iterations token (the budget is "
                             f"--budgets), got {trainer!r}")


def plan_runs(datasets: Sequence[str], trainers: Sequence[str], budgets: Sequence[Budget],
              repeats: int) -> list:
    """Every run, in the order that makes a partial campaign useful: the smaller budget first, repeat by
    repeat, so that each finished block compares every trainer on every dataset."""
    return [Run(dataset, trainer, budget, repeat)
            for budget in sorted(budgets, key=lambda b: b.total_iterations)
            for repeat in range(repeats)
            for dataset in datasets
            for trainer in trainers]


def base_trainer(trainer: str) -> str:
    """``nnUNetTrainerMime_adam`` -> ``nnUNetTrainerMime``: the trainer a name with tokens starts from."""
    return trainer.split(SEPARATOR)[0]


def is_ours(trainer: str) -> bool:
    return base_trainer(trainer) in TRAINER_NAMES


# ----------------------------------------------------------------------------------------------
# the results file: one record per finished run
# ----------------------------------------------------------------------------------------------
def empty_results() -> dict:
    return {"benchmark": "training quality (benchmarks/bench_quality.py)", "datasets": {}, "runs": [], "failures": []}


def load_results(path: Path) -> dict:
    if not path.is_file():
        return empty_results()
    results = json.loads(path.read_text())
    for key, value in empty_results().items():
        results.setdefault(key, value)
    return results


def record_key(record: dict) -> tuple:
    return record["dataset"], record["trainer"], record["budget"], record["repeat"]


def finished_keys(results: dict) -> set:
    return {record_key(record) for record in results["runs"]}


def pending_runs(runs: Sequence[Run], results: dict) -> list:
    done = finished_keys(results)
    return [run for run in runs if run.key not in done]


def store_record(path: Path, record: dict) -> dict:
    """Add a finished run's record to the file (read again first: another session may have added to it)
    and write it atomically; a failure stored earlier for the same run is dropped. Returns the results."""
    results = load_results(path)
    key = record_key(record)
    results["runs"] = [r for r in results["runs"] if record_key(r) != key] + [record]
    results["failures"] = [f for f in results["failures"] if record_key(f) != key]
    write_json(results, path)
    return results


def store_failure(path: Path, run: Run, error: str) -> None:
    """A failed run, kept for the report but not as finished: the next call retries it."""
    results = load_results(path)
    results["failures"] = [f for f in results["failures"] if record_key(f) != run.key]
    results["failures"].append(dict(zip(("dataset", "trainer", "budget", "repeat"), run.key), run_name=run.run_name,
                                    error=error[-4000:], when=now()))
    write_json(results, path)


def store_dataset(path: Path, key: str, description: dict) -> None:
    """The dataset's generator arguments and class proportions, once; a different dataset under the same
    name (other arguments, or a generator that now draws other images) would mix incomparable runs in one
    file, so it stops the campaign."""
    results = load_results(path)
    stored = results["datasets"].get(key)
    if stored is not None:
        if stored != description:
            raise SystemExit(f"expected dataset {key} as the finished runs in {path} have it ({stored}), got "
                             f"{description}: use another --results file")
        return
    results["datasets"][key] = description
    write_json(results, path)


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
def synthetic_volume(rng: np.random.Generator, size: int = 32, lesion: bool = True):
    """One ``(image, label_map)`` pair of ``size**3`` voxels (float32 / uint8): an ellipsoid organ
    (5-11 % of the volume), with ``lesion`` a sphere inside it (0.4-0.7 %), and a vessel, a bar of 3x3
    voxels along the first axis in the corner the organ leaves free (0.5 %)."""
    if size < 24:
        raise ValueError(f"size: expected at least 24 voxels, got {size}")
    grid = np.mgrid[:size, :size, :size].astype(np.float32)
    labels = np.zeros((size,) * 3, dtype=np.uint8)
    radii = rng.uniform(0.22, 0.30, size=3) * size
    centre = np.array([rng.uniform(r + 2, size - r - 2) for r in radii], dtype=np.float32)
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    labels[organ] = LABELS["organ"]
    if lesion:
        radius = rng.uniform(0.10, 0.12) * size
        direction = rng.normal(size=3)
        # inside the organ's inscribed sphere, hence inside the organ
        lesion_centre = centre + rng.uniform(0, min(radii) - radius - 1) * direction / np.linalg.norm(direction)
        lesion = sum((g - c) ** 2 for g, c in zip(grid, lesion_centre)) <= radius**2
        labels[lesion] = LABELS["lesion"]
    add_vessel(rng, labels, centre)
    image = np.asarray(INTENSITIES, dtype=np.float32)[labels]
    image += rng.normal(0.0, NOISE, size=image.shape).astype(np.float32)
    return image, labels


def add_vessel(rng: np.random.Generator, labels: np.ndarray, organ_centre: np.ndarray) -> None:
    """A bar of 3x3 voxels, 0.6 of the side long, along the first axis, into the background."""
    size = labels.shape[0]
    length = int(round(0.6 * size))
    start = int(rng.integers(2, size - length - 1))

    def far_side(centre: float) -> int:  # a corner away from the organ, 2 voxels off the border
        return int(rng.integers(2, size // 4)) if centre > size / 2 else int(rng.integers(3 * size // 4, size - 5))

    row, column = far_side(organ_centre[1]), far_side(organ_centre[2])
    bar = np.zeros_like(labels, dtype=bool)
    bar[start: start + length, row: row + 3, column: column + 3] = True
    labels[bar & (labels == 0)] = LABELS["vessel"]


def write_volume(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def write_synthetic_volumes(raw_folder: Path, spec: DatasetSpec) -> Path:
    """``spec``'s 3D dataset in nnU-Net's raw format (``imagesTr``/``labelsTr``, held-out ``imagesTs``/``labelsTs``)."""
    from nnunet_losses.commands.synthetic import dataset_name
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = raw_folder / dataset_name(spec.dataset_id, spec.short_name)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    for index in range(spec.training_cases + spec.test_cases):
        image, labels = synthetic_volume(rng, spec.size, lesion=index % LESION_EVERY != LESION_EVERY - 1)
        split = "Tr" if index < spec.training_cases else "Ts"
        case = f"{spec.short_name.lower()}_{index:03d}"
        write_volume(image, folder / f"images{split}" / f"{case}_0000.nii.gz")
        write_volume(labels, folder / f"labels{split}" / f"{case}.nii.gz")
    generate_dataset_json(str(folder), channel_names={0: "synthetic"}, labels=LABELS,
                          num_training_cases=spec.training_cases, file_ending=".nii.gz",
                          dataset_name=folder.name,
                          description="Synthetic 3D volumes written by benchmarks/bench_quality.py",
                          license="CC0 (synthetic)", converted_by="nnunet-losses")
    return folder


def write_dataset(raw_folder: Path, spec: DatasetSpec) -> Path:
    """The raw dataset of ``spec``: 2D by the package's generator, 3D by :func:`write_synthetic_volumes`."""
    if spec.dimensions == 3:
        return write_synthetic_volumes(raw_folder, spec)
    from nnunet_losses.commands.synthetic import write_synthetic_dataset

    written = write_synthetic_dataset(raw_folder, spec.dataset_id, spec.short_name, num_training=spec.training_cases,
                                      num_test=spec.test_cases, size=spec.size, seed=spec.seed)
    return Path(written.folder)


def label_fractions(labels: np.ndarray) -> dict:
    """Share of the image each foreground class covers: ``{"organ": 0.12, ...}``."""
    return {name: float(np.mean(labels == value)) for name, value in LABELS.items() if value != 0}


def class_proportions(label_folder: Path) -> dict:
    """Per class over the label files of a folder: in how many cases it is present, and its share of
    the image (mean, min, max over the cases where present)."""
    import SimpleITK as sitk

    per_case = [label_fractions(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
                for path in sorted(label_folder.glob("*.nii.gz"))]
    proportions = {}
    for name in per_case[0]:
        present = [case[name] for case in per_case if case[name] > 0]
        proportions[name] = dict(cases=len(per_case), present_in=len(present),
                                 mean=statistics.fmean(present) if present else 0.0,
                                 min=min(present, default=0.0), max=max(present, default=0.0))
    return proportions


def prepare_dataset(work: Path, spec: DatasetSpec, planning_processes: int) -> Path:
    """Write ``spec``'s dataset and run ``nnUNetv2_plan_and_preprocess`` on it, once per work folder
    (a marker file holding the spec says it finished); returns the raw dataset folder."""
    from nnunet_losses.commands.synthetic import dataset_name

    name = dataset_name(spec.dataset_id, spec.short_name)
    folder = work / "raw" / name
    marker = work / f"{spec.key}.prepared.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return folder
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted attempt or another spec: start afresh
    shutil.rmtree(work / "preprocessed" / name, ignore_errors=True)
    write_dataset(work / "raw", spec)
    env = nnunet_environment(work, work / "results", None)  # no nnUNet_n_proc_DA while planning
    run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(spec.dataset_id), "-c", spec.configuration,
                "-np", str(planning_processes), "--verify_dataset_integrity"],
               env, work / "logs" / f"plan_{spec.key}.log")
    marker.write_text(json.dumps(asdict(spec)))
    return folder


def describe_dataset(spec: DatasetSpec, folder: Path) -> dict:
    generator = ("benchmarks/bench_quality.py:synthetic_volume" if spec.dimensions == 3
                 else "nnunet_losses.commands.synthetic.write_synthetic_dataset")
    return {"spec": asdict(spec), "generator": generator, "folder_name": folder.name,
            "class_proportions": {"training": class_proportions(folder / "labelsTr"),
                                  "test": class_proportions(folder / "labelsTs")}}


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def run_folders(work: Path, run: Run, folder_name: str, configuration: str) -> dict:
    results = work / "results" / f"repeat{run.repeat}"
    return {"results": results,
            "fold": results / folder_name / f"{run.run_name}__nnUNetPlans__{configuration}" / f"fold_{FOLD}",
            "predictions": work / "predictions" / f"repeat{run.repeat}" / run.dataset / run.run_name,
            "logs": work / "logs" / f"repeat{run.repeat}" / run.dataset}


def train(run: Run, spec: DatasetSpec, folders: dict, work: Path, device: str) -> float:
    """``nnUNetv2_train`` from scratch (a folder left by an interrupted run is removed); returns seconds."""
    shutil.rmtree(folders["fold"].parent, ignore_errors=True)
    env = nnunet_environment(work, folders["results"], 0)  # augmentation in the training process
    start = time.perf_counter()
    run_logged([nnunet_command("nnUNetv2_train"), str(spec.dataset_id), spec.configuration, FOLD, "-tr", run.run_name,
                "-device", device], env, folders["logs"] / f"train_{run.run_name}.log")
    return time.perf_counter() - start


def predict(run: Run, spec: DatasetSpec, folders: dict, raw: Path, work: Path, device: str) -> float:
    """``nnUNetv2_predict`` of the held-out ``imagesTs``; returns seconds."""
    shutil.rmtree(folders["predictions"], ignore_errors=True)
    env = nnunet_environment(work, folders["results"], None)
    start = time.perf_counter()
    run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(folders["predictions"]),
                "-d", str(spec.dataset_id), "-c", spec.configuration, "-f", FOLD, "-tr", run.run_name,
                "-device", device, "-npp", "1", "-nps", "1", "--disable_progress_bar"],
               env, folders["logs"] / f"predict_{run.run_name}.log")
    return time.perf_counter() - start


def finite_or_none(value) -> Optional[float]:
    """A metric for JSON: NaN (nnU-Net's "no Dice": both empty) becomes None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def class_names(dataset_json: dict) -> dict:
    """Foreground label value -> class name."""
    return {int(value): name for name, value in dataset_json["labels"].items() if int(value) != 0}


def held_out_dice(predictions: Path, raw: Path, dataset_json: dict) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` on the predictions against ``labelsTs``, read by
    :func:`held_out_metrics`."""
    from nnunet_losses.commands.evaluation import nnunet_summary

    summary = nnunet_summary(predictions, raw / "labelsTs", dataset_json, predictions / "summary.json", num_processes=1)
    return held_out_metrics(summary, dataset_json)


def held_out_metrics(summary: dict, dataset_json: dict) -> dict:
    """From nnU-Net's ``summary.json``: per-class mean Dice, their foreground mean, the Dice of every case
    and per class the predicted and reference voxels over the test cases (``test_voxels``: their ratio
    tells over- from under-segmentation)."""
    names = class_names(dataset_json)
    per_case = {Path(entry["prediction_file"]).name.removesuffix(dataset_json["file_ending"]):
                {names[int(label)]: finite_or_none(metrics["Dice"]) for label, metrics in entry["metrics"].items()}
                for entry in summary["metric_per_case"]}
    voxels = {names[int(label)]: {count: int(sum(entry["metrics"][label][key] for entry in summary["metric_per_case"]))
                                  for count, key in (("predicted", "n_pred"), ("reference", "n_ref"))}
              for label in summary["mean"]}
    return {"test_dice": {names[int(label)]: finite_or_none(m["Dice"]) for label, m in summary["mean"].items()},
            "test_dice_mean": finite_or_none(summary["foreground_mean"]["Dice"]),
            "test_dice_per_case": per_case, "test_voxels": voxels}


def validation_dice(fold: Path, dataset_json: dict) -> dict:
    """nnU-Net's own validation at the end of training (fold 0's validation cases), per class."""
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    names = class_names(dataset_json)
    return {"validation_dice": {names[int(label)]: finite_or_none(m["Dice"]) for label, m in summary["mean"].items()},
            "validation_dice_mean": finite_or_none(summary["foreground_mean"]["Dice"])}


def training_curve(checkpoint: Path, iterations_per_epoch: int, names: Sequence[str]) -> dict:
    """Validation pseudo-Dice (and losses) per epoch from the ``logging`` of nnU-Net's checkpoint, against
    the training iterations done at the end of each epoch."""
    import torch

    logging = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    epochs = len(logging["mean_fg_dice"])

    def series(key):
        return [finite_or_none(v) for v in logging[key][:epochs]]

    per_class = [[finite_or_none(v) for v in epoch] for epoch in logging["dice_per_class_or_region"][:epochs]]
    return {"iterations": [(epoch + 1) * iterations_per_epoch for epoch in range(epochs)],
            "mean_fg_dice": series("mean_fg_dice"), "ema_fg_dice": series("ema_fg_dice"),
            "dice_per_class": {name: [epoch[i] for epoch in per_class] for i, name in enumerate(names)},
            "train_loss": series("train_losses"), "val_loss": series("val_losses"), "lr": series("lrs")}


def execute_run(run: Run, work: Path, raw: Path, args: argparse.Namespace) -> dict:
    """Train, predict and evaluate one run; returns its record."""
    spec = DATASETS[run.dataset]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    folders = run_folders(work, run, raw.name, spec.configuration)
    started = now()
    seconds = {"train": train(run, spec, folders, work, args.device)}
    seconds["predict"] = predict(run, spec, folders, raw, work, args.device)
    start = time.perf_counter()
    record = dict(dataset=run.dataset, trainer=run.trainer, budget=run.budget.label, repeat=run.repeat,
                  run_name=run.run_name, epochs=run.budget.epochs, iterations=run.budget.iterations,
                  configuration=spec.configuration, classes=list(class_names(dataset_json).values()))
    record.update(held_out_dice(folders["predictions"], raw, dataset_json))
    seconds["evaluate"] = time.perf_counter() - start
    record.update(validation_dice(folders["fold"], dataset_json))
    record["curve"] = training_curve(folders["fold"] / "checkpoint_final.pth", run.budget.iterations, record["classes"])
    seconds["total"] = sum(seconds.values())
    record.update(wall_seconds=seconds, started=started, finished=now(), device=args.device,
                  machine=machine_info(args.device), source=source_version())
    if not args.keep_checkpoints:  # every run's checkpoints would pile up; the record holds what is read from them
        for checkpoint in folders["fold"].glob("checkpoint_*.pth"):
            checkpoint.unlink()
    return record


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------
def estimate_seconds(run: Run, records: Sequence[dict]) -> Optional[float]:
    """Expected wall time of ``run``: the mean of finished runs of its dataset and budget, else the mean
    seconds per training iteration of its dataset's runs times its iterations; None without any."""
    same = [r["wall_seconds"]["total"] for r in records
            if r["dataset"] == run.dataset and r["budget"] == run.budget.label]
    if same:
        return statistics.fmean(same)
    per_iteration = [r["wall_seconds"]["total"] / (r["epochs"] * r["iterations"]) for r in records
                     if r["dataset"] == run.dataset]
    if per_iteration:
        return statistics.fmean(per_iteration) * run.budget.total_iterations
    return None


def remaining_seconds(pending: Sequence[Run], records: Sequence[dict]) -> Optional[float]:
    """Expected wall time of the pending runs; None while some dataset has no finished run to go by."""
    estimates = [estimate_seconds(run, records) for run in pending]
    return None if any(e is None for e in estimates) else sum(estimates)


def format_duration(seconds: Optional[float]) -> str:
    """``45s``, ``12m``, ``3h05m``; for None: no estimate yet."""
    if seconds is None:
        return "unknown (a dataset has no finished run yet)"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(round(seconds / 60))
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def format_dice(values: dict) -> str:
    return ", ".join(f"{name} {'-' if value is None else format(value, '.3f')}" for name, value in values.items())


def print_plan(runs: Sequence[Run], results: dict, results_path: Path) -> None:
    """The runs of the campaign, each marked done or to run, and the expected time of the rest."""
    done = finished_keys(results)
    failed = {record_key(f) for f in results["failures"]}
    rows = [[str(i + 1), run.dataset, run.run_name, str(run.repeat),
             "done" if run.key in done else "failed before, to run" if run.key in failed else "to run"]
            for i, run in enumerate(runs)]
    print(markdown_table(["#", "dataset", "-tr name", "repeat", "status"], rows))
    pending = pending_runs(runs, results)
    print(f"\n{len(runs) - len(pending)} of {len(runs)} runs done (in {results_path}), {len(pending)} to run; "
          f"expected time of the rest: {format_duration(remaining_seconds(pending, results['runs']))}")


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (None for fewer than 2 values) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def ordered_trainers(trainers: Iterable[str]) -> list:
    """nnU-Net's references first, then ours in the package's order, then any others as given."""
    trainers = list(dict.fromkeys(trainers))

    def rank(trainer):
        base = base_trainer(trainer)
        if trainer in REFERENCES:
            return 0, REFERENCES.index(trainer)
        if base in TRAINER_NAMES:
            return 1, TRAINER_NAMES.index(base)
        return 2, 0

    return sorted(trainers, key=lambda t: (rank(t), trainers.index(t)))


def trainer_statistics(records: Sequence[dict], classes: Sequence[str]) -> dict:
    """Over one trainer's repeats: ``{"n", "dice": {class: (mean, std)}, "mean": (mean, std)}``."""
    return {"n": len(records),
            "dice": {name: mean_std([r["test_dice"].get(name) for r in records]) for name in classes},
            "mean": mean_std([r["test_dice_mean"] for r in records])}


def check_against_baseline(ours: dict, baseline: Optional[dict], classes: Sequence[str]) -> Optional[dict]:
    """The issue's first check: every class's mean Dice at most TOLERANCE below nnUNetTrainer's.
    None where nnUNetTrainer has no finished run; else ``{"met", "short": {class: gap}}``."""
    if baseline is None:
        return None
    gaps = {name: ours["dice"][name][0] - baseline["dice"][name][0] for name in classes
            if ours["dice"][name][0] is not None and baseline["dice"][name][0] is not None}
    short = {name: gap for name, gap in gaps.items() if gap < -TOLERANCE}
    return {"met": not short, "short": short}


def check_against_family(ours: dict, reference: Optional[dict]) -> Optional[dict]:
    """The issue's second check: mean Dice over the classes at least that of the family's nnU-Net trainer."""
    if reference is None or ours["mean"][0] is None or reference["mean"][0] is None:
        return None
    gap = ours["mean"][0] - reference["mean"][0]
    return {"met": gap >= 0, "gap": gap}


def format_mean_std(value: tuple) -> str:
    mean, std = value
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def format_gap(ours: tuple, baseline: Optional[tuple]) -> str:
    if baseline is None or ours[0] is None or baseline[0] is None:
        return ""
    return f" ({ours[0] - baseline[0]:+.3f})"


def baseline_mark(check: Optional[dict], trainer: str) -> str:
    if not is_ours(trainer):
        return "-"
    if check is None:
        return f"pending ({BASELINE} not run)"
    return "ok" if check["met"] else "MISSED: " + ", ".join(f"{n} {g:+.3f}" for n, g in check["short"].items())


def has_family_check(trainer: str) -> bool:
    """The issue's second check is for the single-loss families; a compound (its family reference is
    nnUNetTrainer itself) is judged by the first check alone."""
    return is_ours(trainer) and FAMILY_REFERENCE[base_trainer(trainer)] != BASELINE


def family_mark(check: Optional[dict], trainer: str) -> str:
    if not has_family_check(trainer):
        return "-"
    if check is None:
        return f"pending ({FAMILY_REFERENCE[base_trainer(trainer)]} not run)"
    return ("ok" if check["met"] else "MISSED") + f" ({check['gap']:+.3f})"


def group_records(records: Sequence[dict]) -> dict:
    """``{dataset: {budget label: {trainer: [records]}}}``, budgets by size."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record["dataset"], {}).setdefault(record["budget"], {}).setdefault(
            record["trainer"], []).append(record)
    return {dataset: dict(sorted(by_budget.items(), key=lambda item: parse_budget(item[0]).total_iterations))
            for dataset, by_budget in groups.items()}


def budget_table(by_trainer: dict) -> tuple:
    """The Markdown table of one dataset and budget, and per trainer of ours its two checks."""
    classes = next(iter(by_trainer.values()))[0]["classes"]
    stats = {trainer: trainer_statistics(records, classes) for trainer, records in by_trainer.items()}
    baseline = stats.get(BASELINE)
    rows, checks = [], {}
    for trainer in ordered_trainers(by_trainer):
        s = stats[trainer]
        reference = FAMILY_REFERENCE.get(base_trainer(trainer))
        versus_baseline = check_against_baseline(s, baseline, classes) if is_ours(trainer) else None
        versus_family = check_against_family(s, stats.get(reference)) if has_family_check(trainer) else None
        if is_ours(trainer):
            checks[trainer] = (versus_baseline, versus_family if has_family_check(trainer) else NOT_CHECKED)
        gap_to = None if trainer == BASELINE or baseline is None else baseline
        rows.append([trainer, str(s["n"])]
                    + [format_mean_std(s["dice"][n]) + format_gap(s["dice"][n], gap_to and gap_to["dice"][n])
                       for n in classes]
                    + [format_mean_std(s["mean"]) + format_gap(s["mean"], gap_to and gap_to["mean"]),
                       baseline_mark(versus_baseline, trainer), family_mark(versus_family, trainer)])
    header = (["trainer", "runs"] + [f"Dice {n}" for n in classes] + ["mean Dice",
              f"within {TOLERANCE} of {BASELINE} (per class)", "≥ family's nnU-Net trainer (mean Dice)"])
    return markdown_table(header, rows), checks


def volume_ratio(record: dict, name: str) -> Optional[float]:
    """Predicted / reference voxels of a class over a run's test cases (> 1: over-segmentation); None
    for records without voxel counts or a class absent from every test case."""
    counts = record.get("test_voxels", {}).get(name)
    if not counts or not counts["reference"]:
        return None
    return counts["predicted"] / counts["reference"]


def volume_table(by_trainer: dict) -> Optional[str]:
    """Per trainer and class, mean ± std over repeats of :func:`volume_ratio`; None without voxel counts."""
    classes = next(iter(by_trainer.values()))[0]["classes"]
    rows = []
    for trainer in ordered_trainers(by_trainer):
        counted = [r for r in by_trainer[trainer] if "test_voxels" in r]
        if counted:
            rows.append([trainer, str(len(counted))]
                        + [format_mean_std(mean_std([volume_ratio(r, n) for r in counted])) for n in classes])
    if not rows:
        return None
    return markdown_table(["trainer", "runs"] + [f"{n} predicted / reference voxels" for n in classes], rows)


def first_epoch_found(values: Sequence[Optional[float]]) -> Optional[int]:
    """The first epoch (0-based) whose validation pseudo-Dice is at least FOUND_AT; None: never."""
    return next((epoch for epoch, value in enumerate(values) if value is not None and value >= FOUND_AT), None)


def format_onsets(records: Sequence[dict], name: str) -> str:
    """``found in k of n (epochs e, ...)`` over the runs that logged per-class validation Dice."""
    onsets = [first_epoch_found(r["curve"]["dice_per_class"][name]) for r in records]
    found = [str(epoch) for epoch in onsets if epoch is not None]
    return f"{len(found)} of {len(onsets)}" + (f" (epochs {', '.join(found)})" if found else "")


def onset_table(by_trainer: dict) -> Optional[str]:
    """Per trainer and class, in how many runs and from which epoch the class was found: a structure won
    or lost per run shows here as a split count, not as a mean Dice between the two outcomes."""
    classes = next(iter(by_trainer.values()))[0]["classes"]
    rows = []
    for trainer in ordered_trainers(by_trainer):
        logged = [r for r in by_trainer[trainer] if "dice_per_class" in r["curve"]]
        if logged:
            rows.append([trainer] + [format_onsets(logged, n) for n in classes])
    if not rows:
        return None
    return markdown_table(["trainer"] + [f"{n} found in" for n in classes], rows)


NOT_CHECKED = "not checked"  # a check that does not apply to a trainer (a compound's family check)


def count_marks(checks: dict, which: int) -> str:
    values = [c[which] for c in checks.values() if c[which] is not NOT_CHECKED]
    met = sum(1 for c in values if c is not None and c["met"])
    decided = sum(1 for c in values if c is not None)
    parts = [f"{met} of {decided} ok"] if decided else []
    if decided < len(values):
        parts.append(f"{len(values) - decided} pending")
    return ", ".join(parts)


def summary_markdown(results: dict) -> str:
    """One table per dataset and budget: mean ± std over repeats of the held-out per-class Dice, (the gap
    to nnUNetTrainer), and the issue's checks; the largest budget decides the checks."""
    lines = ["## Training quality", "",
             f"Held-out test Dice per class (nnU-Net's `compute_metrics_on_folder`), mean ± sample std over "
             f"repeats; in brackets the difference to {BASELINE} of the same budget. Checks for our trainers: "
             f"every class at most {TOLERANCE} below {BASELINE}; mean Dice over the classes at least that of "
             f"nnU-Net's single-loss trainer of the family ({DICE_REFERENCE} for the Dice losses and the mimes, "
             f"{CE_REFERENCE} for CEL1/CEKL; the Dice + CE compounds have the first check only). The issue's "
             f"targets are judged at each dataset's largest budget."]
    for dataset, by_budget in group_records(results["runs"]).items():
        lines += ["", f"### {dataset}", "", describe_proportions(results["datasets"].get(dataset))]
        largest = list(by_budget)[-1]
        for budget, by_trainer in by_budget.items():
            table, checks = budget_table(by_trainer)
            decides = " (decides the targets)" if budget == largest else ""
            lines += ["", f"#### {dataset}, {budget} (epochs x iterations){decides}", "", table]
            if budget == largest and checks:
                lines += ["", f"Targets at {budget}: within {TOLERANCE} of {BASELINE}: {count_marks(checks, 0)}; "
                              f"≥ family's nnU-Net trainer: {count_marks(checks, 1)}."]
            volumes = volume_table(by_trainer) if budget == largest else None
            if volumes:
                lines += ["", f"Volumes at {budget}: predicted / reference voxels of each class summed over the "
                              "test cases, mean ± std over repeats (1.000: the right amount; > 1 over-segments, "
                              "0 predicts the class nowhere).", "", volumes]
            onsets = onset_table(by_trainer) if budget == largest else None
            if onsets:
                lines += ["", f"Onsets at {budget}: in how many runs each class was found, a validation "
                              f"pseudo-Dice of at least {FOUND_AT} in some epoch, and the first such epoch "
                              "of each (0-based).", "", onsets]
    machines = sorted({machine_line(r["machine"], r["device"]) for r in results["runs"]})
    lines += ["", f"{len(results['runs'])} finished runs on: " + "; ".join(machines)]
    if results["failures"]:
        lines += [f"{len(results['failures'])} failed runs (retried on the next call): "
                  + ", ".join(f"{f['dataset']} {f['run_name']} repeat {f['repeat']}" for f in results["failures"])]
    return "\n".join(lines) + "\n"


def machine_line(machine: dict, device: str) -> str:
    """The machine of a record without its load (which differs from run to run)."""
    text = f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    if machine.get("gpu"):
        text += f", GPU {machine['gpu']}"
    return text + f", device {device}, torch {machine['torch']}, nnunetv2 {machine.get('nnunetv2')}"


def describe_proportions(description: Optional[dict]) -> str:
    if description is None:
        return "(dataset description not stored)"
    spec = description["spec"]
    shape = "x".join([str(spec["size"])] * spec["dimensions"])
    classes = description["class_proportions"]["training"]
    parts = [f"{name} {100 * p['mean']:.2f} % (min {100 * p['min']:.2f}, max {100 * p['max']:.2f}; in "
             f"{p['present_in']} of {p['cases']} cases)" for name, p in classes.items()]
    return (f"{spec['training_cases']} training + {spec['test_cases']} held-out test cases of {shape}, nnU-Net "
            f"{spec['configuration']}; share of the image per class (training cases): " + "; ".join(parts) + ".")


def mean_curve(records: Sequence[dict]) -> tuple:
    """Iterations and the mean over repeats of the validation pseudo-Dice (``mean_fg_dice``) per epoch."""
    iterations = records[0]["curve"]["iterations"]
    values = []
    for epoch in range(len(iterations)):
        mean, _ = mean_std([r["curve"]["mean_fg_dice"][epoch] for r in records
                            if epoch < len(r["curve"]["mean_fg_dice"])])
        values.append(float("nan") if mean is None else mean)
    return iterations, values


PLOT_FAMILIES = ("Dice only", "mimes", "CE + label-marginal penalty", "Dice + CE")


def plot_family(trainer: str) -> Optional[str]:
    """The panel of the curves a trainer of ours is drawn in (None: nnU-Net's and any other trainer, drawn
    in every panel)."""
    base = base_trainer(trainer)
    if trainer in REFERENCES or base not in FAMILY_REFERENCE:
        return None
    if "Mime" in base:
        return "mimes"
    return {CE_REFERENCE: "CE + label-marginal penalty", BASELINE: "Dice + CE"}.get(FAMILY_REFERENCE[base], "Dice only")


def plot_curves(results: dict, path: Path) -> Path:
    """Validation pseudo-Dice against training iterations: one row per dataset and budget, one panel per
    family of our trainers (:data:`PLOT_FAMILIES`) with nnU-Net's references dashed in each, one line
    per trainer (its colour the same in every row)."""
    from nnunet_losses.commands.output import pyplot

    plt = pyplot()
    rows = [(dataset, budget, by_trainer) for dataset, by_budget in group_records(results["runs"]).items()
            for budget, by_trainer in by_budget.items()]
    trainers = ordered_trainers(r["trainer"] for r in results["runs"])  # one colour per trainer in every panel
    families = [f for f in PLOT_FAMILIES if any(plot_family(t) == f for t in trainers)] or ["references"]
    fig, axes = plt.subplots(len(rows), len(families), figsize=(4.6 * len(families), 3.6 * len(rows)),
                             squeeze=False)
    # nnU-Net's three in tab20's first three dark colours; each family's trainers in the other dark
    # colours, then the light ones (a panel holds fewer than 17), the same in every row
    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    colours = {t: palette[i] for i, t in enumerate(REFERENCES)}
    for family in families:
        ours = [t for t in trainers if plot_family(t) == family]
        colours.update({t: palette[len(REFERENCES) + i % (len(palette) - len(REFERENCES))] for i, t in enumerate(ours)})
    # any other trainer (nnU-Net's other variants, a scratch subclass) is drawn in every panel: the palette's
    # last colours, apart from each panel's first
    others = [t for t in trainers if t not in REFERENCES and plot_family(t) is None]
    colours.update({t: palette[-1 - i % (len(palette) - len(REFERENCES))] for i, t in enumerate(others)})
    for row, (dataset, budget, by_trainer) in enumerate(rows):
        for column, family in enumerate(families):
            axis = axes[row][column]
            for trainer in ordered_trainers(by_trainer):
                if plot_family(trainer) not in (None, family):
                    continue
                reference = trainer in REFERENCES
                axis.plot(*mean_curve(by_trainer[trainer]), color=colours[trainer], marker=".",
                          lw=2.0 if reference else 1.0, ls="--" if reference else "-",
                          label=f"{trainer.removeprefix('nnUNetTrainer') or 'nnUNetTrainer'} "
                                f"({len(by_trainer[trainer])})")
            axis.set(title=f"{dataset}, {budget}: {family}", xlabel="training iterations",
                     ylabel="validation pseudo-Dice (mean)" if column == 0 else None, ylim=(0, 1))
    fig.tight_layout()  # before the legends: laid out with them, the panels would shrink to leave them room
    fig.subplots_adjust(hspace=1.1)  # room below each row for its legends (up to 5 lines of 2)
    for axis in axes.flat:  # each panel its own trainers and run counts, below it
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                    title="trainer (runs); nnU-Net's dashed", title_fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")  # the legends stand below the panels
    plt.close(fig)
    return path


def write_summary(results_path: Path) -> Optional[str]:
    """The tables (``.md``) and curves (``.png``) next to the results file; None without finished runs."""
    results = load_results(results_path)
    if not results["runs"]:
        return None
    text = summary_markdown(results)
    results_path.with_suffix(".md").write_text(text)
    plot_curves(results, results_path.with_suffix(".png"))
    return text


def rescore(results_path: Path, work: Path) -> tuple:
    """Re-read the held-out metrics of every finished run from its predictions' ``summary.json`` in
    ``work`` (after :func:`held_out_metrics` learnt a metric). A record keeps what it has where its folder
    is gone, unreadable or holds another run (its Dice, mean or per case, differs). The file is read
    again just before it is written, and only the rescored records change: a campaign that stores a
    run meanwhile keeps it. Returns ``(updated, [run names left as they were])``."""
    if not results_path.is_file():
        raise SystemExit(f"expected a results file of finished runs, got no file {results_path}")
    rescored, left = {}, []
    for record in load_results(results_path)["runs"]:
        metrics = _stored_metrics(record, work)
        if metrics is None or any(metrics[key] != record.get(key) for key in DICE_KEYS):
            left.append(f"{record['dataset']} {record['run_name']} repeat {record['repeat']}")
        else:
            rescored[record_key(record)] = metrics
    if rescored:
        results = load_results(results_path)
        for record in results["runs"]:
            record.update(rescored.get(record_key(record), {}))
        write_json(results, results_path)
    return len(rescored), left


DICE_KEYS = ("test_dice", "test_dice_mean", "test_dice_per_case")  # what identifies a run's predictions


def _stored_metrics(record: dict, work: Path) -> Optional[dict]:
    """:func:`held_out_metrics` of a record's prediction folder, or None where it has no readable summary."""
    run = Run(record["dataset"], record["trainer"], parse_budget(record["budget"]), record["repeat"])
    folder = run_folders(work, run, "", "")["predictions"]
    try:
        summary = json.loads((folder / "summary.json").read_text())
        return held_out_metrics(summary, json.loads((folder / "dataset.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=[" ".join(DEFAULT_TRAINERS)], metavar="TRAINER",
                        help="trainer names (space-separated: a name's per-class values hold commas), ours or "
                             "nnU-Net's, with tokens but without "
                             "a budget; default: nnU-Net's three references and our 11 trainers")
    parser.add_argument("--budgets", nargs="+", default=[DEFAULT_BUDGETS], metavar="ExI",
                        help="training budgets, EPOCHSxITERATIONS, comma-separated; each run is "
                             "-tr <trainer>_<E>ep_<I>it")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (dataset, trainer, budget)")
    parser.add_argument("--datasets", nargs="+", default=[",".join(DATASETS)], metavar="DATASET",
                        help=f"generated datasets, among {', '.join(DATASETS)}")
    parser.add_argument("--work-dir", type=Path, default=Path("quality_work"),
                        help="nnU-Net's raw/preprocessed/results folders, predictions and logs (kept: a second "
                             "call reuses the preprocessed datasets)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="the JSON file of finished runs (written after each run; the summary goes next to it)")
    parser.add_argument("--device", default="cpu", help="nnUNetv2_train/predict -device: cpu, cuda or mps")
    parser.add_argument("--planning-processes", type=int, default=2, help="nnUNetv2_plan_and_preprocess -np")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every run's checkpoint_*.pth (by default removed once the run is recorded)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of runs and what is done; run nothing")
    parser.add_argument("--rescore", action="store_true",
                        help="re-read the held-out metrics of the finished runs from the predictions in --work-dir "
                             "into --results (runs nothing; a run whose predictions are gone keeps its record)")
    parser.add_argument("--summarize", action="store_true",
                        help="write the tables (.md) and curves (.png) of the finished runs next to --results; "
                             "run nothing")
    return parser


def parse_campaign(args: argparse.Namespace) -> tuple:
    """``(datasets, trainers, budgets)`` of the options, checked."""
    datasets = split_list(args.datasets)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"--datasets: expected names among {list(DATASETS)}, got {unknown}")
    trainers = split_list(args.trainers, separator=None)  # names hold commas: per-class values (a1.9,1,0.5)
    try:
        for trainer in trainers:
            check_trainer_has_no_budget(trainer)
        budgets = sorted({parse_budget(b) for b in split_list(args.budgets)}, key=lambda b: b.total_iterations)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected an int >= 1, got {args.repeats}")
    if not (datasets and trainers and budgets):
        raise SystemExit("expected at least one dataset, trainer and budget, got none of one of them")
    return datasets, trainers, budgets


def check_names_resolve(runs: Sequence[Run]) -> None:
    """Every ``-tr`` name of the campaign is one nnU-Net finds, before hours of runs start."""
    names = sorted({run.run_name for run in runs})
    absent = missing_trainers(names)
    if absent:
        raise SystemExit(f"expected trainer names nnU-Net finds, got {absent} "
                         "(see `nnunet-losses trainers NAME` for what a name stands for)")


def run_campaign(runs: Sequence[Run], args: argparse.Namespace) -> int:
    """Every pending run, its record stored as soon as it finishes; returns the number of failed runs."""
    work = args.work_dir.resolve()
    pending = pending_runs(runs, load_results(args.results))
    print(f"{len(runs) - len(pending)} of {len(runs)} runs already done in {args.results}; {len(pending)} to run. "
          f"Work folder: {work}", flush=True)
    raws = {}
    failures = 0
    for index, run in enumerate(pending, start=1):
        if run.dataset not in raws:
            print(f"Dataset {run.dataset}: written and planned once per work folder ...", flush=True)
            raws[run.dataset] = prepare_dataset(work, DATASETS[run.dataset], args.planning_processes)
            store_dataset(args.results, run.dataset, describe_dataset(DATASETS[run.dataset], raws[run.dataset]))
        print(f"[{index}/{len(pending)}] {run.dataset} {run.run_name} repeat {run.repeat} ...", flush=True)
        try:
            record = execute_run(run, work, raws[run.dataset], args)
        except (RuntimeError, OSError, KeyError) as error:  # stored and reported; the other runs go on
            failures += 1
            store_failure(args.results, run, str(error))
            print(f"[{index}/{len(pending)}] FAILED (retried on the next call): {error}", flush=True)
            continue
        results = store_record(args.results, record)
        rest = pending_runs(runs, results)
        eta = format_duration(remaining_seconds(rest, results["runs"]))
        print(f"[{index}/{len(pending)}] done in {record['wall_seconds']['total']:.0f} s "
              f"(train {record['wall_seconds']['train']:.0f} s); test Dice {format_dice(record['test_dice'])}; "
              f"{len(runs) - len(rest)} of {len(runs)} done, ETA {eta}",
              flush=True)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.results = args.results.resolve()
    if args.rescore:
        updated, left = rescore(args.results, args.work_dir.resolve())
        print(f"Re-read the held-out metrics of {updated} runs into {args.results}"
              + (f"; {len(left)} left as they were (predictions gone or of another run):" if left else ""))
        for name in left:
            print(f"  {name}")
        args.summarize = True
    if args.summarize:
        text = write_summary(args.results)
        if text is None:
            raise SystemExit(f"expected finished runs in {args.results}, got none")
        print(text)
        print(f"Wrote {args.results.with_suffix('.md')} and {args.results.with_suffix('.png')}")
        return 0
    datasets, trainers, budgets = parse_campaign(args)
    runs = plan_runs(datasets, trainers, budgets, args.repeats)
    check_names_resolve(runs)
    if args.dry_run:
        print_plan(runs, load_results(args.results), args.results)
        return 0
    print(f"Machine: {describe_machine(machine_info(args.device))}", flush=True)
    try:
        failures = run_campaign(runs, args)
    except KeyboardInterrupt:
        raise SystemExit(f"\nInterrupted: every finished run is in {args.results}; the same command resumes") from None
    text = write_summary(args.results)
    if text is not None:
        print("\n" + text)
        print(f"Wrote {args.results.with_suffix('.md')} and {args.results.with_suffix('.png')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
