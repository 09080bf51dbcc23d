"""Label sets in dataset.json: validation, the (B, C) ``annotated`` table of the missing-label losses, and the
check of the label maps against the label sets."""

import re

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy, infer_dataset_class
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_losses import LeafDiceLoss, MarginalDiceLoss
from nnunet_losses.training import label_sets as label_sets_module
from nnunet_losses.training.label_sets import AnnotatedTable, check_label_maps, labels_in, validate_annotated_labels

CASES = ["case_a", "case_b", "case_c", "case_d"]


def acdc_like(annotated=None, ignore=False):
    labels = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    if ignore:
        labels["ignore"] = 4
    dataset_json = {"labels": labels, "channel_names": {"0": "MRI"}, "numTraining": 4, "file_ending": ".nii.gz"}
    if annotated is not None:
        dataset_json["annotated_labels"] = annotated
    return dataset_json


def brats_like(annotated=None):
    # regions deliberately listed out of value order: the table's columns must follow nnU-Net's order
    labels = {"background": 0, "enhancing tumor": 3, "whole tumor": [1, 2, 3], "tumor core": [2, 3]}
    dataset_json = {"labels": labels, "regions_class_order": [3, 1, 2], "channel_names": {"0": "T1"},
                    "numTraining": 4, "file_ending": ".nii.gz"}
    if annotated is not None:
        dataset_json["annotated_labels"] = annotated
    return dataset_json


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_validation_resolves_names_and_values():
    sets = validate_annotated_labels(acdc_like({"case_b": ["RV", "LV"], "case_c": [], "case_d": [1, "MYO", 3]}), CASES)
    assert sets == {"case_b": {1, 3}, "case_c": set(), "case_d": {1, 2, 3}}


def test_validation_of_a_region_dataset_resolves_region_names_to_their_labels():
    sets = validate_annotated_labels(brats_like({"case_a": ["tumor core"], "case_b": [1, "enhancing tumor"]}), CASES)
    assert sets == {"case_a": {2, 3}, "case_b": {1, 3}}


def test_absent_key_means_fully_annotated():
    assert validate_annotated_labels(acdc_like(), CASES) == {}


@pytest.mark.parametrize(
    "annotated, error, message",
    [
        ({"case_x": ["RV"]}, ValueError, r"expected identifiers of the dataset's 4 training cases, got unknown case 'case_x'"),
        ({"case_aa": ["RV"]}, ValueError, r"unknown case 'case_aa' \(did you mean 'case_a'\?\)"),
        ({"case_a": ["Myo"]}, ValueError, r"case 'case_a'.*got unknown label 'Myo' \(did you mean 'MYO'\?\)"),
        ({"case_a": [7]}, ValueError, r"case 'case_a': expected a label value in \[1, 2, 3\], got unknown label value 7"),
        ({"case_b": ["background"]}, ValueError, r"case 'case_b': expected a foreground label, got the background 'background'"),
        ({"case_b": [0]}, ValueError, r"case 'case_b': expected a foreground label, got the background 0"),
        ({"case_c": "RV"}, TypeError, r"case 'case_c': expected a list of label names or values, got str 'RV'"),
        ({"case_c": [1.0]}, TypeError, r"case 'case_c': expected a label name \(str\) or value \(int\), got float 1.0"),
        ({"case_c": [True]}, TypeError, r"expected a label name \(str\) or value \(int\), got bool True"),
        (["case_a"], TypeError, r"'annotated_labels': expected an object mapping case identifiers to lists of labels, got list"),
    ],
)
def test_validation_errors_name_the_case_and_what_was_expected(annotated, error, message):
    with pytest.raises(error, match=message):
        validate_annotated_labels(acdc_like(annotated), CASES)


@pytest.mark.parametrize("label", ["ignore", 4])
def test_the_ignore_label_is_not_a_class(label):
    with pytest.raises(ValueError, match=r"expected a foreground label, got the ignore label"):
        validate_annotated_labels(acdc_like({"case_a": [label]}, ignore=True), CASES)


