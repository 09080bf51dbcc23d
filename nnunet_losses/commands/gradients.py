r"""``nnunet-losses gradients``: the gradient of a loss with respect to the probabilities (Kervadec Fig. 1, §2.2).

For a ground-truth label map and predicted probabilities :math:`s` (an nnU-Net prediction saved with
``--save_probabilities``, or a synthetic case), compute :math:`g = \partial L / \partial s` for
losses of :mod:`nnunet_losses` and for nnU-Net's cross-entropy and Dice, plot the maps side by side
and report, per class,

* the **dynamic range** in dB: :math:`10 \log_{10}(\max |g| / \min |g|)` over the voxels where
  :math:`g \neq 0` (zeros, e.g. the Dice background where :math:`I = 0`, are left out; no non-zero
  voxel: undefined). The paper's Dice has two values, so its range is
  :math:`10 \log_{10}((U - I) / I)` (eq. 6); a mime's is :math:`10 \log_{10}(a / b)`.
* the **sign pattern**: the share of the class's foreground voxels pushed up (:math:`g < 0`, gradient
  descent raises :math:`s`) and of its background voxels pushed down (:math:`g > 0`).

How :math:`\partial L / \partial s` is obtained
-----------------------------------------------
The paper differentiates each loss with every :math:`s_{c,i}` an independent variable (eq. 5). Our
losses and nnU-Net's take logits, so :math:`s` is fed through the inverse of the nonlinearity:

* **sigmoid** (regions): ``x = logit(s)``; :math:`\mathrm{sigmoid}(\mathrm{logit}\, s) = s` channel by
  channel, so autograd gives exactly :math:`\partial L / \partial s`.
* **softmax**: ``x = log(s)`` reproduces :math:`s` (:math:`\mathrm{softmax}(\log s) = s/\sum_k s_k = s`),
  but the normalisation couples the channels: autograd then returns
  :math:`\partial L/\partial s_c - \sum_k s_k\, \partial L/\partial s_k`, the part of the gradient the
  softmax passes on, not the paper's partial derivative (no input of a logits API can move one
  :math:`s_c` alone). So for every loss that has one, the built-in forms (:data:`GRADIENT_LOSSES`)
  evaluate the *same formula* with independent probabilities: our losses in their region mode on
  ``logit(s)`` over the channels the softmax loss counts (their formulas in :math:`s` are the same),
  nnU-Net's Dice on :math:`s` itself (``apply_nonlin=None``) and nnU-Net's CE as
  ``nll_loss(log s)`` (PyTorch's cross-entropy is ``nll_loss(log_softmax(x))``). Tests check that each
  form's value equals the original loss on the same :math:`s`. Softmax-only losses without such a
  form (marginal Dice, the label-marginal penalties) and any loss you pass yourself use ``x = log(s)``
  and are marked ``softmax-projected``.

Probabilities are clamped to :math:`[10^{-12}, 1 - 10^{-12}]` (float64) so that ``log``/``logit``
stay finite on hard predictions.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

import nnunet_losses as losses

from ..nnunet_io import (
    UserInputError,
    channel_targets,
    load_dataset_json,
    read_prediction_properties,
    read_probabilities,
    read_segmentation,
)
from .output import Table, files_moved_into_place, pyplot, save_figure, write_json, write_markdown
from ._subcommand import add_subcommand, print_done, progress as progress_bar, user_input

COMMAND = "gradients"
PROBABILITY_FLOOR = 1e-12  # keeps log(s) and logit(s) finite on hard predictions
EXACT = "exact"  # g = ∂L/∂s with independent probabilities (the paper's eq. 5)
PROJECTED = "softmax-projected"  # g = ∂L/∂s_c - Σ_k s_k ∂L/∂s_k (through x = log s)
DEFAULT_LOSSES = ("ce", "dice", "mime")


# ----------------------------------------------------------------------------------------------
# the case: ground truth + probabilities
# ----------------------------------------------------------------------------------------------
@dataclass
class GradientCase:
    """One case: probabilities ``(C, *spatial)``, targets ``(C, *spatial)`` (one-hot or regions),
    an optional ``(*spatial)`` bool mask of counted voxels (False = nnU-Net's ignore label)."""

    case_id: str
    probabilities: np.ndarray
    target: np.ndarray
    label_map: np.ndarray  # (*spatial) ints for display (ignore label kept)
    activation: str  # "softmax" (labels) or "sigmoid" (regions)
    class_names: list
    mask: Optional[np.ndarray] = None
    spacing: Optional[tuple] = None

    def __post_init__(self):
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation: expected 'softmax' or 'sigmoid', got {self.activation!r}")
        if self.probabilities.ndim not in (3, 4):
            raise UserInputError(
                f"probabilities: expected shape (C, H, W) or (C, D, H, W), got {self.probabilities.shape}")
        if self.target.shape != self.probabilities.shape:
            raise UserInputError(f"ground truth: expected targets of shape {self.probabilities.shape} (the "
                                 f"probabilities'), got {self.target.shape}")
        if len(self.class_names) != self.probabilities.shape[0]:
            raise ValueError(f"class_names: expected {self.probabilities.shape[0]} names (one per channel), "
                             f"got {len(self.class_names)}")


def case_from_arrays(probabilities: np.ndarray, label_map: np.ndarray, dataset_json: Optional[Mapping] = None,
                     case_id: str = "case", spacing: Optional[Sequence[float]] = None) -> GradientCase:
    """Build a :class:`GradientCase` from ``(C, *spatial)`` probabilities and a ``(*spatial)`` label map.

    With ``dataset_json`` (nnU-Net's), its labels decide the channels: regions (sigmoid) turn the
    label map into one target per region, and the ignore label becomes the mask. Without it the
    channels are the labels ``0..C-1`` under softmax.
    """
    probabilities = np.asarray(probabilities)
    targets = channel_targets(label_map, probabilities.shape, dataset_json)
    return GradientCase(case_id, probabilities.astype(np.float64), targets.target, targets.labels,
                        targets.channels.activation, targets.channels.names, targets.mask,
                        tuple(spacing) if spacing is not None else None)


def load_prediction_case(probabilities_file: Union[str, os.PathLike], ground_truth_file: Union[str, os.PathLike],
                         dataset_json: Optional[Union[Mapping, str, os.PathLike]] = None) -> GradientCase:
    """An nnU-Net prediction saved with ``--save_probabilities``: ``CASE.npz`` (``'probabilities'``,
    ``(C, *spatial)`` in the image's array order) with its ``CASE.pkl`` properties next to it, and
    the ground-truth file read by nnU-Net's reader for the dataset's file ending."""
    probabilities = read_probabilities(probabilities_file)
    if dataset_json is not None:
        dataset_json = load_dataset_json(dataset_json)
    label_map, spacing = read_segmentation(ground_truth_file, dataset_json)
    properties = read_prediction_properties(probabilities_file)
    if properties is not None:  # the prediction's own spacing (what the plot's aspect ratio uses)
        spacing = tuple(properties.get("spacing", spacing))
    case_id = Path(probabilities_file).name[: -len(".npz")]
    return case_from_arrays(probabilities, label_map, dataset_json, case_id, spacing)


def synthetic_gradient_case(size: int = 64, seed: int = 0, noise: float = 0.8) -> GradientCase:
    """A 2D case like Kervadec Fig. 1: the synthetic dataset's label map (organ, lesion, vessel) and a
    plausible, noisy softmax prediction of it (blurred one-hot logits plus Gaussian noise)."""
    from scipy.ndimage import gaussian_filter

    from .synthetic import synthetic_case

    rng = np.random.default_rng(seed)
    _, labels = synthetic_case(rng, size=size, lesion_probability=1.0)
    num_classes = int(labels.max()) + 1
    one_hot = np.stack([labels == c for c in range(num_classes)]).astype(np.float64)
    logits = 4.0 * np.stack([gaussian_filter(channel, sigma=1.5) for channel in one_hot])
    logits += rng.normal(0.0, noise, size=logits.shape)
    probabilities = torch.softmax(torch.from_numpy(logits), 0).numpy()
    names = ["background", "organ", "lesion", "vessel"][:num_classes]
    case = case_from_arrays(probabilities, labels, None, f"synthetic_{size}px_seed{seed}", (1.0, 1.0))
    case.class_names = names
    return case


# ----------------------------------------------------------------------------------------------
# losses in probability form
# ----------------------------------------------------------------------------------------------
@dataclass
class Tensors:
    """The case as float64 tensors with a batch axis; ``s`` is the leaf the gradient is taken for."""

    s: torch.Tensor  # (1, C, *spatial)
    target: torch.Tensor  # (1, C, *spatial) one-hot / regions
    labels: Optional[torch.Tensor]  # (1, 1, *spatial) label map (softmax), masked voxels 0
    mask: Optional[torch.Tensor]  # (1, 1, *spatial) 1 = counted
    activation: str


ProbabilityLoss = Callable[[Tensors], torch.Tensor]


@dataclass
class LossForm:
    """A loss as a function of the probabilities, and how its gradient relates to the paper's."""

    name: str
    function: ProbabilityLoss
    convention: str  # EXACT or PROJECTED


def _inverse_nonlinearity(s: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.log(s) if activation == "softmax" else torch.logit(s)


def logits_loss_form(name: str, loss: Callable, activation: str) -> LossForm:
    """Any loss called ``loss(x, y, loss_mask)`` on logits, fed ``log(s)`` (softmax: gradient
    softmax-projected) or ``logit(s)`` (sigmoid: exact)."""

    def function(t: Tensors) -> torch.Tensor:
        target = t.labels if t.labels is not None else t.target
        return loss(_inverse_nonlinearity(t.s, t.activation), target, t.mask)

    return LossForm(name, function, EXACT if activation == "sigmoid" else PROJECTED)


def _counted(t: Tensors, include_background: bool):
    """``logit(s)``, target and per-class slicer for the channels a softmax loss counts, in region form."""
    first = 1 if (t.activation == "softmax" and not include_background) else 0
    return torch.logit(t.s[:, first:]), t.target[:, first:], first


def _per_class(value, first: int, num_channels: int):
    """Drop the background's entry of a per-class option when the background is left out."""
    if first and isinstance(value, (list, tuple, torch.Tensor)) and len(value) == num_channels:
        return value[first:]
    return value


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _ce_form(options: dict) -> LossForm:
    """nnU-Net's cross-entropy (RobustCrossEntropyLoss; BCE for regions)."""
    _reject_unknown_options("ce", options, ())

    def function(t: Tensors) -> torch.Tensor:
        if t.activation == "softmax":  # nnU-Net's RobustCrossEntropyLoss = nll_loss(log_softmax(x)); log_softmax(x) = log s
            return _masked_mean(F.nll_loss(torch.log(t.s), t.labels[:, 0], reduction="none")[:, None], t.mask)
        # regions: nnU-Net's BCEWithLogitsLoss(x) = binary_cross_entropy(sigmoid(x))
        return _masked_mean(F.binary_cross_entropy(t.s, t.target, reduction="none"), t.mask)

    return LossForm("ce", function, EXACT)


def _dice_form(options: dict) -> LossForm:
    """nnU-Net's MemoryEfficientSoftDiceLoss on s (smooth 1e-5, background excluded under softmax)."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    _reject_unknown_options("dice", options, ("smooth", "batch_dice", "do_bg"))

    def function(t: Tensors) -> torch.Tensor:
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=None, batch_dice=options.get("batch_dice", False),
                                           do_bg=options.get("do_bg", t.activation == "sigmoid"),
                                           smooth=options.get("smooth", 1e-5), ddp=False)
        return dice(t.s, t.labels if t.labels is not None else t.target, t.mask)

    return LossForm("dice", function, EXACT)


def _region_form(name: str, pure_function: Callable, allowed: Sequence[str], include_background_default: bool,
                 per_class_options: Sequence[str] = (), fixed: Optional[dict] = None) -> Callable[[dict], LossForm]:
    """One of our losses evaluated in its region (sigmoid) mode on the channels it counts."""

    def build(options: dict) -> LossForm:
        _reject_unknown_options(name, options, allowed)
        include_background = options.get("include_background", include_background_default)
        losses_options = {k: v for k, v in options.items() if k != "include_background"}
        losses_options.update(fixed or {})

        def function(t: Tensors) -> torch.Tensor:
            x, target, first = _counted(t, include_background)
            kwargs = {k: _per_class(v, first, t.s.shape[1]) if k in per_class_options else v
                      for k, v in losses_options.items()}
            return pure_function(x, target, t.mask, activation="sigmoid", **kwargs)

        return LossForm(name, function, EXACT)

    return build


def _softmax_only_form(name: str, pure_function: Callable, allowed: Sequence[str]) -> Callable[[dict], LossForm]:
    """A softmax-only loss fed x = log(s) (logit(s) on region cases)."""

    def build(options: dict) -> LossForm:
        _reject_unknown_options(name, options, allowed)

        def function(t: Tensors) -> torch.Tensor:
            target = t.labels if t.labels is not None else t.target
            return pure_function(_inverse_nonlinearity(t.s, t.activation), target, t.mask,
                                 activation=t.activation, **options)

        # sigmoid: logit(s) is exact; softmax: log(s) is projected (decided per case in compute_gradients)
        return LossForm(name, function, PROJECTED)

    return build


def _negative_mime(x, target, mask, activation, **kwargs):
    return losses.mime_loss(x, target, mask, a=1.0, b=0.0, activation=activation, **kwargs)


def _negative_mime_form(options: dict) -> LossForm:
    """-Σ y·s / N (the mime with a = 1, b = 0) in region form, for label (softmax) cases only."""
    form = _region_form("negative_mime", _negative_mime, ("include_background", "reduction"), True)(options)
    region_form = form.function

    def function(t: Tensors) -> torch.Tensor:
        if t.activation != "softmax":
            raise UserInputError("negative_mime: expected a softmax (label) case, got a region case: with independent "
                                 "regions -y·s has a trivial solution")
        return region_form(t)

    form.function = function
    return form


def _leaf_dice_form(options: dict) -> LossForm:
    """Leaf Dice (annotated = present classes)."""
    if options.get("include_background"):  # softmax leaf Dice drops the background term of samples missing
        # a class, which its region form cannot express: evaluated through log(s) instead
        return _softmax_only_form("leaf_dice", losses.leaf_dice_loss, ("epsilon", "include_background"))(options)
    return _region_form("leaf_dice", losses.leaf_dice_loss, ("epsilon", "include_background"), False,
                        ("epsilon",))(options)


# name -> builder(options) -> LossForm. Options are the keywords of the loss's pure function.
GRADIENT_LOSSES: dict = {
    "ce": _ce_form,
    "dice": _dice_form,
    # Σ w·s / N, w = -a·y + b·(1-y) (Kervadec eq. 9)
    "mime": _region_form("mime", losses.mime_loss, ("a", "b", "include_background", "reduction"), True, ("a", "b")),
    "negative_mime": _negative_mime_form,
    # the mime with the Dice gradient's weights (eq. 6)
    "dynamic_mime": _region_form("dynamic_mime", losses.dynamic_mime_loss, ("phi", "epsilon", "include_background"),
                                 False, ("epsilon",)),
    # Dice with reduction Φ and smoothing ε (Tilborghs eq. 3)
    "phi_dice": _region_form("phi_dice", losses.phi_dice_loss, ("phi", "epsilon", "include_background"), False,
                             ("epsilon",)),
    "leaf_dice": _leaf_dice_form,
    # marginal Dice (annotated = present classes)
    "marginal_dice": _softmax_only_form("marginal_dice", losses.marginal_dice_loss, ("epsilon", "include_background")),
    # CE + λ·R(ŷ, p̂) (Liu et al.)
    "label_marginal": _softmax_only_form("label_marginal", losses.label_marginal_loss, ("penalty", "lam", "tau")),
}


def _reject_unknown_options(name: str, options: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserInputError(f"{name}: expected options among {sorted(allowed)}, got {unknown}")


def parse_loss_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value:key=value"`` (values as Python literals, e.g.
    ``phi_dice:phi='BI':epsilon=1e-5`` or ``mime:a=[0,1.9,1.9]``) -> ``(name, options)``."""
    if not isinstance(spec, str) or not spec:
        raise UserInputError(f"loss: expected 'name' or 'name:key=value:...', got {spec!r}")
    name, *items = spec.split(":")
    if name not in GRADIENT_LOSSES:
        raise UserInputError(f"loss: expected one of {sorted(GRADIENT_LOSSES)}, got {name!r}")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"loss {name!r}: expected options as key=value, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word such as phi=BI
    return name, options


def build_loss_form(spec: Union[str, tuple, LossForm]) -> LossForm:
    """A :class:`LossForm` from a spec string, a ``(name, options)`` pair or a LossForm."""
    if isinstance(spec, LossForm):
        return spec
    name, options = parse_loss_spec(spec) if isinstance(spec, str) else spec
    if name not in GRADIENT_LOSSES:
        raise UserInputError(f"loss: expected one of {sorted(GRADIENT_LOSSES)}, got {name!r}")
    form = GRADIENT_LOSSES[name](dict(options))
    if options and isinstance(spec, str):
        form.name = spec
    return form


# ----------------------------------------------------------------------------------------------
# gradients and their statistics
# ----------------------------------------------------------------------------------------------
def case_tensors(case: GradientCase) -> Tensors:
    s = torch.from_numpy(case.probabilities).to(torch.float64).clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    s = s[None].requires_grad_(True)
    target = torch.from_numpy(case.target).to(torch.float64)[None]
    mask = None if case.mask is None else torch.from_numpy(case.mask).to(torch.float64)[None, None]
    labels = None
    if case.activation == "softmax":
        labels = target.argmax(1, keepdim=True)  # masked voxels have an all-zero target: label 0, mask 0
    return Tensors(s, target, labels, mask, case.activation)


def probability_gradient(form: LossForm, case: GradientCase) -> tuple[np.ndarray, float]:
    """``(∂L/∂s as a (C, *spatial) float64 array, loss value)`` for one loss form on one case."""
    tensors = case_tensors(case)
    value = form.function(tensors)
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        raise TypeError(f"{form.name}: expected the loss to return a scalar tensor, got {value!r}")
    (gradient,) = torch.autograd.grad(value, tensors.s, allow_unused=True)
    if gradient is None:
        gradient = torch.zeros_like(tensors.s)
    return gradient[0].detach().numpy(), float(value.detach())


@dataclass
class ClassGradient:
    """Per-class statistics of one gradient map (None where undefined)."""

    name: str
    dynamic_range_db: Optional[float]
    max_magnitude: float
    min_nonzero_magnitude: Optional[float]
    pushed_up: Optional[float]  # share of foreground voxels with g < 0
    pushed_down: Optional[float]  # share of background voxels with g > 0


def dynamic_range_db(gradient: np.ndarray) -> Optional[float]:
    """``10·log10(max |g| / min |g|)`` over the non-zero entries; None when all are zero."""
    magnitude = np.abs(np.asarray(gradient, dtype=np.float64))
    magnitude = magnitude[magnitude > 0]
    if magnitude.size == 0:
        return None
    return float(10 * np.log10(magnitude.max() / magnitude.min()))


def class_statistics(gradient: np.ndarray, case: GradientCase) -> list:
    """One :class:`ClassGradient` per channel, over the counted voxels."""
    keep = np.ones(gradient.shape[1:], dtype=bool) if case.mask is None else case.mask
    result = []
    for channel, name in enumerate(case.class_names):
        g = gradient[channel][keep]
        foreground = case.target[channel][keep] > 0.5
        magnitude = np.abs(g)
        nonzero = magnitude[magnitude > 0]
        signed = nonzero.size > 0  # a channel the loss leaves out has no sign pattern
        result.append(ClassGradient(
            name=name,
            dynamic_range_db=dynamic_range_db(g),
            max_magnitude=float(magnitude.max()) if magnitude.size else 0.0,
            min_nonzero_magnitude=float(nonzero.min()) if nonzero.size else None,
            pushed_up=float(np.mean(g[foreground] < 0)) if signed and foreground.any() else None,
            pushed_down=float(np.mean(g[~foreground] > 0)) if signed and (~foreground).any() else None,
        ))
    return result


@dataclass
class LossGradient:
    name: str
    convention: str
    value: float
    gradient: np.ndarray = field(repr=False)
    classes: list = field(default_factory=list)


def compute_gradients(case: GradientCase, loss_specs: Sequence = DEFAULT_LOSSES) -> list:
    """:class:`LossGradient` for each loss spec (see :func:`parse_loss_spec`) on ``case``."""
    forms = [build_loss_form(spec) for spec in loss_specs]
    results = []
    for form in progress_bar(forms, f"gradients of {case.case_id}", "loss", len(forms) >= 3):
        with user_input(f"loss {form.name!r}"):  # the loss checks the options the user gave it
            gradient, value = probability_gradient(form, case)
        convention = EXACT if case.activation == "sigmoid" else form.convention
        results.append(LossGradient(form.name, convention, value, gradient, class_statistics(gradient, case)))
    return results


def gradient_rows(results: Sequence[LossGradient], channels: Optional[Sequence[int]] = None) -> Table:
    """One row per (loss, class) with dynamic range and sign pattern (``channels``: those classes only)."""

    def fmt(value, pattern):
        return "–" if value is None else pattern.format(value)

    header = ["loss", "class", "dynamic range [dB]", "foreground pushed up", "background pushed down", "∂L/∂s"]
    rows = [[result.name, stats.name, fmt(stats.dynamic_range_db, "{:.2f}"), fmt(stats.pushed_up, "{:.1%}"),
             fmt(stats.pushed_down, "{:.1%}"), result.convention]
            for result in results for index, stats in enumerate(result.classes)
            if channels is None or index in channels]
    return Table(header, rows)


def gradient_table(results: Sequence[LossGradient], channels: Optional[Sequence[int]] = None) -> str:
    """:func:`gradient_rows` as a Markdown table, the numbers right-aligned."""
    return gradient_rows(results, channels).markdown(align="llrrrl")


def gradients_json(case: GradientCase, results: Sequence[LossGradient]) -> dict:
    return {
        "case": case.case_id,
        "activation": case.activation,
        "dynamic_range": "10*log10(max|dL/ds| / min|dL/ds|) over voxels with dL/ds != 0",
        "losses": [{"name": r.name, "convention": r.convention, "value": r.value,
                    "classes": [vars(c) for c in r.classes]} for r in results],
    }


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------
def default_channel(case: GradientCase) -> int:
    """The first foreground channel (softmax) or the first region."""
    return 1 if case.activation == "softmax" and case.probabilities.shape[0] > 1 else 0


def default_slice(case: GradientCase, channel: int) -> Optional[int]:
    """For 3D cases, the slice along the first axis with the most voxels of ``channel``."""
    if case.probabilities.ndim == 3:
        return None
    counts = case.target[channel].reshape(case.target.shape[1], -1).sum(1)
    return int(counts.argmax()) if counts.any() else case.target.shape[1] // 2


def plot_gradients(case: GradientCase, results: Sequence[LossGradient], path: Union[str, os.PathLike],
                   channel: Optional[int] = None, slice_index: Optional[int] = None, dpi: int = 80) -> Path:
    """Ground truth, prediction of ``channel`` and one ∂L/∂s panel per loss, side by side, to a PNG.

    Each gradient panel has its own symmetric colour scale (blue: g < 0, pushed up; red: g > 0,
    pushed down) and shows the class's dynamic range over the whole case in its title.
    """
    plt = pyplot()
    channel = default_channel(case) if channel is None else channel
    if not 0 <= channel < case.probabilities.shape[0]:
        raise UserInputError(f"channel: expected 0..{case.probabilities.shape[0] - 1}, got {channel}")
    if case.probabilities.ndim == 4:
        slice_index = default_slice(case, channel) if slice_index is None else slice_index
        if not 0 <= slice_index < case.probabilities.shape[1]:
            raise UserInputError(f"slice: expected 0..{case.probabilities.shape[1] - 1}, got {slice_index}")
        pick = (lambda a: a[slice_index])
    else:
        pick = (lambda a: a)
    aspect = 1.0
    if case.spacing is not None and len(case.spacing) >= 2:
        aspect = case.spacing[-2] / case.spacing[-1]
    panels = 2 + len(results)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.9), squeeze=False)
    axes = axes[0]
    name = case.class_names[channel]
    axes[0].imshow(pick(case.label_map), cmap="tab10", vmin=0, vmax=9, interpolation="nearest", aspect=aspect)
    axes[0].set_title("ground truth")
    image = axes[1].imshow(pick(case.probabilities[channel]), cmap="gray", vmin=0, vmax=1, aspect=aspect)
    axes[1].set_title(f"prediction s ({name})")
    fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04)
    for axis, result in zip(axes[2:], results):
        values = pick(result.gradient[channel])
        limit = float(np.abs(values).max()) or 1.0
        image = axis.imshow(values, cmap="coolwarm", vmin=-limit, vmax=limit, aspect=aspect)
        db = result.classes[channel].dynamic_range_db
        db_text = "–" if db is None else f"{db:.1f} dB"
        mark = "" if result.convention == EXACT else "*"
        axis.set_title(f"∂L/∂s {result.name}{mark}\n{db_text}", fontsize=9)
        colorbar = fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
        colorbar.formatter.set_powerlimits((-2, 2))
        colorbar.ax.tick_params(labelsize=7)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    where = "" if slice_index is None else f", slice {slice_index}"
    note = "  (* softmax-projected)" if any(r.convention != EXACT for r in results) else ""
    fig.suptitle(f"{case.case_id}: class {name}{where}{note}", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi)


