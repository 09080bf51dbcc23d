"""Small synthetic 2D nnU-Net datasets for the quickstart, the tests and the other tools.

Every case is a noisy image of ``size x size`` pixels with three structures, each with its own
intensity so that a network learns them in a few iterations:

* label 1 ``organ``: a large disc;
* label 2 ``lesion``: a small disc inside the organ, present in only some cases (empty labels are
  what the Φ/ε paper is about);
* label 3 ``vessel``: a thin bar elsewhere.

``regions=True`` writes the same label maps with a region ``dataset.json`` (as BraTS):
``organ`` = {1, 2}, ``lesion`` = {2}, ``vessel`` = {3}, trained with sigmoid outputs.
``ignore_label=True`` adds nnU-Net's ignore label (4, the highest value) on a band of rows of every
other case, as in sparsely annotated data.

Images go to ``imagesTr``/``labelsTr`` (training) and ``imagesTs``/``labelsTs`` (held-out cases for
prediction and evaluation), with nnU-Net's own ``generate_dataset_json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
REGION_LABELS = {"background": 0, "organ": (1, 2), "lesion": 2, "vessel": 3}
REGIONS_CLASS_ORDER = (1, 2, 3)
IGNORE_VALUE = 4
# mean intensity per label value (background, organ, lesion, vessel)
INTENSITIES = (0.0, 1.0, 2.5, -1.5)


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives and what it contains."""

    folder: Path  # <raw>/DatasetXXX_Name
    dataset_id: int
    name: str  # DatasetXXX_Name
    training_cases: tuple
    test_cases: tuple

    @property
    def images_test(self) -> Path:
        return self.folder / "imagesTs"

    @property
    def labels_test(self) -> Path:
        return self.folder / "labelsTs"


def dataset_name(dataset_id: int, short_name: str) -> str:
    """nnU-Net's folder name ``DatasetXXX_Name``."""
    return f"Dataset{dataset_id:03d}_{short_name}"


def synthetic_case(rng: np.random.Generator, size: int = 64, lesion_probability: float = 0.6):
    """One ``(image, label_map)`` pair of ``size x size`` float32 / uint8 arrays."""
    if size < 32:
        raise ValueError(f"size: expected at least 32 pixels, got {size}")
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    labels = np.zeros((size, size), dtype=np.uint8)

    radius = rng.uniform(0.16, 0.24) * size
    cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1

    if rng.random() < lesion_probability:  # a small structure, absent from some cases
        lesion_radius = rng.uniform(0.04, 0.07) * size
        offset = rng.uniform(0, radius - lesion_radius - 1)
        angle = rng.uniform(0, 2 * np.pi)
        ly, lx = cy + offset * np.sin(angle), cx + offset * np.cos(angle)
        labels[(yy - ly) ** 2 + (xx - lx) ** 2 <= lesion_radius**2] = 2

    add_bar(rng, labels, cx, value=3, width_fraction=0.05, side_divisor=4, top_divisor=4)
    return noisy_image(rng, labels, INTENSITIES, noise=0.35), labels


