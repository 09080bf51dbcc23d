#!/usr/bin/env python
"""Why a trainer misses a class: what its loss does to each class during nnU-Net's first iterations.

For each (trainer, repeat), nnU-Net's own training loop (``nnUNetTrainer.run_training`` of the trainer
that ``-tr <trainer>_<E>ep_<I>it`` names, on a dataset of ``bench_quality.py``) runs with two probes
that change nothing it computes:

* on the loss: for the full-resolution output of every training step (the first deep-supervision
  scale), per class c, with ``s = softmax(x)`` and ``g = dL/dx`` (the gradient the loss sends into
  the network's logits, deep-supervision weight included):

  - ``share``: the class's share of the batch's voxels;
  - ``prob_in`` / ``prob_out``: mean ``s_c`` over the voxels of class c / over all other voxels;
  - ``push_in``: ``-sum g_c`` over the voxels of class c (how hard gradient descent raises ``x_c``
    where the class is; CE's is about ``w_0 * share_c * (1 - prob_in)``, ``w_0`` nnU-Net's weight of
    the full-resolution output, 4/7 with four scales), ``push_out``: ``sum g_c`` over the other voxels
    (how hard it lowers ``x_c`` elsewhere); divided by the GradScaler's scale where nnU-Net uses one;
  - ``pred_share``: the class's share of the voxels where it is the argmax (the segmentation);
  - ``loss``: the step's loss;
  - label-marginal trainers (CE + λ R) also: ``penalty_push_in`` / ``penalty_push_out``, the part of
    ``push_in`` / ``push_out`` that the penalty λ R gives (the rest is CE's), and ``sharpened_share``,
    the predicted proportion the penalty sees, mean over the batch of ``softmax(τ x)``'s;

  A class absent from the batch has ``prob_in`` and ``push_in`` None (not 0).
* on ``torch.nn.utils.clip_grad_norm_`` (nnU-Net clips at 12): the parameters' gradient norm
  before clipping, so ``grad_norm > 12`` marks the steps whose update clipping shrank.

Records go to ``--results`` after each run (reused on a re-run); ``--plot`` draws prob_in (and
prob_out, dotted) and push_in per class against the iteration (for a label-marginal trainer also
the penalty's part of it, dashed, and of push_out, dotted, in absolute value), one line per trainer
(mean over repeats), and the gradient norm. ``--epoch-table CLASS`` prints one class's medians per
epoch.

    python benchmarks/training_dynamics.py --work-dir /tmp/quality_work \\
        --trainers nnUNetTrainer nnUNetTrainerDiceLoss nnUNetTrainerDiceICE --repeats 2 --plot
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from bench_quality import DATASETS, LABELS, empty_results, finished_keys, load_results, prepare_dataset, store_record
from bench_training import nnunet_environment
from _common import write_json
from nnunet_losses.training.names import short_run_name

RESULTS_FOLDER = Path(__file__).resolve().parent / "results"
BENCHMARK = "training dynamics (benchmarks/training_dynamics.py)"


class LossProbe:
    """Wraps a trainer's loss: records, per training step, the statistics of the module docstring.

    ``gradient_scale``: what the gradient reaching the logits is multiplied by (nnU-Net's GradScaler on
    CUDA scales the loss; a callable read at each backward), divided out of the pushes."""

    def __init__(self, loss, classes: int, steps: list, gradient_scale=lambda: 1.0):
        self.loss, self.classes, self.steps, self.gradient_scale = loss, classes, steps, gradient_scale
        self.penalty = penalty_part(loss)

    def __call__(self, output, target, *args, **kwargs):
        import torch

        full = output[0] if isinstance(output, (list, tuple)) else output
        labels = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        value = self.loss(output, target, *args, **kwargs)
        if not full.requires_grad:  # validation runs under no_grad: nothing to record
            return value
        probabilities = torch.softmax(full.detach().float(), 1)
        masks = [labels == c for c in range(self.classes)]
        present = [bool(mask.any()) for mask in masks]  # a class absent from the batch: None, not 0
        step = {"loss": float(value.detach()), "share": [float(mask.float().mean()) for mask in masks],
                "prob_in": [float(probabilities[:, c][m].mean()) if present[c] else None for c, m in enumerate(masks)],
                "prob_out": [float(probabilities[:, c][~m].mean()) for c, m in enumerate(masks)],
                "pred_share": [float((probabilities.argmax(1) == c).float().mean()) for c in range(self.classes)]}
        if self.penalty is not None:
            tau, penalty_gradient = self.penalty
            step["sharpened_share"] = torch.softmax(tau * full.detach().float(), 1).flatten(2).mean((0, 2)).tolist()
            gradient = penalty_gradient(full, target[0] if isinstance(target, (list, tuple)) else target)
            step["penalty_push_in"] = [float(-gradient[:, c][m].sum()) if present[c] else None
                                       for c, m in enumerate(masks)]
            step["penalty_push_out"] = [float(gradient[:, c][~m].sum()) for c, m in enumerate(masks)]
        self.steps.append(step)

        def record_gradient(gradient):
            gradient = gradient.float() / self.gradient_scale()
            step["push_in"] = [float(-gradient[:, c][m].sum()) if present[c] else None for c, m in enumerate(masks)]
            step["push_out"] = [float(gradient[:, c][~m].sum()) for c, m in enumerate(masks)]

        full.register_hook(record_gradient)
        return value


def penalty_part(loss):
    """``(τ, gradient)`` for a label-marginal trainer's loss (a ``LabelMarginalLoss``, alone or in nnU-Net's
    ``DeepSupervisionWrapper``), else None: ``gradient(x, y)`` is what λ R adds to ``dL/dx`` of the
    full-resolution output ``x`` (deep-supervision weight included), the loss's gradient minus that of
    its CE alone (``lam=0``, the same CE exactly)."""
    import torch
    from nnunet_losses import LabelMarginalLoss

    inner, weight = getattr(loss, "loss", loss), 1.0
    if hasattr(loss, "weight_factors"):
        weight = float(loss.weight_factors[0])
    if not isinstance(inner, LabelMarginalLoss):
        return None
    ce_only = LabelMarginalLoss(penalty=inner.penalty, lam=0.0, tau=inner.tau, activation=inner.activation,
                                ignore_label=inner.ignore_label)

    def gradient(x, y):
        x = x.detach().float().requires_grad_()
        (grad,) = torch.autograd.grad(weight * (inner(x, y) - ce_only(x, y)), x)
        return grad

    return inner.tau, gradient


@contextlib.contextmanager
def gradient_norms_recorded(steps: list):
    """``torch.nn.utils.clip_grad_norm_`` storing the norm it returns in the latest step's record."""
    import torch

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norm = clip(*args, **kwargs)
        if steps:
            steps[-1]["grad_norm"] = float(norm)
        return norm

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip


