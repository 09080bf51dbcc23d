"""``nnunet-losses report``: compare trained nnU-Net models (e.g. one per loss) in one folder.

Input: nnU-Net trainer output folders of one dataset, either a fold
(``nnUNet_results/DatasetXXX/<trainer>__<plans>__<config>/fold_0``) or the
``<trainer>__<plans>__<config>`` folder itself (all its folds with a validation, pooled). From each
fold it reads what nnU-Net wrote:

* ``validation/summary.json`` (nnU-Net's Dice and voxel counts) and the validation predictions
  (spacing, for ΔV in ml), see :mod:`nnunet_losses.commands.evaluation`;
* ``validation/<case>.npz`` probabilities when trained with ``--npz``: class-wise ECE, reliability
  diagrams and the gradient diagnostics of :mod:`nnunet_losses.commands.gradients`;
* the ``'logging'`` dict of ``checkpoint_final.pth`` (else ``checkpoint_latest.pth``, else
  ``checkpoint_best.pth``), nnU-Net's ``LocalLogger``: pseudo Dice, its moving average and the
  train/validation losses per epoch.

Output: ``index.md`` and ``index.html`` (open in a browser), ``metrics.md``, ``metrics.json`` and the PNGs.
"""

from __future__ import annotations

import argparse
import html
import os
import pickle
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..nnunet_io import (
    UserInputError,
    case_identifier,
    cases_with_probabilities,
    load_dataset_json,
    read_json_file,
    read_probabilities,
    read_segmentation,
)
from .output import Table, files_moved_into_place, pyplot, save_figure, write_json, write_markdown
from ._subcommand import add_subcommand, print_done, progress as progress_bar
from .evaluation import (
    DEFAULT_BINS,
    CalibrationBins,
    FolderEvaluation,
    add_group_arguments,
    check_group_cases,
    detections,
    evaluate_summary,
    load_groups_to_detect,
    plot_reliability,
    plot_roc,
    summary_table,
)

COMMAND = "report"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# reading trainer folders
# ----------------------------------------------------------------------------------------------
def fold_folders(path: PathLike) -> list:
    """The fold folders of a trainer output: ``path`` itself if it is a fold (has a validation folder
    or a checkpoint), else its ``fold_*`` subfolders that have one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"trainer folder: expected an nnU-Net trainer output folder, got {str(path)!r}")

    def is_fold(p: Path) -> bool:
        return (p / "validation" / "summary.json").is_file() or any((p / c).is_file() for c in CHECKPOINTS)

    if is_fold(path):
        return [path]
    folds = sorted(p for p in path.glob("fold_*") if p.is_dir() and is_fold(p))
    if not folds:
        raise FileNotFoundError(f"trainer folder: expected fold_*/validation/summary.json or a checkpoint in "
                                f"{str(path)!r}, got neither (is training finished?)")
    return folds


def load_training_log(fold: PathLike) -> Optional[dict]:
    """nnU-Net's logging dict (``mean_fg_dice``, ``ema_fg_dice``, ``train_losses``, ``val_losses``, …)
    from the most complete checkpoint of the fold; None without checkpoint."""
    import torch

    for name in CHECKPOINTS:
        path = Path(fold) / name
        if path.is_file():
            # mmap: the network weights are not read into memory, only the small logging dict is used
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
                raise UserInputError(f"checkpoint: expected a checkpoint nnU-Net wrote, got an unreadable "
                                     f"{str(path)!r} ({error})") from None
            logging = checkpoint.get("logging") if isinstance(checkpoint, dict) else None
            if not isinstance(logging, dict):
                raise UserInputError(f"checkpoint: expected nnU-Net's 'logging' dict in {str(path)!r}, got "
                                     f"{type(logging).__name__}")
            logging = {k: list(v) for k, v in logging.items()}
            logging["_checkpoint"] = name
            return logging
    return None


def _dataset_json(fold: Path) -> dict:
    for candidate in (fold.parent / "dataset.json", fold / "dataset.json"):
        if candidate.is_file():
            return load_dataset_json(candidate)
    raise FileNotFoundError(f"dataset.json: expected it in {str(fold.parent)!r} (nnU-Net copies it there), got none")


@dataclass
class TrainedModel:
    """One model: its folds' validation metrics pooled, and the training log of each fold."""

    name: str
    folder: Path
    folds: list
    dataset_json: dict
    evaluation: Optional[FolderEvaluation]
    logs: dict = field(default_factory=dict)  # fold name -> logging dict

    @property
    def validation_folders(self) -> list:
        return [f / "validation" for f in self.folds if (f / "validation" / "summary.json").is_file()]