def add_bar(rng: np.random.Generator, labels: np.ndarray, object_column: float, value: int, width_fraction: float,
            side_divisor: int, top_divisor: int) -> None:
    """Draw a thin vertical bar of ``value``, half the image tall, into the background of a square label
    map, on the side the object centred at ``object_column`` leaves free: within ``size // side_divisor``
    of that edge, its top within ``size // top_divisor`` of the upper edge."""
    size = labels.shape[0]
    width = max(2, int(round(width_fraction * size)))
    if object_column > size / 2:
        column = int(rng.integers(2, size // side_divisor))
    else:
        column = int(rng.integers((side_divisor - 1) * size // side_divisor, size - width - 2))
    top = int(rng.integers(2, size // top_divisor))
    bar = np.zeros_like(labels, dtype=bool)
    bar[top: top + size // 2, column: column + width] = True
    labels[bar & (labels == 0)] = value


def noisy_image(rng: np.random.Generator, labels: np.ndarray, intensities, noise: float) -> np.ndarray:
    """The float32 image of a label map: each label's intensity plus Gaussian noise of std ``noise``."""
    image = np.asarray(intensities, dtype=np.float32)[labels]
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return image


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0))
    sitk.WriteImage(image, str(path))


def write_synthetic_dataset(
    raw_folder: Union[str, os.PathLike],
    dataset_id: int,
    short_name: str = "Synthetic",
    num_training: int = 12,
    num_test: int = 4,
    size: int = 64,
    regions: bool = False,
    ignore_label: bool = False,
    seed: int = 0,
) -> SyntheticDataset:
    """Write a synthetic 2D dataset in nnU-Net's raw format under ``raw_folder``.

    Never touches an existing dataset: raises ``FileExistsError`` if ``raw_folder`` already holds a
    dataset with this ID (nnU-Net identifies datasets by ID, whatever their name).

    Args:
        raw_folder: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset ID (1-999).
        short_name: the name after ``DatasetXXX_``.
        num_training, num_test: cases in ``imagesTr`` and in the held-out ``imagesTs``.
        size: image side in pixels (>= 32).
        regions: write a region dataset.json (sigmoid training) instead of plain labels.
        ignore_label: add nnU-Net's ignore label on a band of rows of every other training case.
        seed: seed of the generator; the same arguments give the same files.
    """
    _check_arguments(dataset_id, short_name, num_training, num_test, size)
    raw_folder = Path(raw_folder)
    _check_id_is_free(raw_folder, dataset_id)
    name = dataset_name(dataset_id, short_name)
    folder = raw_folder / name
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    training, test = _write_cases(folder, short_name.lower(), num_training, num_test, size, ignore_label, seed)
    _write_dataset_json(folder, name, num_training, regions, ignore_label)
    return SyntheticDataset(folder, dataset_id, name, tuple(training), tuple(test))


def _check_arguments(dataset_id, short_name, num_training, num_test, size) -> None:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id: expected an int in [1, 999], got {dataset_id!r}")
    if not short_name or not short_name.replace("_", "").isalnum() or "__" in short_name:
        raise ValueError(f"short_name: expected letters, digits and single underscores, got {short_name!r}")
    if num_training < 5:  # nnU-Net's 5-fold split needs 5 training cases
        raise ValueError(f"num_training: expected at least 5 cases (nnU-Net's 5-fold split), got {num_training}")
    if num_test < 0:
        raise ValueError(f"num_test: expected a number >= 0, got {num_test}")
    if size < 32:
        raise ValueError(f"size: expected at least 32 pixels, got {size}")


def _check_id_is_free(raw_folder: Path, dataset_id: int) -> None:
    """nnU-Net identifies datasets by ID, whatever their name: refuse an ID a folder already uses."""
    prefix = f"Dataset{dataset_id:03d}_"
    if raw_folder.is_dir():
        existing = sorted(p.name for p in raw_folder.iterdir() if p.name.startswith(prefix))
        if existing:
            raise FileExistsError(
                f"dataset_id: expected an ID that is free in {raw_folder}, got {dataset_id}, already used by "
                f"{existing[0]}; choose another ID or remove that folder yourself"
            )


def _write_cases(folder: Path, case_prefix: str, num_training: int, num_test: int, size: int, ignore_label: bool,
                 seed: int) -> tuple[list, list]:
    """The training cases (``imagesTr``/``labelsTr``), then the held-out ones (``imagesTs``/``labelsTs``),
    drawn from one generator seeded with ``seed``; returns their identifiers."""
    rng = np.random.default_rng(seed)
    training, test = [], []
    for index in range(num_training + num_test):
        image, labels = synthetic_case(rng, size)
        is_training = index < num_training
        case = f"{case_prefix}_{index:03d}"
        if is_training and ignore_label and index % 2 == 1:  # unannotated band of rows
            start = int(rng.integers(0, size // 2))
            labels[start: start + size // 3] = IGNORE_VALUE
        split = "Tr" if is_training else "Ts"
        _write(image, folder / f"images{split}" / f"{case}_0000{FILE_ENDING}")
        _write(labels, folder / f"labels{split}" / f"{case}{FILE_ENDING}")
        (training if is_training else test).append(case)
    return training, test


def _write_dataset_json(folder: Path, name: str, num_training: int, regions: bool, ignore_label: bool) -> None:
    labels_json = dict(REGION_LABELS if regions else LABELS)
    if ignore_label:
        labels_json["ignore"] = IGNORE_VALUE
    generate_dataset_json(
        str(folder),
        channel_names={0: "synthetic"},  # not "CT": z-score normalisation
        labels=labels_json,
        num_training_cases=num_training,
        file_ending=FILE_ENDING,
        regions_class_order=REGIONS_CLASS_ORDER if regions else None,
        dataset_name=name,
        description="Synthetic 2D images written by nnunet_losses.commands.synthetic",
        license="CC0 (synthetic)",
        converted_by="nnunet-losses",
    )