def file_stem(case_id: str) -> str:
    """``gradients_<case>`` with the characters a file name cannot hold (``/``, ``\\``, ...) replaced by ``-``:
    a case id such as ``<trainer>/fold_0_case_7`` names one file in the folder, not a subfolder."""
    return "gradients_" + re.sub(r"[^\w.+=@-]", "-", case_id)


def run_gradients(case: GradientCase, out_dir: Union[str, os.PathLike], loss_specs: Sequence = DEFAULT_LOSSES,
                  channel: Optional[int] = None, slice_index: Optional[int] = None) -> dict:
    """Compute, plot and write ``gradients_<case>.png`` / ``.json`` / ``.md`` to ``out_dir`` (which the
    command line assembles out of sight: a failure leaves nothing)."""
    out_dir = Path(out_dir)
    results = compute_gradients(case, loss_specs)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(case.case_id)
    png = plot_gradients(case, results, out_dir / f"{stem}.png", channel, slice_index)
    table = gradient_table(results)
    write_markdown(table, out_dir / f"{stem}.md")
    write_json(gradients_json(case, results), out_dir / f"{stem}.json")
    return {"png": png, "table": table, "results": results}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _channel_index(value: Optional[str], case: GradientCase) -> Optional[int]:
    if value is None:
        return None
    if value in case.class_names:
        return case.class_names.index(value)
    try:
        index = int(value)
    except ValueError:
        index = -1
    if not 0 <= index < len(case.class_names):
        raise UserInputError(f"--class: expected a class name {case.class_names} or a channel index 0.."
                             f"{len(case.class_names) - 1}, got {value!r}")
    return index