def train_probed(dataset_id: int, configuration: str, run_name: str, device: str) -> dict:
    """nnU-Net's training loop of ``run_name`` with the probes; returns the per-step records."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(dataset_id), configuration, 0, run_name, "nnUNetPlans",
                                    device=torch.device(device))
    if trainer.label_manager.has_regions:
        raise ValueError(f"--dataset: expected a label dataset (softmax outputs), got regions for {run_name}")
    trainer.initialize()
    steps: list = []
    classes = trainer.label_manager.num_segmentation_heads

    def gradient_scale() -> float:
        return 1.0 if trainer.grad_scaler is None else float(trainer.grad_scaler.get_scale())

    trainer.loss = LossProbe(trainer.loss, classes, steps, gradient_scale)
    with gradient_norms_recorded(steps), contextlib.redirect_stdout(sys.stderr):
        trainer.run_training()
    return {"steps": steps, "classes": classes}


def summarize_steps(record: dict, names: Sequence[str]) -> str:
    """One line per class: prob_in and push_in at the first, middle and last step."""
    steps = record["steps"]
    picks = [0, len(steps) // 2, len(steps) - 1]
    lines = []
    for c, name in enumerate(names):
        values = ", ".join(f"it {i + 1}: s={format_value(steps[i]['prob_in'][c])} "
                           f"push={format_value(steps[i]['push_in'][c])}" for i in picks)
        lines.append(f"    {name}: {values}")
    return "\n".join(lines)


EPOCH_COLUMNS = ("share", "pred_share", "sharpened_share", "prob_in", "push_in", "penalty_push_in", "penalty_push_out")


def epoch_table(record: dict, c: int, iterations: int) -> str:
    """A markdown table of class ``c`` per epoch (``iterations`` steps): the median over the epoch's steps
    where the class is in the batch of each of :data:`EPOCH_COLUMNS` that the record has."""
    steps = record["steps"]
    columns = [key for key in EPOCH_COLUMNS if key in steps[0]]
    lines = ["| epoch | steps | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for epoch, start in enumerate(range(0, len(steps), iterations)):
        present = [step for step in steps[start:start + iterations] if step["prob_in"][c] is not None]
        cells = [format_value(statistics.median(step[key][c] for step in present)) if present else "-"
                 for key in columns]
        lines.append(f"| {epoch} | {len(present)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_value(value: Optional[float]) -> str:
    """'-' for a class absent from the batch, else 3 significant digits."""
    return "-" if value is None else f"{value:.3g}"


def mean_series(records: Sequence[dict], key: str, c: int) -> list:
    """The mean over repeats of ``key`` of class ``c`` per step (steps where every repeat has a value)."""
    length = min(len(r["steps"]) for r in records)
    series = []
    for i in range(length):
        values = [r["steps"][i][key][c] for r in records if r["steps"][i][key][c] is not None]
        series.append(statistics.fmean(values) if values else float("nan"))
    return series


def plot(results: dict, dataset: str, budget: str, names: Sequence[str], path: Path) -> Path:
    """prob_in and push_in per class against the iteration, one line per trainer (the runs of ``dataset``
    at ``budget``); and the gradient norm."""
    from nnunet_losses.commands.output import pyplot

    plt = pyplot()
    plt.rcdefaults()  # nnU-Net's logger, imported for training in this process, set seaborn's large fonts
    by_trainer: dict = {}
    for record in results["runs"]:
        if (record["dataset"], record["budget"]) == (dataset, budget):
            by_trainer.setdefault(record["trainer"], []).append(record)
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 3.4 * len(names)), squeeze=False)
    for index, (trainer, records) in enumerate(by_trainer.items()):
        label, colour = f"{trainer} ({len(records)})", f"C{index}"
        for c, name in enumerate(names, start=1):
            row = axes[c - 1]
            row[0].plot(mean_series(records, "prob_in", c), color=colour, label=label)
            row[0].plot(mean_series(records, "prob_out", c), color=colour, ls=":")
            row[0].set(title=f"{name}: mean s_c at its voxels (elsewhere dotted)", xlabel="iteration", yscale="log")
            row[1].plot([abs(v) for v in mean_series(records, "push_in", c)], color=colour, label=label)
            if "penalty_push_in" in records[0]["steps"][0]:  # the penalty's part: there --, |elsewhere| ..
                row[1].plot([abs(v) for v in mean_series(records, "penalty_push_in", c)], color=colour, ls="--")
                row[1].plot([abs(v) for v in mean_series(records, "penalty_push_out", c)], color=colour, ls=":")
                row[1].set_ylim(bottom=1e-8)  # the penalty's part falls to 0 below its log floor
            row[1].set(title=f"{name}: push -Σ dL/dx_c at its voxels", xlabel="iteration", yscale="log")
        length = min(len(r["steps"]) for r in records)
        norms = [statistics.fmean(r["steps"][i].get("grad_norm", float("nan")) for r in records) for i in range(length)]
        axes[0][2].plot(norms, color=colour, label=label)
    axes[0][2].axhline(12, color="k", lw=0.8, ls=":")
    axes[0][2].set(title="gradient norm before clipping (at 12)", xlabel="iteration",
                   yscale="log")
    for row in axes[1:]:
        row[2].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerDiceLoss"],
                        metavar="TRAINER", help="trainer names (with tokens, without a budget)")
    parser.add_argument("--dataset", default="synthetic2d", choices=sorted(DATASETS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("quality_work"),
                        help="bench_quality.py's work folder: its prepared datasets are reused")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=None,
                        help="the JSON file of finished runs; default: results/training_dynamics_<device>.json")
    parser.add_argument("--plot", action="store_true", help="draw <results>.png from the finished runs")
    parser.add_argument("--epoch-table", metavar="CLASS", default=None, choices=[name for name in LABELS if LABELS[name]],
                        help="print, per finished run, a table per epoch of this class (a label name)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "iterations", "repeats"):
        if getattr(args, name) < 1:
            print(f"--{name}: expected an int >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.results is None:
        args.results = RESULTS_FOLDER / f"training_dynamics_{args.device.split(':')[0]}.json"
    spec = DATASETS[args.dataset]
    work = args.work_dir.resolve()
    raw_folder = prepare_dataset(work, spec, planning_processes=2)
    labels = json.loads((raw_folder / "dataset.json").read_text())["labels"]
    names = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])][1:]
    if not args.results.is_file():  # bench_quality's file layout, under this benchmark's name
        write_json(dict(empty_results(), benchmark=BENCHMARK), args.results)
    results = load_results(args.results)
    budget = f"{args.epochs}x{args.iterations}"
    done = finished_keys(results)
    with tempfile.TemporaryDirectory(prefix="dynamics_", dir=work) as scratch:
        # nnU-Net (>= 2.8) reads its folders from the environment when it first uses them, not at import
        os.environ.update({k: v for k, v in nnunet_environment(work, Path(scratch), 0).items()
                           if k.startswith("nnUNet")})
        for repeat in range(args.repeats):
            for trainer in args.trainers:
                if (args.dataset, trainer, budget, repeat) in done:
                    continue
                run_name = short_run_name(trainer, args.epochs, args.iterations)
                print(f"{trainer} repeat {repeat}: {run_name} ...", flush=True)
                try:
                    probed = train_probed(spec.dataset_id, spec.configuration, run_name, args.device)
                except ValueError as error:
                    print(error, file=sys.stderr)
                    return 2
                record = {"dataset": args.dataset, "trainer": trainer, "budget": budget, "repeat": repeat,
                          "device": args.device, "run_name": run_name, "class_names": names, **probed}
                results = store_record(args.results, record)
                print(summarize_steps(record, ["background"] + names), flush=True)
    if args.epoch_table is not None:
        for record in results["runs"]:
            if (record["dataset"], record["budget"]) == (args.dataset, budget):
                print(f"\n{record['trainer']} repeat {record['repeat']}, {args.epoch_table}:\n"
                      + epoch_table(record, names.index(args.epoch_table) + 1, args.iterations))
    if args.plot:
        print(f"Plot: {plot(results, args.dataset, budget, names, args.results.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
