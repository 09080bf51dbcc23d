"""``nnunet-losses derive-partial`` on tiny nnU-Net raw datasets generated in a temporary nnUNet_raw."""

import argparse
import hashlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_losses.commands.cli import build_parser, main
from nnunet_losses.commands.derive import derive_partial_dataset
from nnunet_losses.training.label_sets import AnnotatedTable, validate_annotated_labels

ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
CASES = [f"case_{i:03d}" for i in range(6)]
SHAPE = (4, 5, 6)  # z, y, x as SimpleITK arrays are indexed
SPACING, ORIGIN = (0.8, 1.0, 2.5), (10.0, -20.0, 3.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # not the identity: geometry must survive


def write_image(array, path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, path, True)


def read_array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def make_dataset(raw, dataset_id, name, labels=None, max_label=3, seed=0, test_set=True, **json_extra):
    """Dataset<id>_<name>: 6 training cases of 2 channels, labels drawn uniformly from 0..max_label."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_set else ()):
        os.makedirs(os.path.join(folder, sub))
    for case in CASES:
        for channel in range(2):
            write_image(rng.normal(size=SHAPE).astype(np.float32), os.path.join(folder, "imagesTr", f"{case}_{channel:04d}.nii.gz"))
        write_image(rng.integers(0, max_label + 1, SHAPE).astype(np.uint8), os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    if test_set:
        for channel in range(2):
            write_image(rng.normal(size=SHAPE).astype(np.float32), os.path.join(folder, "imagesTs", f"test_000_{channel:04d}.nii.gz"))
        write_image(rng.integers(0, max_label + 1, SHAPE).astype(np.uint8), os.path.join(folder, "labelsTs", "test_000.nii.gz"))
    generate_dataset_json(folder, {0: "T1", 1: "T2"}, labels or ACDC_LABELS, len(CASES), ".nii.gz", **json_extra)
    return folder


def tree_hashes(folder):
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return hashes


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def load(folder):
    with open(os.path.join(folder, "dataset.json")) as handle:
        return json.load(handle)


@pytest.fixture
def acdc(raw):
    return make_dataset(raw, 10, "Toy")


# ---------------------------------------------------------------------------------------------
# removing labels
# ---------------------------------------------------------------------------------------------
def test_remove_labels_from_pattern_selected_cases(raw, acdc, capsys):
    before = tree_hashes(acdc)
    code = main(["derive-partial", "10", "--target-id", "11", "--remove-labels", "MYO",
                 "--cases-pattern", "case_00[12]", "--no-progress"])
    assert code == 0
    target = os.path.join(raw, "Dataset011_Toy_partial")
    assert sorted(os.listdir(raw)) == ["Dataset010_Toy", "Dataset011_Toy_partial"]  # no temporary folder left

    removed = 0
    for case in CASES:
        source_label = os.path.join(acdc, "labelsTr", f"{case}.nii.gz")
        target_label = os.path.join(target, "labelsTr", f"{case}.nii.gz")
        if case in ("case_001", "case_002"):
            source, derived = read_array(source_label), read_array(target_label)
            assert np.array_equal(derived, np.where(source == 2, 0, source))  # voxel by voxel
            removed += int((source == 2).sum())
            image = sitk.ReadImage(target_label)
            assert image.GetSpacing() == pytest.approx(SPACING) and image.GetOrigin() == pytest.approx(ORIGIN)
            assert image.GetDirection() == pytest.approx(DIRECTION)
        else:
            assert same_bytes(source_label, target_label)
        for channel in range(2):
            name = f"{case}_{channel:04d}.nii.gz"
            assert same_bytes(os.path.join(acdc, "imagesTr", name), os.path.join(target, "imagesTr", name))
    for name in ("imagesTs/test_000_0000.nii.gz", "imagesTs/test_000_0001.nii.gz", "labelsTs/test_000.nii.gz"):
        assert same_bytes(os.path.join(acdc, name), os.path.join(target, name))

    derived_json, source_json = load(target), load(acdc)
    assert derived_json["annotated_labels"] == {"case_001": ["RV", "LV"], "case_002": ["RV", "LV"]}
    for key in ("labels", "channel_names", "numTraining", "file_ending"):
        assert derived_json[key] == source_json[key]
    assert derived_json["derived_from"]["dataset"] == "Dataset010_Toy"
    assert derived_json["derived_from"]["selected_cases"] == ["case_001", "case_002"]

    out = capsys.readouterr().out
    assert "cases selected: 2 of 6 (case_001, case_002)" in out
    assert removed > 0 and f"'MYO' (2): {removed}" in out
    assert tree_hashes(acdc) == before  # the source is untouched


def test_derived_dataset_passes_nnunet_integrity_check_and_label_set_validation(raw, acdc):
    derive_partial_dataset(10, 11, remove_labels=["LV"], cases_pattern="case_00[0-2]", progress=False)
    target = os.path.join(raw, "Dataset011_Toy_partial")
    verify_dataset_integrity(target, num_processes=1)
    identifiers = sorted(get_filenames_of_train_images_and_targets(target))
    assert validate_annotated_labels(load(target), identifiers) == {c: {1, 2} for c in ("case_000", "case_001", "case_002")}


def test_remove_labels_by_value_and_target_name(raw, acdc):
    result = derive_partial_dataset("Dataset010_Toy", 42, remove_labels=[1, 3], cases_pattern=["case_000", "case_005"],
                                    target_name="NoRVNoLV", progress=False)
    target = os.path.join(raw, "Dataset042_NoRVNoLV")
    assert result.target_folder == target and result.selected == ["case_000", "case_005"]
    expected_counts = {1: 0, 3: 0}
    for case in ("case_000", "case_005"):
        source = read_array(os.path.join(acdc, "labelsTr", f"{case}.nii.gz"))
        assert np.array_equal(read_array(os.path.join(target, "labelsTr", f"{case}.nii.gz")),
                              np.where(np.isin(source, [1, 3]), 0, source))
        for value in expected_counts:
            expected_counts[value] += int((source == value).sum())
    assert result.removed_voxels == expected_counts
    assert load(target)["annotated_labels"] == {"case_000": ["MYO"], "case_005": ["MYO"]}


def test_a_digit_on_the_command_line_is_a_label_value(raw, acdc):
    assert main(["derive-partial", "10", "-t", "11", "--remove-labels", "2", "--cases-pattern", "case_003", "--no-progress"]) == 0
    assert load(os.path.join(raw, "Dataset011_Toy_partial"))["annotated_labels"] == {"case_003": ["RV", "LV"]}


def test_deriving_from_a_partial_dataset_intersects_its_label_sets(raw, acdc):
    derive_partial_dataset(10, 11, remove_labels=["MYO"], cases_pattern="case_001", progress=False)
    derive_partial_dataset(11, 12, remove_labels=["LV"], cases_pattern=["case_001", "case_003"], progress=False)
    twice = os.path.join(raw, "Dataset012_Toy_partial_partial")
    assert load(twice)["annotated_labels"] == {"case_001": ["RV"], "case_003": ["RV", "MYO"]}
    source = read_array(os.path.join(acdc, "labelsTr", "case_001.nii.gz"))
    assert np.array_equal(read_array(os.path.join(twice, "labelsTr", "case_001.nii.gz")),
                          np.where(np.isin(source, [2, 3]), 0, source))


# ---------------------------------------------------------------------------------------------
# empty maps
# ---------------------------------------------------------------------------------------------
def test_empty_maps_from_a_cases_file(raw, acdc, tmp_path, capsys):
    cases_file = tmp_path / "lgg.txt"
    cases_file.write_text("# low-grade cases\ncase_004\n\n  case_000  \n")
    assert main(["derive-partial", "10", "--target-id", "20", "--empty", "--cases-file", str(cases_file), "--no-progress"]) == 0
    target = os.path.join(raw, "Dataset020_Toy_partial")
    counts = {1: 0, 2: 0, 3: 0}
    for case in ("case_000", "case_004"):
        derived = read_array(os.path.join(target, "labelsTr", f"{case}.nii.gz"))
        assert derived.shape == SHAPE and not derived.any()
        source = read_array(os.path.join(acdc, "labelsTr", f"{case}.nii.gz"))
        for value in counts:
            counts[value] += int((source == value).sum())
    for case in ("case_001", "case_002", "case_003", "case_005"):
        assert same_bytes(os.path.join(acdc, "labelsTr", f"{case}.nii.gz"), os.path.join(target, "labelsTr", f"{case}.nii.gz"))
    assert load(target)["annotated_labels"] == {"case_000": [], "case_004": []}
    out = capsys.readouterr().out
    assert "cases selected: 2 of 6 (case_000, case_004)" in out
    for value, name in ((1, "RV"), (2, "MYO"), (3, "LV")):
        assert f"'{name}' ({value}): {counts[value]}" in out


def test_empty_keeps_the_ignore_label(raw):
    # labels 0..4 drawn, 4 is the ignore label: an empty map is all background except the ignored voxels
    folder = make_dataset(raw, 30, "Ignore", labels={**ACDC_LABELS, "ignore": 4}, max_label=4, test_set=False)
    result = derive_partial_dataset(30, 31, empty=True, cases_pattern="case_002", progress=False)
    source = read_array(os.path.join(folder, "labelsTr", "case_002.nii.gz"))
    derived = read_array(os.path.join(raw, "Dataset031_Ignore_partial", "labelsTr", "case_002.nii.gz"))
    assert (source == 4).any() and np.array_equal(derived, np.where(source == 4, 4, 0))
    assert result.removed_labels == [1, 2, 3]
    assert not os.path.exists(os.path.join(raw, "Dataset031_Ignore_partial", "imagesTs"))


# ---------------------------------------------------------------------------------------------
# selection by fraction, region datasets, explicit file lists
# ---------------------------------------------------------------------------------------------
def test_fraction_is_seeded(raw, acdc):
    first = derive_partial_dataset(10, 11, remove_labels=["RV"], fraction=0.5, seed=0, progress=False)
    again = derive_partial_dataset(10, 12, remove_labels=["RV"], fraction=0.5, seed=0, progress=False)
    other = derive_partial_dataset(10, 13, remove_labels=["RV"], fraction=0.5, seed=1, progress=False)
    assert len(first.selected) == 3 and set(first.selected) <= set(CASES)  # round(0.5 * 6)
    assert again.selected == first.selected and other.selected != first.selected
    target = os.path.join(raw, "Dataset011_Toy_partial")
    assert load(target)["derived_from"]["selection"] == {"fraction": 0.5, "seed": 0}
    for case in CASES:
        source = read_array(os.path.join(acdc, "labelsTr", f"{case}.nii.gz"))
        expected = np.where(source == 1, 0, source) if case in first.selected else source
        assert np.array_equal(read_array(os.path.join(target, "labelsTr", f"{case}.nii.gz")), expected)
    assert derive_partial_dataset(10, 14, remove_labels=["RV"], fraction=1.0, progress=False).selected == CASES


def test_region_dataset_remove_a_label_and_table(raw):
    make_dataset(raw, 40, "Brats", labels=BRATS_LABELS, regions_class_order=(1, 2, 3), test_set=False)
    derive_partial_dataset(40, 41, remove_labels=["enhancing tumor"], cases_pattern="case_001", progress=False)
    derive_partial_dataset(40, 42, remove_labels=["tumor core"], cases_pattern="case_002", progress=False)
    first, second = (load(os.path.join(raw, f"Dataset04{i}_Brats_partial")) for i in (1, 2))
    # labels 1 and 2 have no name of their own (only regions do), so the values are written
    assert first["annotated_labels"] == {"case_001": [1, 2]}
    assert second["annotated_labels"] == {"case_002": [1]}
    # regions in nnU-Net's order: WT (1, 2, 3), TC (2, 3), ET (3); each misses a label in both derivations
    for dataset_json, case in ((first, "case_001"), (second, "case_002")):
        table = AnnotatedTable(dataset_json, CASES, 3)
        assert torch.equal(table([case, "case_000"]), torch.tensor([[False, False, False], [True, True, True]]))
    source = read_array(os.path.join(raw, "Dataset040_Brats", "labelsTr", "case_002.nii.gz"))
    derived = read_array(os.path.join(raw, "Dataset042_Brats_partial", "labelsTr", "case_002.nii.gz"))
    assert np.array_equal(derived, np.where(source >= 2, 0, source))


def test_source_listing_its_files_in_dataset_json(raw, tmp_path):
    # nnU-Net's "dataset" entry: files anywhere, any names; the derived dataset uses imagesTr/labelsTr
    elsewhere = tmp_path / "files"
    elsewhere.mkdir()
    rng = np.random.default_rng(3)
    dataset = {}
    for case in ("a", "b"):
        write_image(rng.normal(size=SHAPE).astype(np.float32), str(elsewhere / f"img_{case}.nii.gz"))
        write_image(rng.integers(0, 4, SHAPE).astype(np.uint8), str(elsewhere / f"seg_{case}.nii.gz"))
        dataset[case] = {"images": [str(elsewhere / f"img_{case}.nii.gz")], "label": str(elsewhere / f"seg_{case}.nii.gz")}
    folder = os.path.join(raw, "Dataset050_Listed")
    os.makedirs(folder)
    generate_dataset_json(folder, {0: "CT"}, ACDC_LABELS, 2, ".nii.gz", dataset=dataset)
    derive_partial_dataset(50, 51, remove_labels=["MYO"], cases_pattern="b", progress=False)
    target = os.path.join(raw, "Dataset051_Listed_partial")
    assert "dataset" not in load(target) and "dataset" in load(folder)
    assert same_bytes(dataset["a"]["images"][0], os.path.join(target, "imagesTr", "a_0000.nii.gz"))
    assert same_bytes(dataset["a"]["label"], os.path.join(target, "labelsTr", "a.nii.gz"))
    source = read_array(dataset["b"]["label"])
    assert np.array_equal(read_array(os.path.join(target, "labelsTr", "b.nii.gz")), np.where(source == 2, 0, source))
    assert sorted(get_filenames_of_train_images_and_targets(target)) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# bad selections: a clear message, and nothing written
# ---------------------------------------------------------------------------------------------
BAD = [
    (dict(remove_labels=["MYO"], cases_pattern="patient*"),
     r"--cases-pattern: expected a pattern matching some of the 6 training cases \(e.g. 'case_000'\), got \['patient\*'\]"),
    (dict(remove_labels=["Myocardium"], cases_pattern="*"),
     r"--remove-labels: expected a label name of dataset.json 'labels' \('RV', 'MYO', 'LV'\) or a label value, got unknown label 'Myocardium'"),
    (dict(remove_labels=[5], cases_pattern="*"), r"--remove-labels: expected a label value in \[1, 2, 3\], got unknown label value 5"),
    (dict(remove_labels=["background"], cases_pattern="*"), r"--remove-labels: expected a foreground label, got the background"),
    (dict(remove_labels=[], cases_pattern="*"), r"--remove-labels: expected at least one label name or value, got none"),
    (dict(cases_pattern="*"), r"operation: expected exactly one of --remove-labels and --empty, got neither"),
    (dict(remove_labels=["MYO"], empty=True, cases_pattern="*"), r"expected exactly one of --remove-labels and --empty, got both"),
    (dict(empty=True), r"case selection: expected exactly one of --cases-pattern, --cases-file, --fraction, got none"),
    (dict(empty=True, cases_pattern="*", fraction=0.5),
     r"expected exactly one of --cases-pattern, --cases-file, --fraction, got \['--cases-pattern', '--fraction'\]"),
    (dict(empty=True, fraction=0.05), r"--fraction: expected a fraction selecting at least one of the 6 cases, got 0.05"),
    (dict(empty=True, fraction=1.5), r"--fraction: expected a number in \(0, 1\], got 1.5"),
    (dict(empty=True, cases_file="/nonexistent/cases.txt"), r"--cases-file: expected a file with one case identifier per line, got missing file"),
    (dict(empty=True, cases_pattern="*", target_name="a/b"), r"target_name: expected a name without slashes or spaces"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_selection_fails_before_writing(raw, acdc, options, message):
    before = tree_hashes(raw)
    with pytest.raises(ValueError, match=message):
        derive_partial_dataset(10, 11, progress=False, **options)
    assert tree_hashes(raw) == before and os.listdir(raw) == ["Dataset010_Toy"]


def test_unknown_case_in_cases_file(raw, acdc, tmp_path):
    cases_file = tmp_path / "cases.txt"
    cases_file.write_text("case_001\ncase_101\n")
    with pytest.raises(ValueError, match=r"--cases-file: expected identifiers of the source's training cases, got unknown 'case_101'"):
        derive_partial_dataset(10, 11, empty=True, cases_file=str(cases_file), progress=False)
    assert os.listdir(raw) == ["Dataset010_Toy"]


@pytest.mark.parametrize("target_id, message", [
    (10, r"target_id: expected an unused dataset id, got 10, already used by Dataset010_Toy"),
    (12, r"target_id: expected an unused dataset id, got 12, already used by Dataset012_Trained"),
    (1000, r"target_id: expected a dataset id in \[1, 999\]"),
])
def test_target_id_in_use_or_invalid(raw, acdc, target_id, message):
    os.makedirs(os.path.join(os.environ["nnUNet_results"], "Dataset012_Trained"))  # used by results only
    with pytest.raises(ValueError, match=message):
        derive_partial_dataset(10, target_id, empty=True, cases_pattern="*", progress=False)
    assert os.listdir(raw) == ["Dataset010_Toy"]


@pytest.mark.parametrize("source, message", [
    (99, r"source: expected a dataset id or name found in nnUNet_raw .*, got 99: Could not find a dataset with the ID 99"),
    ("Dataset099_Nope", r"source: expected a raw dataset with a dataset.json in .*Dataset099_Nope, got none"),
    ("ACDC", r"source: expected a dataset id or name found in nnUNet_raw .*, got 'ACDC'"),
])
def test_source_not_found(raw, acdc, source, message):
    with pytest.raises(ValueError, match=message):
        derive_partial_dataset(source, 11, empty=True, cases_pattern="*", progress=False)
    assert os.listdir(raw) == ["Dataset010_Toy"]


def test_nnunet_raw_unset(raw, acdc, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ValueError, match=r"nnUNet_raw: expected the environment variable to point to nnU-Net's raw data folder, got it unset"):
        derive_partial_dataset(10, 11, empty=True, cases_pattern="*", progress=False)


def test_invalid_label_sets_in_the_source(raw):
    make_dataset(raw, 60, "Broken", test_set=False, annotated_labels={"case_009": ["RV"]})
    with pytest.raises(ValueError, match=r"'annotated_labels': expected identifiers of the dataset's 6 training cases, got unknown case 'case_009'"):
        derive_partial_dataset(60, 61, empty=True, cases_pattern="*", progress=False)
    assert os.listdir(raw) == ["Dataset060_Broken"]


def test_a_failure_while_writing_leaves_nothing_behind(raw, acdc, monkeypatch):
    calls = []

    def failing_write_seg(self, seg, output_fname, properties):
        calls.append(output_fname)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, seg, output_fname, properties)

    original = SimpleITKIO.write_seg
    monkeypatch.setattr(SimpleITKIO, "write_seg", failing_write_seg)
    with pytest.raises(OSError, match="disk full"):
        derive_partial_dataset(10, 11, empty=True, cases_pattern="*", progress=False)
    assert len(calls) == 2 and os.listdir(raw) == ["Dataset010_Toy"]
    monkeypatch.setattr(SimpleITKIO, "write_seg", original)
    derive_partial_dataset(10, 11, empty=True, cases_pattern="*", progress=False)  # the same command then succeeds
    assert sorted(os.listdir(raw)) == ["Dataset010_Toy", "Dataset011_Toy_partial"]


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_command_reports_errors_without_traceback(raw, acdc, capsys):
    code = main(["derive-partial", "10", "-t", "11", "--remove-labels", "Myo", "--cases-pattern", "*", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-losses derive-partial: error: --remove-labels: expected a label name")
    assert "(did you mean 'MYO'?)" in err and os.listdir(raw) == ["Dataset010_Toy"]


def test_command_requires_one_operation_and_one_selector(raw, acdc, capsys):
    for argv in (["derive-partial", "10", "-t", "11", "--cases-pattern", "*"],
                 ["derive-partial", "10", "-t", "11", "--empty"],
                 ["derive-partial", "10", "-t", "11", "--empty", "--fraction", "0.5", "--cases-file", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "one of the arguments" in capsys.readouterr().err and os.listdir(raw) == ["Dataset010_Toy"]


def test_help_explains_every_option():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "derive-partial" in parser.format_help()
    derive = subparsers.choices["derive-partial"]
    for action in derive._actions:
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 20, action.dest
    text = derive.format_help()
    for option in ("--target-id", "--target-name", "--remove-labels", "--empty", "--cases-pattern", "--cases-file",
                   "--fraction", "--seed", "--no-progress", "annotated_labels"):
        assert option in text
