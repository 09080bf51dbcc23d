#!/usr/bin/env python
"""float16 numerics of every loss of nnunet-losses under nnU-Net's mixed precision (issue #15).

nnU-Net trains on CUDA under ``torch.autocast(device, dtype=float16)`` with a ``GradScaler``. A loss
that overflows in float16 (exp of a large logit, a sum over a 128³ patch, a tiny Dice denominator)
gives Inf/NaN, and every such step is silently skipped by the scaler, which then halves its scale.
This script checks, for every loss row of ``bench_losses.build_cases`` (the package's losses and
nnU-Net's references, built the same way):

1. **one forward+backward** under autocast on extreme logits (``60·tanh`` of normal noise, about 1%
   of the voxels at exactly ±60, as a saturated output layer gives): are the loss and its gradient
   with respect to the logits finite?
2. **nnU-Net's GradScaler loop** for ``--steps`` steps (``train_step`` of nnUNetTrainer: autocast
   forward, scaled backward, unscale, clip at 12, step, update) with a tiny conv network whose output
   is ``60·tanh``: how many steps did the scaler skip (scale decreased), next to nnU-Net's own
   ``DC_and_CE_loss``? On CPU a GradScaler means nothing (nnU-Net uses none there): "n/a"; the loop
   still runs under autocast and counts non-finite steps.

Examples::

    python benchmarks/fp16_numerics.py --device cpu --quick            # seconds
    python benchmarks/fp16_numerics.py --device cuda --json benchmarks/results/fp16_cuda.json
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from _common import describe_machine, machine_info, markdown_table, write_json
from bench_losses import (COPY, NNUNET_DEFAULT, Case, Row, Setting, _short_error, build_cases, make_inputs,
                          parse_shape, run_once, select_cases)

LOGIT_BOUND = 60.0
SATURATED_FRACTION = 0.01
# nnUNetTrainer.configure_optimizers and train_step: SGD with Nesterov momentum, gradients clipped at norm 12
NNUNET_SGD = dict(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
NNUNET_CLIP_NORM = 12.0
DEFAULTS = dict(shapes=["2d", "3d_fullres"], classes=[4, 14], steps=20)
# a CPU runs float16 convolutions slowly (about 0.1 s a training step even at these sizes): fewer steps
QUICK = dict(shapes=["quick2d", "quick3d"], classes=[4], steps=5)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def autocast_dtype(device: torch.device) -> torch.dtype:
    """float16, as nnU-Net's train_step on CUDA; on CPU float16 where this torch's CPU autocast takes
    it (an older one warns and runs in float32 instead), else bfloat16."""
    if device.type == "cuda":
        return torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    return torch.float16 if out.dtype == torch.float16 and not caught else torch.bfloat16


def extreme_logits(setting: Setting, seed: int = 0) -> torch.Tensor:
    """``60·tanh(2·N(0,1))`` in the setting's dtype, a leaf that requires grad: most voxels confidently
    towards ±60, and ``SATURATED_FRACTION`` of them at exactly ±60."""
    generator = torch.Generator().manual_seed(seed)
    x = LOGIT_BOUND * torch.tanh(2 * torch.randn(setting.shape, generator=generator))
    saturated = torch.rand(setting.shape, generator=generator) < SATURATED_FRACTION
    x[saturated] = LOGIT_BOUND * torch.sign(torch.randn(int(saturated.sum()), generator=generator))
    return x.to(setting.device, setting.dtype).requires_grad_(True)


class TinyNet(nn.Module):
    """Two convolutions and ``60·tanh``: the logits of nnU-Net's output layer, bounded by ±60 and
    saturated on many voxels from the first step (the gain drives the tanh into saturation)."""

    def __init__(self, dims: int, classes: int, gain: float = 4.0):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.body = nn.Sequential(conv(1, 8, 3, padding=1), nn.LeakyReLU(), conv(8, classes, 1))
        self.gain = gain

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return LOGIT_BOUND * torch.tanh(self.gain * self.body(image))


# ----------------------------------------------------------------------------------------------
# the two checks
# ----------------------------------------------------------------------------------------------
def check_forward_backward(case: Case, setting: Setting, inputs) -> dict:
    """One forward+backward as bench_losses times it (loss under autocast, gradient outside)."""
    x, y, annotated = inputs
    out, grad = run_once(Row(case, False, fn=case.build(setting, False)), x, y, annotated, setting)
    grad = grad.float()
    value = out.detach().float().item()
    return dict(loss_value=value, loss_finite=math.isfinite(value), grad_finite=bool(torch.isfinite(grad).all()),
                grad_max_abs=grad.abs().max().item(), grad_zero_fraction=(grad == 0).float().mean().item())


def train_with_scaler(case: Case, setting: Setting, labels, annotated, steps: int) -> dict:
    """``steps`` of nnUNetTrainer.train_step on one batch; every loss starts from the same network."""
    torch.manual_seed(0)
    network = TinyNet(len(setting.spatial), setting.num_classes).to(setting.device)
    optimizer = torch.optim.SGD(network.parameters(), **NNUNET_SGD)
    loss = case.build(setting, False)
    scaler = grad_scaler(setting.device)
    image = torch.randn((setting.batch, 1, *setting.spatial), generator=torch.Generator().manual_seed(1))
    image = image.to(setting.device)
    values, skips, nonfinite_grads = [], [], 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(setting.device.type, dtype=setting.dtype):
            value = loss(network(image), labels, annotated)
        values.append(value.detach().float().item())
        if scaler is None:
            nonfinite_grads += not _step_unscaled(value, network, optimizer)
        else:
            skips.append(_step_scaled(value, network, optimizer, scaler))
    # the scaler starts high (2**16) and halves on overflow until its scale fits the gradients: skips before
    # the first applied step are that search (longer for larger gradients), skips after it are the finding
    searching = skips.index(False) if False in skips else len(skips)
    return dict(steps=steps, first_loss=values[0], last_loss=values[-1],
                nonfinite_loss_steps=sum(not math.isfinite(v) for v in values),
                nonfinite_grad_steps=None if scaler else nonfinite_grads,
                skipped_steps=sum(skips) if scaler else None,
                skipped_after_first_step=sum(skips[searching:]) if scaler else None,
                final_scale=scaler.get_scale() if scaler else None)


def grad_scaler(device: torch.device) -> Optional[torch.amp.GradScaler]:
    """nnU-Net's own scaler: GradScaler("cuda") with its defaults (init_scale 2**16); none on CPU."""
    return torch.amp.GradScaler("cuda") if device.type == "cuda" else None