def load_model(path: PathLike, num_bins: int = DEFAULT_BINS, progress: bool = True,
               allow_missing: bool = False) -> TrainedModel:
    """A trainer folder's folds, their validation pooled; some folds validated and others not is an error
    naming those (``allow_missing``: the validated folds are pooled)."""
    folds = fold_folders(path)
    dataset_json = _dataset_json(folds[0])
    validated = [fold for fold in folds if (fold / "validation" / "summary.json").is_file()]
    if validated and len(validated) < len(folds) and not allow_missing:
        unvalidated = ", ".join(str(fold) for fold in folds if fold not in validated)
        raise UserInputError(f"trainer folder: expected validation/summary.json in every fold of {str(path)!r} to "
                             f"pool, got none in {unvalidated} (--allow-missing pools the others)")
    evaluations = []
    for fold in validated:
        summary = read_json_file(fold / "validation" / "summary.json", "validation summary")
        evaluations.append(evaluate_summary(summary, fold / "validation", dataset_json, num_bins, progress=progress,
                                            allow_missing=allow_missing))
    evaluation = _pool(evaluations) if evaluations else None
    logs = {fold.name: log for fold in folds if (log := load_training_log(fold)) is not None}
    trainer_folder = folds[0].parent if folds[0].name.startswith("fold_") else folds[0]
    return TrainedModel(trainer_folder.name, Path(path), folds, dataset_json, evaluation, logs)


def _pool(evaluations: Sequence[FolderEvaluation]) -> FolderEvaluation:
    """All folds' validation cases as one evaluation (cross-validation); calibration histograms added."""
    first = evaluations[0]
    pooled = FolderEvaluation(";".join(e.folder for e in evaluations), first.class_names,
                              [case for e in evaluations for case in e.cases])
    if all(e.calibration is not None for e in evaluations):
        bins = CalibrationBins(len(first.calibration.class_names), first.calibration.num_bins,
                               first.calibration.class_names)
        for e in evaluations:
            bins.merge(e.calibration)
        pooled.calibration = bins
    return pooled


def _short_names(models: Sequence[TrainedModel]) -> list:
    """The trainer name (``<trainer>__<plans>__<config>`` → ``<trainer>``) where it is unique."""
    full = [m.name if len(m.folds) > 1 or not m.folds[0].name.startswith("fold_") else f"{m.name}/{m.folds[0].name}"
            for m in models]
    for candidate in ([m.name.split("__")[0] for m in models], [m.name for m in models], full):
        if len(set(candidate)) == len(candidate):
            return candidate
    return [f"{name} ({i})" for i, name in enumerate(full)]


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def plot_training_curves(logs: Mapping[str, dict], path: PathLike, dpi: int = 80) -> Path:
    """Pseudo Dice (dotted: per epoch, solid: nnU-Net's moving average) and train (dashed) /
    validation (solid) loss over epochs, one colour per model (and fold)."""
    plt = pyplot()
    fig, (dice_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, log) in enumerate(logs.items()):
        color = colors[i % len(colors)]
        epochs = min(len(v) for k, v in log.items() if not k.startswith("_") and k in (
            "mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses"))
        x = np.arange(epochs)
        dice_axis.plot(x, log["mean_fg_dice"][:epochs], color=color, ls=":", lw=1)
        dice_axis.plot(x, log["ema_fg_dice"][:epochs], color=color, lw=2, label=label)
        loss_axis.plot(x, log["train_losses"][:epochs], color=color, ls="--", lw=1)
        loss_axis.plot(x, log["val_losses"][:epochs], color=color, lw=2, label=label)
    dice_axis.set(xlabel="epoch", ylabel="pseudo Dice", title="validation pseudo Dice (solid: EMA)")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss (dashed: train, solid: validation)")
    for axis in (dice_axis, loss_axis):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return save_figure(fig, path, dpi)