# ---------------------------------------------------------------------------------------------
# the (B, C) table
# ---------------------------------------------------------------------------------------------
def test_softmax_table_for_known_keys():
    table = AnnotatedTable(acdc_like({"case_b": ["RV", "LV"], "case_c": [], "case_d": [1, "MYO", 3]}), CASES, 4)
    # columns: background, RV (1), MYO (2), LV (3); background always True, unlisted case_a fully annotated
    expected = torch.tensor([
        [True, True, False, True],    # case_b: MYO missing
        [True, True, True, True],     # case_a: not listed
        [True, False, False, False],  # case_c: nothing annotated
        [True, True, True, True],     # case_d: everything listed
        [True, True, False, True],    # case_b again (a case may appear twice in a batch)
    ])
    got = table(["case_b", "case_a", "case_c", "case_d", "case_b"])
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert not table.fully_annotated


def test_table_takes_numpy_keys_as_nnunet_batches_carry_them():
    table = AnnotatedTable(acdc_like({"case_c": ["LV"]}), CASES, 4)
    assert torch.equal(table(np.array(["case_c", "case_a"])), torch.tensor([[True, False, False, True], [True] * 4]))


def test_region_table_follows_nnunet_region_order():
    annotated = {"case_a": ["tumor core"], "case_b": [1, 2], "case_c": []}
    dataset_json = brats_like(annotated)
    manager = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
    # nnU-Net's output channels for these labels: ET (3), WT (1, 2, 3), TC (2, 3)
    assert manager.foreground_regions == [3, (1, 2, 3), (2, 3)]
    table = AnnotatedTable(dataset_json, CASES, 3)
    # a region is annotated iff all its labels are:
    #   case_a {2, 3}: ET yes, WT no (1 missing), TC yes
    #   case_b {1, 2}: ET no, WT no (3 missing), TC no (3 missing)
    #   case_c {}:     nothing;  case_d unlisted: everything
    expected = torch.tensor([[True, False, True], [False, False, False], [False, False, False], [True, True, True]])
    assert torch.equal(table(CASES), expected)


def test_fully_annotated_dataset_gives_all_true():
    table = AnnotatedTable(acdc_like(), CASES, 4)
    assert table.fully_annotated
    assert torch.equal(table(["case_d", "case_a"]), torch.ones(2, 4, dtype=torch.bool))


def test_table_uses_a_given_label_manager():
    # a trainer passes its own self.label_manager; with force_use_labels a region dataset is trained as labels
    dataset_json = brats_like({"case_a": ["tumor core"]})
    manager = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"], force_use_labels=True)
    table = AnnotatedTable(dataset_json, CASES, 4, label_manager=manager)
    assert torch.equal(table(["case_a"]), torch.tensor([[True, False, True, True]]))


def test_table_rejects_a_wrong_channel_count():
    with pytest.raises(ValueError, match=r"num_channels: expected 4 \(the dataset's labels, background included\), got 3"):
        AnnotatedTable(acdc_like(), CASES, 3)
    with pytest.raises(ValueError, match=r"num_channels: expected 3 \(the dataset's regions\), got 4"):
        AnnotatedTable(brats_like(), CASES, 4)


def test_table_rejects_unknown_keys():
    table = AnnotatedTable(acdc_like(), CASES, 4)
    with pytest.raises(ValueError, match=r"keys: expected identifiers of the 4 cases the table was built for, got unknown case 'case_z'"):
        table(["case_a", "case_z"])
    with pytest.raises(TypeError, match=r"keys: expected a sequence of case identifiers"):
        table("case_a")


def test_table_validates_the_label_sets():
    with pytest.raises(ValueError, match=r"got unknown case 'case_x'"):
        AnnotatedTable(acdc_like({"case_x": []}), CASES, 4)


def test_table_feeds_the_missing_label_losses():
    # case_b misses MYO (2); both samples have an empty RV (1), which the Σy > 0 fallback would call
    # missing but the label sets call annotated, so with the table both losses differ from the fallback
    torch.manual_seed(0)
    table = AnnotatedTable(acdc_like({"case_b": ["RV", "LV"]}), CASES, 4)
    x = torch.randn(2, 4, 3, 4, 4)
    y = torch.randint(2, 4, (2, 1, 3, 4, 4))  # labels 2, 3 only
    y[1][y[1] == 2] = 0  # case_b has no MYO voxels, as a derived dataset would
    annotated = table(["case_a", "case_b"])
    assert torch.equal(annotated, torch.tensor([[True, True, True, True], [True, True, False, True]]))
    for loss in (LeafDiceLoss(), MarginalDiceLoss()):
        assert not torch.allclose(loss(x, y, annotated=annotated), loss(x, y))


