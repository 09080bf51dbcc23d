"""``nnunet-losses merge``: one partially labelled nnU-Net raw dataset from several datasets that each
annotate some structures of the same anatomy (the Decathlon's liver, pancreas and spleen CTs).

Marginal and leaf Dice (Shi et al., Fidon et al.; Tilborghs §2.1) were made for this: one network
trained on all of them, where a structure a dataset did not annotate reads as background there. This
command writes the dataset they need, as a NEW raw dataset (the sources are never touched):

* one label space: labels of the same name are one label; ``--label-map`` renames or joins labels of
  a source (``{"Dataset003_Liver": {"cancer": "liver_tumour"}}``). The merged labels are the distinct
  *atoms* of the sources: an atom is a label value, known by the set of label names it belongs to (a
  plain label: its own name; in a region dataset: every region containing it). Two sources that relate
  the same names differently (disjoint in one, overlapping in the other) are refused, naming both;
* each training case's ``annotated_labels``: the labels its source annotated, narrowed by the source's
  own ``annotated_labels`` where it has them;
* case identifiers prefixed by their source's name, images copied unchanged, label maps
  relabelled into the merged values with nnU-Net's reader/writer, ``imagesTs``/``labelsTs`` likewise;
* the provenance: dataset.json ``"case_sources"`` (case → source, training and held-out cases) and the
  same table as ``case_sources.json`` in the dataset folder, the ``--groups`` file of ``evaluate`` and
  ``report``; ``"merged_from"`` records the sources, prefixes and label map.

Every check runs before anything is written; the dataset is assembled in a hidden sibling folder and
renamed into place at the end, so an error or an interrupt leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Mapping, NoReturn, Optional, Sequence, Union

import numpy as np

from ..nnunet_io import (
    CASE_SOURCES_KEY,
    new_dataset_name,
    load_dataset_json,
    raw_dataset_name,
    raw_folder,
    read_image_files,
    read_json_file,
    read_label_file,
    reader_writer_for,
    save_dataset_json,
    test_files,
    training_files,
    UserInputError,
)
from ..training.label_sets import ANNOTATED_LABELS_KEY, LabelResolver, validate_annotated_labels
from ._subcommand import add_subcommand, progress, user_input
from .output import Table, folder_renamed_into_place, write_json

COMMAND = "merge"
GROUPS_FILE = "case_sources.json"
RESERVED_NAMES = ("background", "ignore")
DEFAULT_NAME = "Merged"


def _fail(message: str) -> NoReturn:
    raise UserInputError(message)


# ----------------------------------------------------------------------------------------------
# the sources
# ----------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """One source dataset: where it is, its files, and its labels under their merged names."""

    name: str  # DatasetXXX_Name
    folder: str
    dataset_json: Mapping
    resolver: LabelResolver
    training: dict  # case -> {"images": [...], "label": ...}
    test: dict  # case -> {"images": [...], "label": path or None}
    prefix: str = ""
    names: dict = field(default_factory=dict)  # merged name -> the source's label values it stands for
    merged_values: dict = field(default_factory=dict)  # source label value -> merged label value

    @property
    def short_name(self) -> str:
        return self.name[len("DatasetXXX_"):]

    def signature(self, value: int) -> frozenset:
        """The merged names of the labels and regions that contain source label ``value``."""
        return frozenset(name for name, values in self.names.items() if value in values)

    def atoms(self) -> dict:
        """Source label value -> its signature (the atom it becomes), in value order."""
        return {value: self.signature(value) for value in sorted(self.resolver.foreground_values)}


def _load_source(source: Union[str, int], raw_root: str) -> _Source:
    """A source by id, name or folder, with its training and held-out files checked to exist."""
    folder = os.path.abspath(source) if isinstance(source, str) and os.sep in source else None
    name = os.path.basename(folder) if folder else raw_dataset_name(source, raw_root)
    folder = folder or os.path.join(raw_root, name)
    if not re.fullmatch(r"Dataset\d{3}_\S+", name):
        _fail(f"source: expected an nnU-Net dataset folder named DatasetXXX_Name, got {folder}")
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        _fail(f"source: expected a raw dataset folder with a dataset.json, got {folder}")
    dataset_json = load_dataset_json(os.path.join(folder, "dataset.json"))
    with user_input(f"source {name}"):
        resolver = LabelResolver(dataset_json)
        training = training_files(folder, dataset_json)
    if not training:
        _fail(f"source {name}: expected training cases in {folder}, got none")
    test = test_files(folder, dataset_json)
    missing = [path for entry in (*training.values(), *test.values())
               for path in (*entry["images"], entry["label"]) if path is not None and not os.path.isfile(path)]
    if missing:
        _fail(f"source {name}: expected every image and label file to exist, got {len(missing)} missing, "
              f"e.g. {missing[0]}")
    return _Source(name, folder, dataset_json, resolver, training, test)


def _image_kind(source: _Source) -> str:
    """'2D' or '3D': nnU-Net's readers give 2D images the spacing 999 on their first axis."""
    first = next(iter(source.training.values()))["images"][0]
    _, properties = read_image_files(reader_writer_for(first, source.dataset_json), [first])
    return "2D" if float(properties["spacing"][0]) == 999 else "3D"


