"""Every loss of the package, declared once for the property tests that run on all of them.

Adding a loss = one :class:`Loss` entry in :data:`LOSSES` (plus its own formula tests): the property
tests read this module --

* ``test_errors.py``: the shared input checks on every module, the options' invalid values
  (:data:`OPTIONS` and :attr:`Loss.invalid`) at construction and in the pure function, sigmoid
  targets, label sets (:attr:`Loss.annotated`), the registry against the public API;
* ``test_fuzz.py``: :attr:`Loss.fuzz` configurations, the documented :attr:`Loss.value_range`;
* ``test_degenerate.py``: :attr:`Loss.degenerate` configurations, their value with every voxel masked;
* ``test_gradcheck.py``: :attr:`Loss.gradcheck` configurations, :attr:`Loss.gradient_of`, module == function;
* ``test_identities.py``: :attr:`Loss.identities` (label map == one-hot, ignore label == loss mask);
* ``test_integration.py``: :attr:`Loss.integration` (deep supervision), :attr:`Loss.state` (buffers);
* ``test_bad_inputs.py``: bad tensor values and sizes on every module, :attr:`Loss.double_backward` on the
  :attr:`Loss.gradcheck` configurations.

A configuration (:class:`Variant`) is a test id and the keyword options it passes to the module and to
the pure function alike; ``activation="sigmoid"`` in them means region targets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch

import nnunet_losses as nl

PHIS = ("I", "CI", "BI", "BCI")
# the target forms of conftest's Case per activation: a label map or its one-hot (softmax), regions (sigmoid)
TARGET_FORMS = {"softmax": ("labels", "one_hot"), "sigmoid": ("regions",)}


# ------------------------------------------------------------------------------------------------
# options: their invalid values and the exact error each raises (docs/losses.md, "Common conventions")
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Invalid:
    """An invalid value of an option and the error it raises, at construction and in the pure function
    alike: the whole ``message`` (``complete=False``: its beginning); ``others``: options given with it."""

    value: object
    error: type
    message: str
    others: Mapping[str, object] = field(default_factory=dict)
    complete: bool = True

    @property
    def pattern(self) -> str:
        """The ``pytest.raises(match=...)`` pattern: the message literally, anchored at its end if complete."""
        return re.escape(self.message) + ("$" if self.complete else "")


def _hint(name: str, allowed: list, value: str, suggestion: Optional[str]) -> Invalid:
    """A string option outside ``allowed``, with the did-you-mean ``suggestion`` (None: no close match)."""
    hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
    return Invalid(value, ValueError, f"{name}: expected one of {allowed}, got {value!r}{hint}")


_CLASS_VALUE_SHAPE = "expected a scalar or one value per class (shape (C,)), got shape"

# option name -> its invalid values; every loss that has the option (Loss.defaults) must refuse them all
OPTIONS: dict[str, tuple[Invalid, ...]] = {
    "a": (
        Invalid(-1.0, ValueError, "a: expected finite values >= 0, got -1.0"),
        Invalid([1.0, -2.0, 1.0], ValueError, "a: expected finite values >= 0, got [1.0, -2.0, 1.0]"),
        Invalid(float("inf"), ValueError, "a: expected finite values >= 0, got inf"),
        Invalid([], ValueError, f"a: {_CLASS_VALUE_SHAPE} (0,)"),
        Invalid("1.9", TypeError, "a: expected a number, a sequence of numbers or a tensor, got str"),
        Invalid(True, TypeError, "a: expected a number, a sequence of numbers or a tensor, got bool"),
    ),
    "b": (
        Invalid(-0.1, ValueError, "b: expected finite values >= 0, got -0.1"),
        Invalid(torch.tensor([0.25, -0.5]), ValueError, "b: expected finite values >= 0, got [0.25, -0.5]"),
        Invalid([0.1, "0.1"], TypeError, "b: expected a number or a sequence of numbers, got [0.1, '0.1']"),
    ),
    "epsilon": (
        Invalid(-1e-7, ValueError, "epsilon: expected finite values >= 0, got -1e-07"),
        Invalid(-1.0, ValueError, "epsilon: expected finite values >= 0, got -1.0"),
        Invalid(float("nan"), ValueError, "epsilon: expected finite values >= 0, got nan"),
        Invalid([1.0, -1.0, 1.0], ValueError, "epsilon: expected finite values >= 0, got [1.0, -1.0, 1.0]"),
        Invalid(torch.ones(3, 1), ValueError, f"epsilon: {_CLASS_VALUE_SHAPE} (3, 1)"),
        Invalid(torch.tensor([1 + 1j]), TypeError, "epsilon: expected a real tensor, got dtype torch.complex64"),
    ),
    "lam": (
        Invalid(-0.5, ValueError, "lam: expected a finite number >= 0, got -0.5"),
        Invalid(-1.0, ValueError, "lam: expected a finite number >= 0, got -1.0"),
        Invalid(float("nan"), ValueError, "lam: expected a finite number >= 0, got nan", {"penalty": "kl"}),
        Invalid("1", TypeError, "lam: expected a number, got str '1'"),
    ),
    "tau": (
        Invalid(0, ValueError, "tau: expected a finite number > 0, got 0.0"),
        Invalid(0.0, ValueError, "tau: expected a finite number > 0, got 0.0"),
        Invalid(-10.0, ValueError, "tau: expected a finite number > 0, got -10.0"),
        Invalid(float("inf"), ValueError, "tau: expected a finite number > 0, got inf"),
        Invalid(None, TypeError, "tau: expected a number, got NoneType None"),
    ),
    "kl_knee": (
        Invalid(0.5, ValueError, "kl_knee: expected 0 with penalty 'l1' (the knee continues the KL's log), got 0.5"),
        Invalid(1.5, ValueError, "kl_knee: expected a fraction of the true proportion in [0, 1], got 1.5",
                {"penalty": "kl"}),
        Invalid(-0.5, ValueError, "kl_knee: expected a finite number >= 0, got -0.5", {"penalty": "kl"}),
        Invalid(None, TypeError, "kl_knee: expected a number, got NoneType None", {"penalty": "kl"}),
    ),
    "include_background": (
        Invalid(1, TypeError, "include_background: expected a bool, got int 1"),
        Invalid("no", TypeError, "include_background: expected a bool, got str 'no'"),
        Invalid(None, TypeError, "include_background: expected a bool, got NoneType None"),
    ),
    "phi": (
        *(_hint("phi", list(PHIS), value, hint) for value, hint in
          (("bi", "BI"), ("BCl", "BCI"), ("ci", "CI"), ("bci", "BCI"), ("dice", None))),
        Invalid(1, TypeError, "phi: expected one of ['I', 'CI', 'BI', 'BCI'], got int 1"),
    ),
    "activation": (
        *(_hint("activation", ["softmax", "sigmoid"], value, hint) for value, hint in
          (("softmx", "softmax"), ("Sigmoid", "sigmoid"), ("sigmod", "sigmoid"), ("softmaxx", "softmax"),
           ("SOFTMAX", "softmax"), ("relu", None))),
        Invalid(None, TypeError, "activation: expected one of ['softmax', 'sigmoid'], got NoneType None"),
    ),
    "reduction": tuple(_hint("reduction", ["mean", "sum"], value, hint) for value, hint in
                       (("mena", "mean"), ("Sum", "sum"), ("none", None), ("avg", None))),
    "penalty": (
        *(_hint("penalty", ["l1", "kl", "dice_bias"], value, hint) for value, hint in
          (("L1", "l1"), ("kld", "kl"), ("dicebias", "dice_bias"), ("KL", "kl"), ("focal", None))),
        Invalid(("l1",), TypeError, "penalty: expected one of ['l1', 'kl', 'dice_bias'], got tuple ('l1',)"),
    ),
    "ddp": (
        Invalid("yes", TypeError, "ddp: expected None or a bool, got str 'yes'", {"phi": "BI"}),
        Invalid(1, TypeError, "ddp: expected None or a bool, got int 1", {"phi": "BI"}),
    ),
    "ignore_label": tuple(
        Invalid(value, TypeError, f"ignore_label: expected None or an int label value, got {received}")
        for value, received in (("3", "str '3'"), (2.0, "float 2.0"), (True, "bool True"), (1.5, "float 1.5"))
    ),
}


# ------------------------------------------------------------------------------------------------
# configurations and ranges
# ------------------------------------------------------------------------------------------------
Options = Union[Mapping[str, object], Callable[[int], dict]]


@dataclass(frozen=True)
class Variant:
    """One configuration of a loss in a property test: its test id, its keyword options (or a function of
    the channel count giving them, where per-class values depend on it) and, for the degenerate inputs,
    its value when every voxel is masked."""

    id: str
    options: Options = field(default_factory=dict)
    everything_masked: float = 0.0

    def resolve(self, channels: Optional[int] = None) -> dict:
        """The keyword options, as a new dict (for ``channels`` channels where they depend on it)."""
        return dict(self.options(channels)) if callable(self.options) else dict(self.options)

    @property
    def activation(self) -> str:
        return self.resolve(3).get("activation", "softmax")  # the activation does not depend on the channels


def mime_range(x, y, mask, activation, options):
    a, b = torch.as_tensor(options["a"]), torch.as_tensor(options["b"])
    a_max, b_max = float(a.max()), float(b.max())
    if activation == "softmax":  # docstring: [-max a, max b] (a convex combination per voxel)
        return -a_max, b_max
    channels = x.shape[1]  # sigmoid: every channel independently in [-a_c, b_c], summed per voxel
    return -channels * a_max, channels * b_max


def dynamic_mime_range(x, y, mask, activation, options):
    # per subset, with D = P + G + ε and n subsets: n D² (b P - (a + b) I) = ε P - 2 I (G + ε), and
    # 0 <= I <= min(P, G), so n·value_φ lies in [-2 P (G+ε) / (P+G+ε)², ε P / (P+ε)²] ⊂ [-1/2, 1/4]
    # (AM-GM twice); the mean over subsets keeps these bounds
    return -0.5, 0.25


def dice_range(x, y, mask, activation, options):
    return 0.0, 1.0


def label_marginal_range(x, y, mask, activation, options):
    if options["penalty"] == "dice_bias":  # CE + λ mean log(p̂ + ŷ), the log between log(1e-8) and log 2
        ce = nl.label_marginal_loss(x, y, mask, lam=0.0, activation=activation)
        lam = options["lam"]
        return float(ce) + lam * math.log(1e-8), float(ce) + lam * math.log(2)
    return 0.0, math.inf  # docstring: [0, ∞) for l1 and kl


# ------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loss:
    """One loss: its module and pure function and what the property tests need to know of it.

    - ``defaults``: every keyword-only option with its default, in the order of the signature
      (docs/losses.md, "Public API"); so also the options whose :data:`OPTIONS` invalid values it refuses;
    - ``value_range``: ``(x, y, mask, activation, options) -> (low, high)``, the documented range
      (``options`` with the defaults filled in);
    - ``activations``: those it allows; ``annotated``: its forward and function take label sets;
    - ``invalid``: further invalid values of its own, option -> tuple of :class:`Invalid`;
    - ``gradient_of``: the loss whose value its gradient is the gradient of, where that is not its own value;
    - ``double_backward``: whether ``create_graph=True`` gives exact second derivatives (test_bad_inputs.py
      runs gradgradcheck on its :attr:`gradcheck` configurations) or is refused with a RuntimeError;
    - ``state``: the tensor options kept as buffers, with example values exact in float32, and
      ``state_options`` the other options the buffer tests build it with;
    - ``fuzz`` ... ``integration``: the configurations each property test runs (module docstring).
    """

    name: str
    module: type
    function: Callable
    defaults: Mapping[str, object]
    value_range: Callable
    activations: tuple = ("softmax", "sigmoid")
    annotated: bool = False
    invalid: Mapping[str, tuple] = field(default_factory=dict)
    gradient_of: Optional[Callable] = None
    double_backward: bool = True
    state: Mapping[str, object] = field(default_factory=dict)
    state_options: Mapping[str, object] = field(default_factory=dict)
    fuzz: tuple = ()
    degenerate: tuple = ()
    gradcheck: tuple = ()
    identities: tuple = ()
    integration: tuple = ()

    @property
    def sigmoid(self) -> bool:
        return "sigmoid" in self.activations

    def invalid_values(self):
        """(option, Invalid) for every invalid value this loss must refuse."""
        for option in self.defaults:
            for invalid in OPTIONS.get(option, ()) + tuple(self.invalid.get(option, ())):
                yield option, invalid

    def __repr__(self) -> str:
        return self.module.__name__


PER_CLASS_A, PER_CLASS_B = (0.5, 1.5, 3.0), (0.2, 0.05, 0.4)
SIGMOID = dict(activation="sigmoid")

MIME = Loss(
    "mime", nl.MimeLoss, nl.mime_loss,
    defaults=dict(a=1.9, b=0.1, include_background=True, activation="softmax", reduction="mean", ignore_label=None),
    value_range=mime_range,
    state={"a": [1.0, 1.9375, 3.5], "b": [0.125, 0.25, 0.0]},
    fuzz=(
        Variant("mime"),
        Variant("mime_per_class_no_background",
                lambda c: {"a": [0.5 + k for k in range(c)], "b": [0.1 * (k + 1) for k in range(c)],
                           "include_background": False}),
    ),
    degenerate=(
        Variant("mime"),
        Variant("mime_no_background", dict(include_background=False)),
        Variant("mime_sum_per_class", dict(a=[0.0, 1.0, 2.0, 3.0], b=[0.5, 0.1, 0.0, 0.2], reduction="sum")),
        Variant("mime_sigmoid", SIGMOID),
    ),
    gradcheck=(
        Variant("mime", dict(a=PER_CLASS_A, b=PER_CLASS_B)),
        Variant("mime-sigmoid", dict(a=PER_CLASS_A, **SIGMOID)),
    ),
    identities=(
        Variant("mime", dict(a=PER_CLASS_A, b=PER_CLASS_B)),
        Variant("mime-nobg", dict(include_background=False)),
    ),
    integration=(
        Variant("mime"),
        Variant("mime_sigmoid", dict(a=[1.0, 2.0, 3.0], **SIGMOID)),
    ),
)

NEGATIVE_MIME = Loss(
    "negative_mime", nl.NegativeMimeLoss, nl.negative_mime_loss,
    defaults=dict(include_background=True, activation="softmax", reduction="mean", ignore_label=None),
    value_range=lambda x, y, mask, activation, options: (-1.0, 0.0),
    activations=("softmax",),
    invalid={"activation": (
        Invalid("sigmoid", ValueError, "activation: expected 'softmax' for NegativeMimeLoss, got 'sigmoid'",
                complete=False),
    )},
    fuzz=(Variant("negative_mime"),),
    degenerate=(Variant("negative_mime"),),
    gradcheck=(Variant("negative_mime", dict(include_background=False)),),
    identities=(Variant("negative_mime"),),
    integration=(Variant("negative_mime"),),
)

_PHI = dict(phi="I", epsilon=1e-7, include_background=False, activation="softmax", ddp=None, ignore_label=None)

DYNAMIC_MIME = Loss(
    "dynamic_mime", nl.DynamicMimeLoss, nl.dynamic_mime_loss,
    defaults=_PHI,
    value_range=dynamic_mime_range,
    # its value is not the potential of its gradient (its weights are taken without gradient): its
    # gradient is that of the Φ-Dice loss with the same options
    gradient_of=nl.phi_dice_loss,
    double_backward=False,  # autograd would differentiate the weights' no-grad recomputation wrongly: refused
    state={"epsilon": [0.0, 2.0, 1.5]}, state_options=dict(phi="I"),
    fuzz=tuple(Variant(f"dynamic_mime_{phi}", {"phi": phi}) for phi in PHIS),
    degenerate=(
        Variant("dynamic_mime_I", dict(phi="I")),
        Variant("dynamic_mime_CI", dict(phi="CI")),
        Variant("dynamic_mime_BI_eps0", dict(phi="BI", epsilon=0.0)),
        Variant("dynamic_mime_BCI_background", dict(phi="BCI", include_background=True)),
        Variant("dynamic_mime_BI_sigmoid", dict(phi="BI", **SIGMOID)),
    ),
    gradcheck=(
        *(Variant(f"dynamic_mime-{phi}", dict(phi=phi, epsilon=0.3)) for phi in PHIS),
        *(Variant(f"dynamic_mime-{phi}-sigmoid", dict(phi=phi, epsilon=0.3, **SIGMOID)) for phi in PHIS),
    ),
    identities=(
        Variant("dynamic_mime-I", dict(phi="I", epsilon=(0.5, 2.0, 7.0))),
        Variant("dynamic_mime-BCI", dict(phi="BCI", include_background=True, epsilon=0.7)),
    ),
    integration=(Variant("dynamic_mime_BI", dict(phi="BI")),),
)

PHI_DICE = Loss(
    "phi_dice", nl.PhiDiceLoss, nl.phi_dice_loss,
    defaults=_PHI,
    value_range=dice_range,
    state={"epsilon": [0.5, 3.0, 7.25]}, state_options=dict(phi="BI"),
    fuzz=(
        *(Variant(f"dice_{phi}", {"phi": phi}) for phi in PHIS),
        Variant("dice_BI_per_class_eps_background",
                lambda c: {"phi": "BI", "epsilon": [float(k * k) for k in range(c)], "include_background": True}),
        Variant("dice_CI_eps0", {"phi": "CI", "epsilon": 0.0}),
    ),
    # with every voxel masked, Dice with ε > 0 is (0 + ε)/(0 + ε) = 1 (loss 0), with ε = 0 0/clamp(0) = 0 (loss 1)
    degenerate=(
        Variant("dice_I", dict(phi="I")),
        Variant("dice_I_eps0_background", dict(phi="I", epsilon=0.0, include_background=True), everything_masked=1.0),
        Variant("dice_CI_eps0", dict(phi="CI", epsilon=0.0), everything_masked=1.0),
        # per-class ε with ε_0 = ε_3 = 0: background is excluded, class 3 gives Dice 0, classes 1, 2 give 1
        Variant("dice_BI_per_class_eps", dict(phi="BI", epsilon=[0.0, 1.0, 20.0, 0.0]),
                everything_masked=1 - (1 + 1 + 0) / 3),
        Variant("dice_BCI", dict(phi="BCI")),
        Variant("dice_I_eps0_sigmoid", dict(phi="I", epsilon=0.0, **SIGMOID), everything_masked=1.0),
        Variant("dice_BCI_sigmoid", dict(phi="BCI", **SIGMOID)),
    ),
    gradcheck=(
        *(Variant(f"phi_dice-{phi}", dict(phi=phi, epsilon=0.3)) for phi in PHIS),
        *(Variant(f"phi_dice-{phi}-sigmoid", dict(phi=phi, epsilon=0.3, **SIGMOID)) for phi in PHIS),
    ),
    identities=(
        Variant("phi_dice-I", dict(phi="I", epsilon=(0.5, 2.0, 7.0))),
        Variant("phi_dice-CI", dict(phi="CI", epsilon=0.7, include_background=True)),
        Variant("phi_dice-BI", dict(phi="BI", epsilon=0.7)),
        Variant("phi_dice-BCI", dict(phi="BCI", epsilon=0.7)),
    ),
    integration=(
        Variant("dice_I", dict(phi="I")),
        Variant("dice_CI", dict(phi="CI")),
        Variant("dice_BI_per_class_eps", dict(phi="BI", epsilon=[1.0, 5.0, 0.5])),
        Variant("dice_BCI_sigmoid", dict(phi="BCI", **SIGMOID)),
    ),
)

MARGINAL_DICE = Loss(
    "marginal_dice", nl.MarginalDiceLoss, nl.marginal_dice_loss,
    defaults=dict(epsilon=1e-7, include_background=True, activation="softmax", ignore_label=None),
    value_range=dice_range,
    activations=("softmax",),
    annotated=True,
    invalid={"activation": (
        Invalid("sigmoid", ValueError, "activation: expected 'softmax' for marginal Dice, got 'sigmoid'",
                complete=False),
    )},
    state={"epsilon": [1.0, 0.25, 4.0]},
    fuzz=(
        Variant("marginal"),
        Variant("marginal_eps0_no_background", {"epsilon": 0.0, "include_background": False}),
    ),
    # everything masked with ε = 0: the merged background term is 0/clamp(0) = 0, loss 1
    degenerate=(Variant("marginal"), Variant("marginal_eps0", dict(epsilon=0.0), everything_masked=1.0)),
    gradcheck=(Variant("marginal_dice", dict(epsilon=0.3)),),
    identities=(Variant("marginal_dice", dict(epsilon=0.7)),),
    integration=(Variant("marginal"),),
)

LEAF_DICE = Loss(
    "leaf_dice", nl.LeafDiceLoss, nl.leaf_dice_loss,
    defaults=dict(epsilon=1e-7, include_background=False, activation="softmax", ignore_label=None),
    value_range=dice_range,
    annotated=True,
    state={"epsilon": 0.75},
    fuzz=(
        Variant("leaf"),
        Variant("leaf_background_eps1", {"epsilon": 1.0, "include_background": True}),
    ),
    # everything masked: nothing is present, no term is kept, loss 0 by definition
    degenerate=(
        Variant("leaf"),
        Variant("leaf_eps0_background", dict(epsilon=0.0, include_background=True)),
        Variant("leaf_sigmoid", SIGMOID),
        Variant("leaf_eps0_sigmoid", dict(epsilon=0.0, **SIGMOID)),
    ),
    gradcheck=(
        Variant("leaf_dice", dict(epsilon=0.3, include_background=True)),
        Variant("leaf_dice-sigmoid", dict(epsilon=0.3, **SIGMOID)),
    ),
    identities=(Variant("leaf_dice", dict(epsilon=0.7, include_background=True)),),
    integration=(Variant("leaf"), Variant("leaf_sigmoid", SIGMOID)),
)

def cross_entropy_range(x, y, mask, activation, options):
    return 0.0, math.inf  # docstrings: [0, ∞) (marginal CE: each term >= log|S| >= 0)


# the label-set cross-entropies: their configurations are the defaults (softmax; leaf CE also sigmoid)
MARGINAL_CE = Loss(
    "marginal_ce", nl.MarginalCrossEntropyLoss, nl.marginal_cross_entropy,
    defaults=dict(activation="softmax", ignore_label=None),
    value_range=cross_entropy_range,
    activations=("softmax",),
    annotated=True,
    invalid={"activation": (
        Invalid("sigmoid", ValueError, "activation: expected 'softmax' for marginal cross-entropy, got 'sigmoid': "
                "marginalisation merges missing classes into the background channel, which sigmoid regions do not "
                "have; use LeafCrossEntropyLoss"),
    )},
)

LEAF_CE = Loss(
    "leaf_ce", nl.LeafCrossEntropyLoss, nl.leaf_cross_entropy,
    defaults=dict(activation="softmax", ignore_label=None),
    value_range=cross_entropy_range,
    annotated=True,
)

LABEL_MARGINAL = Loss(
    "label_marginal", nl.LabelMarginalLoss, nl.label_marginal_loss,
    defaults=dict(penalty="l1", lam=None, tau=10.0, activation="softmax", ignore_label=None, kl_knee=0.0),
    value_range=label_marginal_range,
    fuzz=(
        Variant("ce_l1", {"penalty": "l1"}),
        Variant("ce_kl", {"penalty": "kl", "tau": 3.0}),
        Variant("ce_dice_bias", {"penalty": "dice_bias", "lam": 0.5}),
    ),
    degenerate=(
        Variant("ce_l1", dict(penalty="l1")),
        Variant("ce_kl", dict(penalty="kl")),
        Variant("ce_dice_bias", dict(penalty="dice_bias", lam=1.0)),
        Variant("ce_l1_sigmoid", dict(penalty="l1", **SIGMOID)),
        Variant("ce_kl_sigmoid", dict(penalty="kl", **SIGMOID)),
        Variant("ce_kl_knee", dict(penalty="kl", kl_knee=0.5)),
        Variant("ce_kl_knee_sigmoid", dict(penalty="kl", kl_knee=0.5, **SIGMOID)),
    ),
    gradcheck=tuple(
        Variant(f"label_marginal-{penalty}{suffix}", dict(penalty=penalty, tau=2.0, **extra))
        for penalty in ("l1", "kl", "dice_bias") for suffix, extra in (("", {}), ("-sigmoid", SIGMOID))
    ) + tuple(Variant(f"label_marginal-kl-knee{suffix}", dict(penalty="kl", tau=2.0, kl_knee=0.9, **extra))
              for suffix, extra in (("", {}), ("-sigmoid", SIGMOID))),
    identities=(
        Variant("label_marginal-l1", dict(penalty="l1", tau=2.0)),
        Variant("label_marginal-kl", dict(penalty="kl")),
        Variant("label_marginal-dice_bias", dict(penalty="dice_bias", lam=0.5)),
    ),
    integration=(Variant("ce_l1", dict(penalty="l1")), Variant("ce_kl_sigmoid", dict(penalty="kl", **SIGMOID))),
)

# name -> entry; the modules' class names key the module-level tests (test_errors.py)
LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    MIME, NEGATIVE_MIME, DYNAMIC_MIME, PHI_DICE, MARGINAL_DICE, LEAF_DICE, MARGINAL_CE, LEAF_CE,
    LABEL_MARGINAL)}
MODULES: dict[str, Loss] = {loss.module.__name__: loss for loss in LOSSES.values()}


# the property tests that run configurations of every loss (the Variant tuples of Loss)
PROPERTY_TESTS = ("fuzz", "degenerate", "gradcheck", "identities", "integration")


def variants(test: str) -> list:
    """(loss, variant) for every configuration that property test ``test`` (one of :data:`PROPERTY_TESTS`)
    runs, in registry order. A loss that declares none for it
    runs with its defaults, and with sigmoid where it allows sigmoid (fuzz draws the activation itself,
    identities take label maps only)."""
    rows = []
    for loss in LOSSES.values():
        declared = getattr(loss, test)
        if not declared:
            declared = (Variant(loss.name),)
            if loss.sigmoid and test not in ("fuzz", "identities"):
                declared += (Variant(f"{loss.name}-sigmoid", SIGMOID),)
        rows += [(loss, variant) for variant in declared]
    ids = [variant.id for _, variant in rows]
    assert len(set(ids)) == len(ids), f"{test}: variant ids must be unique, got {sorted(ids)}"
    return rows
