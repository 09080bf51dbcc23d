"""The synthetic datasets of nnunet_losses.commands.synthetic: valid for nnU-Net, reproducible, never
overwriting an existing dataset."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_losses.commands.synthetic import IGNORE_VALUE, synthetic_case, write_synthetic_dataset


def digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes()
                                   for p in files)).hexdigest()


def labels_of(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_labels_dataset_is_valid_for_nnunet_and_reproducible(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", 7, "Demo", num_training=6, num_test=2, seed=3)
    again = write_synthetic_dataset(tmp_path / "b", 7, "Demo", num_training=6, num_test=2, seed=3)
    assert first.name == "Dataset007_Demo" and digest(first.folder) == digest(again.folder)
    assert first.training_cases == tuple(f"demo_{i:03d}" for i in range(6))
    assert first.test_cases == ("demo_006", "demo_007")
    dataset_json = json.loads((first.folder / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 6 and dataset_json["file_ending"] == ".nii.gz"
    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    assert not manager.has_regions and manager.all_labels == [0, 1, 2, 3]
    for case in first.training_cases:
        image = sitk.ReadImage(str(first.folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = labels_of(first.folder / "labelsTr" / f"{case}.nii.gz")
        assert image.GetSize() == (64, 64) and label.shape == (64, 64)
        assert set(np.unique(label)) <= {0, 1, 2, 3}


def test_region_dataset_with_ignore_label_is_what_nnunet_expects(tmp_path):
    dataset = write_synthetic_dataset(tmp_path, 8, "Regions", num_training=6, num_test=0, regions=True,
                                      ignore_label=True, seed=1)
    dataset_json = json.loads((dataset.folder / "dataset.json").read_text())
    manager = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
    assert manager.has_regions and manager.ignore_label == IGNORE_VALUE
    assert manager.foreground_regions == [(1, 2), 2, 3]
    # every other training case has an unannotated band of rows; the others none
    ignored = [bool((labels_of(dataset.folder / "labelsTr" / f"{c}.nii.gz") == IGNORE_VALUE).any())
               for c in dataset.training_cases]
    assert ignored == [False, True] * 3


def test_structures_sit_where_the_docstring_says():
    rng = np.random.default_rng(0)
    cases = [synthetic_case(rng) for _ in range(40)]
    with_lesion = 0
    for image, labels in cases:
        organ_area = (labels == 1) | (labels == 2)
        assert organ_area.sum() > 200 and (labels == 3).sum() > 50
        if (labels == 2).any():  # the lesion lies inside the organ disc and is small
            with_lesion += 1
            assert (labels == 2).sum() < 0.25 * organ_area.sum()
        # intensities differ per structure (noise sd 0.35)
        assert image[labels == 1].mean() == pytest.approx(1.0, abs=0.15)
        assert image[labels == 3].mean() == pytest.approx(-1.5, abs=0.15)
    assert 10 < with_lesion < 35  # present in some cases only (probability 0.6)


def test_existing_dataset_id_is_never_touched(tmp_path):
    existing = tmp_path / "Dataset009_Mine"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="dataset_id: expected an ID that is free .*got 9, already used by "
                                              "Dataset009_Mine"):
        write_synthetic_dataset(tmp_path, 9, "Other")
    assert list(existing.iterdir()) == []


@pytest.mark.parametrize("kwargs,message", [
    ({"dataset_id": 0}, r"dataset_id: expected an int in \[1, 999\], got 0"),
    ({"dataset_id": 1, "short_name": "a__b"}, "short_name: expected letters, digits and single underscores"),
    ({"dataset_id": 1, "num_training": 4}, r"num_training: expected at least 5 cases .*got 4"),
    ({"dataset_id": 1, "num_test": -1}, "num_test: expected a number >= 0, got -1"),
    ({"dataset_id": 1, "size": 16}, "size: expected at least 32 pixels, got 16"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_dataset(tmp_path / "raw", **kwargs)
    assert not (tmp_path / "raw").exists()
