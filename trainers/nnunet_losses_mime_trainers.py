"""Mime and negative mime trainers (Kervadec & de Bruijne, "On the dice loss gradient and the ways to
mimic it"): nnU-Net with a linear loss whose gradient mimics the Dice loss's, in place of DC+CE.

By default the weights start balanced between classes from the dataset's class distribution (§2.3:
"pre-computed based on ... the dataset classes-distribution"): class c gets ``k_c·a, k_c·b`` with
``k_c`` inversely proportional to its mean voxel count in the trainer's own training patches
(:func:`~nnunet_losses.training.class_counts.balanced_class_scales`), as the Dice gradient scales
with 1/size; over the second half of training the factors are annealed to 1 (``k_c`` to a power
falling linearly from 1 to 0; the last epoch trains at power ``2/epochs``, near the paper's weights),
and the mime's ``b`` factors are ramped in over the first quarter (power rising from 0 to 1: the paper's
``b`` for every class at the first epoch; the negative mime's ``b`` is 0): ``class_weights = "annealed"``,
``b_ramp = 0.25``.
Why both, measured with nnU-Net's SGD (benchmarks/README.md, training quality):

- the paper's weights throughout (``"fixed"``, ``-tr nnUNetTrainerMime_cwfixed_sgd``: its experiments): a
  linear loss under nnU-Net's SGD settles on the background; a structure of 1-2 % of the image gets
  about 1/30 of CE's push and is never predicted (with Adam, ``_cwfixed``, the mime lost the lesion in 2
  of 2 runs at 20 x 25 too);
- balanced throughout (``"balanced"``, ``-tr nnUNetTrainerMime_cwbalanced_sgd``): the small structures are
  learned, but over-segmented, because the voxel's choice is then ``p_c (a_c + b_d) > p_d (b_c + a_d)``,
  not ``p_c > p_d``: a small class wins from a few per cent probability (lesion at 1.2x its volume).
  ``a = b`` would keep the choice unbiased, but a class of share f then starts with a net push down
  wherever ``b/a > f/(1-f)`` and is never predicted (``a = b = 1``: lesion and vessel at 0.00x);
- balanced, then annealed: the small structures are found while the weights are balanced, and the
  choice comes back to the unbiased one of the paper's weights (lesion at 1.0-1.1x its volume). Annealing from the
  start instead (over the first half) lost the lesion in 1 of 2 runs.

A linear loss with fixed weights cannot have both; Dice can, because its push ``2I/U²`` grows with
the overlap.

Trained with Adam (nnU-Net's ``nnUNetTrainerVanillaAdam1en3``, lr 1e-3), one of the paper's two
optimizers: under nnU-Net's SGD (``-tr nnUNetTrainerMime_sgd``) a small structure whose probability
collapses in the first iterations takes the loss's gradient with it (it is proportional to that
probability) and is never predicted (the 3D lesion in 1 of 2 runs of each mime); with Adam both mimes
found it in every run at 20 x 25, 12 of 12 (benchmarks/README.md, *Why the mimes find the small lesion
in some runs only*).

Why ``b`` is ramped in (``-tr nnUNetTrainerMime_bramp0`` balances it from the first epoch): at the
near-uniform softmax of a fresh network the small classes' large balanced ``b`` lift ``Σ_k w_k s_k``
above the organ's own ``b``, so at background voxels the mime raised the organ's logit; with Adam and
``b`` balanced from the start, the organ's validation pseudo-Dice sat at 0.08-0.45 in the first epochs
in 5 of 12 runs, and in 1 of 6 runs on the quickstart's dataset the organ ended over most of the image
(Dice 0.228). With ``b`` ramped in no run lost the organ (benchmarks/README.md, *A mime without the
start-up push*).

nnU-Net imports this module under its bare name from the folder in ``nnUNet_extTrainer``: only
absolute imports work here.
"""