def _check_compatible(sources: Sequence[_Source]) -> None:
    """Same channels, file ending and image dimension (spacing may differ: nnU-Net resamples); distinct sources."""
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        _fail(f"sources: expected distinct datasets, got {', '.join(repeated)} more than once")
    first = sources[0]
    for source in sources[1:]:
        for key in ("channel_names", "file_ending"):
            mine, theirs = first.dataset_json.get(key), source.dataset_json.get(key)
            if key == "channel_names":
                mine, theirs = ({str(k): v for k, v in (d or {}).items()} for d in (mine, theirs))
            if mine != theirs:
                _fail(f"{key}: expected the same in every source, got {mine!r} in {first.name} and {theirs!r} "
                      f"in {source.name}")
    kinds = [_image_kind(source) for source in sources]
    if len(set(kinds)) > 1:
        other = kinds.index(next(k for k in kinds if k != kinds[0]))
        _fail(f"images: expected the same dimension in every source (nnU-Net trains one), got {kinds[0]} in "
              f"{first.name} and {kinds[other]} in {sources[other].name}")


def _assign_prefixes(sources: Sequence[_Source]) -> None:
    """Each source's case prefix: its short name (``Liver_``), or its full name where short names repeat."""
    shorts = [s.short_name for s in sources]
    for source in sources:
        source.prefix = (source.short_name if shorts.count(source.short_name) == 1 else source.name) + "_"


def _merged_cases(sources: Sequence[_Source], split: str) -> dict:
    """Merged case identifier -> (source, its own identifier) of the training or test cases."""
    cases = {}
    for source in sources:
        for case in sorted(getattr(source, split)):
            merged = source.prefix + case
            if merged in cases:
                other, own = cases[merged]
                _fail(f"case identifiers: expected unique identifiers after prefixing, got {merged!r} from "
                      f"{other.name} ({own}) and {source.name} ({case})")
            cases[merged] = (source, case)
    return cases