def _gradient_case(models: Sequence[TrainedModel], names: Sequence[str]):
    """The first validation case with saved probabilities and a readable reference."""
    from .gradients import case_from_arrays

    for model, name in zip(models, names):
        for folder in model.validation_folders:
            summary = read_json_file(folder / "summary.json", "validation summary")
            found = cases_with_probabilities(summary["metric_per_case"], folder, model.dataset_json["file_ending"])
            if found:
                case, npz, reference = found[0]
                label_map, spacing = read_segmentation(reference, model.dataset_json)
                return case_from_arrays(read_probabilities(npz), label_map, model.dataset_json, f"{name}_{case}",
                                        spacing)
    return None


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    index_md: Path
    index_html: Path
    table: str  # the Markdown metrics table
    images: dict  # name -> PNG path
    metrics: Path


@dataclass
class Section:
    """One section of the index page: a heading, paragraphs, an optional table, then its figures."""

    title: str
    paragraphs: list
    table: Optional[Table] = None
    images: dict = field(default_factory=dict)  # name -> PNG path in the report folder

    @property
    def pictures(self) -> list:
        return [path.name for path in self.images.values()]


def write_report(trainer_folders: Sequence[PathLike], out_dir: PathLike,
                 groups: Union[None, PathLike, Mapping[str, str]] = None, positive: Optional[str] = None,
                 higher_is_positive: bool = True, num_bins: int = DEFAULT_BINS,
                 gradient_losses: Optional[Sequence] = ("ce", "dice", "mime"), title: Optional[str] = None,
                 progress: bool = True, allow_missing: bool = False) -> Report:
    """Compare trained nnU-Net models and write the report to ``out_dir``.

    Args:
        trainer_folders: nnU-Net trainer outputs of ONE dataset (fold folders or
            ``<trainer>__<plans>__<config>`` folders, whose folds are pooled).
        out_dir: created if needed; gets ``index.md``, ``index.html``, ``metrics.md``, ``metrics.json``
            and the PNGs (``curves.png``, ``roc.png`` with groups, ``reliability.png`` and
            ``gradients_*.png`` when the validation has ``.npz`` probabilities).
        groups: case identifier → group (a mapping or a JSON file); adds per-group rows and ROC curves
            of detecting ``positive`` from each class's predicted volume.
        higher_is_positive: False when a small predicted volume indicates the positive group.
        num_bins: confidence bins of the calibration.
        gradient_losses: loss specs of the gradient panel (see ``nnunet-losses gradients``); None skips it.
        title: heading of the index page (default: the dataset name).
        allow_missing: pool the validated folds of a trainer folder whose other folds have no validation
            yet, and leave the calibration out where some validation cases have no ``.npz``.

    Every input is checked before anything is written; the report is written out of sight and moved
    into ``out_dir`` at the end, so a failure leaves nothing.
    """
    if not trainer_folders:
        raise UserInputError("trainer_folders: expected at least one nnU-Net trainer output folder, got none")
    group_of_case = load_groups_to_detect(groups, positive)
    if gradient_losses:
        from .gradients import build_loss_form

        for spec in gradient_losses:
            build_loss_form(spec)  # a bad spec fails here, before any work
    models = _load_models(trainer_folders, num_bins, progress, allow_missing)
    names = _short_names(models)
    _check_same_dataset(models, trainer_folders)
    check_group_cases(group_of_case, _dataset_cases(models), groups, "the models' ground truth")
    with files_moved_into_place(out_dir) as work:
        report = _write_report_files(models, names, work, group_of_case, positive, higher_is_positive, num_bins,
                                     gradient_losses, title)
    out_dir = Path(out_dir)
    return Report(out_dir, out_dir / report.index_md.name, out_dir / report.index_html.name, report.table,
                  {name: out_dir / path.name for name, path in report.images.items()}, out_dir / report.metrics.name)


