"""Hard to break: every subcommand through the installed ``nnunet-losses`` console script. A user error is
one line on stderr and exit status 2, never a traceback; a failed or interrupted command leaves nothing
in the output's parent folder; what is written gets the modes of the user's umask."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from nnunet_losses.commands import cli
from nnunet_losses.commands.derive import CASE_DELAY_VARIABLE
from nnunet_losses.commands.output import WORK_FOLDER_MARK
from test_derive import make_dataset
from test_diagnostics import random_case, write_nnunet_prediction
from test_evaluation import DATASET_JSON, PREDICTIONS, REFERENCES, uniform_probabilities, write_prediction_folder
from test_report import two_models, written_models  # noqa: F401  (fixtures)

SCRIPT = str(Path(sysconfig.get_path("scripts")) / "nnunet-losses")


def run(*arguments, umask=None, **options) -> subprocess.CompletedProcess:
    """The console script, as a user runs it (nnU-Net folders from this test's environment)."""
    return subprocess.run([SCRIPT, *map(str, arguments)], capture_output=True, text=True, timeout=300,
                          umask=-1 if umask is None else umask, **options)


def assert_user_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """Exit status 2 and exactly one line on stderr: ``nnunet-losses COMMAND: error: ...`` with ``fragments``."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"nnunet-losses {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def listing(folder: Path) -> list:
    """Every path under ``folder`` (hidden ones too), relative."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def evaluation_inputs(tmp_path):
    """Predictions of case_a and case_b, references of case_a..case_d, the dataset.json; the output's
    parent is ``tmp_path / "results"`` (empty)."""
    references = {**REFERENCES, "case_c": REFERENCES["case_a"], "case_d": REFERENCES["case_b"]}
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt", PREDICTIONS, references)
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "results").mkdir()
    return tmp_path


def evaluate(inputs: Path, *extra, predictions=None, ground_truth=None, **options):
    return run("evaluate", predictions or inputs / "pred", "--ground-truth", ground_truth or inputs / "gt",
               "--dataset-json", inputs / "dataset.json", "-o", inputs / "results" / "eval", "--num-processes", 1,
               *extra, **options)


def test_evaluate_names_missing_predictions_and_allows_them_only_when_asked(evaluation_inputs):
    inputs = evaluation_inputs
    assert_user_error(evaluate(inputs), "evaluate", "got none for 2 of 4: case_c, case_d", "--allow-missing")
    assert listing(inputs / "results") == []

    result = evaluate(inputs, "--allow-missing", umask=0o027)
    assert result.returncode == 0, result.stderr
    assert "| pred | all | 2 |" in result.stdout
    assert "Not evaluated (no prediction, --allow-missing): 2 of 4 cases of the ground truth: case_c, case_d" \
        in result.stdout
    metrics = json.loads((inputs / "results" / "eval" / "metrics.json").read_text())
    assert metrics["missing_predictions"] == ["case_c", "case_d"]
    assert [case["case"] for case in metrics["cases"]] == ["case_a", "case_b"]
    assert listing(inputs / "results") == ["eval", "eval/metrics.json", "eval/metrics.md", "eval/summary.json"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (inputs / "results").rglob("*")}
    assert modes == {"eval": 0o750, "metrics.json": 0o640, "metrics.md": 0o640, "summary.json": 0o640}


def write_groups(inputs: Path, groups) -> Path:
    path = inputs / "groups.json"
    path.write_text(groups if isinstance(groups, str) else json.dumps(groups))
    return path