# ----------------------------------------------------------------------------------------------
# one label space
# ----------------------------------------------------------------------------------------------
def load_label_map(label_map: Union[None, str, os.PathLike, Mapping], sources: Sequence[_Source]) -> dict:
    """``{source name: {its label name: merged name}}`` from a JSON file or mapping, checked against the sources."""
    if label_map is None:
        return {}
    if not isinstance(label_map, Mapping):
        label_map = read_json_file(label_map, "--label-map")
    by_name = {s.name: s for s in sources}
    if not isinstance(label_map, Mapping):
        _fail(f"--label-map: expected an object {{source: {{label: new name}}}}, got {type(label_map).__name__}")
    for source_name, renames in label_map.items():
        if source_name not in by_name:
            _fail(f"--label-map: expected source dataset names ({', '.join(by_name)}), got {source_name!r}")
        if not isinstance(renames, Mapping) or not all(isinstance(v, str) for v in renames.values()):
            _fail(f"--label-map of {source_name}: expected an object {{label: new name}}, got {renames!r}")
        known = by_name[source_name].resolver.names
        for label, new in renames.items():
            if label not in known:
                _fail(f"--label-map of {source_name}: expected label names of its dataset.json "
                      f"({', '.join(map(repr, known))}), got {label!r}")
            if not new or new in RESERVED_NAMES:
                _fail(f"--label-map of {source_name}: expected a foreground label name for {label!r}, got {new!r}")
    return {name: dict(renames) for name, renames in label_map.items()}


def _name_the_labels(source: _Source, renames: Mapping) -> None:
    """``source.names``: merged name -> source label values (renamed labels joined under one name)."""
    for label, values in source.resolver.names.items():
        if 0 in values:
            continue  # the background, whatever its name
        new = renames.get(label, label)
        source.names[new] = source.names.get(new, frozenset()) | values


@dataclass(frozen=True)
class LabelSpace:
    """The merged labels: atoms (merged values 1..A), names, and what nnU-Net's dataset.json says."""

    atoms: list  # signature of merged value i + 1
    names: list  # merged label names, in order of first appearance
    regions: bool  # a region (sigmoid) dataset
    ignore_value: Optional[int]

    def values_of(self, name: str) -> list:
        return [i + 1 for i, signature in enumerate(self.atoms) if name in signature]

    def labels_json(self) -> dict:
        labels = {"background": 0}
        for name in self.names:
            values = self.values_of(name)
            labels[name] = values[0] if not self.regions or len(values) == 1 else values
        if self.ignore_value is not None:
            labels["ignore"] = self.ignore_value
        return labels

    def regions_class_order(self) -> list:
        """Per region in nnU-Net's order (the one of :meth:`labels_json`), the value its voxels get when
        predictions become labels: its atom in the fewest names (outer regions are painted first)."""
        return [min(self.values_of(name), key=lambda v: (len(self.atoms[v - 1]), v)) for name in self.names]

    def lookup(self, source: _Source) -> np.ndarray:
        """Source label value -> merged value (-1: a value the source's dataset.json does not define)."""
        values = sorted(source.resolver.foreground_values | {0, source.resolver.ignore_label or 0})
        table = np.full(max(values) + 1, -1, dtype=np.int64)
        table[0] = 0
        for value, merged in source.merged_values.items():
            table[value] = merged
        if source.resolver.ignore_label is not None:
            table[source.resolver.ignore_label] = self.ignore_value
        return table


def build_label_space(sources: Sequence[_Source], label_map: Mapping) -> LabelSpace:
    """The merged labels of the sources (after ``label_map``); refuses names the sources relate differently.

    A source's label value is the merged atom that agrees with it on the names both know (the least
    specific one when several do), or a new atom; the atom then belongs to the union of their names."""
    atoms, known, origin, names = [], [], [], []
    for source in sources:
        _name_the_labels(source, label_map.get(source.name, {}))
        names += [n for n in source.names if n not in names]
        mine = frozenset(source.names)
        for value, signature in source.atoms().items():
            index = _agreeing_atom(signature, mine, atoms, known)
            if index is None:
                atoms.append(signature)
                known.append(mine)
                origin.append((source, value))
                index = len(atoms) - 1
            atoms[index], known[index] = atoms[index] | signature, known[index] | mine
            source.merged_values[value] = index + 1
    for source in sources:
        _check_relations(source, atoms, origin)
    one_to_one = all(len(s) == 1 for s in atoms) and len(atoms) == len(names)
    regions = any(s.resolver.label_manager.has_regions for s in sources) or not one_to_one
    ignore = len(atoms) + 1 if any(s.resolver.ignore_label is not None for s in sources) else None
    order = sorted(names, key=lambda n: (-len([a for a in atoms if n in a]), names.index(n))) if regions else names
    return LabelSpace(atoms, order, regions, ignore)