def _write_report_files(models: Sequence[TrainedModel], names: Sequence[str], out_dir: Path,
                        groups: Optional[Mapping[str, str]], positive: Optional[str], higher_is_positive: bool,
                        num_bins: int, gradient_losses: Optional[Sequence], title: Optional[str]) -> Report:
    evaluated = {n: m.evaluation for n, m in zip(names, models) if m.evaluation is not None}
    class_names = next(iter(evaluated.values())).class_names if evaluated else []

    metrics = _metrics_section(evaluated, class_names, groups, num_bins)
    sections = [_models_section(models, names), metrics]
    curves = {}
    if groups is not None and evaluated:
        curves = {n: detections(e, groups, positive, higher_is_positive) for n, e in evaluated.items()}
        sections.append(_detection_section(curves, class_names, positive, higher_is_positive, out_dir))
    sections += [s for s in (_training_curves_section(models, names, out_dir),
                             _calibration_section(evaluated, class_names, out_dir),
                             _gradients_section(models, names, gradient_losses, out_dir)) if s is not None]

    table_md = metrics.table.markdown() if metrics.table is not None else ""
    write_markdown(table_md, out_dir / "metrics.md")
    metrics_json = write_json(_metrics_data(models, names, groups, curves), out_dir / "metrics.json")
    heading = title or f"Loss comparison: {_dataset_name(models[0])}"
    index_md = out_dir / "index.md"
    index_md.write_text(_render_markdown(heading, sections))
    index_html = out_dir / "index.html"
    index_html.write_text(_render_html(heading, sections))
    images = {name: path for section in sections for name, path in section.images.items()}
    return Report(out_dir, index_md, index_html, table_md, images, metrics_json)


def _load_models(trainer_folders: Sequence[PathLike], num_bins: int, progress: bool, allow_missing: bool) -> list:
    return [load_model(p, num_bins, progress, allow_missing)
            for p in progress_bar(trainer_folders, "reading models", "model", progress and len(trainer_folders) >= 2)]


def _dataset_cases(models: Sequence[TrainedModel]) -> set:
    """The cases of the dataset as far as the models know it: those validated and those of the folders
    of their references (nnU-Net's gt_segmentations, where every fold's references lie)."""
    cases = set()
    for model in models:
        ending = model.dataset_json["file_ending"]
        cases |= {case.case for case in (model.evaluation.cases if model.evaluation is not None else ())}
        for folder in model.validation_folders:
            summary = read_json_file(folder / "summary.json", "validation summary")
            for reference_folder in {os.path.dirname(e["reference_file"]) for e in summary["metric_per_case"]}:
                if os.path.isdir(reference_folder):
                    cases |= {case_identifier(n, ending) for n in os.listdir(reference_folder) if n.endswith(ending)}
    return cases


def _dataset_name(model: TrainedModel) -> str:
    return model.dataset_json.get("name") or model.folder.resolve().parent.name


# ----------------------------------------------------------------------------------------------
# the sections, in the order of the page
# ----------------------------------------------------------------------------------------------
def _models_section(models: Sequence[TrainedModel], names: Sequence[str]) -> Section:
    overview = [[n, str(m.folder), str(len(m.folds)), _epochs(m), _final_ema(m)] for n, m in zip(names, models)]
    return Section("Models", ["Trainer outputs compared (validation cases of all listed folds pooled)."],
                   Table(["model", "folder", "folds", "epochs", "final EMA pseudo Dice"], overview))


