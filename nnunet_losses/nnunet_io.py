"""nnU-Net's data, read (and written) the way nnU-Net does it: one place for the dataset.json's labels
(nnU-Net's :class:`LabelManager`) and for the image reader/writer of a dataset's file ending.

Training support and the command read nnU-Net data only through this module, so a new nnU-Net
version changes one file. nnunetv2 is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def label_manager_for(dataset_json: Mapping):
    """nnU-Net's own :class:`LabelManager` for a dataset.json (as nnU-Net builds it before planning)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if not isinstance(dataset_json, Mapping) or "labels" not in dataset_json:
        raise TypeError(f"dataset_json: expected a dataset.json dict with a 'labels' entry, got {type(dataset_json).__name__}")
    return LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))


def reader_writer_for(example_file: PathLike, dataset_json: Optional[Mapping] = None):
    """An instance of nnU-Net's image reader/writer for ``example_file``: the one the dataset.json names
    (or its file ending implies), or, without a dataset.json, the one for the file's own ending."""
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    example_file = str(example_file)
    if dataset_json is not None:
        return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)()
    ending = ".nii.gz" if example_file.endswith(".nii.gz") else os.path.splitext(example_file)[1]
    return determine_reader_writer_from_file_ending(ending, example_file, allow_nonmatching_filename=True,
                                                    verbose=False)()


def read_segmentation(path: PathLike, dataset_json: Optional[Mapping] = None) -> tuple[np.ndarray, tuple]:
    """``(label_map (*spatial), spacing)`` read with nnU-Net's own reader for the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground truth: expected a segmentation file, got {path!r}")
    segmentation, properties = reader_writer_for(path, dataset_json).read_seg(path)
    return segmentation[0], tuple(float(v) for v in properties["spacing"])
