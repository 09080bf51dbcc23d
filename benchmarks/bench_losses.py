#!/usr/bin/env python
"""Forward+backward time and extra peak memory of every loss of nnunet-losses, side by side with nnU-Net's.

Every loss runs on the same logits and label map, on nnU-Net-typical shapes, next to nnU-Net's default
loss (``DC_and_CE_loss`` built by ``nnUNetTrainer._build_loss`` itself), nnU-Net's Dice alone (both
``batch_dice`` settings), nnU-Net's CE alone, MONAI's ``DiceCELoss`` and a plain copy of the logits
(``x.clone()``), the memory-bandwidth floor: a loss must at least read the logits and write their
gradient, which is the traffic of one copy. Timings are medians over ``--repeats`` runs after
``--warmup`` runs, with the losses interleaved (one run of each loss per round) so that load from other
processes spreads over all of them alike.

Extra peak memory is the peak of the memory allocated during one forward+backward, minus what was
allocated before it (the inputs):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the run;
* CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of PyTorch's
  CPU allocator as a ``[memory]`` event (bytes, time stamp); the running sum of these events, in time
  order, is the live memory, and its maximum the extra peak. The copy floor checks the measurement:
  it must report exactly the size of the logits.

Examples::

    python benchmarks/bench_losses.py --quick                       # smoke run, seconds
    python benchmarks/bench_losses.py --shapes 2d 3d_fullres --classes 4 --json results.json
    python benchmarks/bench_losses.py --device cuda --dtype float32 bfloat16 --compile
    python benchmarks/bench_losses.py --sweep --quick --device cpu --json benchmarks/results/losses_sweep_cpu.json \
        --plot benchmarks/results/losses_sweep_cpu.png          # time per logit against size, per label dtype
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's info lines would drown the tables

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
import types
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from _common import describe_machine, machine_info, markdown_table, median, package_fingerprint, source_version, \
    write_json

COPY = "copy floor: x.clone()"
NNUNET_DEFAULT = "nnU-Net default: DC_and_CE_loss"
NNUNET_DICE_I = "nnU-Net Dice, batch_dice=False"
NNUNET_DICE_BI = "nnU-Net Dice, batch_dice=True"
NNUNET_CE = "nnU-Net CE"
MONAI_DICE_CE = "MONAI DiceCELoss"

# (batch, *spatial) of nnU-Net-typical patches; channels come from --classes. batch_dice is what
# nnU-Net's planner picks: always True for 2d, True for 3d_fullres only when a 3d_lowres exists (the
# benchmark assumes none; both Dice settings are measured anyway).
SHAPE_PRESETS = {
    "3d_fullres": ((2, 128, 128, 128), False),
    "2d": ((12, 512, 512), True),
    "quick3d": ((2, 24, 24, 24), False),
    "quick2d": ((4, 48, 48), True),
}
QUICK = dict(shapes=["quick2d", "quick3d"], classes=[3], repeats=3, warmup=1)

# --sweep: (batch, classes, spatial) from nnU-Net's small 2d batches to large 3d patches, where the
# allocations of a loss move from the allocator's reused pages to freshly page-faulted ones
SWEEP = [(12, c, (s, s)) for c in (4, 14) for s in (128, 192, 256, 384, 512)] + \
        [(2, c, (s, s, s)) for c in (4, 14) for s in (64, 80, 96, 112, 128, 160)]
SWEEP_QUICK = [(12, 4, (128, 128)), (12, 4, (256, 256)), (12, 14, (256, 256)),
               (2, 4, (64, 64, 64)), (2, 4, (96, 96, 96)), (2, 4, (128, 128, 128)),
               (2, 14, (64, 64, 64)), (2, 14, (96, 96, 96))]
SWEEP_DEFAULTS = dict(repeats=5, warmup=1, label_dtype=["int16", "int64", "float32"])
SWEEP_QUICK_DEFAULTS = dict(repeats=3, warmup=1, label_dtype=["int16", "int64", "float32"])
LABEL_DTYPES = {"int16": torch.int16, "int64": torch.int64, "float32": torch.float32, "uint8": torch.uint8}


@dataclasses.dataclass(frozen=True)
class Target:
    """``row <= max_time x reference`` in time (and ``<= max_memory x`` in extra peak memory, if set)."""

    reference: str
    max_time: float
    max_memory: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Setting:
    batch: int
    num_classes: int
    spatial: tuple
    batch_dice: bool
    dtype: torch.dtype
    device: torch.device
    label_dtype: torch.dtype = torch.int16  # nnU-Net's dataloader dtype

    @property
    def shape(self) -> tuple:
        return (self.batch, self.num_classes, *self.spatial)

    @property
    def label(self) -> str:
        dims = "x".join(str(s) for s in self.shape)
        return f"({dims}) {str(self.dtype).replace('torch.', '')} on {self.device.type}, {_dtype_name(self.label_dtype)} labels"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table: ``build(setting, compile)`` returns a callable ``f(x, y, annotated)``."""

    name: str
    build: Callable[[Setting, bool], Callable]
    targets: tuple = ()
    backward: bool = True


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------
def nnunet_default_loss(batch_dice: bool, compile_dice: bool) -> nn.Module:
    """nnU-Net's loss built by ``nnUNetTrainer._build_loss`` itself, for a label (not region) dataset
    without ignore label, on one process, without the deep-supervision wrapper (the full-resolution
    term is what costs: each lower scale is 1/4 (2d) or 1/8 (3d) the size of the one above)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = types.SimpleNamespace(
        label_manager=types.SimpleNamespace(has_regions=False, ignore_label=None),
        configuration_manager=types.SimpleNamespace(batch_dice=batch_dice),
        is_ddp=False,
        enable_deep_supervision=False,
        _do_i_compile=lambda: compile_dice,  # nnU-Net compiles the Dice part only
    )
    return nnUNetTrainer._build_loss(trainer)


def _plain(make: Callable[[Setting], nn.Module]) -> Callable[[Setting, bool], Callable]:
    """A module called ``module(x, y)``, compiled whole with ``--compile``."""

    def build(setting: Setting, compile: bool) -> Callable:
        module = make(setting).to(setting.device)
        module = torch.compile(module) if compile else module
        return lambda x, y, annotated: module(x, y)

    return build


def _with_annotated(make: Callable[[Setting], nn.Module]) -> Callable[[Setting, bool], Callable]:
    """A missing-label loss, given the table of annotated classes (as its trainer passes it)."""

    def build(setting: Setting, compile: bool) -> Callable:
        module = make(setting).to(setting.device)
        module = torch.compile(module) if compile else module
        return lambda x, y, annotated: module(x, y, annotated=annotated)

    return build


def _nnunet_default(setting: Setting, compile: bool) -> Callable:
    loss = nnunet_default_loss(setting.batch_dice, compile)
    return lambda x, y, annotated: loss(x, y)


def _nnunet_dice(batch_dice: bool):
    def build(setting: Setting, compile: bool) -> Callable:
        dice = nnunet_default_loss(batch_dice, compile).dc
        return lambda x, y, annotated: dice(x, y)

    return build


def _copy(setting: Setting, compile: bool) -> Callable:
    return lambda x, y, annotated: x.detach().clone()


def _monai_dice_ce(setting: Setting) -> nn.Module:
    from monai.losses import DiceCELoss  # the `bench` extra

    return DiceCELoss(to_onehot_y=True, softmax=True)


def build_cases(monai: bool = True) -> list[Case]:
    """Every row; ``monai=False`` leaves MONAI out (the size sweep compares with nnU-Net only)."""
    import nnunet_losses as nl
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

    half_default = Target(NNUNET_DEFAULT, 0.5, 0.5)
    cases = [
        Case(COPY, _copy, backward=False),
        Case(NNUNET_DEFAULT, _nnunet_default),
        Case(NNUNET_DICE_I, _nnunet_dice(False)),
        Case(NNUNET_DICE_BI, _nnunet_dice(True)),
        Case(NNUNET_CE, _plain(lambda s: RobustCrossEntropyLoss())),
        *([Case(MONAI_DICE_CE, _plain(_monai_dice_ce))] if monai else []),
        Case("MimeLoss", _plain(lambda s: nl.MimeLoss()), (half_default, Target(COPY, 3.0))),
        Case("NegativeMimeLoss", _plain(lambda s: nl.NegativeMimeLoss()), (half_default, Target(COPY, 3.0))),
        Case("DynamicMimeLoss(phi=I)", _plain(lambda s: nl.DynamicMimeLoss(phi="I"))),
    ]
    # nnU-Net's Dice of the same reduction: I ~ batch_dice=False, BI ~ batch_dice=True; CI and BCI have no
    # nnU-Net counterpart and are held to the one with the same batch handling
    same_phi = {"I": NNUNET_DICE_I, "CI": NNUNET_DICE_I, "BI": NNUNET_DICE_BI, "BCI": NNUNET_DICE_BI}
    for phi, reference in same_phi.items():
        cases.append(Case(f"PhiDiceLoss(phi={phi})", _plain(lambda s, phi=phi: nl.PhiDiceLoss(phi=phi)),
                          (Target(reference, 1.0, 1.0),)))
    cases += [
        Case("MarginalDiceLoss", _with_annotated(lambda s: nl.MarginalDiceLoss()), (Target(NNUNET_DICE_I, 1.0, 1.0),)),
        Case("LeafDiceLoss", _with_annotated(lambda s: nl.LeafDiceLoss()), (Target(NNUNET_DICE_I, 1.0, 1.0),)),
        # the label-set CEs: plain autograd over a dense one-hot target, no target set yet (measured first)
        Case("MarginalCrossEntropyLoss", _with_annotated(lambda s: nl.MarginalCrossEntropyLoss())),
        Case("LeafCrossEntropyLoss", _with_annotated(lambda s: nl.LeafCrossEntropyLoss())),
    ]
    for penalty in ("l1", "kl", "dice_bias"):
        cases.append(Case(f"LabelMarginalLoss({penalty})",
                          _plain(lambda s, penalty=penalty: nl.LabelMarginalLoss(penalty=penalty)),
                          (Target(NNUNET_CE, 1.2, 1.2),)))
    return cases


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def make_inputs(setting: Setting, seed: int = 0):
    """Logits, a label map (``setting.label_dtype``, int16 by default: nnU-Net's dataloader dtype) and
    the annotated-classes table.

    The last class is missing (not annotated, no voxels) in sample 0, so the missing-label losses do
    their merging/dropping work; every loss gets the same inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(setting.shape, generator=generator)).to(setting.device, setting.dtype)
    x.requires_grad_(True)
    labels = torch.randint(0, setting.num_classes, (setting.batch, 1, *setting.spatial), generator=generator)
    labels[0][labels[0] == setting.num_classes - 1] = 0
    annotated = torch.ones(setting.batch, setting.num_classes, dtype=torch.bool)
    annotated[0, -1] = False
    return x, labels.to(setting.device, setting.label_dtype), annotated.to(setting.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Row:
    case: Case
    compiled: bool
    fn: Optional[Callable] = None
    times: list = dataclasses.field(default_factory=list)
    extra_peak_bytes: Optional[int] = None
    error: Optional[str] = None
    check: Optional[str] = None  # compiled rows: does the compiled loss give the eager value and gradient?
    graph_breaks: Optional[int] = None  # compiled rows
    profile: Optional[str] = None  # --profile: torch.profiler's operator table

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def seconds(self) -> Optional[float]:
        return median(self.times) if self.times and self.error is None else None


def run_once(row: Row, x, y, annotated, setting: Setting):
    """One forward (+ backward) as nnU-Net's train_step does it: loss under autocast, backward outside.

    Returns the loss and its gradient with respect to the logits. ``torch.autograd.grad`` hands the
    gradient back the way the network's last layer receives it, without accumulating it into
    ``x.grad`` (which could add a copy that training never makes)."""
    low_precision = setting.dtype in (torch.float16, torch.bfloat16)
    autocast = torch.autocast(setting.device.type, dtype=setting.dtype) if low_precision else contextlib.nullcontext()
    with autocast:
        out = row.fn(x, y, annotated)
    grad = torch.autograd.grad(out, x)[0] if row.case.backward else None
    return out, grad


def time_once(row: Row, x, y, annotated, setting: Setting) -> float:
    _synchronize(setting.device)
    start = time.perf_counter()
    run_once(row, x, y, annotated, setting)
    _synchronize(setting.device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints start/stop lines there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_extra_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the live bytes of PyTorch's CPU allocator during ``run()``, relative to its start.

    The profiler's ``[memory]`` events are every allocation (+bytes) and free (-bytes); their running
    sum in time order is the memory allocated since the start, and its maximum the extra peak."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.start()
    try:
        run()
    finally:
        with _quiet_stderr():
            profiler.stop()
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def cuda_extra_peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def extra_peak_bytes(row: Row, x, y, annotated, setting: Setting) -> int:
    run = lambda: run_once(row, x, y, annotated, setting)  # noqa: E731 - the output is dropped inside
    if setting.device.type == "cuda":
        return cuda_extra_peak_bytes(run, setting.device)
    return cpu_extra_peak_bytes(run)


def _short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:160]


def compare_with_eager(row: Row, eager: Row, x, y, annotated, setting: Setting) -> str:
    """'same' when the compiled loss gives the eager loss's value and gradient (to float tolerance)."""
    tolerance = dict(rtol=1e-4, atol=1e-6) if setting.dtype in (torch.float32, torch.float64) else dict(rtol=2e-2,
                                                                                                        atol=1e-3)
    (value_e, grad_e), (value_c, grad_c) = (run_once(r, x, y, annotated, setting) for r in (eager, row))
    try:
        torch.testing.assert_close(value_c.detach().float(), value_e.detach().float(), **tolerance)
        torch.testing.assert_close(grad_c.float(), grad_e.float(), **tolerance)
    except AssertionError as error:
        return "DIFFERS: " + str(error).strip().splitlines()[0]
    return "same"


def graph_break_count() -> int:
    """Graph breaks torch.compile has recorded in this process so far (dynamo's counters)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def profile_table(row: Row, x, y, annotated, setting: Setting, limit: int = 15) -> str:
    """torch.profiler's table of one forward+backward: the operators that take the time and allocate."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.device.type == "cuda" else [])
    with _quiet_stderr():
        profiler = profile(activities=activities, profile_memory=True)
        profiler.start()
    try:
        run_once(row, x, y, annotated, setting)
        _synchronize(setting.device)
    finally:
        with _quiet_stderr():
            profiler.stop()
    sort = "self_device_time_total" if setting.device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=limit, max_name_column_width=48)


