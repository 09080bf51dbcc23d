#!/usr/bin/env python
"""Iterations per second of ``nnUNetv2_train`` with each of our trainers against ``nnUNetTrainer``.

Generates one synthetic 2D dataset (``nnunet_losses.commands.synthetic``), plans and preprocesses it
with ``nnUNetv2_plan_and_preprocess``, then trains every trainer with nnU-Net's own
``nnUNetv2_train`` as a short run (``<trainer>_<E>ep_<I>it``: E epochs of I iterations) on the same
device. The runs are interleaved (one run of every trainer per round, the order rotated from round
to round) so that load from other processes spreads over all trainers alike.

Speed is nnU-Net's own epoch timing: ``epoch_end_timestamps - epoch_start_timestamps`` from the
``logging`` of ``checkpoint_final.pth`` (the "Epoch time" of nnU-Net's log: the training
iterations plus the I // 5 validation iterations of the epoch). The first epoch (data loader start,
first allocations, the heuristic ε estimate of nnUNetTrainerDiceIEps) is left out. Each round
compares a trainer with the nnUNetTrainer run of the same round; the table gives the medians.

Examples::

    python benchmarks/bench_training.py                                 # all trainers, CPU, ~30 min
    python benchmarks/bench_training.py --trainers nnUNetTrainerMime --repeats 2 --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from nnunet_losses.trainers import TRAINER_NAMES
from nnunet_losses.training.names import short_run_name

from _common import describe_machine, machine_info, markdown_table, median, write_json

BASELINE = "nnUNetTrainer"
# the trainers of docs/losses.md §6 (their names are the CLI keys), as the package ships them
TRAINERS = TRAINER_NAMES
TARGET = 0.97  # every trainer: >= 0.97x the iterations per second of nnUNetTrainer
DATASET_ID = 987
CONFIGURATION = "2d"


def nnunet_command(name: str) -> str:
    """An nnU-Net console script of this Python environment (next to the interpreter), else from PATH."""
    found = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise SystemExit(f"expected nnU-Net's command {name} next to {sys.executable} or on PATH, got none; "
                         "install nnunetv2 in this environment")
    return found


def nnunet_environment(work: Path, results: Path, data_augmentation_workers: Optional[int]) -> dict:
    """nnU-Net's folders and our trainer folder (``nnUNet_extTrainer``) for the child processes."""
    from nnunet_losses.training.discovery import with_trainer_folder

    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(results))
    env["nnUNet_extTrainer"] = with_trainer_folder(env.get("nnUNet_extTrainer"))
    # nnUNet_n_proc_DA only for training: nnU-Net 2.8 passes it to torch.set_num_threads while planning
    env.pop("nnUNet_n_proc_DA", None)
    if data_augmentation_workers is not None:
        env["nnUNet_n_proc_DA"] = str(data_augmentation_workers)
    # the validation after training (not timed) spawns nnUNet_def_n_proc export workers, 8 by default, each
    # importing torch: minutes per run on a small machine for a handful of tiny cases
    env.setdefault("nnUNet_def_n_proc", "1")
    return env


def run_logged(command: Sequence[str], env: dict, log: Path) -> None:
    """Run a command with its output in ``log``; on failure raise with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        completed = subprocess.run(list(command), env=env, stdout=out, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(command)}` exited with {completed.returncode} (log: {log}):\n{tail}")


def prepare_dataset(work: Path, size: int, cases: int, planning_processes: int) -> None:
    """Write the synthetic dataset and run nnU-Net's planning and preprocessing (once per work folder)."""
    from nnunet_losses.commands.synthetic import write_synthetic_dataset

    marker = work / "preprocessed.done"
    if marker.exists():
        return
    if (work / "raw").exists():  # an interrupted earlier attempt: start the dataset afresh
        shutil.rmtree(work / "raw")
        shutil.rmtree(work / "preprocessed", ignore_errors=True)
    write_synthetic_dataset(work / "raw", DATASET_ID, "TrainingBenchmark", num_training=cases, num_test=0, size=size,
                            seed=0)
    env = nnunet_environment(work, work / "results", None)
    run_logged([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIGURATION,
                "-np", str(planning_processes), "--verify_dataset_integrity"], env, work / "logs" / "planning.log")
    marker.write_text("done\n")


def missing_trainers(names: Sequence[str]) -> list[str]:
    """The trainer names nnU-Net cannot find (its own folder, then ``nnUNet_extTrainer``)."""
    import io

    from nnunet_losses.training.discovery import enable_trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    enable_trainers()
    missing = []
    for name in names:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates every lookup
            try:
                recursive_find_trainer_class_by_name(name)
            except RuntimeError:
                missing.append(name)
    return missing


