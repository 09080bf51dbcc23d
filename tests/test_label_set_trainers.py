"""The missing-label trainers get each batch's label sets: nnUNetTrainerMarginalDice and
nnUNetTrainerLeafDice turn nnU-Net's batch['keys'] into the (B, C) ``annotated`` table of their loss,
in nnU-Net's own train_step and validation_step, at every deep-supervision scale; they check the
dataset's label sets, and the fold's label maps against them, when training starts; without dataset.json
"annotated_labels" they keep the losses' "annotated iff present" fallback."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_losses import leaf_dice_loss, marginal_dice_loss
from nnunet_losses.training import missing_label_trainer
from nnunet_losses.training.label_sets import LabelResolver, labels_in
from nnunet_losses.commands.synthetic import FILE_ENDING
from nnunet_losses.trainers import nnUNetTrainerLeafDice, nnUNetTrainerMarginalDice

pytestmark = pytest.mark.usefixtures("single_threaded")

NNUNET_ON_TRAIN_START = nnUNetTrainer.on_train_start  # the real one, for the tests that run it

DATASET_ID = 943
# labels: background 0, organ 1, lesion 2, vessel 3 (nnunet_losses.commands.synthetic.LABELS); with seed 0
# every generated case has organ and vessel, all but labelsets_003 a lesion. The fixture sets the labels
# these sets leave out to background in the raw maps, as a partially labelled dataset has them.
LABEL_SETS = {"labelsets_001": ["organ"], "labelsets_003": [], "labelsets_004": ["vessel", 1]}
# the (B, C) table of a batch, derived by hand: column 0 (background) always True, column c True iff c
# is annotated in the case; a case not listed is fully annotated
EXPECTED_ROWS = {
    "labelsets_000": [True, True, True, True],
    "labelsets_001": [True, True, False, False],
    "labelsets_003": [True, False, False, False],
    "labelsets_004": [True, True, False, True],
}
MISSING_LABEL_TRAINERS = {"marginal": (nnUNetTrainerMarginalDice, marginal_dice_loss),
                          "leaf": (nnUNetTrainerLeafDice, leaf_dice_loss)}


@pytest.fixture(scope="module")
def planned(tmp_path_factory, plan_synthetic_dataset):
    """A 5-case synthetic 2D dataset, partially labelled as LABEL_SETS says, planned and preprocessed by
    nnU-Net's own API (conftest; no training)."""
    return plan_synthetic_dataset(tmp_path_factory.mktemp("nnunet"), DATASET_ID, "LabelSets", size=32,
                                  edit_raw=lambda folder: remove_unannotated_labels(folder, LABEL_SETS))


def remove_unannotated_labels(raw_dataset: Path, label_sets: dict) -> None:
    """Set the labels a case's set leaves out to background in its raw label map."""
    labels = json.loads((raw_dataset / "dataset.json").read_text())["labels"]
    resolver = LabelResolver({"labels": labels})
    for case, annotated in label_sets.items():
        path = str(raw_dataset / "labelsTr" / f"{case}{FILE_ENDING}")
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
        array[~np.isin(array, list(resolver.resolve_all(annotated, case)))] = 0
        written = sitk.GetImageFromArray(array)
        written.CopyInformation(image)
        sitk.WriteImage(written, path)


@pytest.fixture(autouse=True)
def nnunet_env(planned, monkeypatch):
    planned.use(monkeypatch)
    # the table is built before nnU-Net's own start (dataloaders, logging): that part is not under test
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)


class RecordingLoss(torch.nn.Module):
    """Stands in for the trainer's loss module: records what it is called with, returns the real loss."""

    def __init__(self, function):
        super().__init__()
        self.function = function
        self.calls = []

    def forward(self, x, y, loss_mask=None, annotated=None):
        self.calls.append({"shape": tuple(x.shape[2:]), "annotated": annotated})
        return self.function(x, y, loss_mask=loss_mask, annotated=annotated)