def _step_scaled(value, network: nn.Module, optimizer, scaler) -> bool:
    """nnUNetTrainer.train_step's CUDA branch; True when the scaler skipped the step (its scale fell)."""
    before = scaler.get_scale()
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(network.parameters(), NNUNET_CLIP_NORM)
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < before


def _step_unscaled(value, network: nn.Module, optimizer) -> bool:
    """The same without a scaler (CPU); a non-finite gradient is not applied (as the scaler would skip
    it), so one bad step does not poison the later ones. True when the gradient was finite."""
    value.backward()
    finite = all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
    if finite:
        nn.utils.clip_grad_norm_(network.parameters(), NNUNET_CLIP_NORM)
        optimizer.step()
    return bool(finite)


def check_setting(setting: Setting, cases: Sequence[Case], steps: int) -> list[dict]:
    """Both checks of every case; a case that raises is reported with its error, the others go on."""
    _, labels, annotated = make_inputs(setting)  # bench_losses' labels: last class missing in sample 0
    inputs = (extreme_logits(setting), labels, annotated)
    results = []
    for case in cases:
        entry = dict(loss=case.name, error=None)
        try:
            entry.update(check_forward_backward(case, setting, inputs))
            entry["train"] = train_with_scaler(case, setting, labels, annotated, steps)
        except Exception as error:  # noqa: BLE001 - reported in the table, never swallowed
            entry["error"] = _short_error(error)
        results.append(entry)
    return results


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def verdict(entry: dict, reference_skipped: Optional[int]) -> str:
    """ok, or what went wrong: non-finite values, or more steps skipped after the scaler's first applied
    step than with nnU-Net's default (the skips of its initial search for a scale are no fault)."""
    if entry["error"]:
        return "ERROR: " + entry["error"]
    train = entry.get("train", {})
    skipped = train.get("skipped_after_first_step")
    problems = [label for label, bad in (
        ("non-finite loss", not entry["loss_finite"]), ("non-finite gradient", not entry["grad_finite"]),
        ("non-finite training loss", train.get("nonfinite_loss_steps")),
        ("non-finite training gradient", train.get("nonfinite_grad_steps")),
        ("more skipped steps than nnU-Net default", None not in (skipped, reference_skipped)
         and skipped > reference_skipped)) if bad]
    return "FAIL: " + ", ".join(problems) if problems else "ok"