def measure(setting: Setting, cases: Sequence[Case], repeats: int, warmup: int, compile: bool,
            progress: bool = True, profile: bool = False, memory: bool = True) -> list[Row]:
    if compile:
        torch._dynamo.reset()  # fresh caches: no recompile limit carried over from the previous shape
    x, y, annotated = make_inputs(setting)
    rows = [Row(case, False) for case in cases]
    if compile:
        rows += [Row(case, True) for case in cases if case.backward]
    for row in rows:
        try:
            row.fn = row.case.build(setting, row.compiled)
        except ImportError as error:
            row.error = f"not installed ({error.name}); pip install 'nnunet-losses[bench]'"
    live = [row for row in rows if row.error is None]
    steps = sum(max(warmup, row.compiled) + memory + row.compiled + repeats + profile for row in live)
    bar = tqdm(total=steps, desc=setting.label, disable=not progress, leave=False)

    def attempt(row: Row, work: Callable[[], object]) -> None:
        # a loss that fails (out of memory, a compile error) is reported in its row; the others go on
        if row.error is None:
            try:
                work()
            except Exception as error:  # noqa: BLE001 - reported in the table, never swallowed
                row.error = _short_error(error)
                row.fn = None
        bar.update()

    def compile_and_count(row: Row) -> None:  # the first call compiles; count the graph breaks it makes
        before = graph_break_count()
        run_once(row, x, y, annotated, setting)
        row.graph_breaks = graph_break_count() - before

    for row in live:
        for step in range(max(warmup, row.compiled)):  # a compiled loss compiles in its first warm-up run
            first_compile = row.compiled and step == 0
            attempt(row, (lambda: compile_and_count(row)) if first_compile else
                    (lambda: run_once(row, x, y, annotated, setting)))
        if memory:  # the sweep measures time only: one profiled run per loss and size less
            attempt(row, lambda: setattr(row, "extra_peak_bytes", extra_peak_bytes(row, x, y, annotated, setting)))
    eager_by_name = {row.name: row for row in rows if not row.compiled}
    for row in live:
        if row.compiled and eager_by_name[row.name].error is None:
            eager = eager_by_name[row.name]
            attempt(row, lambda: setattr(row, "check", compare_with_eager(row, eager, x, y, annotated, setting)))
    for _ in range(repeats):  # interleaved: one run of every loss per round
        for row in live:
            attempt(row, lambda: row.times.append(time_once(row, x, y, annotated, setting)))
    if profile:
        for row in live:
            attempt(row, lambda: setattr(row, "profile", profile_table(row, x, y, annotated, setting)))
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _ratio(value, reference) -> Optional[float]:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def relative_spread(times: Sequence[float]) -> Optional[float]:
    """Interquartile range of the timed runs over their median: how far the noise of the machine reaches."""
    if len(times) < 4:
        return None
    first, _, third = statistics.quantiles(times, n=4)
    return (third - first) / median(times)


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def evaluate_targets(row: Row, by_name: dict, memory: bool = True) -> list[dict]:
    """Each target of the row with the measured ratios and whether they are met (in time alone when
    memory was not measured)."""
    results = []
    for target in row.case.targets:
        reference = by_name.get(target.reference)
        time_ratio = _ratio(row.seconds, reference.seconds if reference else None)
        memory_ratio = _ratio(row.extra_peak_bytes, reference.extra_peak_bytes if reference else None)
        met = time_ratio is not None and time_ratio <= target.max_time
        max_memory = target.max_memory if memory else None
        if max_memory is not None:
            met = met and memory_ratio is not None and memory_ratio <= max_memory
        results.append(dict(reference=target.reference, max_time=target.max_time, max_memory=max_memory,
                            time_ratio=time_ratio, memory_ratio=memory_ratio, met=met))
    return results