def initialized_trainer(trainer_class, planned, tmp_path, label_sets=None, fold=0):
    """A trainer initialised on CPU (network, optimizer, loss), training not started."""
    dataset_json = copy.deepcopy(planned.dataset_json)
    if label_sets is not None:
        dataset_json["annotated_labels"] = label_sets
    plans = copy.deepcopy(planned.plans)
    plans["continue_training"] = False  # what nnU-Net's run_training reads from the plans
    trainer = trainer_class(plans, "2d", fold, dataset_json, torch.device("cpu"))
    trainer.log_file = str(tmp_path / f"log_{id(trainer)}.txt")
    trainer.initialize()
    return trainer


def started_trainer(trainer_class, planned, tmp_path, label_sets=None, fold=0):
    """A trainer initialised on CPU (network, optimizer, loss) whose training has started."""
    trainer = initialized_trainer(trainer_class, planned, tmp_path, label_sets, fold)
    trainer.on_train_start()
    return trainer


def spy_on_loss(trainer, function) -> RecordingLoss:
    """Replace the loss inside nnU-Net's deep-supervision wrapper and our TrainerLossCall by a recorder."""
    recorder = RecordingLoss(function)
    trainer.loss.loss.loss = recorder
    return recorder


def batch_of(trainer, keys, seed=0):
    """An nnU-Net batch of 32x32 patches: data, one label map per deep-supervision scale, keys."""
    generator = torch.Generator().manual_seed(seed)
    scales = trainer._get_deep_supervision_scales()
    data = torch.randn(len(keys), 1, 32, 32, generator=generator)
    # label maps that fit the label sets: a class not annotated in a case has no voxels there
    annotated = torch.tensor([EXPECTED_ROWS.get(key, [True] * 4) for key in keys])
    targets = []
    for scale in scales:
        labels = torch.randint(0, 4, (len(keys), 1, *(int(32 * f) for f in scale)), generator=generator)
        keep = torch.gather(annotated, 1, labels.flatten(1)).view_as(labels)
        targets.append(torch.where(keep, labels, 0).float())
    return {"data": data, "target": targets, "keys": keys}


