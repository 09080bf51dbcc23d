"""nnU-Net's data, read (and written) the way nnU-Net does it: one place for the dataset.json's labels
(nnU-Net's :class:`LabelManager`), the network's output channels and a label map's targets for them,
the image reader/writer of a dataset's file ending, the probabilities of ``--save_probabilities``,
and the raw-data folder with its datasets.

Training support and the command read nnU-Net data only through this module, so a new nnU-Net
version changes one file. nnunetv2 is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class UserInputError(ValueError):
    """What a user gave (a file, a folder, an option, a dataset.json) is missing, invalid or inconsistent.

    The ``nnunet-losses`` command reports it as one line on stderr with exit status 2, never a traceback;
    any other exception is a bug and keeps its traceback. A ValueError, so callers catching those still do."""


# ----------------------------------------------------------------------------------------------
# dataset.json: labels, regions, output channels
# ----------------------------------------------------------------------------------------------
def read_json_file(path: PathLike, what: str):
    """The JSON value in the file ``path``; a missing, unreadable or invalid file is a :class:`UserInputError`
    naming ``what`` (e.g. ``"--groups"``) and the file."""
    path = Path(path)
    if not path.is_file():
        got = "a folder" if path.is_dir() else "no file"
        raise UserInputError(f"{what}: expected a JSON file, got {got} at {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{what}: expected a JSON file, got invalid JSON in {str(path)!r} ({error})") from None


DATASET_JSON_KEYS = {"labels": Mapping, "file_ending": str}  # what our tools read from every dataset.json


def load_dataset_json(source: Union[Mapping, PathLike]) -> Mapping:
    """A dataset.json: ``source`` itself when it is one already (a mapping), else the file read and
    checked to hold nnU-Net's ``labels`` and ``file_ending``."""
    if isinstance(source, Mapping):
        return source
    dataset_json = read_json_file(source, "dataset.json")
    missing = [key for key, kind in DATASET_JSON_KEYS.items()
               if not isinstance(dataset_json, Mapping) or not isinstance(dataset_json.get(key), kind)]
    if missing:
        raise UserInputError(f"dataset.json: expected nnU-Net's entries 'labels' (a mapping) and 'file_ending' "
                             f"(e.g. '.nii.gz'), got no valid {' or '.join(map(repr, missing))} in {str(source)!r}")
    return dataset_json


def save_dataset_json(dataset_json: Mapping, folder: PathLike) -> None:
    """``folder/dataset.json`` written as nnU-Net's own tools write it (indent 4, keys in their order)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(dataset_json, os.path.join(folder, "dataset.json"), sort_keys=False)


def label_manager_for(dataset_json: Mapping):
    """nnU-Net's own :class:`LabelManager` for a dataset.json (as nnU-Net builds it before planning)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if not isinstance(dataset_json, Mapping) or "labels" not in dataset_json:
        raise TypeError(f"dataset_json: expected a dataset.json dict with a 'labels' entry, got {type(dataset_json).__name__}")
    try:
        return LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError) as error:  # nnU-Net checks with asserts too
        raise UserInputError(f"dataset.json: expected 'labels' as nnU-Net defines them (background 0, labels or "
                             f"regions), got {dataset_json['labels']!r} ({error or type(error).__name__})") from None


def _label_key(label_or_region) -> tuple:
    """A label (``1``) or region (``[1, 2]``, ``(2, 1)``) as the sorted tuple of its label values."""
    if isinstance(label_or_region, (list, tuple)):
        return tuple(sorted(int(v) for v in label_or_region))
    return (int(label_or_region),)


def _names_by_label_key(dataset_json: Mapping) -> dict:
    return {_label_key(value): name for name, value in dataset_json["labels"].items()}


@dataclass(frozen=True)
class OutputChannels:
    """What each output channel of nnU-Net's network stands for, read from a dataset.json."""

    names: list  # the dataset.json name of each channel's label or region (its value where it has none)
    activation: str  # "softmax" (one channel per label, background included) or "sigmoid" (one per region)
    labels_or_regions: list  # per channel: a label value (softmax) or a region, a tuple of values (sigmoid)
    ignore_label: Optional[int]


def output_channels(dataset_json: Optional[Mapping], num_channels: Optional[int] = None) -> OutputChannels:
    """The output channels nnU-Net trains for ``dataset_json`` (its :class:`LabelManager`'s labels,
    or its foreground regions). Without a dataset.json: ``num_channels`` labels ``0..C-1`` under softmax."""
    if dataset_json is None:
        return OutputChannels([str(c) for c in range(num_channels)], "softmax", list(range(num_channels)), None)
    manager = label_manager_for(dataset_json)
    by_key = _names_by_label_key(dataset_json)
    if manager.has_regions:
        activation, values = "sigmoid", list(manager.foreground_regions)
    else:
        activation, values = "softmax", list(manager.all_labels)
    return OutputChannels([by_key.get(_label_key(v), str(v)) for v in values], activation, values,
                          manager.ignore_label)


