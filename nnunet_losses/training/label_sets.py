"""Label sets of partially labelled nnU-Net datasets: which labels were annotated in which case.

A partially labelled dataset records its label sets in ``dataset.json`` (docs/losses.md §4)::

    "annotated_labels": {"patient001_frame12": ["RV", "LV"], "BraTS_LGG_017": []}

Each listed training case maps to the foreground labels that were annotated in it, given by name
(a key of ``"labels"``) or by integer value; ``[]`` means nothing was annotated. A case that is not
listed, or a dataset without the key, is fully annotated. In a region dataset (``"labels"`` values
that are lists, with ``"regions_class_order"``) a region's name stands for all of its labels, and a
region is annotated iff all of its labels are.

Trainers call :func:`validate_annotated_labels` at training start and build one
:class:`AnnotatedTable`, which turns a batch's case identifiers (``batch['keys']``) into the
``(B, C)`` ``annotated`` table of :class:`nnunet_losses.MarginalDiceLoss` and
:class:`nnunet_losses.LeafDiceLoss`. Before training they also compare the label sets with the label
maps (:func:`check_label_maps`): a label with voxels in a case whose set calls it not annotated is a
contradiction the losses would only meet mid-training.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from tqdm import tqdm

from ..nnunet_io import label_manager_for

ANNOTATED_LABELS_KEY = "annotated_labels"

LabelRef = Union[str, int]


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """' (did you mean 'X'?)' for the closest candidate (ignoring case), or ''."""
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


class LabelResolver:
    """Turns label names and values of one dataset into sets of integer label values."""

    def __init__(self, dataset_json: Mapping, label_manager: Optional[LabelManager] = None):
        self.label_manager = label_manager if label_manager is not None else label_manager_for(dataset_json)
        self.ignore_label = self.label_manager.ignore_label
        self.foreground_values = frozenset(int(v) for v in self.label_manager.foreground_labels)
        self.names: dict[str, frozenset[int]] = {}
        for name, value in dataset_json["labels"].items():
            if name == "ignore":
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            self.names[name] = frozenset(int(v) for v in values)

    def resolve(self, label: object, where: str) -> frozenset[int]:
        """The integer labels a name or value stands for; ``where`` names the entry in error messages."""
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise TypeError(f"{where}: expected a label name (str) or value (int), got {type(label).__name__} {label!r}")
        if isinstance(label, str):
            if label == "ignore":
                raise ValueError(f"{where}: expected a foreground label, got the ignore label 'ignore' (it is not a class)")
            if label not in self.names:
                foreground = [name for name, values in self.names.items() if 0 not in values]
                raise ValueError(
                    f"{where}: expected a label name of dataset.json 'labels' ({', '.join(map(repr, foreground))}) "
                    f"or a label value, got unknown label {label!r}{_did_you_mean(label, foreground)}"
                )
            values = self.names[label]
        else:
            if label == self.ignore_label:
                raise ValueError(f"{where}: expected a foreground label, got the ignore label {label} (it is not a class)")
            if label != 0 and label not in self.foreground_values:
                raise ValueError(
                    f"{where}: expected a label value in {sorted(self.foreground_values)}, got unknown label value {label}"
                )
            values = frozenset([label])
        if 0 in values:
            raise ValueError(
                f"{where}: expected a foreground label, got the background {label!r} (background is always annotated)"
            )
        return values

    def resolve_all(self, labels: Iterable[object], where: str) -> frozenset[int]:
        resolved: set[int] = set()
        for label in labels:
            resolved |= self.resolve(label, where)
        return frozenset(resolved)

    def describe(self, values: Iterable[int]) -> list[LabelRef]:
        """A label set as dataset.json writes it: the name of each value that has its own name, else the value."""
        own_name = {next(iter(v)): n for n, v in self.names.items() if len(v) == 1}
        return [own_name.get(v, v) for v in sorted(values)]


def validate_annotated_labels(
    dataset_json: Mapping,
    case_identifiers: Iterable[str],
    label_manager: Optional[LabelManager] = None,
) -> dict[str, frozenset[int]]:
    """Check ``dataset_json["annotated_labels"]`` and return each listed case's annotated label values.

    ``case_identifiers`` are the dataset's training cases (e.g. the identifiers of the preprocessed
    folder). Absent key: ``{}`` (fully annotated). Raises ``TypeError`` for a wrong JSON type and
    ``ValueError`` for an unknown case, an unknown label, or the background / ignore label listed.
    """
    resolver = LabelResolver(dataset_json, label_manager)
    return _validated(dataset_json, case_identifiers, resolver)


def _validated(dataset_json: Mapping, case_identifiers: Iterable[str], resolver: LabelResolver) -> dict[str, frozenset[int]]:
    entries = dataset_json.get(ANNOTATED_LABELS_KEY)
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        raise TypeError(
            f"dataset.json '{ANNOTATED_LABELS_KEY}': expected an object mapping case identifiers to lists of labels, "
            f"got {type(entries).__name__}"
        )
    known = set(case_identifiers)
    label_sets = {}
    for case, labels in entries.items():
        where = f"dataset.json '{ANNOTATED_LABELS_KEY}' of case {case!r}"
        if case not in known:
            raise ValueError(
                f"dataset.json '{ANNOTATED_LABELS_KEY}': expected identifiers of the dataset's {len(known)} training "
                f"cases, got unknown case {case!r}{_did_you_mean(str(case), sorted(known))}"
            )
        if not isinstance(labels, (list, tuple)):
            raise TypeError(f"{where}: expected a list of label names or values, got {type(labels).__name__} {labels!r}")
        label_sets[case] = resolver.resolve_all(labels, where)
    return label_sets


class AnnotatedTable:
    """Case identifiers → the ``(B, C)`` bool ``annotated`` table of the missing-label losses.

    Built once at training start (it validates the label sets and precomputes one row per case);
    ``table(batch['keys'])`` then only gathers rows. ``num_channels`` is the network's number of
    outputs. Softmax (label) datasets: column c is label value c, column 0 (background) is always
    True. Region datasets: column c is region c in nnU-Net's order
    (``LabelManager.foreground_regions``), True iff all the region's labels are annotated. Cases
    without a label set are fully annotated (all True).
    """

    def __init__(
        self,
        dataset_json: Mapping,
        case_identifiers: Iterable[str],
        num_channels: int,
        label_manager: Optional[LabelManager] = None,
    ):
        resolver = LabelResolver(dataset_json, label_manager)
        manager = resolver.label_manager
        case_identifiers = list(case_identifiers)
        label_sets = _validated(dataset_json, case_identifiers, resolver)
        expected = manager.num_segmentation_heads
        if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels != expected:
            kind = "regions" if manager.has_regions else "labels, background included"
            raise ValueError(
                f"num_channels: expected {expected} (the dataset's {kind}), got {num_channels!r}"
            )
        if manager.has_regions:
            # a region's labels as a set; nnU-Net lists a one-label region as a plain int
            columns = [frozenset(r if isinstance(r, (tuple, list)) else [r]) for r in manager.foreground_regions]
        else:
            # nnU-Net requires consecutive labels 0..C-1, so column c is label value c
            columns = [frozenset([c]) for c in range(num_channels)]
        self._index = {case: i for i, case in enumerate(case_identifiers)}
        rows = torch.ones(len(case_identifiers), expected, dtype=torch.bool)
        for case, annotated in label_sets.items():
            known = annotated | {0}  # background is always annotated
            rows[self._index[case]] = torch.tensor([column <= known for column in columns])
        self._rows = rows
        self.fully_annotated = bool(rows.all())
        self.label_sets = label_sets  # case -> annotated label values, as validate_annotated_labels gives

    def __call__(self, keys: Sequence[str], device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        """The ``(len(keys), C)`` bool table of a batch, given its case identifiers (``batch['keys']``)."""
        if isinstance(keys, str):
            raise TypeError(f"keys: expected a sequence of case identifiers (batch['keys']), got the str {keys!r}")
        try:
            indices = [self._index[key] for key in keys]
        except KeyError as error:
            raise ValueError(
                f"keys: expected identifiers of the {len(self._index)} cases the table was built for, "
                f"got unknown case {error.args[0]!r}"
            ) from None
        table = self._rows[indices]
        return table if device is None else table.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# label sets against label maps
# ---------------------------------------------------------------------------------------------
MAX_VOXELS_PER_READ = 2**22  # a slab of this many voxels at a time keeps the scan's memory small
MAX_CASES_IN_MESSAGE = 20


def _values_in(block: np.ndarray) -> set[int]:
    """The distinct values of an array (nnU-Net's int8 maps have -1 outside the nonzero mask)."""
    return {int(v) for v in np.unique(block)}


def labels_in(label_map) -> frozenset[int]:
    """The values in a label map: a numpy array or the array nnU-Net's dataset classes load (``np.memmap``,
    ``blosc2.NDArray``), ``(1, *spatial)`` as preprocessed (``(1, 1, x, y)`` for 2D). Read in slabs of the
    first spatial axis longer than 1, so a large case is never decompressed whole."""
    shape = tuple(label_map.shape)
    if len(shape) < 2:
        return frozenset(_values_in(np.asarray(label_map[:])))
    axis = next((a for a in range(1, len(shape)) if shape[a] > 1), 1)
    per_index = int(np.prod(shape)) // max(shape[axis], 1)
    step = max(1, MAX_VOXELS_PER_READ // max(per_index, 1))
    values: set[int] = set()
    for start in range(0, shape[axis], step):
        slab = (slice(None),) * axis + (slice(start, start + step),)
        values |= _values_in(np.asarray(label_map[slab]))
    return frozenset(values)


def check_label_maps(
    dataset_json: Mapping,
    label_sets: Mapping[str, frozenset],
    read_label_map: Callable[[str], object],
    cases: Optional[Iterable[str]] = None,
    label_manager: Optional[LabelManager] = None,
    progress: bool = True,
) -> list[str]:
    """Check that no label map contains a label its case's label set marks as not annotated.

    ``label_sets``: case -> annotated label values, as :func:`validate_annotated_labels` returns them.
    ``read_label_map(case)``: the case's integer label map (e.g. the ``seg`` of nnU-Net's
    ``dataset.load_case(case)``). Only the cases with a label set that marks some foreground label
    missing are read (a fully annotated case cannot contradict its set), and of those only the ones
    in ``cases`` when it is given. Background, nnU-Net's -1 outside the nonzero mask and the ignore
    label are never contradictions. Region datasets are compared where their label sets live: a
    region's name stands for all of its label values (:class:`LabelResolver`), so a label value with
    voxels must be in the set, whatever regions it belongs to.

    Returns the cases read, in order. Raises ONE ``ValueError`` that lists every contradicting case
    and its labels by name.
    """
    resolver = LabelResolver(dataset_json, label_manager)
    wanted = None if cases is None else set(cases)
    missing_of = {case: resolver.foreground_values - frozenset(annotated) for case, annotated in label_sets.items()
                  if wanted is None or case in wanted}
    to_scan = [case for case, missing in missing_of.items() if missing]
    contradictions: dict[str, list[int]] = {}
    for case in tqdm(to_scan, desc="label sets vs label maps", disable=not progress):
        missing = missing_of[case]
        found = sorted(missing & labels_in(read_label_map(case)))
        if found:
            contradictions[case] = found
    if contradictions:
        raise ValueError(_contradiction_message(contradictions, resolver))
    return to_scan


def _describe_value(value: int, resolver: LabelResolver) -> str:
    """'lesion' (2), or for a label value without its own name (regions): 1 (part of 'organ')."""
    for name, values in resolver.names.items():
        if values == {value}:
            return f"{name!r} ({value})"
    regions = [name for name, values in resolver.names.items() if value in values]
    return f"{value}" + (f" (part of {', '.join(map(repr, regions))})" if regions else "")


def _contradiction_message(contradictions: Mapping[str, Sequence[int]], resolver: LabelResolver) -> str:
    parts = []
    for case, values in list(contradictions.items())[:MAX_CASES_IN_MESSAGE]:
        labels = [_describe_value(v, resolver) for v in values]
        listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
        noun = "label" if len(labels) == 1 else "labels"
        parts.append(f"case {case!r} contains {noun} {listed}, which its label set marks as not annotated")
    more = len(contradictions) - MAX_CASES_IN_MESSAGE
    if more > 0:
        parts.append(f"... and {more} more case{'s' if more > 1 else ''}")
    count = len(contradictions)
    return (
        f"dataset.json '{ANNOTATED_LABELS_KEY}': expected label sets that include every label with voxels in the "
        f"case's label map, got {count} case{'s' if count > 1 else ''} whose {'sets do' if count > 1 else 'set does'} "
        f"not: {'; '.join(parts)}. Add those labels to the cases' sets, or set their voxels to background in "
        f"the raw label maps and preprocess again."
    )