@pytest.mark.parametrize("groups, fragments", [
    ({"case_a": "HGG", "case_b": "LGG", "case_x": "LGG", "case_y": "HGG"},
     ["expected case identifiers of the 2 cases of the ground truth", "got unknown case_x, case_y", "groups.json"]),
    ('{"case_a": "HGG",', ["groups: expected a JSON file, got invalid JSON in", "groups.json"]),
    ({"case_a": 1}, ["groups: expected a mapping", "values of type int", "groups.json"]),
    ({"case_a": "HGG", "case_b": "LGG", "unused": None}, ["values of type NoneType, str"]),
    ({"case_a": "LGG", "case_b": "LGG"}, ["positive: expected the group to detect, one of ['LGG'], got 'HGG'"]),
])
def test_evaluate_checks_the_groups_before_writing(evaluation_inputs, groups, fragments):
    inputs = evaluation_inputs
    groups_file = write_groups(inputs, groups)
    result = evaluate(inputs, "--groups", groups_file, "--positive", "HGG", ground_truth=inputs / "pred")
    assert_user_error(result, "evaluate", *fragments)
    assert listing(inputs / "results") == []


def test_evaluate_names_a_prediction_it_cannot_read(evaluation_inputs):
    (evaluation_inputs / "pred" / "case_a.nii.gz").write_bytes(b"not an image")
    assert_user_error(evaluate(evaluation_inputs, "--allow-missing"), "evaluate",
                      "expected one that nnU-Net's image readers read", "case_a.nii.gz")
    assert listing(evaluation_inputs / "results") == []


def test_evaluate_user_errors_are_one_line(evaluation_inputs):
    inputs = evaluation_inputs
    (inputs / "empty").mkdir()
    (inputs / "results" / "a_file").write_text("mine")
    (inputs / "no_ending.json").write_text(json.dumps({"labels": DATASET_JSON["labels"]}))
    (inputs / "bad_labels.json").write_text(json.dumps({**DATASET_JSON, "labels": {"organ": 1, "lesion": 2}}))
    cases = [
        (evaluate(inputs, predictions=inputs / "empty", ground_truth=inputs / "empty"),
         ["predictions: expected .nii.gz files in", "got none"]),
        (evaluate(inputs, predictions=inputs / "nowhere"), ["predictions: expected a folder of .nii.gz", "no folder"]),
        (run("evaluate", inputs / "pred", "--ground-truth", inputs / "pred", "--dataset-json", inputs / "nope.json",
             "-o", inputs / "results" / "eval"), ["dataset.json: expected a JSON file, got no file", "nope.json"]),
        (run("evaluate", inputs / "pred", "--ground-truth", inputs / "pred", "--dataset-json",
             inputs / "no_ending.json", "-o", inputs / "results" / "eval"), ["no valid 'file_ending'"]),
        (run("evaluate", inputs / "pred", "--ground-truth", inputs / "pred", "--dataset-json",
             inputs / "bad_labels.json", "-o", inputs / "results" / "eval"),
         ["dataset.json: expected 'labels' as nnU-Net defines them", "{'organ': 1, 'lesion': 2}"]),
        (run("evaluate", inputs / "pred", "--ground-truth", inputs / "pred", "--dataset-json",
             inputs / "dataset.json", "-o", inputs / "results" / "a_file"),
         ["--output: expected an output folder, got the existing file"]),
        (evaluate(inputs, "--num-processes", "0", ground_truth=inputs / "pred"), ["--num-processes: expected"]),
        (evaluate(inputs, "--bins", "many"), ["argument --bins: invalid int value: 'many'", "--help"]),
    ]
    for result, fragments in cases:
        assert_user_error(result, "evaluate", *fragments)
    assert listing(inputs / "results") == ["a_file"]
    assert (inputs / "results" / "a_file").read_text() == "mine"


@pytest.mark.parametrize("bad_value, shown", [(np.nan, "got NaN in"), (1.5, "got values in [0.3333333432674408, 1.5] in")])
def test_evaluate_names_the_case_with_invalid_probabilities(tmp_path, bad_value, shown):
    probabilities = {case: uniform_probabilities() for case in PREDICTIONS}
    probabilities["case_b"][1, 0, 0, 0] = bad_value
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt", probabilities=probabilities)
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "results").mkdir()
    result = evaluate(tmp_path)
    assert_user_error(result, "evaluate", "probabilities: expected values in [0, 1]", shown, "case_b.npz")
    assert listing(tmp_path / "results") == []