def _metrics_section(evaluated: Mapping[str, FolderEvaluation], class_names: Sequence[str],
                     groups: Optional[Mapping[str, str]], num_bins: int) -> Section:
    if not evaluated:
        return Section("Validation metrics", ["No fold has validation/summary.json yet (run the validation)."])
    notes = ["Mean ± standard deviation over validation cases. Dice: nnU-Net's summary.json (cases empty in "
             "reference and prediction left out). ΔV: predicted − reference volume in ml."]
    if any(e.calibration is not None for e in evaluated.values()):
        notes.append(f"ECE: class-wise expected calibration error over all validation voxels "
                     f"({num_bins} equal-width bins).")
    rows = {n: e.summary(groups) for n, e in evaluated.items()}
    return Section("Validation metrics", notes, summary_table(rows, class_names))


def _detection_section(curves: Mapping[str, dict], class_names: Sequence[str], positive: str,
                       higher_is_positive: bool, out_dir: Path) -> Section:
    auc_rows = [[n] + [f"{per_class[c].auc:.3f}" for c in class_names] for n, per_class in curves.items()]
    direction = "large" if higher_is_positive else "small"
    return Section(f"Detecting {positive} from the predicted volume",
                   [f"ROC of each class's predicted volume as the score (a {direction} volume indicates "
                    f"{positive}), as Tilborghs et al. Fig. 2."],
                   Table(["model"] + [f"AUC {c}" for c in class_names], auc_rows),
                   {"roc": plot_roc(curves, out_dir / "roc.png")})


def _training_curves_section(models: Sequence[TrainedModel], names: Sequence[str], out_dir: Path) -> Optional[Section]:
    logs = {(n if len(m.logs) == 1 else f"{n} {fold}"): log for n, m in zip(names, models) for fold, log in m.logs.items()}
    if not logs:
        return None
    return Section("Training curves", ["From the 'logging' dict of each fold's checkpoint (nnU-Net's "
                                       "progress.png data)."],
                   images={"curves": plot_training_curves(logs, out_dir / "curves.png")})


def _calibration_section(evaluated: Mapping[str, FolderEvaluation], class_names: Sequence[str],
                         out_dir: Path) -> Optional[Section]:
    calibrated = {n: e.calibration for n, e in evaluated.items() if e.calibration is not None}
    if not calibrated:
        return None
    return Section("Calibration", ["Reliability diagrams (accuracy vs mean confidence per bin; the "
                                   "diagonal is perfect calibration), as Kervadec et al. Fig. 3."],
                   images={"reliability": plot_reliability(calibrated, class_names, out_dir / "reliability.png")})


def _gradients_section(models: Sequence[TrainedModel], names: Sequence[str], gradient_losses: Optional[Sequence],
                       out_dir: Path) -> Optional[Section]:
    if not gradient_losses:
        return None
    case = _gradient_case(models, names)
    if case is None:
        return None
    from .gradients import gradient_rows, run_gradients

    outcome = run_gradients(case, out_dir, gradient_losses)
    return Section("Gradient diagnostics",
                   [f"∂L/∂s of each loss on validation case {case.case_id} (Kervadec et al. Fig. 1). "
                    "Dynamic range = 10·log10(max |∂L/∂s| / min non-zero |∂L/∂s|); pushed up: share of "
                    "a class's voxels with ∂L/∂s < 0, pushed down: of its background voxels with "
                    "∂L/∂s > 0."],
                   gradient_rows(outcome["results"]), {"gradients": outcome["png"]})


