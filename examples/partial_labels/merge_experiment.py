"""One model from several partially labelled datasets, on a CPU: the Decathlon use of marginal Dice
(Shi et al., in Tilborghs §2.1) with three generated 3D datasets of one synthetic anatomy.

    python examples/partial_labels/merge_experiment.py                     # the real run (not yet measured)
    python examples/partial_labels/merge_experiment.py --repeats 3         # mean ± std over three trainings
    python examples/partial_labels/merge_experiment.py --epochs 1 --iterations 2 --size 24 --cases 5 5 5
    python examples/partial_labels/merge_experiment.py --help

The anatomy: an ``organ`` (a ball), a ``lesion`` inside it (a small ball) and a ``vessel`` (a tube
beside it). Three sources image it with their own contrast and spacing, and each annotates a
different subset, the rest reading as background (as the Decathlon's liver, pancreas and spleen CTs):

==============  ====================  =========================================
source          annotates             cases (default)
==============  ====================  =========================================
OrganLesion     organ, lesion         12
Vessels         vessel                6
OrganVessel     organ, vessel         8
==============  ====================  =========================================

``nnunet-losses merge`` makes one dataset of them (one label space, each case's label set in
dataset.json "annotated_labels", provenance in "case_sources"). Trained on it, with nnU-Net's own
commands: ``nnUNetTrainerMarginalDice`` and ``nnUNetTrainerLeafDice`` and their DC+CE forms
``nnUNetTrainerMarginalDiceCE`` and ``nnUNetTrainerLeafDiceCE`` (with Fidon et al.'s label-set CE; all
told what each case annotates, cases drawn per source with ``--source-sampling``, the ``_srcsqrt``
token: ``recipes.MERGE_TRAINERS``), and nnU-Net's
``nnUNetTrainer`` on the naive merge (a structure a source did not annotate is background there);
against them, one ``nnUNetTrainer`` per source. Every model predicts held-out cases of every source
with ALL structures labelled, and the table gives the Dice of each structure per source of the test
cases (a per-source model: the structures its source annotates).

Everything happens under --work-dir with its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results
(yours are never touched); logs go to <work-dir>/logs/. Finished steps are reused when the command is
run again (an interrupted training continues with --c); delete a folder to redo its step. Repeat r > 0
trains in <work-dir>/nnUNet_results_repeat<r> (same datasets and plans). Results: <work-dir>/results.md
and .json (the mean over repeats, and every repeat's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_choice import add_optimizer_argument, trainer_name  # noqa: E402
from quickstart import Runner  # noqa: E402
from recipes import MERGE_TRAINERS, add_merge_arguments, sampling_token  # noqa: E402

STRUCTURES = {"organ": 1, "lesion": 2, "vessel": 3}  # the full label map of the held-out cases
INTENSITIES = (0.0, 1.0, 2.5, -1.5)  # background, organ, lesion, vessel (times the source's contrast)
NOISE = 0.35
FILE_ENDING = ".nii.gz"
NAIVE_TRAINER = "nnUNetTrainer"  # nnU-Net's DC+CE: ignores annotated_labels, a missing structure is background
MERGED_NAME = "SyntheticBody"


@dataclass(frozen=True)
class Source:
    """One generated dataset: what it annotates and how it images the anatomy."""

    name: str
    annotated: tuple  # structure names, in the order of its own label values
    contrast: float  # multiplies the intensities: sources look different, as scanners do
    spacing: tuple  # (x, y, z) in mm: spacing may differ between sources, nnU-Net resamples


SOURCES = (Source("OrganLesion", ("organ", "lesion"), 1.0, (1.0, 1.0, 1.0)),
           Source("Vessels", ("vessel",), 0.8, (1.0, 1.0, 1.5)),
           Source("OrganVessel", ("vessel", "organ"), 1.2, (1.2, 1.2, 1.0)))
DEFAULT_CASES = (12, 6, 8)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def body_case(rng: np.random.Generator, size: int, contrast: float, lesion_probability: float = 0.8):
    """One ``(image, labels)`` pair of ``size**3`` float32 / uint8 arrays (z, y, x), labels as STRUCTURES."""
    zz, yy, xx = np.mgrid[:size, :size, :size].astype(np.float32)
    labels = np.zeros((size,) * 3, dtype=np.uint8)
    radius = rng.uniform(0.2, 0.27) * size
    cz, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    cx = rng.uniform(radius + 1, size / 2)  # the organ keeps to the left half, the vessel to the right
    labels[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = STRUCTURES["organ"]
    if rng.random() < lesion_probability:
        lesion = rng.uniform(0.3, 0.45) * radius
        direction = rng.normal(size=3)
        offset = rng.uniform(0, max(radius - lesion - 1, 0)) * direction / np.linalg.norm(direction)
        lz, ly, lx = np.array([cz, cy, cx]) + offset
        labels[(zz - lz) ** 2 + (yy - ly) ** 2 + (xx - lx) ** 2 <= lesion ** 2] = STRUCTURES["lesion"]
    tube = max(1.5, 0.06 * size)
    ty, tx = rng.uniform(tube + 1, size - tube - 1), rng.uniform(0.7 * size, size - tube - 1)
    labels[((yy - ty) ** 2 + (xx - tx) ** 2 <= tube ** 2) & (labels == 0)] = STRUCTURES["vessel"]
    image = contrast * np.asarray(INTENSITIES, dtype=np.float32)[labels]
    image += rng.normal(0.0, NOISE, size=image.shape).astype(np.float32)
    return image, labels


def as_source_labels(labels: np.ndarray, source: Source) -> np.ndarray:
    """The label map as ``source`` annotates it: its structures get its own values 1, 2, ...; the rest is 0."""
    annotated = np.zeros_like(labels)
    for value, name in enumerate(source.annotated, start=1):
        annotated[labels == STRUCTURES[name]] = value
    return annotated


def write_volume(array: np.ndarray, path: Path, spacing: tuple) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)


def write_source(raw: Path, test_root: Path, dataset_id: int, source: Source, num_training: int, num_test: int,
                 size: int, seed: int) -> Path:
    """The source's raw dataset (its annotation only) and its held-out cases with ALL structures labelled
    (``test_root/<source>/imagesTs``, ``labelsTs``, values as STRUCTURES); returns the dataset folder."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = raw / f"Dataset{dataset_id:03d}_{source.name}"
    if folder.exists():
        raise FileExistsError(f"dataset: expected a new folder, got existing {folder}")
    test = test_root / source.name
    for sub in (folder / "imagesTr", folder / "labelsTr", test / "imagesTs", test / "labelsTs"):
        sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_training + num_test):
        training = index < num_training
        image, labels = body_case(rng, size, source.contrast, lesion_probability=0.8 if training else 1.0)
        case = f"{source.name.lower()}_{index:03d}"
        images, label_folder = (folder / "imagesTr", folder / "labelsTr") if training else (test / "imagesTs",
                                                                                           test / "labelsTs")
        write_volume(image, images / f"{case}_0000{FILE_ENDING}", source.spacing)
        write_volume(as_source_labels(labels, source) if training else labels, label_folder / f"{case}{FILE_ENDING}",
                     source.spacing)
    generate_dataset_json(
        str(folder), channel_names={0: "synthetic"},
        labels={"background": 0, **{name: value for value, name in enumerate(source.annotated, start=1)}},
        num_training_cases=num_training, file_ending=FILE_ENDING, dataset_name=folder.name,
        description=f"Synthetic 3D body annotating {', '.join(source.annotated)} (examples/partial_labels)",
        license="CC0 (synthetic)", converted_by="nnunet-losses")
    return folder