def test_evaluate_refuses_probabilities_of_some_cases_only(tmp_path):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt", probabilities={c: uniform_probabilities() for c in PREDICTIONS})
    (tmp_path / "pred" / "case_b.npz").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "results").mkdir()
    assert_user_error(evaluate(tmp_path), "evaluate", "got none for 1 of 2: case_b")
    assert listing(tmp_path / "results") == []
    result = evaluate(tmp_path, "--allow-missing")
    assert result.returncode == 0 and not (tmp_path / "results" / "eval" / "reliability.png").exists()


def test_evaluate_into_an_existing_folder_replaces_its_files_only(evaluation_inputs):
    inputs = evaluation_inputs
    out = inputs / "results" / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.md").write_text("old")
    assert evaluate(inputs, "--allow-missing").returncode == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.md").read_text().startswith("| model |")
    assert not [p for p in listing(inputs / "results") if WORK_FOLDER_MARK in p]


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def gradient_inputs(tmp_path):
    case = random_case("softmax", seed=1)
    npz, gt = write_nnunet_prediction(tmp_path / "pred", "case_7", case.probabilities, case.label_map)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}))
    (tmp_path / "results").mkdir()
    return npz, gt, dataset_json, tmp_path / "results"


@pytest.mark.parametrize("options, fragments", [
    (["--loss", "softdice"], ["loss: expected one of", "got 'softdice'"]),
    (["--loss", "mime:c=1"], ["mime: expected options among"]),
    (["--loss", "mime:a=-1"], ["loss 'mime:a=-1': "]),
    (["--loss", "negative_mime", "--class", "c"], ["--class: expected a class name ['background', 'a', 'b']"]),
    (["--class", "7"], ["--class: expected a class name", "got '7'"]),
    (["--slice", "9"], ["slice: expected 0..1, got 9"]),
])
def test_gradients_bad_options_leave_no_output_folder(gradient_inputs, options, fragments):
    npz, gt, dataset_json, results = gradient_inputs
    result = run("gradients", "--probabilities", npz, "--ground-truth", gt, "--dataset-json", dataset_json,
                 "-o", results / "diag", *options)
    assert_user_error(result, "gradients", *fragments)
    assert listing(results) == []


def test_gradients_missing_inputs(gradient_inputs):
    npz, gt, dataset_json, results = gradient_inputs
    for options, fragments in [
        (["--probabilities", results / "nope.npz", "--ground-truth", gt], ["expected an nnU-Net .npz file", "nope.npz"]),
        (["--probabilities", npz], ["expected --probabilities and --ground-truth", "only --probabilities"]),
        (["--probabilities", npz, "--ground-truth", dataset_json], ["file: expected one that nnU-Net's image readers "
                                                                     "read, got", "dataset.json"]),
        (["--probabilities", npz, "--ground-truth", gt, "--synthetic"], ["got both"]),
    ]:
        assert_user_error(run("gradients", *options, "-o", results / "diag"), "gradients", *fragments)
    assert listing(results) == []
    (results / "a_file").write_text("mine")
    result = run("gradients", "--synthetic", "--size", 40, "-o", results / "a_file")
    assert_user_error(result, "gradients", "--output: expected an output folder, got the existing file")
    result = run("gradients", "--synthetic", "--size", 16, "-o", results / "diag")
    assert_user_error(result, "gradients", "error: size: expected at least 32 pixels, got 16")
    assert listing(results) == ["a_file"] and (results / "a_file").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def test_report_bad_gradient_loss_writes_nothing(two_models, tmp_path):
    (tmp_path / "results").mkdir()
    result = run("report", *two_models, "-o", tmp_path / "results" / "report", "--gradient-loss", "mime:a")
    assert_user_error(result, "report", "expected options as key=value, got 'a'")
    result = run("report", *two_models, "-o", tmp_path / "results" / "report", "--gradient-loss", "mime:a=-1")
    assert_user_error(result, "report", "loss 'mime:a=-1'")
    assert listing(tmp_path / "results") == []


