"""The partial-label experiment of Tilborghs et al. on synthetic 2D data, on a CPU (10-25 minutes per task).

    python examples/partial_labels/synthetic_experiment.py            # both tasks, CPU
    python examples/partial_labels/synthetic_experiment.py --tasks groups --optimizer sgd
    python examples/partial_labels/synthetic_experiment.py --help

Two tasks, each trained on a partially labelled dataset derived with ``nnunet-losses derive-partial``
and evaluated on held-out cases with their FULL labels (nnU-Net's own metrics, ΔV in ml):

``groups`` (the paper's BRATS setup, LGG maps emptied): a binary task, one bright blob per image.
    Half the cases ("plain") show it on a smooth background, the other half ("striped") on a striped
    background; the striped cases' label maps are replaced by empty maps (``--empty --cases-pattern
    'striped_*'``). Expected: Φ = I with ε = 1e-7 still segments the striped blobs (empty maps give
    it no gradient), while Φ = BI (B > 1) and the heuristic ε learn to output empty maps there.
``classes`` (the paper's ACDC setup, myocardium removed at end-systole): a disc, the ring around it
    and a bar; the ring is removed from a seeded random half of the cases (``--remove-labels ring
    --fraction 0.5``). Expected: marginal and leaf Dice, told which cases miss the ring
    (dataset.json "annotated_labels"), segment it about as well as full supervision does.

Every trainer runs as nnU-Net's short run ``<trainer>_<E>ep_<I>it`` with nnU-Net's own commands
(nnUNetv2_plan_and_preprocess, nnUNetv2_train, nnUNetv2_predict); the fully supervised reference is
``nnUNetTrainerDiceI`` on the source dataset. By default with Adam, the paper's optimizer
(``<trainer>_adam``: our loss with nnU-Net's Adam at lr 1e-3, see ``optimizer_choice.py``);
``--optimizer sgd`` keeps nnU-Net's SGD, with which the heuristic ε predicts empty maps everywhere. Everything happens under --work-dir with its own
nnUNet_raw / nnUNet_preprocessed / nnUNet_results (yours are never touched); logs go to
<work-dir>/logs/. Finished steps are reused when the command is run again (an interrupted training
continues with --c); delete a folder to redo its step. Results: <work-dir>/results.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

# the quickstart's runner: private nnU-Net folders, our trainers on nnUNet_extTrainer, one log per step
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_choice import add_optimizer_argument, trainer_name  # noqa: E402
from quickstart import Runner, plan  # noqa: E402

TASKS = ("groups", "classes")
# what each task is about: Φ and ε with emptied maps; the missing-label losses with a missing class
PARTIAL_TRAINERS = {
    "groups": ("nnUNetTrainerDiceI", "nnUNetTrainerDiceBI", "nnUNetTrainerDiceIEps"),
    "classes": ("nnUNetTrainerDiceI", "nnUNetTrainerMarginalDice", "nnUNetTrainerLeafDice"),
}
REFERENCE_TRAINER = "nnUNetTrainerDiceI"  # trained on the fully labelled source dataset
# epochs per training (60 iterations each): at 8, marginal and leaf Dice on the classes task still varied
# from run to run (ring Dice 0.76-0.98); at 16 they are within 2 points of full supervision
DEFAULT_EPOCHS = {"groups": 8, "classes": 16}
FULL = "full"  # the reference's row in the tables

# groups task: label 1 'blob'; cases 'plain_XXX' and 'striped_XXX'
GROUP_LABELS = {"background": 0, "blob": 1}
GROUPS = ("plain", "striped")
EMPTIED_GROUP = "striped"
# classes task: an ACDC-like disc inside a ring, and a bar; the ring is removed from half the cases
CLASS_LABELS = {"background": 0, "disc": 1, "ring": 2, "bar": 3}
CLASS_INTENSITIES = (0.0, 1.5, -1.2, 3.0)  # background, disc, ring, bar
REMOVED_CLASS = "ring"
NOISE = 0.35


@dataclass(frozen=True)
class Task:
    """The source and derived datasets of one task, and what to report."""

    name: str
    source: object  # nnunet_losses.commands.synthetic.SyntheticDataset (fully labelled)
    partial: object  # the same, derived: some labels missing in some training cases
    groups: Optional[Dict[str, str]]  # test case -> group (groups task)
    reported_classes: tuple


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def blob_case(rng: np.random.Generator, size: int, group: str):
    """One ``(image, labels)`` of the groups task: a bright blob; 'striped' adds a stripe pattern."""
    if group not in GROUPS:
        raise ValueError(f"group: expected one of {GROUPS}, got {group!r}")
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    radius = rng.uniform(0.12, 0.2) * size
    cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
    labels = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)
    image = 2.0 * labels.astype(np.float32)
    if group == "striped":  # stripes of random orientation and phase, ~8 pixels apart: a texture, not an object
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        image += 1.0 * np.sin(2 * np.pi / 8 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    image += rng.normal(0.0, NOISE, size=image.shape).astype(np.float32)
    return image, labels


def ring_case(rng: np.random.Generator, size: int):
    """One ``(image, labels)`` of the classes task: disc (1) inside a ring (2), a bar (3) beside them."""
    from nnunet_losses.commands.synthetic import add_bar, noisy_image

    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    inner = rng.uniform(0.08, 0.13) * size
    width = rng.uniform(0.05, 0.08) * size
    outer = inner + width
    cy, cx = rng.uniform(outer + 2, size - outer - 2, size=2)
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[distance <= outer] = 2
    labels[distance <= inner] = 1
    add_bar(rng, labels, cx, value=3, width_fraction=0.06, side_divisor=5, top_divisor=3)
    return noisy_image(rng, labels, CLASS_INTENSITIES, NOISE), labels


def write_task_dataset(raw_folder: Path, dataset_id: int, task: str, num_training: int, num_test: int,
                       size: int, seed: int):
    """Write one task's fully labelled source dataset in nnU-Net's raw format; returns
    ``(SyntheticDataset, groups)`` with ``groups`` mapping every case to its group (groups task) or None."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from nnunet_losses.commands.synthetic import FILE_ENDING, SyntheticDataset, _write, dataset_name

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if num_training < 10 or num_training % 2:
        raise ValueError(f"num_training: expected an even number >= 10 (two halves, nnU-Net's 5 folds), got {num_training}")
    if num_test < 2 or num_test % 2:
        raise ValueError(f"num_test: expected an even number >= 2 (both halves), got {num_test}")
    if size < 32:
        raise ValueError(f"size: expected at least 32 pixels, got {size}")
    short_name = {"groups": "BlobGroups", "classes": "RingClasses"}[task]
    name = dataset_name(dataset_id, short_name)
    folder = Path(raw_folder) / name
    if folder.exists():
        raise FileExistsError(f"dataset: expected a new folder, got existing {folder}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    training, test, groups = [], [], {}
    for split, count, cases in (("Tr", num_training, training), ("Ts", num_test, test)):
        for index in range(count):
            if task == "groups":  # alternate the groups: every split holds both halves
                group = GROUPS[index % 2]
                image, labels = blob_case(rng, size, group)
                case = f"{group}_{split.lower()}{index:03d}"
                groups[case] = group
            else:
                image, labels = ring_case(rng, size)
                case = f"ring_{split.lower()}{index:03d}"
            _write(image, folder / f"images{split}" / f"{case}_0000{FILE_ENDING}")
            _write(labels, folder / f"labels{split}" / f"{case}{FILE_ENDING}")
            cases.append(case)
    generate_dataset_json(
        str(folder), channel_names={0: "synthetic"}, labels=GROUP_LABELS if task == "groups" else CLASS_LABELS,
        num_training_cases=num_training, file_ending=FILE_ENDING, dataset_name=name,
        description=f"Synthetic partial-label experiment, task {task!r} (examples/partial_labels)",
        license="CC0 (synthetic)", converted_by="nnunet-losses")
    return SyntheticDataset(folder, dataset_id, name, tuple(training), tuple(test)), (groups or None)


def existing_dataset(raw_folder: Path, dataset_id: int):
    """The SyntheticDataset already written with this id, or None."""
    from nnunet_losses.commands.synthetic import FILE_ENDING, SyntheticDataset

    found = sorted(Path(raw_folder).glob(f"Dataset{dataset_id:03d}_*"))
    if not found or not (found[0] / "dataset.json").is_file():
        return None
    folder = found[0]
    cases = {split: tuple(sorted(p.name[: -len("_0000" + FILE_ENDING)] for p in (folder / f"images{split}").glob(
        f"*_0000{FILE_ENDING}"))) for split in ("Tr", "Ts")}
    return SyntheticDataset(folder, dataset_id, folder.name, cases["Tr"], cases["Ts"])


def derive_command(task: str, source_id: int, target_id: int, seed: int) -> List[str]:
    """The ``nnunet-losses derive-partial`` command that makes a task's training set partial."""
    command = ["nnunet-losses", "derive-partial", str(source_id), "--target-id", str(target_id), "--no-progress"]
    if task == "groups":
        return command + ["--empty", "--cases-pattern", f"{EMPTIED_GROUP}_*"]
    return command + ["--remove-labels", REMOVED_CLASS, "--fraction", "0.5", "--seed", str(seed)]


def prepare_task(runner: Runner, task: str, args: argparse.Namespace) -> Task:
    """Write the source dataset and derive the partial one (each once; reused afterwards)."""
    source_id = args.dataset_id + 2 * TASKS.index(task)
    partial_id = source_id + 1
    source = existing_dataset(runner.raw, source_id)
    groups = None
    if source is None:
        source, groups = write_task_dataset(runner.raw, source_id, task, args.cases, args.test_cases, args.size,
                                            args.seed + TASKS.index(task))
    elif task == "groups":
        groups = {case: case.split("_")[0] for case in source.training_cases + source.test_cases}
    partial = existing_dataset(runner.raw, partial_id)
    if partial is None:
        runner.run(f"derive_{task}", derive_command(task, source_id, partial_id, args.seed))
        partial = existing_dataset(runner.raw, partial_id)
    test_groups = {case: groups[case] for case in source.test_cases} if groups else None
    reported = ("blob",) if task == "groups" else tuple(name for name in CLASS_LABELS if name != "background")
    return Task(task, source, partial, test_groups, reported)


# ----------------------------------------------------------------------------------------------
# training, prediction, evaluation
# ----------------------------------------------------------------------------------------------
def train(runner: Runner, dataset, trainer: str, args: argparse.Namespace) -> None:
    """nnU-Net's ``run_training`` (what nnUNetv2_train calls) with ``--threads`` torch threads: on a CPU
    nnUNetv2_train takes every core, and for these tiny networks 2 threads sharing a busy machine were
    10x slower per iteration than 1."""
    fold = runner.results / dataset.name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    if (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file():
        return
    code = ("import torch; torch.set_num_threads({threads}); "
            "from nnunetv2.run.run_training import run_training; "
            "run_training({dataset_id!r}, '2d', 0, {trainer!r}, device=torch.device({device!r}), "
            "continue_training={resume})").format(
        threads=args.threads, dataset_id=str(dataset.dataset_id), trainer=trainer, device=args.device,
        resume=fold.is_dir())  # an interrupted run continues (--c) instead of starting over
    runner.run(f"train_{dataset.name}_{trainer}", ["python", "-c", code], training=True)


def predict(runner: Runner, dataset, trainer: str, output: Path, args: argparse.Namespace) -> Path:
    """nnU-Net's predictor on the held-out images, sequentially in one process (nnUNetv2_predict's worker
    processes took minutes for these 16 small images on a busy 2-core machine)."""
    if all((output / f"{case}.nii.gz").is_file() for case in dataset.test_cases):
        return output
    model = runner.results / dataset.name / f"{trainer}__nnUNetPlans__2d"
    output.mkdir(parents=True, exist_ok=True)  # the sequential predictor does not create it
    code = ("import torch; torch.set_num_threads({threads}); "
            "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor; "
            "predictor = nnUNetPredictor(device=torch.device({device!r}), perform_everything_on_device={on_device}, "
            "allow_tqdm=False); "
            "predictor.initialize_from_trained_model_folder({model!r}, (0,)); "
            "predictor.predict_from_files_sequential({images!r}, {output!r})").format(
        threads=args.threads, device=args.device, on_device=args.device == "cuda", model=str(model),
        images=str(dataset.images_test), output=str(output))
    runner.run(f"predict_{dataset.name}_{trainer}", ["python", "-c", code])
    return output


def evaluate(task: Task, predictions: Path) -> list:
    """nnU-Net's metrics against the FULL test labels: rows per group (and all) of Dice and ΔV [ml]."""
    from nnunet_losses.commands.evaluation import evaluate_summary, nnunet_summary

    dataset_json = json.loads((task.source.folder / "dataset.json").read_text())
    summary = nnunet_summary(predictions, task.source.labels_test, dataset_json, predictions / "summary.json",
                             num_processes=1)
    evaluation = evaluate_summary(summary, predictions, dataset_json, calibration=False, progress=False)
    return evaluation.summary(task.groups)


def epochs_of(task_name: str, args: argparse.Namespace) -> int:
    return args.epochs if args.epochs is not None else DEFAULT_EPOCHS[task_name]


def run_name(trainer: str, epochs: int, args: argparse.Namespace) -> str:
    """``<trainer>[_adam]_<E>ep_<I>it``: the trainer with the chosen optimizer, for E epochs of I iterations."""
    from nnunet_losses.training.names import short_run_name

    return short_run_name(trainer_name(trainer, args.optimizer), epochs, args.iterations)


def runs_of(task: Task, args: argparse.Namespace) -> List[tuple]:
    """(row label, dataset, short-run trainer) of every training of a task, the reference first."""
    epochs = epochs_of(task.name, args)
    runs = [(FULL, task.source, run_name(REFERENCE_TRAINER, epochs, args))] if args.reference else []
    trainers = args.trainers or PARTIAL_TRAINERS[task.name]
    return runs + [(trainer.replace("nnUNetTrainer", ""), task.partial, run_name(trainer, epochs, args))
                   for trainer in trainers]


def result_table(task: Task, rows_by_run: Dict[str, list]) -> str:
    """Markdown: one row per (trainer, group), Dice and ΔV [ml] (mean ± std over the test cases)."""
    header = ["trainer", "test cases"] + [f"Dice {c}" for c in task.reported_classes] + \
             [f"ΔV {c} [ml]" for c in task.reported_classes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, rows in rows_by_run.items():
        for row in rows:
            if task.groups and row["group"] == "all":
                continue  # per group only: the point is how each group is segmented
            label = f"{row['group']} ({row['n']})" if task.groups else f"all ({row['n']})"
            cells = [f"{row[f'dice {c}'][0]:.3f} ± {row[f'dice {c}'][1]:.3f}" for c in task.reported_classes]
            # a 1 x 1 mm pixel is 0.001 ml
            cells += [f"{row[f'delta_v_ml {c}'][0]:+.3f}" for c in task.reported_classes]
            lines.append("| " + " | ".join([run, label] + cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reproduce the partial-label findings of Tilborghs et al. on synthetic 2D data with nnU-Net: "
                    "train Dice (Φ = I, BI, heuristic ε), marginal and leaf Dice on partially labelled datasets "
                    "and a fully supervised reference, predict held-out cases and report Dice and ΔV against "
                    "their full labels, per group.",
        epilog="Measured on a busy 2-core CPU machine: 10-25 minutes per task (4 trainings each).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("partial_labels_work"),
                        help="folder for the datasets, nnU-Net's folders, predictions, logs and results")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                        help="groups: binary task, one group's label maps emptied; classes: one class removed "
                             "from half of the cases")
    parser.add_argument("--trainers", nargs="+", default=None, metavar="TRAINER",
                        help="trainers trained on the partially labelled dataset of every task (each as a short "
                             "run); default: groups " + ", ".join(PARTIAL_TRAINERS["groups"]) + "; classes "
                             + ", ".join(PARTIAL_TRAINERS["classes"]))
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help=f"skip the fully supervised reference ({REFERENCE_TRAINER} on the full labels)")
    add_optimizer_argument(parser)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per training; default: " + ", ".join(f"{t} {e}" for t, e in DEFAULT_EPOCHS.items())
                             + " (the classes task's missing-label losses need the longer run)")
    parser.add_argument("--iterations", type=int, default=60,
                        help="training iterations per epoch (validation: a fifth of it, at least 1)")
    parser.add_argument("--cases", type=int, default=24, help="training cases per task (even, at least 10)")
    parser.add_argument("--test-cases", type=int, default=16, help="held-out cases per task (even, at least 2)")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (at least 32)")
    parser.add_argument("--dataset-id", type=int, default=960,
                        help="first of the four nnU-Net dataset IDs used inside the work folder (ID..ID+3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="nnU-Net's -device; auto: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the classes task's selection")
    parser.add_argument("--jobs", type=int, default=2, help="trainings (with their predictions) run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training")
    args = parser.parse_args(argv)
    for name in ("epochs", "iterations", "jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if args.cases < 10 or args.cases % 2:
        parser.error(f"--cases: expected an even number >= 10, got {args.cases}")
    if args.test_cases < 2 or args.test_cases % 2:
        parser.error(f"--test-cases: expected an even number >= 2, got {args.test_cases}")
    if args.size < 32:
        parser.error(f"--size: expected at least 32 pixels, got {args.size}")
    if not 1 <= args.dataset_id <= 996:
        parser.error(f"--dataset-id: expected an ID in [1, 996] (four consecutive IDs are used), got {args.dataset_id}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run_one(runner: Runner, task: Task, label: str, dataset, trainer: str, args: argparse.Namespace) -> list:
    """Train, predict the held-out cases, evaluate against their full labels."""
    train(runner, dataset, trainer, args)
    output = runner.work_dir / "predictions" / dataset.name / trainer
    predict(runner, dataset, trainer, output, args)
    return evaluate(task, output)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from nnunet_losses.training.discovery import enable_trainers

    args = parse_args(argv)
    enable_trainers()  # the Runner's nnU-Net commands find our trainers and their names with tokens (_adam)
    runner = Runner(args.work_dir.resolve())
    print(f"Working in {runner.work_dir} ({args.device}): tasks {', '.join(args.tasks)}, trainings of "
          f"{' / '.join(f'{epochs_of(t, args)} ({t})' for t in args.tasks)} epochs x {args.iterations} iterations "
          f"with {args.optimizer}, {args.jobs} at a time; "
          f"logs in {runner.logs}")
    tasks = []
    with tqdm(total=3 * len(args.tasks), unit="step", dynamic_ncols=True, desc="datasets and plans") as progress:
        for task_name in args.tasks:
            progress.set_description(f"{task_name}: datasets")
            tasks.append(prepare_task(runner, task_name, args))
            progress.update()
            for dataset in (tasks[-1].source, tasks[-1].partial):
                progress.set_description(f"{task_name}: nnUNetv2_plan_and_preprocess {dataset.dataset_id}")
                plan(runner, dataset)
                progress.update()
    runs = [(task, *run) for task in tasks for run in runs_of(task, args)]
    results: Dict[str, Dict[str, list]] = {task.name: {} for task in tasks}
    with tqdm(total=len(runs), unit="training", dynamic_ncols=True,
              desc="train, predict, evaluate") as progress, ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, runner, task, label, dataset, trainer, args): (task, label)
                   for task, label, dataset, trainer in runs}
        for future in futures:  # in submission order, so that the tables keep the order of the runs
            task, label = futures[future]
            results[task.name][label] = future.result()
            progress.update()
            tqdm.write(f"{task.name} / {label}: " + ", ".join(
                f"{row['group']} Dice {c} {row[f'dice {c}'][0]:.3f}" for row in results[task.name][label]
                for c in task.reported_classes if not task.groups or row["group"] != "all"))
    tables = {task.name: result_table(task, results[task.name]) for task in tasks}
    command = "python examples/partial_labels/synthetic_experiment.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = f"`{command.strip()}`\n\n" + "\n\n".join(f"### {name}\n\n{table}" for name, table in tables.items())
    (runner.work_dir / "results.md").write_text(text + "\n")
    (runner.work_dir / "results.json").write_text(json.dumps(
        {"arguments": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print("\n" + text)
    print(f"\nWritten: {runner.work_dir / 'results.md'}, {runner.work_dir / 'results.json'}")
    return {"work_dir": runner.work_dir, "results": results, "tables": tables}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\nInterrupted. Run the same command again to continue: finished steps are reused.")