@pytest.mark.parametrize("kind", MISSING_LABEL_TRAINERS)
@pytest.mark.parametrize("step", ["train_step", "validation_step"])
def test_each_sample_gets_its_case_label_set_at_every_scale(planned, tmp_path, kind, step):
    trainer_class, function = MISSING_LABEL_TRAINERS[kind]
    trainer = started_trainer(trainer_class, planned, tmp_path, LABEL_SETS)
    recorder = spy_on_loss(trainer, function)
    keys = ["labelsets_003", "labelsets_000", "labelsets_004", "labelsets_001"]
    batch = batch_of(trainer, keys)
    if step == "validation_step":
        trainer.network.eval()  # as nnU-Net's on_validation_epoch_start
    result = getattr(trainer, step)(batch)

    expected = torch.tensor([EXPECTED_ROWS[k] for k in keys])
    used_scales = [w for w in trainer.loss.weight_factors if w != 0]  # nnU-Net skips 0-weight outputs
    assert len(recorder.calls) == len(used_scales) >= 2
    for call in recorder.calls:
        assert call["annotated"].dtype == torch.bool
        assert torch.equal(call["annotated"], expected)
    # the step's loss is nnU-Net's weighted sum of the real loss with those label sets
    with torch.no_grad():
        trainer.network.eval()
        outputs = trainer.network(batch["data"])
    expected_loss = sum(w * function(x, y, annotated=expected)
                        for w, x, y in zip(trainer.loss.weight_factors, outputs, batch["target"]) if w != 0)
    if step == "validation_step":  # no optimizer step happened: the recorded value is reproducible
        assert float(result["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
        assert {"tp_hard", "fp_hard", "fn_hard"} <= set(result)  # nnU-Net's online pseudo-Dice is kept
    else:
        assert set(result) == {"loss"} and torch.isfinite(torch.as_tensor(result["loss"]))
    assert trainer.batch_annotated is None  # nothing left over for a later call


@pytest.mark.parametrize("kind", MISSING_LABEL_TRAINERS)
def test_without_label_sets_the_loss_keeps_its_fallback(planned, tmp_path, kind):
    trainer_class, function = MISSING_LABEL_TRAINERS[kind]
    trainer = started_trainer(trainer_class, planned, tmp_path, label_sets=None)
    assert trainer.annotated_table is None
    recorder = spy_on_loss(trainer, function)
    trainer.validation_step(batch_of(trainer, ["labelsets_003", "labelsets_001"]))
    assert recorder.calls and all(call["annotated"] is None for call in recorder.calls)
    assert "annotated iff present" in Path(trainer.log_file).read_text()


@pytest.mark.parametrize("label_sets, message", [
    ({"labelsets_009": []}, r"dataset.json 'annotated_labels': expected identifiers of the dataset's 5 training "
                            r"cases, got unknown case 'labelsets_009'"),
    ({"labelsets_002": ["tumour"]}, r"dataset.json 'annotated_labels' of case 'labelsets_002': expected a label name "
                                    r".*got unknown label 'tumour'"),
    ({"labelsets_002": ["background"]}, r"of case 'labelsets_002': expected a foreground label, got the background"),
])
@pytest.mark.parametrize("kind", MISSING_LABEL_TRAINERS)
def test_bad_label_sets_stop_training_at_start_naming_the_case(planned, tmp_path, kind, label_sets, message):
    with pytest.raises(ValueError, match=message):
        started_trainer(MISSING_LABEL_TRAINERS[kind][0], planned, tmp_path, label_sets)


def test_a_batch_key_outside_the_dataset_is_an_error(planned, tmp_path):
    trainer = started_trainer(nnUNetTrainerLeafDice, planned, tmp_path, LABEL_SETS)
    with pytest.raises(ValueError, match=r"keys: expected identifiers of the 5 cases .*, got unknown case 'other_001'"):
        trainer.validation_step(batch_of(trainer, ["labelsets_000", "other_001"]))
    assert trainer.batch_annotated is None


def test_label_sets_are_logged_at_start(planned, tmp_path):
    trainer = started_trainer(nnUNetTrainerMarginalDice, planned, tmp_path, LABEL_SETS)
    assert "3 of the 5 training cases are partially annotated" in Path(trainer.log_file).read_text()


# ---------------------------------------------------------------------------------------------
# the fold's label maps against their label sets, before training
# ---------------------------------------------------------------------------------------------
# labelsets_000 has vessel voxels, labelsets_002 (left fully labelled by the fixture) all three labels,
# labelsets_003 (emptied by the fixture) none: its set, which calls organ and lesion missing, is consistent
CONTRADICTING = {"labelsets_000": ["organ", "lesion"], "labelsets_002": [], "labelsets_003": ["vessel"]}
CONTRADICTION_MESSAGE = (
    "dataset.json 'annotated_labels': expected label sets that include every label with voxels in the case's "
    "label map, got 2 cases whose sets do not: case 'labelsets_000' contains label 'vessel' (3), which its label "
    "set marks as not annotated; case 'labelsets_002' contains labels 'organ' (1), 'lesion' (2) and 'vessel' (3), "
    "which its label set marks as not annotated. Add those labels to the cases' sets, or set their voxels to "
    "background in the raw label maps and preprocess again."
)
# fold 0 holds three cases (labelsets_004 outside it), fold 1 the other two and labelsets_000
TWO_FOLDS = [{"train": ["labelsets_000", "labelsets_001"], "val": ["labelsets_002"]},
             {"train": ["labelsets_003", "labelsets_004"], "val": ["labelsets_000"]}]


def preprocessed_dataset(planned) -> Path:
    return planned.preprocessed / planned.name


@pytest.fixture
def two_fold_split(planned):
    """nnU-Net's splits_final.json replaced by TWO_FOLDS for one test."""
    path = preprocessed_dataset(planned) / "splits_final.json"
    previous = path.read_text() if path.exists() else None
    path.write_text(json.dumps(TWO_FOLDS))
    yield
    if previous is None:
        path.unlink()
    else:
        path.write_text(previous)


def test_the_preprocessed_label_maps_hold_what_the_messages_below_say(planned):
    folder = str(preprocessed_dataset(planned) / "nnUNetPlans_2d")
    dataset = infer_dataset_class(folder)(folder)
    present = {case: labels_in(dataset.load_case(case)[1]) - {0, -1} for case in dataset.identifiers}
    assert present == {"labelsets_000": {1, 2, 3}, "labelsets_001": {1}, "labelsets_002": {1, 2, 3},
                       "labelsets_003": set(), "labelsets_004": {1, 3}}


@pytest.mark.parametrize("kind", MISSING_LABEL_TRAINERS)
def test_label_maps_contradicting_their_sets_stop_training_before_the_first_iteration(planned, tmp_path, monkeypatch,
                                                                                        kind):
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", NNUNET_ON_TRAIN_START)  # nnU-Net's real start
    trainer = initialized_trainer(MISSING_LABEL_TRAINERS[kind][0], planned, tmp_path, CONTRADICTING)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 1, 1
    calls = []
    get_dataloaders = nnUNetTrainer.get_dataloaders
    monkeypatch.setattr(nnUNetTrainer, "get_dataloaders",
                        lambda self: calls.append("dataloaders") or get_dataloaders(self))
    train_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda batch: calls.append("train_step") or train_step(batch))
    with pytest.raises(ValueError, match=f"^{re.escape(CONTRADICTION_MESSAGE)}$"):
        trainer.run_training()
    assert calls == []  # neither nnU-Net's dataloaders nor a training step had started


def test_consistent_label_maps_pass_and_the_checked_cases_are_logged(planned, tmp_path):
    trainer = started_trainer(nnUNetTrainerMarginalDice, planned, tmp_path, LABEL_SETS)
    assert trainer.annotated_table is not None
    assert ("Label maps checked against their label sets: 3 partially annotated case(s) of fold 0 (labelsets_001, "
            "labelsets_003, labelsets_004), no contradiction.") in Path(trainer.log_file).read_text()


def test_only_partially_annotated_cases_are_read(planned, tmp_path, monkeypatch):
    # labelsets_000 lists every label (fully annotated): its map cannot contradict its set
    read = []
    dataset_class = infer_dataset_class(str(preprocessed_dataset(planned) / "nnUNetPlans_2d"))
    load_case = dataset_class.load_case
    monkeypatch.setattr(dataset_class, "load_case", lambda self, case: read.append(case) or load_case(self, case))
    started_trainer(nnUNetTrainerLeafDice, planned, tmp_path,
                    {"labelsets_000": ["organ", "lesion", "vessel"], "labelsets_003": []})
    assert read == ["labelsets_003"]


def test_without_label_sets_no_label_map_is_read(planned, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(missing_label_trainer, "check_label_maps", lambda *args, **kwargs: calls.append(args) or [])
    started_trainer(nnUNetTrainerLeafDice, planned, tmp_path, label_sets=None)
    assert calls == []
    started_trainer(nnUNetTrainerLeafDice, planned, tmp_path, LABEL_SETS)  # the same spy sees a dataset with sets
    assert len(calls) == 1


def test_only_the_folds_cases_are_checked(planned, tmp_path, two_fold_split):
    # labelsets_004 has vessel voxels: its empty set contradicts its map, but the case is not in fold 0
    label_sets = {"labelsets_001": ["organ"], "labelsets_004": []}
    trainer = started_trainer(nnUNetTrainerLeafDice, planned, tmp_path, label_sets, fold=0)
    log = Path(trainer.log_file).read_text()
    assert "1 partially annotated case(s) of fold 0 (labelsets_001), no contradiction." in log
    # fold 1 trains on labelsets_004
    with pytest.raises(ValueError, match=r"got 1 case whose set does not: case 'labelsets_004' contains labels "
                                         r"'organ' \(1\) and 'vessel' \(3\), which its label set marks as not "
                                         r"annotated\."):
        started_trainer(nnUNetTrainerLeafDice, planned, tmp_path, label_sets, fold=1)
