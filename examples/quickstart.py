"""Quickstart: train nnU-Net with a few of our losses and its default DC+CE on a small synthetic dataset,
predict held-out cases and compare the per-class Dice.

    python examples/quickstart.py                       # CPU, about 10 minutes on a laptop
    python examples/quickstart.py --epochs 5            # a quicker look (the small lesion is then hit or miss)
    python examples/quickstart.py --help

Everything happens under --work-dir (default ./quickstart_work), with its own nnUNet_raw,
nnUNet_preprocessed and nnUNet_results: your own nnU-Net folders are never touched. Each step's
output is logged to <work-dir>/logs/. Finished steps are reused when you run it again (an interrupted
training continues with --c), so delete a folder to redo its step.

What it runs, with nnU-Net's own commands:
  1. writes a 2D dataset (organ, a small lesion absent from some cases, a thin vessel; 64x64 images),
  2. nnUNetv2_plan_and_preprocess -c 2d,
  3. nnUNetv2_train -tr <trainer>_<E>ep_<I>it for each trainer (short runs: E epochs of I iterations),
  4. nnUNetv2_predict on the held-out cases (imagesTs),
  5. nnU-Net's compute_metrics_on_folder against labelsTs, printed as a table of per-class Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMime_cwfixed_sgd", "nnUNetTrainerMime", "nnUNetTrainerDiceICE")
# what each default row shows, printed under the table (measured over repeats: benchmarks/README.md)
ROW_MEANINGS = {
    "nnUNetTrainer": "nnU-Net's default loss, Dice + CE: the reference. At this budget it finds the small lesion "
                     "(about 1 % of the image, absent from some cases), which shorter runs find in some runs and "
                     "miss in others",
    "nnUNetTrainerMime_cwfixed_sgd": "the paper's mime (Kervadec eq. 9, one weight pair for every class) under "
                                     "nnU-Net's SGD: linear in the probabilities, it settles on the background and "
                                     "predicts the small lesion nowhere (in some runs the thin vessel neither)",
    "nnUNetTrainerMime": "the mime as this trainer trains it by default: per-class weights from the class counts "
                         "(Kervadec §2.3), b's ramped in over the first quarter, both annealed to the paper's over "
                         "the second half, and Adam (the paper's other optimizer; with nnU-Net's SGD, -tr "
                         "nnUNetTrainerMime_sgd, the small lesion is lost in some runs, in 3D): "
                         "the small structures are learned while the weights favour them, and the annealing brings "
                         "back the paper's unbiased choice; near the reference in every run so far, on this dataset "
                         "and the benchmark's (benchmarks/README.md)",
    "nnUNetTrainerDiceICE": "the paper's image-wise Dice (Tilborghs, Phi = I) + nnU-Net's CE: nnU-Net's own "
                            "recipe with the paper's Dice term, within the reference's run-to-run spread (Dice "
                            "alone would lose the lesion: benchmarks/README.md)",
}
DATASET_NAME = "Quickstart"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train nnU-Net with some nnunet-losses trainers and its default on a synthetic 2D dataset, "
                    "predict held-out cases and print per-class Dice (nnU-Net's evaluation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("quickstart_work"),
                        help="folder for the dataset, nnU-Net's folders, predictions and logs (created if needed)")
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS), metavar="TRAINER",
                        help="trainer names, ours (README, section Trainers) or nnU-Net's (nnUNetTrainer is its "
                             "default DC+CE); each runs as the short run <trainer>_<E>ep_<I>it")
    parser.add_argument("--epochs", type=int, default=20,
                        help="epochs per training (20 x 25 iterations: where the comparison shows the papers' "
                             "findings, not under-training; about 2-3 minutes per trainer on a 2-core CPU)")
    parser.add_argument("--iterations", type=int, default=25,
                        help="training iterations per epoch (validation: a fifth of it, at least 1)")
    parser.add_argument("--cases", type=int, default=16, help="training cases to generate (at least 5)")
    parser.add_argument("--test-cases", type=int, default=6, help="held-out cases to generate, predict and evaluate")
    parser.add_argument("--dataset-id", type=int, default=990, help="nnU-Net dataset ID inside the work folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="nnU-Net's -device; auto: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    args = parser.parse_args(argv)
    for name in ("epochs", "iterations", "test_cases"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.cases < 5:
        parser.error(f"--cases: expected at least 5 (nnU-Net's 5-fold split), got {args.cases}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


class Runner:
    """Runs nnU-Net commands with the quickstart's private nnU-Net folders, one log file per step."""

    def __init__(self, work_dir: Path):
        from nnunet_losses.training.discovery import ENV_VAR, with_trainer_folder

        self.work_dir = work_dir
        self.raw, self.preprocessed, self.results = (work_dir / n for n in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        self.logs = work_dir / "logs"
        for folder in (self.raw, self.preprocessed, self.results, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        environment.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                           nnUNet_results=str(self.results))
        environment[ENV_VAR] = with_trainer_folder(os.environ.get(ENV_VAR))  # our trainers, keeping yours
        # a small 2D dataset gains nothing from many worker processes; each one imports torch
        environment.setdefault("nnUNet_def_n_proc", str(min(2, os.cpu_count() or 1)))
        self.environment = environment

    def run(self, log_name: str, command: List[str], training: bool = False) -> None:
        environment = dict(self.environment)
        if training:  # augment in the main process: 64x64 patches are cheap, worker processes are not
            environment.setdefault("nnUNet_n_proc_DA", "0")  # (not while planning: nnU-Net 2.8 fails on 0 there)
        executable = Path(sysconfig.get_path("scripts")) / command[0]
        executable = str(executable) if executable.exists() else shutil.which(command[0])
        if executable is None:
            raise SystemExit(f"expected nnU-Net's command {command[0]} to be installed, got none on PATH")
        log = self.logs / f"{log_name}.log"
        with open(log, "w") as handle:
            result = subprocess.run([executable, *command[1:]], env=environment, stdout=handle,
                                    stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise SystemExit(f"{' '.join(command)} failed (exit code {result.returncode}); end of {log}:\n{tail}")


def prepare_dataset(runner: Runner, args: argparse.Namespace):
    """The synthetic dataset: written once, reused afterwards."""
    from nnunet_losses.commands.synthetic import SyntheticDataset, dataset_name, write_synthetic_dataset

    name = dataset_name(args.dataset_id, DATASET_NAME)
    folder = runner.raw / name
    if folder.is_dir():
        training = tuple(sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTr").glob("*_0000.nii.gz")))
        test = tuple(sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTs").glob("*_0000.nii.gz")))
        tqdm.write(f"Reusing the dataset in {folder}")
        return SyntheticDataset(folder, args.dataset_id, name, training, test)
    try:
        return write_synthetic_dataset(runner.raw, args.dataset_id, DATASET_NAME, num_training=args.cases,
                                       num_test=args.test_cases, seed=args.seed)
    except FileExistsError as error:
        raise SystemExit(f"--dataset-id: {error}") from None


def plan(runner: Runner, dataset) -> None:
    plans = runner.preprocessed / dataset.name / "nnUNetPlans.json"
    if plans.is_file() and (runner.preprocessed / dataset.name / "nnUNetPlans_2d").is_dir():
        tqdm.write(f"Reusing the plans and preprocessed data in {plans.parent}")
        return
    processes = str(min(2, os.cpu_count() or 1))
    runner.run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", str(dataset.dataset_id), "-c", "2d",
                                       "-np", processes, "-npfp", processes])


def train(runner: Runner, dataset, trainer: str, args: argparse.Namespace) -> None:
    fold = runner.results / dataset.name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    if (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file():
        tqdm.write(f"Reusing the trained {trainer} in {fold}")
        return
    # --npz keeps the validation probabilities: the report's calibration and gradient plots need them
    command = ["nnUNetv2_train", str(dataset.dataset_id), "2d", "0", "-tr", trainer, "-device", args.device, "--npz"]
    if fold.is_dir():  # an interrupted run: continue it instead of starting over
        command.append("--c")
    runner.run(f"train_{trainer}", command, training=True)


def predict(runner: Runner, dataset, trainer: str, args: argparse.Namespace) -> Path:
    output = runner.work_dir / "predictions" / trainer
    if all((output / f"{case}.nii.gz").is_file() for case in dataset.test_cases):
        return output
    processes = runner.environment["nnUNet_def_n_proc"]
    runner.run(f"predict_{trainer}", ["nnUNetv2_predict", "-i", str(dataset.images_test), "-o", str(output),
                                      "-d", str(dataset.dataset_id), "-c", "2d", "-f", "0", "-tr", trainer,
                                      "-device", args.device, "-npp", processes, "-nps", processes,
                                      "--disable_progress_bar"])
    return output


def evaluate(runner: Runner, dataset, predictions: Path) -> dict:
    """nnU-Net's own evaluation of the predictions against labelsTs (summary.json in the folder)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = runner.preprocessed / dataset.name
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    plans_manager = PlansManager(str(preprocessed / "nnUNetPlans.json"))
    labels = plans_manager.get_label_manager(dataset_json)
    return compute_metrics_on_folder(
        str(dataset.labels_test), str(predictions), str(predictions / "summary.json"),
        plans_manager.image_reader_writer_class(), dataset_json["file_ending"],
        labels.foreground_regions if labels.has_regions else labels.foreground_labels, labels.ignore_label,
        num_processes=int(runner.environment["nnUNet_def_n_proc"]))


def report(runner: Runner, dataset, trainers: Sequence[str]) -> Path:
    """The comparison report (tables, training curves, calibration, gradient maps) of the trained models."""
    from nnunet_losses.commands.report import write_report

    folders = [runner.results / dataset.name / f"{trainer}__nnUNetPlans__2d" / "fold_0" for trainer in trainers]
    out_dir = runner.work_dir / "report"
    write_report(folders, out_dir, title=f"Quickstart: {dataset.name}", progress=False)
    return out_dir


def dice_table(metrics: Dict[str, dict], dataset) -> str:
    """Rows: trainers; columns: the mean Dice of each class over the held-out cases, and their mean."""
    dataset_json = json.loads((dataset.folder / "dataset.json").read_text())
    names = {tuple(value) if isinstance(value, list) else value: name for name, value in dataset_json["labels"].items()}
    first = next(iter(metrics.values()))["mean"]
    classes = list(first)
    header = ["trainer"] + [f"{names.get(c, c)} ({c})" for c in classes] + ["mean"]
    rows = [[trainer] + [f"{result['mean'][c]['Dice']:.3f}" for c in classes]
            + [f"{result['foreground_mean']['Dice']:.3f}"] for trainer, result in metrics.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from nnunet_losses.training.names import short_run_name

    args = parse_args(argv)
    runner = Runner(args.work_dir.resolve())
    trainers = [short_run_name(trainer, args.epochs, args.iterations) for trainer in args.trainers]
    print(f"Working in {runner.work_dir} ({args.device}): {len(trainers)} trainings of {args.epochs} epochs x "
          f"{args.iterations} iterations; logs in {runner.logs}")
    steps = ["dataset", "plan"] + [f"{kind} {t}" for t in trainers for kind in ("train", "predict", "evaluate")]
    steps.append("report")
    metrics: Dict[str, dict] = {}
    with tqdm(total=len(steps), unit="step", dynamic_ncols=True) as progress:
        def step(description: str):
            progress.set_description(description)

        step("writing the dataset")
        dataset = prepare_dataset(runner, args)
        progress.update()
        step("nnUNetv2_plan_and_preprocess")
        plan(runner, dataset)
        progress.update()
        for trainer in trainers:
            step(f"nnUNetv2_train {trainer}")
            train(runner, dataset, trainer, args)
            progress.update()
            step(f"nnUNetv2_predict {trainer}")
            predictions = predict(runner, dataset, trainer, args)
            progress.update()
            step(f"evaluating {trainer}")
            metrics[trainer] = evaluate(runner, dataset, predictions)
            progress.update()
        step("writing the comparison report")
        report_dir = report(runner, dataset, trainers)
        progress.update()
    print(f"\nDice on the {len(dataset.test_cases)} held-out cases (nnU-Net's compute_metrics_on_folder):\n")
    print(dice_table(metrics, dataset))
    meanings = [(t, ROW_MEANINGS[name]) for t, name in zip(trainers, args.trainers) if name in ROW_MEANINGS]
    if meanings:
        print("\nWhat each row shows:")
        for trainer, meaning in meanings:
            print(f"  {trainer}: {meaning}")
    print(f"\nComparison report (open in a browser): {report_dir / 'index.html'}")
    print(f"Per-case metrics: {runner.work_dir / 'predictions'}/<trainer>/summary.json")
    return {"work_dir": runner.work_dir, "dataset": dataset, "trainers": trainers, "metrics": metrics}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\nInterrupted. Run the same command again to continue: finished steps are reused.")