def summary_class_names(dataset_json: Mapping, metric_keys: Sequence[str]) -> list:
    """The dataset.json name of each label or region key of an nnU-Net ``summary.json`` (``"1"``,
    ``"(1, 2)"``); the key itself where the label or region has no name."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region

    by_key = _names_by_label_key(dataset_json)

    def name(key) -> str:
        try:
            return by_key.get(_label_key(key_to_label_or_region(str(key))), str(key))
        except ValueError:  # not a label or region key
            return str(key)

    return [name(k) for k in metric_keys]


@dataclass(frozen=True)
class ChannelTargets:
    """A ground-truth label map as the targets of the network's output channels."""

    channels: OutputChannels
    labels: np.ndarray  # (*spatial) int64 label map, the ignore label kept
    target: np.ndarray  # (C, *spatial) float64 one-hot or region targets, 0 on ignored voxels
    mask: Optional[np.ndarray]  # (*spatial) bool, False on the ignore label; None without one


def channel_targets(label_map: np.ndarray, output_shape: Sequence[int],
                    dataset_json: Optional[Mapping] = None) -> ChannelTargets:
    """Targets for a network output (probabilities) of shape ``(C, *spatial)`` from a ``(*spatial)``
    label map (or nnU-Net's ``(1, *spatial)``): one target per label or region of :func:`output_channels`,
    built with nnU-Net's own ``region_or_label_to_mask``; the ignore label becomes the mask."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    output_shape = tuple(output_shape)
    label_map = np.asarray(label_map)
    if label_map.ndim == len(output_shape) and label_map.shape[0] == 1:
        label_map = label_map[0]  # nnU-Net's readers give (1, *spatial)
    if label_map.shape != output_shape[1:]:
        raise UserInputError(f"ground truth: expected a label map of shape {output_shape[1:]} (the "
                             f"probabilities' spatial shape), got {label_map.shape}")
    channels = output_channels(dataset_json, output_shape[0])
    values = channels.labels_or_regions
    if len(values) != output_shape[0]:
        raise UserInputError(f"probabilities: expected {len(values)} channels (dataset.json's "
                             f"{'regions' if channels.activation == 'sigmoid' else 'labels'}), got {output_shape[0]}")
    labels = np.rint(label_map).astype(np.int64)
    ignore_label = channels.ignore_label
    mask = None if ignore_label is None else labels != ignore_label
    if channels.activation == "softmax":
        unknown = sorted(set(np.unique(labels).tolist()) - set(values) - {ignore_label})
        if unknown:
            raise UserInputError(f"ground truth: expected labels in {values}, got values {unknown}")
    target = np.stack([region_or_label_to_mask(labels, v) for v in values]).astype(np.float64)
    if mask is not None:
        target *= mask
    return ChannelTargets(channels, labels, target, mask)


# ----------------------------------------------------------------------------------------------
# files: segmentations, saved probabilities, prediction folders
# ----------------------------------------------------------------------------------------------
def reader_writer_for(example_file: PathLike, dataset_json: Optional[Mapping] = None):
    """An instance of nnU-Net's image reader/writer for ``example_file``: the one the dataset.json names
    (or its file ending implies), or, without a dataset.json, the one for the file's own ending."""
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    example_file = str(example_file)
    # nnU-Net tries its readers on the example file and prints the traceback of each one that fails,
    # verbose or not: kept off the user's stderr (the error below says what went wrong)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            if dataset_json is not None:
                return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)()
            ending = ".nii.gz" if example_file.endswith(".nii.gz") else os.path.splitext(example_file)[1]
            return determine_reader_writer_from_file_ending(ending, example_file, allow_nonmatching_filename=True,
                                                            verbose=False)()
    except RuntimeError as error:  # nnU-Net has no reader for the file (ending)
        raise UserInputError(f"file: expected one that nnU-Net's image readers read, got {example_file!r} "
                             f"({error})") from None


def read_segmentation(path: PathLike, dataset_json: Optional[Mapping] = None) -> tuple[np.ndarray, tuple]:
    """``(label_map (*spatial), spacing)`` read with nnU-Net's own reader for the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground truth: expected a segmentation file, got {path!r}")
    segmentation, properties = read_label_file(reader_writer_for(path, dataset_json), path)
    return segmentation[0], tuple(float(v) for v in properties["spacing"])


def read_label_file(reader_writer, path: PathLike):
    """``reader_writer.read_seg(path)``, a file the image library cannot read being the user's error."""
    with _readable(path, reader_writer):
        return reader_writer.read_seg(str(path))


