"""``nnunet-losses merge`` on tiny hand-made nnU-Net raw datasets in a temporary nnUNet_raw, and one real
nnUNetv2_plan_and_preprocess + nnUNetv2_train of nnUNetTrainerMarginalDice on a merged dataset (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_losses.commands import merge
from nnunet_losses.commands.cli import main
from nnunet_losses.commands.evaluation import load_groups
from nnunet_losses.training.label_sets import AnnotatedTable

SHAPE = (3, 4, 5)  # z, y, x as SimpleITK arrays are indexed
SPACING, ORIGIN = (0.8, 1.0, 2.5), (10.0, -20.0, 3.0)
LIVER = {"background": 0, "liver": 1, "tumour": 2}
SPLEEN = {"background": 0, "spleen": 1}
SPLEEN_LIVER = {"background": 0, "spleen": 1, "liver": 2}
CASES = ("case_000", "case_001", "case_002")


def write_image(array: np.ndarray, path: Path, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path), True)


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def make_dataset(raw: Path, dataset_id: int, name: str, labels: dict, seed: int = 0, channels=("CT",),
                 file_ending: str = ".nii.gz", spacing=SPACING, regions_class_order=None, **extra) -> Path:
    """Dataset<id>_<name>: 3 training cases and 1 held-out case, label values drawn from those of ``labels``."""
    rng = np.random.default_rng(seed)
    labels = json.loads(json.dumps(labels))  # nnU-Net's generate_dataset_json turns lists into tuples in place
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    values = sorted({v for value in labels.values() for v in (value if isinstance(value, list) else [value])})
    for split, cases in (("Tr", CASES), ("Ts", ("test_000",))):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir()
        for case in cases:
            for channel in range(len(channels)):
                write_image(rng.normal(size=SHAPE).astype(np.float32),
                            folder / f"images{split}" / f"{case}_{channel:04d}{file_ending}", spacing)
            write_image(rng.choice(values, SHAPE).astype(np.uint8), folder / f"labels{split}" / f"{case}{file_ending}",
                        spacing)
    generate_dataset_json(str(folder), dict(enumerate(channels)), labels, len(CASES), file_ending,
                          regions_class_order=regions_class_order, **extra)
    return folder


def tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dataset_json_of(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


@pytest.fixture
def three(raw):
    """Liver (liver, tumour), Spleen (spleen) and SpleenLiver (spleen 1, liver 2: other values, same names)."""
    return (make_dataset(raw, 1, "Liver", LIVER, seed=1), make_dataset(raw, 2, "Spleen", SPLEEN, seed=2),
            make_dataset(raw, 3, "SpleenLiver", SPLEEN_LIVER, seed=3))


# ---------------------------------------------------------------------------------------------
# one label space, relabelled maps, label sets, provenance
# ---------------------------------------------------------------------------------------------
def test_same_names_are_one_label_and_maps_are_relabelled_voxel_by_voxel(raw, three, capsys):
    liver, spleen, spleen_liver = three
    before = {folder.name: tree_hashes(folder) for folder in three}
    assert main(["merge", "1", "2", "Dataset003_SpleenLiver", "--target-id", "10", "--name", "Abdomen",
                 "--no-progress"]) == 0
    target = raw / "Dataset010_Abdomen"
    assert sorted(p.name for p in raw.iterdir()) == [f.name for f in three] + [target.name]  # no temporary left
    merged = dataset_json_of(target)
    # first appearance: Liver's liver 1, tumour 2, then spleen 3; SpleenLiver's liver (2) is the same label as Liver's
    assert merged["labels"] == {"background": 0, "liver": 1, "tumour": 2, "spleen": 3}
    assert "regions_class_order" not in merged and merged["numTraining"] == 9
    # hand-made expectations, source value -> merged value
    expected_values = {liver: {0: 0, 1: 1, 2: 2}, spleen: {0: 0, 1: 3}, spleen_liver: {0: 0, 1: 3, 2: 1}}
    prefixes = {liver: "Liver_", spleen: "Spleen_", spleen_liver: "SpleenLiver_"}
    for source, mapping in expected_values.items():
        for split, case in [("Tr", c) for c in CASES] + [("Ts", "test_000")]:
            original = read(source / f"labels{split}" / f"{case}.nii.gz")
            written = read(target / f"labels{split}" / f"{prefixes[source]}{case}.nii.gz")
            expected = np.zeros_like(original)
            for old, new in mapping.items():
                expected[original == old] = new
            np.testing.assert_array_equal(written, expected)
            assert len(np.unique(original)) == len(mapping)  # every source value occurs: the check can fail
            image = sitk.ReadImage(str(target / f"labels{split}" / f"{prefixes[source]}{case}.nii.gz"))
            assert image.GetSpacing() == pytest.approx(SPACING) and image.GetOrigin() == pytest.approx(ORIGIN)
            assert (target / f"images{split}" / f"{prefixes[source]}{case}_0000.nii.gz").read_bytes() == \
                (source / f"images{split}" / f"{case}_0000.nii.gz").read_bytes()
    assert merged["annotated_labels"] == {
        **{f"Liver_{c}": ["liver", "tumour"] for c in CASES}, **{f"Spleen_{c}": ["spleen"] for c in CASES},
        **{f"SpleenLiver_{c}": ["spleen", "liver"] for c in CASES}}
    sources = {f"{prefixes[s]}{c}": s.name for s in three for c in CASES + ("test_000",)}
    assert merged["case_sources"] == sources
    assert load_groups(target / merge.GROUPS_FILE) == sources  # the --groups file of evaluate and report
    assert merged["merged_from"]["sources"] == [f.name for f in three]
    out = capsys.readouterr().out
    assert "| Dataset002_Spleen | Spleen_ | 3 | 1 | spleen |" in out
    assert {folder.name: tree_hashes(folder) for folder in three} == before  # the sources are untouched


def test_merged_dataset_passes_nnunets_check_and_builds_the_trainers_table(raw, three):
    merge.merge_datasets([1, str(three[1]), "Dataset003_SpleenLiver"], 10, progress=False)  # id, folder, name
    target = raw / "Dataset010_Merged"
    verify_dataset_integrity(str(target), num_processes=1)
    cases = sorted(dataset_json_of(target)["annotated_labels"])
    table = AnnotatedTable(dataset_json_of(target), cases, num_channels=4)
    # columns: background, liver, tumour, spleen
    assert table(["Liver_case_000", "Spleen_case_001", "SpleenLiver_case_002"]).tolist() == [
        [True, True, True, False], [True, False, False, True], [True, True, False, True]]


def test_label_map_renames_and_joins_labels_of_one_source(raw, three, tmp_path):
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"Dataset001_Liver": {"tumour": "liver"},  # joined into liver
                                     "Dataset002_Spleen": {"spleen": "lien"}}))
    merge.merge_datasets([1, 2], 10, label_map=str(label_map), progress=False)
    target = raw / "Dataset010_Merged"
    merged = dataset_json_of(target)
    assert merged["labels"] == {"background": 0, "liver": 1, "lien": 2}
    assert merged["annotated_labels"]["Liver_case_000"] == ["liver"]
    assert merged["merged_from"]["label_map"] == json.loads(label_map.read_text())
    original = read(three[0] / "labelsTr" / "case_001.nii.gz")
    np.testing.assert_array_equal(read(target / "labelsTr" / "Liver_case_001.nii.gz"), np.minimum(original, 1))
    np.testing.assert_array_equal(read(target / "labelsTr" / "Spleen_case_001.nii.gz"),
                                  2 * read(three[1] / "labelsTr" / "case_001.nii.gz"))


def test_source_label_sets_narrow_the_merged_ones(raw):
    make_dataset(raw, 1, "Liver", LIVER, annotated_labels={"case_001": ["liver"], "case_002": []})
    make_dataset(raw, 2, "Spleen", SPLEEN)
    merge.merge_datasets([1, 2], 10, progress=False)
    sets = dataset_json_of(raw / "Dataset010_Merged")["annotated_labels"]
    assert sets["Liver_case_000"] == ["liver", "tumour"] and sets["Liver_case_001"] == ["liver"]
    assert sets["Liver_case_002"] == [] and sets["Spleen_case_000"] == ["spleen"]


def test_ignore_labels_become_the_merged_ignore_label(raw):
    make_dataset(raw, 1, "Liver", {**LIVER, "ignore": 3}, seed=4)
    make_dataset(raw, 2, "Spleen", SPLEEN)
    merge.merge_datasets([1, 2], 10, progress=False)
    target = raw / "Dataset010_Merged"
    assert dataset_json_of(target)["labels"] == {"background": 0, "liver": 1, "tumour": 2, "spleen": 3, "ignore": 4}
    original = read(raw / "Dataset001_Liver" / "labelsTr" / "case_000.nii.gz")
    assert (original == 3).any()
    np.testing.assert_array_equal(read(target / "labelsTr" / "Liver_case_000.nii.gz"),
                                  np.where(original == 3, 4, original))


BRATS = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}


def test_region_sources_merge_into_a_region_dataset_whose_label_sets_resolve(raw):
    make_dataset(raw, 1, "Brats", BRATS, regions_class_order=(1, 2, 3))
    make_dataset(raw, 2, "Core", {"background": 0, "tumour core": [1, 2], "enhancing": 2},
                 regions_class_order=(1, 2), seed=5)
    merge.merge_datasets([1, 2], 10, progress=False)
    target = raw / "Dataset010_Merged"
    merged = dataset_json_of(target)
    assert merged["labels"] == {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    assert merged["regions_class_order"] == [1, 2, 3]
    # Core's value 1 (tumour core, not enhancing) is Brats's 2; its 2 (enhancing) is Brats's 3
    original = read(raw / "Dataset002_Core" / "labelsTr" / "case_000.nii.gz")
    np.testing.assert_array_equal(read(target / "labelsTr" / "Core_case_000.nii.gz"),
                                  np.select([original == 1, original == 2], [2, 3], 0))
    assert merged["annotated_labels"]["Core_case_000"] == ["tumour core", "enhancing"]
    table = AnnotatedTable(merged, sorted(merged["annotated_labels"]), num_channels=3)
    assert table(["Brats_case_000", "Core_case_000"]).tolist() == [[True, True, True], [False, True, True]]


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit status 2, before anything is written
# ---------------------------------------------------------------------------------------------
def refuses(argv, message, raw, capsys, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("merge started writing before its checks were done")

    monkeypatch.setattr(merge, "folder_renamed_into_place", never)
    before = sorted(p.name for p in raw.iterdir())
    assert main(["merge", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunet-losses merge: error: "), err
    assert message in err, err
    assert sorted(p.name for p in raw.iterdir()) == before


def test_labels_two_sources_relate_differently_are_refused_naming_both(raw, capsys, monkeypatch):
    make_dataset(raw, 1, "Liver", LIVER)  # tumour beside the liver
    make_dataset(raw, 2, "Nested", {"background": 0, "liver": [1, 2], "tumour": 2}, regions_class_order=(1, 2))
    refuses(["1", "2", "--target-id", "10"], "labels: expected one definition per label name across the sources, "
            "got 'liver' and 'tumour' defined differently by Dataset001_Liver and Dataset002_Nested: "
            "Dataset002_Nested's label value 2 belongs to 'liver' and 'tumour'", raw, capsys, monkeypatch)


def test_region_label_sets_that_cannot_be_recorded_are_refused(raw, capsys, monkeypatch):
    make_dataset(raw, 1, "Brats", BRATS, regions_class_order=(1, 2, 3))
    # tumour core annotated, enhancing not: as values, tumour core's {2, 3} would mark 'enhancing' annotated
    make_dataset(raw, 2, "NoEnh", {"background": 0, "whole tumour": [1, 2], "tumour core": 2},
                 regions_class_order=(1, 2))
    refuses(["1", "2", "--target-id", "10"], "annotated_labels of Dataset002_NoEnh: expected label sets the "
            "merged region dataset can record, got ['whole tumour', 'tumour core'], whose label values also make "
            "['enhancing'] count as annotated", raw, capsys, monkeypatch)


@pytest.mark.parametrize("edit, argv, message", [
    (None, ["1", "--target-id", "10"], "sources: expected at least two datasets to merge, got [1]"),
    (None, ["1", "1", "--target-id", "10"], "sources: expected distinct datasets, got Dataset001_Liver more than once"),
    (None, ["1", "2", "--target-id", "3"], "target_id: expected an unused dataset id, got 3, already used by "
                                           "Dataset003_SpleenLiver"),
    (None, ["1", "2", "--target-id", "10", "--name", "a b"], "target_name: expected a name without slashes or spaces"),
    ("2d", ["1", "2", "--target-id", "10"], "images: expected the same dimension in every source (nnU-Net trains "
                                            "one), got 3D in Dataset001_Liver and 2D in Dataset002_Spleen"),
    (None, ["1", "9", "--target-id", "10"], "source: expected a dataset id or name found in nnUNet_raw"),
    (None, ["1", "/tmp", "--target-id", "10"], "source: expected an nnU-Net dataset folder named DatasetXXX_Name, "
                                               "got /tmp"),
    ("channels", ["1", "2", "--target-id", "10"], "channel_names: expected the same in every source, got {'0': 'CT'} "
                                                  "in Dataset001_Liver and {'0': 'MR'} in Dataset002_Spleen"),
    ("ending", ["1", "2", "--target-id", "10"], "file_ending: expected the same in every source, got '.nii.gz' in "
                                                "Dataset001_Liver and '.nrrd' in Dataset002_Spleen"),
    ("missing", ["1", "2", "--target-id", "10"], "source Dataset002_Spleen: expected every image and label file "
                                                 "to exist, got 1 missing"),
    ({"Dataset009_X": {}}, ["1", "2", "--target-id", "10"],
     "--label-map: expected source dataset names (Dataset001_Liver, Dataset002_Spleen), got 'Dataset009_X'"),
    ({"Dataset001_Liver": {"cancer": "x"}}, ["1", "2", "--target-id", "10"],
     "--label-map of Dataset001_Liver: expected label names of its dataset.json ('background', 'liver', 'tumour'), "
     "got 'cancer'"),
    ({"Dataset001_Liver": {"tumour": "ignore"}}, ["1", "2", "--target-id", "10"],
     "--label-map of Dataset001_Liver: expected a foreground label name for 'tumour', got 'ignore'"),
    ("not json", ["1", "2", "--target-id", "10"], "--label-map: expected a JSON file, got invalid JSON"),
])
def test_every_refusal_happens_before_anything_is_written(raw, three, tmp_path, capsys, monkeypatch, edit, argv,
                                                          message):
    spleen_json = dataset_json_of(three[1])
    if edit == "channels":
        (three[1] / "dataset.json").write_text(json.dumps({**spleen_json, "channel_names": {"0": "MR"}}))
    elif edit == "ending":
        (three[1] / "dataset.json").write_text(json.dumps({**spleen_json, "file_ending": ".nrrd"}))
        for path in three[1].rglob("*.nii.gz"):
            path.rename(str(path)[: -len(".nii.gz")] + ".nrrd")
    elif edit == "2d":
        for path in three[1].rglob("*.nii.gz"):
            write_image(read(path)[0], path, spacing=SPACING[:2])
    elif edit == "missing":
        (three[1] / "labelsTr" / "case_002.nii.gz").unlink()
    elif edit is not None:
        (tmp_path / "map.json").write_text(edit if isinstance(edit, str) else json.dumps(edit))
        argv = argv + ["--label-map", str(tmp_path / "map.json")]
    refuses(argv, message, raw, capsys, monkeypatch)


def test_an_interrupted_merge_leaves_nothing(raw, three, capsys, monkeypatch):
    before = {folder.name: tree_hashes(folder) for folder in three}
    written = []
    original = merge.relabel

    def interrupted(*args):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(args[1])
        original(*args)

    monkeypatch.setattr(merge, "relabel", interrupted)
    assert main(["merge", "1", "2", "3", "--target-id", "10", "--no-progress"]) == 130
    assert len(written) == 4 and all(not os.path.exists(path) for path in written)
    assert capsys.readouterr().err == "nnunet-losses merge: interrupted (SIGINT)\n"
    assert sorted(p.name for p in raw.iterdir()) == [f.name for f in three]
    assert {folder.name: tree_hashes(folder) for folder in three} == before


def test_a_label_value_the_source_does_not_define_stops_the_merge_and_leaves_nothing(raw, three, capsys):
    label = three[1] / "labelsTr" / "case_002.nii.gz"
    write_image(np.full(SHAPE, 5, dtype=np.uint8), label)
    assert main(["merge", "1", "2", "--target-id", "10", "--no-progress"]) == 2
    assert f"{label}: expected label values of its dataset.json, got [5]" in capsys.readouterr().err
    assert sorted(p.name for p in raw.iterdir()) == [f.name for f in three]


# ---------------------------------------------------------------------------------------------
# nnU-Net's own commands on a merged dataset (slow)
# ---------------------------------------------------------------------------------------------
def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.slow
def test_nnunet_plans_and_trains_marginal_dice_on_a_merged_dataset(tmp_path):
    from nnunet_losses.commands.synthetic import write_synthetic_dataset

    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    environment = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    environment.update({k: str(v) for k, v in folders.items()}, nnUNet_def_n_proc="1")
    for folder in folders.values():
        folder.mkdir()
    environment["nnUNet_extTrainer"] = subprocess.run([script("nnunet-losses"), "trainer-path", "--append"],
                                                      env=environment, check=True, capture_output=True,
                                                      text=True).stdout.strip()
    raw = folders["nnUNet_raw"]
    for dataset_id, name in ((1, "Organs"), (2, "Vessels")):
        write_synthetic_dataset(raw, dataset_id, name, num_training=5, num_test=0, size=32, seed=dataset_id)
    # Organs keeps organ and lesion, Vessels only its vessel: each source's other labels set to background
    for folder, kept in ((raw / "Dataset001_Organs", {"organ": 1, "lesion": 2}), (raw / "Dataset002_Vessels",
                                                                                    {"vessel": 1})):
        dataset_json = dataset_json_of(folder)
        old = dataset_json["labels"]
        dataset_json["labels"] = {"background": 0, **kept}
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
        for path in (folder / "labelsTr").glob("*.nii.gz"):
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            new = np.zeros_like(array)
            for label, value in kept.items():
                new[array == old[label]] = value
            out = sitk.GetImageFromArray(new)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(path))

    def run(*command, **extra):
        result = subprocess.run([script(command[0]), *command[1:]], env={**environment, **extra},
                                capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, f"{command} failed:\n{(result.stdout + result.stderr)[-4000:]}"
        return result.stdout

    run("nnunet-losses", "merge", "1", "2", "--target-id", "3", "--name", "Body", "--no-progress")
    run("nnUNetv2_plan_and_preprocess", "-d", "3", "-c", "2d", "-np", "1", "-npfp", "1")
    trainer = "nnUNetTrainerMarginalDice_1ep_2it"
    run("nnUNetv2_train", "3", "2d", "0", "-tr", trainer, "-device", "cpu", nnUNet_n_proc_DA="0")
    fold = folders["nnUNet_results"] / "Dataset003_Body" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Label sets from dataset.json 'annotated_labels': 10 of the 10 training cases are partially annotated." \
        in log
    assert "no contradiction" in log


# ---------------------------------------------------------------------------------------------
# the missing-label trainers' draw per source (source_sampling)
# ---------------------------------------------------------------------------------------------
def test_source_sampling_weighs_each_case_by_its_sources_size():
    from nnunet_losses.training import missing_label_trainer
    from nnunet_losses.training.missing_label_trainer import source_sampling_probabilities

    sources = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B", "c1": "C"}
    cases = list(sources)
    # sqrt: weights 4 x 1/2 (A), 1 (B), 1 (C), total 4: A drawn 2/4 of the time, B and C 1/4 each
    np.testing.assert_allclose(source_sampling_probabilities(cases, sources, "sqrt"), [1 / 8] * 4 + [1 / 4] * 2)
    # uniform: every source a third of the time
    np.testing.assert_allclose(source_sampling_probabilities(cases, sources, "uniform"), [1 / 12] * 4 + [1 / 3] * 2)
    # only the given cases count (a fold's training split): A's 2 cases weigh 1/sqrt(2) each, B's 1
    np.testing.assert_allclose(source_sampling_probabilities(["a1", "a2", "b1"], sources, "sqrt"),
                               np.array([2 ** -0.5, 2 ** -0.5, 1]) / (2 * 2 ** -0.5 + 1))
    with pytest.raises(ValueError, match=r"source_sampling: expected None or one of \['sqrt', 'uniform'\], got 'log'"):
        source_sampling_probabilities(cases, sources, "log")
    import doctest

    result = doctest.testmod(missing_label_trainer, report=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def planned_merged(tmp_path_factory, plan_synthetic_dataset):
    """A planned 5-case 2D dataset whose dataset.json says cases 0-2 come from A and 3-4 from B."""
    def add_sources(folder: Path) -> None:
        dataset_json = dataset_json_of(folder)
        dataset_json["case_sources"] = {f"sampled_{i:03d}": "A" if i < 3 else "B" for i in range(5)}
        (folder / "dataset.json").write_text(json.dumps(dataset_json))

    return plan_synthetic_dataset(tmp_path_factory.mktemp("nnunet"), 944, "Sampled", size=32, edit_raw=add_sources)


def initialized(trainer_class, planned, dataset_json, tmp_path):
    """A trainer of fold 0 initialised on CPU (network, optimizer, loss), training not started."""
    import copy

    import torch

    plans = copy.deepcopy(planned.plans)
    plans["continue_training"] = False  # what nnU-Net's run_training reads from the plans
    trainer = trainer_class(plans, "2d", 0, copy.deepcopy(dataset_json), torch.device("cpu"))
    trainer.log_file = str(tmp_path / "log.txt")
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("mode, share_of", [("sqrt", lambda n_a, n_b: n_a ** 0.5 / (n_a ** 0.5 + n_b ** 0.5)),
                                            ("uniform", lambda n_a, n_b: 0.5)])
def test_the_training_loader_draws_cases_per_source_through_nnunets_dataloader(planned_merged, tmp_path,
                                                                               monkeypatch, mode, share_of):
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from nnunet_losses.trainers import nnUNetTrainerMarginalDice

    planned_merged.use(monkeypatch)
    original_loader = trainer_module.nnUNetDataLoader

    class Sampled(nnUNetTrainerMarginalDice):
        source_sampling = mode

    trainer = initialized(Sampled, planned_merged, planned_merged.dataset_json, tmp_path)
    training, validation = trainer.get_dataloaders()
    loader = training.data_loader
    assert isinstance(loader, original_loader) and trainer_module.nnUNetDataLoader is original_loader
    identifiers = list(loader.indices)
    sources = planned_merged.dataset_json["case_sources"]
    n_a = sum(sources[c] == "A" for c in identifiers)
    probabilities = dict(zip(identifiers, loader.sampling_probabilities))
    share = sum(p for c, p in probabilities.items() if sources[c] == "A")
    assert len(identifiers) == 4 and 0 < n_a < 4
    assert share == pytest.approx(share_of(n_a, 4 - n_a))
    assert len({round(p, 12) for c, p in probabilities.items() if sources[c] == "A"}) == 1  # equal within A
    assert validation.data_loader.sampling_probabilities is None  # validation keeps nnU-Net's draw
    log = Path(trainer.log_file).read_text()
    assert f"Training cases drawn per source ({mode}): A {share:.3f} ({n_a} cases)" in log
    drawn = Counter(sources[c] for _ in range(400) for c in loader.get_indices())  # nnU-Net's own draw
    assert drawn["A"] / sum(drawn.values()) == pytest.approx(share, abs=0.06)


def test_source_sampling_needs_a_merged_dataset(planned_merged, tmp_path, monkeypatch):
    from nnunet_losses.trainers import nnUNetTrainerLeafDice

    planned_merged.use(monkeypatch)

    class Sampled(nnUNetTrainerLeafDice):
        source_sampling = "sqrt"

    dataset_json = {k: v for k, v in planned_merged.dataset_json.items() if k != "case_sources"}
    trainer = initialized(Sampled, planned_merged, dataset_json, tmp_path)
    with pytest.raises(ValueError, match=r"source_sampling: expected a merged dataset \(dataset.json 'case_sources'"):
        trainer.get_dataloaders()


def test_source_sampling_is_a_token_of_the_missing_label_trainers_names():
    from nnunet_losses.trainers import nnUNetTrainerDiceI, nnUNetTrainerLeafDice
    from nnunet_losses.training.names import TrainerNameError, trainer_with_settings

    trainer = trainer_with_settings(nnUNetTrainerLeafDice, source_sampling="sqrt", optimizer="adam", epochs=8)
    assert trainer.__name__ == "nnUNetTrainerLeafDice_srcsqrt_adam_8ep" and trainer.source_sampling == "sqrt"
    assert nnUNetTrainerLeafDice.source_sampling is None
    with pytest.raises(TrainerNameError, match="nnUNetTrainerDiceI has no setting 'source_sampling'"):
        trainer_with_settings(nnUNetTrainerDiceI, source_sampling="sqrt")
