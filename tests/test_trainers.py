"""Every trainer built on a plan nnU-Net generated for a tiny synthetic dataset (no training): its loss
is the intended one, with the intended hyperparameters and nnU-Net's deep-supervision weights, for
label, ignore-label and region datasets, and the start-up error where a loss refuses regions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch._dynamo import OptimizedModule

from nnunet_losses import (
    LabelMarginalLoss,
    LeafDiceLoss,
    MarginalDiceLoss,
    MimeLoss,
    NegativeMimeLoss,
    PhiDiceLoss,
    label_marginal_loss,
    leaf_dice_loss,
    marginal_dice_loss,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)
from nnunet_losses.training.checkpoint import add_to_checkpoint
from nnunet_losses.commands.synthetic import IGNORE_VALUE, LABELS, REGION_LABELS, REGIONS_CLASS_ORDER
from nnunet_losses.training.class_counts import ClassCountsFromSampler, balanced_class_scales, estimate_class_counts
from nnunet_losses.training.loss_assembly import (
    PerScaleDeepSupervision,
    RegionIgnoreChannel,
    TrainerLossCall,
    deep_supervision_weights,
)
from nnunet_losses.training.names import trainer_with_settings
from nnunet_losses.trainers import (
    TRAINER_NAMES,
    nnUNetTrainerCEKL,
    nnUNetTrainerCEL1,
    nnUNetTrainerDiceBCI,
    nnUNetTrainerDiceBI,
    nnUNetTrainerDiceCI,
    nnUNetTrainerDiceI,
    nnUNetTrainerDiceIEps,
    nnUNetTrainerLeafDice,
    nnUNetTrainerMarginalDice,
    nnUNetTrainerMime,
    nnUNetTrainerNegativeMime,
)

DATASET_ID = 941
# the plan of a 64x64 2D dataset has 5 stages, so 4 deep-supervision outputs: weights 1, 1/2, 1/4 and
# 0 for the lowest, normalised by 1.75
NNUNET_WEIGHTS = (4 / 7, 2 / 7, 1 / 7, 0.0)
NNUNET_WEIGHTS_DDP = tuple(w / 1.750001 for w in (1, 0.5, 0.25, 1e-6))  # DDP without compile: 1e-6, not 0


@pytest.fixture(scope="module")
def planned(tmp_path_factory, plan_synthetic_dataset):
    """A 5-case synthetic dataset planned and preprocessed (2d) by nnU-Net's own API (conftest)."""
    return plan_synthetic_dataset(tmp_path_factory.mktemp("nnunet"), DATASET_ID, "TrainerUnits")


@pytest.fixture(autouse=True)
def nnunet_env(planned, monkeypatch):
    planned.use(monkeypatch)


# the dataset kinds a trainer may meet: label values 0-3 (4 softmax outputs) or 3 sigmoid regions,
# each with or without nnU-Net's ignore label 4
DATASET_KINDS = {
    "labels": dict(LABELS),
    "labels+ignore": {**LABELS, "ignore": IGNORE_VALUE},
    "regions": dict(REGION_LABELS),
    "regions+ignore": {**REGION_LABELS, "ignore": IGNORE_VALUE},
}


def dataset_json_of(planned, kind: str) -> dict:
    dataset_json = copy.deepcopy(planned.dataset_json)
    dataset_json["labels"] = DATASET_KINDS[kind]
    if kind.startswith("regions"):
        dataset_json["regions_class_order"] = list(REGIONS_CLASS_ORDER)
    return dataset_json


def build_trainer(trainer_class, planned, kind: str = "labels") -> nnUNetTrainer:
    plans = copy.deepcopy(planned.plans)
    plans["continue_training"] = False
    return trainer_class(plans, "2d", 0, dataset_json_of(planned, kind), torch.device("cpu"))


def scale_batches(kind: str, seed: int, batch: int = 2, size: int = 16, scales: int = 4):
    """Logits and targets per deep-supervision scale, shaped as nnU-Net's pipeline gives them: label
    maps (B, 1, ...) with the ignore label on some voxels, or region targets (B, 3, ...) with the
    ignore label as an extra last channel."""
    generator = torch.Generator().manual_seed(seed)
    regions, ignore = kind.startswith("regions"), kind.endswith("+ignore")
    outputs, targets = [], []
    for scale in range(scales):
        side = size // 2**scale
        outputs.append(torch.randn(batch, 3 if regions else 4, side, side, generator=generator))
        if regions:
            target = (torch.rand(batch, 3, side, side, generator=generator) < 0.4).float()
            if ignore:
                ignored = (torch.rand(batch, 1, side, side, generator=generator) < 0.3).float()
                target = torch.cat([target * (1 - ignored), ignored], 1)  # regions are 0 where ignored
        else:
            target = torch.randint(0, 4, (batch, 1, side, side), generator=generator).float()
            if ignore:
                target[torch.rand(target.shape, generator=generator) < 0.3] = IGNORE_VALUE
        targets.append(target)
    return outputs, targets


def with_mask(kind: str, target: torch.Tensor):
    """The target and loss_mask that express the ignore label the independent way (as a mask)."""
    if kind == "labels+ignore":
        keep = target != IGNORE_VALUE
        return torch.where(keep, target, 0), keep.float()
    if kind == "regions+ignore":
        return target[:, :-1], 1 - target[:, -1:]
    return target, None