def epoch_seconds(checkpoint_path: Path) -> list[float]:
    """Duration of every epoch from nnU-Net's own timestamps in the checkpoint's ``logging``."""
    import torch

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    return [end - start for start, end in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]


def train_once(work: Path, trainer: str, round_index: int, args: argparse.Namespace) -> dict:
    """One ``nnUNetv2_train`` run; returns its per-epoch iterations per second (first epoch left out)."""
    name = short_run_name(trainer, args.epochs, args.iterations)
    results = work / "results" / f"round{round_index}"
    env = nnunet_environment(work, results, args.da_workers)
    log = work / "logs" / f"round{round_index}_{trainer}.log"
    start = time.perf_counter()
    run_logged([nnunet_command("nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, "0", "-tr", name,
                "-device", args.device], env, log)
    wall = time.perf_counter() - start
    checkpoints = list(results.glob(f"*/{name}__*__{CONFIGURATION}/fold_0/checkpoint_final.pth"))
    if len(checkpoints) != 1:
        raise RuntimeError(f"expected one checkpoint_final.pth of {name} under {results}, got {len(checkpoints)} "
                           f"(log: {log})")
    seconds = epoch_seconds(checkpoints[0])
    if not args.keep:  # the checkpoints of every round would pile up; the timings are read
        shutil.rmtree(checkpoints[0].parent.parent)
    kept = seconds[1:]
    return dict(epoch_seconds=seconds, iterations_per_second=[args.iterations / s for s in kept],
                median_iterations_per_second=median([args.iterations / s for s in kept]), wall_seconds=wall)


def summarise(runs: dict, trainers: Sequence[str], repeats: int) -> list[dict]:
    """Per trainer: the median it/s, the median over rounds of (trainer it/s / nnUNetTrainer it/s of the
    same round), and the ratio of the best epochs (highest it/s of any kept epoch of any round).

    The target is judged on the best epochs: on a shared machine the load of other processes only ever
    slows an epoch down, so the fastest epoch is the least disturbed one (the reasoning of ``timeit``,
    which reports the minimum); the paired median is shown next to it."""
    def done(trainer, r):
        return "median_iterations_per_second" in runs.get((trainer, r), {})

    best_baseline = max((s for r in range(repeats) if done(BASELINE, r)
                         for s in runs[(BASELINE, r)]["iterations_per_second"]), default=None)
    table = []
    for trainer in trainers:
        speeds = [runs[(trainer, r)]["median_iterations_per_second"] for r in range(repeats) if done(trainer, r)]
        ratios = [runs[(trainer, r)]["median_iterations_per_second"] / runs[(BASELINE, r)]["median_iterations_per_second"]
                  for r in range(repeats) if done(trainer, r) and done(BASELINE, r)]
        best = max((s for r in range(repeats) if done(trainer, r) for s in runs[(trainer, r)]["iterations_per_second"]),
                   default=None)
        best_ratio = None if best is None or best_baseline is None else best / best_baseline
        errors = [runs[(trainer, r)]["error"] for r in range(repeats) if "error" in runs.get((trainer, r), {})]
        table.append(dict(trainer=trainer, iterations_per_second=median(speeds) if speeds else None,
                          ratio=median(ratios) if ratios else None, ratios=ratios, best_iterations_per_second=best,
                          best_ratio=best_ratio, errors=errors,
                          met=None if trainer == BASELINE or best_ratio is None else best_ratio >= TARGET))
    return table


def format_table(table: Sequence[dict]) -> str:
    def number(value, pattern):
        return "-" if value is None else format(value, pattern)

    rows = []
    for entry in table:
        rounds = ", ".join(f"{r:.2f}" for r in entry["ratios"]) or "-"
        target = "-" if entry["met"] is None else ("ok" if entry["met"] else "MISSED") + f" (best >= {TARGET}x)"
        if entry["errors"]:
            target += f"; {len(entry['errors'])} failed run(s): {entry['errors'][0][:120]}"
        rows.append([entry["trainer"], number(entry["iterations_per_second"], ".2f"), number(entry["ratio"], ".2f") + "x",
                     rounds, number(entry["best_iterations_per_second"], ".2f"), number(entry["best_ratio"], ".3f") + "x",
                     target])
    return markdown_table(["trainer", "it/s (median)", f"x {BASELINE} (paired median)", "per round",
                           "best epoch it/s", f"best x {BASELINE}", "target"], rows)


def print_report(path: str) -> int:
    """Print the table of an earlier ``--json`` file again, measuring nothing."""
    import json

    with open(path) as f:
        report = json.load(f)
    repeats = 1 + max(run["round"] for run in report["runs"])
    trainers = list(dict.fromkeys(run["trainer"] for run in sorted(report["runs"], key=lambda run: run["trainer"]
                                                                   != BASELINE)))
    runs = {(run["trainer"], run["round"]): run for run in report["runs"]}
    print(f"Machine: {describe_machine(report['machine'])}")
    print(f"Command: {report['command']}")
    print(_title(report["epochs"], report["iterations"], repeats, report["device"]))
    print(format_table(summarise(runs, trainers, repeats)))
    print(f"\nLoad average at the end: {report['machine'].get('load_average_at_end')}")
    return 0


def _title(epochs: int, iterations: int, repeats: int, device: str) -> str:
    return (f"\n### nnUNetv2_train {CONFIGURATION}, {epochs} epochs x {iterations} iterations "
            f"(first epoch left out), {repeats} rounds, device {device}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints a markdown table.")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), metavar="TRAINER",
                        help=f"trainers to compare with {BASELINE} (which always runs). Default: the 11 trainers of "
                             "nnunet-losses")
    parser.add_argument("--device", default="cpu", help="nnUNetv2_train -device: cpu, cuda or mps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (one run of every trainer each) (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is left out (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations per epoch (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="side of the synthetic 2D images in pixels (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=10, help="training cases of the synthetic dataset (default: %(default)s)")
    parser.add_argument("--da-workers", type=int, default=0,
                        help="nnUNet_n_proc_DA for training (0: augmentation in the training process, which keeps "
                             "a small shared machine from oversubscription; -1: leave nnU-Net's default) (default: %(default)s)")
    parser.add_argument("--planning-processes", type=int, default=2, help="nnUNetv2_plan_and_preprocess -np (default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the dataset, runs and logs (kept; a second call reuses the preprocessed "
                             "dataset). Default: a temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep every run's output folder (checkpoints)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--from-json", metavar="IN", default=None,
                        help="print the table of an earlier --json file and exit (no measurement)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    for label in ("repeats", "iterations"):
        if getattr(args, label) < 1:
            raise SystemExit(f"expected --{label} >= 1, got {getattr(args, label)}")
    if args.epochs < 2:
        raise SystemExit(f"expected --epochs >= 2 (the first epoch is left out), got {args.epochs}")
    if args.size < 32 or args.cases < 5:
        raise SystemExit(f"expected --size >= 32 and --cases >= 5 (nnU-Net's 5 folds), got {args.size}, {args.cases}")
    if args.da_workers < 0:
        args.da_workers = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        return print_report(args.from_json)
    check_arguments(args)
    trainers = [BASELINE] + [t for t in dict.fromkeys(args.trainers) if t != BASELINE]
    absent = missing_trainers(trainers)
    if BASELINE in absent:
        raise SystemExit(f"expected nnU-Net's {BASELINE} to be found, got none: is nnunetv2 installed?")
    if absent:
        print(f"Not found by nnU-Net, left out: {', '.join(absent)}", flush=True)
        trainers = [t for t in trainers if t not in absent]
    machine = machine_info(args.device)
    print(f"Machine: {describe_machine(machine)}", flush=True)

    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_losses_bench_")))
        print(f"Work folder: {work}", flush=True)
        prepare_dataset(work, args.size, args.cases, args.planning_processes)

        runs: dict = {}
        report = dict(machine=machine, command=" ".join(["bench_training.py", *(argv or sys.argv[1:])]),
                      epochs=args.epochs, iterations=args.iterations, size=args.size, cases=args.cases,
                      device=args.device, da_workers=args.da_workers, runs=[])
        with tqdm(total=args.repeats * len(trainers), desc="nnUNetv2_train runs") as bar:
            for round_index in range(args.repeats):
                shift = round_index % len(trainers)  # rotate the order: no trainer always runs first
                for trainer in trainers[shift:] + trainers[:shift]:
                    bar.set_postfix_str(trainer)
                    try:
                        result = train_once(work, trainer, round_index, args)
                    except RuntimeError as error:  # reported in the table; the other runs go on
                        result = dict(error=str(error))
                        tqdm.write(f"FAILED: {error}")
                    runs[(trainer, round_index)] = result
                    report["runs"].append(dict(trainer=trainer, round=round_index, **result))
                    if args.json:
                        write_json(report, args.json)
                    bar.update()
        table = summarise(runs, trainers, args.repeats)
        report["summary"] = table
        report["machine"]["load_average_at_end"] = machine_info(args.device)["load_average"]
        print(_title(args.epochs, args.iterations, args.repeats, args.device))
        print(format_table(table))
        print(f"\nLoad average at the end: {report['machine']['load_average_at_end']}")
        if args.json:
            write_json(report, args.json)
            print(f"Wrote {args.json}")
    failed = any(entry["errors"] for entry in table)
    return 1 if failed else 0



if __name__ == "__main__":
    sys.exit(main())
