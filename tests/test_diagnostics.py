"""Gradient diagnostics: ∂L/∂s against the papers' closed forms (Kervadec eq. 6, eq. 8), the
probability forms against the original losses, and the command on real nnU-Net files."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

import nnunet_losses as losses
from nnunet_losses.commands import cli
from nnunet_losses.commands import gradients as diag

# A 1 x 8 image, one foreground class. y = 1 on the first three pixels.
#   s = [0.9, 0.8, 0.6, 0.3, 0.2, 0.1, 0.1, 0.05]
#   I = 0.9 + 0.8 + 0.6 = 2.3,  U = Σy + Σs = 3 + 3.05 = 6.05
#   eq. 6: ∂L/∂s = -2(U - I)/U² on y = 1, 2I/U² on y = 0, so the dynamic range is 10·log10((U-I)/I)
FOREGROUND = np.array([[0.9, 0.8, 0.6, 0.3, 0.2, 0.1, 0.1, 0.05]])
LABELS = np.array([[1, 1, 1, 0, 0, 0, 0, 0]])
I, U = 2.3, 6.05


def softmax_case(foreground=FOREGROUND, labels=LABELS) -> diag.GradientCase:
    """Two channels (background = 1 - s), labels 0/1."""
    return diag.case_from_arrays(np.stack([1 - foreground, foreground]), labels)


def region_case(foreground=FOREGROUND, labels=LABELS) -> diag.GradientCase:
    """One sigmoid region (nnU-Net's region datasets), from a dataset.json with a region label."""
    dataset_json = {"labels": {"background": 0, "object": [1, 2]}, "regions_class_order": [1]}
    return diag.case_from_arrays(foreground[None], labels, dataset_json)


def gradient_of(spec, case):
    (result,) = diag.compute_gradients(case, [spec])
    return result


@pytest.mark.parametrize("spec, rel", [("phi_dice:epsilon=0", 1e-9), ("dice:smooth=0", 1e-5)])
@pytest.mark.parametrize("make_case", [softmax_case, region_case])
def test_dice_dynamic_range_is_eq6(spec, rel, make_case):
    case = make_case()
    result = gradient_of(spec, case)
    channel = case.probabilities.shape[0] - 1  # the foreground channel
    stats = result.classes[channel]
    assert stats.dynamic_range_db == pytest.approx(10 * math.log10((U - I) / I), rel=rel)  # 2.066 dB
    g = result.gradient[channel][0]
    np.testing.assert_allclose(g[:3], -2 * (U - I) / U**2, rtol=rel)
    np.testing.assert_allclose(g[3:], 2 * I / U**2, rtol=rel)
    assert (stats.pushed_up, stats.pushed_down) == (1.0, 1.0)
    assert result.convention == diag.EXACT


def test_dice_background_left_out_has_no_gradient():
    stats = gradient_of("phi_dice:epsilon=0", softmax_case()).classes[0]
    assert (stats.dynamic_range_db, stats.pushed_up, stats.pushed_down) == (None, None, None)


@pytest.mark.parametrize("a, b", [(1.9, 0.1), (1.0, 0.25)])
@pytest.mark.parametrize("make_case", [softmax_case, region_case])
def test_mime_dynamic_range_is_a_over_b(a, b, make_case):
    case = make_case()
    result = gradient_of(f"mime:a={a}:b={b}", case)
    n = LABELS.size  # reduction "mean": ∂L/∂s = -a/N on the label, b/N elsewhere (eq. 8)
    channel = case.probabilities.shape[0] - 1
    np.testing.assert_allclose(result.gradient[channel][0], np.where(LABELS[0] == 1, -a / n, b / n), rtol=1e-12)
    for stats in result.classes:  # every channel (background too) is a two-valued map
        assert stats.dynamic_range_db == pytest.approx(10 * math.log10(a / b), rel=1e-9)
        assert (stats.pushed_up, stats.pushed_down) == (1.0, 1.0)


def test_mime_per_class_weights_without_background():
    # a, b per class; include_background=False leaves channel 0 out (its entry is dropped)
    result = gradient_of("mime:a=[5.0,2.0]:b=[5.0,0.5]:include_background=False", softmax_case())
    assert result.classes[0].dynamic_range_db is None
    assert result.classes[1].dynamic_range_db == pytest.approx(10 * math.log10(2.0 / 0.5), rel=1e-9)


def test_negative_mime_pushes_only_the_label():
    result = gradient_of("negative_mime", softmax_case())
    n = LABELS.size
    np.testing.assert_allclose(result.gradient[1][0], np.where(LABELS[0] == 1, -1 / n, 0.0), rtol=1e-12)
    stats = result.classes[1]
    assert stats.dynamic_range_db == pytest.approx(0.0, abs=1e-9)  # one value: 0 dB
    assert (stats.pushed_up, stats.pushed_down) == (1.0, 0.0)


def test_negative_mime_refuses_regions():
    with pytest.raises(ValueError, match="expected a softmax"):
        gradient_of("negative_mime", region_case())


def test_cross_entropy_gradient_is_minus_one_over_s():
    # Kervadec eq. 4 per voxel mean: ∂L/∂s_c = -y_c / (N s_c); 0 where y_c = 0
    case = softmax_case()
    result = gradient_of("ce", case)
    n = LABELS.size
    expected = -np.stack([1 - LABELS, LABELS]) / (n * case.probabilities)
    np.testing.assert_allclose(result.gradient, expected, rtol=1e-12)
    # s from 0.05 to 0.9 on the foreground: the range is the ratio of the extreme probabilities there
    assert result.classes[1].dynamic_range_db == pytest.approx(10 * math.log10(0.9 / 0.6), rel=1e-9)


def random_case(activation: str, seed: int = 0, ignore: bool = False) -> diag.GradientCase:
    """3 labels (softmax) or 3 regions (sigmoid) on a seeded random 2 x 5 x 6 volume."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(2, 5, 6))
    if activation == "softmax":
        dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}}
        if ignore:
            dataset_json["labels"]["ignore"] = 3
            labels[0, :2] = 3
        logits = rng.normal(size=(3, 2, 5, 6))
        probabilities = np.exp(logits) / np.exp(logits).sum(0)
    else:
        dataset_json = {"labels": {"background": 0, "a": [1, 2], "b": [2], "c": [1]}, "regions_class_order": [1, 2, 1]}
        probabilities = rng.uniform(0.02, 0.98, size=(3, 2, 5, 6))
    return diag.case_from_arrays(probabilities, labels, dataset_json)


def _original_softmax_losses():
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

    def nnunet_dice(x, y, mask):
        return MemoryEfficientSoftDiceLoss(lambda t: torch.softmax(t, 1), do_bg=False, smooth=1e-5, ddp=False)(x, y, mask)

    def nnunet_ce(x, y, mask):  # nnU-Net's CE with the ignore label: masked voxels carry the ignore index
        return RobustCrossEntropyLoss(ignore_index=-1)(x, torch.where(mask.bool(), y, -1) if mask is not None else y)

    return {
        "ce": nnunet_ce,
        "dice": nnunet_dice,
        "mime": losses.MimeLoss(),
        "negative_mime": losses.NegativeMimeLoss(),
        "dynamic_mime": losses.DynamicMimeLoss(),
        "phi_dice": losses.PhiDiceLoss(),
        "phi_dice:phi='BI':epsilon=[1.0,2.0,3.0]": losses.PhiDiceLoss(phi="BI", epsilon=[1.0, 2.0, 3.0]),
        "leaf_dice": losses.LeafDiceLoss(),
        "leaf_dice:include_background=True": losses.LeafDiceLoss(include_background=True),
        "mime:include_background=False": losses.MimeLoss(include_background=False),
        "phi_dice:include_background=True:phi='CI'": losses.PhiDiceLoss(include_background=True, phi="CI"),
        "marginal_dice": losses.MarginalDiceLoss(),
        "label_marginal": losses.LabelMarginalLoss(),
    }


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("spec", list(_original_softmax_losses()))
def test_probability_form_equals_the_loss_on_the_simplex(spec, ignore):
    # the same function of s: the form's value equals the original loss fed log(s) (softmax(log s) = s)
    case = random_case("softmax", ignore=ignore)
    t = diag.case_tensors(case)
    form = diag.build_loss_form(spec)
    original = _original_softmax_losses()[spec]
    expected = original(torch.log(t.s.detach()), t.labels, t.mask)
    assert float(form.function(t).detach()) == pytest.approx(float(expected), rel=1e-6, abs=1e-12)


def test_region_forms_equal_nnunet_region_losses():
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    case = random_case("sigmoid")
    t = diag.case_tensors(case)
    x = torch.logit(t.s.detach())
    bce = torch.nn.BCEWithLogitsLoss()(x, t.target)
    dice = MemoryEfficientSoftDiceLoss(torch.sigmoid, do_bg=True, smooth=1e-5, ddp=False)(x, t.target)
    assert float(diag.build_loss_form("ce").function(t).detach()) == pytest.approx(float(bce), rel=1e-10)
    assert float(diag.build_loss_form("dice").function(t).detach()) == pytest.approx(float(dice), rel=1e-6)
    phi = losses.phi_dice_loss(x, t.target, activation="sigmoid")
    assert float(diag.build_loss_form("phi_dice").function(t).detach()) == pytest.approx(float(phi), rel=1e-12)


def test_logits_route_is_the_softmax_projection():
    # x = log(s) gives g_c - Σ_k s_k g_k, g being the exact partial derivatives
    case = random_case("softmax", seed=3)
    exact = gradient_of("mime", case).gradient
    projected_form = diag.logits_loss_form("mime via log(s)", losses.MimeLoss(), "softmax")
    (projected,) = diag.compute_gradients(case, [projected_form])
    s = diag.case_tensors(case).s.detach()[0].numpy()
    np.testing.assert_allclose(projected.gradient, exact - (s * exact).sum(0, keepdims=True), rtol=1e-9, atol=1e-15)
    assert projected.convention == diag.PROJECTED


def test_dynamic_range_ignores_zeros():
    assert diag.dynamic_range_db(np.array([0.0, -2.0, 0.02, 0.0])) == pytest.approx(20.0)
    assert diag.dynamic_range_db(np.zeros(4)) is None


def test_ignore_label_is_left_out_of_the_statistics():
    case = random_case("softmax", ignore=True)
    assert case.mask.sum() == case.mask.size - 12  # 2 rows of 6 voxels of the first slice
    result = gradient_of("mime", case)
    np.testing.assert_array_equal(result.gradient[:, ~case.mask], 0.0)


@pytest.mark.parametrize("spec, message", [
    ("softdice", "expected one of"),
    ("mime:c=1", "expected options among"),
    ("mime:a", "expected options as key=value"),
])
def test_bad_loss_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        diag.build_loss_form(spec)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"expected a label map of shape \(1, 8\)"):
        diag.case_from_arrays(np.stack([1 - FOREGROUND, FOREGROUND]), LABELS[:, :4])
    with pytest.raises(ValueError, match=r"expected labels in \[0, 1\], got values \[5\]"):
        diag.case_from_arrays(np.stack([1 - FOREGROUND, FOREGROUND]), np.where(LABELS == 1, 5, 0))


def write_nnunet_prediction(folder, case_id, probabilities, label_map, spacing=(2.0, 1.0, 1.0)):
    """Write what nnUNetv2_predict --save_probabilities writes (segmentation, .npz, .pkl) and the
    ground truth, with nnU-Net's own SimpleITK writer. Returns (npz path, ground-truth path)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder.mkdir(parents=True, exist_ok=True)
    io = SimpleITKIO()
    properties = {"spacing": list(spacing), "sitk_stuff": {"spacing": tuple(spacing[::-1]), "origin": (0.0,) * 3,
                                                           "direction": tuple(np.eye(3).ravel())}}
    gt = folder / f"{case_id}_gt.nii.gz"
    io.write_seg(label_map.astype(np.uint8), str(gt), properties)
    io.write_seg(probabilities.argmax(0).astype(np.uint8), str(folder / f"{case_id}.nii.gz"), properties)
    np.savez_compressed(folder / f"{case_id}.npz", probabilities=probabilities.astype(np.float32))
    with open(folder / f"{case_id}.pkl", "wb") as handle:
        pickle.dump(properties, handle)
    return folder / f"{case_id}.npz", gt


def test_load_prediction_case_and_command(tmp_path, capsys):
    case = random_case("softmax", seed=1)
    npz, gt = write_nnunet_prediction(tmp_path / "pred", "case_7", case.probabilities, case.label_map)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}))
    loaded = diag.load_prediction_case(npz, gt, dataset_json)
    assert loaded.case_id == "case_7" and loaded.class_names == ["background", "a", "b"]
    assert loaded.spacing == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(loaded.label_map, case.label_map)
    np.testing.assert_allclose(loaded.probabilities, case.probabilities, rtol=1e-6)

    out = tmp_path / "out"
    code = cli.main(["gradients", "--probabilities", str(npz), "--ground-truth", str(gt), "--dataset-json",
                     str(dataset_json), "--loss", "dice:smooth=0", "--loss", "mime", "--class", "b", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mime | b | 12.79 |" in printed  # 10·log10(1.9 / 0.1)
    data = json.loads((out / "gradients_case_7.json").read_text())
    assert [entry["name"] for entry in data["losses"]] == ["dice:smooth=0", "mime"]
    image = __import__("matplotlib.image").image.imread(out / "gradients_case_7.png")
    assert image.ndim == 3 and image.shape[1] > 4 * image.shape[0] / 2  # four panels side by side


def test_synthetic_command(tmp_path):
    assert cli.main(["gradients", "--synthetic", "--size", "40", "-o", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gradients_synthetic_40px_seed0.json").read_text())
    mime = next(entry for entry in data["losses"] if entry["name"] == "mime")
    assert all(c["dynamic_range_db"] == pytest.approx(10 * math.log10(19)) for c in mime["classes"])
    assert (tmp_path / "gradients_synthetic_40px_seed0.png").stat().st_size > 1000


def test_missing_probabilities_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--save_probabilities"):
        diag.load_prediction_case(tmp_path / "nope.npz", tmp_path / "gt.nii.gz")
