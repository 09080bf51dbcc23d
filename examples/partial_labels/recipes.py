"""Recipes for the papers' partial-label and label-marginal experiments on their real datasets.

    python examples/partial_labels/recipes.py acdc --acdc-folder /data/ACDC --dry-run
    python examples/partial_labels/recipes.py brats --msd-folder /data/Task01_BrainTumour --lgg-cases lgg.txt
    python examples/partial_labels/recipes.py label-marginal --msd-folder /data/Task07_Pancreas
    python examples/partial_labels/recipes.py decathlon-merge --msd-folders /data/Task03_Liver /data/Task07_Pancreas \
        /data/Task09_Spleen --dry-run
    python examples/partial_labels/recipes.py <recipe> --help

Each recipe prints every command before running it, so it doubles as documentation: ``--dry-run``
prints them all without running anything (the small preparation files it would write are described
instead). The data are not downloadable here: THESE RECIPES WERE NOT RUN on the real data by the
nnunet-losses developers (their argument handling and preparation steps are tested on fake folders).

``acdc`` (Tilborghs et al., ACDC): nnU-Net's ACDC converter (``nnunetv2.dataset_conversion.
    Dataset027_ACDC``), then ``nnunet-losses derive-partial --remove-labels MLV`` on the end-systolic
    frames (read from each patient's ``Info.cfg``), nnU-Net's patient-wise ACDC split copied to the
    derived dataset, and 5-fold training of Dice Φ = I / BI / heuristic ε, marginal and leaf Dice
    (and Φ = I on the full labels); every fold's validation is re-evaluated against the FULL labels,
    with ED/ES groups.
``brats`` (Tilborghs et al., BRATS): the Decathlon's brain tumour task (``nnUNetv2_convert_MSD_dataset``)
    turned into the paper's binary whole-tumour task (one region of labels 1-3), the low-grade cases
    (``--lgg-cases``: the Decathlon does not record the grade; BraTS 2017/2018's LGG folder does)
    emptied with ``derive-partial --empty``, then training and evaluation as for ACDC with HGG/LGG groups.
``label-marginal`` (Liu et al., Pancreas and Liver): ``nnUNetv2_convert_MSD_dataset``, then nnU-Net's
    CE-only trainer (``nnUNetTrainerCELoss``), ``nnUNetTrainerCEL1`` and ``nnUNetTrainerCEKL_knee0`` (the
    paper's KL), 5 folds each, compared with ``nnunet-losses report``.
``decathlon-merge`` (Shi et al.'s marginal Dice, Tilborghs §2.1: one model from partially labelled
    datasets): the Decathlon's liver, pancreas and spleen CTs converted, ``nnunet-losses merge``d into
    one dataset (the two "cancer" labels renamed liver_cancer and pancreas_cancer), cross-validation
    splits made per source (the same cases validate the merged and the per-source models), then 5
    folds of marginal and leaf Dice, alone and + their label-set CE (``MarginalDiceCE``, ``LeafDiceCE``;
    cases drawn per source, ``_srcsqrt``), nnU-Net's ``nnUNetTrainer``
    on the naive merge (a label a dataset did not annotate reads as background) and one
    ``nnUNetTrainer`` per source; the merged models' validation is evaluated per source
    (``--groups case_sources.json``): a structure's Dice counts in the groups that annotate it.

The nnU-Net environment variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) must be set;
``nnUNet_extTrainer`` is set for the commands (printed first) so that nnU-Net finds our trainers; with
``--optimizer adam`` (the default of ``acdc`` and ``brats``: the paper's optimizer, see
``optimizer_choice.py``) each trains as ``<trainer>_adam``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_choice import add_optimizer_argument, trainer_name  # noqa: E402

PHI_EPSILON_TRAINERS = ("nnUNetTrainerDiceI", "nnUNetTrainerDiceBI", "nnUNetTrainerDiceIEps")
MISSING_LABEL_TRAINERS = ("nnUNetTrainerMarginalDice", "nnUNetTrainerLeafDice")  # Tilborghs' Dice terms
# a merge trains as practitioners do, DC+CE: the same Dice terms + Fidon et al.'s label-set CE
MERGE_TRAINERS = MISSING_LABEL_TRAINERS + ("nnUNetTrainerMarginalDiceCE", "nnUNetTrainerLeafDiceCE")
# CELoss: nnU-Net's; _knee0: the paper's KL (nnUNetTrainerCEKL bounds its derivative), as Liu et al. trained it
LABEL_MARGINAL_TRAINERS = ("nnUNetTrainerCELoss", "nnUNetTrainerCEL1", "nnUNetTrainerCEKL_knee0")
ACDC_INFO_FRAME = re.compile(r"^\s*(ED|ES)\s*:\s*(\d+)\s*$")


class Step:
    """A command to run, or a preparation done in Python (``action``) with its description."""

    def __init__(self, what: str, command: Optional[List[str]] = None, action: Optional[Callable[[], None]] = None):
        self.what, self.command, self.action = what, command, action

    def show(self) -> str:
        return f"# {self.what}\n" + (shlex.join(self.command) if self.command else "(python) " + self.what)


# ----------------------------------------------------------------------------------------------
# preparation steps that need the data
# ----------------------------------------------------------------------------------------------
def acdc_frames(acdc_folder: Union[str, os.PathLike]) -> dict:
    """Case identifier (as nnU-Net's converter names it, ``patient001_frame01``) -> ``"ED"`` or ``"ES"``,
    from the ``Info.cfg`` of each patient of ``<acdc_folder>/training``."""
    training = Path(acdc_folder) / "training"
    if not training.is_dir():
        raise ValueError(f"--acdc-folder: expected the extracted ACDC download with a 'training' folder, got {acdc_folder}")
    frames = {}
    for patient in sorted(p for p in training.iterdir() if p.is_dir()):
        info = patient / "Info.cfg"
        if not info.is_file():
            raise ValueError(f"--acdc-folder: expected {info} (ACDC's per-patient info with the ED and ES frames), got none")
        found = dict(m.groups() for m in map(ACDC_INFO_FRAME.match, info.read_text().splitlines()) if m)
        if set(found) != {"ED", "ES"}:
            raise ValueError(f"{info}: expected 'ED: <frame>' and 'ES: <frame>' lines, got {sorted(found) or 'neither'}")
        for phase, frame in found.items():
            frames[f"{patient.name}_frame{int(frame):02d}"] = phase
    if not frames:
        raise ValueError(f"--acdc-folder: expected patient folders in {training}, got none")
    return frames


def read_case_list(path: Union[str, os.PathLike], option: str) -> List[str]:
    """One case identifier per line, '#' comments (the format of derive-partial --cases-file)."""
    if not Path(path).is_file():
        raise ValueError(f"{option}: expected a file with one case identifier per line, got missing file {str(path)!r}")
    cases = [line.strip() for line in Path(path).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not cases:
        raise ValueError(f"{option}: expected at least one case identifier, got an empty file {str(path)!r}")
    return cases


def write_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def write_lines(lines: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def whole_tumour(dataset_json_path: Path) -> None:
    """Make a BraTS dataset.json binary (the paper's whole tumour, sigmoid): one region of labels 1-3."""
    dataset_json = json.loads(dataset_json_path.read_text())
    foreground = sorted(v for n, v in dataset_json["labels"].items() if n != "background" and not isinstance(v, list))
    dataset_json["labels"] = {"background": 0, "whole tumour": foreground}
    dataset_json["regions_class_order"] = [foreground[-1]]
    dataset_json_path.write_text(json.dumps(dataset_json, indent=2))


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------
def env_folder(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{name}: expected the nnU-Net environment variable to be set, got it unset")
    return Path(value)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def train_evaluate_steps(args, source: str, partial: str, trainers: Sequence[str], reference: Optional[str],
                         groups_file: Optional[Path], positive: Optional[str]) -> List[Step]:
    """Plan the derived (and source) dataset, train all folds, and evaluate every fold's validation
    against the source's FULL labels (nnU-Net's own validation compares with the partial ones)."""
    raw, results = env_folder("nnUNet_raw"), env_folder("nnUNet_results")
    steps = []
    runs = [(partial, t) for t in trainers] + ([(source, reference)] if reference else [])
    runs = [(dataset, trainer_name(trainer, args.optimizer)) for dataset, trainer in runs]
    for fold in args.folds:
        for dataset, trainer in runs:
            steps.append(Step(f"train {trainer} on {dataset}, fold {fold}",
                              ["nnUNetv2_train", dataset, args.configuration, str(fold), "-tr", trainer,
                               "-device", args.device]))
    for dataset, trainer in runs:
        for fold in args.folds:
            fold_folder = results / dataset / f"{trainer}__nnUNetPlans__{args.configuration}" / f"fold_{fold}"
            # a fold's validation holds its split's cases only: the other cases are missing on purpose
            command = ["nnunet-losses", "evaluate", str(fold_folder / "validation"), "--allow-missing",
                       "--ground-truth", str(raw / source / "labelsTr"),
                       "--dataset-json", str(raw / source / "dataset.json"),
                       "-o", str(fold_folder / "validation_full_labels")]
            if groups_file is not None:
                command += ["--groups", str(groups_file), "--positive", positive]
            steps.append(Step(f"evaluate {trainer} fold {fold} against the full labels", command))
    return steps


def acdc_recipe(args) -> List[Step]:
    frames = acdc_frames(args.acdc_folder)
    source = dataset_folder_name(args.source_id, "ACDC")
    partial = dataset_folder_name(args.target_id, "ACDC_noMyoES")
    work = Path(args.work_dir).resolve()
    es_file, groups_file = work / "acdc_es_frames.txt", work / "acdc_groups.json"
    preprocessed = env_folder("nnUNet_preprocessed")
    return [
        Step("convert ACDC with nnU-Net's converter (also writes its patient-wise splits_final.json)",
             [sys.executable, "-m", "nnunetv2.dataset_conversion.Dataset027_ACDC", "-i", str(args.acdc_folder),
              "-d", str(args.source_id)]),
        Step(f"write the {sum(p == 'ES' for p in frames.values())} end-systolic frames (Info.cfg) to {es_file}",
             action=lambda: write_lines(sorted(c for c, p in frames.items() if p == "ES"), es_file)),
        Step(f"write the ED/ES group of every case to {groups_file}", action=lambda: write_json(frames, groups_file)),
        Step("derive the partial dataset: no myocardium (MLV) at end-systole",
             ["nnunet-losses", "derive-partial", str(args.source_id), "--target-id", str(args.target_id),
              "--target-name", "ACDC_noMyoES", "--remove-labels", "MLV", "--cases-file", str(es_file)]),
        Step("plan and preprocess both datasets",
             ["nnUNetv2_plan_and_preprocess", "-d", str(args.source_id), str(args.target_id), "-c",
              args.configuration]),
        Step("use the source's patient-wise split for the derived dataset (ED and ES of a patient in one fold)",
             ["cp", str(preprocessed / source / "splits_final.json"), str(preprocessed / partial / "splits_final.json")]),
        *train_evaluate_steps(args, source, partial, PHI_EPSILON_TRAINERS + MISSING_LABEL_TRAINERS,
                              "nnUNetTrainerDiceI", groups_file, "ED"),
    ]


def brats_recipe(args) -> List[Step]:
    task = Path(args.msd_folder)
    if not (task / "dataset.json").is_file() or not (task / "imagesTr").is_dir():
        raise ValueError(f"--msd-folder: expected the Decathlon's Task01_BrainTumour folder (dataset.json, imagesTr), "
                         f"got {args.msd_folder}")
    lgg = read_case_list(args.lgg_cases, "--lgg-cases")
    msd_cases = {p.name.split(".")[0] for p in (task / "imagesTr").glob("*.nii.gz") if not p.name.startswith(".")}
    # nnU-Net's MSD converter names the cases <Task name>_<number>, e.g. BRATS_001
    unknown = sorted(set(lgg) - msd_cases)
    if unknown:
        raise ValueError(f"--lgg-cases: expected case identifiers of {task.name}/imagesTr (e.g. BRATS_001), "
                         f"got unknown {', '.join(unknown[:5])}")
    raw = env_folder("nnUNet_raw")
    source = dataset_folder_name(args.source_id, "BrainTumour")
    partial = dataset_folder_name(args.target_id, "BrainTumour_LGGempty")
    work = Path(args.work_dir).resolve()
    lgg_file, groups_file = work / "brats_lgg_cases.txt", work / "brats_groups.json"
    groups = {case: ("LGG" if case in set(lgg) else "HGG") for case in sorted(msd_cases)}
    return [
        Step("convert the Decathlon's brain tumour task with nnU-Net's converter",
             ["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-overwrite_id", str(args.source_id)]),
        Step(f"make {source} the paper's binary whole-tumour task (one region of labels 1-3, sigmoid)",
             action=lambda: whole_tumour(raw / source / "dataset.json")),
        Step(f"write the {len(lgg)} low-grade cases to {lgg_file} and the HGG/LGG groups to {groups_file}",
             action=lambda: (write_lines(lgg, lgg_file), write_json(groups, groups_file))),
        Step("derive the partial dataset: the low-grade cases' label maps emptied",
             ["nnunet-losses", "derive-partial", str(args.source_id), "--target-id", str(args.target_id),
              "--target-name", "BrainTumour_LGGempty", "--empty", "--cases-file", str(lgg_file)]),
        Step("plan and preprocess both datasets",
             ["nnUNetv2_plan_and_preprocess", "-d", str(args.source_id), str(args.target_id), "-c",
              args.configuration]),
        *train_evaluate_steps(args, source, partial, PHI_EPSILON_TRAINERS, "nnUNetTrainerDiceI", groups_file, "HGG"),
    ]


def label_marginal_recipe(args) -> List[Step]:
    task = Path(args.msd_folder)
    match = re.fullmatch(r"Task(\d\d)_(\w+)", task.name)
    if not match or not (task / "dataset.json").is_file():
        raise ValueError(f"--msd-folder: expected a Decathlon task folder such as Task07_Pancreas or Task03_Liver "
                         f"with a dataset.json, got {args.msd_folder}")
    dataset_id = args.dataset_id if args.dataset_id is not None else int(match[1])
    dataset = dataset_folder_name(dataset_id, match[2])
    results = env_folder("nnUNet_results")
    steps = [
        Step(f"convert {task.name} with nnU-Net's converter",
             ["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-overwrite_id", str(dataset_id)]),
        Step("plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", args.configuration]),
    ]
    for fold in args.folds:
        for trainer in LABEL_MARGINAL_TRAINERS:
            steps.append(Step(f"train {trainer}, fold {fold}",
                              ["nnUNetv2_train", str(dataset_id), args.configuration, str(fold), "-tr", trainer,
                               "-device", args.device]))
    folders = [str(results / dataset / f"{t}__nnUNetPlans__{args.configuration}") for t in LABEL_MARGINAL_TRAINERS]
    steps.append(Step("compare the trainers (Dice, ΔV, calibration, training curves)",
                      ["nnunet-losses", "report", *folders, "-o", str(Path(args.work_dir).resolve() / f"report_{dataset}")]))
    return steps


DECATHLON_MERGE_TASKS = ("Task03_Liver", "Task07_Pancreas", "Task09_Spleen")
NAIVE_MERGE_TRAINER = "nnUNetTrainer"  # nnU-Net's own: ignores annotated_labels, a missing label is background


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a merged-dataset study (the Decathlon recipe, merge_experiment.py): how marginal and
    leaf Dice draw cases per source, and whether one reference model per source is trained."""
    parser.add_argument("--source-sampling", choices=("sqrt", "uniform", "none"), default="sqrt",
                        help="how the marginal and leaf Dice trainers draw training cases per source (the "
                             "_src<mode> token; sqrt: MultiTalent's n^-1/2 per case; none: nnU-Net's uniform draw)")
    parser.add_argument("--no-per-source", dest="per_source", action="store_false",
                        help="skip the reference models, one nnUNetTrainer per source")


def sampling_token(mode: str) -> str:
    """The trainer-name token of ``--source-sampling`` (``_srcsqrt``), '' for none."""
    return "" if mode == "none" else f"_src{mode}"


def decathlon_labels(task: Path) -> dict:
    """The label names and values of a Decathlon task folder's dataset.json (``{"0": "background", ...}``)."""
    path = task / "dataset.json"
    if not path.is_file() or not re.fullmatch(r"Task\d\d_\w+", task.name):
        raise ValueError(f"--msd-folders: expected Decathlon task folders such as Task03_Liver with a dataset.json, "
                         f"got {task}")
    labels = json.loads(path.read_text()).get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: expected the Decathlon's 'labels' {{\"0\": \"background\", ...}}, got {labels!r}")
    return {name: int(value) for value, name in labels.items()}


def decathlon_label_map(tasks: dict) -> dict:
    """``nnunet-losses merge --label-map``: a label name that several tasks use (the Decathlon's "cancer") becomes
    ``<organ>_<name>`` in each (``liver_cancer``); ``tasks`` maps converted dataset name -> its labels."""
    names = [name for labels in tasks.values() for name, value in labels.items() if value != 0]
    shared = {name for name in names if names.count(name) > 1}
    return {dataset: {name: f"{dataset.split('_', 1)[1].lower()}_{name}" for name in labels if name in shared}
            for dataset, labels in tasks.items() if shared & set(labels)}


def splits_per_source(merged_dataset_json: Path, source_splits: dict, folds: int = 5, seed: int = 12345) -> None:
    """nnU-Net's cross-validation split (its own ``generate_crossval_split``) made per source, so that a fold
    validates the same cases in the merged dataset and in each source. ``source_splits``: where to write each
    ``splits_final.json``, by source name (those listed) and ``"merged"``."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    dataset_json = json.loads(Path(merged_dataset_json).read_text())
    prefixes = dataset_json["merged_from"]["prefixes"]
    training = set(dataset_json["annotated_labels"])
    merged = [{"train": [], "val": []} for _ in range(folds)]
    for source, prefix in prefixes.items():
        cases = sorted(case[len(prefix):] for case, s in dataset_json["case_sources"].items()
                       if s == source and case in training)
        own = generate_crossval_split(cases, seed, folds)
        if source in source_splits:
            write_json(own, source_splits[source])
        for fold, split in enumerate(own):
            for key in ("train", "val"):
                merged[fold][key] += [prefix + case for case in split[key]]
    write_json(merged, source_splits["merged"])


def decathlon_sources(args) -> dict:
    """Converted dataset name (``Dataset003_Liver``) -> ``(task folder, dataset id, labels)`` of each task."""
    tasks = [Path(folder) for folder in args.msd_folders]
    if args.source_ids is not None and len(args.source_ids) != len(tasks):
        raise ValueError(f"--source-ids: expected one id per --msd-folders ({len(tasks)}), got {len(args.source_ids)}")
    sources = {}
    for task, dataset_id in zip(tasks, args.source_ids or [None] * len(tasks)):
        labels = decathlon_labels(task)  # checks the folder's name too
        dataset_id = int(task.name[4:6]) if dataset_id is None else dataset_id
        sources[dataset_folder_name(dataset_id, task.name.split("_", 1)[1])] = (task, dataset_id, labels)
    if len(sources) < 2:
        raise ValueError(f"--msd-folders: expected at least two different Decathlon tasks, got {len(sources)}")
    return sources


def decathlon_merge_recipe(args) -> List[Step]:
    sources = decathlon_sources(args)
    raw, preprocessed, results = (env_folder(f"nnUNet_{n}") for n in ("raw", "preprocessed", "results"))
    merged = dataset_folder_name(args.target_id, args.name)
    label_map_file = Path(args.work_dir).resolve() / "decathlon_label_map.json"
    label_map = decathlon_label_map({name: labels for name, (_, _, labels) in sources.items()})
    ids = [str(dataset_id) for _, dataset_id, _ in sources.values()]
    steps = [Step(f"convert {task.name} with nnU-Net's converter",
                  ["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-overwrite_id", str(dataset_id)])
             for task, dataset_id, _ in sources.values()]
    steps += [
        Step(f"write the label map {label_map} to {label_map_file}",
             action=lambda: write_json(label_map, label_map_file)),
        Step("merge the tasks into one partially labelled dataset",
             ["nnunet-losses", "merge", *ids, "--target-id", str(args.target_id), "--name", args.name,
              "--label-map", str(label_map_file)]),
        Step("plan and preprocess the merged dataset" + (" and the sources" if args.per_source else ""),
             ["nnUNetv2_plan_and_preprocess", "-d", str(args.target_id), *(ids if args.per_source else []), "-c",
              args.configuration]),
        Step("cross-validation splits per source: the same cases validate every model",
             action=lambda: splits_per_source(raw / merged / "dataset.json", {
                 "merged": preprocessed / merged / "splits_final.json",
                 **{name: preprocessed / name / "splits_final.json" for name in sources if args.per_source}})),
    ]
    runs = [(merged, trainer_name(t + sampling_token(args.source_sampling), args.optimizer))
            for t in MERGE_TRAINERS]
    runs += [(merged, trainer_name(NAIVE_MERGE_TRAINER, args.optimizer))]
    merged_runs = len(runs)
    runs += [(name, trainer_name(NAIVE_MERGE_TRAINER, args.optimizer)) for name in sources if args.per_source]
    for fold in args.folds:
        for dataset, trainer in runs:
            steps.append(Step(f"train {trainer} on {dataset}, fold {fold}",
                              ["nnUNetv2_train", dataset, args.configuration, str(fold), "-tr", trainer,
                               "-device", args.device]))
    for dataset, trainer in runs[:merged_runs]:
        for fold in args.folds:
            fold_folder = results / dataset / f"{trainer}__nnUNetPlans__{args.configuration}" / f"fold_{fold}"
            steps.append(Step(f"evaluate {trainer} fold {fold} per source", [
                "nnunet-losses", "evaluate", str(fold_folder / "validation"), "--allow-missing", "--ground-truth",
                str(raw / merged / "labelsTr"), "--dataset-json", str(raw / merged / "dataset.json"), "-o",
                str(fold_folder / "validation_per_source"), "--groups", str(raw / merged / "case_sources.json"),
                "--positive", next(iter(sources))]))
    return steps


RECIPES = {"acdc": acdc_recipe, "brats": brats_recipe, "label-marginal": label_marginal_recipe,
           "decathlon-merge": decathlon_merge_recipe}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Not run by the developers: no data here.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    def common(recipe: argparse.ArgumentParser) -> None:
        recipe.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
        recipe.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
        recipe.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], choices=range(5),
                            metavar="FOLD", help="cross-validation folds to train (default: all five)")
        recipe.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"), help="nnU-Net's -device")
        recipe.add_argument("--work-dir", default="partial_label_recipes",
                            help="folder for the case lists, group files and reports (default ./partial_label_recipes)")

    def partial_label_options(recipe: argparse.ArgumentParser, source_id: int, target_id: int) -> None:
        """The options of the two partial-label recipes (Tilborghs et al.): dataset ids and optimizer."""
        recipe.add_argument("--source-id", type=int, default=source_id, help="dataset id of the converted (full) data")
        recipe.add_argument("--target-id", type=int, default=target_id, help="dataset id of the derived partial dataset")
        common(recipe)
        add_optimizer_argument(recipe)

    acdc = sub.add_parser("acdc", help="ACDC without the myocardium at end-systole (Tilborghs et al.)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    acdc.add_argument("--acdc-folder", required=True,
                      help="the extracted ACDC download, with 'training' (patientXXX/Info.cfg) and 'testing'")
    partial_label_options(acdc, source_id=27, target_id=527)
    brats = sub.add_parser("brats", help="BRATS whole tumour with the low-grade cases emptied (Tilborghs et al.)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    brats.add_argument("--msd-folder", required=True, help="the Decathlon's Task01_BrainTumour folder")
    brats.add_argument("--lgg-cases", required=True,
                       help="file with the low-grade cases' identifiers (BRATS_XXX), one per line; the Decathlon "
                            "does not record the grade, the BraTS 2017/2018 release (its LGG folder) does")
    partial_label_options(brats, source_id=501, target_id=502)
    marginal = sub.add_parser("label-marginal", help="CE vs CE+L1 vs CE+KL on a Decathlon task (Liu et al.)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    marginal.add_argument("--msd-folder", required=True, help="a Decathlon task folder: Task07_Pancreas or Task03_Liver")
    marginal.add_argument("--dataset-id", type=int, default=None, help="nnU-Net dataset id (default: the task number)")
    common(marginal)
    decathlon = sub.add_parser("decathlon-merge", help="one model from the Decathlon's liver, pancreas and spleen "
                               "(marginal / leaf Dice vs the naive merge vs one model per source)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    decathlon.add_argument("--msd-folders", nargs="+", required=True, metavar="TASK_FOLDER",
                           help="the Decathlon task folders to merge: " + ", ".join(DECATHLON_MERGE_TASKS))
    decathlon.add_argument("--source-ids", nargs="+", type=int, default=None,
                           help="dataset ids of the converted tasks (default: the task numbers, 3 7 9)")
    decathlon.add_argument("--target-id", type=int, default=600, help="dataset id of the merged dataset")
    decathlon.add_argument("--name", default="LiverPancreasSpleen", help="name of the merged dataset")
    add_merge_arguments(decathlon)
    common(decathlon)
    add_optimizer_argument(decathlon)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Step]:
    args = parse_args(argv)
    try:
        steps = RECIPES[args.recipe](args)
    except ValueError as error:
        sys.exit(f"recipes.py {args.recipe}: error: {error}")
    from nnunet_losses.training.discovery import ENV_VAR, with_trainer_folder

    environment = dict(os.environ)
    environment[ENV_VAR] = with_trainer_folder(os.environ.get(ENV_VAR))
    print(f"export {ENV_VAR}={shlex.quote(environment[ENV_VAR])}  # set for every command below", flush=True)
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.show()}", flush=True)
        if args.dry_run:
            continue
        if step.action is not None:
            step.action()
        elif subprocess.run(step.command, env=environment).returncode != 0:
            sys.exit(f"step {number} failed: {shlex.join(step.command)}\nFix the cause and run the recipe again "
                     "(nnUNetv2_train continues an interrupted fold with --c; finished steps can be skipped by hand).")
    return steps


if __name__ == "__main__":
    main()
