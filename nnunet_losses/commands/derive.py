"""``nnunet-losses derive-partial``: derive a partially labelled nnU-Net raw dataset from a fully labelled one.

The partial-label experiments of Tilborghs et al. (ACDC without the myocardium at end-systole, BraTS
with the low-grade gliomas' labels replaced by empty maps) need a training set in which some labels
are missing from some cases. This command writes one as a NEW raw dataset next to the source (which
it never touches): selected cases get some labels set to background (``--remove-labels``) or their
whole label map emptied (``--empty``); images are copied unchanged; the label sets are recorded in
the new dataset.json under ``"annotated_labels"`` (see :mod:`nnunet_losses.training.label_sets`).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import shutil
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, NoReturn, Optional, Sequence, Union

import numpy as np

from ..nnunet_io import (
    load_dataset_json,
    new_dataset_name,
    raw_dataset_name,
    raw_folder,
    read_label_file,
    reader_writer_for,
    save_dataset_json,
    training_files,
    UserInputError,
)
from ..training.label_sets import ANNOTATED_LABELS_KEY, LabelResolver, validate_annotated_labels
from .output import folder_renamed_into_place
from ._subcommand import add_subcommand, progress as progress_bar, shown_items, user_input

COMMAND = "derive-partial"
# tests only: seconds to wait after each case written, so that a test can interrupt a run in the middle
CASE_DELAY_VARIABLE = "NNUNET_LOSSES_TEST_CASE_DELAY_S"


@dataclass
class Derivation:
    """What :func:`derive_partial_dataset` did."""

    source: str
    target: str
    target_folder: str
    num_cases: int
    selected: list[str]
    removed_labels: list[int]  # integer label values set to background in the selected cases
    removed_voxels: dict[int, int] = field(default_factory=dict)  # label value -> voxels set to background
    names: dict[int, str] = field(default_factory=dict)  # label value -> its name, where it has one

    def summary(self) -> str:
        shown = ", ".join(self.selected[:10]) + (f", ... ({len(self.selected) - 10} more)" if len(self.selected) > 10 else "")
        lines = [
            f"{self.target}: derived from {self.source} in {self.target_folder}",
            f"  cases selected: {len(self.selected)} of {self.num_cases} ({shown})",
            "  voxels set to background, per label:",
        ]
        for value in self.removed_labels:
            name = self.names.get(value)
            label = f"{name!r} ({value})" if name is not None else str(value)
            lines.append(f"    {label}: {self.removed_voxels.get(value, 0)}")
        return "\n".join(lines)


def _fail(message: str) -> NoReturn:
    raise UserInputError(message)


@dataclass(frozen=True)
class _Source:
    """The fully labelled dataset in nnUNet_raw."""

    raw_root: str
    name: str
    folder: str
    dataset_json: Mapping


def _source_dataset(source: Union[str, int]) -> _Source:
    raw_root = raw_folder()
    name = raw_dataset_name(source, raw_root)
    folder = os.path.join(raw_root, name)
    return _Source(raw_root, name, folder, load_dataset_json(os.path.join(folder, "dataset.json")))


def _select_cases(identifiers: list[str], cases_pattern, cases_file, fraction, seed) -> list[str]:
    chosen = [option for option, value in
              (("--cases-pattern", cases_pattern), ("--cases-file", cases_file), ("--fraction", fraction))
              if value is not None]
    if len(chosen) != 1:
        _fail(f"case selection: expected exactly one of --cases-pattern, --cases-file, --fraction, got {chosen or 'none'}")
    if cases_pattern is not None:
        patterns = [cases_pattern] if isinstance(cases_pattern, str) else list(cases_pattern)
        selected = [case for case in identifiers if any(fnmatch.fnmatchcase(case, p) for p in patterns)]
        if not selected:
            _fail(f"--cases-pattern: expected a pattern matching some of the {len(identifiers)} training cases "
                  f"(e.g. {identifiers[0]!r}), got {patterns} matching none")
        return selected
    if cases_file is not None:
        if not os.path.isfile(cases_file):
            got = "a folder" if os.path.isdir(cases_file) else "missing file"
            _fail(f"--cases-file: expected a file with one case identifier per line, got {got} {cases_file!r}")
        try:
            with open(cases_file, encoding="utf-8") as handle:
                listed = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except UnicodeDecodeError:
            _fail(f"--cases-file: expected a text file with one case identifier per line, got binary {cases_file!r}")
        unknown = sorted(set(listed) - set(identifiers))
        if unknown:
            _fail(f"--cases-file: expected identifiers of the source's training cases, got unknown "
                  f"{shown_items(map(repr, unknown))}")
        if not listed:
            _fail(f"--cases-file: expected at least one case identifier, got an empty file {cases_file!r}")
        wanted = set(listed)
        return [case for case in identifiers if case in wanted]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        _fail(f"--fraction: expected a number in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        _fail(f"--seed: expected an integer, got {seed!r}")
    count = int(round(fraction * len(identifiers)))
    if count == 0:
        _fail(f"--fraction: expected a fraction selecting at least one of the {len(identifiers)} cases, got {fraction}")
    picked = np.random.default_rng(seed).choice(len(identifiers), size=count, replace=False)
    return [identifiers[i] for i in sorted(picked)]


def parse_label(token: str, resolver: LabelResolver) -> Union[str, int]:
    """A command-line label: a name of dataset.json 'labels' if it is one, else an integer value if it is one."""
    if token in resolver.names:
        return token
    try:
        return int(token)
    except ValueError:
        return token


def derive_partial_dataset(
    source: Union[str, int],
    target_id: int,
    *,
    remove_labels: Optional[Sequence[Union[str, int]]] = None,
    empty: bool = False,
    cases_pattern: Optional[Union[str, Sequence[str]]] = None,
    cases_file: Optional[str] = None,
    fraction: Optional[float] = None,
    seed: int = 0,
    target_name: Optional[str] = None,
    progress: bool = True,
) -> Derivation:
    """Write ``DatasetXXX_<target_name>`` (XXX = ``target_id``) in nnUNet_raw: the source with labels removed.

    Exactly one of ``remove_labels`` (names or values set to background in the selected cases) and
    ``empty`` (the selected cases' label maps replaced by empty maps); exactly one selector:
    ``cases_pattern`` (glob(s) on case identifiers), ``cases_file`` (one identifier per line, ``#``
    comments) or ``fraction`` (``round(fraction * cases)`` cases drawn with ``seed``). Voxels of the
    ignore label are kept. Every check runs before anything is written; the dataset is assembled in a
    hidden temporary folder and renamed into place at the end, so a failure leaves nothing behind.
    """
    # ---- every check before anything is written
    if not isinstance(empty, bool):
        _fail(f"empty: expected a bool, got {empty!r}")
    if empty == (remove_labels is not None):
        _fail("operation: expected exactly one of --remove-labels and --empty, got "
              + ("both" if empty else "neither"))
    source_dataset = _source_dataset(source)
    default_name = source_dataset.name[len("DatasetXXX_"):] + "_partial"
    target = new_dataset_name(target_id, default_name if target_name is None else target_name)
    target_folder = os.path.join(source_dataset.raw_root, target)
    if os.path.exists(target_folder):
        _fail(f"target: expected a new dataset folder, got existing {target_folder}")
    with user_input():
        resolver = LabelResolver(source_dataset.dataset_json)
        removed = _labels_to_remove(resolver, empty, remove_labels)
    files = _source_training_files(source_dataset)
    identifiers = sorted(files)
    with user_input(f"source {source_dataset.name}"):
        previous_sets = validate_annotated_labels(source_dataset.dataset_json, identifiers, resolver.label_manager)
    selected = _select_cases(identifiers, cases_pattern, cases_file, fraction, seed)
    selection = ({"cases_pattern": cases_pattern} if cases_pattern is not None
                 else {"cases_file": os.path.abspath(cases_file)} if cases_file is not None
                 else {"fraction": fraction, "seed": seed})
    new_json = _derived_dataset_json(source_dataset, resolver, previous_sets, selected, removed, empty, selection)
    reader_writer = reader_writer_for(files[identifiers[0]]["images"][0], source_dataset.dataset_json)

    # ---- writing, into a hidden folder renamed into place at the end
    derivation = Derivation(source=source_dataset.name, target=target, target_folder=target_folder,
                            num_cases=len(identifiers), selected=selected, removed_labels=sorted(removed),
                            names={v: shown for v, shown in zip(sorted(removed), resolver.describe(removed))
                                   if isinstance(shown, str)})
    with folder_renamed_into_place(target_folder) as work:
        removed_voxels = _write_training_cases(work, files, identifiers, set(selected), removed, reader_writer,
                                               source_dataset.dataset_json["file_ending"], progress)
        _copy_test_folders(source_dataset.folder, work)
        save_dataset_json(new_json, work)
    derivation.removed_voxels = {value: removed_voxels.get(value, 0) for value in sorted(removed)}
    return derivation


def _copy_test_folders(source_folder: str, work: str) -> None:
    for folder in ("imagesTs", "labelsTs"):
        if os.path.isdir(os.path.join(source_folder, folder)):
            shutil.copytree(os.path.join(source_folder, folder), os.path.join(work, folder))


def _labels_to_remove(resolver: LabelResolver, empty: bool, remove_labels) -> frozenset:
    """The label values set to background: every foreground label with ``empty``, else ``remove_labels`` resolved."""
    if empty:
        return resolver.foreground_values
    if isinstance(remove_labels, (str, int)):
        remove_labels = [remove_labels]
    if not remove_labels:
        _fail("--remove-labels: expected at least one label name or value, got none")
    return resolver.resolve_all(remove_labels, "--remove-labels")


def _source_training_files(source: _Source) -> dict:
    """Case → its image and label files, checked to be there: every case has one image per channel
    and a label, and (imagesTr/labelsTr layout) every file of those folders belongs to a case."""
    files = training_files(source.folder, source.dataset_json)
    if not files:
        _fail(f"source: expected training cases in {source.folder}, got none")
    if "dataset" not in source.dataset_json:
        _check_no_stray_files(source, files)
    missing = [path for case in sorted(files) for path in (*files[case]["images"], files[case]["label"])
               if not os.path.isfile(path)]
    if missing:
        _fail(f"source: expected every training image and label file to exist, got {len(missing)} missing: "
              + shown_items(missing))
    channels = len(source.dataset_json.get("channel_names", source.dataset_json.get("modality", {})))
    incomplete = [case for case in sorted(files) if channels and len(files[case]["images"]) != channels]
    if incomplete:
        _fail(f"source: expected {channels} image files (one per channel of dataset.json) per training case, got "
              f"{len(files[incomplete[0]]['images'])} for {shown_items(incomplete)}")
    return files


def _check_no_stray_files(source: _Source, files: Mapping) -> None:
    """Every file of imagesTr and labelsTr with the file ending is an image or the label of a case."""
    ending = source.dataset_json["file_ending"]
    listed = {os.path.abspath(path) for entry in files.values() for path in (*entry["images"], entry["label"])}
    kinds = {"labelsTr": "labels without images", "imagesTr": f"images of no case (named other than CASE_XXXX{ending})"}
    for folder, kind in kinds.items():
        path = os.path.join(source.folder, folder)
        stray = sorted(name for name in (os.listdir(path) if os.path.isdir(path) else ())
                       if name.endswith(ending) and os.path.abspath(os.path.join(path, name)) not in listed)
        if stray:
            _fail(f"source: expected every file of {folder} to belong to a training case, got {kind}: "
                  + shown_items([os.path.join(path, name) for name in stray]))


def _derived_dataset_json(source: _Source, resolver: LabelResolver, previous_sets: Mapping, selected: list,
                          removed: frozenset, empty: bool, selection: dict) -> dict:
    """The source's dataset.json with the new label sets under ``annotated_labels`` and what was done."""
    label_sets = {case: set(values) for case, values in previous_sets.items()}
    for case in selected:
        label_sets[case] = set() if empty else set(label_sets.get(case, resolver.foreground_values)) - removed
    new_json = copy.deepcopy(source.dataset_json)
    new_json.pop("dataset", None)  # the new dataset uses the standard imagesTr/labelsTr layout
    new_json[ANNOTATED_LABELS_KEY] = {case: resolver.describe(label_sets[case]) for case in sorted(label_sets)}
    new_json["derived_from"] = {
        "dataset": source.name,
        "operation": "empty" if empty else "remove_labels",
        "removed_labels": resolver.describe(removed),
        "selection": selection,
        "selected_cases": selected,
    }
    json.dumps(new_json)  # a non-serialisable entry fails here, before writing
    return new_json


def _write_training_cases(work: str, files: Mapping, identifiers: Sequence[str], chosen: set, removed: frozenset,
                          reader_writer, file_ending: str, show_progress: bool) -> Counter:
    """imagesTr/ and labelsTr/ in ``work``: images copied, the chosen cases' labels rewritten without
    ``removed``; returns the voxels set to background per label value."""
    os.makedirs(os.path.join(work, "imagesTr"))
    os.makedirs(os.path.join(work, "labelsTr"))
    removed_voxels: Counter = Counter()
    delay = float(os.environ.get(CASE_DELAY_VARIABLE, 0))
    for case in progress_bar(identifiers, COMMAND, "case", show_progress):
        time.sleep(delay)
        for channel, image in enumerate(files[case]["images"]):
            shutil.copy2(image, os.path.join(work, "imagesTr", f"{case}_{channel:04d}{file_ending}"))
        label_out = os.path.join(work, "labelsTr", case + file_ending)
        if case not in chosen:
            shutil.copy2(files[case]["label"], label_out)
            continue
        segmentation, properties = read_label_file(reader_writer, files[case]["label"])
        segmentation = np.rint(segmentation).astype(np.int32)
        hit = np.isin(segmentation, sorted(removed))
        values, counts = np.unique(segmentation[hit], return_counts=True)
        removed_voxels.update(dict(zip(values.tolist(), counts.tolist())))
        segmentation[hit] = 0
        reader_writer.write_seg(segmentation[0], label_out, properties)
    return removed_voxels


def _run(args: argparse.Namespace) -> int:
    remove_labels = None
    if args.remove_labels is not None:
        # names or values: resolve a name first, so a label literally named "2" stays a name
        with user_input():
            resolver = LabelResolver(_source_dataset(args.source).dataset_json)
        remove_labels = [parse_label(token, resolver) for token in args.remove_labels]
    derivation = derive_partial_dataset(
        args.source, args.target_id, remove_labels=remove_labels, empty=args.empty,
        cases_pattern=args.cases_pattern, cases_file=args.cases_file, fraction=args.fraction, seed=args.seed,
        target_name=args.target_name, progress=not args.no_progress,
    )
    print(derivation.summary())
    return 0


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers, COMMAND, _run,
        help="derive a partially labelled nnU-Net raw dataset from a fully labelled one",
        description=textwrap.fill(
            "Write a NEW nnU-Net raw dataset (in $nnUNet_raw) in which the selected training cases miss some "
            "labels: --remove-labels sets the given labels to background, --empty replaces the label map by an "
            "empty one. Images (and imagesTs/labelsTs) are copied unchanged, label files are read and written "
            "with nnU-Net's reader/writer for the dataset's file_ending (geometry preserved), and the label "
            "sets are recorded in the new dataset.json under \"annotated_labels\" (case -> annotated labels; "
            "unlisted cases are fully annotated). The source dataset is never modified; ignore-label voxels "
            "are kept. Nothing is written when a check fails.", width=100),
        epilog=(
            "examples:\n"
            "  nnunet-losses derive-partial 27 --target-id 527 --remove-labels MYO --cases-file es_frames.txt\n"
            "  nnunet-losses derive-partial Dataset032_BraTS --target-id 532 --empty --cases-pattern 'LGG_*'\n"
            "  nnunet-losses derive-partial 27 --target-id 528 --remove-labels 2 --fraction 0.5 --seed 0"
        ),
    )
    parser.add_argument("source", metavar="DATASET_NAME_OR_ID",
                        help="the fully labelled source dataset in $nnUNet_raw, by id (27) or name (Dataset027_ACDC)")
    parser.add_argument("--target-id", "-t", type=int, required=True,
                        help="id of the new dataset (1-999); must not be used in nnUNet_raw, "
                             "nnUNet_preprocessed or nnUNet_results")
    parser.add_argument("--target-name", default=None,
                        help="name part of the new dataset (DatasetXXX_<name>); default: the source's name + '_partial'")
    operation = parser.add_mutually_exclusive_group(required=True)
    operation.add_argument("--remove-labels", nargs="+", metavar="NAME_OR_VALUE",
                           help="labels to set to background in the selected cases, by name in dataset.json "
                                "'labels' or by integer value (a region's name stands for all its labels)")
    operation.add_argument("--empty", action="store_true",
                           help="replace the selected cases' label maps by empty (all-background) maps; "
                                "their label set is recorded as [] (nothing annotated)")
    selection = parser.add_mutually_exclusive_group(required=True)
    selection.add_argument("--cases-pattern", nargs="+", metavar="GLOB",
                           help="select the cases whose identifier matches any of these shell-style patterns "
                                "(e.g. 'patient*_frame12'; quote them)")
    selection.add_argument("--cases-file", metavar="FILE",
                           help="select the cases listed in FILE, one identifier per line ('#' starts a comment)")
    selection.add_argument("--fraction", type=float, metavar="F",
                           help="select round(F x number of cases) cases at random, F in (0, 1]")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of --fraction (default: 0), recorded in the new dataset.json")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar over cases")