# ----------------------------------------------------------------------------------------------
# nnU-Net: plan, train, predict
# ----------------------------------------------------------------------------------------------
def plan(runner: Runner, dataset_ids: Sequence[int], configuration: str) -> None:
    todo = [i for i in dataset_ids if not list(runner.preprocessed.glob(f"Dataset{i:03d}_*/nnUNetPlans_{configuration}"))]
    if todo:
        runner.run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", *map(str, todo), "-c", configuration,
                                           "-np", "1", "-npfp", "1"])


def train(runner: Runner, dataset: str, trainer: str, args: argparse.Namespace) -> Path:
    """nnU-Net's ``run_training`` (what nnUNetv2_train calls) in a process with ``--threads`` torch threads;
    an interrupted run continues (--c). Returns the model folder."""
    model = runner.results / dataset / f"{trainer}__nnUNetPlans__{args.configuration}"
    fold = model / "fold_0"
    if (fold / "checkpoint_final.pth").is_file():
        return model
    code = (f"import torch; torch.set_num_threads({args.threads}); "
            "from nnunetv2.run.run_training import run_training; "
            f"run_training({dataset!r}, {args.configuration!r}, 0, {trainer!r}, device=torch.device({args.device!r}), "
            f"continue_training={fold.is_dir()})")
    runner.run(f"train_{dataset}_{trainer}", ["python", "-c", code], training=True)
    return model


