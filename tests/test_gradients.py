"""Closed-form gradients of every loss on seeded random 2D and 3D inputs, with and without a loss mask.

The papers state gradients with respect to the probabilities ``s``; the losses take logits. Two exact
ways to observe ``g = dL/ds`` are used:

* Chain rule (any loss, any ``include_background``): autograd gives ``dL/dx``, which must equal
  ``s_k (g_k - Σ_c g_c s_c)`` for softmax and ``g s (1 - s)`` for sigmoid, ``g`` being the closed form.
* ``s`` as a leaf (:func:`probability_gradient`): ``sigmoid(logit(s)) = s`` with derivative exactly 1,
  so autograd through ``x = logit(s)`` returns ``g`` itself. For softmax, ``x = log(s)`` gives
  ``softmax(log s) = s / Σ_c s_c``, whose Jacobian at ``Σ_c s_c = 1`` is ``I - s 1ᵀ``: autograd returns
  ``g_k - Σ_c g_c s_c``, i.e. ``g`` only up to a per-voxel constant. When the background channel is
  excluded the loss does not depend on ``s_0`` (``g_0 = 0``), so ``g`` is that result minus its channel 0.
"""

from __future__ import annotations

import pytest
import torch

from nnunet_losses import (
    dynamic_mime_loss,
    estimate_epsilon,
    label_marginal_loss,
    marginal_penalty,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

SPATIAL = {"2d": (6, 6), "3d": (4, 4, 4)}
PER_CLASS_EPSILON = (0.5, 2.0, 7.0)
# (phi, epsilon): a visible scalar ε for every Φ, per-class ε where allowed (I, BI), the default 1e-7
PHI_EPSILON = [
    ("I", 0.7), ("CI", 0.7), ("BI", 0.7), ("BCI", 0.7),
    ("I", PER_CLASS_EPSILON), ("BI", PER_CLASS_EPSILON), ("I", 1e-7), ("BCI", 1e-7),
]
PHI_EPSILON_IDS = [f"{phi}-eps{eps if isinstance(eps, float) else 'perclass'}" for phi, eps in PHI_EPSILON]


def probability_gradient(loss_of_logits, s: torch.Tensor, activation: str) -> torch.Tensor:
    """``dL/ds`` of a loss of logits, exactly (module docstring). Softmax: only with the background excluded."""
    s = s.detach().requires_grad_()
    logits = torch.logit(s) if activation == "sigmoid" else s.log()
    (grad,) = torch.autograd.grad(loss_of_logits(logits), s)
    return grad if activation == "sigmoid" else grad - grad[:, :1]


def logit_gradient(loss_of_logits, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_logits(x), x)
    return grad


def chain_rule(g: torch.Tensor, s: torch.Tensor, activation: str) -> torch.Tensor:
    """``dL/dx`` from ``g = dL/ds``."""
    if activation == "sigmoid":
        return g * s * (1 - s)
    return s * (g - (g * s).sum(1, keepdim=True))


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.softmax(x, 1) if activation == "softmax" else torch.sigmoid(x)


def counted(mask, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like[:, :1]) if mask is None else mask


# ----------------------------------------------------------------------------------------------
# Dice: Tilborghs eq. 4 (Kervadec eq. 6 with ε)
# ----------------------------------------------------------------------------------------------
SUBSET_DIMS = {"I": (), "CI": (1,), "BI": (0,), "BCI": (0, 1)}  # reduced besides the spatial axes


def dice_gradient(s, y, mask, phi, epsilon, include_background, activation):
    r"""Tilborghs eq. 4 at every voxel:
    ``-(1/|Φ|) (2 y / (U_φ + ε) - (2 I_φ + ε) / (U_φ + ε)²)`` on counted voxels, 0 on masked ones and on
    an excluded background channel."""
    first = 1 if activation == "softmax" and not include_background else 0
    s_kept, y_kept, m = s[:, first:], y[:, first:], counted(mask, s)
    dims = SUBSET_DIMS[phi] + tuple(range(2, s.ndim))
    intersection = (m * y_kept * s_kept).sum(dims, keepdim=True)
    union = (m * (y_kept + s_kept)).sum(dims, keepdim=True)
    eps = torch.as_tensor(epsilon, dtype=s.dtype)
    if eps.ndim:  # one ε per class, each in its own class's subsets only
        eps = eps[first:].view(1, -1, *[1] * (s.ndim - 2))
    num_subsets = intersection.numel()  # the keepdim shape has one entry per subset φ
    denominator = union + eps
    g = -(2 * y_kept / denominator - (2 * intersection + eps) / denominator**2) / num_subsets * m
    return torch.cat([torch.zeros_like(s[:, :first]), g], 1)


def subset_ids(shape, phi) -> torch.Tensor:
    """Which subset φ every (b, c, voxel) belongs to."""
    batch, channels = shape[:2]
    view = (1,) * (len(shape) - 2)
    b = torch.arange(batch).view(-1, 1, *view)
    c = torch.arange(channels).view(1, -1, *view)
    ids = {"I": b * channels + c, "CI": b + 0 * c, "BI": 0 * b + c, "BCI": 0 * (b + c)}[phi]
    return ids.expand(shape)


def assert_two_valued(g, y, mask, phi, first):
    """Within every subset φ, g takes one value on the counted label voxels and one on the others
    (channels from ``first`` on: an excluded background belongs to no subset)."""
    g, y = g[:, first:], y[:, first:]
    ids = subset_ids(g.shape, phi)
    keep = counted(mask, g).expand(g.shape) > 0
    groups = 0
    for subset in ids.unique():
        for label in (0, 1):
            values = g[(ids == subset) & (y == label) & keep]
            if values.numel() > 1:
                groups += 1
                assert float((values - values[0]).abs().max()) <= 1e-12, (phi, int(subset), label)
    assert groups >= 2  # the check did look at both values of at least one subset


def dice_case(make_case, spatial, mask, activation):
    case = make_case(SPATIAL[spatial], mask=mask, seed=1)
    y = case.regions if activation == "sigmoid" else case.one_hot
    return case, y


@pytest.mark.parametrize("include_background", [False, True], ids=["nobg", "bg"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("phi, epsilon", PHI_EPSILON, ids=PHI_EPSILON_IDS)
def test_dice_logit_gradient_is_chain_rule_of_eq4(make_case, phi, epsilon, spatial, mask, include_background):
    case, y = dice_case(make_case, spatial, mask, "softmax")
    s = torch.softmax(case.x, 1)

    def loss(x):
        return phi_dice_loss(x, case.labels, case.mask, phi=phi, epsilon=epsilon, include_background=include_background)

    expected = chain_rule(dice_gradient(s, y, case.mask, phi, epsilon, include_background, "softmax"), s, "softmax")
    torch.testing.assert_close(logit_gradient(loss, case.x), expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("phi, epsilon", PHI_EPSILON, ids=PHI_EPSILON_IDS)
def test_dice_probability_gradient_is_two_valued_eq4(make_case, phi, epsilon, spatial, mask, activation):
    case, y = dice_case(make_case, spatial, mask, activation)
    s = activate(case.x, activation)

    def loss(x):  # softmax: background excluded (the default), so dL/ds is observable exactly
        return phi_dice_loss(x, case.target(activation), case.mask, phi=phi, epsilon=epsilon, activation=activation)

    g = probability_gradient(loss, s, activation)
    torch.testing.assert_close(g, dice_gradient(s, y, case.mask, phi, epsilon, False, activation), rtol=1e-9,
                               atol=1e-13)
    assert_two_valued(g, y, case.mask, phi, first=1 if activation == "softmax" else 0)


def test_dice_gradient_is_kervadec_eq6_without_epsilon(make_case):
    # eq. 6 (ε = 0, Φ = I, one subset per (b, c)): -2(U - I)/U² on the label, 2I/U² elsewhere, over |Φ|
    case = make_case((5, 5), seed=2, channels=2, batch=1)
    s = torch.sigmoid(case.x)
    g = probability_gradient(lambda x: phi_dice_loss(x, case.regions, phi="I", epsilon=0.0, activation="sigmoid"), s,
                             "sigmoid")
    y = case.regions
    intersection = (y * s).sum((2, 3), keepdim=True)
    union = (y + s).sum((2, 3), keepdim=True)
    eq6 = torch.where(y == 1, -2 * (union - intersection) / union**2, 2 * intersection / union**2) / 2
    torch.testing.assert_close(g, eq6, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Mime and negative mime: dL/ds = -a/N on the label, +b/N elsewhere
# ----------------------------------------------------------------------------------------------
PER_CLASS_A, PER_CLASS_B = (0.5, 1.5, 3.0), (0.2, 0.05, 0.4)
# (activation, target form, include_background, a, b)
MIME_CONFIGS = [
    ("softmax", "labels", True, 1.9, 0.1),
    ("softmax", "one_hot", True, PER_CLASS_A, PER_CLASS_B),
    ("softmax", "labels", False, PER_CLASS_A, PER_CLASS_B),
    ("softmax", "one_hot", False, 1.9, 0.1),
    ("sigmoid", "regions", True, 1.9, 0.1),
    ("sigmoid", "regions", True, PER_CLASS_A, PER_CLASS_B),
    ("sigmoid", "regions", False, PER_CLASS_A, PER_CLASS_B),  # regions: channel 0 is a region, never dropped
]
MIME_IDS = [f"{act}-{form}-{'bg' if bg else 'nobg'}-{'perclass' if isinstance(a, tuple) else 'scalar'}"
            for act, form, bg, a, _ in MIME_CONFIGS]


def mime_probability_gradient(y, mask, a, b, include_background, activation, reduction):
    """``-a_c/N`` where y = 1, ``+b_c/N`` where y = 0, 0 on masked voxels and an excluded background."""
    view = (1, -1) + (1,) * (y.ndim - 2)
    a = torch.as_tensor(a, dtype=y.dtype).expand(y.shape[1]).reshape(view)
    b = torch.as_tensor(b, dtype=y.dtype).expand(y.shape[1]).reshape(view)
    g = (-a * y + b * (1 - y)) * counted(mask, y)
    if activation == "softmax" and not include_background:
        g[:, 0] = 0
    if reduction == "mean":  # N = counted voxels × batch
        g = g / (counted(mask, y).expand(y.shape[0], 1, *y.shape[2:]).sum())
    return g


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("activation, form, include_background, a, b", MIME_CONFIGS, ids=MIME_IDS)
def test_mime_gradient_is_minus_a_on_label_plus_b_elsewhere(make_case, activation, form, include_background, a, b,
                                                             spatial, mask, reduction):
    case = make_case(SPATIAL[spatial], mask=mask, seed=3)
    y = case.regions if activation == "sigmoid" else case.one_hot
    target = case.target(activation, form)

    def loss(x):
        return mime_loss(x, target, case.mask, a=a, b=b, include_background=include_background,
                         activation=activation, reduction=reduction)

    s = activate(case.x, activation)
    g = mime_probability_gradient(y, case.mask, a, b, include_background, activation, reduction)
    torch.testing.assert_close(logit_gradient(loss, case.x), chain_rule(g, s, activation), rtol=1e-10, atol=1e-15)
    if activation == "sigmoid" or not include_background:  # dL/ds observable directly
        torch.testing.assert_close(probability_gradient(loss, s, activation), g, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("form", ["labels", "one_hot"])
@pytest.mark.parametrize("include_background", [True, False], ids=["bg", "nobg"])
def test_negative_mime_gradient_is_minus_one_on_label_zero_elsewhere(make_case, include_background, form, spatial,
                                                                     mask, reduction):
    case = make_case(SPATIAL[spatial], mask=mask, seed=4)

    def loss(x):
        return negative_mime_loss(x, case.target("softmax", form), case.mask, include_background=include_background,
                                  reduction=reduction)

    s = torch.softmax(case.x, 1)
    g = mime_probability_gradient(case.one_hot, case.mask, 1.0, 0.0, include_background, "softmax", reduction)
    torch.testing.assert_close(logit_gradient(loss, case.x), chain_rule(g, s, "softmax"), rtol=1e-10, atol=1e-15)
    if not include_background:
        torch.testing.assert_close(probability_gradient(loss, s, "softmax"), g, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Dynamic mime: the Dice loss's gradient, exactly
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("activation, include_background",
                         [("softmax", False), ("softmax", True), ("sigmoid", False)], ids=["nobg", "bg", "sigmoid"])
@pytest.mark.parametrize("phi, epsilon", PHI_EPSILON, ids=PHI_EPSILON_IDS)
def test_dynamic_mime_gradient_equals_dice_gradient(make_case, phi, epsilon, activation, include_background, spatial,
                                                    mask):
    case = make_case(SPATIAL[spatial], mask=mask, seed=5)
    options = dict(phi=phi, epsilon=epsilon, include_background=include_background, activation=activation)
    target = case.target(activation)
    dice = logit_gradient(lambda x: phi_dice_loss(x, target, case.mask, **options), case.x)
    mime = logit_gradient(lambda x: dynamic_mime_loss(x, target, case.mask, **options), case.x)
    torch.testing.assert_close(mime, dice, rtol=0, atol=1e-12)
    assert float(dice.abs().max()) > 1e-4  # a real gradient, not two zero tensors


# ----------------------------------------------------------------------------------------------
# Label-marginal penalties (Liu et al.)
# ----------------------------------------------------------------------------------------------
def penalty_gradient(y_hat, p_hat, penalty, activation, num_images):
    """dR/dp̂: l1 sign(p̂ - ŷ)/(BC); kl -ŷ/(B p̂) (+ (1-ŷ)/(B(1-p̂)) for sigmoid's Bernoulli KL);
    dice_bias 1/(BC(p̂ + ŷ))."""
    num_classes = y_hat.shape[1]
    if penalty == "l1":
        return torch.sign(p_hat - y_hat) / (num_images * num_classes)
    if penalty == "kl":
        h = -y_hat / (num_images * p_hat)
        return h + (1 - y_hat) / (num_images * (1 - p_hat)) if activation == "sigmoid" else h
    return 1 / (num_images * num_classes * (p_hat + y_hat))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("penalty", ["l1", "kl", "dice_bias"])
def test_marginal_penalty_gradient(penalty, activation):
    generator = torch.Generator().manual_seed(6)
    batch, classes = 2, 4
    if activation == "softmax":  # proportions on the simplex
        p_hat = torch.softmax(torch.randn(batch, classes, generator=generator, dtype=torch.float64), 1)
        y_hat = torch.softmax(torch.randn(batch, classes, generator=generator, dtype=torch.float64), 1)
    else:  # independent region proportions in (0, 1)
        p_hat = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 0.9 + 0.05
        y_hat = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    p_hat.requires_grad_()
    (grad,) = torch.autograd.grad(marginal_penalty(y_hat, p_hat, penalty=penalty, activation=activation), p_hat)
    torch.testing.assert_close(grad, penalty_gradient(y_hat, p_hat.detach(), penalty, activation, batch), rtol=1e-12,
                               atol=1e-15)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_kl_knee_bounds_the_derivative_below_the_knee_and_keeps_it_above(activation):
    # dR/dp̂ = -ŷ/(B max(p̂, κŷ)) (sigmoid: + (1-ŷ)/(B max(1-p̂, κ(1-ŷ)))): the KL's where p̂ >= κŷ
    kl_knee, batch = 0.5, 2
    y_hat = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    p_hat = torch.tensor([[0.8, 0.14, 0.06], [0.05, 0.15, 0.8]], dtype=torch.float64, requires_grad=True)
    below = p_hat.detach() < kl_knee * y_hat
    assert below.any() and (~below).any()  # both sides of the knee
    (grad,) = torch.autograd.grad(marginal_penalty(y_hat, p_hat, penalty="kl", activation=activation,
                                                   kl_knee=kl_knee), p_hat)
    p = p_hat.detach()
    expected = -y_hat / (batch * torch.maximum(p, kl_knee * y_hat))
    if activation == "sigmoid":
        expected = expected + (1 - y_hat) / (batch * torch.maximum(1 - p, kl_knee * (1 - y_hat)))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    if activation == "softmax":  # where every p̂ >= κŷ, the paper's KL itself
        above = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.2, 0.5]], dtype=torch.float64)
        assert float(marginal_penalty(y_hat, above, penalty="kl", kl_knee=kl_knee)) == pytest.approx(
            float(marginal_penalty(y_hat, above, penalty="kl")), rel=1e-15)


DEFAULT_LAMBDA = {"l1": 1.0, "kl": 0.1, "dice_bias": 0.01}  # docs/losses.md §4 and the docstring


@pytest.mark.parametrize("tau", [10.0, 1.5])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("penalty", ["l1", "kl", "dice_bias"])
def test_label_marginal_gradient_is_ce_plus_chain_rule_through_tempered_softmax(make_case, penalty, activation,
                                                                                spatial, mask, tau):
    case = make_case(SPATIAL[spatial], mask=mask, seed=7)
    x, m = case.x, counted(case.mask, case.x)
    y = case.regions if activation == "sigmoid" else case.one_hot
    spatial_dims = tuple(range(2, x.ndim))
    # CE: mean over counted voxels (sigmoid: and over regions) of -log s at the label / BCE
    num_counted = m.sum()
    ce_gradient = (activate(x, activation) - y) * m / num_counted
    if activation == "sigmoid":
        ce_gradient = ce_gradient / x.shape[1]
    # penalty: p̂ = Σ m·softmax(τx) / n_b, so dp̂_{b,c}/dx_{b,k,i} = τ s^τ_c (δ_ck - s^τ_k) m_i / n_b
    # (sigmoid: τ σ(τx)(1 - σ(τx)) m_i / n_b on its own channel)
    sharpened = activate(tau * x, activation)
    per_image = m.sum(spatial_dims)  # (B, 1)
    p_hat = (sharpened * m).sum(spatial_dims) / per_image
    y_hat = (y * m).sum(spatial_dims) / per_image
    h = penalty_gradient(y_hat, p_hat, penalty, activation, x.shape[0]).view(*p_hat.shape, *[1] * len(spatial_dims))
    penalty_chain = tau * chain_rule(h, sharpened, activation) * m / per_image.view(-1, 1, *[1] * len(spatial_dims))
    expected = ce_gradient + DEFAULT_LAMBDA[penalty] * penalty_chain

    def loss(logits):
        return label_marginal_loss(logits, case.target(activation), case.mask, penalty=penalty, tau=tau,
                                   activation=activation)

    torch.testing.assert_close(logit_gradient(loss, x), expected, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Behaviour the papers rely on (Tilborghs §2.2-2.3)
# ----------------------------------------------------------------------------------------------
def empty_class_case(make_case, spatial):
    """B = 2, C = 3: sample 0 has every class, class 2 is absent from sample 1 (relabelled background)."""
    case = make_case(SPATIAL[spatial], seed=8)
    labels = case.labels.clone()
    labels[1][labels[1] == 2] = 0
    assert (labels[0] == 2).any() and (labels[1] == 1).any()
    return case.x, labels


def gradient_ratio(x, labels, **options) -> float:
    """max |dL/ds| over (sample 1, class 2) divided by the max over the present (sample, class) maps."""
    s = torch.softmax(x, 1)
    g = probability_gradient(lambda logits: phi_dice_loss(logits, labels, **options), s, "softmax")
    present = [float(g[b, c].abs().max()) for b, c in ((0, 1), (0, 2), (1, 1))]
    return float(g[1, 2].abs().max()) / max(present)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_image_wise_dice_ignores_an_absent_class(make_case, spatial):
    x, labels = empty_class_case(make_case, spatial)
    assert gradient_ratio(x, labels, phi="I", epsilon=1e-7) < 1e-6


@pytest.mark.parametrize("spatial", SPATIAL)
def test_batch_wise_dice_learns_an_empty_map(make_case, spatial):
    x, labels = empty_class_case(make_case, spatial)
    assert gradient_ratio(x, labels, phi="BI", epsilon=1e-7) > 1e-2


@pytest.mark.parametrize("spatial", SPATIAL)
def test_heuristic_epsilon_learns_an_empty_map(make_case, spatial):
    x, labels = empty_class_case(make_case, spatial)
    epsilon = estimate_epsilon([labels], num_classes=3)
    assert float(epsilon[2]) > 1  # class 2 has voxels in sample 0, so its expected volume is not negligible
    assert gradient_ratio(x, labels, phi="I", epsilon=epsilon) > 1e-2


@pytest.mark.parametrize("changed_class", [1, 2])
@pytest.mark.parametrize("phi", ["I", "BI"])
def test_per_class_epsilon_changes_only_its_own_class(make_case, phi, changed_class):
    case = make_case(SPATIAL["2d"], seed=9, mask=True)
    s = torch.softmax(case.x, 1)
    epsilon = [0.5, 2.0, 7.0]
    changed = list(epsilon)
    changed[changed_class] = 300.0

    def gradient(eps):
        return probability_gradient(
            lambda x: phi_dice_loss(x, case.labels, case.mask, phi=phi, epsilon=eps), s, "softmax")

    before, after = gradient(epsilon), gradient(changed)
    other = 3 - changed_class  # the other foreground class
    torch.testing.assert_close(after[:, other], before[:, other], rtol=0, atol=1e-15)
    assert float((after[:, changed_class] - before[:, changed_class]).abs().max()) > 1e-4
    # and the loss moves by exactly the change of that class's Dice terms (eq. 3, |Φ| terms)
    delta_loss = (phi_dice_loss(case.x, case.labels, case.mask, phi=phi, epsilon=changed)
                  - phi_dice_loss(case.x, case.labels, case.mask, phi=phi, epsilon=epsilon))
    dims = SUBSET_DIMS[phi] + (2, 3)
    y, m = case.one_hot[:, changed_class:changed_class + 1], case.mask
    intersection = (m * y * s[:, changed_class:changed_class + 1]).sum(dims)
    union = (m * (y + s[:, changed_class:changed_class + 1])).sum(dims)
    num_subsets = {"I": 2 * 2, "BI": 2}[phi]  # (samples x) 2 foreground classes

    def dice_terms(eps):
        return ((2 * intersection + eps) / (union + eps)).sum()

    expected = -(dice_terms(changed[changed_class]) - dice_terms(epsilon[changed_class])) / num_subsets
    assert float(delta_loss) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)