def reference_total(reference, kind, outputs, targets, weights):
    """Σ_i w_i · reference(x_i, y_i, loss_mask_i) over the deep-supervision outputs."""
    activation = "sigmoid" if kind.startswith("regions") else "softmax"
    total = 0.0
    for weight, x, y in zip(weights, outputs, targets):
        if weight:
            y, mask = with_mask(kind, y)
            total = total + weight * reference(x, y, mask, activation)
    return total


# trainer, the loss class it must use, its hyperparameters, the pure function it must equal, the
# dataset kinds it accepts
TRAINERS = {
    "nnUNetTrainerMime": (
        # before the class counts are estimated (start of training) the class attributes a, b are in place
        nnUNetTrainerMime, MimeLoss, {"a": 1.9, "b": 0.1, "include_background": True, "reduction": "mean"},
        lambda x, y, m, act: mime_loss(x, y, m, a=1.9, b=0.1, include_background=True, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerNegativeMime": (
        # class-balanced: the mime with a = 1, b = 0 (per class once the counts are in)
        nnUNetTrainerNegativeMime, MimeLoss, {"a": 1.0, "b": 0.0, "include_background": True, "reduction": "mean"},
        lambda x, y, m, act: negative_mime_loss(x, y, m, include_background=True),
        ("labels", "labels+ignore")),
    "nnUNetTrainerDiceI": (
        nnUNetTrainerDiceI, PhiDiceLoss, {"phi": "I", "include_background": False, "ddp": False},
        lambda x, y, m, act: phi_dice_loss(x, y, m, phi="I", epsilon=1e-7, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerDiceCI": (
        nnUNetTrainerDiceCI, PhiDiceLoss, {"phi": "CI", "include_background": False, "ddp": False},
        lambda x, y, m, act: phi_dice_loss(x, y, m, phi="CI", epsilon=1e-7, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerDiceBI": (
        nnUNetTrainerDiceBI, PhiDiceLoss, {"phi": "BI", "include_background": False, "ddp": False},
        lambda x, y, m, act: phi_dice_loss(x, y, m, phi="BI", epsilon=1e-7, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerDiceBCI": (
        nnUNetTrainerDiceBCI, PhiDiceLoss, {"phi": "BCI", "include_background": False, "ddp": False},
        lambda x, y, m, act: phi_dice_loss(x, y, m, phi="BCI", epsilon=1e-7, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerDiceIEps": (
        nnUNetTrainerDiceIEps, PhiDiceLoss, {"phi": "I", "include_background": False, "ddp": False},
        # before the estimate (start of training) the class attribute epsilon = 1e-7 is in place
        lambda x, y, m, act: phi_dice_loss(x, y, m, phi="I", epsilon=1e-7, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerMarginalDice": (
        nnUNetTrainerMarginalDice, MarginalDiceLoss, {"include_background": True},
        lambda x, y, m, act: marginal_dice_loss(x, y, m, epsilon=1e-7, include_background=True),
        ("labels", "labels+ignore")),
    "nnUNetTrainerLeafDice": (
        nnUNetTrainerLeafDice, LeafDiceLoss, {"include_background": True},
        lambda x, y, m, act: leaf_dice_loss(x, y, m, epsilon=1e-7, include_background=True, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerCEL1": (
        nnUNetTrainerCEL1, LabelMarginalLoss, {"penalty": "l1", "lam": 1.0, "tau": 10.0},
        lambda x, y, m, act: label_marginal_loss(x, y, m, penalty="l1", lam=1.0, tau=10.0, activation=act),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
    "nnUNetTrainerCEKL": (
        nnUNetTrainerCEKL, LabelMarginalLoss, {"penalty": "kl", "lam": 0.1, "tau": 10.0, "kl_knee": 0.5},
        lambda x, y, m, act: label_marginal_loss(x, y, m, penalty="kl", lam=0.1, tau=10.0, activation=act,
                                                kl_knee=0.5),
        ("labels", "labels+ignore", "regions", "regions+ignore")),
}
ACCEPTED = [(name, kind) for name, spec in TRAINERS.items() for kind in spec[4]]
REFUSED = [(name, kind) for name, spec in TRAINERS.items() for kind in DATASET_KINDS if kind not in spec[4]]


def test_every_trainer_of_the_contract_is_covered():
    from test_compound_trainers import COMPOUND_TRAINERS  # the Dice + CE trainers, tested there

    assert set(TRAINERS) | set(COMPOUND_TRAINERS) == set(TRAINER_NAMES)
    assert len(TRAINER_NAMES) == 16


def scale_losses_of(loss: torch.nn.Module) -> list:
    """What the deep-supervision wrapper calls per scale (one module for all, or one per scale)."""
    return list(loss.losses) if isinstance(loss, PerScaleDeepSupervision) else [loss.loss]


def our_losses(loss: torch.nn.Module):
    """The loss modules of ours inside ``trainer.loss`` (one per scale for the ε trainer)."""
    found = []
    for module in scale_losses_of(loss):
        while isinstance(module, (OptimizedModule, RegionIgnoreChannel, TrainerLossCall)):
            module = module._orig_mod if isinstance(module, OptimizedModule) else module.loss
        found.append(module)
    return found


@pytest.mark.parametrize("name,kind", ACCEPTED)
def test_loss_is_the_intended_one_with_its_hyperparameters_and_weights(planned, name, kind):
    trainer_class, loss_class, options, reference, _ = TRAINERS[name]
    trainer = build_trainer(trainer_class, planned, kind)
    loss = trainer._build_loss()

    assert loss.weight_factors == pytest.approx(NNUNET_WEIGHTS, abs=1e-12)
    # nnU-Net's own _build_loss gives the same weights for the same trainer
    assert loss.weight_factors == pytest.approx(nnUNetTrainer._build_loss(trainer).weight_factors, abs=1e-12)
    inner = our_losses(loss)
    assert len(inner) == (4 if issubclass(trainer_class, ClassCountsFromSampler) else 1)  # one per scale
    regions = kind.startswith("regions")
    for module in inner:
        assert type(module) is loss_class
        assert module.activation == ("sigmoid" if regions else "softmax")
        # label maps carry the ignore label; region targets carry it as a channel (RegionIgnoreChannel)
        expected_ignore = IGNORE_VALUE if kind == "labels+ignore" else None
        assert module.ignore_label == expected_ignore
        for attribute, value in options.items():
            assert getattr(module, attribute) == value, attribute
        if hasattr(module, "epsilon"):
            assert module.epsilon.tolist() == pytest.approx(1e-7)
    assert all(isinstance(module, RegionIgnoreChannel) == (kind == "regions+ignore")
               for module in scale_losses_of(loss))

    outputs, targets = scale_batches(kind, seed=len(name))
    expected = reference_total(reference, kind, outputs, targets, NNUNET_WEIGHTS)
    torch.testing.assert_close(loss(outputs, targets), expected, rtol=1e-5, atol=1e-6)


def test_the_kl_knee_of_a_name_reaches_the_loss(planned):
    from nnunet_losses.training.names import trainer_with_settings

    # _knee0, the paper's KL, in place of the trainer's 0.5
    trainer = build_trainer(trainer_with_settings(nnUNetTrainerCEKL, kl_knee=0.0), planned, "labels")
    (module,) = our_losses(trainer._build_loss())
    assert (module.penalty, module.kl_knee) == ("kl", 0.0)


@pytest.mark.parametrize("name,kind", REFUSED)
def test_softmax_only_trainers_refuse_region_datasets_at_start_up(planned, name, kind):
    trainer = build_trainer(TRAINERS[name][0], planned, kind)
    with pytest.raises(ValueError, match=f"{name}: expected a dataset with mutually exclusive labels .*got a region"):
        trainer._build_loss()


@pytest.mark.parametrize("is_ddp,compiled,expected", [
    (False, False, NNUNET_WEIGHTS),
    (False, True, NNUNET_WEIGHTS),
    (True, True, NNUNET_WEIGHTS),  # with torch.compile DDP tolerates the 0
    (True, False, NNUNET_WEIGHTS_DDP),
])
def test_deep_supervision_weights_follow_nnunet_including_its_ddp_detail(planned, monkeypatch, is_ddp, compiled,
                                                                        expected):
    trainer = build_trainer(nnUNetTrainerDiceBI, planned)
    trainer.is_ddp = is_ddp
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: compiled)
    assert deep_supervision_weights(trainer) == pytest.approx(expected, abs=1e-12)
    assert nnUNetTrainer._build_loss(trainer).weight_factors == pytest.approx(expected, abs=1e-12)
    loss = trainer._build_loss()
    assert loss.weight_factors == pytest.approx(expected, abs=1e-12)
    assert our_losses(loss)[0].ddp is is_ddp  # Φ losses gather the global batch under DDP


def test_without_deep_supervision_the_loss_is_called_directly(planned):
    trainer = build_trainer(nnUNetTrainerMime, planned)
    trainer.enable_deep_supervision = False
    assert deep_supervision_weights(trainer) is None
    assert type(trainer._build_loss()) is MimeLoss
    eps_trainer = build_trainer(nnUNetTrainerDiceIEps, planned)
    eps_trainer.enable_deep_supervision = False
    assert type(eps_trainer._build_loss()) is PhiDiceLoss


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_loss_is_compiled_where_nnunet_compiles(planned, monkeypatch, name):
    trainer = build_trainer(TRAINERS[name][0], planned)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    loss = trainer._build_loss()
    assert all(isinstance(module, OptimizedModule) for module in scale_losses_of(loss))
    assert all(type(module) is TRAINERS[name][1] for module in our_losses(loss))
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: False)
    assert not any(isinstance(module, OptimizedModule) for module in scale_losses_of(trainer._build_loss()))


def test_compiled_loss_gives_the_eager_value(planned, monkeypatch):
    # nnU-Net compiles on CUDA by default; one real compilation (CPU here, one output scale to compile
    # once) of the most indirect call path: compiled TrainerLossCall -> trainer method -> marginal Dice
    # with the ignore label
    trainer = build_trainer(nnUNetTrainerMarginalDice, planned, "labels+ignore")
    trainer.enable_deep_supervision = False
    eager = trainer._build_loss()
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    compiled = trainer._build_loss()
    assert isinstance(compiled, OptimizedModule)
    outputs, targets = scale_batches("labels+ignore", seed=13, scales=1)
    torch.testing.assert_close(compiled(outputs[0], targets[0]), eager(outputs[0], targets[0]))


def test_short_run_variant_trains_few_epochs_of_few_iterations_in_its_own_folder(planned):
    full = build_trainer(nnUNetTrainerDiceIEps, planned)
    short = build_trainer(trainer_with_settings(nnUNetTrainerDiceIEps, epochs=3, iterations=10), planned)
    tiny = build_trainer(trainer_with_settings(nnUNetTrainer, epochs=1, iterations=4), planned)
    assert (full.num_epochs, full.num_iterations_per_epoch, full.num_val_iterations_per_epoch) == (1000, 250, 50)
    # validation shrinks with nnU-Net's 250 : 50 ratio, at least one batch
    assert (short.num_epochs, short.num_iterations_per_epoch, short.num_val_iterations_per_epoch) == (3, 10, 2)
    assert (tiny.num_epochs, tiny.num_iterations_per_epoch, tiny.num_val_iterations_per_epoch) == (1, 4, 1)
    assert Path(full.output_folder_base).name == "nnUNetTrainerDiceIEps__nnUNetPlans__2d"
    assert Path(short.output_folder_base).name == "nnUNetTrainerDiceIEps_3ep_10it__nnUNetPlans__2d"
    assert Path(tiny.output_folder_base).name == "nnUNetTrainer_1ep_4it__nnUNetPlans__2d"
    assert short.count_batches == 50 and isinstance(short._build_loss(), PerScaleDeepSupervision)
    assert list(short.my_init_kwargs) == ["plans", "configuration", "fold", "dataset_json", "device"]


# ----------------------------------------------------------------------------------------------
# equality with nnU-Net's own losses where the definitions coincide
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phi,batch_dice", [("I", False), ("BI", True)])
@pytest.mark.parametrize("kind", ["labels", "regions+ignore"])
def test_phi_dice_trainer_equals_nnunet_soft_dice_with_its_smooth(planned, phi, batch_dice, kind):
    # Φ = I / BI with ε = nnU-Net's smooth is 1 + nnU-Net's MemoryEfficientSoftDiceLoss (batch_dice
    # False / True); deep-supervision weights sum to 1, so the totals differ by exactly 1
    class Smooth(nnUNetTrainerDiceI):
        epsilon = 1e-5

    Smooth.phi = phi
    trainer = build_trainer(Smooth, planned, kind)
    if kind == "labels":
        dice = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, batch_dice=batch_dice, do_bg=False, smooth=1e-5,
                                           ddp=False)
    else:  # nnU-Net's region loss with the dice part only: same ignore channel handling
        dice = DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                               weight_ce=0, use_ignore_label=True)
    nnunet = DeepSupervisionWrapper(dice, NNUNET_WEIGHTS)
    outputs, targets = scale_batches(kind, seed=7)
    torch.testing.assert_close(trainer._build_loss()(outputs, targets), 1 + nnunet(outputs, targets),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["labels", "labels+ignore", "regions", "regions+ignore"])
def test_label_marginal_trainer_with_lam_0_equals_nnunet_cross_entropy(planned, kind):
    class NoPenalty(nnUNetTrainerCEL1):
        lam = 0.0

    trainer = build_trainer(NoPenalty, planned, kind)
    if kind.startswith("labels"):
        ignore = {"ignore_index": IGNORE_VALUE} if kind.endswith("ignore") else {}
        cross_entropy = RobustCrossEntropyLoss(**ignore)
    else:
        cross_entropy = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                                        weight_dice=0, use_ignore_label=kind.endswith("ignore"))
    outputs, targets = scale_batches(kind, seed=11)
    expected = DeepSupervisionWrapper(cross_entropy, NNUNET_WEIGHTS)(outputs, targets)
    if kind == "regions+ignore":
        # nnU-Net's DC_and_BCE_loss with the ignore label divides the BCE summed over the 3 regions by the
        # number of counted voxels: 3 times the mean over voxels and regions it takes without the ignore
        # label. Ours is that mean in both cases.
        expected = expected / 3
    torch.testing.assert_close(trainer._build_loss()(outputs, targets), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# hyperparameters by subclassing, the missing-label hook
# ----------------------------------------------------------------------------------------------
def test_hyperparameters_by_subclassing_in_three_lines(planned):
    class nnUNetTrainerMimeA15(nnUNetTrainerMime):
        a = 1.5

    class nnUNetTrainerCEL1Half(nnUNetTrainerCEL1):
        lam = 0.5

    mime = build_trainer(nnUNetTrainerMimeA15, planned)._build_loss()
    assert all(loss.a.item() == 1.5 and loss.b.item() == pytest.approx(0.1) for loss in our_losses(mime))
    # zero logits: s = 1/4 per class; per voxel Σ_c w_c s_c = (-a + 3b)/4 = (-1.5 + 0.3)/4 = -0.3 at every
    # scale, and the deep-supervision weights sum to 1
    outputs = [torch.zeros(2, 4, side, side) for side in (16, 8, 4, 2)]
    targets = [torch.randint(0, 4, (2, 1, side, side), generator=torch.Generator().manual_seed(side)).float()
               for side in (16, 8, 4, 2)]
    assert mime(outputs, targets).item() == pytest.approx(-0.3, abs=1e-6)
    assert build_trainer(nnUNetTrainerCEL1Half, planned)._build_loss().loss.lam == 0.5


def test_bad_hyperparameter_in_a_subclass_stops_at_start_up(planned):
    class NegativeA(nnUNetTrainerMime):
        a = -1.0

    class EpsWithCI(nnUNetTrainerDiceIEps):
        phi = "CI"

    with pytest.raises(ValueError, match="a: expected finite values >= 0"):
        build_trainer(NegativeA, planned)._build_loss()
    with pytest.raises(ValueError, match="EpsWithCI.phi: expected 'I' or 'BI'.*got 'CI'"):
        build_trainer(EpsWithCI, planned)._build_loss()


def test_missing_label_trainers_call_their_loss_through_one_overridable_method(planned):
    calls = []

    class AllAnnotated(nnUNetTrainerMarginalDice):
        def call_missing_label_loss(self, loss, x, y, loss_mask=None):
            calls.append(tuple(x.shape))
            return loss(x, y, loss_mask=loss_mask, annotated=torch.ones(x.shape[:2], dtype=torch.bool))

    loss = build_trainer(AllAnnotated, planned)._build_loss()
    outputs, targets = scale_batches("labels", seed=3)
    expected = sum(w * marginal_dice_loss(x, y, annotated=torch.ones(2, 4, dtype=torch.bool))
                   for w, x, y in zip(NNUNET_WEIGHTS, outputs, targets) if w)
    torch.testing.assert_close(loss(outputs, targets), expected)
    assert calls == [(2, 4, 16, 16), (2, 4, 8, 8), (2, 4, 4, 4)]  # the 0-weight output is skipped, as nnU-Net does
    # the default passes annotated=None: the loss's "annotated iff present" fallback
    default = build_trainer(nnUNetTrainerLeafDice, planned)._build_loss()
    fallback = sum(w * leaf_dice_loss(x, y, include_background=True) for w, x, y in zip(NNUNET_WEIGHTS, outputs, targets)
                   if w)
    torch.testing.assert_close(default(outputs, targets), fallback)


# ----------------------------------------------------------------------------------------------
# the heuristic ε of nnUNetTrainerDiceIEps
# ----------------------------------------------------------------------------------------------
def label_batches():
    """Two batches of two samples at two deep-supervision scales, 4 classes, ignore label 4.

    scale 0 (2x2): a [[0,1],[1,2]]  b [[0,0],[0,0]]  c [[3,3],[1,0]]  d [[4,1],[0,0]]
      class 0: 1+4+1+2 = 8, class 1: 2+0+1+1 = 4, class 2: 1, class 3: 2 (the 4 is not counted)
      -> ε = (8, 4, 1, 2) / 4 samples = (2, 1, 0.25, 0.5)
    scale 1 (1x1): a [[1]]  b [[0]]  c [[3]]  d [[4]]  -> ε = (1, 1, 0, 1) / 4
    """
    def maps(*rows):
        return torch.tensor(rows, dtype=torch.float32)[:, None]

    return [
        {"target": [maps([[0, 1], [1, 2]], [[0, 0], [0, 0]]), maps([[1]], [[0]])]},
        {"target": [maps([[3, 3], [1, 0]], [[4, 1], [0, 0]]), maps([[3]], [[4]])]},
    ]


EXPECTED_LABEL_EPSILON = [[2.0, 1.0, 0.25, 0.5], [0.25, 0.25, 0.0, 0.25]]


def test_heuristic_epsilon_per_class_and_scale_from_label_batches():
    epsilon = estimate_class_counts(iter(label_batches()), 2, num_classes=4, ignore_label=4,
                                         region_ignore_channel=False, progress=False)
    assert [e.tolist() for e in epsilon] == EXPECTED_LABEL_EPSILON


def test_heuristic_epsilon_from_region_batches_drops_the_ignore_channel():
    # one batch of 2 samples, 2 regions + the ignore channel, 1x2 pixels, one scale:
    # region 0: sample 0 [1, 1], sample 1 [0, 1] -> 3 / 2; region 1: [0, 1], [0, 0] -> 1 / 2
    target = torch.tensor([[[[1, 1]], [[0, 1]], [[0, 0]]],
                           [[[0, 1]], [[0, 0]], [[1, 0]]]], dtype=torch.float32)
    epsilon = estimate_class_counts(iter([{"target": target}]), 1, num_classes=2, ignore_label=None,
                                         region_ignore_channel=True, progress=False)
    assert [e.tolist() for e in epsilon] == [[1.5, 0.5]]


def test_heuristic_epsilon_needs_a_positive_number_of_batches():
    with pytest.raises(ValueError, match="count_batches: expected an int >= 1, got 0"):
        estimate_class_counts(iter(label_batches()), 0, 4, None, False)


def log_text(trainer) -> str:
    return Path(trainer.log_file).read_text()


def own_log(trainer, folder: Path):
    """Trainers built in the same second share nnU-Net's timestamped log file: give this one its own."""
    trainer.log_file = str(folder / f"log_{id(trainer)}.txt")
    return trainer


def two_scale_trainer(planned, trainer_class=nnUNetTrainerDiceIEps, kind="labels+ignore"):
    """A trainer whose network has 2 deep-supervision outputs (to match label_batches)."""
    trainer = build_trainer(trainer_class, planned, kind)
    trainer._get_deep_supervision_scales = lambda: [[1.0, 1.0], [0.5, 0.5]]
    return trainer


def started_on_label_batches(planned, monkeypatch, tmp_path, trainer_class=nnUNetTrainerDiceIEps):
    """A two-scale trainer whose on_train_start counted the classes of label_batches (2 batches)."""
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)  # no real dataloaders needed
    trainer = own_log(two_scale_trainer(planned, trainer_class), tmp_path)
    trainer.count_batches = 2
    trainer.loss = trainer._build_loss()
    trainer.dataloader_train = iter(label_batches())
    trainer.on_train_start()
    return trainer


def test_eps_trainer_estimates_from_its_training_dataloader_at_start(planned, monkeypatch, tmp_path):
    trainer = started_on_label_batches(planned, monkeypatch, tmp_path)
    assert [e.tolist() for e in trainer.class_counts] == EXPECTED_LABEL_EPSILON
    assert [loss.epsilon.tolist() for loss in trainer.epsilon_losses] == EXPECTED_LABEL_EPSILON
    assert f"Heuristic epsilon estimated, per deep-supervision scale (rows) and class (columns): " \
           f"{json.dumps(EXPECTED_LABEL_EPSILON)}" in log_text(trainer)
    # the estimate is what the loss now uses: the same value as the pure function with that ε
    outputs, targets = scale_batches("labels", seed=5, size=4, scales=2)
    expected = phi_dice_loss(outputs[0], targets[0], phi="I", epsilon=EXPECTED_LABEL_EPSILON[0])
    assert trainer.loss.weight_factors == (1.0, 0.0)
    torch.testing.assert_close(trainer.loss(outputs, targets), expected)


def test_eps_checkpoint_round_trip_reuses_the_stored_epsilon(planned, tmp_path, monkeypatch):
    first = build_trainer(nnUNetTrainerDiceIEps, planned)
    first.initialize()
    stored = [torch.arange(4, dtype=torch.float64) + 10 * scale + 0.125 for scale in range(4)]
    first.class_counts = stored
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    first.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)[nnUNetTrainerDiceIEps._class_counts_key] == [e.tolist() for e in stored]

    second = own_log(build_trainer(nnUNetTrainerDiceIEps, planned), tmp_path)
    second.load_checkpoint(checkpoint)
    assert [e.tolist() for e in second.class_counts] == [e.tolist() for e in stored]
    assert [loss.epsilon.tolist() for loss in second.epsilon_losses] == [e.tolist() for e in stored]
    assert ("Heuristic epsilon reused from the checkpoint (not re-estimated), per deep-supervision scale (rows) "
            f"and class (columns): {json.dumps([e.tolist() for e in stored])}") in log_text(second)

    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    second.dataloader_train = None  # must not be touched: nothing is re-estimated
    second.on_train_start()
    assert "Estimating the heuristic epsilon" not in log_text(second)


def test_eps_checkpoint_without_epsilon_is_estimated_again(planned, tmp_path):
    plain = build_trainer(nnUNetTrainerDiceI, planned)
    plain.initialize()
    checkpoint = str(tmp_path / "checkpoint_final.pth")
    plain.save_checkpoint(checkpoint)
    assert nnUNetTrainerDiceIEps._class_counts_key not in torch.load(checkpoint, weights_only=False)

    trainer = own_log(build_trainer(nnUNetTrainerDiceIEps, planned), tmp_path)
    trainer.load_checkpoint(checkpoint)
    assert trainer.class_counts is None
    assert "The checkpoint holds no heuristic epsilon for this network (expected 4 scales x 4 classes): it is " \
           "estimated again." in log_text(trainer)


# ----------------------------------------------------------------------------------------------
# the class-balanced mimes: the same class counts, turned into per-class weights
# ----------------------------------------------------------------------------------------------
def test_balanced_class_scales_by_hand():
    # counts (2, 1, 0.25, 0.5): Σ = 3.75, C = 4, k_c = 3.75 / (4 n_c); the mean over voxels Σ f_c k_c = 1
    scales = balanced_class_scales(torch.tensor([2.0, 1.0, 0.25, 0.5]))
    assert scales.tolist() == [0.46875, 0.9375, 3.75, 1.875]
    assert float((torch.tensor([2.0, 1.0, 0.25, 0.5]) / 3.75 * scales).sum()) == pytest.approx(1.0)
    # a class never sampled counts as the rarest sampled one: (3, 1, 0) -> (3, 1, 1), Σ = 5, k = 5 / (3 n)
    assert balanced_class_scales(torch.tensor([3.0, 1.0, 0.0])).tolist() == pytest.approx([5 / 9, 5 / 3, 5 / 3])
    with pytest.raises(ValueError, match=r"class counts: expected at least one class with voxels, got \[0.0, 0.0\]"):
        balanced_class_scales(torch.zeros(2))


# label_batches' counts: scale 0 (2, 1, 0.25, 0.5) -> k as above; scale 1 (0.25, 0.25, 0, 0.25) -> the
# unsampled class counts as 0.25 too, k = 1; a, b = 1.9 k, 0.1 k
BALANCED_A = [[1.9 * k for k in (0.46875, 0.9375, 3.75, 1.875)], [1.9] * 4]
BALANCED_B = [[0.1 * k for k in (0.46875, 0.9375, 3.75, 1.875)], [0.1] * 4]


@pytest.mark.parametrize("trainer_class, expected_b, powers", [
    (nnUNetTrainerMime, [[0.1] * 4] * 2, "of a to the power 1, of b to the power 0"),  # epoch 0: b not yet balanced
    (trainer_with_settings(nnUNetTrainerMime, b_ramp=0.0), BALANCED_B, "to the power 1"),
])
def test_mime_trainer_balances_its_weights_from_its_training_dataloader(planned, monkeypatch, tmp_path,
                                                                       trainer_class, expected_b, powers):
    trainer = started_on_label_batches(planned, monkeypatch, tmp_path, trainer_class)
    assert [c.tolist() for c in trainer.class_counts] == EXPECTED_LABEL_EPSILON
    for name, expected in (("a", BALANCED_A), ("b", expected_b)):
        per_scale = torch.stack([getattr(loss, name) for loss in trainer.mime_losses])
        torch.testing.assert_close(per_scale, torch.tensor(expected, dtype=torch.float64))
    assert "Estimating the class counts for the mime weights from 2 training batches" in log_text(trainer)
    assert f"Class-balanced mime weights (annealed: the balancing factors {powers}), per deep-supervision " \
           "scale (rows) and class (columns): a = " in log_text(trainer)
    outputs, targets = scale_batches("labels", seed=3, size=4, scales=2)
    expected = mime_loss(outputs[0], targets[0], a=BALANCED_A[0], b=expected_b[0])
    torch.testing.assert_close(trainer.loss(outputs, targets), expected)


def test_negative_mime_balanced_is_the_mime_with_a_k_and_b_0(planned, monkeypatch, tmp_path):
    trainer = started_on_label_batches(planned, monkeypatch, tmp_path, nnUNetTrainerNegativeMime)
    assert trainer.mime_losses[0].a.tolist() == [0.46875, 0.9375, 3.75, 1.875]
    assert trainer.mime_losses[0].b.tolist() == [0.0] * 4


def test_per_class_mime_weights_are_balanced_class_by_class(planned):
    trainer = trainer_with_settings(nnUNetTrainerMime, a=(1.0, 2.0, 3.0, 4.0))
    built = build_trainer(trainer, planned)
    built.loss = built._build_loss()
    built.class_counts = [torch.tensor([2.0, 1.0, 0.25, 0.5], dtype=torch.float64)] * 4
    built._use_class_counts()
    assert built.mime_losses[0].a.tolist() == [0.46875, 1.875, 11.25, 7.5]
    wrong = build_trainer(trainer_with_settings(nnUNetTrainerMime, a=(1.0, 2.0)), planned)
    wrong.loss = wrong._build_loss()
    wrong.class_counts = built.class_counts
    with pytest.raises(ValueError, match=r"nnUNetTrainerMime_a1,2.a: expected a number or one value per output "
                                         r"channel \(4\), got \[1.0, 2.0\]"):
        wrong._use_class_counts()


def test_mime_checkpoint_round_trip_reuses_the_stored_counts(planned, tmp_path, monkeypatch):
    first = build_trainer(nnUNetTrainerMime, planned)
    first.initialize()
    first.class_counts = [torch.tensor([2.0, 1.0, 0.25, 0.5], dtype=torch.float64) / 2**s for s in range(4)]
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    first.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["mime_class_counts"] == [c.tolist() for c in first.class_counts]

    second = own_log(build_trainer(nnUNetTrainerMime, planned), tmp_path)
    second.load_checkpoint(checkpoint)
    assert [c.tolist() for c in second.class_counts] == [c.tolist() for c in first.class_counts]
    # the factors do not depend on the counts' scale: every output scale gets the same weights here
    torch.testing.assert_close(torch.stack([loss.a for loss in second.mime_losses]),
                               torch.tensor([BALANCED_A[0]] * 4, dtype=torch.float64))
    assert "Class counts for the mime weights reused from the checkpoint (not re-estimated)" in log_text(second)
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    second.dataloader_train = None  # must not be touched: nothing is re-estimated
    second.on_train_start()
    assert "Estimating the class counts" not in log_text(second)


def test_annealed_mime_weights_go_from_balanced_to_the_papers_in_the_second_half(planned, tmp_path, monkeypatch):
    # 20 epochs, anneal_window (0.5, 1): the factors k_c (power 1) to epoch 10, then to the power (20 - epoch) / 10;
    # b's factors ramp in first, b_ramp 0.25: to the power epoch / 5 until epoch 5
    annealed = nnUNetTrainerMime  # the default; _cwbalanced keeps the factors throughout
    trainer = own_log(build_trainer(annealed, planned), tmp_path)
    trainer.num_epochs = 20
    trainer.loss = trainer._build_loss()
    trainer.class_counts = [torch.tensor([2.0, 1.0, 0.25, 0.5], dtype=torch.float64)] * 4  # k as by hand above
    started = []  # nnU-Net's own epoch start (learning rate, train mode, "Epoch N") still runs
    monkeypatch.setattr(nnUNetTrainer, "on_train_epoch_start", lambda self: started.append(self.current_epoch))
    k = (0.46875, 0.9375, 3.75, 1.875)
    for epoch, power, b_power in ((0, 1.0, 0.0), (2, 1.0, 0.4), (5, 1.0, 1.0), (10, 1.0, 1.0), (15, 0.5, 0.5),
                                  (19, 0.1, 0.1)):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.mime_losses[0].a.tolist() == pytest.approx([1.9 * kc ** power for kc in k])
        assert trainer.mime_losses[3].b.tolist() == pytest.approx([0.1 * kc ** b_power for kc in k])
    assert started == [0, 2, 5, 10, 15, 19]
    assert "Class-balanced mime weights (annealed: the balancing factors of a to the power 1, of b to the power " \
           "0.4), per" in log_text(trainer)
    # the loss the network is trained with uses them: the mime of epoch 19's weights at every scale
    outputs, targets = scale_batches("labels", seed=3, scales=4)
    a19, b19 = [1.9 * kc ** 0.1 for kc in k], [0.1 * kc ** 0.1 for kc in k]
    expected = sum(weight * mime_loss(o, t, a=a19, b=b19) for weight, o, t in
                   zip(trainer.loss.weight_factors, outputs, targets))
    torch.testing.assert_close(trainer.loss(outputs, targets), expected)
    log_lines = log_text(trainer).count("Class-balanced mime weights")
    trainer.on_train_epoch_start()  # the same epoch again: the same power, not set or logged again
    assert log_text(trainer).count("Class-balanced mime weights") == log_lines
    trainer.current_epoch = 20  # past the window (a longer run resumed with fewer epochs): the paper's weights
    trainer.on_train_epoch_start()
    assert trainer.mime_losses[0].a.tolist() == pytest.approx([1.9] * 4)
    assert "Class-balanced mime weights (annealed: the balancing factors to the power 0), per" in log_text(trainer)

    # --c after epoch 15: the stored counts and nnU-Net's restored epoch give the next epoch's weights at once
    first = build_trainer(annealed, planned)
    first.initialize()
    first.num_epochs, first.current_epoch = 20, 15
    first.class_counts = trainer.class_counts
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    first.save_checkpoint(checkpoint)
    resumed = own_log(build_trainer(annealed, planned), tmp_path)
    resumed.num_epochs = 20
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 16  # nnU-Net stores the next epoch to run
    assert resumed.mime_losses[0].a.tolist() == pytest.approx([1.9 * kc ** 0.4 for kc in k])
    # --c inside b's ramp (after epoch 1: the next is 2, b's factors to the power 2 / 5)
    first.current_epoch = 1
    first.save_checkpoint(checkpoint)
    resumed = own_log(build_trainer(annealed, planned), tmp_path)
    resumed.num_epochs = 20
    resumed.load_checkpoint(checkpoint)
    assert resumed.current_epoch == 2
    assert resumed.mime_losses[0].a.tolist() == pytest.approx([1.9 * kc for kc in k])
    assert resumed.mime_losses[0].b.tolist() == pytest.approx([0.1 * kc ** 0.4 for kc in k])
    # a subclass written before b_ramp passes one power for both
    a_half, b_half = resumed._balanced_weights(trainer.class_counts[0], 0.5)
    assert a_half.tolist() == pytest.approx([1.9 * kc ** 0.5 for kc in k])
    assert b_half.tolist() == pytest.approx([0.1 * kc ** 0.5 for kc in k])


def test_balanced_mime_weights_stay_balanced_and_a_bad_anneal_window_stops_at_start_up(planned, monkeypatch):
    balanced = trainer_with_settings(nnUNetTrainerMime, class_weights="balanced")
    assert balanced.__name__ == "nnUNetTrainerMime_cwbalanced"
    trainer = build_trainer(balanced, planned)
    trainer.num_epochs, trainer.current_epoch = 20, 19
    trainer.loss = trainer._build_loss()
    trainer.class_counts = [torch.tensor([2.0, 1.0, 0.25, 0.5], dtype=torch.float64)] * 4
    monkeypatch.setattr(nnUNetTrainer, "on_train_epoch_start", lambda self: None)
    trainer._use_class_counts()
    trainer.on_train_epoch_start()
    assert trainer.mime_losses[0].a.tolist() == pytest.approx(BALANCED_A[0])

    class Backwards(nnUNetTrainerMime):
        anneal_window = (0.8, 0.5)

    with pytest.raises(ValueError, match=r"Backwards.anneal_window: expected fractions of the epochs 0 <= start < "
                                         r"end, got \(0.8, 0.5\)"):
        build_trainer(Backwards, planned)._build_loss()

    class LateRamp(nnUNetTrainerMime):
        b_ramp = 1.5

    with pytest.raises(ValueError, match=r"LateRamp.b_ramp: expected a fraction of the epochs 0 <= b_ramp < 1, "
                                         r"got 1.5"):
        build_trainer(LateRamp, planned)._build_loss()


def test_fixed_mime_weights_estimate_nothing_and_store_nothing(planned, tmp_path, monkeypatch):
    fixed = trainer_with_settings(nnUNetTrainerNegativeMime, class_weights="fixed")
    assert fixed.__name__ == "nnUNetTrainerNegativeMime_cwfixed"
    trainer = own_log(build_trainer(fixed, planned), tmp_path)
    trainer.initialize()
    assert all(type(loss) is NegativeMimeLoss for loss in our_losses(trainer.loss))
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    trainer.dataloader_train = None  # must not be touched
    trainer.on_train_start()
    assert trainer.class_counts is None and "Estimating" not in log_text(trainer)
    checkpoint = str(tmp_path / "checkpoint_fixed.pth")
    trainer.save_checkpoint(checkpoint)
    assert "mime_class_counts" not in torch.load(checkpoint, weights_only=False)


def test_unknown_class_weights_stop_at_start_up(planned):
    class Odd(nnUNetTrainerMime):
        class_weights = "inverse"

    with pytest.raises(ValueError, match=r"Odd.class_weights: expected one of \('balanced', 'annealed', 'fixed'\), "
                                         r"got 'inverse'"):
        build_trainer(Odd, planned)._build_loss()


def test_add_to_checkpoint_writes_nothing_when_checkpointing_is_disabled(planned, tmp_path):
    trainer = build_trainer(nnUNetTrainerDiceIEps, planned)
    trainer.disable_checkpointing = True
    target = tmp_path / "none.pth"
    add_to_checkpoint(trainer, str(target), nnUNetTrainerDiceIEps._class_counts_key, [[1.0]])
    assert not target.exists() and not (tmp_path / "none.pth.partial").exists()


def test_trainers_keep_nnunet_init_signature():
    # nnU-Net stores the __init__ arguments for checkpoints and rebuilds trainers with them
    import inspect

    expected = list(inspect.signature(nnUNetTrainer.__init__).parameters)
    for trainer_class, *_ in TRAINERS.values():
        assert list(inspect.signature(trainer_class.__init__).parameters) == expected
