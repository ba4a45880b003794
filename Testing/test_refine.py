"""Refinement (instance optimisation): each similarity improves a known misalignment; MIND ignores contrast;
early stopping stops; the safety net refines a network result that is worse than the affine alone."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import phantom, write_phantom_pair
from SlicerVoxelMorphLib import metrics
from SlicerVoxelMorphLib.cli import main
from SlicerVoxelMorphLib.layers import SpatialTransformer, displacement_from_velocity
from SlicerVoxelMorphLib.models import DEFAULT_MODEL, SAME_HEAD_MODEL, save_model
from SlicerVoxelMorphLib.networks import VxmDense
from SlicerVoxelMorphLib.preprocess import normalise
from SlicerVoxelMorphLib.refine import (
    SAME_HEAD_WINDOW,
    Adam,
    Refiner,
    choose_similarity,
    local_match,
    mind_ssc,
    same_head_score,
)
from SlicerVoxelMorphLib.register import SAME_HEAD_SCORE, alignment


def _pair(invert: bool = False):
    """A 24^3 phantom (fixed) and a copy moved by a smooth known field (moving), with labels."""
    image, labels = phantom((24, 24, 24), seed=2)
    fixed = torch.from_numpy(normalise(image))[None, None]
    fixed_labels = torch.from_numpy(labels.astype(np.float32))[None, None]
    torch.manual_seed(0)
    velocity = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3) * 1.2, size=(12, 12, 12),
                                               mode="trilinear", align_corners=False)
    flow = displacement_from_velocity(velocity, (24, 24, 24))
    moving = SpatialTransformer()(fixed, flow)
    moving_labels = SpatialTransformer("nearest")(fixed_labels, flow)
    if invert:
        moving = 1.0 - moving
    return moving, fixed, moving_labels, fixed_labels


def _dice(fixed_labels, moving_labels, velocity) -> float:
    flow = displacement_from_velocity(velocity, tuple(fixed_labels.shape[2:]), steps=5)
    warped = SpatialTransformer("nearest")(moving_labels, flow)
    values = metrics.dice(fixed_labels[0, 0].numpy().astype(int), warped[0, 0].numpy().astype(int), [1, 2, 3])
    return float(np.mean(list(values.values())))


@pytest.mark.parametrize(("similarity", "invert", "dilation"),
                         [("ncc", False, 2), ("mind", False, 2), ("mind", True, 2), ("mind", True, 1)])
def test_refinement_lowers_the_loss_and_raises_dice(similarity, invert, dilation):
    moving, fixed, moving_labels, fixed_labels = _pair(invert)
    start = torch.zeros(1, 3, 12, 12, 12)
    velocity, record = Refiner(steps=30, similarity=similarity, velocity_factor=2, window=5, int_steps=5,
                               patience=30, mind_dilation=dilation).execute(start, moving, fixed)
    assert record["similarity"] == similarity and velocity.shape[2:] == (24, 24, 24)
    assert record["loss_last"] < record["loss_first"]
    before = _dice(fixed_labels, moving_labels, torch.zeros(1, 3, 24, 24, 24))
    after = _dice(fixed_labels, moving_labels, velocity)
    assert after > before + 0.03, (before, after)


@pytest.mark.parametrize("dilation", [1, 2])
def test_mind_descriptors_ignore_an_intensity_inversion_and_rescaling(dilation):
    image, _ = phantom((24, 24, 24), seed=1)
    x = torch.from_numpy(normalise(image))[None, None]
    reference = mind_ssc(x, dilation=dilation)
    assert reference.shape == (1, 12, 24, 24, 24)
    torch.testing.assert_close(mind_ssc(1.0 - x, dilation=dilation), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mind_ssc(3.0 * x + 7.0, dilation=dilation), reference, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(mind_ssc(x ** 3, dilation=dilation), reference, atol=1e-2)  # it sees structure change


def test_mind_dilation_is_the_distance_between_the_compared_neighbours():
    stripes = (torch.arange(16) % 2).float().view(1, 1, 1, 1, 16).expand(1, 1, 16, 16, 16)  # a 2-voxel period in i
    inside = (slice(None), slice(None), *[slice(4, -4)] * 3)  # away from the replicated border
    # neighbours 2 voxels apart see the same value everywhere: no patch differs, all 12 descriptors are 1
    assert torch.allclose(mind_ssc(stripes, dilation=2)[inside], torch.ones(1, 12, 8, 8, 8))
    # 1 voxel apart: of the 12 neighbour pairs, the 8 whose i differs by one see the same distance d, the 4 in
    # the j-k plane none; the variance is the mean distance 8 d / 12, so those 8 are exp(-1.5), the 4 are 1
    values = mind_ssc(stripes, dilation=1)[inside].sort(dim=1).values
    expected = torch.tensor([math.exp(-1.5)] * 8 + [1.0] * 4).view(1, 12, 1, 1, 1).expand_as(values)
    torch.testing.assert_close(values, expected)


def test_auto_similarity_follows_the_contrast():
    moving, fixed, _, _ = _pair()
    assert choose_similarity("auto", moving, fixed) == "ncc"
    assert choose_similarity("auto", 1.0 - moving, fixed) == "mind"
    assert choose_similarity("mind", moving, fixed) == "mind"
    with pytest.raises(ValueError, match="similarity"):
        choose_similarity("mi", moving, fixed)


def test_early_stopping_stops_when_the_loss_plateaus():
    _, fixed, _, _ = _pair()
    _, record = Refiner(steps=200, similarity="ncc", window=5, patience=5, int_steps=5).execute(
        torch.zeros(1, 3, 12, 12, 12), fixed.clone(), fixed)
    assert record["steps_run"] < 50


def test_a_network_worse_than_the_affine_is_caught_and_refined(tmp_path, capsys, monkeypatch):
    from SlicerVoxelMorphLib import register

    monkeypatch.setattr(register, "SAME_HEAD_SCORE", np.inf)  # this pair is one head deformed: that check apart
    torch.manual_seed(0)
    net = VxmDense("vm1", half_res=True, int_steps=5)
    with torch.no_grad():
        net.flow.bias.fill_(4.0)  # a bad model: every voxel pushed 4 voxels (8 mm) along each axis
    save_model(tmp_path / "bad.pt", net, 2.0, {"name": "bad"})
    paths, _ = write_phantom_pair(tmp_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), field_seed=3,
                                  sigma_mm=16.0, phantom_seed=5)
    paths = {name: str(path) for name, path in paths.items()}
    base = ["register", "--fixed", paths["fixed"], "--moving", paths["moving"], "--fixed-labels",
            paths["fixed_labels"], "--moving-labels", paths["moving_labels"], "--model", str(tmp_path / "bad.pt"),
            "--quiet"]
    assert main([*base, "--no-auto-refine", "--no-polish", "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "report.json").read_text())
    assert raw["alignment"]["network"] > raw["alignment"]["affine_only"]  # the check sees the damage
    assert "refinement" not in raw and raw["mean_dice_after"] < raw["mean_dice_before"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "safe")]) == 0
    assert "did not improve on the affine" in capsys.readouterr().err
    safe = json.loads((tmp_path / "safe" / "report.json").read_text())
    assert safe["auto_refined"] and safe["alignment"]["refined"] < safe["alignment"]["network"]
    assert safe["mean_dice_after"] > raw["mean_dice_after"] + 0.1


def test_alignment_check_matches_scipy_on_its_lattice():
    rng = np.random.default_rng(3)
    shape = (12, 14, 10)
    source = ndimage.gaussian_filter(rng.random((2, *shape)), (0, 2, 2, 2)).astype(np.float32)
    target = ndimage.gaussian_filter(rng.random((2, *shape)), (0, 2, 2, 2)).astype(np.float32)
    flow = (3 * ndimage.gaussian_filter(rng.standard_normal((3, *shape)), (0, 3, 3, 3))).astype(np.float32)
    result = alignment(*(torch.from_numpy(a)[None] for a in (source, target, flow)), stride=2)
    lattice = np.mgrid[0:12:2, 0:14:2, 0:10:2].astype(np.float32)  # (3, 6, 7, 5) voxel indices along D, H, W
    where = lattice + flow[:, ::2, ::2, ::2]
    warped = np.stack([ndimage.map_coordinates(c, where, order=1, mode="nearest") for c in source])
    lattice_target = target[:, ::2, ::2, ::2]
    assert abs(result["network"] - ((lattice_target - warped) ** 2).mean()) < 1e-5
    assert abs(result["affine_only"] - ((lattice_target - source[:, ::2, ::2, ::2]) ** 2).mean()) < 1e-5


def test_local_match_agrees_with_scipy_box_filters_and_is_one_for_identical_images():
    rng = np.random.default_rng(4)
    a, b = (ndimage.gaussian_filter(rng.random((14, 16, 12)), 1.5).astype(np.float32) for _ in range(2))
    a[:3] = 0  # background: outside the foreground of both
    b[:3] = 0

    def box(x):  # centred 9^3 mean with zero padding, as losses.box_mean
        return ndimage.uniform_filter(x.astype(np.float64), SAME_HEAD_WINDOW, mode="constant")

    cross = box(a * b) - box(a) * box(b)
    variances = (box(a * a) - box(a) ** 2) * (box(b * b) - box(b) ** 2)
    inside = (a > 0.05) | (b > 0.05)
    expected = (np.clip(cross, 0, None) ** 2)[inside].sum() / variances[inside].sum()
    ta, tb = (torch.from_numpy(x)[None, None] for x in (a, b))
    assert local_match(ta, tb) == pytest.approx(expected, rel=1e-4)
    assert local_match(ta, ta) == pytest.approx(1.0, rel=1e-5)


def test_same_head_score_separates_a_slightly_deformed_copy_from_a_different_shape():
    fixed = torch.from_numpy(normalise(phantom((40, 40, 40), seed=0)[0]))[None, None]

    def deformed(amplitude: float, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        velocity = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3) * amplitude, size=(20, 20, 20),
                                                   mode="trilinear", align_corners=False)
        return SpatialTransformer()(fixed, displacement_from_velocity(velocity, (40, 40, 40)))

    assert same_head_score(fixed, fixed) == pytest.approx(1 / np.mean([  # itself: 1 over its one-voxel shift
        local_match(fixed.narrow(axis, 1, 39), fixed.narrow(axis, 0, 39)) for axis in (2, 3, 4)]))
    # measured: a copy moved by ~1 voxel on average scores 1.01; one moved by ~6 voxels (another shape) 0.46
    assert same_head_score(deformed(0.5, 0), fixed) > SAME_HEAD_SCORE
    assert same_head_score(deformed(3.0, 0), fixed) < SAME_HEAD_SCORE - 0.2


def test_lbfgs_keeps_to_its_evaluation_budget_and_optimises_further_than_adam_within_it():
    """Each L-BFGS loss evaluation (line-search trials included) costs what an Adam step does; within the same
    budget it reaches a lower loss and recovers the known deformation (labels moved by it) as well or better."""
    moving, fixed, moving_labels, fixed_labels = _pair()
    start = torch.zeros(1, 3, 12, 12, 12)
    for budget in (15, 25):
        settings = {"steps": budget, "similarity": "ncc", "window": 5, "int_steps": 5, "patience": budget,
                    "smooth_weight": 0.0, "bending_weight": 0.3, "lr": 0.05}
        adam, adam_record = Refiner(**settings).execute(start, moving, fixed)
        lbfgs, lbfgs_record = Refiner(**settings, optimizer="lbfgs").execute(start, moving, fixed)
        assert lbfgs_record["optimizer"] == "lbfgs" and lbfgs_record["steps_run"] <= budget
        assert lbfgs_record["loss_best"] < adam_record["loss_best"]
        assert _dice(fixed_labels, moving_labels, lbfgs) >= _dice(fixed_labels, moving_labels, adam) - 0.005
    assert _dice(fixed_labels, moving_labels, lbfgs) > _dice(fixed_labels, moving_labels, start) + 0.1


def test_two_scans_of_one_head_are_registered_by_the_same_head_network_and_refined(tmp_path, capsys):
    """The default model hands a pair it takes for two scans of one head to the bundled network trained on such
    pairs, whose field alone recovers a known deformation, and the safety net refines that field, starting from
    where that network left it (as with ``--model same_head``); an inter-subject model chosen by name keeps the
    pair, aligns it worse (MIND-SSC distance), and its refinement starts elsewhere."""
    import SimpleITK as sitk

    paths, field = write_phantom_pair(tmp_path, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                                      amplitude=4.0, field_seed=3, sigma_mm=16.0, phantom_seed=5)
    base = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--quiet"]
    truth = sitk.GetArrayFromImage(field)
    inside = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"]))) > 0

    def run(name: str, *options: str) -> tuple[dict, float]:
        """Report and mean end-point error (mm) against the known field inside the phantom."""
        assert main([*base, *options, "--out", str(tmp_path / name)]) == 0
        found = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "displacement.nii.gz")))
        report = json.loads((tmp_path / name / "report.json").read_text())
        return report, float(np.linalg.norm(found - truth, axis=-1)[inside].mean())

    before = float(np.linalg.norm(truth, axis=-1)[inside].mean())
    raw, raw_error = run("raw", "--no-auto-refine")
    assert raw["same_head"]["detected"] and raw["model"] == raw["same_head"]["model"] == SAME_HEAD_MODEL
    assert "refinement" not in raw
    assert raw_error < before - 0.3, (before, raw_error)
    capsys.readouterr()
    safe, safe_error = run("safe")
    assert "two scans of one head" in capsys.readouterr().err
    assert safe["auto_refined"] and safe["auto_refine_reason"] == "same head" and safe["model"] == SAME_HEAD_MODEL
    # on this small phantom the refinement's optimum (0.43 mm, from either start) is about the network's own 0.41;
    # on the whole-head proxy it takes the network's 0.97 mm to 0.49 (bundled/same_head.md)
    assert safe_error < before - 0.3 and abs(safe_error - raw_error) < 0.1, (before, safe_error, raw_error)
    named, _ = run("named", "--model", SAME_HEAD_MODEL)
    assert named["same_head"]["model"] == SAME_HEAD_MODEL
    assert named["refinement"]["loss_first"] == safe["refinement"]["loss_first"]  # the same start
    other, _ = run("other", "--model", DEFAULT_MODEL)
    assert other["model"] == DEFAULT_MODEL and "model" not in other["same_head"]
    assert other["alignment"]["network"] > raw["alignment"]["network"]  # MIND-SSC distance after each network
    # its refinement starts elsewhere: from the identity (the next test: an image registered to itself stays put)
    assert other["refinement"]["loss_first"] != safe["refinement"]["loss_first"]


def test_an_image_registered_to_itself_is_left_exactly_where_it_is(tmp_path):
    """With an inter-subject network chosen by name, two scans of one head are refined from the identity, not from
    the network's field (for such pairs no better than none; not zero for the same image twice), and the
    refinement returns the velocity of lowest loss, not the optimiser's last step: with MIND-SSC, whose distance
    is 0 at the identity for the same image twice, no deformation at all."""
    import SimpleITK as sitk

    paths, _ = write_phantom_pair(tmp_path, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                                  amplitude=4.0, field_seed=3, sigma_mm=16.0, phantom_seed=5)
    out = tmp_path / "self"
    assert main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["fixed"]), "--no-affine",
                 "--model", DEFAULT_MODEL, "--similarity", "mind", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["auto_refine_reason"] == "same head" and report["refinement"]["loss_best"] == 0
    assert report["alignment"]["network"] > 0  # the network's own field was not the identity
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    assert np.abs(found).max() == 0



def test_bending_regulariser_keeps_a_linear_velocity_that_the_gradient_penalty_flattens():
    """With images that say nothing (blank), only the regulariser acts: the bending energy removes a bump but keeps
    a linear ramp (an affine part costs nothing, so a smooth field is continued where images are flat); the
    first-order penalty flattens both."""
    blank = torch.zeros(1, 1, 16, 16, 16)
    w = torch.arange(8.0).view(1, 1, 1, 1, 8) - 3.5
    ramp = torch.cat([0.2 * w.expand(1, 1, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8)], dim=1)
    bump = torch.zeros_like(ramp)
    bump[0, 1, 3:5, 3:5, 3:5] = 0.5

    def refined(**weights) -> torch.Tensor:
        settings = {"steps": 60, "similarity": "ncc", "window": 5, "int_steps": 5, "lr": 0.02, "patience": 60}
        return Refiner(**settings, **weights).execute(ramp + bump, blank, blank)[0]

    bending = refined(smooth_weight=0.0, bending_weight=0.3)
    diffusion = refined(smooth_weight=1.0)
    assert (bending[:, 0] - ramp[:, 0]).abs().max() < 0.02  # the ramp's slope is 0.2 a voxel
    assert (diffusion[:, 0] - ramp[:, 0]).abs().max() > 0.3
    assert bending[:, 1].abs().max() < 0.4 and diffusion[:, 1].abs().max() < 0.4  # the bump shrank under both


def test_a_pair_of_two_contrasts_is_refined_with_its_own_preset(tmp_path, capsys, monkeypatch):
    import SimpleITK as sitk

    from SlicerVoxelMorphLib import register

    monkeypatch.setattr(register, "SAME_HEAD_SCORE", np.inf)  # this pair is one head deformed: that check apart
    paths, _ = write_phantom_pair(tmp_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), field_seed=3,
                                  sigma_mm=16.0, phantom_seed=5)
    moving = sitk.ReadImage(str(paths["moving"]))
    array = sitk.GetArrayFromImage(moving)
    inside = array > 0.05 * array.max()  # the background stays dark, as in any MR contrast
    inverted = sitk.GetImageFromArray(np.where(inside, array.max() - array, 0).astype(np.float32))
    inverted.CopyInformation(moving)  # dark where the fixed image is bright
    sitk.WriteImage(inverted, str(tmp_path / "inverted.nii.gz"))
    base = ["register", "--fixed", str(paths["fixed"]), "--fixed-labels", str(paths["fixed_labels"]),
            "--moving-labels", str(paths["moving_labels"]), "--quiet"]
    assert main([*base, "--moving", str(paths["moving"]), "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["intensity_correlation"] > 0.5 and one["polished"] and not one.get("auto_refined")  # Fast mode
    capsys.readouterr()
    two = ["--moving", str(tmp_path / "inverted.nii.gz")]
    assert main([*base, *two, "--no-auto-refine", "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "report.json").read_text())
    assert raw["intensity_correlation"] < 0.5 and "refinement" not in raw  # the threshold of two contrasts
    assert main([*base, *two, "--out", str(tmp_path / "safe")]) == 0
    assert "different contrasts" in capsys.readouterr().err
    safe = json.loads((tmp_path / "safe" / "report.json").read_text())
    assert safe["auto_refined"] and safe["auto_refine_reason"] == "two contrasts"
    assert safe["refinement"]["similarity"] == "mind"
    assert safe["refinement"]["steps_run"] == register.TWO_CONTRASTS["steps"] < register.ACCURATE["steps"]
    assert safe["alignment"]["refined"] < safe["alignment"]["network"]
    assert safe["mean_dice_after"] > raw["mean_dice_after"] + 0.01


def test_a_network_result_weaker_than_on_its_training_data_is_refined_with_the_accurate_preset(tmp_path, capsys,
                                                                                                monkeypatch):
    """The rule's boundary: the same pair is refined with the accurate preset when the threshold lies just below
    its distance ratio (network / affine only, recorded in the report) and left alone just above it."""
    from SlicerVoxelMorphLib import register

    monkeypatch.setattr(register, "SAME_HEAD_SCORE", np.inf)  # this pair is one head deformed: that check apart
    paths, _ = write_phantom_pair(tmp_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), field_seed=3,
                                  sigma_mm=16.0, phantom_seed=5)
    base = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--quiet"]
    assert main([*base, "--no-auto-refine", "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "report.json").read_text())
    ratio = raw["alignment"]["ratio"]
    assert ratio == pytest.approx(raw["alignment"]["network"] / raw["alignment"]["affine_only"], abs=1e-3)
    assert 0 < ratio < 1  # the network improved on the affine: the rescue fallback does not apply
    monkeypatch.setattr(register, "WEAK_NETWORK_RATIO", ratio + 0.01)
    assert main([*base, "--out", str(tmp_path / "kept")]) == 0
    kept = json.loads((tmp_path / "kept" / "report.json").read_text())
    assert kept["polished"] and not kept.get("auto_refined")  # only Fast mode's few steps
    capsys.readouterr()
    monkeypatch.setattr(register, "WEAK_NETWORK_RATIO", ratio - 0.01)
    assert main([*base, "--out", str(tmp_path / "refined")]) == 0
    assert "less than on its training data" in capsys.readouterr().err
    refined = json.loads((tmp_path / "refined" / "report.json").read_text())
    assert refined["auto_refine_reason"] == "network weaker than on its training data"
    assert refined["refinement"]["steps_run"] <= register.ACCURATE["steps"]
    assert refined["alignment"]["refined"] < refined["alignment"]["network"]


def test_a_full_resolution_velocity_is_refined_on_the_grid_the_presets_were_chosen_on(tmp_path, monkeypatch):
    """A model with a fine stage predicts its velocity at the network level's full resolution; the accurate
    preset was chosen on a grid twice coarser (that of half-resolution models), where integrating a field costs
    a fifth: there the refinement finds a correction applied before the network's deformation. It improves on
    the network, and the inverse (the two inverses composed the other way round) undoes the result."""
    from SlicerVoxelMorphLib import register

    monkeypatch.setattr(register, "SAME_HEAD_SCORE", np.inf)  # this pair is one head deformed: that check apart
    torch.manual_seed(0)
    net = VxmDense("vm1", half_res=True, int_steps=5, residual_stage=True, fine_stage=True)
    with torch.no_grad():
        net.fine_flow.weight.normal_(0.0, 0.05)  # a network whose field varies and needs correcting
        net.fine_flow.bias.copy_(torch.tensor([1.5, -1.0, 0.5]))
    save_model(tmp_path / "fine.pt", net, 2.0, {"name": "fine"})
    paths, _ = write_phantom_pair(tmp_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), field_seed=3,
                                  sigma_mm=16.0, phantom_seed=5)
    assert main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model",
                 str(tmp_path / "fine.pt"), "--accurate", "--inverse", "--quiet", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    working = report["working_grid"]
    assert working["spacing_mm"] == [1.0, 1.0, 1.0]  # the network level is 2 mm: half the working grid
    assert report["refinement"]["velocity_grid"] == [n // 4 for n in reversed(working["size"])]
    assert report["alignment"]["refined"] < 0.9 * report["alignment"]["network"]
    # the inverses composed in the same order as the forward fields: 0.55-0.57 mm (p95 1.2); the refinement's
    # own field inverts to about 0.1-0.2 mm on this pair (a half-resolution model, accurate preset: 0.11)
    for points in report["inverse_round_trip"].values():
        assert points["mean_mm"] < 0.35 and points["p95_mm"] < 0.8, report["inverse_round_trip"]


def test_fast_mode_polishes_a_pair_of_one_contrast_with_a_few_steps_and_not_a_pair_of_two(tmp_path, monkeypatch):
    """By default the network's result of a pair of one contrast gets the POLISH preset's few refinement steps
    (NCC): the refinement loss falls and the labels overlap better than with the network's field alone
    (``--no-polish`` or ``--refine 0``, which leave the report without a refinement). A pair of two contrasts is not
    polished with NCC, even without the safety net that refines it with MIND-SSC."""
    import SimpleITK as sitk

    from SlicerVoxelMorphLib import register

    monkeypatch.setattr(register, "SAME_HEAD_SCORE", np.inf)  # this pair is one head deformed: that check apart
    paths, _ = write_phantom_pair(tmp_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), field_seed=3,
                                  sigma_mm=16.0, phantom_seed=5)
    # synth_fine (the default's architecture and warm start) leaves this phantom room to improve; the default
    # synth_cerebellum aligns it to Dice 0.950 alone, a near-optimum that three steps at lr 0.1 move to 0.945
    base = ["register", "--fixed", str(paths["fixed"]), "--fixed-labels", str(paths["fixed_labels"]),
            "--moving-labels", str(paths["moving_labels"]), "--model", "synth_fine", "--quiet"]
    one = ["--moving", str(paths["moving"])]
    assert main([*base, *one, "--no-polish", "--out", str(tmp_path / "network")]) == 0
    network = json.loads((tmp_path / "network" / "report.json").read_text())
    assert "refinement" not in network and "polished" not in network
    assert main([*base, *one, "--refine", "0", "--out", str(tmp_path / "zero")]) == 0  # no steps: none at all
    zero = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert "refinement" not in zero and zero["mean_dice_after"] == network["mean_dice_after"]
    assert main([*base, *one, "--out", str(tmp_path / "polished")]) == 0
    polished = json.loads((tmp_path / "polished" / "report.json").read_text())
    assert polished["polished"] and not polished.get("auto_refined")
    assert polished["refinement"]["similarity"] == "ncc"
    assert polished["refinement"]["steps_run"] == register.POLISH["steps"] < register.ACCURATE["steps"]
    assert polished["refinement"]["loss_best"] < polished["refinement"]["loss_first"]
    assert polished["mean_dice_after"] > network["mean_dice_after"]
    moving = sitk.ReadImage(str(paths["moving"]))
    array = sitk.GetArrayFromImage(moving)
    inside = array > 0.05 * array.max()
    inverted = sitk.GetImageFromArray(np.where(inside, array.max() - array, 0).astype(np.float32))
    inverted.CopyInformation(moving)
    sitk.WriteImage(inverted, str(tmp_path / "inverted.nii.gz"))
    assert main([*base, "--moving", str(tmp_path / "inverted.nii.gz"), "--no-auto-refine", "--out",
                 str(tmp_path / "two")]) == 0
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert "refinement" not in two and "polished" not in two


def test_adam_takes_the_steps_of_torchs_adam_without_importing_its_compiler():
    """The refinement's own Adam (torch.optim imports torch._dynamo on first use: 1.4 s of every command-line
    registration that refines) moves a tensor exactly as torch.optim.Adam does, and a fresh process that runs
    it never imports torch._dynamo."""
    import subprocess
    import sys

    torch.manual_seed(0)
    target = torch.randn(2, 3, 4)
    start = torch.randn(2, 3, 4)

    def loss_of(x):
        return ((x - target) ** 2 * torch.linspace(0.1, 3, 4)).sum() + x.abs().sum()

    mine, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    adam, reference = Adam(mine, lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for _ in range(20):
        mine.grad, theirs.grad = None, None
        loss_of(mine).backward()
        loss_of(theirs).backward()
        adam.step()
        reference.step()
    assert torch.equal(mine, theirs) and not torch.equal(mine, start)
    code = ("import sys, torch; from SlicerVoxelMorphLib.refine import Adam; x = torch.ones(3, requires_grad=True); "
            "(x ** 2).sum().backward(); Adam(x, lr=0.1).step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