import json

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_losses import MimeLoss, NegativeMimeLoss
from nnunet_losses.training.class_counts import ClassCountsFromSampler, balanced_class_scales
from nnunet_losses.training.names import OwnOptimizer
from nnunet_losses.training.loss_assembly import (
    assemble_loss,
    loss_target_options,
    num_output_scales,
    refuse_regions,
)

CLASS_WEIGHTS = ("balanced", "annealed", "fixed")


class ClassBalancedMimeTrainer(ClassCountsFromSampler, OwnOptimizer, nnUNetTrainer):
    """What the mime trainers share: one mime per output scale, its ``a``/``b`` multiplied per class by
    the balanced factors of that scale's class counts, to a power annealed from 1 to 0 over the second
    half of training (``class_weights = "annealed"``); Adam at lr 1e-3 (``optimizer_name``)."""

    optimizer_name = "adam"

    # "annealed": balanced until anneal_window[0] of the epochs, then the factors k_c to a power falling
    # linearly to 0 (the fixed weights) at anneal_window[1]; "balanced" throughout; "fixed": the same a, b
    # for every class, as in the paper's experiments
    class_weights = "annealed"
    anneal_window = (0.5, 1.0)
    _applied_strength = None  # the powers (of a's factors, of b's) the mime weights were last set with
    include_background = True
    reduction = "mean"  # per-voxel mean keeps nnU-Net's learning rate and gradient clipping sensible
    _class_counts_key = "mime_class_counts"
    _class_counts_name = "class counts for the mime weights"

    def _mime_loss(self, balanced: bool) -> torch.nn.Module:
        raise NotImplementedError

    def _weights(self) -> tuple:
        """``(a, b)`` before balancing: numbers or one value per output channel."""
        raise NotImplementedError

    def _build_loss(self):
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"{type(self).__name__}.class_weights: expected one of {CLASS_WEIGHTS}, "
                             f"got {self.class_weights!r}")
        start, end = self.anneal_window
        if self.class_weights == "annealed" and not 0 <= start < end:
            raise ValueError(f"{type(self).__name__}.anneal_window: expected fractions of the epochs 0 <= start < end, "
                             f"got {self.anneal_window}")
        balanced = self._needs_class_counts()
        self.mime_losses = [self._mime_loss(balanced) for _ in range(num_output_scales(self))]
        if balanced and self.class_counts is not None:
            self._use_class_counts()
        return assemble_loss(self, self.mime_losses)

    def _needs_class_counts(self) -> bool:
        return self.class_weights in ("balanced", "annealed")

    def _balance_strength(self) -> float:
        """The exponent of the balancing factors in this epoch: 1 (balanced); when annealed, falling linearly
        from 1 to 0 (the paper's fixed weights) over ``anneal_window`` (fractions of the epochs). The last
        epoch, ``num_epochs - 1``, trains at ``2 / num_epochs`` with the default window (0.002 at nnU-Net's
        1000 epochs, 0.1 at 20)."""
        if self.class_weights != "annealed":
            return 1.0
        start, end = (fraction * self.num_epochs for fraction in self.anneal_window)
        return min(1.0, max(0.0, (end - self.current_epoch) / (end - start)))

    def _balance_strengths(self) -> tuple:
        """The exponents of ``a``'s and ``b``'s balancing factors in this epoch (here both
        :meth:`_balance_strength`)."""
        strength = self._balance_strength()
        return strength, strength

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # first: the weights' log line belongs to this epoch's block
        if self.class_weights == "annealed" and self.class_counts is not None \
                and self._balance_strengths() != self._applied_strength:
            self._use_class_counts()

    def _use_class_counts(self):
        strengths = self._applied_strength = self._balance_strengths()
        weights = [self._balanced_weights(counts, strengths) for counts in self.class_counts]
        for loss, (a, b) in zip(self.mime_losses, weights):
            loss.a, loss.b = a, b
        a_power, b_power = strengths
        powers = f"to the power {a_power:g}" if a_power == b_power else \
            f"of a to the power {a_power:g}, of b to the power {b_power:g}"
        annealed = f" (annealed: the balancing factors {powers})" if self.class_weights == "annealed" else ""
        self.print_to_log_file(f"Class-balanced mime weights{annealed}, per deep-supervision scale (rows) and class "
                               "(columns): "
                               f"a = {json.dumps([a.tolist() for a, _ in weights])}, "
                               f"b = {json.dumps([b.tolist() for _, b in weights])}")

    def _balanced_weights(self, counts: torch.Tensor, strengths: tuple = (1.0, 1.0)) -> tuple:
        """``(a, b)`` times the balancing factors of ``counts`` to the powers ``strengths`` (one number: the
        same power for both, as before ``b_ramp``)."""
        if not isinstance(strengths, (tuple, list)):
            strengths = (strengths, strengths)
        factors = balanced_class_scales(counts)
        balanced = []
        for name, value, strength in zip("ab", self._weights(), strengths):
            value = torch.as_tensor(value, dtype=torch.float64)
            if value.ndim == 1 and value.numel() != factors.numel():
                raise ValueError(f"{type(self).__name__}.{name}: expected a number or one value per output "
                                 f"channel ({factors.numel()}), got {value.tolist()}")
            balanced.append(value * factors ** strength)
        return tuple(balanced)