def test_report_groups_must_name_cases_of_the_dataset(two_models, tmp_path):
    groups = write_groups(tmp_path, {"case_a": "HGG", "case_b": "LGG", "case_z": "LGG"})
    result = run("report", *two_models, "-o", tmp_path / "report", "--groups", groups, "--positive", "HGG")
    assert_user_error(result, "report", "got unknown case_z", str(groups))
    assert not (tmp_path / "report").exists()


def test_report_of_two_folds_of_one_trainer_links_its_gradient_panel(two_models, tmp_path):
    fold_0 = two_models[0]
    fold_1 = fold_0.parent / "fold_1"
    shutil.copytree(fold_0, fold_1)
    result = run("report", fold_0, fold_1, "-o", tmp_path / "report", "--gradient-loss", "mime")
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "report" / "index.html").read_text()
    pictures = [part.split('"')[0] for part in html.split('<img src="')[1:]]
    assert len(pictures) == 3 and any(p.startswith("gradients_") for p in pictures)  # curves, reliability, gradients
    for picture in pictures:
        assert "/" not in picture and (tmp_path / "report" / picture).is_file()
    assert [p.name for p in (tmp_path / "report").iterdir() if p.is_dir()] == []


def test_report_refuses_a_trainer_folder_with_unvalidated_folds(two_models, tmp_path):
    fold_0 = two_models[0]
    fold_1 = fold_0.parent / "fold_1"
    shutil.copytree(fold_0, fold_1)
    shutil.rmtree(fold_1 / "validation")
    result = run("report", fold_0.parent, "-o", tmp_path / "report", "--no-gradients")
    assert_user_error(result, "report", "expected validation/summary.json in every fold", "fold_1")
    assert not (tmp_path / "report").exists()
    result = run("report", fold_0.parent, "-o", tmp_path / "report", "--no-gradients", "--allow-missing")
    assert result.returncode == 0 and "| 2 |" in result.stdout.splitlines()[2]


# ----------------------------------------------------------------------------------------------
# derive-partial
# ----------------------------------------------------------------------------------------------
def derive(*extra, **options):
    return run("derive-partial", "10", "--target-id", "11", "--remove-labels", "MYO", "--no-progress", *extra,
               **options)


@pytest.mark.parametrize("edit, options, fragments", [
    (lambda folder: os.remove(os.path.join(folder, "labelsTr", "case_002.nii.gz")), ["--cases-pattern", "*"],
     ["expected every training image and label file to exist, got 1 missing", "labelsTr/case_002.nii.gz"]),
    (lambda folder: shutil.copy(os.path.join(folder, "labelsTr", "case_002.nii.gz"),
                                os.path.join(folder, "labelsTr", "case_042.nii.gz")), ["--cases-pattern", "*"],
     ["got labels without images", "labelsTr/case_042.nii.gz"]),
    (lambda folder: os.remove(os.path.join(folder, "imagesTr", "case_003_0001.nii.gz")), ["--cases-pattern", "*"],
     ["expected 2 image files (one per channel of dataset.json) per training case, got 1 for case_003"]),
    (lambda folder: shutil.copy(os.path.join(folder, "imagesTr", "case_003_0001.nii.gz"),
                                os.path.join(folder, "imagesTr", "case_003_01.nii.gz")), ["--cases-pattern", "*"],
     ["images of no case", "imagesTr/case_003_01.nii.gz"]),
    (lambda folder: _drop_file_ending(folder), ["--cases-pattern", "*"], ["no valid 'file_ending'", "dataset.json"]),
    (lambda folder: Path(folder, "labelsTr", "case_002.nii.gz").write_bytes(b"not an image"), ["--cases-pattern", "*"],
     ["labelsTr/case_002.nii.gz: expected an image file nnU-Net's", "can read, got"]),
    (lambda folder: os.makedirs(os.path.join(folder, "cases")), ["--cases-file", "{source}/cases"],
     ["--cases-file: expected a file with one case identifier per line, got a folder"]),
    (lambda folder: shutil.copy(os.path.join(folder, "imagesTr", "case_003_0001.nii.gz"), os.path.join(folder, "cases")),
     ["--cases-file", "{source}/cases"], ["--cases-file: expected a text file with one case identifier per line, got binary"]),
])
def test_derive_user_errors_are_one_line_and_write_nothing(raw, edit, options, fragments):
    source = make_dataset(raw, 10, "Toy", test_set=False)
    edit(source)
    before = listing(Path(raw))
    result = derive(*(option.format(source=source) for option in options))
    assert_user_error(result, "derive-partial", *fragments)
    assert listing(Path(raw)) == before