def _describe_targets(results: list[dict]) -> str:
    parts = []
    for r in results:
        limit = f"<= {r['max_time']:g}x {r['reference']}"
        measured = f"time {_fmt_ratio(r['time_ratio'])}"
        if r["max_memory"] is not None:
            measured += f", memory {_fmt_ratio(r['memory_ratio'])}"
        parts.append(f"{'ok' if r['met'] else 'MISSED'} ({limit}: {measured})")
    return "; ".join(parts) or "-"


def summarise(setting: Setting, rows: Sequence[Row], memory: bool = True) -> dict:
    eager = {row.name: row for row in rows if not row.compiled}
    compiled = {row.name: row for row in rows if row.compiled}
    default, copy = eager[NNUNET_DEFAULT], eager[COPY]
    entries = []
    for name, row in eager.items():
        entry = dict(
            loss=name,
            error=row.error,
            median_ms=None if row.seconds is None else 1e3 * row.seconds,
            spread=relative_spread(row.times) if row.error is None else None,
            times_ms=[1e3 * t for t in row.times],
            extra_peak_mib=None if row.extra_peak_bytes is None else row.extra_peak_bytes / 2**20,
            time_vs_default=_ratio(row.seconds, default.seconds),
            time_vs_copy=_ratio(row.seconds, copy.seconds),
            memory_vs_default=_ratio(row.extra_peak_bytes, default.extra_peak_bytes),
            targets=evaluate_targets(row, eager, memory),
        )
        if name in compiled:
            c = compiled[name]
            entry.update(compiled_error=c.error, compiled_median_ms=None if c.seconds is None else 1e3 * c.seconds,
                         compiled_times_ms=[1e3 * t for t in c.times], compiled_vs_eager=_ratio(c.seconds, row.seconds),
                         compiled_check=c.check, compiled_graph_breaks=c.graph_breaks,
                         compiled_extra_peak_mib=None if c.extra_peak_bytes is None else c.extra_peak_bytes / 2**20)
        if row.profile:
            entry["profile"] = row.profile
        entries.append(entry)
    logits_bytes = torch.Size(setting.shape).numel() * torch.empty((), dtype=setting.dtype).element_size()
    return dict(shape=list(setting.shape), dtype=_dtype_name(setting.dtype), device=str(setting.device),
                label_dtype=_dtype_name(setting.label_dtype), nnunet_batch_dice=setting.batch_dice,
                logits_mib=logits_bytes / 2**20, results=entries)