# ---------------------------------------------------------------------------------------------
# label maps against label sets
# ---------------------------------------------------------------------------------------------
def label_map(*values, dtype=np.int8):
    """A (1, 2, 2, len(values)) label map as nnU-Net preprocesses them, holding ``values`` and background."""
    array = np.zeros((1, 2, 2, max(len(values), 1)), dtype=dtype)
    array[0, 1, 1, :len(values)] = values
    return array


class Reader:
    """``read_label_map`` over a dict of arrays; records which cases were read."""

    def __init__(self, maps):
        self.maps = maps
        self.read = []

    def __call__(self, case):
        self.read.append(case)
        return self.maps[case]


def test_label_maps_contradicting_their_sets_are_one_error_naming_cases_and_labels():
    dataset_json = acdc_like({"case_a": ["RV", "LV"], "case_b": ["RV"], "case_c": [], "case_d": ["RV", "MYO", "LV"]})
    reader = Reader({
        "case_a": label_map(1, 2, 3),  # MYO (2) is there, its set says not annotated
        "case_b": label_map(3, 1, 2),  # MYO and LV are there, only RV annotated
        "case_c": label_map(-1),       # nothing annotated and nothing there (-1: outside nnU-Net's nonzero mask)
        "case_d": label_map(1, 2, 3),  # fully annotated: never read
    })
    expected = (
        "dataset.json 'annotated_labels': expected label sets that include every label with voxels in the case's "
        "label map, got 2 cases whose sets do not: case 'case_a' contains label 'MYO' (2), which its label set marks "
        "as not annotated; case 'case_b' contains labels 'MYO' (2) and 'LV' (3), which its label set marks as not "
        "annotated. Add those labels to the cases' sets, or set their voxels to background in the raw label maps "
        "and preprocess again."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_label_maps(dataset_json, validate_annotated_labels(dataset_json, CASES), reader, progress=False)
    assert reader.read == ["case_a", "case_b", "case_c"]


def test_consistent_label_maps_pass_and_only_partial_cases_are_read():
    # case_b misses MYO and has none; case_c misses everything and is all background; case_a is not listed
    dataset_json = acdc_like({"case_b": ["RV", "LV"], "case_c": [], "case_d": [1, 2, 3]})
    reader = Reader({"case_a": label_map(1, 2, 3), "case_b": label_map(1, 3, 0, 1), "case_c": label_map(),
                     "case_d": label_map(1, 2, 3)})
    scanned = check_label_maps(dataset_json, validate_annotated_labels(dataset_json, CASES), reader, progress=False)
    assert scanned == reader.read == ["case_b", "case_c"]


def test_only_the_given_cases_are_read():
    dataset_json = acdc_like({"case_b": [], "case_c": []})
    reader = Reader({"case_b": label_map(1), "case_c": label_map()})  # case_b contradicts, but is not asked for
    label_sets = validate_annotated_labels(dataset_json, CASES)
    assert check_label_maps(dataset_json, label_sets, reader, cases=["case_a", "case_c"], progress=False) == ["case_c"]
    assert reader.read == ["case_c"]
    with pytest.raises(ValueError, match=r"case 'case_b' contains label 'RV' \(1\), which its label set marks"):
        check_label_maps(dataset_json, label_sets, reader, cases=["case_b"], progress=False)


def test_the_ignore_label_is_not_a_contradiction():
    # ignore (4) and nnU-Net's -1 in a case whose set annotates nothing: no class voxels, no contradiction
    dataset_json = acdc_like({"case_a": [], "case_b": ["MYO"]}, ignore=True)
    reader = Reader({"case_a": label_map(4, -1, 4), "case_b": label_map(2, 4)})
    label_sets = validate_annotated_labels(dataset_json, CASES)
    assert check_label_maps(dataset_json, label_sets, reader, progress=False) == ["case_a", "case_b"]


def test_region_datasets_are_checked_on_the_label_values_their_region_names_stand_for():
    # brats_like: 'whole tumor' = {1, 2, 3}, 'tumor core' = {2, 3}, 'enhancing tumor' = 3
    #   case_a annotates the tumor core {2, 3}, but its map has label 1 (whole tumor only): contradiction
    #   case_b annotates 'whole tumor', i.e. every label: never read
    #   case_c annotates the enhancing tumor (3) and has only that: consistent
    #   case_d annotates label 1 only and has it: consistent, although no region of it is annotated
    dataset_json = brats_like({"case_a": ["tumor core"], "case_b": ["whole tumor"], "case_c": ["enhancing tumor"],
                               "case_d": [1]})
    reader = Reader({"case_a": label_map(1, 2, 3), "case_b": label_map(1), "case_c": label_map(3),
                     "case_d": label_map(1)})
    label_sets = validate_annotated_labels(dataset_json, CASES)
    with pytest.raises(ValueError, match=r"got 1 case whose set does not: case 'case_a' contains label 1 \(part of "
                                         r"'whole tumor'\), which its label set marks as not annotated\. "):
        check_label_maps(dataset_json, label_sets, reader, progress=False)
    assert reader.read == ["case_a", "case_c", "case_d"]
    reader.maps["case_c"] = label_map(3, 2)  # label 2 (regions in dataset.json order) in a case that annotated only 3
    with pytest.raises(ValueError, match=r"case 'case_c' contains label 2 \(part of 'whole tumor', 'tumor core'\)"):
        check_label_maps(dataset_json, label_sets, reader, cases=["case_c"], progress=False)


def test_a_long_list_of_contradictions_is_cut_short():
    cases = [f"case_{i:02d}" for i in range(23)]
    dataset_json = acdc_like({case: ["RV"] for case in cases})
    reader = Reader({case: label_map(2) for case in cases})
    with pytest.raises(ValueError) as error:
        check_label_maps(dataset_json, validate_annotated_labels(dataset_json, cases), reader, progress=False)
    message = str(error.value)
    assert "got 23 cases whose sets do not" in message
    assert message.count("contains label 'MYO' (2)") == 20
    assert "case 'case_19' contains" in message and "case 'case_20'" not in message
    assert "; ... and 3 more cases. Add those labels" in message


@pytest.mark.parametrize("dataset_class", [nnUNetDatasetNumpy, nnUNetDatasetBlosc2])
def test_labels_in_reads_nnunet_datasets_slab_by_slab(tmp_path, monkeypatch, dataset_class):
    # a 3D case of 6 x 5 x 4 voxels read 20 voxels (one index of the first spatial axis) at a time:
    # label 3 only in the last slab, -1 (outside nnU-Net's nonzero mask) only in the first
    monkeypatch.setattr(label_sets_module, "MAX_VOXELS_PER_READ", 20)
    seg = np.zeros((1, 6, 5, 4), dtype=np.int8)
    seg[0, 0, 0, 0] = -1
    seg[0, 2, 1:3, 1] = 1
    seg[0, 5, 4, 3] = 3
    data = np.zeros((1, 6, 5, 4), dtype=np.float32)
    extra = {"chunks": (1, 6, 5, 4), "blocks": (1, 3, 5, 4)} if dataset_class is nnUNetDatasetBlosc2 else {}
    dataset_class.save_case(data, seg, {"spacing": [1.0, 1.0, 1.0]}, str(tmp_path / "case_a"), **extra)
    folder = str(tmp_path)
    assert infer_dataset_class(folder) is dataset_class
    loaded_seg = dataset_class(folder).load_case("case_a")[1]
    assert labels_in(loaded_seg) == {-1, 0, 1, 3}
    recorded = RecordingArray(loaded_seg)
    assert labels_in(recorded) == {-1, 0, 1, 3}
    assert recorded.reads == [(slice(None), slice(i, i + 1)) for i in range(6)]


def test_labels_in_a_2d_case_reads_slabs_of_its_first_long_axis(monkeypatch):
    # nnU-Net's 2D cases are (1, 1, x, y): slabs of x, 2 rows of 10 voxels per read
    monkeypatch.setattr(label_sets_module, "MAX_VOXELS_PER_READ", 20)
    seg = np.zeros((1, 1, 5, 10), dtype=np.int16)
    seg[0, 0, 4, 9] = 300
    recorded = RecordingArray(seg)
    assert labels_in(recorded) == {0, 300}
    assert recorded.reads == [(slice(None), slice(None), slice(i, i + 2)) for i in (0, 2, 4)]


class RecordingArray:
    """An array that records how it is sliced."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.int32, np.float32])
def test_labels_in_every_segmentation_dtype(dtype):
    values = [0, 1, 3] + ([-1] if np.issubdtype(dtype, np.signedinteger) or dtype == np.float32 else [])
    assert labels_in(label_map(*values[1:], dtype=dtype)) == set(values)