def predict(runner: Runner, model: Path, images: Path, output: Path, args: argparse.Namespace) -> Path:
    """nnU-Net's predictor on ``images``, sequentially in one process (no worker processes on a small CPU)."""
    if output.is_dir() and len(list(output.glob(f"*{FILE_ENDING}"))) == len(list(images.glob(f"*{FILE_ENDING}"))):
        return output
    output.mkdir(parents=True, exist_ok=True)
    code = (f"import torch; torch.set_num_threads({args.threads}); "
            "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor; "
            f"p = nnUNetPredictor(device=torch.device({args.device!r}), "
            f"perform_everything_on_device={args.device == 'cuda'}, allow_tqdm=False); "
            f"p.initialize_from_trained_model_folder({str(model)!r}, (0,)); "
            f"p.predict_from_files_sequential({str(images)!r}, {str(output)!r})")
    runner.run(f"predict_{model.parent.name}_{model.name}_{images.parent.name}", ["python", "-c", code])
    return output


# ----------------------------------------------------------------------------------------------
# evaluation: Dice per structure (by name) and source of the held-out cases
# ----------------------------------------------------------------------------------------------
def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|); NaN when both are empty."""
    total = int(prediction.sum() + reference.sum())
    return float("nan") if total == 0 else 2.0 * float((prediction & reference).sum()) / total


def structure_dice(predictions: Path, labels: Path, model_labels: dict) -> dict:
    """Structure -> mean Dice over the cases of ``labels`` (full maps, STRUCTURES' values), for each
    structure the model knows (``model_labels``: its dataset.json "labels", name -> value)."""
    import SimpleITK as sitk

    scores: Dict[str, list] = {name: [] for name in STRUCTURES if name in model_labels}
    for reference_file in sorted(labels.glob(f"*{FILE_ENDING}")):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / reference_file.name)))
        for name in scores:
            scores[name].append(dice(prediction == model_labels[name], reference == STRUCTURES[name]))
    return {name: float(np.nanmean(values)) if values else float("nan") for name, values in scores.items()}


def mean_over_repeats(repeats: Sequence[Dict[str, Dict[str, dict]]]) -> Dict[str, Dict[str, dict]]:
    """model -> source -> structure -> (mean, sample std or None below two values, values): over the
    repeats that trained the model (a repeat in progress has only some) and had the structure."""
    summary: Dict[str, Dict[str, dict]] = {}
    for model in dict.fromkeys(m for r in repeats for m in r):  # in training order
        trained = [r[model] for r in repeats if model in r]
        for source, scores in trained[0].items():
            for name in scores:
                values = [t[source][name] for t in trained if not np.isnan(t[source][name])]
                std = float(np.std(values, ddof=1)) if len(values) > 1 else None
                entry = (float(np.mean(values)) if values else float("nan"), std, len(values))
                summary.setdefault(model, {}).setdefault(source, {})[name] = entry
    return summary


def result_table(repeats: Sequence[Dict[str, Dict[str, dict]]]) -> str:
    """Markdown: one row per (model, source of the test cases), the Dice of each structure ('—': unknown to
    it), mean ± sample std over the repeats where there are several (``n=`` where fewer had a value)."""
    from nnunet_losses.commands.output import markdown_table

    def cell(entry):
        mean, std, count = entry
        text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
        return text if count == len(repeats) else f"{text} (n={count})"  # a structure missing from some repeats

    rows = [[model, source] + [cell(scores[name]) if name in scores else "—" for name in STRUCTURES]
            for model, per_source in mean_over_repeats(repeats).items() for source, scores in per_source.items()]
    return markdown_table(["model", "test cases of"] + [f"Dice {name}" for name in STRUCTURES], rows, "ll" + "r" * 3)


# ----------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------
def run_name(trainer: str, args: argparse.Namespace, sampled: bool = False) -> str:
    """``<trainer>[_srcsqrt][_adam]_<E>ep_<I>it``: the trainer with its draw per source, optimizer and budget."""
    from nnunet_losses.training.names import short_run_name

    sampling = sampling_token(args.source_sampling) if sampled else ""
    return short_run_name(trainer_name(trainer + sampling, args.optimizer), args.epochs, args.iterations)


def runs_of(args: argparse.Namespace, merged: str, sources: Dict[str, Source]) -> List[tuple]:
    """(row label, dataset, trainer) of every training: the merged dataset's, then one per source."""
    runs = [(t.replace("nnUNetTrainer", ""), merged, run_name(t, args, sampled=True)) for t in MERGE_TRAINERS]
    runs.append(("naive merge (nnUNetTrainer)", merged, run_name(NAIVE_TRAINER, args)))
    if args.per_source:
        runs += [(f"{source.name} only", dataset, run_name(NAIVE_TRAINER, args)) for dataset, source in sources.items()]
    return runs


def prepare(runner: Runner, args: argparse.Namespace) -> tuple:
    """The three sources and the merged dataset (each written once), planned; returns (merged, sources)."""
    sources = {}
    for index, (source, cases) in enumerate(zip(SOURCES, args.cases)):
        dataset_id = args.dataset_id + index
        found = sorted(runner.raw.glob(f"Dataset{dataset_id:03d}_*"))
        folder = found[0] if found else write_source(runner.raw, runner.work_dir / "test", dataset_id, source, cases,
                                                     args.test_cases, args.size, args.seed + index)
        sources[folder.name] = source
    merged_id = args.dataset_id + len(SOURCES)
    merged = f"Dataset{merged_id:03d}_{MERGED_NAME}"
    if not (runner.raw / merged).is_dir():
        runner.run("merge", ["nnunet-losses", "merge", *[str(args.dataset_id + i) for i in range(len(SOURCES))],
                             "--target-id", str(merged_id), "--name", MERGED_NAME, "--no-progress"])
    ids = [merged_id] + ([args.dataset_id + i for i in range(len(SOURCES))] if args.per_source else [])
    plan(runner, ids, args.configuration)
    return merged, sources


def repeat_runner(runner: Runner, repeat: int) -> Runner:
    """The Runner of one repeat: the same datasets and plans; repeat 0 in the work folder's nnUNet_results,
    repeat r > 0 in nnUNet_results_repeat<r> (predictions and logs likewise), so a repeat is a fresh
    training (nnU-Net does not seed its sampling: runs differ)."""
    if repeat == 0:
        return runner
    other = copy.copy(runner)
    other.results = runner.work_dir / f"nnUNet_results_repeat{repeat}"
    other.logs = runner.logs / f"repeat{repeat}"
    for folder in (other.results, other.logs):
        folder.mkdir(parents=True, exist_ok=True)
    other.environment = dict(runner.environment, nnUNet_results=str(other.results))
    return other


def predictions_folder(runner: Runner) -> Path:
    return runner.work_dir / runner.results.name.replace("nnUNet_results", "predictions")


def evaluate_run(runner: Runner, dataset: str, model: Path, sources: Dict[str, Source],
                 args: argparse.Namespace) -> dict:
    """Test source -> structure -> Dice of one trained model on every source's held-out cases."""
    labels = json.loads((runner.raw / dataset / "dataset.json").read_text())["labels"]
    per_source = {}
    for source in sources.values():
        test = runner.work_dir / "test" / source.name
        output = predictions_folder(runner) / dataset / model.name / source.name
        predict(runner, model, test / "imagesTs", output, args)
        per_source[source.name] = structure_dice(output, test / "labelsTs", labels)
    return per_source


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One model from three partially labelled synthetic 3D datasets (nnunet-losses merge): marginal "
                    "and leaf Dice vs nnU-Net on the naive merge vs one model per source, Dice per structure and "
                    "source on fully labelled held-out cases.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("merge_experiment_work"),
                        help="folder for the datasets, nnU-Net's folders, predictions, logs and results")
    parser.add_argument("--cases", type=int, nargs=len(SOURCES), default=list(DEFAULT_CASES), metavar="N",
                        help="training cases of " + ", ".join(s.name for s in SOURCES) + " (at least 5 each)")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out cases per source (fully labelled)")
    parser.add_argument("--size", type=int, default=32, help="volume side in voxels (at least 24)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per training")
    parser.add_argument("--iterations", type=int, default=60, help="training iterations per epoch")
    parser.add_argument("--repeats", type=int, default=1,
                        help="trainings of every model (nnU-Net does not seed its sampling); the table gives "
                             "mean ± std over them")
    add_merge_arguments(parser)
    add_optimizer_argument(parser)
    parser.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("--dataset-id", type=int, default=970, help="first of the four dataset ids (ID..ID+3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training and prediction")
    args = parser.parse_args(argv)
    for name in ("epochs", "iterations", "repeats", "test_cases", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if min(args.cases) < 5:
        parser.error(f"--cases: expected at least 5 per source (nnU-Net's 5 folds), got {args.cases}")
    if args.size < 24:
        parser.error(f"--size: expected at least 24 voxels, got {args.size}")
    if not 1 <= args.dataset_id <= 996:
        parser.error(f"--dataset-id: expected an ID in [1, 996] (four consecutive IDs are used), got {args.dataset_id}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from nnunet_losses.training.discovery import enable_trainers

    args = parse_args(argv)
    enable_trainers()  # the Runner's nnU-Net commands find our trainers and their names with tokens
    runner = Runner(args.work_dir.resolve())
    print(f"Working in {runner.work_dir} ({args.device}, {args.configuration}): {args.epochs} epochs x "
          f"{args.iterations} iterations with {args.optimizer}; logs in {runner.logs}")
    merged, sources = prepare(runner, args)
    runs = runs_of(args, merged, sources)
    repeats: List[Dict[str, dict]] = [{} for _ in range(args.repeats)]
    steps = [(r, run) for r in range(args.repeats) for run in runs]  # repeat by repeat: a partial run compares all
    command = "python examples/partial_labels/merge_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for repeat, (label, dataset, trainer) in tqdm(steps, unit="training", dynamic_ncols=True,
                                                  desc="train, predict, evaluate"):
        repeated = repeat_runner(runner, repeat)
        repeats[repeat][label] = evaluate_run(repeated, dataset, train(repeated, dataset, trainer, args), sources, args)
        # after every training: an interrupted run leaves the table of what it finished
        text, mean = write_results(runner.work_dir, command, args, runs, repeats)
    print("\n" + text + f"\n\nWritten: {runner.work_dir / 'results.md'}, {runner.work_dir / 'results.json'}")
    return {"work_dir": runner.work_dir, "results": mean, "repeats": repeats, "table": result_table(repeats)}


def write_results(work_dir: Path, command: str, args: argparse.Namespace, runs: list, repeats: list) -> tuple:
    """results.md (the table) and results.json (means and every repeat) of the trainings finished so far."""
    from nnunet_losses.commands.output import write_json, write_markdown

    text = f"`{command.strip()}`\n\n{result_table(repeats)}"
    write_markdown(text, work_dir / "results.md")
    mean = {model: {source: {name: entry[0] for name, entry in scores.items()} for source, scores in per_source.items()}
            for model, per_source in mean_over_repeats(repeats).items()}
    write_json({"arguments": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "results": mean,
                "results_per_repeat": repeats}, work_dir / "results.json")
    return text, mean


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\nInterrupted. Run the same command again to continue: finished steps are reused.")