def _agreeing_atom(signature: frozenset, mine: frozenset, atoms: list, known: list) -> Optional[int]:
    """The merged atom that has the same names as ``signature`` among the names both sides know (some)."""
    agreeing = [i for i, (atom, theirs) in enumerate(zip(atoms, known))
                if signature & theirs and signature & theirs == atom & mine]
    return min(agreeing, key=lambda i: (len(atoms[i]), i)) if agreeing else None


def _check_relations(source: _Source, atoms: list, origin: list) -> None:
    """Every merged atom, seen through the names ``source`` knows, must be one of its own atoms (or none):
    else two sources relate the same names differently (disjoint in one, overlapping in the other)."""
    known = frozenset(source.names)
    own = set(source.atoms().values())
    for signature, (other, value) in zip(atoms, origin):
        seen = signature & known
        if seen and seen not in own:
            listed = " and ".join(map(repr, sorted(seen)))
            _fail(f"labels: expected one definition per label name across the sources, got {listed} defined "
                  f"differently by {source.name} and {other.name}: {other.name}'s label value {value} belongs to "
                  f"{' and '.join(map(repr, sorted(signature)))}, while no label value of {source.name} belongs to "
                  f"exactly {listed} (rename one with --label-map)")


# ----------------------------------------------------------------------------------------------
# label sets and the merged dataset.json
# ----------------------------------------------------------------------------------------------
def annotated_names(source: _Source, annotated_values: Optional[frozenset] = None) -> list:
    """The merged names a case of ``source`` annotates: all of the source's, or where the source has its own
    label set for the case (``annotated_values``), the names whose values all lie in it."""
    return [name for name, values in source.names.items()
            if annotated_values is None or values <= annotated_values]


def _case_label_sets(sources: Sequence[_Source], cases: Mapping) -> dict:
    """Merged training case -> the merged label names annotated in it."""
    own_sets = {}
    for source in sources:
        with user_input(f"source {source.name}"):
            own_sets[source.name] = validate_annotated_labels(source.dataset_json, list(source.training),
                                                              source.resolver.label_manager)
    return {merged: annotated_names(source, own_sets[source.name].get(case)) for merged, (source, case) in
            cases.items()}


def _check_label_sets_resolve(label_sets: Mapping, space: LabelSpace, dataset_json: Mapping,
                              cases: Mapping) -> None:
    """In a region dataset a label set of names must read back as exactly those names (a region counts as
    annotated iff all its values are): refuse the sets that would mark more regions annotated."""
    if not space.regions:
        return
    resolver = LabelResolver(dataset_json)
    checked = set()
    for merged, names in label_sets.items():
        if tuple(names) in checked:
            continue
        checked.add(tuple(names))
        values = resolver.resolve_all(names, f"label set of {merged}")
        read_back = [n for n in space.names if resolver.names[n] <= values]
        extra = [n for n in read_back if n not in names]
        if extra:
            _fail(f"annotated_labels of {cases[merged][0].name}: expected label sets the merged region dataset can "
                  f"record, got {names}, whose label values also make {extra} count as annotated (a region is "
                  "annotated iff all its values are); rename or leave out that source's labels with --label-map")


