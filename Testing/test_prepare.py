"""The one preprocessing path (``prepare``) shared by training and registration, and the seamless field."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import phantom, to_image
from SlicerVoxelMorphLib import images, preprocess
from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.preprocess import affine_align, grid_for, level_factor, prepare
from SlicerVoxelMorphLib.register import TAPER_MM, compose
from SlicerVoxelMorphLib.train import load_subject

RAS_DIRECTION = np.diag([-1.0, -1.0, 1.0])


def _storages(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict[str, sitk.Image]:
    """One physical image stored three ways: LPS (identity direction), RAS (i and j flipped), permuted axes."""
    lps = to_image(array, spacing, (-10.0, 4.0, 2.0))
    extent = (np.array(array.shape[::-1]) - 1) * spacing  # (i, j, k) extent in mm
    ras = to_image(np.ascontiguousarray(array[:, ::-1, ::-1]), spacing,
                   (-10.0 + extent[0], 4.0 + extent[1], 2.0), RAS_DIRECTION)
    # array axes (k, j, i) -> (i, j, k): the new index (i', j', k') = (k, j, i)
    permuted_direction = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    permuted = to_image(np.ascontiguousarray(array.transpose(2, 1, 0)), spacing[::-1], (-10.0, 4.0, 2.0),
                        permuted_direction)
    return {"lps": lps, "ras": ras, "permuted": permuted}


def test_storages_are_one_physical_image():
    image, _ = phantom((20, 24, 18))
    stored = _storages(image)
    points = [(-5.0, 10.0, 9.0), (3.3, 20.1, 12.7)]
    for other in ("ras", "permuted"):
        for p in points:
            a = stored["lps"].EvaluateAtPhysicalPoint(p, sitk.sitkLinear)
            b = stored[other].EvaluateAtPhysicalPoint(p, sitk.sitkLinear)
            assert a == pytest.approx(b, abs=1e-3)


def test_prepare_gives_identical_network_input_for_ras_lps_and_permuted_storage():
    image, _ = phantom((20, 24, 18))
    stored = _storages(image)
    outs = {}
    for name, im in stored.items():
        grid = grid_for(im, None, 2.0)
        outs[name] = (grid.GetSize(), grid.GetOrigin(), prepare(im, grid))
    for name in ("ras", "permuted"):
        assert outs[name][0] == outs["lps"][0]
        np.testing.assert_allclose(outs[name][1], outs["lps"][1], atol=1e-6)
        np.testing.assert_allclose(outs[name][2], outs["lps"][2], atol=1e-5)


def test_training_sees_a_ras_stored_subject_as_registration_sees_its_lps_copy(tmp_path):
    image, labels = phantom((32, 32, 32))
    stored = _storages(image)
    ras_labels = _storages(labels.astype(np.int16))["ras"]
    sitk.WriteImage(stored["ras"], str(tmp_path / "ras.nii.gz"))
    sitk.WriteImage(ras_labels, str(tmp_path / "ras_labels.nii.gz"))
    grid = grid_for(stored["lps"], None, 2.0, 0.0, axes=np.eye(3))  # voxel axes along L, P, S
    subject, _ = load_subject(str(tmp_path / "ras.nii.gz"), str(tmp_path / "ras_labels.nii.gz"), [1, 2, 3],
                              grid, 2)
    network_input = torch.nn.functional.avg_pool3d(torch.from_numpy(prepare(stored["lps"], grid))[None, None], 2)
    torch.testing.assert_close(subject.image, network_input, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(subject.labels, labels)  # the LPS array, not the stored RAS one


def test_padding_uses_the_background_level_not_zero():
    # a CT-like image: air at -1000 HU, a water-like body at 0 HU, a bone-like core at 800
    array = np.full((20, 20, 20), -1000.0, np.float32)
    array[4:16, 4:16, 4:16] = 0.0
    array[8:12, 8:12, 8:12] = 800.0
    image = to_image(array)
    grid = images.working_grid(image, np.ones(array.shape, bool), 1.0, 16, margin_mm=8.0)  # beyond the image
    out = prepare(image, grid)
    assert out[0, 0, 0] == 0.0  # outside the image: like air, not like the body (which is ~0.56)
    assert out[grid.GetSize()[2] // 2, grid.GetSize()[1] // 2, grid.GetSize()[0] // 2] == pytest.approx(1.0)


def test_level_factor_accepts_whole_millimetres_only():
    assert level_factor(2.0) == 2
    with pytest.raises(InputError, match="whole multiple"):
        level_factor(1.5)


def test_affine_initialisation_works_on_ct_intensities():
    # moments of raw HU (air -1000 is negative mass) point nowhere; normalised they find the shift
    array = np.full((40, 40, 40), -1000.0, np.float32)
    array[10:30, 12:28, 10:26] = 40.0
    array[14:20, 16:22, 14:20] = 900.0
    fixed = to_image(array)
    moving = to_image(np.roll(array, (4, -2, 3), axis=(0, 1, 2)))  # the body moved by (3, -2, 4) mm in its FOV
    transform = affine_align(fixed, moving, iterations=0)
    matrix = images.affine_matrix(transform)
    np.testing.assert_allclose(matrix[:3, 3], [3.0, -2.0, 4.0], atol=0.5)


def test_composed_field_has_no_seam_at_the_working_grid_border():
    fixed = to_image(np.zeros((100, 100, 100), np.float32))
    # a working grid covering only the middle of the fixed image: 10 coarse voxels of 2 mm, 39.5..59.5 mm
    grid = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    grid.SetSpacing([2.0] * 3)
    grid.SetOrigin([40.5] * 3)
    flow = np.zeros((3, 10, 10, 10), np.float32)
    flow[2] = 1.0  # one coarse voxel = 2 mm along i everywhere
    field = sitk.GetArrayFromImage(compose(flow, grid, sitk.AffineTransform(3), fixed))
    ux = field[..., 0]
    assert ux[50, 50, 50] == pytest.approx(2.0, abs=1e-5)  # inside the grid: the flow
    assert ux[50, 50, 40] == pytest.approx(2.0, abs=0.05)  # just outside: still the edge value
    assert ux[50, 50, 5] == 0.0 and ux[50, 50, 90] == 0.0  # beyond the taper: affine only (identity here)
    steps = np.abs(np.diff(ux, axis=2)).max()
    assert steps < 2.0 * 1.5 / TAPER_MM + 1e-3  # a smooth fade, no jump at the border (was ~1 mm per voxel)


def test_normalise_and_foreground_by_hand():
    from SlicerVoxelMorphLib.preprocess import foreground_mask, normalise

    rng = np.random.default_rng(0)
    body = rng.uniform(100, 200, 1000).astype(np.float32)
    small = np.concatenate([np.zeros(1000, np.float32), body])
    large = np.concatenate([np.zeros(50_000, np.float32), body])  # 50x more empty background
    a, b = normalise(small)[1000:], normalise(large)[50_000:]
    np.testing.assert_allclose(a, b, atol=1e-6)  # the background's amount does not change the scaling
    upper = np.percentile(body, 99.5)
    np.testing.assert_allclose(a, np.clip(body / upper, 0, 1), atol=1e-5)  # 0 -> 0, 99.5th of the rest -> 1
    image = to_image(np.pad(np.full((4, 4, 4), 50.0, np.float32), 3))
    mask = foreground_mask(image)
    assert mask.sum() == 64 and mask[3:7, 3:7, 3:7].all()


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    from SlicerVoxelMorphLib.files import atomic_path

    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (simulated)")])
def test_cuda_out_of_memory_falls_back_to_the_cpu(pair, monkeypatch, error):
    from SlicerVoxelMorphLib import register as pipeline

    paths, _ = pair
    real, calls = pipeline._deform, []

    def once_out_of_memory(*args, **kwargs):
        calls.append(args[6])  # the device
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_deform", once_out_of_memory)
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        result = pipeline.register(fixed, moving, model=None, refine_steps=2, device="cpu")
    assert len(calls) == 2 and str(calls[1]) == "cpu" and result.report["device"] == "cpu"


def test_other_device_errors_are_not_taken_for_lack_of_memory(pair, monkeypatch):
    from SlicerVoxelMorphLib import register as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    monkeypatch.setattr(pipeline, "_deform", broken)
    paths, _ = pair
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pipeline.register(fixed, moving, model=None, refine_steps=2, device="cpu")


def _brain_and_head() -> tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]:
    """A skull-stripped phantom brain (1 mm voxels, margin around it) and the same brain inside a head: a dark
    gap of 6 mm and a bright scalp shell 10 mm thick, as on a T1 with skull; and both regions as (K, J, I) masks."""
    from scipy.ndimage import distance_transform_edt

    image, labels = phantom((80, 88, 72), seed=5)
    brain_image = np.pad(image, 16)
    brain = np.pad(labels > 0, 16)
    distance = distance_transform_edt(~brain)  # mm outside the brain
    shell = (distance > 6) & (distance <= 16)
    head_image = brain_image + shell * float(image.max())
    return to_image(brain_image), to_image(head_image.astype(np.float32)), brain, shell


def test_a_head_against_a_skull_stripped_brain_is_told_by_foreground_volume():
    brain, head, _, _ = _brain_and_head()
    assert preprocess.head_side(brain, head) == "moving"
    assert preprocess.head_side(head, brain) == "fixed"
    assert preprocess.head_side(brain, brain) is None and preprocess.head_side(head, head) is None
    bright_background = float(sitk.GetArrayFromImage(brain).max()) - brain  # an inverted contrast: no head
    assert preprocess.head_side(brain, bright_background) is None


def test_a_brain_is_aligned_to_the_brain_inside_a_head_not_stretched_onto_the_head():
    brain, head, inside, shell = _brain_and_head()
    stretched = images.affine_matrix(preprocess.affine_align(brain, head))  # the metric sees the whole head
    assert np.linalg.det(stretched[:3, :3]) > 1.15
    aligned = preprocess.align(brain, head)
    assert aligned.head_side == "moving" and aligned.fixed_mask is not None
    matrix = images.affine_matrix(aligned.transform)  # the truth is the identity: the same brain, unmoved
    assert abs(np.linalg.det(matrix[:3, :3]) - 1) < 0.05 and np.abs(matrix[:3, 3]).max() < 1.0
    moving_mask = sitk.GetArrayFromImage(aligned.moving_mask) > 0  # the brain's outline, on the head's grid
    assert moving_mask[inside].mean() > 0.95 and moving_mask[shell].mean() < 0.05


def test_registration_masks_the_head_around_a_brain_on_both_paths(tmp_path, capsys):
    """The command line (which aligns while torch loads) and register() both find the head, say so, and keep
    the brain where it is (the pair is the same brain: the labels stay put)."""
    import json

    from SlicerVoxelMorphLib.cli import main
    from SlicerVoxelMorphLib.register import register

    brain, head, inside, _ = _brain_and_head()
    labels = to_image(inside.astype(np.int16))
    paths = {name: str(tmp_path / f"{name}.nii.gz") for name in ("brain", "head", "labels")}
    for name, image in (("brain", brain), ("head", head), ("labels", labels)):
        sitk.WriteImage(image, paths[name])
    assert main(["register", "--fixed", paths["brain"], "--moving", paths["head"], "--fixed-labels", paths["labels"],
                 "--moving-labels", paths["labels"], "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert "shows a head" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["head_masked"] == "moving" and report["mean_dice_after"] > 0.97
    with pytest.warns(RuntimeWarning, match="shows a head"):
        result = register(brain, head, fixed_labels=labels, moving_labels=labels)
    assert result.report["head_masked"] == "moving" and result.report["mean_dice_after"] > 0.97


def test_a_head_and_another_brain_of_the_same_outline_are_not_taken_for_two_scans_of_one_head():
    """The brain outline that masks the head is the other image's own, so outlines always match: the same-head
    check must judge what lies inside them (the same brain scores as one head, another texture does not)."""
    import warnings

    from SlicerVoxelMorphLib.register import register

    brain, head, _, _ = _brain_and_head()
    other_image, _ = phantom((80, 88, 72), seed=6)  # the same outline, another brain inside it
    other = to_image(np.pad(other_image, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for fixed, moving in ((other, head), (head, other)):
            assert not register(fixed, moving, auto_refine=False).report["same_head"]["detected"]
        for fixed, moving in ((brain, head), (head, brain)):
            assert register(fixed, moving, auto_refine=False).report["same_head"]["detected"]


def test_a_working_pair_handed_over_is_taken_as_built():
    """A caller's working pair (built without ``align``) keeps its masks: nothing reports a head masking that
    the network never saw."""
    import warnings

    from SlicerVoxelMorphLib.register import register

    brain, head, inside, _ = _brain_and_head()
    labels = to_image(inside.astype(np.int16))
    working = preprocess.working_pair(brain, head, sitk.AffineTransform(3), preprocess.NETWORK_SPACING_MM)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning about masking a head
        result = register(brain, head, fixed_labels=labels, moving_labels=labels, working=working, auto_refine=False)
    assert "head_masked" not in result.report


def test_a_fixed_slab_is_registered_on_the_part_both_images_show(tmp_path, capsys):
    """The reverse: the fixed image is the middle half of the phantom and the moving one a whole deformed copy; the
    moving image is seen in the fixed one's view only (else the part beyond the cut is squeezed in), reported with
    the share of the moving object inside it; in the view the known deformation is recovered."""
    import json

    from conftest import write_phantom_pair
    from SlicerVoxelMorphLib.cli import main

    paths, field = write_phantom_pair(tmp_path, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                                      amplitude=4.0, field_seed=3, sigma_mm=16.0, phantom_seed=5)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    sitk.WriteImage(sitk.RegionOfInterest(fixed, [48, 48, 24], [0, 0, 12]), str(tmp_path / "slab.nii.gz"))
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(tmp_path / "slab.nii.gz"), "--moving", str(paths["moving"]), "--no-affine",
                 "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    moving_voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["moving_labels"]))) > 0
    # the engine's object is what differs from the background, the count by hand the labelled phantom: 0.80 and 0.83
    assert abs(report["fixed_view_share"] - moving_voxels[12:36].sum() / moving_voxels.sum()) < 0.04
    assert "moving_view_share" not in report
    warning = f"fixed image shows {100 * report['fixed_view_share']:.0f} % of what the moving one"
    assert warning in capsys.readouterr().err
    truth = sitk.GetArrayFromImage(field)[12:36]
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    inside = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"])))[12:36] > 0
    error = np.linalg.norm(found - truth, axis=-1)[inside].mean()
    before = np.linalg.norm(truth, axis=-1)[inside].mean()
    assert error < 0.7 * before, (error, before)  # 0.46 mm against 0.91; without the view 1.08 (worse than none)


def test_a_moving_slab_is_registered_on_the_part_both_images_show(tmp_path, capsys):
    """A moving image that shows a slab of what the fixed one does (the middle half along one axis of a deformed
    copy): the fixed image is seen in the slab's view only (else the slab is stretched onto the whole), the share is
    reported (by hand: the phantom's voxels inside the slab's extent) and a warning says so; in the view the known
    deformation is recovered (default settings: the pair is taken for two scans of one head and refined)."""
    import json

    from conftest import write_phantom_pair
    from SlicerVoxelMorphLib.cli import main

    paths, field = write_phantom_pair(tmp_path, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                                      amplitude=4.0, field_seed=3, sigma_mm=16.0, phantom_seed=5)
    moving = sitk.ReadImage(str(paths["moving"]))
    sitk.WriteImage(sitk.RegionOfInterest(moving, [48, 48, 24], [0, 0, 12]), str(tmp_path / "slab.nii.gz"))
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(paths["fixed"]), "--moving", str(tmp_path / "slab.nii.gz"), "--no-affine",
                 "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    phantom_voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"]))) > 0
    share = phantom_voxels[12:36].sum() / phantom_voxels.sum()
    assert abs(report["moving_view_share"] - share) < 0.03
    assert f"shows {100 * report['moving_view_share']:.0f} % of what the fixed one does" in capsys.readouterr().err
    truth = sitk.GetArrayFromImage(field)
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    target_k = np.arange(48)[:, None, None] + truth[..., 2] / 2.0  # voxel index along k where each point maps
    in_view = phantom_voxels & (target_k > 13) & (target_k < 34)
    error = np.linalg.norm(found - truth, axis=-1)[in_view].mean()
    before = np.linalg.norm(truth, axis=-1)[in_view].mean()
    assert error < 0.7 * before, (error, before)  # 0.52 mm against 0.92; without the view 1.43 (worse than none)


def test_an_image_a_voxel_or_two_off_the_others_view_is_not_taken_for_a_partial_view():
    """The view check runs on 4x4x4 blocks, where a small image shifted by a voxel or two loses whole blocks at
    its edge; the decision stands on the full grid: 99.97 % of the object lies in the other's extent (by hand,
    voxel centres against the extent's faces), so nothing is masked and no share is reported."""
    image, _ = phantom((40, 44, 36), seed=2)
    fixed = to_image(image, spacing=(1.0, 1.1, 0.9), origin=(10.0, -5.0, 3.0))
    moving = to_image(np.roll(image, (2, -1, 2), axis=(0, 1, 2)), spacing=(1.0, 1.1, 0.9), origin=(8.0, -4.0, 5.0))
    points = images.physical_points(moving)[preprocess.object_mask(moving)]
    low = np.array(fixed.GetOrigin()) - 0.5 * np.array(fixed.GetSpacing())
    high = low + np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    assert 0.99 < ((points >= low) & (points <= high)).all(axis=1).mean() < 1  # partly outside, well above 0.98
    assert preprocess.view_share(moving, fixed, sitk.Transform(), None, preprocess.CHECK_SHRINK) \
        < preprocess.FULL_VIEW_SHARE  # the blocks alone would flag it
    assert preprocess._within_view(moving, None, fixed, sitk.Transform()) == (None, None)