def format_summary(summary: dict, compile: bool) -> str:
    header = ["loss", "ms", "spread", "x default", "x copy", "extra peak MiB", "mem x default", "target"]
    if compile:
        header += ["compiled ms", "compiled / eager", "compiled extra peak MiB", "graph breaks", "compiled value+grad"]
    rows = []
    for e in summary["results"]:
        if e["error"]:
            row = [e["loss"], f"error: {e['error']}"] + ["-"] * (len(header) - 2)
            rows.append(row)
            continue
        relative = e["spread"] if "spread" in e else relative_spread(e["times_ms"])  # older JSON files lack it
        spread = "-" if relative is None else f"{100 * relative:.0f}%"
        row = [e["loss"], f"{e['median_ms']:.1f}", spread, _fmt_ratio(e["time_vs_default"]), _fmt_ratio(e["time_vs_copy"]),
               "-" if e["extra_peak_mib"] is None else f"{e['extra_peak_mib']:.1f}", _fmt_ratio(e["memory_vs_default"]),
               _describe_targets(e["targets"])]
        if compile:
            if "compiled_median_ms" not in e:
                row += ["-"] * 5
            elif e["compiled_error"]:
                row += [f"BROKEN: {e['compiled_error']}"] + ["-"] * 4
            else:
                slower = e["compiled_vs_eager"] is not None and e["compiled_vs_eager"] > 1.0
                peak = e["compiled_extra_peak_mib"]
                row += [f"{e['compiled_median_ms']:.1f}", _fmt_ratio(e["compiled_vs_eager"]) + (" SLOWER" if slower else ""),
                        "-" if peak is None else f"{peak:.1f}", str(e["compiled_graph_breaks"]), e["compiled_check"] or "-"]
        rows.append(row)
    labels = summary.get("label_dtype", "int16")  # older JSON files: int16 label maps
    title = (f"### {tuple(summary['shape'])} {summary['dtype']} on {summary['device']}, {labels} labels "
             f"(logits {summary['logits_mib']:.1f} MiB; nnU-Net default with batch_dice={summary['nnunet_batch_dice']})")
    return title + "\n\n" + markdown_table(header, rows)