def _merged_dataset_json(sources: Sequence[_Source], space: LabelSpace, target: str, training: Mapping,
                         test: Mapping, label_sets: Mapping, label_map: Mapping) -> dict:
    first = sources[0].dataset_json
    dataset_json = {"channel_names": first["channel_names"], "labels": space.labels_json(),
                    "numTraining": len(training), "file_ending": first["file_ending"]}
    if space.regions:
        dataset_json["regions_class_order"] = space.regions_class_order()
    if "overwrite_image_reader_writer" in first:
        dataset_json["overwrite_image_reader_writer"] = first["overwrite_image_reader_writer"]
    dataset_json.update(
        name=target, description="Merged by nnunet-losses merge from " + ", ".join(s.name for s in sources),
        **{ANNOTATED_LABELS_KEY: dict(label_sets),
           CASE_SOURCES_KEY: {case: source.name for case, (source, _) in {**training, **test}.items()},
           "merged_from": {"sources": [s.name for s in sources], "prefixes": {s.name: s.prefix for s in sources},
                           "label_map": label_map}})
    json.dumps(dataset_json)  # a non-serialisable entry fails here, before writing
    return dataset_json


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
@dataclass
class Merge:
    """What :func:`merge_datasets` did."""

    target: str
    target_folder: str
    table: Table  # one row per source
    labels: dict  # the merged dataset.json's "labels"

    def summary(self) -> str:
        labels = ", ".join(f"{name} {value}" for name, value in self.labels.items())
        return "\n".join([f"{self.target}: merged into {self.target_folder}", f"  labels: {labels}",
                          self.table.markdown("lrrrl")])


def merge_datasets(sources: Sequence[Union[str, int]], target_id: int, *, name: Optional[str] = None,
                   label_map: Union[None, str, os.PathLike, Mapping] = None, progress: bool = True) -> Merge:
    """Write ``DatasetXXX_<name>`` (XXX = ``target_id``, default name ``Merged``) in nnUNet_raw: the ``sources``
    (ids, names or folders of raw datasets) in one label space, with per-case label sets and provenance.

    Every check runs before anything is written; the dataset is assembled in a hidden temporary folder and
    renamed into place at the end, so an error or an interrupt leaves nothing behind.
    """
    if isinstance(sources, (str, int)) or len(sources) < 2:
        _fail(f"sources: expected at least two datasets to merge, got {sources!r}")
    raw_root = raw_folder()
    target = new_dataset_name(target_id, name or DEFAULT_NAME)
    target_folder = os.path.join(raw_root, target)
    if os.path.exists(target_folder):
        _fail(f"target: expected a new dataset folder, got existing {target_folder}")
    loaded = [_load_source(source, raw_root) for source in sources]
    _check_compatible(loaded)
    _assign_prefixes(loaded)
    renames = load_label_map(label_map, loaded)
    space = build_label_space(loaded, renames)
    training, test = _merged_cases(loaded, "training"), _merged_cases(loaded, "test")
    label_sets = _case_label_sets(loaded, training)
    dataset_json = _merged_dataset_json(loaded, space, target, training, test, label_sets, renames)
    _check_label_sets_resolve(label_sets, space, dataset_json, training)
    lookups = {s.name: space.lookup(s) for s in loaded}
    readers = {s.name: reader_writer_for(next(iter(s.training.values()))["images"][0], s.dataset_json)
               for s in loaded}

    with folder_renamed_into_place(target_folder) as work:
        _write_cases(work, training, test, lookups, readers, dataset_json["file_ending"], progress)
        save_dataset_json(dataset_json, work)
        write_json(dataset_json[CASE_SOURCES_KEY], os.path.join(work, GROUPS_FILE))
    return Merge(target, target_folder, _summary_table(loaded, training, test, label_sets), space.labels_json())


def _summary_table(sources: Sequence[_Source], training: Mapping, test: Mapping, label_sets: Mapping) -> Table:
    rows = []
    for source in sources:
        own = [case for case, (s, _) in training.items() if s is source]
        sets = sorted({tuple(label_sets[case]) for case in own})
        rows.append([source.name, source.prefix, str(len(own)), str(sum(s is source for s, _ in test.values())),
                     "; ".join(", ".join(names) or "(none)" for names in sets)])
    return Table(["source", "prefix", "training cases", "test cases", "label sets"], rows)