def _metrics_data(models: Sequence[TrainedModel], names: Sequence[str], groups: Optional[Mapping[str, str]],
                  curves: Mapping[str, dict]) -> dict:
    """What ``metrics.json`` holds: per evaluated model its folder, summary rows, cases and AUCs."""
    data = {"models": {}}
    for n, m in zip(names, models):
        if m.evaluation is not None:
            data["models"][n] = {"folder": str(m.folder), "summary": m.evaluation.summary(groups),
                                 "cases": [vars(c) for c in m.evaluation.cases]}
    for n, per_class in curves.items():
        data["models"][n]["auc"] = {c: d.auc for c, d in per_class.items()}
    return data


def _check_same_dataset(models: Sequence[TrainedModel], folders: Sequence[PathLike]) -> None:
    reference = models[0].dataset_json.get("labels")
    for model, folder in zip(models[1:], folders[1:]):
        if model.dataset_json.get("labels") != reference:
            raise UserInputError(f"trainer folders: expected models of one dataset (labels {reference}), got labels "
                                 f"{model.dataset_json.get('labels')} in {str(folder)!r}")


def _epochs(model: TrainedModel) -> str:
    counts = [len(log.get("train_losses", [])) for log in model.logs.values()]
    return ", ".join(str(c) for c in counts) if counts else "–"


def _final_ema(model: TrainedModel) -> str:
    values = [log["ema_fg_dice"][-1] for log in model.logs.values() if log.get("ema_fg_dice")]
    return ", ".join(f"{v:.3f}" for v in values) if values else "–"


def _render_markdown(heading: str, sections: Sequence[Section]) -> str:
    parts = [f"# {heading}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            parts += [paragraph, ""]
        if section.table is not None:
            parts += [section.table.markdown(), ""]
        for picture in section.pictures:
            parts += [f"![{section.title}]({picture})", ""]
    return "\n".join(parts)


def _render_html(heading: str, sections: Sequence[Section]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(heading)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
             "</head><body>", f"<h1>{e(heading)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        if section.table is not None:
            header, rows = section.table
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        parts += [f'<p><img src="{e(p)}" alt="{e(section.title)}"></p>' for p in section.pictures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    report = write_report(args.trainer_folders, args.output, args.groups, args.positive, not args.lower_is_positive,
                          args.bins, None if args.no_gradients else (args.gradient_loss or ("ce", "dice", "mime")),
                          args.title, allow_missing=args.allow_missing)
    return print_done(report.table, f"wrote {report.index_html} and {report.index_md}")


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers, COMMAND, _run,
        help="compare trained nnU-Net models: metrics table, training curves, ROC, calibration, gradients",
        description=textwrap.dedent("""\
            Compare nnU-Net models of one dataset (e.g. one trainer per loss) and write one folder with
            index.html / index.md (open index.html in a browser), metrics.md, metrics.json and PNGs:
              - a table like the papers': Dice, dV [ml] and class-wise ECE per class, mean +- std over
                the validation cases, per group with --groups (from validation/summary.json)
              - validation pseudo Dice and train/validation loss over epochs (the checkpoint's 'logging')
              - ROC/AUC of detecting --positive from the predicted volume (with --groups)
              - reliability diagrams and a gradient panel (when trained with --npz, so that the
                validation folder has .npz probabilities)"""),
        epilog=textwrap.dedent("""\
            example:
              nnunet-losses report $nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__2d/fold_0 \\
                  $nnUNet_results/Dataset001_X/nnUNetTrainerMime__nnUNetPlans__2d/fold_0 -o report/"""),
    )
    parser.add_argument("trainer_folders", nargs="+", metavar="FOLDER",
                        help="trainer output folders: .../<trainer>__<plans>__<config>/fold_N, or "
                             ".../<trainer>__<plans>__<config> to pool all its folds")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder (created)")
    parser.add_argument("--title", help="heading of the index page (default: the dataset's name)")
    parser.add_argument("--gradient-loss", action="append", metavar="SPEC",
                        help="loss of the gradient panel, repeatable, as in `nnunet-losses gradients --loss` "
                             "(default: ce dice mime)")
    parser.add_argument("--no-gradients", action="store_true", help="leave the gradient panel out")
    add_group_arguments(parser)
