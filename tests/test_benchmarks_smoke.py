"""Smoke run of the benchmarks: they run and report every loss and trainer of the package.

No timing assertions: speed is measured by ``benchmarks/``, never by tests.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_losses
from nnunet_losses.losses._options import PHIS
from nnunet_losses.losses.label_marginal import PENALTIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _loss_classes():
    return sorted(name for name in nnunet_losses.__all__
                  if isinstance(getattr(nnunet_losses, name), type)
                  and issubclass(getattr(nnunet_losses, name), torch.nn.Module))


def test_quick_loss_benchmark_reports_every_loss(tmp_path):
    out = tmp_path / "losses.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_losses.py"), "--quick", "--shapes", "quick2d", "--repeats", "1",
         "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["shape"] == [4, 3, 48, 48]  # quick2d with --quick's 3 classes
    results = {entry["loss"]: entry for entry in setting["results"]}

    expected = [f"PhiDiceLoss(phi={phi})" for phi in PHIS] + [f"LabelMarginalLoss({p})" for p in PENALTIES]
    for cls in _loss_classes():  # a loss added to the package without a benchmark row fails here
        expected += [name for name in results if name.split("(")[0] == cls] or [cls]
    expected += ["copy floor: x.clone()", "nnU-Net default: DC_and_CE_loss", "nnU-Net Dice, batch_dice=False",
                 "nnU-Net Dice, batch_dice=True", "nnU-Net CE"]
    for name in expected:
        assert name in results, f"{name} missing from the benchmark"
        entry = results[name]
        assert entry["error"] is None, f"{name}: {entry['error']}"
        assert entry["median_ms"] > 0 and entry["extra_peak_mib"] > 0
        assert f"| {name} |" in completed.stdout  # the printed table has the row
    # MONAI is the `bench` extra: measured where installed, else said so
    monai = results["MONAI DiceCELoss"]
    assert monai["error"] is None or "not installed" in monai["error"]

    # the CPU memory measurement, checked on the one case with a known answer: a copy allocates exactly
    # one tensor of the logits' size (4*3*48*48 float32 = 110592 bytes) and nothing else
    assert results["copy floor: x.clone()"]["extra_peak_mib"] * 2**20 == 4 * 3 * 48 * 48 * 4


def test_size_sweep_reports_every_goal_per_size_and_label_dtype(tmp_path, monkeypatch, capsys):
    """--sweep on two tiny sizes (patched in): one setting per size and label dtype, time only, one table
    per goal with a ratio and ok/MISSED per cell, the plot written, and --from-json prints the same."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_losses

    monkeypatch.setattr(bench_losses, "SWEEP_QUICK", [(2, 3, (8, 8)), (1, 3, (4, 4, 4))])
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert bench_losses.main(["--sweep", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                              "--label-dtype", "int16", "float32", "--no-progress", "--losses", "PhiDiceLoss(phi=I)",
                              "MimeLoss", "LabelMarginalLoss(l1)", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert [(s["shape"], s["label_dtype"]) for s in report["settings"]] == [
        ([2, 3, 8, 8], "int16"), ([2, 3, 8, 8], "float32"), ([1, 3, 4, 4, 4], "int16"), ([1, 3, 4, 4, 4], "float32")]
    for setting in report["settings"]:
        results = {e["loss"]: e for e in setting["results"]}
        assert "MONAI DiceCELoss" not in results and results["MimeLoss"]["extra_peak_mib"] is None  # time only
        assert all(e["error"] is None and e["median_ms"] > 0 for e in results.values())
    printed = capsys.readouterr().out
    for title, _ in bench_losses.SWEEP_GOALS:
        assert f"#### {title}: met in " in printed
    assert "| 2x3x8x8 float32 |" in printed and ("x ok |" in printed or "x MISSED |" in printed)
    assert plot.stat().st_size > 0
    assert bench_losses.main(["--from-json", str(out)]) == 0
    assert printed.split("### Size sweep")[1].split("Load average")[0] in capsys.readouterr().out


def test_size_sweep_resumes_an_interrupted_run_and_refuses_another_one(tmp_path, monkeypatch, capsys):
    """--resume keeps the settings an interrupted sweep wrote and measures only the rest, in the plan's order;
    it refuses a file of other options, losses, machine or package source, naming both values."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_losses

    sizes = [(2, 3, (8, 8)), (1, 3, (4, 4, 4))]
    out = tmp_path / "sweep.json"
    command = ["--sweep", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--label-dtype", "int16",
               "--no-progress", "--losses", "MimeLoss", "--json", str(out), "--resume"]
    measure, measured = bench_losses.measure, []

    def interrupted_after_one(setting, *args, **kwargs):
        if measured:
            raise KeyboardInterrupt
        measured.append(setting.shape)
        return measure(setting, *args, **kwargs)

    # the first part measured the sizes in the other order: the resumed file must still end in the plan's
    monkeypatch.setattr(bench_losses, "SWEEP_QUICK", sizes[::-1])
    monkeypatch.setattr(bench_losses, "measure", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        bench_losses.main(command)
    first = json.loads(out.read_text())
    assert [s["shape"] for s in first["settings"]] == [[1, 3, 4, 4, 4]] and "wall_s" in first
    first["wall_s"] = 1000.0  # a long first part, to see the resumed run carry its wall time on
    out.write_text(json.dumps(first))

    def recorded(setting, *args, **kwargs):
        measured.append(setting.shape)
        return measure(setting, *args, **kwargs)

    monkeypatch.setattr(bench_losses, "SWEEP_QUICK", sizes)
    monkeypatch.setattr(bench_losses, "measure", recorded)
    started = time.perf_counter()
    assert bench_losses.main(command) == 0
    elapsed = time.perf_counter() - started
    assert measured == [(1, 3, 4, 4, 4), (2, 3, 8, 8)]  # each size once: the first before the interruption
    assert "Resuming " in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"][1] == first["settings"][0]  # kept as measured, not measured again
    assert [s["shape"] for s in report["settings"]] == [[2, 3, 8, 8], [1, 3, 4, 4, 4]]
    assert 1000.0 <= report["wall_s"] <= 1000.0 + elapsed + 0.1
    assert len(report["machine"]["load_average_at_resume"]) == 1
    assert bench_losses.main(command) == 0 and len(measured) == 2  # nothing left to run

    with pytest.raises(SystemExit, match=r"with repeats=2 to resume, got repeats=1"):
        bench_losses.main([*command[:4], "--repeats", "2", *command[6:]])
    with pytest.raises(SystemExit, match=r"to have measured the losses .*'PhiDiceLoss\(phi=I\)'.*, got "):
        bench_losses.main([*command[:-4], "MimeLoss", "PhiDiceLoss(phi=I)", *command[-3:]])
    with pytest.raises(SystemExit, match=r"only settings of this command to resume, got \[2, 3, 8, 8\] float32 "
                                         r"with int16 labels"):
        bench_losses.main([*command[:9], "float32", *command[10:]])
    with pytest.raises(SystemExit, match=r"expected --json OUT with --resume .*, got --resume alone"):
        bench_losses.main([*command[:-3], "--resume"])
    with pytest.raises(SystemExit, match=r"expected --resume with --json .*, got it with --from-json"):
        bench_losses.main(["--from-json", str(out), "--resume"])
    for section, key, value, shown in [("source", "package_sha256", "0123abcd", "got 0123abcd"),
                                       ("machine", "cpu", "another CPU", r"\(cpu .*\), got 'another CPU'")]:
        changed = json.loads(json.dumps(report))
        changed[section][key] = value
        out.write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match=r"to resume .*" + shown):
            bench_losses.main(command)
    assert len(measured) == 2  # every refusal before measuring


def test_training_benchmark_names_trainers_nnunet_finds(monkeypatch):
    # the trainer list of bench_training.py is docs/losses.md §6; a renamed trainer would silently drop out
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("nnUNet_extTrainer", os.environ.get("nnUNet_extTrainer", ""))  # restored afterwards
    import bench_training

    assert len(bench_training.TRAINERS) == 16  # 11 single losses, 5 Dice + CE compounds
    assert bench_training.missing_trainers([bench_training.BASELINE, *bench_training.TRAINERS]) == []
    assert bench_training.short_run_name("nnUNetTrainerMime", 4, 20) == "nnUNetTrainerMime_4ep_20it"


# ----------------------------------------------------------------------------------------------
# bench_quality.py: the plan, resuming, the summary and the datasets (no nnU-Net training here)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("nnUNet_extTrainer", os.environ.get("nnUNet_extTrainer", ""))  # restored afterwards
    import bench_quality

    return bench_quality


def _record(dataset, trainer, budget, repeat, dice, mean, curve=(0.2, 0.4), seconds=30.0):
    epochs, iterations = (int(v) for v in budget.split("x"))
    return dict(dataset=dataset, trainer=trainer, budget=budget, repeat=repeat, epochs=epochs, iterations=iterations,
                classes=list(dice), test_dice=dict(dice), test_dice_mean=mean,
                wall_seconds={"train": seconds / 2, "total": seconds},
                curve={"iterations": [iterations * (e + 1) for e in range(len(curve))], "mean_fg_dice": list(curve)},
                device="cpu", machine={"cpu": "Test CPU", "cpu_cores": 2, "torch": "2.x", "nnunetv2": "2.8"})


def test_quality_plan_runs_every_trainer_budget_and_repeat(quality):
    from nnunet_losses.trainers import TRAINER_NAMES

    # the default campaign: nnU-Net's three references and every trainer of ours, each with a family reference
    assert quality.DEFAULT_TRAINERS == ("nnUNetTrainer", "nnUNetTrainerDiceLoss", "nnUNetTrainerCELoss", *TRAINER_NAMES)
    assert set(quality.FAMILY_REFERENCE) == set(TRAINER_NAMES)
    assert quality.FAMILY_REFERENCE["nnUNetTrainerCEKL"] == "nnUNetTrainerCELoss"
    assert quality.FAMILY_REFERENCE["nnUNetTrainerNegativeMime"] == "nnUNetTrainerDiceLoss"
    assert [quality.parse_budget(b).label for b in quality.split_list([quality.DEFAULT_BUDGETS])] == ["5x25", "20x25"]
    # trainer names are split on spaces only: per-class values in a name hold commas
    assert quality.split_list(["nnUNetTrainer nnUNetTrainerMime_a1.9,1,0.5", "nnUNetTrainer"], separator=None) == \
        ["nnUNetTrainer", "nnUNetTrainerMime_a1.9,1,0.5"]

    runs = quality.plan_runs(["synthetic2d", "synthetic3d"], ["nnUNetTrainer", "nnUNetTrainerMime_sgd"],
                             [quality.Budget(20, 25), quality.Budget(5, 25)], repeats=2)
    assert len(runs) == 2 * 2 * 2 * 2 and len({run.key for run in runs}) == 16
    # the smaller budget first, repeat by repeat, every dataset and trainer in each block
    assert [run.key for run in runs[:5]] == [("synthetic2d", "nnUNetTrainer", "5x25", 0),
                                             ("synthetic2d", "nnUNetTrainerMime_sgd", "5x25", 0),
                                             ("synthetic3d", "nnUNetTrainer", "5x25", 0),
                                             ("synthetic3d", "nnUNetTrainerMime_sgd", "5x25", 0),
                                             ("synthetic2d", "nnUNetTrainer", "5x25", 1)]
    assert runs[-1].key == ("synthetic3d", "nnUNetTrainerMime_sgd", "20x25", 1)
    assert runs[1].run_name == "nnUNetTrainerMime_sgd_5ep_25it" and runs[-1].run_name.endswith("_20ep_25it")

    with pytest.raises(ValueError, match=r"expected EPOCHSxITERATIONS with both >= 1, such as 5x25, got '5x0'"):
        quality.parse_budget("5x0")
    with pytest.raises(ValueError, match=r"expected names without an epochs/iterations token .*, got 'nnUNetTrainer_5"):
        quality.check_trainer_has_no_budget("nnUNetTrainer_5ep")
    quality.check_trainer_has_no_budget("nnUNetTrainerMime_a1.5_adam")  # other tokens are the user's experiment


def test_quality_default_campaign_names_are_found_by_nnunet(quality):
    runs = quality.plan_runs(["synthetic2d"], list(quality.DEFAULT_TRAINERS), [quality.Budget(5, 25)], repeats=1)
    assert len(runs) == 19  # nnU-Net's 3 references and our 16 trainers
    assert quality.missing_trainers([run.run_name for run in runs]) == []


def test_quality_resumes_skipping_finished_and_retrying_failed_runs(quality, tmp_path, monkeypatch, capsys):
    results = tmp_path / "quality.json"
    runs = quality.plan_runs(["synthetic2d"], ["nnUNetTrainer", "nnUNetTrainerMime"], [quality.Budget(1, 2)], 2)
    finished = _record("synthetic2d", "nnUNetTrainerMime", "1x2", 0, {"organ": 0.5}, 0.5)
    quality.store_record(results, finished)  # a run of an earlier session
    assert quality.pending_runs(runs, quality.load_results(results)) == [runs[0], runs[2], runs[3]]

    executed = []

    def fake_execute(run, work, raw, args):
        executed.append(run.key)
        if run.key == ("synthetic2d", "nnUNetTrainer", "1x2", 1) and len(executed) < 4:
            raise RuntimeError("nnUNetv2_train exited with 1")
        return _record(*run.key, {"organ": 0.7}, 0.7)

    monkeypatch.setattr(quality, "execute_run", fake_execute)
    monkeypatch.setattr(quality, "prepare_dataset", lambda work, spec, processes: tmp_path / "raw" / spec.key)
    monkeypatch.setattr(quality, "describe_dataset", lambda spec, folder: {"spec": {"key": spec.key}})
    args = argparse.Namespace(work_dir=tmp_path, results=results, planning_processes=1, device="cpu",
                              keep_checkpoints=False)

    assert quality.run_campaign(runs, args) == 1  # one failed run
    assert executed == [runs[0].key, runs[2].key, runs[3].key]  # the finished run was skipped
    stored = quality.load_results(results)
    assert sorted(quality.record_key(r) for r in stored["runs"]) == sorted([runs[0].key, runs[1].key, runs[3].key])
    assert [quality.record_key(f) for f in stored["failures"]] == [runs[2].key]
    assert stored["datasets"] == {"synthetic2d": {"spec": {"key": "synthetic2d"}}}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed
    out = capsys.readouterr().out
    assert "1 of 4 runs already done" in out and "FAILED (retried on the next call)" in out
    assert "4 of 4 done" not in out and "3 of 4 done, ETA" in out

    assert quality.run_campaign(runs, args) == 0  # the next call: only the failed run again
    assert executed[3:] == [runs[2].key]
    stored = quality.load_results(results)
    assert len(stored["runs"]) == 4 and stored["failures"] == []
    assert quality.run_campaign(runs, args) == 0 and len(executed) == 4  # all done: nothing runs

    # a different dataset under the same name stops the campaign instead of mixing runs
    with pytest.raises(SystemExit, match="expected dataset synthetic2d as the finished runs"):
        quality.store_dataset(results, "synthetic2d", {"spec": {"key": "synthetic2d", "seed": 1}})


def test_quality_dry_run_prints_the_plan_and_what_is_done(quality, tmp_path, capsys):
    results = tmp_path / "quality.json"
    quality.store_record(results, _record("synthetic2d", "nnUNetTrainer", "1x2", 1, {"organ": 0.5}, 0.5, seconds=40))
    assert quality.main(["--dry-run", "--trainers", "nnUNetTrainer", "nnUNetTrainerMime", "--budgets", "1x2",
                         "--repeats", "2", "--datasets", "synthetic2d", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| 3 | synthetic2d | nnUNetTrainer_1ep_2it | 1 | done |" in out
    assert "| 4 | synthetic2d | nnUNetTrainerMime_1ep_2it | 1 | to run |" in out
    # 3 pending runs of the dataset and budget of the finished one (40 s): 2 minutes
    assert "1 of 4 runs done" in out and "3 to run; expected time of the rest: 2m" in out
    with pytest.raises(SystemExit, match=r"--datasets: expected names among \['synthetic2d', 'synthetic3d'\], got"):
        quality.main(["--dry-run", "--datasets", "x", "--results", str(results)])


def test_quality_estimates_the_time_of_pending_runs(quality):
    records = [_record("synthetic2d", "nnUNetTrainer", "2x5", 0, {"organ": 0.5}, 0.5, seconds=30.0),
               _record("synthetic2d", "nnUNetTrainer", "2x5", 1, {"organ": 0.5}, 0.5, seconds=50.0)]
    same, longer = (quality.Run("synthetic2d", "nnUNetTrainerMime", quality.Budget(*b), 0) for b in ((2, 5), (4, 5)))
    other = quality.Run("synthetic3d", "nnUNetTrainer", quality.Budget(2, 5), 0)
    assert quality.estimate_seconds(same, records) == 40.0  # the mean of the same dataset and budget
    assert quality.estimate_seconds(longer, records) == 80.0  # 40 s / 10 iterations x 20 iterations
    assert quality.estimate_seconds(other, records) is None
    assert quality.remaining_seconds([same, longer], records) == 120.0
    assert quality.remaining_seconds([same, other], records) is None
    assert [quality.format_duration(s) for s in (45, 720, 3 * 3600 + 300)] == ["45s", "12m", "3h05m"]


def test_quality_summary_table_by_hand(quality, tmp_path):
    dice = lambda organ, lesion: {"organ": organ, "lesion": lesion}  # noqa: E731
    records = [
        _record("synthetic2d", "nnUNetTrainerCEL1", "2x3", 0, dice(0.90, 0.60), 0.75),
        _record("synthetic2d", "nnUNetTrainerCEL1", "2x3", 1, dice(0.92, None), 0.92, curve=(0.4, None)),
        _record("synthetic2d", "nnUNetTrainerMime", "2x3", 0, dice(0.88, 0.50), 0.69),
        _record("synthetic2d", "nnUNetTrainerMime", "2x3", 1, dice(0.88, 0.60), 0.74),
        _record("synthetic2d", "nnUNetTrainerDiceLoss", "2x3", 0, dice(0.85, 0.55), 0.70),
        _record("synthetic2d", "nnUNetTrainerDiceICE", "2x3", 0, dice(0.88, 0.60), 0.74),
        *[_record("synthetic2d", "nnUNetTrainer", "2x3", r, dice(0.8 + r / 10, 0.5 + r / 10), 0.65 + r / 10)
          for r in range(3)],
        _record("synthetic2d", "nnUNetTrainer", "1x2", 0, dice(0.3, 0.0), 0.15),
        _record("synthetic2d", "nnUNetTrainerMime", "1x2", 0, dice(0.4, 0.0), 0.2),
    ]
    results = dict(quality.empty_results(), runs=records)
    text = quality.summary_markdown(results)
    lines = text.splitlines()
    # nnUNetTrainer: organ 0.8, 0.9, 1.0 -> mean 0.9, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert "| nnUNetTrainer | 3 | 0.900 ± 0.100 | 0.600 ± 0.100 | 0.750 ± 0.100 | - | - |" in lines
    # one run: no std; the gap to nnUNetTrainer's mean in brackets; references are not checked
    assert "| nnUNetTrainerDiceLoss | 1 | 0.850 (-0.050) | 0.550 (-0.050) | 0.700 (-0.050) | - | - |" in lines
    # lesion 0.5, 0.6 -> 0.55 ± 0.0707, 0.05 below nnUNetTrainer (> 0.03: missed); mean 0.715 >= DiceLoss's 0.700
    assert ("| nnUNetTrainerMime | 2 | 0.880 ± 0.000 (-0.020) | 0.550 ± 0.071 (-0.050) | 0.715 ± 0.035 (-0.035) "
            "| MISSED: lesion -0.050 | ok (+0.015) |") in lines
    # a class without Dice in one run (None: both empty) is left out of that class's mean; no CELoss run: pending
    assert ("| nnUNetTrainerCEL1 | 2 | 0.910 ± 0.014 (+0.010) | 0.600 (+0.000) | 0.835 ± 0.120 (+0.085) | ok "
            "| pending (nnUNetTrainerCELoss not run) |") in lines
    # a compound has the first check only (0.88 vs 0.9, 0.60 vs 0.6: within 0.03), not the family's
    assert "| nnUNetTrainerDiceICE | 1 | 0.880 (-0.020) | 0.600 (+0.000) | 0.740 (-0.010) | ok | - |" in lines
    larger = lines.index("#### synthetic2d, 2x3 (epochs x iterations) (decides the targets)")
    rows = [line.split(" | ")[0] for line in lines[larger:] if line.startswith("| nnUNetTrainer")]
    assert rows == ["| nnUNetTrainer", "| nnUNetTrainerDiceLoss", "| nnUNetTrainerMime", "| nnUNetTrainerCEL1",
                    "| nnUNetTrainerDiceICE"]
    # the smaller budget first; the largest decides the targets
    assert lines.index("#### synthetic2d, 1x2 (epochs x iterations)") < lines.index(
        "#### synthetic2d, 2x3 (epochs x iterations) (decides the targets)")
    assert ("Targets at 2x3: within 0.03 of nnUNetTrainer: 2 of 3 ok; ≥ family's nnU-Net trainer: 1 of 1 ok, "
            "1 pending.") in lines
    assert ("| nnUNetTrainerMime | 1 | 0.400 (+0.100) | 0.000 (+0.000) | 0.200 (+0.050) | ok "
            "| pending (nnUNetTrainerDiceLoss not run) |") in lines

    # the curves: mean over repeats per epoch, an epoch without a value left out of that epoch's mean
    iterations, values = quality.mean_curve(records[:2])
    assert iterations == [3, 6] and values[0] == pytest.approx(0.3) and values[1] == pytest.approx(0.4)

    # the curves' panels: one per family of our trainers, nnU-Net's three in each
    assert [quality.plot_family(t) for t in ("nnUNetTrainer", "nnUNetTrainerDiceLoss", "nnUNetTrainerDiceBI",
                                             "nnUNetTrainerNegativeMime_cwfixed", "nnUNetTrainerCEKL_lam0.5",
                                             "nnUNetTrainerLeafDiceCE", "nnUNetTrainerLeafDice")] == \
        [None, None, "Dice only", "mimes", "CE + label-marginal penalty", "Dice + CE", "Dice only"]

    path = tmp_path / "quality.json"
    quality.write_json(results, path)
    assert quality.write_summary(path) == text
    assert path.with_suffix(".md").read_text() == text
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="expected finished runs in .*, got none"):
        quality.main(["--summarize", "--results", str(tmp_path / "none.json")])
    # a trainer of neither family (a scratch subclass on nnUNet_extTrainer) is drawn in every panel, in a colour
    # of its own: it once stopped the summary with a KeyError
    scratch = dict(records[0], trainer="nnUNetTrainerMimeXramp")
    quality.write_json(dict(results, runs=results["runs"] + [scratch]), path)
    assert quality.plot_family("nnUNetTrainerMimeXramp") is None
    assert "| nnUNetTrainerMimeXramp | 1 |" in quality.write_summary(path)
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_onsets_count_the_runs_that_found_each_class(quality):
    # vessel: found in epoch 2 of run 0 (0.49 is not yet found), never in run 1; lesion: epochs 0 and 1
    runs = []
    curves = [((0.5, 0.9, 0.2), (0.0, 0.49, 0.6)), ((0.1, 0.7, None), (0.0, 0.0, 0.0))]  # (lesion, vessel) per run
    for repeat, (lesion, vessel) in enumerate(curves):
        record = _record("synthetic3d", "nnUNetTrainerCELoss", "3x2", repeat, {"lesion": 0.6, "vessel": 0.3}, 0.45)
        record["curve"]["dice_per_class"] = {"lesion": list(lesion), "vessel": list(vessel)}
        runs.append(record)
    assert [quality.first_epoch_found(v) for v in ([0.0, 0.49, 0.6], [None, 0.5], [0.2])] == [2, 1, None]
    assert quality.format_onsets(runs, "vessel") == "1 of 2 (epochs 2)"
    assert quality.format_onsets(runs, "lesion") == "2 of 2 (epochs 0, 1)"
    # a run stored before per-class curves were logged is left out of the count, not counted as never found
    older = _record("synthetic3d", "nnUNetTrainerCELoss", "3x2", 2, {"lesion": 0.6, "vessel": 0.3}, 0.45)
    text = quality.summary_markdown(dict(quality.empty_results(), runs=runs + [older]))
    assert "| nnUNetTrainerCELoss | 2 of 2 (epochs 0, 1) | 1 of 2 (epochs 2) |" in text.splitlines()
    assert quality.onset_table({"nnUNetTrainerCELoss": [older]}) is None


def _nnunet_summary(cases):
    """A summary.json as nnU-Net's compute_metrics_on_folder writes it: ``cases`` maps a case to
    ``{label: (Dice, n_pred, n_ref)}``; the mean is taken over the cases (Dice: of those that have one)."""
    per_case = [{"prediction_file": f"/p/{case}.nii.gz",
                 "metrics": {label: {"Dice": d, "n_pred": p, "n_ref": r} for label, (d, p, r) in labels.items()}}
                for case, labels in cases.items()]
    labels = next(iter(cases.values()))
    mean = {label: {"Dice": float(np.nanmean([c[label][0] for c in cases.values()])),
                    "n_pred": float(np.mean([c[label][1] for c in cases.values()])),
                    "n_ref": float(np.mean([c[label][2] for c in cases.values()]))} for label in labels}
    fg = float(np.mean([m["Dice"] for m in mean.values()]))
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": {"Dice": fg}}


def test_quality_voxel_counts_volume_table_and_rescore(quality, tmp_path, capsys, monkeypatch):
    dataset_json = {"labels": {"background": 0, "organ": 1, "lesion": 2}, "file_ending": ".nii.gz"}
    # case a: lesion 30 predicted of 20; case b: no lesion, 10 false positive voxels -> 40 / 20 = 2.0
    summary = _nnunet_summary({"a": {"1": (0.9, 90, 100), "2": (0.8, 30, 20)},
                               "b": {"1": (0.7, 110, 100), "2": (float("nan"), 10, 0)}})
    metrics = quality.held_out_metrics(summary, dataset_json)
    assert metrics["test_voxels"] == {"organ": {"predicted": 200, "reference": 200},
                                      "lesion": {"predicted": 40, "reference": 20}}
    assert metrics["test_dice"] == {"organ": pytest.approx(0.8), "lesion": 0.8}
    assert metrics["test_dice_per_case"]["b"] == {"organ": 0.7, "lesion": None}

    # three finished runs: one rescored, one whose folder holds another run (other Dice), one without folder
    results = tmp_path / "quality.json"
    records = [_record("synthetic2d", "nnUNetTrainerMime", "2x3", r, metrics["test_dice"], 0.8) for r in range(3)]
    for record in records:  # as the campaign stored them, before voxel counts
        record.update(run_name="nnUNetTrainerMime_2ep_3it",
                      **{key: metrics[key] for key in ("test_dice_mean", "test_dice_per_case")})
    records[1]["test_dice"] = {"organ": 0.5, "lesion": 0.8}
    for record in records:
        quality.store_record(results, record)
    for repeat in (0, 1):
        folder = tmp_path / "work" / "predictions" / f"repeat{repeat}" / "synthetic2d" / "nnUNetTrainerMime_2ep_3it"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    assert quality.main(["--rescore", "--results", str(results), "--work-dir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "Re-read the held-out metrics of 1 runs" in out
    assert ("2 left as they were (predictions gone or of another run):\n  synthetic2d nnUNetTrainerMime_2ep_3it "
            "repeat 1\n  synthetic2d nnUNetTrainerMime_2ep_3it repeat 2\n") in out
    stored = quality.load_results(results)["runs"]
    assert [("test_voxels" in r) for r in stored] == [True, False, False]
    # the volume table counts only the runs with voxel counts: organ 200 / 200, lesion 40 / 20
    assert "| nnUNetTrainerMime | 1 | 1.000 | 2.000 |" in out
    assert quality.volume_ratio(stored[0], "lesion") == 2.0 and quality.volume_ratio(stored[1], "lesion") is None

    # the same mean Dice but another per-case Dice: another run's folder, left alone
    records[2]["test_dice_per_case"] = {"a": {"organ": 0.7, "lesion": 0.8}, "b": {"organ": 0.9, "lesion": None}}
    quality.store_record(results, records[2])
    folder = tmp_path / "work" / "predictions" / "repeat2" / "synthetic2d" / "nnUNetTrainerMime_2ep_3it"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    assert quality.rescore(results, tmp_path / "work")[0] == 1  # repeat 0 again; repeats 1 and 2 left
    # a record stored after the rescore read the file is kept (the file is read again before writing)
    late = _record("synthetic2d", "nnUNetTrainer", "2x3", 0, metrics["test_dice"], 0.8)
    original_stored_metrics = quality._stored_metrics

    def store_meanwhile(record, work):
        if record["repeat"] == 2:
            quality.store_record(results, late)
        return original_stored_metrics(record, work)

    monkeypatch.setattr(quality, "_stored_metrics", store_meanwhile)
    quality.rescore(results, tmp_path / "work")
    assert [r["trainer"] for r in quality.load_results(results)["runs"]][-1] == "nnUNetTrainer"
    with pytest.raises(SystemExit, match="expected a results file of finished runs, got no file"):
        quality.rescore(tmp_path / "none.json", tmp_path / "work")


def test_quality_datasets_have_large_small_thin_and_absent_structures(quality, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    # one 3D case, by hand: organ large, lesion ~0.5 % (and absent when asked), vessel 3 voxels thin
    image, labels = quality.synthetic_volume(np.random.default_rng(0), 32, lesion=True)
    fractions = quality.label_fractions(labels)
    assert image.shape == labels.shape == (32, 32, 32) and image.dtype == np.float32
    assert fractions["organ"] >= 0.04 and 0.002 <= fractions["lesion"] <= 0.01 and 0 < fractions["vessel"] <= 0.01
    vessel = np.argwhere(labels == quality.LABELS["vessel"])
    assert np.ptp(vessel[:, 1]) + 1 <= 3 and np.ptp(vessel[:, 2]) + 1 <= 3 and np.ptp(vessel[:, 0]) + 1 >= 16
    lesion = labels == quality.LABELS["lesion"]
    assert not np.any(lesion & np.roll(labels == 0, 1, axis=0))  # inside the organ: never next to background
    _, no_lesion = quality.synthetic_volume(np.random.default_rng(0), 32, lesion=False)
    assert quality.label_fractions(no_lesion)["lesion"] == 0

    # the benchmark's two datasets as written: nnU-Net's raw layout; the lesion absent from some cases of each split
    for key, smallest_lesion, largest_lesion in (("synthetic2d", 0.003, 0.02), ("synthetic3d", 0.003, 0.01)):
        spec = quality.DATASETS[key]
        folder = quality.write_dataset(tmp_path / "raw", spec)
        dataset_json = json.loads((folder / "dataset.json").read_text())
        assert dataset_json["labels"] == {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
        assert dataset_json["numTraining"] == spec.training_cases
        description = quality.describe_dataset(spec, folder)
        for split, cases in (("training", spec.training_cases), ("test", spec.test_cases)):
            proportions = description["class_proportions"][split]
            assert proportions["organ"]["present_in"] == proportions["vessel"]["present_in"] == cases
            assert 0 < proportions["lesion"]["present_in"] < cases, (key, split)
            assert proportions["organ"]["min"] >= 0.05
            assert smallest_lesion <= proportions["lesion"]["min"] and proportions["lesion"]["max"] <= largest_lesion
            assert proportions["vessel"]["max"] <= 0.025
        first_label = sorted((folder / "labelsTr").glob("*.nii.gz"))[0]
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(first_label)))
        assert array.shape == (spec.size,) * spec.dimensions
        columns = np.argwhere(array == quality.LABELS["vessel"])[:, -1]
        assert np.ptp(columns) + 1 <= 3  # thin: 3 pixels / voxels wide


# ----------------------------------------------------------------------------------------------
# fp16_numerics.py: float16 autocast and nnU-Net's GradScaler loop (issue #15; the CUDA run is gpu_check.sh's)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def fp16_numerics(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fp16_numerics

    return fp16_numerics


def test_fp16_numerics_has_a_row_for_every_loss_and_nnunet_default(fp16_numerics):
    names = [case.name for case in fp16_numerics.numerics_cases()]
    assert "nnU-Net default: DC_and_CE_loss" in names and "copy floor: x.clone()" not in names
    for cls in _loss_classes():  # a loss added to the package without a row fails here
        assert any(name.split("(")[0] == cls for name in names), f"{cls} missing from fp16_numerics"


def test_fp16_numerics_runs_two_losses_on_cpu_with_finite_values(fp16_numerics, tmp_path, capsys):
    out = tmp_path / "fp16.json"
    losses = ["NegativeMimeLoss", "PhiDiceLoss(phi=I)"]
    status = fp16_numerics.main(["--device", "cpu", "--quick", "--shapes", "2,8,8", "--classes", "3", "--steps", "2",
                                 "--losses", *losses, "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert status == 0 and report["all_ok"] and report["steps"] == 2
    assert f"Autocast dtype: {report['autocast_dtype']}" in printed  # float16, or bfloat16 where CPU has none
    (setting,) = report["settings"]
    results = {entry["loss"]: entry for entry in setting["results"]}
    assert set(losses) | {"nnU-Net default: DC_and_CE_loss"} <= set(results)
    for name, entry in results.items():
        train = entry["train"]
        assert entry["error"] is None, f"{name}: {entry['error']}"
        assert entry["loss_finite"] and entry["grad_finite"]
        for value in (entry["loss_value"], entry["grad_max_abs"], train["first_loss"], train["last_loss"]):
            assert value is not None and math.isfinite(value), name  # write_json turns NaN into null
        assert train["nonfinite_loss_steps"] == 0 and train["nonfinite_grad_steps"] == 0
        assert train["skipped_steps"] is None and train["final_scale"] is None  # no GradScaler on CPU
        assert f"| {name} |" in printed
    assert "| n/a | n/a | ok |" in printed  # skipped steps and final scale


def test_fp16_numerics_verdict_flags_non_finite_values_and_extra_skipped_steps(fp16_numerics):
    # 9 skips in all, 3 of them after the scaler's search for its scale ended: only those 3 count
    entry = dict(error=None, loss_finite=True, grad_finite=True,
                 train=dict(nonfinite_loss_steps=0, nonfinite_grad_steps=None, skipped_steps=9,
                            skipped_after_first_step=3))
    assert fp16_numerics.verdict(entry, reference_skipped=3) == "ok"
    assert fp16_numerics.verdict(entry, reference_skipped=2) == "FAIL: more skipped steps than nnU-Net default"
    assert fp16_numerics.verdict(dict(entry, grad_finite=False), None) == "FAIL: non-finite gradient"


# ----------------------------------------------------------------------------------------------
# training_dynamics.py: the probes on nnU-Net's loss and gradient clipping (issue #10's diagnosis)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def dynamics(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import training_dynamics

    return training_dynamics


def test_dynamics_probe_records_ce_push_in_closed_form(dynamics):
    # mean CE over N voxels: dL/dx_c = (s_c - y_c) / N, so the push up of class c at its voxels is
    # sum over them of (1 - s_c) / N, and the push down elsewhere sum of s_c / N; deep supervision: only x[0]
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 2, 2)]
    labels = [torch.randint(0, 3, (2, 1, 4, 5)), torch.zeros(2, 1, 2, 2)]
    labels[0][0, 0, 0, 0] = 2  # every class present
    labels[0][0, 0, 0, 1] = 1

    def loss(x, y):
        return torch.nn.functional.cross_entropy(x[0], y[0][:, 0].long())

    steps = []
    value = dynamics.LossProbe(loss, 3, steps)(logits, labels)
    value.backward()
    (step,) = steps
    bare = logits[0].detach().clone().requires_grad_()
    loss([bare, logits[1]], labels).backward()
    assert torch.equal(logits[0].grad, bare.grad)  # passive: the network gets the bare loss's gradient
    s = torch.softmax(logits[0].detach(), 1)
    y = labels[0][:, 0]
    n = y.numel()
    for c in range(3):
        assert step["prob_in"][c] == pytest.approx(float(s[:, c][y == c].mean()))
        assert step["prob_out"][c] == pytest.approx(float(s[:, c][y != c].mean()))
        assert step["push_in"][c] == pytest.approx(float((1 - s[:, c][y == c]).sum() / n))
        assert step["push_out"][c] == pytest.approx(float(s[:, c][y != c].sum() / n))
    assert step["loss"] == pytest.approx(float(value))
    assert step["share"] == [pytest.approx(float((y == c).double().mean())) for c in range(3)]
    with torch.no_grad():  # a validation step records nothing
        dynamics.LossProbe(loss, 3, steps)([x.detach() for x in logits], labels)
    assert len(steps) == 1


def test_dynamics_probe_leaves_a_class_absent_from_the_batch_out_and_undoes_the_grad_scaler(dynamics):
    logits = [torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)]
    labels = [torch.tensor([[[[0, 0], [1, 1]]]])]  # class 2 absent

    def loss(x, y):
        return 1024.0 * torch.nn.functional.cross_entropy(x[0], y[0][:, 0].long())  # a GradScaler's scaled loss

    steps = []
    dynamics.LossProbe(loss, 3, steps, gradient_scale=lambda: 1024.0)(logits, labels).backward()
    (step,) = steps
    assert step["prob_in"][2] is None and step["push_in"][2] is None  # not a push of 0 that means would average in
    assert step["push_in"][1] == pytest.approx(2 * (1 - 1 / 3) / 4)  # unscaled: (1 - s) / N over its 2 voxels
    assert step["push_out"][2] == pytest.approx(4 * (1 / 3) / 4)


def test_dynamics_records_the_gradient_norm_before_clipping(dynamics):
    weight = torch.nn.Parameter(torch.tensor([30.0, 40.0]))
    weight.grad = torch.tensor([30.0, 40.0])
    steps = [{}]
    clip = torch.nn.utils.clip_grad_norm_
    with dynamics.gradient_norms_recorded(steps):
        torch.nn.utils.clip_grad_norm_([weight], 12)
    assert steps[0]["grad_norm"] == pytest.approx(50.0)  # what nnU-Net's clip saw, not the clipped 12
    assert torch.linalg.vector_norm(weight.grad) == pytest.approx(12.0)
    assert torch.nn.utils.clip_grad_norm_ is clip  # restored


def test_dynamics_probe_splits_the_label_marginal_penalty_off_in_closed_form(dynamics):
    # CE + λ L1 with deep-supervision weight w: the penalty's dL/dx_{c,i} is
    # w λ τ q_ci (g_c - Σ_k g_k q_ki) / N, q = softmax(τ x), g_c = sign(p̂_c - ŷ_c) / (B C) (per image b)
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunet_losses import LabelMarginalLoss

    torch.manual_seed(1)
    lam, tau, weight = 1.0, 2.0, 0.6
    loss = DeepSupervisionWrapper(LabelMarginalLoss(penalty="l1", lam=lam, tau=tau), [weight, 0.4])
    logits = [torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 2, 2)]
    labels = [torch.randint(0, 3, (2, 1, 4, 5)), torch.zeros(2, 1, 2, 2)]
    steps = []
    dynamics.LossProbe(loss, 3, steps)(logits, labels).backward()
    (step,) = steps
    x, y = logits[0].detach().double().flatten(2), labels[0][:, 0].flatten(1)
    q = torch.softmax(tau * x, 1)
    n = x.shape[-1]
    y_hat = torch.stack([(y == c).double().mean(1) for c in range(3)], 1)  # (B, C)
    g = torch.sign(q.mean(2) - y_hat) / (2 * 3)
    gradient = weight * lam * tau * q * (g[..., None] - (g[..., None] * q).sum(1, keepdim=True)) / n
    for c in range(3):
        assert step["penalty_push_in"][c] == pytest.approx(float(-gradient[:, c][y == c].sum()), rel=1e-4, abs=1e-7)
        assert step["penalty_push_out"][c] == pytest.approx(float(gradient[:, c][y != c].sum()), rel=1e-4, abs=1e-7)
    assert step["sharpened_share"] == pytest.approx(q.mean((0, 2)).tolist(), rel=1e-5)
    argmax = x.argmax(1)
    assert step["pred_share"] == [pytest.approx(float((argmax == c).double().mean())) for c in range(3)]
    bare = logits[0].detach().clone().requires_grad_()
    loss([bare, logits[1]], labels).backward()
    assert torch.allclose(logits[0].grad, bare.grad)  # still passive


def test_dynamics_probe_has_no_penalty_part_for_other_losses(dynamics):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunet_losses import LabelMarginalLoss

    assert dynamics.penalty_part(DeepSupervisionWrapper(torch.nn.CrossEntropyLoss(), [1.0])) is None
    assert dynamics.penalty_part(LabelMarginalLoss(penalty="kl", tau=10.0))[0] == 10.0


def test_dynamics_epoch_table_takes_medians_over_the_steps_with_the_class(dynamics):
    def step(share, push):  # class 1 absent from the batch when share is None
        return {"share": [1.0, share or 0.0], "prob_in": [0.9, None if share is None else 0.5], "push_in": [0.0, push]}

    record = {"steps": [step(0.1, 1.0), step(0.3, 5.0), step(None, None), step(0.2, 2.0), step(None, None)]}
    table = dynamics.epoch_table(record, 1, iterations=3).splitlines()
    assert table[0] == "| epoch | steps | share | prob_in | push_in |"
    assert table[2] == "| 0 | 2 | 0.2 | 0.5 | 3 |"  # medians of (0.1, 0.3) and (1, 5); the absent step left out
    assert table[3] == "| 1 | 1 | 0.2 | 0.5 | 2 |"
    assert dynamics.epoch_table({"steps": [step(None, None)]}, 1, iterations=1).splitlines()[2] == "| 0 | 0 | - | - | - |"


def test_dynamics_refuses_an_unknown_class_before_preparing_anything(dynamics, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        dynamics.main(["--epoch-table", "tumour", "--work-dir", str(tmp_path / "work")])
    assert stopped.value.code == 2
    assert "invalid choice: 'tumour' (choose from 'organ', 'lesion', 'vessel')" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
