"""The compound trainers (trainers/nnunet_losses_compound_trainers.py), Dice + CE as nnU-Net's default
loss, built on a plan nnU-Net generated (no training): the loss is, number for number, the sum of the
pure functions with nnU-Net's deep-supervision weights; with ε = nnU-Net's smooth it is nnU-Net's own
DC_and_CE_loss / DC_and_BCE_loss plus 1; the ignore label, regions, label sets and names by token."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

import nnunet_losses.trainers as trainers
from nnunet_losses import (
    leaf_cross_entropy,
    leaf_dice_loss,
    marginal_cross_entropy,
    marginal_dice_loss,
    phi_dice_loss,
)
from nnunet_losses.commands.synthetic import IGNORE_VALUE
from nnunet_losses.training.compound import DiceAndCrossEntropy, NnUNetBinaryCrossEntropy, NnUNetCrossEntropy
from nnunet_losses.training.loss_assembly import PerScaleDeepSupervision
from nnunet_losses.training.names import TrainerNameError, trainer_from_name
from test_trainers import (  # noqa: F401 (planned, nnunet_env: the fixtures of the trainer tests)
    DATASET_KINDS,
    NNUNET_WEIGHTS,
    TRAINERS,
    build_trainer,
    nnunet_env,
    our_losses,
    planned,
    scale_batches,
    scale_losses_of,
    with_mask,
)

ALL_KINDS = tuple(DATASET_KINDS)


def nnunet_ce(x, y, kind):
    """nnU-Net's CE term on its raw target: CE with the ignore label as ignore_index, or BCE (regions; with
    the ignore channel, the masked sum over voxels and regions divided by the counted voxels)."""
    if kind.startswith("labels"):
        return F.cross_entropy(x, y[:, 0].long(), ignore_index=IGNORE_VALUE if kind.endswith("ignore") else -100)
    if kind == "regions":
        return F.binary_cross_entropy_with_logits(x, y)
    mask = 1 - y[:, -1:]
    return (F.binary_cross_entropy_with_logits(x, y[:, :-1], reduction="none") * mask).sum() / mask.sum()


def activation_of(kind):
    return "sigmoid" if kind.startswith("regions") else "softmax"


def phi_dice_ce(phi):
    def reference(x, y, kind):
        target, mask = with_mask(kind, y)
        dice = phi_dice_loss(x, target, mask, phi=phi, epsilon=1e-7, activation=activation_of(kind))
        return dice + nnunet_ce(x, y, kind)
    return reference


def marginal_dice_ce(x, y, kind):
    target, mask = with_mask(kind, y)
    return marginal_dice_loss(x, target, mask, epsilon=1e-7, include_background=True) + \
        marginal_cross_entropy(x, target, mask)


def leaf_dice_ce(x, y, kind):
    # Fidon et al.'s LeafDiceCE: the marginal CE with softmax; sigmoid regions: the annotated regions' BCE
    target, mask = with_mask(kind, y)
    act = activation_of(kind)
    cross_entropy = leaf_cross_entropy(x, target, mask, activation=act) if act == "sigmoid" else \
        marginal_cross_entropy(x, target, mask)
    return leaf_dice_loss(x, target, mask, epsilon=1e-7, include_background=True, activation=act) + cross_entropy


# trainer, the reference of one output scale (pure functions on the raw target), the dataset kinds it accepts
COMPOUND_TRAINERS = {
    "nnUNetTrainerDiceICE": (trainers.nnUNetTrainerDiceICE, phi_dice_ce("I"), ALL_KINDS),
    "nnUNetTrainerDiceBICE": (trainers.nnUNetTrainerDiceBICE, phi_dice_ce("BI"), ALL_KINDS),
    # before the estimate (start of training) the class attribute epsilon = 1e-7 is in place
    "nnUNetTrainerDiceIEpsCE": (trainers.nnUNetTrainerDiceIEpsCE, phi_dice_ce("I"), ALL_KINDS),
    "nnUNetTrainerMarginalDiceCE": (trainers.nnUNetTrainerMarginalDiceCE, marginal_dice_ce,
                                    ("labels", "labels+ignore")),
    "nnUNetTrainerLeafDiceCE": (trainers.nnUNetTrainerLeafDiceCE, leaf_dice_ce, ALL_KINDS),
}
ACCEPTED = [(name, kind) for name, spec in COMPOUND_TRAINERS.items() for kind in spec[2]]


def weighted_total(reference, kind, outputs, targets, weights=NNUNET_WEIGHTS):
    return sum(w * reference(x, y, kind) for w, x, y in zip(weights, outputs, targets) if w)


def test_every_trainer_is_covered_here_or_in_test_trainers():
    assert set(COMPOUND_TRAINERS) | set(TRAINERS) == set(trainers.TRAINER_NAMES)
    assert not set(COMPOUND_TRAINERS) & set(TRAINERS)


@pytest.mark.parametrize("name,kind", ACCEPTED)
def test_loss_is_the_sum_of_the_pure_functions_with_nnunet_weights(planned, name, kind):
    trainer_class, reference, _ = COMPOUND_TRAINERS[name]
    loss = build_trainer(trainer_class, planned, kind)._build_loss()
    assert loss.weight_factors == pytest.approx(NNUNET_WEIGHTS, abs=1e-12)
    compounds = our_losses(loss)
    assert len(compounds) == (4 if name == "nnUNetTrainerDiceIEpsCE" else 1)
    assert all(type(c) is DiceAndCrossEntropy and (c.weight_dice, c.weight_ce) == (1.0, 1.0) for c in compounds)
    outputs, targets = scale_batches(kind, seed=len(name) + len(kind))
    torch.testing.assert_close(loss(outputs, targets), weighted_total(reference, kind, outputs, targets),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_phi_dice_trainers_use_nnunets_own_cross_entropy(planned, kind):
    compound = our_losses(build_trainer(trainers.nnUNetTrainerDiceICE, planned, kind)._build_loss())[0]
    if kind.startswith("regions"):
        assert type(compound.cross_entropy) is NnUNetBinaryCrossEntropy
    else:
        assert type(compound.cross_entropy) is NnUNetCrossEntropy
        assert compound.cross_entropy.cross_entropy.ignore_index == (IGNORE_VALUE if kind.endswith("ignore") else -100)
    assert compound.dice.phi == "I" and compound.dice.include_background is False
    assert compound.dice.epsilon.item() == pytest.approx(1e-7)


# ----------------------------------------------------------------------------------------------
# nnU-Net's DC_and_CE_loss where the definitions coincide
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_class,batch_dice", [(trainers.nnUNetTrainerDiceICE, False),
                                                       (trainers.nnUNetTrainerDiceBICE, True)])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_with_nnunets_smooth_the_loss_is_nnunets_dice_and_ce_plus_one(planned, trainer_class, batch_dice, kind):
    # nnU-Net's Dice term is -Dice (smooth in numerator and denominator, as our ε), ours 1 - Dice: with
    # ε = 1e-5 every scale differs by exactly 1, and the deep-supervision weights sum to 1
    class Smooth(trainer_class):
        epsilon = 1e-5

    trainer = build_trainer(Smooth, planned, kind)
    dice_options = {"batch_dice": batch_dice, "smooth": 1e-5, "ddp": False}
    if kind.startswith("labels"):
        ignore = IGNORE_VALUE if kind.endswith("ignore") else None
        nnunet = DC_and_CE_loss({**dice_options, "do_bg": False}, {}, weight_ce=1, weight_dice=1, ignore_label=ignore,
                                dice_class=MemoryEfficientSoftDiceLoss)
    else:  # regions: every channel a foreground region, do_bg=True as nnU-Net
        nnunet = DC_and_BCE_loss({}, {**dice_options, "do_bg": True}, use_ignore_label=kind.endswith("ignore"),
                                 dice_class=MemoryEfficientSoftDiceLoss)
    outputs, targets = scale_batches(kind, seed=17)
    expected = 1 + DeepSupervisionWrapper(nnunet, NNUNET_WEIGHTS)(outputs, targets)
    torch.testing.assert_close(trainer._build_loss()(outputs, targets), expected, rtol=1e-5, atol=1e-6)


def test_every_voxel_ignored_gives_no_cross_entropy_as_nnunet(planned):
    trainer = build_trainer(trainers.nnUNetTrainerDiceICE, planned, "labels+ignore")
    trainer.enable_deep_supervision = False
    loss = trainer._build_loss()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ignored = torch.full((2, 1, 8, 8), float(IGNORE_VALUE))
    value = loss(x, ignored)
    value.backward()
    # the Dice term of nothing counted is (0 + ε)/(0 + ε) = 1 (loss 0); nnU-Net skips its CE (torch's would be NaN)
    assert value.item() == pytest.approx(0.0, abs=1e-6) and torch.count_nonzero(x.grad) == 0


def test_weights_are_class_attributes(planned):
    class DiceHeavy(trainers.nnUNetTrainerDiceICE):
        weight_dice = 2.0
        weight_ce = 0.5

    loss = build_trainer(DiceHeavy, planned)._build_loss()
    outputs, targets = scale_batches("labels", seed=21)

    def reference(x, y, kind):
        return 2.0 * phi_dice_loss(x, y, phi="I", epsilon=1e-7) + 0.5 * nnunet_ce(x, y, kind)

    torch.testing.assert_close(loss(outputs, targets), weighted_total(reference, "labels", outputs, targets),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the heuristic ε, label sets, regions
# ----------------------------------------------------------------------------------------------
def test_eps_compound_sets_the_estimated_epsilon_on_each_scales_dice_term(planned):
    # nnUNetTrainerDiceIEps sets ε on each scale's Dice term (epsilon_losses): here inside the compound
    trainer = build_trainer(trainers.nnUNetTrainerDiceIEpsCE, planned, "labels")
    loss = trainer._build_loss()
    assert isinstance(loss, PerScaleDeepSupervision) and len(trainer.epsilon_losses) == 4
    assert [compound.dice for compound in our_losses(loss)] == trainer.epsilon_losses
    per_scale = [torch.tensor([0.0, 2.0, 0.5, 8.0], dtype=torch.float64) * (scale + 1) for scale in range(4)]
    trainer.class_counts = per_scale
    trainer._use_class_counts()  # what on_train_start and --c do with the estimate
    assert [compound.dice.epsilon.tolist() for compound in our_losses(loss)] == [e.tolist() for e in per_scale]
    outputs, targets = scale_batches("labels", seed=23)
    expected = sum(w * (phi_dice_loss(x, y, phi="I", epsilon=e) + nnunet_ce(x, y, "labels"))
                   for w, e, x, y in zip(NNUNET_WEIGHTS, per_scale, outputs, targets) if w)
    torch.testing.assert_close(loss(outputs, targets), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer_class,dice,cross_entropy", [
    (trainers.nnUNetTrainerMarginalDiceCE, marginal_dice_loss, marginal_cross_entropy),
    (trainers.nnUNetTrainerLeafDiceCE, leaf_dice_loss, marginal_cross_entropy),
], ids=["marginal", "leaf"])
def test_missing_label_compounds_pass_the_batch_label_sets_to_both_terms(planned, trainer_class, dice, cross_entropy):
    trainer = build_trainer(trainer_class, planned)
    loss = trainer._build_loss()
    outputs, targets = scale_batches("labels", seed=29)
    targets = [torch.where(t == 3, 0, t) for t in targets]  # class 3 is missing in both samples
    annotated = torch.tensor([[True, True, True, False], [True, True, True, False]])
    trainer.batch_annotated = annotated  # what MissingLabelTrainer sets around each step
    expected = sum(w * (dice(x, y, annotated=annotated, epsilon=1e-7, include_background=True)
                        + cross_entropy(x, y, annotated=annotated))
                   for w, x, y in zip(NNUNET_WEIGHTS, outputs, targets) if w)
    torch.testing.assert_close(loss(outputs, targets), expected, rtol=1e-5, atol=1e-6)
    trainer.batch_annotated = None  # the fallback: annotated iff present, which here is the same table
    torch.testing.assert_close(loss(outputs, targets), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["regions", "regions+ignore"])
def test_marginal_compound_refuses_region_datasets_at_start_up(planned, kind):
    trainer = build_trainer(trainers.nnUNetTrainerMarginalDiceCE, planned, kind)
    with pytest.raises(ValueError, match="nnUNetTrainerMarginalDiceCE: expected a dataset with mutually exclusive "
                                         "labels .*got a region"):
        trainer._build_loss()


def test_leaf_compound_with_regions_drops_the_unannotated_regions_bce(planned):
    trainer = build_trainer(trainers.nnUNetTrainerLeafDiceCE, planned, "regions")
    compound = our_losses(trainer._build_loss())[0]
    assert type(compound.cross_entropy).__name__ == "LeafCrossEntropyLoss"
    assert compound.cross_entropy.activation == "sigmoid" and compound.dice.activation == "sigmoid"


def test_leaf_compound_with_labels_supervises_the_background_of_a_case_missing_a_class(planned):
    # an OrganLesion-like case (class 3 missing): at its background voxels the marginal CE still pushes the
    # annotated classes 1 and 2 down, where dropping the voxels (leaf CE) would leave them unsupervised
    trainer = build_trainer(trainers.nnUNetTrainerLeafDiceCE, planned)
    compound = our_losses(trainer._build_loss())[0]
    assert type(compound.cross_entropy).__name__ == "MarginalCrossEntropyLoss"
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    y = torch.tensor([[[[0, 0], [1, 2]]]])
    compound.cross_entropy(x, y, annotated=torch.tensor([[True, True, True, False]])).backward()
    # s = 1/4 everywhere; a background voxel's set is {0, 3}: dL/dx_1 = (1/4 - 0) / 4 voxels, dL/dx_0 = (1/4 - 1/2) / 4
    assert x.grad[0, :, 0, 0].tolist() == pytest.approx([-1 / 16, 1 / 16, 1 / 16, -1 / 16])


# ----------------------------------------------------------------------------------------------
# compile, names, nnU-Net's __init__
# ----------------------------------------------------------------------------------------------
def test_the_whole_compound_is_compiled_where_nnunet_compiles(planned):
    # nnU-Net compiles its Dice term only; ours compiles each scale's compound, as every trainer of ours
    for trainer_class, *_ in COMPOUND_TRAINERS.values():
        trainer = build_trainer(trainer_class, planned)
        trainer._do_i_compile = lambda: True
        loss = trainer._build_loss()
        assert all(isinstance(module, OptimizedModule) for module in scale_losses_of(loss)), trainer_class.__name__
        assert all(type(module) is DiceAndCrossEntropy for module in our_losses(loss)), trainer_class.__name__


def ours(base: str):
    return getattr(trainers, base) if base in trainers.TRAINER_NAMES else None


@pytest.mark.parametrize("name,attribute,value", [
    ("nnUNetTrainerDiceICE_eps1e-5", "epsilon", 1e-5),
    ("nnUNetTrainerDiceBICE_bg1", "include_background", True),
    ("nnUNetTrainerMarginalDiceCE_eps0.5", "epsilon", 0.5),
    ("nnUNetTrainerLeafDiceCE_srcsqrt", "source_sampling", "sqrt"),
])
def test_names_by_token(planned, name, attribute, value):
    trainer_class = trainer_from_name(name, find=ours)
    assert getattr(trainer_class, attribute) == value
    assert trainer_class.__mro__[1] is getattr(trainers, name.split("_")[0])
    if attribute == "epsilon":
        compound = our_losses(build_trainer(trainer_class, planned)._build_loss())[0]
        assert compound.dice.epsilon.item() == pytest.approx(value)


def test_the_estimated_epsilon_is_no_token_of_the_eps_compound():
    with pytest.raises(TrainerNameError, match="token 'eps1e-5': nnUNetTrainerDiceIEpsCE has no setting 'epsilon'"):
        trainer_from_name("nnUNetTrainerDiceIEpsCE_eps1e-5", find=ours)


def test_trainers_keep_nnunet_init_signature():
    expected = list(inspect.signature(nnUNetTrainer.__init__).parameters)
    for trainer_class, *_ in COMPOUND_TRAINERS.values():
        assert list(inspect.signature(trainer_class.__init__).parameters) == expected


def test_nnunet_cross_entropy_of_label_maps_takes_no_mask():
    # label datasets carry their ignore label in the map; a mask would be silently dropped by nnU-Net's CE
    message = ("loss_mask: expected None (nnU-Net's cross-entropy of label maps takes the ignore label from the "
               "map), got a tensor")
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        NnUNetCrossEntropy(IGNORE_VALUE)(torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