def _number(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def default_skipped(summary: dict, key: str = "skipped_after_first_step") -> Optional[int]:
    """The steps the scaler skipped with nnU-Net's DC_and_CE_loss: the bar of the other rows."""
    default = next((e for e in summary["results"] if e["loss"] == NNUNET_DEFAULT and not e["error"]), None)
    return default["train"][key] if default else None


def _skips(train: dict) -> str:
    """``total / after the first applied step`` of the scaler's skipped steps, n/a without a scaler."""
    if train.get("skipped_steps") is None:
        return "n/a"
    return f"{train['skipped_steps']} / {train['skipped_after_first_step']}"


def format_setting(summary: dict) -> str:
    reference = default_skipped(summary)
    rows = []
    for entry in summary["results"]:
        train = entry.get("train") or {}
        finite = "-" if entry["error"] else f"{entry['loss_finite']} / {entry['grad_finite']}"
        rows.append([entry["loss"], _number(entry.get("loss_value"), ".4g"), finite,
                     _number(entry.get("grad_max_abs"), ".3g"),
                     f"{_number(train.get('first_loss'), '.4g')} → {_number(train.get('last_loss'), '.4g')}",
                     _number(train.get("nonfinite_loss_steps"), "d"), _skips(train),
                     _number(train.get("final_scale"), ".0f"), verdict(entry, reference)])
    header = ["loss", "value", "finite loss / grad", "max abs grad", f"train loss (step 1 → {summary['steps']})",
              "non-finite loss steps", "skipped steps: all / after 1st applied", "final scale", "verdict"]
    total = default_skipped(summary, "skipped_steps")
    scaler = ("no GradScaler (CPU)" if total is None else f"nnU-Net default's GradScaler skipped {total} of "
              f"{summary['steps']} steps, {reference} after its first applied step")
    title = f"#### {summary['label']}, autocast {summary['autocast_dtype']}, logits ±{LOGIT_BOUND:g}; {scaler}"
    return title + "\n\n" + markdown_table(header, rows)


def all_ok(report: dict) -> bool:
    return all(verdict(e, default_skipped(s)) == "ok" for s in report["settings"] for e in s["results"])


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints a markdown table per shape.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where present, else cpu)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                        help="bench_losses' presets (2d, 3d_fullres, quick2d, quick3d) or B,H,W / B,D,H,W. "
                             "Default: 2d 3d_fullres")
    parser.add_argument("--classes", nargs="+", type=int, default=None, metavar="C", help="Default: 4 14")
    parser.add_argument("--steps", type=int, default=None,
                        help="GradScaler training steps per loss. Default: 20 (5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="shapes quick2d quick3d, 4 classes, 5 steps: seconds on a "
                                                             "CPU; explicit --shapes/--classes/--steps still win")
    parser.add_argument("--losses", nargs="+", default=None, metavar="SUBSTRING",
                        help="only the losses whose name contains one of these (nnU-Net's rows always run)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every result to this JSON file")
    return parser


def numerics_cases(patterns: Optional[Sequence[str]] = None) -> list[Case]:
    """bench_losses' rows but the copy floor (no loss, no backward) and MONAI (no nnU-Net loss)."""
    return [c for c in select_cases(build_cases(monai=False), patterns) if c.name != COPY]


def planned_settings(args: argparse.Namespace, dtype: torch.dtype):
    presets = QUICK if args.quick else DEFAULTS
    for text in args.shapes or presets["shapes"]:
        (batch, *spatial), batch_dice = parse_shape(text)
        for classes in args.classes or presets["classes"]:
            yield Setting(batch, classes, tuple(spatial), batch_dice, dtype, torch.device(args.device))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = (QUICK if args.quick else DEFAULTS)["steps"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"expected a CUDA device for --device {args.device}, got none; use --device cpu")
    if args.steps < 1:
        raise SystemExit(f"expected --steps >= 1, got {args.steps}")
    dtype = autocast_dtype(torch.device(args.device))
    cases = numerics_cases(args.losses)
    machine = machine_info(args.device)
    print(f"Machine: {describe_machine(machine)}\nAutocast dtype: {str(dtype).replace('torch.', '')}"
          + ("" if dtype == torch.float16 else " (this torch's CPU autocast has no float16)"), flush=True)
    report = dict(machine=machine, command=" ".join(["fp16_numerics.py", *(argv or sys.argv[1:])]),
                  autocast_dtype=str(dtype).replace("torch.", ""), steps=args.steps, settings=[])
    for setting in planned_settings(args, dtype):
        summary = dict(label=setting.label, shape=list(setting.shape), batch_dice=setting.batch_dice,
                       autocast_dtype=report["autocast_dtype"], steps=args.steps,
                       results=check_setting(setting, cases, args.steps))
        report["settings"].append(summary)
        print("\n" + format_setting(summary), flush=True)
        if args.json:  # after every setting: a run stopped by a timeout keeps what it checked
            write_json(report, args.json)
    report["all_ok"] = all_ok(report)
    print(f"\nAll ok: {report['all_ok']}")
    if args.json:
        write_json(report, args.json)
        print(f"Wrote {args.json}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