def read_image_files(reader_writer, paths):
    """``reader_writer.read_images(paths)`` (one case's channel files), likewise."""
    with _readable(", ".join(map(str, paths)), reader_writer):
        return reader_writer.read_images([str(p) for p in paths])


@contextlib.contextmanager
def _readable(what, reader_writer):
    # only around the read itself: SimpleITK / nibabel / tifffile raise RuntimeError, OSError, ValueError or
    # EOFError for a truncated or foreign file, which is the user's to fix; anything else stays a bug
    try:
        yield
    except (RuntimeError, OSError, ValueError, EOFError) as error:
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise UserInputError(f"{what}: expected an image file nnU-Net's {type(reader_writer).__name__} can read, "
                             f"got {type(error).__name__}: {detail}") from None


def read_probabilities(path: PathLike) -> np.ndarray:
    """The ``(C, *spatial)`` probabilities (the image's array order) of a ``CASE.npz`` that
    ``nnUNetv2_predict --save_probabilities`` writes, checked to be finite values in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probabilities: expected an nnU-Net .npz file, got {str(path)!r} "
                                "(predict with --save_probabilities)")
    try:
        with np.load(path) as data:
            if "probabilities" not in data:
                raise UserInputError(f"probabilities: expected an .npz with the key 'probabilities' as nnU-Net "
                                     f"writes, got keys {list(data.keys())} in {path}")
            probabilities = data["probabilities"]
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(f"probabilities: expected an nnU-Net .npz file, got an unreadable {str(path)!r} "
                             f"({error})") from None
    _check_probabilities(probabilities, path)
    return probabilities


def _check_probabilities(probabilities: np.ndarray, path: Path) -> None:
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise UserInputError(f"probabilities: expected floating-point values in [0, 1], got {probabilities.dtype} "
                             f"in {str(path)!r}")
    if probabilities.size == 0:
        return
    if np.isnan(probabilities).any():
        raise UserInputError(f"probabilities: expected values in [0, 1], got NaN in {str(path)!r}")
    low, high = float(probabilities.min()), float(probabilities.max())
    if low < 0 or high > 1:
        raise UserInputError(f"probabilities: expected values in [0, 1], got values in [{low}, {high}] "
                             f"in {str(path)!r}")


def read_prediction_properties(probabilities_file: PathLike) -> Optional[dict]:
    """The properties (``spacing``, …) nnU-Net pickles as ``CASE.pkl`` next to ``CASE.npz``; None without."""
    properties_file = Path(probabilities_file).with_suffix(".pkl")
    if not properties_file.is_file():
        return None
    with open(properties_file, "rb") as handle:
        return pickle.load(handle)


def case_identifier(path: PathLike, file_ending: str) -> str:
    """The case of a prediction or segmentation file: its name without the dataset's file ending."""
    name = os.path.basename(path)
    return name[: -len(file_ending)] if name.endswith(file_ending) else name


def cases_with_probabilities(metric_per_case: Sequence[Mapping], prediction_folder: PathLike,
                             file_ending: str) -> list:
    """``(case, CASE.npz, reference file)`` of each case of an nnU-Net summary's ``metric_per_case``
    whose probabilities were saved in ``prediction_folder`` and whose reference file exists."""
    found = []
    for entry in metric_per_case:
        case = case_identifier(entry["prediction_file"], file_ending)
        npz = os.path.join(prediction_folder, case + ".npz")
        if os.path.isfile(npz) and os.path.isfile(entry["reference_file"]):
            found.append((case, npz, entry["reference_file"]))
    return found


# ----------------------------------------------------------------------------------------------
# nnUNet_raw: the folder, its datasets, a dataset's training files
# ----------------------------------------------------------------------------------------------
def raw_folder() -> str:
    """nnU-Net's raw data folder (``$nnUNet_raw``), checked to exist."""
    from nnunetv2.paths import nnUNet_raw

    if not nnUNet_raw.is_set():
        raise UserInputError("nnUNet_raw: expected the environment variable to point to nnU-Net's raw data folder, "
                             "got it unset")
    root = nnUNet_raw.get()
    if not os.path.isdir(root):
        raise UserInputError(f"nnUNet_raw: expected an existing folder, got {root!r}")
    return root


def raw_dataset_name(source: Union[str, int], raw_root: str) -> str:
    """A dataset's name, resolved the way nnU-Net's commands resolve ``-d``, and checked to be in ``raw_root``."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(source)
    except (RuntimeError, ValueError) as error:
        raise UserInputError(f"source: expected a dataset id or name found in nnUNet_raw ({raw_root}), got {source!r}: "
                             f"{error}")
    if not os.path.isfile(os.path.join(raw_root, name, "dataset.json")):
        raise UserInputError(f"source: expected a raw dataset with a dataset.json in {os.path.join(raw_root, name)}, "
                             "got none")
    return name


def datasets_with_id(dataset_id: int) -> list:
    """The dataset names that use ``dataset_id`` in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    return list(find_candidate_datasets(dataset_id))