def _run(args: argparse.Namespace) -> int:
    if args.synthetic:
        if args.probabilities or args.ground_truth:
            raise UserInputError("input: expected --synthetic or --probabilities with --ground-truth, got both")
        with user_input():  # the synthetic case checks its size
            case = synthetic_gradient_case(size=args.size, seed=args.seed)
    else:
        if not (args.probabilities and args.ground_truth):
            raise UserInputError("input: expected --probabilities and --ground-truth (or --synthetic), got "
                                 + ("only --probabilities" if args.probabilities else
                                    "only --ground-truth" if args.ground_truth else "neither"))
        case = load_prediction_case(args.probabilities, args.ground_truth, args.dataset_json)
    loss_specs = [build_loss_form(spec) for spec in args.loss or DEFAULT_LOSSES]  # bad specs fail before writing
    channel = _channel_index(args.class_, case)
    with files_moved_into_place(args.output) as work:
        outcome = run_gradients(case, work, loss_specs, channel, args.slice)
    return print_done(outcome["table"], f"wrote {Path(args.output) / outcome['png'].name}")


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers, COMMAND, _run,
        help="plot dL/ds of losses on a prediction; dynamic range (dB) and sign pattern per class",
        description=textwrap.dedent("""\
            Gradient diagnostics (Kervadec & de Bruijne, Fig. 1 and §2.2): for a ground truth and
            predicted probabilities s, compute dL/ds of each loss, plot ground truth, prediction and
            one gradient map per loss side by side (PNG), and report per class:
              dynamic range [dB] = 10*log10(max|dL/ds| / min|dL/ds|) over the voxels where dL/ds != 0
              sign pattern       = share of the class's foreground voxels pushed up (dL/ds < 0) and of
                                   its background voxels pushed down (dL/ds > 0)
            dL/ds is the paper's partial derivative with every probability independent: losses are
            evaluated in probability form (our losses in region mode on logit(s), nnU-Net's Dice on s,
            its CE as nll_loss(log s)). marginal_dice and label_marginal have no such form under
            softmax and are fed x = log(s): their gradient is softmax-projected
            (dL/ds_c - sum_k s_k dL/ds_k), marked with * in the plot."""),
        epilog=textwrap.dedent("""\
            examples:
              nnunet-losses gradients --synthetic -o diag/
              nnunet-losses gradients --probabilities pred/case_001.npz \\
                  --ground-truth $nnUNet_raw/Dataset001_X/labelsTr/case_001.nii.gz \\
                  --dataset-json $nnUNet_raw/Dataset001_X/dataset.json \\
                  --loss ce --loss dice --loss mime --loss phi_dice:phi=BI:epsilon=1e-5 -o diag/"""),
    )
    source = parser.add_argument_group("input (either an nnU-Net prediction or --synthetic)")
    source.add_argument("--probabilities", metavar="NPZ",
                        help="the CASE.npz nnUNetv2_predict writes with --save_probabilities (its CASE.pkl "
                             "next to it is read for the spacing when present)")
    source.add_argument("--ground-truth", metavar="FILE",
                        help="the case's ground-truth segmentation (the dataset's file ending, e.g. labelsTr/CASE.nii.gz)")
    source.add_argument("--dataset-json", metavar="JSON",
                        help="the dataset's dataset.json: label names, regions (sigmoid) and the ignore label; "
                             "without it channels are labels 0..C-1 under softmax")
    source.add_argument("--synthetic", action="store_true",
                        help="use a synthetic 2D case (disc organ, lesion, bar; noisy softmax prediction)")
    source.add_argument("--size", type=int, default=64, help="--synthetic: image side in pixels (default 64)")
    source.add_argument("--seed", type=int, default=0, help="--synthetic: random seed (default 0)")
    parser.add_argument("--loss", action="append", metavar="SPEC",
                        help="a loss, repeatable: NAME or NAME:key=value:key=value with NAME in "
                             f"{', '.join(sorted(GRADIENT_LOSSES))} and the keywords of the loss "
                             "(e.g. mime:a=1.9:b=0.1, phi_dice:phi=BI:epsilon=1e-5, dice:smooth=0). "
                             f"Default: {' '.join(DEFAULT_LOSSES)}")
    parser.add_argument("--class", dest="class_", metavar="NAME|INDEX",
                        help="class (or region) whose maps are plotted (default: the first foreground one); "
                             "statistics cover every class")
    parser.add_argument("--slice", type=int, help="3D cases: index along the first array axis to plot "
                                                  "(default: the slice with most voxels of the class)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder for gradients_<case>.png, .md (table) and .json")