class nnUNetTrainerMime(ClassBalancedMimeTrainer):
    """Mime loss ``Σ w·s / N``, ``w = -a·y + b·(1-y)`` (paper eq. 9; ``a=1.9, b=0.1`` is its
    ``ω = -2y + 0.1``), class-balanced then annealed to these weights by default, ``b``'s balancing
    ramped in over the first ``b_ramp`` of the epochs. ``a``/``b`` may be per-class sequences. Labels
    (softmax) and regions (sigmoid)."""

    a = 1.9
    b = 0.1
    # when annealed, b's balancing factors rise from power 0 (the paper's b for every class) over the first
    # b_ramp of the epochs (0: balanced from the start); why: the module docstring
    b_ramp = 0.25

    def _weights(self) -> tuple:
        return self.a, self.b

    def _build_loss(self):
        if not 0 <= self.b_ramp < 1:
            raise ValueError(f"{type(self).__name__}.b_ramp: expected a fraction of the epochs 0 <= b_ramp < 1, "
                             f"got {self.b_ramp}")
        return super()._build_loss()

    def _balance_strengths(self) -> tuple:
        a_power, b_power = super()._balance_strengths()
        if self.class_weights == "annealed" and self.b_ramp > 0:
            b_power = min(b_power, self.current_epoch / (self.b_ramp * self.num_epochs))
        return a_power, b_power

    def _mime_loss(self, balanced: bool) -> MimeLoss:
        return MimeLoss(a=self.a, b=self.b, include_background=self.include_background, reduction=self.reduction,
                        **loss_target_options(self))


class nnUNetTrainerNegativeMime(ClassBalancedMimeTrainer):
    """Negative mime ``-Σ y·s / N`` (paper eq. 10), by default class-balanced (``-Σ k_c y_c s_c / N``, the
    mime with ``a = k_c, b = 0``) then annealed to eq. 10 itself. Labels (softmax) only."""

    def _weights(self) -> tuple:
        return 1.0, 0.0

    def _build_loss(self):
        refuse_regions(self, "with independent sigmoid regions the negative mime is minimised by predicting "
                             "everything as foreground; use nnUNetTrainerMime")
        return super()._build_loss()

    def _mime_loss(self, balanced: bool):
        options = dict(include_background=self.include_background, reduction=self.reduction,
                       **loss_target_options(self))
        # the balanced form needs per-class weights, which only MimeLoss takes (a = 1, b = 0 is the same loss)
        return MimeLoss(a=1.0, b=0.0, **options) if balanced else NegativeMimeLoss(**options)