def relabel(label_file: str, target_file: str, lookup: np.ndarray, reader_writer) -> None:
    """A label map read with nnU-Net's reader, its values mapped through ``lookup``, written with the same
    geometry; a value the source's dataset.json does not define is an error naming the file."""
    segmentation, properties = read_label_file(reader_writer, label_file)
    segmentation = np.rint(segmentation).astype(np.int64)
    values = np.unique(segmentation)
    unknown = [int(v) for v in values if v < 0 or v >= len(lookup) or lookup[v] < 0]
    if unknown:
        _fail(f"{label_file}: expected label values of its dataset.json, got {unknown}")
    reader_writer.write_seg(lookup[segmentation[0]].astype(np.uint8 if lookup.max() < 256 else np.int32),
                            target_file, properties)


def _write_cases(work: str, training: Mapping, test: Mapping, lookups: Mapping, readers: Mapping,
                 file_ending: str, show_progress: bool) -> None:
    for folder in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test else ()):
        os.makedirs(os.path.join(work, folder))
    every_case = [(case, source, own, split) for split, cases in (("Tr", training), ("Ts", test))
                  for case, (source, own) in cases.items()]
    for case, source, own, split in progress(every_case, desc=COMMAND, unit="case", show=show_progress):
        files = source.training[own] if split == "Tr" else source.test[own]
        for channel, image in enumerate(files["images"]):
            # a copy, not a hard link: the work folder's files get the user's umask, which on a link would
            # change the source file's permissions
            shutil.copyfile(image, os.path.join(work, f"images{split}", f"{case}_{channel:04d}{file_ending}"))
        if files["label"] is not None:
            relabel(files["label"], os.path.join(work, f"labels{split}", case + file_ending),
                    lookups[source.name], readers[source.name])


def _run(args: argparse.Namespace) -> int:
    sources = [int(s) if s.isdigit() else s for s in args.sources]
    merged = merge_datasets(sources, args.target_id, name=args.name, label_map=args.label_map,
                            progress=not args.no_progress)
    print(merged.summary())
    return 0


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers, COMMAND, _run,
        help="merge partially labelled nnU-Net raw datasets into one (one label space, label sets per case)",
        description=textwrap.fill(
            "Write a NEW nnU-Net raw dataset (in $nnUNet_raw) from several datasets that annotate different "
            "structures of the same anatomy, for nnUNetTrainerMarginalDice / nnUNetTrainerLeafDice. Labels of "
            "the same name become one label (--label-map renames or joins them per source); every training "
            "case's dataset.json \"annotated_labels\" lists the labels its source annotated; case identifiers "
            "are prefixed by their source; images are copied unchanged and label maps relabelled "
            "with nnU-Net's reader/writer (imagesTs/labelsTs too); dataset.json \"case_sources\" and "
            f"{GROUPS_FILE} record each case's source (a --groups file for evaluate and report). Channel names "
            "and file endings must agree; spacings may differ. The sources are never modified; nothing is "
            "written when a check fails or the command is interrupted.", width=100),
        epilog=(
            "examples:\n"
            "  nnunet-losses merge 3 7 9 --target-id 600 --name LiverPancreasSpleen\n"
            "  nnunet-losses merge Dataset003_Liver Dataset007_Pancreas --target-id 601 --label-map names.json\n"
            "label map (JSON): {\"Dataset003_Liver\": {\"cancer\": \"liver_tumour\"},\n"
            "                   \"Dataset007_Pancreas\": {\"cancer\": \"pancreas_tumour\"}}"
        ),
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="the datasets to merge: ids (3), names (Dataset003_Liver) or folders of raw datasets")
    parser.add_argument("--target-id", "-t", type=int, required=True,
                        help="id of the new dataset (1-999); must not be used in nnUNet_raw, "
                             "nnUNet_preprocessed or nnUNet_results")
    parser.add_argument("--name", "--target-name", dest="name", default=None,
                        help=f"name part of the new dataset (DatasetXXX_<name>; default {DEFAULT_NAME})")
    parser.add_argument("--label-map", metavar="FILE", default=None,
                        help="JSON {source: {label: new name}}: labels renamed per source; two labels of one source "
                             "given one name are joined")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar over cases")