def format_target_overview(settings: Sequence[dict]) -> str:
    """One row per target and loss, one column per setting: the ratios side by side, and whether the
    target is met in every setting."""
    header = ["loss", "target"] + [f"{tuple(s['shape'])}" for s in settings] + ["met everywhere"]
    rows = []
    names = [e["loss"] for e in settings[0]["results"] if e["targets"]]
    for name in names:
        per_setting = [{e["loss"]: e for e in s["results"]}.get(name) for s in settings]
        for index, target in enumerate(per_setting[0]["targets"]):
            limit = f"<= {target['max_time']:g}x {target['reference']}" + (
                "" if target["max_memory"] is None else " (time and memory)")
            cells, met = [], True
            for entry in per_setting:
                result = entry["targets"][index] if entry and not entry["error"] else None
                if result is None:
                    cells.append("-")
                    met = False
                    continue
                cell = f"time {_fmt_ratio(result['time_ratio'])}"
                if result["max_memory"] is not None:
                    cell += f", mem {_fmt_ratio(result['memory_ratio'])}"
                cells.append(cell)
                met = met and result["met"]
            rows.append([name, limit] + cells + ["yes" if met else "NO"])
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------
# the size sweep: one table per goal, one row per size and label dtype; a plot of time per logit
# ----------------------------------------------------------------------------------------------
SWEEP_GOALS = (  # (title, the references of the targets it shows)
    ("Dice family <= 1.0x nnU-Net's Dice with the same batch handling", (NNUNET_DICE_I, NNUNET_DICE_BI)),
    ("mime <= 0.5x nnU-Net's default DC_and_CE_loss and <= 3x the copy floor", (NNUNET_DEFAULT, COPY)),
    ("LabelMarginalLoss <= 1.2x nnU-Net's CE", (NNUNET_CE,)),
)
SHORT_REFERENCE = {NNUNET_DICE_I: "Dice I", NNUNET_DICE_BI: "Dice BI", NNUNET_DEFAULT: "DC_and_CE",
                   COPY: "copy", NNUNET_CE: "CE"}


def _setting_name(summary: dict) -> str:
    batch, channels, *spatial = summary["shape"]
    return f"{batch}x{channels}x{'x'.join(map(str, spatial))} {summary.get('label_dtype', 'int16')}"


def _logits(summary: dict) -> int:
    return math.prod(summary["shape"])


def format_sweep_goal(settings: Sequence[dict], title: str, references: Sequence[str]) -> str:
    """One row per setting: the references' medians, then ``ratio ok|MISSED`` per loss and target."""
    columns = []  # (loss, target index, header)
    for entry in settings[0]["results"]:
        for index, target in enumerate(entry["targets"]):
            if target["reference"] in references:
                suffix = f" x {SHORT_REFERENCE[target['reference']]}" if len(references) > 1 else ""
                columns.append((entry["loss"], index, entry["loss"] + suffix))
    header = ["size, labels", "logits"] + [f"{SHORT_REFERENCE[r]} ms" for r in references] + [c[2] for c in columns]
    rows, missed, cells = [], 0, 0
    for summary in settings:
        by_name = {e["loss"]: e for e in summary["results"]}
        row = [_setting_name(summary), f"{_logits(summary) / 1e6:.1f}M"]
        row += [_ms(by_name.get(r)) for r in references]
        for loss, index, _ in columns:
            entry = by_name.get(loss)
            result = entry["targets"][index] if entry and not entry["error"] else None
            met = result is not None and result["met"]
            cells, missed = cells + 1, missed + (not met)
            row.append("-" if result is None else f"{_fmt_ratio(result['time_ratio'])} {'ok' if met else 'MISSED'}")
        rows.append(row)
    return f"#### {title}: met in {cells - missed} of {cells}\n\n" + markdown_table(header, rows)


