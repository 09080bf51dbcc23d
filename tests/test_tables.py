"""Expected values checkable by hand: tiny inputs whose probabilities are simple (logits 0 give a uniform
softmax / sigmoid 0.5; logits log(p) give softmax p), the value of every loss derived in a comment.

Notation in the comments: per (sample b, class c) over counted voxels, I = Σ y·s, P = Σ s, G = Σ y;
d = (2I + ε)/(P + G + ε) is one Dice term.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_losses import (
    dice_gradient_weights,
    dynamic_mime_loss,
    estimate_epsilon,
    label_marginal_loss,
    leaf_dice_loss,
    marginal_dice_loss,
    mime_loss,
    negative_mime_loss,
    phi_dice_loss,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64


def logits_of(*probabilities) -> torch.Tensor:
    """(1, C, 1, V) logits log(p) for V voxels given as C-tuples of probabilities: softmax(log p) = p."""
    return torch.tensor(probabilities, dtype=F64).log().T.reshape(1, len(probabilities[0]), 1, len(probabilities))


def label_map(*samples) -> torch.Tensor:
    """(B, 1, 1, V) label map, one list of V labels per sample."""
    return torch.tensor(samples).reshape(len(samples), 1, 1, -1)


def mask_of(*samples) -> torch.Tensor:
    return label_map(*samples).to(F64)


# ----------------------------------------------------------------------------------------------
# Case A: B = 2, C = 2, 1x2 images, logits 0 -> s = 0.5 everywhere.
#   sample 0: labels [1, 0]; sample 1: labels [0, 0] (class 1 absent)
#   (b, c): I, P, G = (0,0): .5, 1, 1   (0,1): .5, 1, 1   (1,0): 1, 1, 2   (1,1): 0, 1, 0
# ----------------------------------------------------------------------------------------------
X_A = torch.zeros(2, 2, 1, 2, dtype=F64)
Y_A = label_map([1, 0], [0, 0])
# regions (sigmoid, s = 0.5): (0,0) [1, 1]: I, P, G = 1, 1, 2; (0,1) [1, 0]: .5, 1, 1; sample 1 empty: 0, 1, 0
R_A = torch.tensor([[[[1, 1]], [[1, 0]]], [[[0, 0]], [[0, 0]]]], dtype=F64)
# s = (0.2, 0.8) at every voxel
X_P = torch.cat([logits_of((0.2, 0.8), (0.2, 0.8))] * 2)

MIME_TABLE = [
    # every voxel has one label channel and one other: 0.5·(-1.9) + 0.5·0.1 = -0.9, mean over 4 voxels
    pytest.param(X_A, Y_A, None, {}, -0.9, id="default"),
    pytest.param(X_A, Y_A, None, dict(reduction="sum"), -3.6, id="sum"),  # 4 · -0.9
    # channel 0 weighted 0: the label-1 voxel 0.5·(-1.9), three label-0 voxels 0.5·0.1: (-0.95 + 0.15)/4
    pytest.param(X_A, Y_A, None, dict(include_background=False), -0.2, id="nobg"),
    # a = (1, 3), b = (0.2, 0.4): label-1 voxel 0.5·(0.2 - 3) = -1.4, label-0 voxels 0.5·(-1 + 0.4) = -0.3
    pytest.param(X_A, Y_A, None, dict(a=(1.0, 3.0), b=(0.2, 0.4)), (-1.4 - 3 * 0.3) / 4, id="per-class"),
    # counted: sample 0 voxel 0 (-1.4) and sample 1 (-0.3, -0.3), N = 3
    pytest.param(X_A, Y_A, mask_of([1, 0], [1, 1]), dict(a=(1.0, 3.0), b=(0.2, 0.4)), -2.0 / 3, id="per-class-mask"),
    # s = (0.2, 0.8): label-1 voxel 0.2·0.1 + 0.8·(-1.9) = -1.5, label-0 voxels 0.2·(-1.9) + 0.8·0.1 = -0.3
    pytest.param(X_P, Y_A, None, {}, (-1.5 - 3 * 0.3) / 4, id="log-p"),
    # sigmoid: 3 region voxels with y = 1 (0.5·-1.9 each), 5 with y = 0 (0.5·0.1 each), N = 4 voxels
    pytest.param(X_A, R_A, None, dict(activation="sigmoid"), (3 * -0.95 + 5 * 0.05) / 4, id="sigmoid"),
]


@pytest.mark.parametrize("x, y, mask, options, expected", MIME_TABLE)
def test_mime_values(x, y, mask, options, expected):
    assert float(mime_loss(x, y, mask, **options)) == pytest.approx(expected, rel=1e-12)


NEGATIVE_MIME_TABLE = [
    pytest.param(X_A, Y_A, None, {}, -0.5, id="default"),  # -mean of s at the label = -0.5
    pytest.param(X_A, Y_A, None, dict(reduction="sum"), -2.0, id="sum"),  # 4 voxels · -0.5
    pytest.param(X_A, Y_A, None, dict(include_background=False), -0.125, id="nobg"),  # one label-1 voxel: -0.5/4
    # s = (0.2, 0.8): s at the label is 0.8 (label-1 voxel) and 0.2 (three label-0 voxels)
    pytest.param(X_P, Y_A, None, {}, -(0.8 + 3 * 0.2) / 4, id="log-p"),
    pytest.param(X_P, Y_A, mask_of([1, 0], [1, 1]), {}, -(0.8 + 2 * 0.2) / 3, id="log-p-mask"),
]


@pytest.mark.parametrize("x, y, mask, options, expected", NEGATIVE_MIME_TABLE)
def test_negative_mime_values(x, y, mask, options, expected):
    assert float(negative_mime_loss(x, y, mask, **options)) == pytest.approx(expected, rel=1e-12)


PHI_DICE_TABLE = [
    # background excluded, ε = 0: class-1 terms d(0,1) = 2·.5/(1+1) = 1/2, d(1,1) = 0/(1+0) = 0
    pytest.param(X_A, Y_A, None, dict(phi="I", epsilon=0.0), 1 - (1 / 2 + 0) / 2, id="I"),
    pytest.param(X_A, Y_A, None, dict(phi="CI", epsilon=0.0), 1 - (1 / 2 + 0) / 2, id="CI"),  # one class: as I
    # class 1 over the batch: I = .5, P = 2, G = 1: d = 1/3
    pytest.param(X_A, Y_A, None, dict(phi="BI", epsilon=0.0), 1 - 1 / 3, id="BI"),
    pytest.param(X_A, Y_A, None, dict(phi="BCI", epsilon=0.0), 1 - 1 / 3, id="BCI"),  # one class: as BI
    # background included: d = 1/2, 1/2, 2·1/(1+2) = 2/3, 0
    pytest.param(X_A, Y_A, None, dict(phi="I", epsilon=0.0, include_background=True), 1 - (1 / 2 + 1 / 2 + 2 / 3) / 4,
                 id="I-bg"),
    # per sample over both classes: I = 1, P = 2, G = 2 in each: d = 1/2
    pytest.param(X_A, Y_A, None, dict(phi="CI", epsilon=0.0, include_background=True), 1 / 2, id="CI-bg"),
    # per class over the batch: class 0 I = 1.5, P = 2, G = 3: 3/5; class 1: 1/3
    pytest.param(X_A, Y_A, None, dict(phi="BI", epsilon=0.0, include_background=True), 1 - (3 / 5 + 1 / 3) / 2,
                 id="BI-bg"),
    pytest.param(X_A, Y_A, None, dict(phi="BCI", epsilon=0.0, include_background=True), 1 / 2, id="BCI-bg"),  # 4/8
    # ε = 1: d(0,1) = (1+1)/(2+1) = 2/3, d(1,1) = (0+1)/(1+1) = 1/2 (the empty map now scores)
    pytest.param(X_A, Y_A, None, dict(phi="I", epsilon=1.0), 1 - (2 / 3 + 1 / 2) / 2, id="I-eps1"),
    pytest.param(X_A, Y_A, None, dict(phi="BI", epsilon=1.0), 1 - 2 / 4, id="BI-eps1"),  # (1+1)/(3+1)
    # ε = (1, 0), each class its own: d(0,0) = 2/3, d(0,1) = 1/2, d(1,0) = (2+1)/(3+1) = 3/4, d(1,1) = 0
    pytest.param(X_A, Y_A, None, dict(phi="I", epsilon=(1.0, 0.0), include_background=True),
                 1 - (2 / 3 + 1 / 2 + 3 / 4 + 0) / 4, id="I-eps-per-class"),
    # ε = (0, 1): class 0 3/5, class 1 (1+1)/(3+1) = 1/2
    pytest.param(X_A, Y_A, None, dict(phi="BI", epsilon=(0.0, 1.0), include_background=True), 1 - (3 / 5 + 1 / 2) / 2,
                 id="BI-eps-per-class"),
    # mask drops sample 0 voxel 1: d(0,1): I = .5, P = .5, G = 1 -> 2/3; d(1,1) = 0
    pytest.param(X_A, Y_A, mask_of([1, 0], [1, 1]), dict(phi="I", epsilon=0.0), 1 - (2 / 3) / 2, id="I-mask"),
    # s1 = 0.8: d(0,1): I = .8, P = 1.6, G = 1 -> 1.6/2.6 = 8/13; d(1,1) = 0
    pytest.param(X_P, Y_A, None, dict(phi="I", epsilon=0.0), 1 - (8 / 13) / 2, id="I-log-p"),
    # sigmoid, every channel a region: d = 2·1/(1+2) = 2/3, 2·.5/(1+1) = 1/2, 0, 0
    pytest.param(X_A, R_A, None, dict(phi="I", epsilon=0.0, activation="sigmoid"), 1 - (2 / 3 + 1 / 2) / 4,
                 id="I-sigmoid"),
    # sigmoid per region over the batch: region 0 I = 1, P = 2, G = 2: 1/2; region 1 I = .5, P = 2, G = 1: 1/3
    pytest.param(X_A, R_A, None, dict(phi="BI", epsilon=0.0, activation="sigmoid"), 1 - (1 / 2 + 1 / 3) / 2,
                 id="BI-sigmoid"),
]


@pytest.mark.parametrize("x, y, mask, options, expected", PHI_DICE_TABLE)
def test_phi_dice_values(x, y, mask, options, expected):
    assert float(phi_dice_loss(x, y, mask, **options)) == pytest.approx(expected, rel=1e-12)


# dynamic mime value: Σ_φ (b_φ P_φ - (a_φ + b_φ) I_φ)
#   with b = (2I + ε)/(|Φ| D²), a + b = 2/(|Φ| D), D = P + G + ε (dice_gradient_weights)
DYNAMIC_MIME_TABLE = [
    # |Φ| = 2: φ(0,1) D = 2: 1·1/(2·4) - 2·.5/(2·2) = -1/8; φ(1,1): I = 0, ε = 0 -> 0
    pytest.param(X_A, Y_A, dict(phi="I", epsilon=0.0), -1 / 8, id="I"),
    pytest.param(X_A, Y_A, dict(phi="CI", epsilon=0.0), -1 / 8, id="CI"),  # one class: as I
    # one subset, class 1 over the batch: I = .5, P = 2, G = 1, D = 3: 1·2/9 - 1/3
    pytest.param(X_A, Y_A, dict(phi="BI", epsilon=0.0), 2 / 9 - 1 / 3, id="BI"),
    pytest.param(X_A, Y_A, dict(phi="BCI", epsilon=0.0), 2 / 9 - 1 / 3, id="BCI"),
    # ε = 1: φ(0,1) D = 3: 2·1/(2·9) - 1/(2·3) = -1/18; φ(1,1) D = 2: 1·1/(2·4) - 0 = 1/8
    pytest.param(X_A, Y_A, dict(phi="I", epsilon=1.0), -1 / 18 + 1 / 8, id="I-eps1"),
    # |Φ| = 4: (0,0), (0,1): 1/16 - 1/8 each; (1,0) I = 1, P = 1, G = 2, D = 3: 2/36 - 2/12; (1,1): 0
    pytest.param(X_A, Y_A, dict(phi="I", epsilon=0.0, include_background=True), 2 * (1 / 16 - 1 / 8) + 2 / 36 - 2 / 12,
                 id="I-bg"),
    # sigmoid, |Φ| = 4: (0,0) I = 1, P = 1, G = 2, D = 3: 2/36 - 2/12; (0,1) D = 2: 1/16 - 1/8; sample 1: 0
    pytest.param(X_A, R_A, dict(phi="I", epsilon=0.0, activation="sigmoid"), 2 / 36 - 2 / 12 + 1 / 16 - 1 / 8,
                 id="I-sigmoid"),
]


@pytest.mark.parametrize("x, y, options, expected", DYNAMIC_MIME_TABLE)
def test_dynamic_mime_values(x, y, options, expected):
    assert float(dynamic_mime_loss(x, y, **options)) == pytest.approx(expected, rel=1e-12)


DICE_GRADIENT_WEIGHTS_TABLE = [
    # eq. 6 (ε = 0, one subset): U = P + G = 4, a = 2(U - I)/U² = 6/16, b = 2I/U² = 2/16
    pytest.param(1.0, 2.0, 2.0, 0.0, 1, 6 / 16, 2 / 16, id="eq6"),
    # eq. 4: D = 5, b = (2 + 1)/(2·25), a = 2/(2·5) - b
    pytest.param(1.0, 2.0, 2.0, 1.0, 2, 0.2 - 0.06, 0.06, id="eq4"),
    # an absent class (I = G = 0) with ε = 1e-7: b = ε/(P + ε)², negligible next to a = 2/(P + ε) - b
    pytest.param(0.0, 10.0, 0.0, 1e-7, 1, 2 / (10 + 1e-7) - 1e-7 / (10 + 1e-7) ** 2, 1e-7 / (10 + 1e-7) ** 2,
                 id="absent"),
]


@pytest.mark.parametrize("intersection, prediction, ground_truth, epsilon, num_subsets, a, b",
                         DICE_GRADIENT_WEIGHTS_TABLE)
def test_dice_gradient_weights_values(intersection, prediction, ground_truth, epsilon, num_subsets, a, b):
    sums = (torch.tensor(v, dtype=F64) for v in (intersection, prediction, ground_truth))
    got_a, got_b = dice_gradient_weights(*sums, epsilon=epsilon, num_subsets=num_subsets)
    assert (float(got_a), float(got_b)) == pytest.approx((a, b), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Missing labels. Case M: B = 1, C = 3, 1x2 image, logits 0 -> s = 1/3; labels [0, 1]: class 2 absent.
#   class 1: y = [0, 1], I = 1/3, P = 2/3, G = 1: d = (2/3)/(5/3) = 2/5; background alone the same, 2/5;
#   class 2: I = 0, P = 2/3, G = 0: d = 0 (ε = 0).
#   Merging class 2 into the background: s0' = 2/3, y0 = [1, 0]: I = 2/3, P = 4/3, G = 1: d = (4/3)/(7/3) = 4/7.
# Case M2: B = 2, sample 0 as M (class 2 missing), sample 1 labels [2, 0], fully annotated (class 1 empty):
#   sample 1: background 2/5, class 1 0, class 2 2/5.
# ----------------------------------------------------------------------------------------------
X_M = torch.zeros(1, 3, 1, 2, dtype=F64)
Y_M = label_map([0, 1])
X_M2 = torch.zeros(2, 3, 1, 2, dtype=F64)
Y_M2 = label_map([0, 1], [2, 0])
A_M2 = torch.tensor([[True, True, False], [True, True, True]])
ALL_ANNOTATED = torch.ones(1, 3, dtype=torch.bool)

MARGINAL_TABLE = [
    # fallback: class 2 absent = missing: merged background 4/7 and class 1 2/5
    pytest.param(X_M, Y_M, None, None, {}, 1 - (4 / 7 + 2 / 5) / 2, id="fallback"),
    pytest.param(X_M, Y_M, None, None, dict(include_background=False), 1 - 2 / 5, id="fallback-nobg"),
    # every class annotated: plain Dice over background 2/5, class 1 2/5, class 2 0
    pytest.param(X_M, Y_M, None, ALL_ANNOTATED, {}, 1 - (2 / 5 + 2 / 5 + 0) / 3, id="annotated"),
    pytest.param(X_M, Y_M, None, ALL_ANNOTATED, dict(include_background=False), 1 - (2 / 5 + 0) / 2,
                 id="annotated-nobg"),
    # class 1 missing, labels [0, 2], ε = 1: merged background (4/3 + 1)/(7/3 + 1) = 7/10, class 2 (5/3)/(8/3) = 5/8
    pytest.param(X_M, label_map([0, 2]), None, torch.tensor([[True, False, True]]), dict(epsilon=1.0),
                 1 - (7 / 10 + 5 / 8) / 2, id="class1-missing-eps1"),
    # five terms: sample 0 merged background 4/7, class 1 2/5; sample 1 2/5, 0, 2/5
    pytest.param(X_M2, Y_M2, None, A_M2, {}, 1 - (4 / 7 + 2 / 5 + 2 / 5 + 0 + 2 / 5) / 5, id="batch"),
    # only voxel 0 (label 0) counts: classes 1, 2 both missing, all of s merges into the background, s0' = 1 = y0
    pytest.param(X_M, Y_M, mask_of([1, 0]), None, {}, 0.0, id="mask-everything-merged"),
]


@pytest.mark.parametrize("x, y, mask, annotated, options, expected", MARGINAL_TABLE)
def test_marginal_dice_values(x, y, mask, annotated, options, expected):
    value = marginal_dice_loss(x, y, mask, annotated=annotated, **{"epsilon": 0.0, **options})
    assert float(value) == pytest.approx(expected, rel=1e-12, abs=1e-15)


LEAF_TABLE = [
    # fallback: class 2 missing, its term dropped; the background is excluded by default: class 1 alone
    pytest.param(X_M, Y_M, None, None, {}, 1 - 2 / 5, id="fallback"),
    # the sample misses a class, so its background term is dropped even when included
    pytest.param(X_M, Y_M, None, None, dict(include_background=True), 1 - 2 / 5, id="fallback-bg"),
    pytest.param(X_M, Y_M, None, ALL_ANNOTATED, dict(include_background=True), 1 - (2 / 5 + 2 / 5 + 0) / 3,
                 id="annotated-bg"),
    pytest.param(X_M, Y_M, None, ALL_ANNOTATED, {}, 1 - (2 / 5 + 0) / 2, id="annotated"),
    # ε = 1: class 1 (2/3 + 1)/(5/3 + 1) = 5/8
    pytest.param(X_M, Y_M, None, None, dict(epsilon=1.0), 1 - 5 / 8, id="fallback-eps1"),
    # sample 0: class 1 2/5 (background dropped); sample 1: 0 and 2/5
    pytest.param(X_M2, Y_M2, None, A_M2, {}, 1 - (2 / 5 + 0 + 2 / 5) / 3, id="batch"),
    # ... plus sample 1's background 2/5 (fully annotated)
    pytest.param(X_M2, Y_M2, None, A_M2, dict(include_background=True), 1 - (2 / 5 + 2 / 5 + 0 + 2 / 5) / 4,
                 id="batch-bg"),
    # nothing annotated in an all-background sample: no term left, loss 0
    pytest.param(X_M, label_map([0, 0]), None, None, {}, 0.0, id="no-terms"),
    # sigmoid: region 0 [1, 1] (I = 1, P = 1, G = 2: 2/3), region 1 empty = missing, dropped
    pytest.param(torch.zeros(1, 2, 1, 2, dtype=F64), torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]], dtype=F64), None,
                 None, dict(activation="sigmoid"), 1 - 2 / 3, id="sigmoid"),
]


@pytest.mark.parametrize("x, y, mask, annotated, options, expected", LEAF_TABLE)
def test_leaf_dice_values(x, y, mask, annotated, options, expected):
    value = leaf_dice_loss(x, y, mask, annotated=annotated, **{"epsilon": 0.0, **options})
    assert float(value) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# Label-marginal. Case L: B = 1, C = 2, voxel 0 s = (.25, .75), voxel 1 s = (.5, .5); labels [1, 0].
#   CE = (-log .75 - log .5)/2 = log(8/3)/2; ŷ = (.5, .5).
#   τ = 2: softmax(2 log p) = p²/Σp²: voxel 0 (1/16, 9/16)/(10/16) = (.1, .9), voxel 1 (.5, .5): p̂ = (.3, .7).
#   τ = 1: p̂ = (.375, .625).  τ = 10: voxel 0 (1, 3^10)/(1 + 3^10): p̂_0 = (1/59050 + .5)/2.
# ----------------------------------------------------------------------------------------------
X_L = logits_of((0.25, 0.75), (0.5, 0.5))
Y_L = label_map([1, 0])
CE_L = math.log(8 / 3) / 2
# sigmoid, logits 0 (s = .5 whatever τ): regions 0 [1, 1], 1 [0, 1]: BCE = log 2, ŷ = (1, .5), p̂ = (.5, .5)
X_LS = torch.zeros(1, 2, 1, 2, dtype=F64)
R_L = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]], dtype=F64)

LABEL_MARGINAL_TABLE = [
    # l1: (|.5 - .3| + |.5 - .7|)/2 = .2, λ = 1
    pytest.param(X_L, Y_L, None, dict(penalty="l1", tau=2.0), CE_L + 0.2, id="l1"),
    pytest.param(X_L, Y_L, None, dict(penalty="l1", tau=2.0, lam=0.5), CE_L + 0.5 * 0.2, id="l1-lam"),
    pytest.param(X_L, Y_L, None, dict(penalty="l1", tau=1.0), CE_L + 0.125, id="l1-tau1"),
    # default τ = 10: |.5 - p̂_0| = .25 - 1/118100 for both classes
    pytest.param(X_L, Y_L, None, dict(penalty="l1"), CE_L + 0.25 - 1 / 118100, id="l1-tau10"),
    # kl: .5 log(.5/.3) + .5 log(.5/.7) = .5 log(25/21), λ = 0.1
    pytest.param(X_L, Y_L, None, dict(penalty="kl", tau=2.0), CE_L + 0.1 * 0.5 * math.log(25 / 21), id="kl"),
    # kl_knee κ = .5: knees κŷ = (.25, .25) below p̂: the KL unchanged
    pytest.param(X_L, Y_L, None, dict(penalty="kl", tau=2.0, kl_knee=0.5), CE_L + 0.1 * 0.5 * math.log(25 / 21),
                 id="kl-knee-below-p"),
    # κ = 1: class 0's p̂ = .3 < .5: its log continues along the tangent at .5, log .5 + (.3 - .5)/.5, so its
    # term is .5 log .5 - .5 (log .5 - .4) = .2; class 1 (.7 >= .5) keeps .5 log(.5/.7)
    pytest.param(X_L, Y_L, None, dict(penalty="kl", tau=2.0, kl_knee=1.0), CE_L + 0.1 * (0.2 + 0.5 * math.log(5 / 7)),
                 id="kl-knee1"),
    # dice_bias: mean of log(.3 + .5), log(.7 + .5) = .5 log(.96), λ = 0.01
    pytest.param(X_L, Y_L, None, dict(penalty="dice_bias", tau=2.0), CE_L + 0.01 * 0.5 * math.log(0.96),
                 id="dice_bias"),
    # only voxel 0 counts: CE = -log .75, p̂ = (.1, .9), ŷ = (0, 1): l1 = .1
    pytest.param(X_L, Y_L, mask_of([1, 0]), dict(penalty="l1", tau=2.0), -math.log(0.75) + 0.1, id="l1-mask"),
    # label 2 is the ignore label: same as the mask above
    pytest.param(X_L, label_map([1, 2]), None, dict(penalty="l1", tau=2.0, ignore_label=2), -math.log(0.75) + 0.1,
                 id="l1-ignore-label"),
    # a second image of s = (.5, .5), labels [0, 0]: CE over 4 voxels (log(4/3) + 3 log 2)/4; l1 image 1 = .5,
    # penalty averaged over the images (.2 + .5)/2
    pytest.param(torch.cat([X_L, torch.zeros(1, 2, 1, 2, dtype=F64)]), label_map([1, 0], [0, 0]), None,
                 dict(penalty="l1", tau=2.0), math.log(32 / 3) / 4 + 0.35, id="l1-batch"),
    # sigmoid l1: (|1 - .5| + |.5 - .5|)/2 = .25
    pytest.param(X_LS, R_L, None, dict(penalty="l1", activation="sigmoid"), math.log(2) + 0.25, id="l1-sigmoid"),
    # sigmoid kl, Bernoulli per region: region 0 1·log(1/.5) + 0, region 1 0: log 2, λ = 0.1
    pytest.param(X_LS, R_L, None, dict(penalty="kl", activation="sigmoid"), math.log(2) + 0.1 * math.log(2),
                 id="kl-sigmoid"),
    # sigmoid kl, κ = 1: region 0's p̂ = .5 below its knee 1: 1·log 1 - 1·(log 1 + (.5 - 1)/1) = .5; the rest 0
    pytest.param(X_LS, R_L, None, dict(penalty="kl", activation="sigmoid", kl_knee=1.0), math.log(2) + 0.1 * 0.5,
                 id="kl-knee1-sigmoid"),
    # sigmoid dice_bias: mean of log 1.5, log 1
    pytest.param(X_LS, R_L, None, dict(penalty="dice_bias", activation="sigmoid"),
                 math.log(2) + 0.01 * 0.5 * math.log(1.5), id="dice_bias-sigmoid"),
]


@pytest.mark.parametrize("x, y, mask, options, expected", LABEL_MARGINAL_TABLE)
def test_label_marginal_values(x, y, mask, options, expected):
    assert float(label_marginal_loss(x, y, mask, **options)) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Heuristic ε: mean voxel count per class over every sample (empty ones included)
# ----------------------------------------------------------------------------------------------
EPSILON_TABLE = [
    # 2 samples: [[0,1],[1,2]] counts (1, 2, 1), all-zero (4, 0, 0): (5/2, 2/2, 1/2)
    pytest.param([torch.tensor([[[[0, 1], [1, 2]]], [[[0, 0], [0, 0]]]])], 3, {}, [2.5, 1.0, 0.5], id="one-batch"),
    # batches of 1 and 2 samples: (1, 3, 0) + (2, 0, 2) + (4, 0, 0) = (7, 3, 2) over 3 samples
    pytest.param([torch.tensor([[[[0, 1], [1, 1]]]]), torch.tensor([[[[2, 2], [0, 0]]], [[[0, 0], [0, 0]]]])], 3, {},
                 [7 / 3, 1.0, 2 / 3], id="two-batches"),
    # label 3 ignored: counted (1, 1, 0), the ignored voxels count nowhere
    pytest.param([torch.tensor([[[[0, 3], [1, 3]]]])], 3, dict(ignore_label=3), [1.0, 1.0, 0.0], id="ignore-label"),
    # region / one-hot target (1, 2, 2, 2): channel sums (2, 1)
    pytest.param([torch.tensor([[[[1, 1], [0, 0]], [[1, 0], [0, 0]]]])], 2, {}, [2.0, 1.0], id="regions"),
    pytest.param([np.array([[[[0, 1], [1, 2]]], [[[0, 0], [0, 0]]]])], 3, {}, [2.5, 1.0, 0.5], id="numpy"),
    pytest.param([torch.ones(1, 1, 2, 2, 2, dtype=torch.int64)], 2, {}, [0.0, 8.0], id="3d"),
]


@pytest.mark.parametrize("targets, num_classes, options, expected", EPSILON_TABLE)
def test_estimate_epsilon_values(targets, num_classes, options, expected):
    epsilon = estimate_epsilon(targets, num_classes, **options)
    assert epsilon.dtype == F64 and epsilon.shape == (num_classes,)
    assert epsilon.tolist() == pytest.approx(expected, rel=1e-12)