def new_dataset_name(target_id: int, target_name: str) -> str:
    """``DatasetXXX_Name`` for a dataset a command is about to write; a used id or a bad name is the user's error."""
    if isinstance(target_id, bool) or not isinstance(target_id, int) or not 1 <= target_id <= 999:
        raise UserInputError(f"target_id: expected a dataset id in [1, 999] (nnU-Net names datasets DatasetXXX_Name), "
                             f"got {target_id!r}")
    existing = datasets_with_id(target_id)
    if existing:
        raise UserInputError(f"target_id: expected an unused dataset id, got {target_id}, already used by "
                             f"{', '.join(existing)} (in nnUNet_raw, nnUNet_preprocessed or nnUNet_results)")
    if not target_name or any(c in target_name for c in "/\\ ") or target_name.startswith("."):
        raise UserInputError(f"target_name: expected a name without slashes or spaces (e.g. ACDC_partial), got "
                             f"{target_name!r}")
    return f"Dataset{target_id:03d}_{target_name}"


def training_files(dataset_folder: PathLike, dataset_json: Mapping) -> dict:
    """Case identifier → ``{"images": [...], "label": ...}`` of a raw dataset's training cases, as
    nnU-Net lists them (its ``imagesTr``/``labelsTr`` layout or the dataset.json's ``dataset`` entry).

    The ``imagesTr`` layout is listed with nnU-Net's own per-case matcher in this process: nnU-Net's
    helper starts a multiprocessing pool for it, which hangs on Ctrl-C."""
    from nnunetv2.utilities.utils import (
        create_paths_fn,
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    if "dataset" in dataset_json:
        # a deep copy: nnU-Net's helper rewrites the 'dataset' entry's paths in place (no pool on this path)
        files = get_filenames_of_train_images_and_targets(str(dataset_folder), copy.deepcopy(dataset_json))
        return {str(case): entry for case, entry in files.items()}  # nnU-Net returns numpy strings
    ending = dataset_json["file_ending"]
    images_folder = os.path.join(dataset_folder, "imagesTr")
    if not os.path.isdir(images_folder):
        return {}
    names = sorted(name for name in os.listdir(images_folder)
                   if name.endswith(ending) and os.path.isfile(os.path.join(images_folder, name)))
    return {str(case): {"images": create_paths_fn(images_folder, names, ending, str(case)),
                        "label": os.path.join(dataset_folder, "labelsTr", str(case) + ending)}
            for case in get_identifiers_from_splitted_dataset_folder(images_folder, ending)}


# ----------------------------------------------------------------------------------------------
# held-out cases and merged datasets' provenance
# ----------------------------------------------------------------------------------------------
CASE_SOURCES_KEY = "case_sources"  # dataset.json of a merged dataset: case identifier -> its source dataset


def test_files(dataset_folder: PathLike, dataset_json: Mapping) -> dict:
    """Case identifier → ``{"images": [...], "label": path or None}`` of a raw dataset's held-out cases
    (``imagesTs``, with ``labelsTs`` where it has the case), as nnU-Net names their files; ``{}`` without
    ``imagesTs``."""
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    images, labels = os.path.join(dataset_folder, "imagesTs"), os.path.join(dataset_folder, "labelsTs")
    if not os.path.isdir(images):
        return {}
    ending = dataset_json["file_ending"]
    names = sorted(name for name in os.listdir(images) if name.endswith(ending) and not name.startswith("."))
    found = {}
    for case in get_identifiers_from_splitted_dataset_folder(images, ending):
        label = os.path.join(labels, str(case) + ending)
        found[str(case)] = {"images": create_paths_fn(images, names, ending, str(case)),
                            "label": label if os.path.isfile(label) else None}
    return found


def case_sources(dataset_json: Mapping, identifiers: Optional[Sequence[str]] = None) -> Optional[dict]:
    """A merged dataset's case → source table (dataset.json ``"case_sources"``), None without one; with
    ``identifiers``, checked to name a source for each of them."""
    table = dataset_json.get(CASE_SOURCES_KEY)
    if table is None:
        return None
    if not isinstance(table, Mapping) or not all(isinstance(v, str) for v in table.values()):
        raise TypeError(f"dataset.json '{CASE_SOURCES_KEY}': expected an object mapping case identifiers to "
                        f"source dataset names, got {type(table).__name__}")
    missing = sorted(set(identifiers or ()) - set(table))
    if missing:
        raise ValueError(f"dataset.json '{CASE_SOURCES_KEY}': expected a source for every training case, got "
                         f"{len(missing)} without one, e.g. {missing[0]!r}")
    return dict(table)