def _ms(entry: Optional[dict]) -> str:
    return "-" if entry is None or entry["median_ms"] is None else f"{entry['median_ms']:.1f}"


def format_sweep(settings: Sequence[dict]) -> str:
    return "\n\n".join(format_sweep_goal(settings, title, refs) for title, refs in SWEEP_GOALS)


def plot_sweep(settings: Sequence[dict], path: str) -> None:
    """Time per logit (ns) against the number of logits (log x), one panel per label dtype, one line
    per loss; nnU-Net's references and the copy floor dashed."""
    from nnunet_losses.commands.output import pyplot, save_figure

    plt = pyplot()
    label_dtypes = sorted({s.get("label_dtype", "int16") for s in settings})
    fig, axes = plt.subplots(1, len(label_dtypes), figsize=(6.5 * len(label_dtypes), 5), sharey=True, squeeze=False)
    references = set(SHORT_REFERENCE)
    for axis, label_dtype in zip(axes[0], label_dtypes):
        chosen = sorted((s for s in settings if s.get("label_dtype", "int16") == label_dtype), key=_logits)
        for index, name in enumerate(e["loss"] for e in chosen[0]["results"]):
            points = [(_logits(s), e["median_ms"] * 1e6 / _logits(s)) for s in chosen for e in s["results"]
                      if e["loss"] == name and e["median_ms"] is not None]
            if points:  # tab20: one colour per line (the default cycle repeats after 10)
                axis.plot(*zip(*points), marker="o", markersize=3, label=name, color=plt.cm.tab20(index % 20),
                          linestyle="--" if name in references else "-", linewidth=2 if name in references else 1)
        axis.set(xscale="log", yscale="log", xlabel="logits per batch (B·C·voxels)", title=f"{label_dtype} label maps")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("forward+backward time per logit (ns)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    """A preset name or ``B,D,H,W`` / ``B,H,W`` (batch and spatial size; channels come from --classes)."""
    if text in SHAPE_PRESETS:
        return SHAPE_PRESETS[text]
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (3, 4) or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a preset ({', '.join(SHAPE_PRESETS)}) or B,H,W / B,D,H,W with positive sizes, got {text!r}")
    return (values[0], *values[1:]), len(values) == 3  # nnU-Net's planner: batch_dice True for 2d


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one markdown table per shape and dtype.")
    parser.add_argument("--device", default="all",
                        help="'cpu', 'cuda', 'cuda:N', or 'all': the CPU, then CUDA when a GPU is present. "
                             "Default: all")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="SHAPE",
                        help=f"presets ({', '.join(SHAPE_PRESETS)}) or B,H,W / B,D,H,W "
                             "(batch and spatial size). Default: 2d 3d_fullres")
    parser.add_argument("--classes", nargs="+", type=int, default=None, metavar="C",
                        help="numbers of classes (channels of the logits, background included). Default: 4 14")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                        help="logit dtypes; float16/bfloat16 run the loss under torch.autocast as nnU-Net's "
                             "train_step does. Default: float32 on CPU, float32 and bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per loss (the median is reported). "
                                                                  "Default: 7")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per loss first. Default: 2")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (quick2d, quick3d), 3 classes, 3 repeats, 1 warm-up: a smoke run in "
                             "seconds; explicit --shapes/--classes/--repeats/--warmup still win")
    parser.add_argument("--sweep", action="store_true",
                        help="the size sweep instead of --shapes/--classes: 2d batches 12xCx128^2 ... 12xCx512^2 and 3d "
                             "2xCx64^3 ... 2xCx160^3 for C = 4 and 14, int16/int64/float32 label maps, time only (no "
                             "memory run), nnU-Net's rows but not MONAI's; prints one table per goal. With --quick: "
                             "8 of its sizes, 3 repeats")
    parser.add_argument("--label-dtype", nargs="+", choices=list(LABEL_DTYPES), default=None,
                        help="dtypes of the label map. Default: int16 (nnU-Net's dataloader), with --sweep int16 "
                             "int64 float32")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="with --sweep (or --from-json of a sweep): also plot time per logit against the number "
                             "of logits to this file")
    parser.add_argument("--compile", action="store_true",
                        help="also run every loss through torch.compile (nnU-Net's default loss: its Dice part, "
                             "as nnUNetTrainer compiles it) and report compiled time and whether value and "
                             "gradient equal the eager ones")
    parser.add_argument("--losses", nargs="+", default=None, metavar="SUBSTRING",
                        help="only the losses whose name contains one of these (case-insensitive); the "
                             "baselines (copy, nnU-Net, MONAI) always run")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, print torch.profiler's operator table (time and memory per operator) "
                             "of one forward+backward of every selected loss; narrow it down with --losses")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every measurement to this JSON file "
                                                                    "(after every setting)")
    parser.add_argument("--resume", action="store_true",
                        help="with --json: keep the settings an earlier, interrupted run measured into OUT and measure the "
                             "rest (refused unless OUT has the same losses and options, settings that this command "
                             "plans too, this machine, torch, nnunetv2 and nnunet_losses source); a missing OUT "
                             "starts afresh; --from-json OUT prints every setting's table again")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--from-json", metavar="IN", default=None,
                        help="print the tables of an earlier --json file and exit (no measurement)")
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    if args.sweep:
        _resolve_sweep(args)
    else:
        defaults = dict(shapes=["2d", "3d_fullres"], classes=[4, 14], repeats=7, warmup=2, label_dtype=["int16"])
        for key, value in defaults.items():
            if getattr(args, key) is None:
                chosen = QUICK.get(key, value) if args.quick else value
                setattr(args, key, [parse_shape(s) for s in chosen] if key == "shapes" else chosen)
        # (batch, *spatial), batch_dice, classes
        args.plans = [(shape, batch_dice, c) for shape, batch_dice in args.shapes for c in args.classes]
    if args.resume and not args.json:
        raise SystemExit("expected --json OUT with --resume (the file to continue), got --resume alone")
    if args.plot and not args.sweep:
        raise SystemExit("expected --sweep with --plot (the plot is of the size sweep), got --plot alone")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"expected --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if min(plan[2] for plan in args.plans) < 2:
        raise SystemExit(f"expected --classes >= 2 (background and at least one class), got {args.classes}")
    if args.device == "all":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"expected a CUDA device for --device {args.device}, got none (torch.cuda.is_available() "
                             "is False); use --device cpu")
        args.devices = [args.device]
    return args


def _resolve_sweep(args: argparse.Namespace) -> None:
    if args.shapes is not None or args.classes is not None:
        raise SystemExit("expected --sweep without --shapes/--classes (the sweep has its own sizes), got them together")
    defaults = SWEEP_QUICK_DEFAULTS if args.quick else SWEEP_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = SWEEP_QUICK if args.quick else SWEEP
    # nnU-Net's planner: batch_dice True for 2d, False for 3d_fullres
    args.plans = [((batch, *spatial), len(spatial) == 2, classes) for batch, classes, spatial in sizes]
    args.classes = sorted({classes for _, classes, _ in sizes})


def select_cases(cases: Sequence[Case], patterns: Optional[Sequence[str]]) -> list[Case]:
    if not patterns:
        return list(cases)
    baselines = {COPY, NNUNET_DEFAULT, NNUNET_DICE_I, NNUNET_DICE_BI, NNUNET_CE, MONAI_DICE_CE}
    chosen = [c for c in cases if c.name in baselines or any(p.lower() in c.name.lower() for p in patterns)]
    if all(c.name in baselines for c in chosen):  # not a count: without MONAI there is one baseline less
        names = [c.name for c in cases if c.name not in baselines]
        raise SystemExit(f"expected --losses to match one of {names}, got {list(patterns)}")
    return chosen


def print_report(path: str, plot: Optional[str] = None) -> int:
    """Print the tables of an earlier ``--json`` file again (for the README), measuring nothing; a sweep's
    plot is drawn again to ``plot``."""
    import json

    with open(path) as f:
        report = json.load(f)
    print(f"Machine: {describe_machine(report['machine'])}")
    print(f"Command: {report['command']}")
    for summary in report["settings"]:
        print("\n" + format_summary(summary, report["compile"]))
    print_overview(report)
    print(f"\nLoad average at the end: {report['machine'].get('load_average_at_end')}")
    if plot:
        if not report.get("sweep"):
            raise SystemExit(f"expected a --sweep JSON file for --plot, got {path}")
        plot_sweep(report["settings"], plot)
    return 0


def print_overview(report: dict) -> None:
    """The targets across settings: one table per goal for the sweep, the target overview otherwise."""
    if report.get("sweep"):
        print("\n### Size sweep\n\n" + format_sweep(report["settings"]))
    else:
        print("\n### Targets\n\n" + format_target_overview(report["settings"]))


def planned_settings(args: argparse.Namespace):
    """Every Setting of the run, in the order measured: device, size, classes, dtype, label dtype."""
    for device in args.devices:
        dtypes = args.dtype or (["float32", "bfloat16"] if device.startswith("cuda") else ["float32"])
        for batch_spatial, batch_dice, num_classes in args.plans:
            for dtype in dtypes:
                for label_dtype in args.label_dtype:
                    yield Setting(batch_spatial[0], num_classes, tuple(batch_spatial[1:]), batch_dice, DTYPES[dtype],
                                  torch.device(device), LABEL_DTYPES[label_dtype])


# what must agree for an earlier --json file to be continued: the measurement, the machine and the code it ran
RESUME_RUN_KEYS = ("sweep", "repeats", "warmup", "compile")
RESUME_MACHINE_KEYS = ("cpu", "cpu_cores", "torch_threads", "torch", "nnunetv2", "gpu")


def setting_key(setting) -> tuple:
    """What identifies one setting, for a ``Setting`` and for its summary in a ``--json`` file alike."""
    if isinstance(setting, Setting):
        return (tuple(setting.shape), _dtype_name(setting.dtype), str(setting.device), _dtype_name(setting.label_dtype))
    return (tuple(setting["shape"]), setting["dtype"], setting["device"], setting.get("label_dtype", "int16"))


def resumed_report(path: str, report: dict, plan: Sequence[Setting], loss_names: Sequence[str]) -> dict:
    """The report in ``path`` of an earlier run of the same measurement, to be continued: its settings kept, its
    machine and wall time carried on (see :func:`refuse_unless_resumable`)."""
    import json

    with open(path) as f:
        earlier = json.load(f)
    refuse_unless_resumable(path, earlier, report, plan, loss_names)
    if report["command"] not in earlier["command"]:
        earlier["command"] += f" (resumed: {report['command']})"
    earlier["machine"].setdefault("load_average_at_resume", []).append(report["machine"]["load_average"])
    return earlier


def refuse_unless_resumable(path: str, earlier: dict, report: dict, plan: Sequence[Setting],
                            loss_names: Sequence[str]) -> None:
    """SystemExit unless ``earlier`` measured the same losses with the same options, on this machine and
    with the same package source, settings this plan has (it may have more): otherwise ratios that cannot
    be compared would sit side by side in one table."""
    for key in RESUME_RUN_KEYS:
        if earlier.get(key) != report[key]:
            raise SystemExit(f"expected {path} to hold a run with {key}={report[key]!r} to resume, "
                             f"got {key}={earlier.get(key)!r}")
    for key in RESUME_MACHINE_KEYS:
        if earlier.get("machine", {}).get(key) != report["machine"].get(key):
            raise SystemExit(f"expected {path} to be measured on this machine to resume ({key} "
                             f"{report['machine'].get(key)!r}), got {earlier.get('machine', {}).get(key)!r}")
    fingerprint = earlier.get("source", {}).get("package_sha256")
    if fingerprint != report["source"]["package_sha256"]:
        raise SystemExit(f"expected {path} to be measured with this nnunet_losses source to resume (package_sha256 "
                         f"{report['source']['package_sha256']}), got {fingerprint}")
    planned = {setting_key(setting) for setting in plan}
    for summary in earlier["settings"]:
        if setting_key(summary) not in planned:
            raise SystemExit(f"expected {path} to hold only settings of this command to resume, got "
                             f"{summary['shape']} {summary['dtype']} with {setting_key(summary)[3]} labels")
        losses = sorted(entry["loss"] for entry in summary["results"])
        if losses != sorted(loss_names):
            raise SystemExit(f"expected {path} to have measured the losses {sorted(loss_names)} to resume, "
                             f"got {losses}")


def measure_plan(args: argparse.Namespace, cases: Sequence[Case], plan: Sequence[Setting], report: dict,
                 wall_s: Callable[[], float]) -> None:
    """Measure every setting of ``plan`` that ``report`` does not hold yet, adding each summary to it, in the
    plan's order, and writing ``--json`` after each (an interrupted long run keeps what it measured)."""
    measured = {setting_key(summary) for summary in report["settings"]}
    order = {setting_key(setting): i for i, setting in enumerate(plan)}
    for setting in plan:
        if setting_key(setting) in measured:
            continue
        rows = measure(setting, cases, args.repeats, args.warmup, args.compile, progress=not args.no_progress,
                       profile=args.profile, memory=not args.sweep)
        summary = summarise(setting, rows, memory=not args.sweep)
        report["settings"].append(summary)
        report["settings"].sort(key=lambda summary: order[setting_key(summary)])  # a resumed file's too
        print("\n" + format_summary(summary, args.compile), flush=True)
        for entry in summary["results"]:
            if entry.get("profile"):
                print(f"\n#### torch.profiler: {entry['loss']}\n\n{entry['profile']}", flush=True)
        report["wall_s"] = wall_s()
        if args.json:
            write_json(report, args.json)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json and args.resume:
        raise SystemExit("expected --resume with --json (a run to continue), got it with --from-json (which measures "
                         "nothing)")
    if args.from_json:
        return print_report(args.from_json, args.plot)
    args = resolve_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = select_cases(build_cases(monai=not args.sweep), args.losses)
    machine = machine_info(args.devices[-1])
    print(f"Machine: {describe_machine(machine)}", flush=True)
    report = dict(machine=machine, command=" ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
                  repeats=args.repeats, warmup=args.warmup, compile=args.compile, sweep=args.sweep,
                  source={**source_version(), "package_sha256": package_fingerprint()}, settings=[])
    plan = list(planned_settings(args))
    if args.resume and os.path.exists(args.json):
        report = resumed_report(args.json, report, plan, [case.name for case in cases])
        print(f"Resuming {args.json}: {len(report['settings'])} of {len(plan)} settings measured, "
              f"{len(plan) - len(report['settings'])} to go", flush=True)
    started, wall_before = time.perf_counter(), report.get("wall_s", 0.0)

    def wall_s() -> float:  # of every run of the report, resumed ones included
        return round(wall_before + time.perf_counter() - started, 1)

    measure_plan(args, cases, plan, report, wall_s)
    print_overview(report)
    report["machine"]["load_average_at_end"] = machine_info(args.devices[-1])["load_average"]
    report["wall_s"] = wall_s()
    print(f"\nLoad average at the end: {report['machine']['load_average_at_end']}; {report['wall_s']} s")
    if args.json:
        write_json(report, args.json)
        print(f"Wrote {args.json}")
    if args.plot:
        plot_sweep(report["settings"], args.plot)
        print(f"Wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