def _drop_file_ending(folder: str) -> None:
    path = os.path.join(folder, "dataset.json")
    dataset_json = json.loads(open(path).read())
    del dataset_json["file_ending"]
    with open(path, "w") as handle:
        json.dump(dataset_json, handle)


def test_derive_into_a_read_only_nnunet_raw(raw, monkeypatch, capsys):
    # root writes anywhere, so the refusal of a read-only folder is played by mkdtemp, where it would come
    make_dataset(raw, 10, "Toy", test_set=False)

    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    code = cli.main(["derive-partial", "10", "-t", "11", "--empty", "--cases-pattern", "*", "--no-progress"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"nnunet-losses derive-partial: error: target: expected a folder you can write in, got "
                      f"{str(raw)!r} (Permission denied)")


def work_folders(raw: str) -> list:
    return [name for name in os.listdir(raw) if WORK_FOLDER_MARK in name]


def start_slow_derivation(raw: str) -> subprocess.Popen:
    """derive-partial over 6 cases, waiting 0.5 s after each, started once its work folder exists."""
    environment = {**os.environ, CASE_DELAY_VARIABLE: "0.5"}
    process = subprocess.Popen([SCRIPT, "derive-partial", "10", "-t", "11", "--empty", "--cases-pattern", "*",
                                "--no-progress"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not work_folders(raw):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_derivation_ends_promptly_and_leaves_nothing(raw, signum, code, word):
    make_dataset(raw, 10, "Toy", test_set=False)
    process = start_slow_derivation(raw)
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == code and err.splitlines() == [f"nnunet-losses derive-partial: {word} "
                                                               f"({signal.Signals(signum).name})"]
    assert os.listdir(raw) == ["Dataset010_Toy"]


def test_left_overs_of_a_killed_derivation_are_removed_by_the_next_run(raw):
    make_dataset(raw, 10, "Toy", test_set=False)
    process = start_slow_derivation(raw)
    process.kill()  # SIGKILL: no cleanup is possible, the work folder stays
    process.communicate(timeout=30)
    left = work_folders(raw)
    assert len(left) == 1 and left[0].startswith(f".Dataset011_Toy_partial{WORK_FOLDER_MARK}{process.pid}-")
    result = run("derive-partial", "10", "-t", "11", "--empty", "--cases-pattern", "*", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(raw)) == ["Dataset010_Toy", "Dataset011_Toy_partial"]


def test_the_training_files_are_listed_without_a_process_pool(raw, monkeypatch):
    # nnU-Net's own listing starts a multiprocessing pool, which hangs on Ctrl-C
    import multiprocessing
    import multiprocessing.pool

    from nnunet_losses.nnunet_io import training_files

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(multiprocessing.pool, "Pool", no_pool)
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.setattr("nnunetv2.utilities.utils.Pool", no_pool)
    source = make_dataset(raw, 10, "Toy", test_set=False)
    files = training_files(source, json.loads(Path(source, "dataset.json").read_text()))
    assert sorted(files) == [f"case_{i:03d}" for i in range(6)]
    assert files["case_004"] == {"images": [os.path.join(source, "imagesTr", f"case_004_000{c}.nii.gz") for c in (0, 1)],
                                 "label": os.path.join(source, "labelsTr", "case_004.nii.gz")}


def test_what_derive_writes_gets_the_modes_of_the_umask(raw):
    source = make_dataset(raw, 10, "Toy")
    for root, folders, files in os.walk(source):  # the source's own modes must not be copied
        for name in files:
            os.chmod(os.path.join(root, name), 0o664)
    result = derive("--cases-pattern", "case_00[12]", umask=0o027)
    assert result.returncode == 0, result.stderr
    target = Path(raw) / "Dataset011_Toy_partial"
    modes = {str(p.relative_to(raw)): stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
    assert len(modes) == 1 + 4 + 6 * 2 + 6 + 2 + 1 + 1  # folder, 4 subfolders, images, labels, test files, json
    for path, mode in modes.items():
        expected = 0o750 if (Path(raw) / path).is_dir() else 0o640
        assert mode == expected, (path, oct(mode))


# ----------------------------------------------------------------------------------------------
# the one place that decides
# ----------------------------------------------------------------------------------------------
def test_a_bug_keeps_its_traceback(monkeypatch):
    from nnunet_losses.commands import trainer_path

    def broken(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(trainer_path, "trainer_folder", lambda: broken(None))
    with pytest.raises(ValueError, match="a bug, not a user error"):
        cli.main(["trainer-path"])


def test_option_errors_of_the_parser_are_one_line():
    result = run("derive-partial", "10", "--target-id", "eleven", "--empty", "--cases-pattern", "*")
    line = assert_user_error(result, "derive-partial", "argument --target-id/-t: invalid int value: 'eleven'")
    assert line.endswith("(see nnunet-losses derive-partial --help)")


def test_help_lists_every_subcommand_and_a_named_one_loads_alone():
    def commands(parser):
        return list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)

    assert commands(cli.build_parser()) == list(cli.SUBCOMMANDS)  # --help, no command, a mistyped one
    for command in cli.SUBCOMMANDS:
        assert commands(cli.build_parser(command)) == [command]


def test_a_user_error_of_evaluate_does_not_wait_for_nnunets_trainer():
    # a fresh interpreter: this one has imported everything already
    code = ("import sys; from nnunet_losses.commands.cli import main\n"
            "try:\n    main(['evaluate'])\nexcept SystemExit as stop:\n"
            "    print(stop.code, 'nnunetv2.training.nnUNetTrainer.nnUNetTrainer' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "nnunet-losses evaluate: error: the following arguments are required" in result.stderr


# ----------------------------------------------------------------------------------------------
# the work folders themselves
# ----------------------------------------------------------------------------------------------
def test_an_output_folder_with_missing_parents_is_created_only_when_done(tmp_path):
    from nnunet_losses.commands.output import files_moved_into_place

    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="fails midway"):
        with files_moved_into_place(target) as work:
            (work / "half.txt").write_text("half")
            raise RuntimeError("fails midway")
    assert listing(tmp_path) == []
    with files_moved_into_place(target) as work:
        (work / "done.txt").write_text("done")
    assert listing(tmp_path) == ["a", "a/b", "a/b/out", "a/b/out/done.txt"]


def test_only_the_work_folders_of_dead_processes_are_stale(tmp_path):
    from nnunet_losses.commands.output import remove_stale_work_folders

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {"live": f".out{WORK_FOLDER_MARK}{os.getppid()}-x1", "dead": f".out{WORK_FOLDER_MARK}{dead.pid}-x2",
             "old format": f".out{WORK_FOLDER_MARK}k2j_a9", "other output": f".other{WORK_FOLDER_MARK}{dead.pid}-x3"}
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = remove_stale_work_folders(tmp_path, "out")
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["old format"]])
    assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["other output"]])
