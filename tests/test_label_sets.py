"""Label sets in dataset.json: validation and the (B, C) ``annotated`` table of the missing-label losses."""

import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_losses import LeafDiceLoss, MarginalDiceLoss
from nnunet_losses_tools.label_sets import AnnotatedTable, validate_annotated_labels

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
