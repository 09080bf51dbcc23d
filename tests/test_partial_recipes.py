"""The partial-label examples without their slow parts: the synthetic experiment's data generation and
derivation on tiny sizes, its argument checks, and the real-data recipes' argument handling and
preparation steps on fake download folders (the real data are not available here)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_losses.commands import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "partial_labels"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"partial_labels_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


experiment = load_example("synthetic_experiment")
merge_experiment = load_example("merge_experiment")
recipes = load_example("recipes")
optimizer_choice = load_example("optimizer_choice")


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------------------------
# the synthetic experiment's data
# ----------------------------------------------------------------------------------------------
def test_groups_task_alternates_plain_and_striped_blobs_and_derives_empty_striped_maps(raw):
    dataset, groups = experiment.write_task_dataset(raw, 960, "groups", num_training=10, num_test=2, size=32, seed=0)
    assert dataset.training_cases == tuple(f"{('plain', 'striped')[i % 2]}_tr{i:03d}" for i in range(10))
    assert dataset.test_cases == ("plain_ts000", "striped_ts001")
    assert groups == {case: case.split("_")[0] for case in dataset.training_cases + dataset.test_cases}
    for case in dataset.training_cases:
        image, labels = read(dataset.folder / "imagesTr" / f"{case}_0000.nii.gz"), read(dataset.folder / "labelsTr" / f"{case}.nii.gz")
        assert set(np.unique(labels)) == {0, 1}
        background = image[labels == 0]
        # blob +2 over the background; stripes (amplitude 1, mean 0) raise the background's spread from the
        # noise's 0.35 to sqrt(0.35^2 + 1/2) = 0.79
        assert image[labels == 1].mean() - background.mean() == pytest.approx(2.0, abs=0.4)
        expected_std = 0.79 if case.startswith("striped") else 0.35
        assert background.std() == pytest.approx(expected_std, abs=0.12)

    assert cli.main(experiment.derive_command("groups", 960, 961, seed=0)[1:]) == 0
    partial = experiment.existing_dataset(raw, 961)
    dataset_json = json.loads((partial.folder / "dataset.json").read_text())
    assert dataset_json["annotated_labels"] == {case: [] for case in dataset.training_cases if case.startswith("striped")}
    for case in dataset.training_cases:
        labels = read(partial.folder / "labelsTr" / f"{case}.nii.gz")
        original = read(dataset.folder / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(labels, 0 * original if case.startswith("striped") else original)
    # the held-out cases keep their full labels: they are what the experiment evaluates against
    np.testing.assert_array_equal(read(partial.folder / "labelsTs" / "striped_ts001.nii.gz"),
                                  read(dataset.folder / "labelsTs" / "striped_ts001.nii.gz"))


def test_classes_task_has_a_ring_around_the_disc_and_derives_half_the_cases_without_it(raw):
    dataset, groups = experiment.write_task_dataset(raw, 962, "classes", num_training=10, num_test=2, size=32, seed=1)
    assert groups is None
    for case in dataset.training_cases:
        labels = read(dataset.folder / "labelsTr" / f"{case}.nii.gz")
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        # the disc touches nothing but itself and the ring (4-neighbourhood)
        disc = labels == 1
        for shift in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            assert set(np.unique(np.roll(labels, shift, axis=(0, 1))[disc])) <= {1, 2}
    assert cli.main(experiment.derive_command("classes", 962, 963, seed=0)[1:]) == 0
    partial = experiment.existing_dataset(raw, 963)
    annotated = json.loads((partial.folder / "dataset.json").read_text())["annotated_labels"]
    assert len(annotated) == 5 and set(annotated) <= set(dataset.training_cases)  # round(0.5 x 10) cases
    assert all(labels == ["disc", "bar"] for labels in annotated.values())
    for case in dataset.training_cases:
        original = read(dataset.folder / "labelsTr" / f"{case}.nii.gz")
        expected = np.where(original == 2, 0, original) if case in annotated else original
        np.testing.assert_array_equal(read(partial.folder / "labelsTr" / f"{case}.nii.gz"), expected)


def test_write_task_dataset_refuses_bad_sizes_and_existing_folders(raw):
    with pytest.raises(ValueError, match=r"num_training: expected an even number >= 10 .*, got 9"):
        experiment.write_task_dataset(raw, 960, "groups", num_training=9, num_test=2, size=32, seed=0)
    with pytest.raises(ValueError, match=r"num_test: expected an even number >= 2 \(both halves\), got 3"):
        experiment.write_task_dataset(raw, 960, "groups", num_training=10, num_test=3, size=32, seed=0)
    with pytest.raises(ValueError, match=r"task: expected one of \('groups', 'classes'\), got 'other'"):
        experiment.write_task_dataset(raw, 960, "other", num_training=10, num_test=2, size=32, seed=0)
    experiment.write_task_dataset(raw, 960, "groups", num_training=10, num_test=2, size=32, seed=0)
    with pytest.raises(FileExistsError, match=r"dataset: expected a new folder, got existing .*Dataset960_BlobGroups"):
        experiment.write_task_dataset(raw, 960, "groups", num_training=10, num_test=2, size=32, seed=0)


def test_same_seed_same_data(raw, tmp_path):
    first, _ = experiment.write_task_dataset(raw, 960, "classes", num_training=10, num_test=2, size=32, seed=4)
    second, _ = experiment.write_task_dataset(tmp_path, 960, "classes", num_training=10, num_test=2, size=32, seed=4)
    for case in first.training_cases:
        np.testing.assert_array_equal(read(first.folder / "imagesTr" / f"{case}_0000.nii.gz"),
                                      read(second.folder / "imagesTr" / f"{case}_0000.nii.gz"))


@pytest.mark.parametrize("argv, message", [
    (["--cases", "11"], "--cases: expected an even number >= 10, got 11"),
    (["--test-cases", "0"], "--test-cases: expected an even number >= 2, got 0"),
    (["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
    (["--jobs", "0"], "--jobs: expected an int >= 1, got 0"),
    (["--size", "16"], "--size: expected at least 32 pixels, got 16"),
    (["--dataset-id", "998"], r"--dataset-id: expected an ID in \[1, 996\]"),
])
def test_experiment_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiment.parse_args(argv + ["--device", "cpu"])
    assert exit_info.value.code == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")


@pytest.mark.parametrize("optimizer, suffix", [("adam", "_adam"), ("sgd", "")])
def test_experiment_runs_per_task_put_the_full_reference_first(raw, optimizer, suffix):
    args = experiment.parse_args(["--device", "cpu", "--epochs", "2", "--iterations", "5", "--optimizer", optimizer])
    task = experiment.Task("classes", source="S", partial="P", groups=None, reported_classes=())
    assert experiment.runs_of(task, args) == [
        ("full", "S", f"nnUNetTrainerDiceI{suffix}_2ep_5it"), ("DiceI", "P", f"nnUNetTrainerDiceI{suffix}_2ep_5it"),
        ("MarginalDice", "P", f"nnUNetTrainerMarginalDice{suffix}_2ep_5it"),
        ("LeafDice", "P", f"nnUNetTrainerLeafDice{suffix}_2ep_5it")]


def test_experiment_defaults_to_the_papers_optimizer_for_every_trainer():
    args = experiment.parse_args(["--device", "cpu"])
    assert args.optimizer == "adam"
    # the epochs each task was verified with (README), unless --epochs says otherwise
    # (the heuristic epsilon's own optimizer is Adam: its name carries no token for it)
    for task_name, name in (("groups", "nnUNetTrainerDiceIEps_8ep_60it"), ("groups", "nnUNetTrainerDiceBI_adam_8ep_60it"),
                            ("classes", "nnUNetTrainerLeafDice_adam_16ep_60it")):
        task = experiment.Task(task_name, source="S", partial="P", groups=None, reported_classes=())
        assert name in [run[2] for run in experiment.runs_of(task, args)]
    # a name with tokens works for nnU-Net's own trainers too: no trainer is refused with adam any more
    args = experiment.parse_args(["--device", "cpu", "--trainers", "nnUNetTrainer", "--iterations", "5"])
    task = experiment.Task("groups", source="S", partial="P", groups=None, reported_classes=())
    assert experiment.runs_of(task, args)[-1][2] == "nnUNetTrainer_adam_8ep_5it"


def test_adam_names_are_found_by_nnunet_and_combine_our_loss_with_nnunets_adam(monkeypatch):
    """nnU-Net's own lookup (what nnUNetv2_train -tr does) finds <trainer>_adam and its short runs in our
    trainer folder; each keeps our loss and takes nnU-Net's Adam at lr 1e-3 (nnUNetTrainerVanillaAdam1en3's)."""
    from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerVanillaAdam
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_losses.trainers
    from nnunet_losses.training.discovery import ENV_VAR, with_trainer_folder

    monkeypatch.setenv(ENV_VAR, with_trainer_folder(None))
    for name in nnunet_losses.trainers.TRAINER_NAMES:
        ours = getattr(nnunet_losses.trainers, name)
        experiment_trainer = optimizer_choice.trainer_name(name, "adam")
        if getattr(ours, "optimizer_name", "sgd") == "adam":  # Adam already (the heuristic epsilon): no token
            assert experiment_trainer == name
            continue
        found = recursive_find_trainer_class_by_name(experiment_trainer)
        assert found.__name__ == experiment_trainer == name + "_adam"
        assert found.__mro__[1] is ours and found._build_loss is ours._build_loss
        assert found.configure_optimizers is nnUNetTrainerVanillaAdam.configure_optimizers
        assert found.name_settings["settings"]["lr"] == 1e-3
    assert optimizer_choice.trainer_name("nnUNetTrainerDiceIEps", "sgd") == "nnUNetTrainerDiceIEps_sgd"
    short = recursive_find_trainer_class_by_name("nnUNetTrainerDiceIEps_sgd_3ep_7it")
    assert short.__mro__[1].__name__ == "nnUNetTrainerDiceIEps"
    assert short.name_settings["settings"]["epochs"] == 3 and short.name_settings["settings"]["optimizer"] == "sgd"


# ----------------------------------------------------------------------------------------------
# the real-data recipes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, option", [("acdc", "--acdc-folder"), ("brats", "--lgg-cases"),
                                            ("label-marginal", "--msd-folder"),
                                            ("decathlon-merge", "--msd-folders")])
def test_every_recipe_has_a_help_naming_its_options(recipe, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipes.parse_args([recipe, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in (option, "--dry-run", "--folds", "--configuration", "--device"):
        assert expected in text


def fake_acdc(root: Path, frames: dict) -> Path:
    for patient, (ed, es) in frames.items():
        folder = root / "training" / patient
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\n")
    (root / "testing").mkdir()
    return root


def test_acdc_frames_are_read_from_info_cfg_with_the_converters_case_names(tmp_path):
    acdc = fake_acdc(tmp_path / "ACDC", {"patient001": (1, 12), "patient002": (1, 9)})
    assert recipes.acdc_frames(acdc) == {"patient001_frame01": "ED", "patient001_frame12": "ES",
                                         "patient002_frame01": "ED", "patient002_frame09": "ES"}
    (acdc / "training" / "patient003").mkdir()
    with pytest.raises(ValueError, match=r"expected .*patient003/Info.cfg \(ACDC's per-patient info"):
        recipes.acdc_frames(acdc)
    with pytest.raises(ValueError, match=r"--acdc-folder: expected the extracted ACDC download with a 'training' folder"):
        recipes.acdc_frames(tmp_path / "nowhere")


def test_acdc_dry_run_prints_every_command_and_writes_nothing(raw, tmp_path, capsys):
    acdc = fake_acdc(tmp_path / "ACDC", {"patient001": (1, 12), "patient002": (1, 9)})
    work = tmp_path / "work"
    steps = recipes.main(["acdc", "--acdc-folder", str(acdc), "--dry-run", "--work-dir", str(work), "--folds", "0"])
    out = capsys.readouterr().out
    assert "nnunetv2.dataset_conversion.Dataset027_ACDC -i" in out
    assert f"nnunet-losses derive-partial 27 --target-id 527 --target-name ACDC_noMyoES --remove-labels MLV " \
           f"--cases-file {work / 'acdc_es_frames.txt'}" in out
    assert "write the 2 end-systolic frames" in out
    trained = [s.command[5] for s in steps if s.command and s.command[0] == "nnUNetv2_train"]
    assert trained == ["nnUNetTrainerDiceI_adam", "nnUNetTrainerDiceBI_adam", "nnUNetTrainerDiceIEps",
                       "nnUNetTrainerMarginalDice_adam", "nnUNetTrainerLeafDice_adam", "nnUNetTrainerDiceI_adam"]
    assert "export nnUNet_extTrainer=" in out
    evaluated = [s.command for s in steps if s.command and s.command[:2] == ["nnunet-losses", "evaluate"]]
    assert len(evaluated) == 6 and all("--positive" in c and c[-1] == "ED" for c in evaluated)
    assert all(str(raw / "Dataset027_ACDC" / "labelsTr") in c for c in evaluated)  # the FULL labels
    assert not work.exists() and not list(raw.iterdir())


def test_acdc_preparation_writes_the_es_list_and_groups(tmp_path, raw):
    acdc = fake_acdc(tmp_path / "ACDC", {"patient001": (1, 12), "patient002": (1, 9)})
    work = tmp_path / "work"
    args = recipes.parse_args(["acdc", "--acdc-folder", str(acdc), "--work-dir", str(work)])
    for step in recipes.acdc_recipe(args):
        if step.action is not None:
            step.action()
    assert (work / "acdc_es_frames.txt").read_text() == "patient001_frame12\npatient002_frame09\n"
    assert json.loads((work / "acdc_groups.json").read_text())["patient002_frame01"] == "ED"


def fake_msd(root: Path, name: str, cases) -> Path:
    (root / name / "imagesTr").mkdir(parents=True)
    (root / name / "dataset.json").write_text("{}")
    for case in cases:
        (root / name / "imagesTr" / f"{case}.nii.gz").write_bytes(b"")
    return root / name


def test_brats_checks_the_lgg_list_against_the_task_and_prints_its_commands(tmp_path, raw, capsys):
    task = fake_msd(tmp_path, "Task01_BrainTumour", ["BRATS_001", "BRATS_002", "BRATS_003"])
    lgg = tmp_path / "lgg.txt"
    lgg.write_text("# low grade\nBRATS_002\nBRATS_004\n")
    with pytest.raises(SystemExit, match=r"--lgg-cases: expected case identifiers of Task01_BrainTumour/imagesTr "
                                         r"\(e.g. BRATS_001\), got unknown BRATS_004"):
        recipes.main(["brats", "--msd-folder", str(task), "--lgg-cases", str(lgg), "--dry-run"])
    lgg.write_text("BRATS_002\n")
    recipes.main(["brats", "--msd-folder", str(task), "--lgg-cases", str(lgg), "--dry-run", "--folds", "0",
                  "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert f"nnUNetv2_convert_MSD_dataset -i {task} -overwrite_id 501" in out
    assert f"--empty --cases-file {tmp_path / 'work' / 'brats_lgg_cases.txt'}" in out
    assert "--positive HGG" in out
    assert "-tr nnUNetTrainerDiceIEps -device cuda" in out and "-tr nnUNetTrainerDiceBI_adam -device cuda" in out
    recipes.main(["brats", "--msd-folder", str(task), "--lgg-cases", str(lgg), "--dry-run", "--folds", "0",
                  "--optimizer", "sgd"])
    out = capsys.readouterr().out
    assert "-tr nnUNetTrainerDiceIEps_sgd -device cuda" in out and "_adam" not in out


def test_whole_tumour_makes_the_msd_labels_one_sigmoid_region(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2,
                                           "enhancing tumour": 3}, "file_ending": ".nii.gz"}))
    recipes.whole_tumour(path)
    written = json.loads(path.read_text())
    assert written["labels"] == {"background": 0, "whole tumour": [1, 2, 3]}
    assert written["regions_class_order"] == [3]
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(written["labels"], written["regions_class_order"])
    assert manager.has_regions and manager.num_segmentation_heads == 1


def test_label_marginal_recipe_trains_nnunets_ce_and_our_two_penalties(tmp_path, raw, capsys):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with pytest.raises(SystemExit, match=r"--msd-folder: expected a Decathlon task folder such as Task07_Pancreas"):
        recipes.main(["label-marginal", "--msd-folder", str(tmp_path / "Pancreas"), "--dry-run"])
    task = fake_msd(tmp_path, "Task07_Pancreas", ["pancreas_001"])
    steps = recipes.main(["label-marginal", "--msd-folder", str(task), "--dry-run", "--folds", "0", "1"])
    out = capsys.readouterr().out
    assert f"nnUNetv2_convert_MSD_dataset -i {task} -overwrite_id 7" in out
    trained = [(s.command[3], s.command[5]) for s in steps if s.command and s.command[0] == "nnUNetv2_train"]
    assert trained == [(f, t) for f in ("0", "1") for t in ("nnUNetTrainerCELoss", "nnUNetTrainerCEL1",
                                                               "nnUNetTrainerCEKL_knee0")]
    # the CE-only baseline is nnU-Net's own trainer
    assert recursive_find_trainer_class_by_name("nnUNetTrainerCELoss").__module__.startswith("nnunetv2.")
    report = next(s.command for s in steps if s.command and s.command[:2] == ["nnunet-losses", "report"])
    assert report[2].endswith("Dataset007_Pancreas/nnUNetTrainerCELoss__nnUNetPlans__3d_fullres")


def test_recipes_need_the_nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    acdc = fake_acdc(tmp_path / "ACDC", {"patient001": (1, 12)})
    with pytest.raises(SystemExit, match=r"nnUNet_preprocessed: expected the nnU-Net environment variable to be set"):
        recipes.main(["acdc", "--acdc-folder", str(acdc), "--dry-run"])


# ----------------------------------------------------------------------------------------------
# the Decathlon merge (liver, pancreas, spleen)
# ----------------------------------------------------------------------------------------------
DECATHLON_LABELS = {"Task03_Liver": {"0": "background", "1": "liver", "2": "cancer"},
                    "Task07_Pancreas": {"0": "background", "1": "pancreas", "2": "cancer"},
                    "Task09_Spleen": {"0": "background", "1": "spleen"}}


def fake_decathlon(root: Path) -> list:
    folders = []
    for name, labels in DECATHLON_LABELS.items():
        folder = fake_msd(root, name, [f"{name.split('_')[1].lower()}_{i}" for i in range(3)])
        (folder / "dataset.json").write_text(json.dumps({"name": name.split("_")[1], "modality": {"0": "CT"},
                                                         "labels": labels}))
        folders.append(folder)
    return folders


def test_decathlon_merge_renames_the_shared_cancer_label_per_organ(tmp_path):
    tasks = fake_decathlon(tmp_path)
    labels = {f"Dataset{int(t.name[4:6]):03d}_{t.name[7:]}": recipes.decathlon_labels(t) for t in tasks}
    assert labels["Dataset003_Liver"] == {"background": 0, "liver": 1, "cancer": 2}
    assert recipes.decathlon_label_map(labels) == {"Dataset003_Liver": {"cancer": "liver_cancer"},
                                                   "Dataset007_Pancreas": {"cancer": "pancreas_cancer"}}
    with pytest.raises(ValueError, match=r"--msd-folders: expected Decathlon task folders such as Task03_Liver"):
        recipes.decathlon_labels(tmp_path / "Liver")


def test_decathlon_merge_dry_run_prints_every_command_and_writes_nothing(raw, tmp_path, capsys, monkeypatch):
    tasks = fake_decathlon(tmp_path / "msd")
    work = tmp_path / "work"
    steps = recipes.main(["decathlon-merge", "--msd-folders", *map(str, tasks), "--dry-run", "--folds", "0",
                          "--work-dir", str(work)])
    out = capsys.readouterr().out
    for task, dataset_id in zip(tasks, (3, 7, 9)):
        assert f"nnUNetv2_convert_MSD_dataset -i {task} -overwrite_id {dataset_id}" in out
    assert f"nnunet-losses merge 3 7 9 --target-id 600 --name LiverPancreasSpleen --label-map " \
           f"{work / 'decathlon_label_map.json'}" in out
    assert "nnUNetv2_plan_and_preprocess -d 600 3 7 9 -c 3d_fullres" in out
    trained = [(s.command[1], s.command[5]) for s in steps if s.command and s.command[0] == "nnUNetv2_train"]
    assert trained == [("Dataset600_LiverPancreasSpleen", "nnUNetTrainerMarginalDice_srcsqrt_adam"),
                       ("Dataset600_LiverPancreasSpleen", "nnUNetTrainerLeafDice_srcsqrt_adam"),
                       ("Dataset600_LiverPancreasSpleen", "nnUNetTrainerMarginalDiceCE_srcsqrt_adam"),
                       ("Dataset600_LiverPancreasSpleen", "nnUNetTrainerLeafDiceCE_srcsqrt_adam"),
                       ("Dataset600_LiverPancreasSpleen", "nnUNetTrainer_adam"),
                       ("Dataset003_Liver", "nnUNetTrainer_adam"), ("Dataset007_Pancreas", "nnUNetTrainer_adam"),
                       ("Dataset009_Spleen", "nnUNetTrainer_adam")]
    evaluated = [s.command for s in steps if s.command and s.command[:2] == ["nnunet-losses", "evaluate"]]
    assert len(evaluated) == 5  # every model of the merged dataset, per source; not the per-source references
    assert all(str(raw / "Dataset600_LiverPancreasSpleen" / "case_sources.json") in c for c in evaluated)
    assert [c[2] for c in evaluated] == [str(raw.parent / "nnUNet_results" / "Dataset600_LiverPancreasSpleen" /
                                             f"{t}__nnUNetPlans__3d_fullres" / "fold_0" / "validation")
                                         for _, t in trained[:5]]
    assert not work.exists() and not list(raw.iterdir())
    # every trained name resolves to a trainer with the settings it spells (nnU-Net's lookup)
    from nnunet_losses.training.discovery import ENV_VAR, with_trainer_folder
    from nnunet_losses.training.names import find_trainer

    monkeypatch.setenv(ENV_VAR, with_trainer_folder(None))
    assert find_trainer("nnUNetTrainerLeafDice_srcsqrt_adam").source_sampling == "sqrt"


def test_decathlon_merge_options_are_checked(tmp_path):
    tasks = fake_decathlon(tmp_path / "msd")
    with pytest.raises(SystemExit, match=r"--source-ids: expected one id per --msd-folders \(3\), got 2"):
        recipes.main(["decathlon-merge", "--msd-folders", *map(str, tasks), "--source-ids", "3", "7", "--dry-run"])
    with pytest.raises(SystemExit, match=r"--msd-folders: expected at least two different Decathlon tasks, got 1"):
        recipes.main(["decathlon-merge", "--msd-folders", str(tasks[0]), str(tasks[0]), "--dry-run"])


def test_decathlon_merge_without_sampling_or_references(raw, tmp_path):
    tasks = fake_decathlon(tmp_path / "msd")
    steps = recipes.main(["decathlon-merge", "--msd-folders", *map(str, tasks[:2]), "--dry-run", "--folds", "1",
                          "--source-sampling", "none", "--no-per-source", "--optimizer", "sgd"])
    trained = [s.command[5] for s in steps if s.command and s.command[0] == "nnUNetv2_train"]
    assert trained == ["nnUNetTrainerMarginalDice", "nnUNetTrainerLeafDice", "nnUNetTrainerMarginalDiceCE",
                       "nnUNetTrainerLeafDiceCE", "nnUNetTrainer"]
    plan = next(s.command for s in steps if s.command and s.command[0] == "nnUNetv2_plan_and_preprocess")
    assert plan == ["nnUNetv2_plan_and_preprocess", "-d", "600", "-c", "3d_fullres"]


def test_splits_per_source_validate_the_same_cases_in_the_merged_and_the_source_datasets(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    liver = [f"liver_{i}" for i in range(7)]
    spleen = [f"spleen_{i}" for i in range(5)]
    sources = {**{f"Liver_{c}": "Dataset003_Liver" for c in liver},
               **{f"Spleen_{c}": "Dataset009_Spleen" for c in spleen},
               "Liver_test_0": "Dataset003_Liver"}  # a held-out case: in no split
    training = {c: [] for c in sources if "test" not in c}
    prefixes = {"Dataset003_Liver": "Liver_", "Dataset009_Spleen": "Spleen_"}
    merged_json = tmp_path / "dataset.json"
    merged_json.write_text(json.dumps({"case_sources": sources, "annotated_labels": training,
                                       "merged_from": {"prefixes": prefixes}}))
    paths = {"merged": tmp_path / "merged.json", "Dataset003_Liver": tmp_path / "liver.json"}
    recipes.splits_per_source(merged_json, paths)
    merged, own = (json.loads(paths[k].read_text()) for k in ("merged", "Dataset003_Liver"))
    assert own == generate_crossval_split(sorted(liver), 12345, 5)  # nnU-Net's own split of the source
    assert not (tmp_path / "spleen.json").exists()
    spleen_split = generate_crossval_split(sorted(spleen), 12345, 5)
    for fold in range(5):
        assert merged[fold]["val"] == [f"Liver_{c}" for c in own[fold]["val"]] + \
            [f"Spleen_{c}" for c in spleen_split[fold]["val"]]
        assert sorted(merged[fold]["train"] + merged[fold]["val"]) == sorted(c for c in sources if "test" not in c)


# ----------------------------------------------------------------------------------------------
# the merge experiment's data and runs (the training itself: a tiny run by hand, see the report)
# ----------------------------------------------------------------------------------------------
def test_merge_experiment_sources_annotate_their_subset_and_keep_full_test_labels(raw, tmp_path):
    source = merge_experiment.SOURCES[2]  # OrganVessel: vessel 1, organ 2, no lesion
    folder = merge_experiment.write_source(raw, tmp_path / "test", 970, source, num_training=5, num_test=2,
                                           size=24, seed=3)
    rng = np.random.default_rng(3)  # the same draws, to compare with what was written
    for index in range(7):
        image, labels = merge_experiment.body_case(rng, 24, source.contrast, 0.8 if index < 5 else 1.0)
        case = f"organvessel_{index:03d}"
        if index < 5:
            written = read(folder / "labelsTr" / f"{case}.nii.gz")
            expected = np.select([labels == 3, labels == 1], [1, 2], 0)  # the lesion reads as background
        else:
            written = read(tmp_path / "test" / "OrganVessel" / "labelsTs" / f"{case}.nii.gz")
            expected = labels  # held-out: every structure, STRUCTURES' values
            assert set(np.unique(labels)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(written, expected)
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "vessel": 1, "organ": 2}
    spacing = sitk.ReadImage(str(folder / "imagesTr" / "organvessel_000_0000.nii.gz")).GetSpacing()
    assert spacing == pytest.approx(source.spacing)


def test_merge_experiment_structure_dice_reads_each_models_label_values(tmp_path):
    from nnunet_losses.commands.synthetic import _write

    (tmp_path / "labels").mkdir()
    (tmp_path / "predictions").mkdir()
    reference = np.zeros((32, 32), dtype=np.uint8)
    reference[:8] = 1  # organ: 256 voxels
    reference[8:12] = 3  # vessel: 128 voxels
    prediction = np.zeros_like(reference)
    prediction[:4] = 2  # the model's organ is its value 2: 128 voxels, all inside the organ
    prediction[8:12] = 1  # its vessel, value 1: exact
    _write(reference, tmp_path / "labels" / "a.nii.gz")
    _write(prediction, tmp_path / "predictions" / "a.nii.gz")
    scores = merge_experiment.structure_dice(tmp_path / "predictions", tmp_path / "labels",
                                             {"background": 0, "vessel": 1, "organ": 2})
    assert scores == {"organ": pytest.approx(2 * 128 / (128 + 256)), "vessel": 1.0}  # no lesion: not its label


def test_merge_experiment_runs_name_the_sampling_optimizer_and_budget():
    args = merge_experiment.parse_args(["--device", "cpu", "--epochs", "1", "--iterations", "2"])
    sources = {"Dataset970_OrganLesion": merge_experiment.SOURCES[0]}
    assert merge_experiment.runs_of(args, "Dataset973_SyntheticBody", sources) == [
        ("MarginalDice", "Dataset973_SyntheticBody", "nnUNetTrainerMarginalDice_srcsqrt_adam_1ep_2it"),
        ("LeafDice", "Dataset973_SyntheticBody", "nnUNetTrainerLeafDice_srcsqrt_adam_1ep_2it"),
        ("MarginalDiceCE", "Dataset973_SyntheticBody", "nnUNetTrainerMarginalDiceCE_srcsqrt_adam_1ep_2it"),
        ("LeafDiceCE", "Dataset973_SyntheticBody", "nnUNetTrainerLeafDiceCE_srcsqrt_adam_1ep_2it"),
        ("naive merge (nnUNetTrainer)", "Dataset973_SyntheticBody", "nnUNetTrainer_adam_1ep_2it"),
        ("OrganLesion only", "Dataset970_OrganLesion", "nnUNetTrainer_adam_1ep_2it")]
    args = merge_experiment.parse_args(["--device", "cpu", "--source-sampling", "none", "--optimizer", "sgd",
                                        "--no-per-source"])
    assert [run[2] for run in merge_experiment.runs_of(args, "M", sources)] == [
        "nnUNetTrainerMarginalDice_8ep_60it", "nnUNetTrainerLeafDice_8ep_60it", "nnUNetTrainerMarginalDiceCE_8ep_60it",
        "nnUNetTrainerLeafDiceCE_8ep_60it", "nnUNetTrainer_8ep_60it"]


def test_merge_experiment_table_gives_mean_and_std_over_repeats():
    nan = float("nan")
    repeats = [{"LeafDice": {"OrganLesion": {"organ": 0.9, "lesion": 0.5, "vessel": nan}}},
               {"LeafDice": {"OrganLesion": {"organ": 0.7, "lesion": 0.3, "vessel": 0.8}}}]
    summary = merge_experiment.mean_over_repeats(repeats)["LeafDice"]["OrganLesion"]
    assert summary["organ"] == (pytest.approx(0.8), pytest.approx(0.1414214), 2)  # sample std: sqrt(0.02)
    assert summary["vessel"] == (0.8, None, 1)  # a case set without the structure in one repeat: left out
    table = merge_experiment.result_table(repeats)
    assert "| LeafDice | OrganLesion | 0.800 ± 0.141 | 0.400 ± 0.141 | 0.800 (n=1) |" in table
    assert "| LeafDice | OrganLesion | 0.900 | 0.500 | nan (n=0) |" in merge_experiment.result_table(repeats[:1])
    # a repeat in progress: the models it has not trained yet count over the finished repeats only
    repeats[0]["naive"] = {"OrganLesion": {"organ": 0.6, "lesion": 0.2, "vessel": 0.4}}
    table = merge_experiment.result_table(repeats)
    assert "| naive | OrganLesion | 0.600 (n=1) | 0.200 (n=1) | 0.400 (n=1) |" in table
    assert table.index("| LeafDice |") < table.index("| naive |")  # in training order


def test_merge_experiment_writes_what_it_finished(tmp_path):
    args = merge_experiment.parse_args(["--device", "cpu", "--repeats", "2"])
    repeats = [{"LeafDice": {"OrganLesion": {"organ": 0.9, "lesion": 0.5}}}, {}]  # the second repeat just began
    text, mean = merge_experiment.write_results(tmp_path, "python merge_experiment.py --repeats 2", args, [], repeats)
    assert (tmp_path / "results.md").read_text().strip() == text.strip()
    assert "| LeafDice | OrganLesion | 0.900 (n=1) | 0.500 (n=1) | — |" in text
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["results"] == mean == {"LeafDice": {"OrganLesion": {"organ": 0.9, "lesion": 0.5}}}
    assert stored["results_per_repeat"] == repeats and stored["arguments"]["repeats"] == "2"


def test_merge_experiment_repeats_train_in_their_own_results_folders(tmp_path, monkeypatch):
    runner = merge_experiment.Runner(tmp_path / "work")
    assert merge_experiment.repeat_runner(runner, 0) is runner
    second = merge_experiment.repeat_runner(runner, 2)
    assert second.results == tmp_path / "work" / "nnUNet_results_repeat2" and second.results.is_dir()
    assert second.environment["nnUNet_results"] == str(second.results)
    assert second.environment["nnUNet_raw"] == runner.environment["nnUNet_raw"]  # the same datasets and plans
    assert runner.environment["nnUNet_results"] == str(tmp_path / "work" / "nnUNet_results")  # untouched
    assert merge_experiment.predictions_folder(second) == tmp_path / "work" / "predictions_repeat2"
    assert merge_experiment.predictions_folder(runner) == tmp_path / "work" / "predictions"
    assert second.logs == runner.logs / "repeat2"


@pytest.mark.parametrize("argv, message", [
    (["--cases", "5", "4", "5"], "--cases: expected at least 5 per source (nnU-Net's 5 folds), got [5, 4, 5]"),
    (["--size", "16"], "--size: expected at least 24 voxels, got 16"),
    (["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
    (["--repeats", "0"], "--repeats: expected an int >= 1, got 0"),
    (["--dataset-id", "998"], "--dataset-id: expected an ID in [1, 996]"),
])
def test_merge_experiment_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_experiment.parse_args(argv + ["--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
