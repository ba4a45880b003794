"""Anatomical orientation: the rotation a header hides is found, a header that is right or an object that is no
brain is left alone, and the network's view of a brain does not depend on its header."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from conftest import SHARED, phantom, to_image
from SlicerVoxelMorphLib.orientation import ROTATIONS, AnatomyOrientation, mutual_information
from SlicerVoxelMorphLib.orientation import turned_header as turned
from SlicerVoxelMorphLib.preprocess import NETWORK_AXES, grid_for, prepare

nilearn = pytest.importorskip("nilearn.datasets")


@pytest.fixture(scope="module")
def brain() -> sitk.Image:
    """MNI152 (the template's source) made unlike the template: 2.5 x 2 x 3 mm, a smaller brain (x 0.9), shifted
    by 20 mm, a T2-like contrast (dark white matter, bright CSF), a bias field and noise."""
    mni = sitk.ReadImage(str(nilearn.MNI152_FILE_PATH), sitk.sitkFloat32)
    grid = sitk.Image([64, 90, 54], sitk.sitkFloat32)
    grid.SetSpacing((2.5, 2.0, 3.0))
    grid.SetOrigin((-80.0, -110.0, -60.0))
    shrink = sitk.AffineTransform(3)
    shrink.SetMatrix((np.eye(3) / 0.9).flatten().tolist())
    shrink.SetTranslation((0.0, 20.0, 0.0))
    array = sitk.GetArrayFromImage(sitk.Resample(mni, grid, shrink, sitk.sitkLinear, 0.0))
    array = array / np.percentile(array, 99.5)
    t2 = np.where(array > 0.05, 1.2 - array, 0.0)  # white matter darkest, CSF brightest, background black
    k, _, i = np.indices(array.shape) / np.array(array.shape)[:, None, None, None]
    rng = np.random.default_rng(3)
    noisy = t2 * (1 + 0.3 * (i - 0.5) + 0.2 * (k - 0.5)) + rng.normal(0, 0.03, array.shape)
    return to_image(noisy.astype(np.float32), grid.GetSpacing(), grid.GetOrigin())


def test_mutual_information_matches_the_joint_histogram_definition():
    rng = np.random.default_rng(5)
    a = rng.random(20000) * 1.2 - 0.1  # values beyond [0, 1] count in the end bins
    b = np.clip(a + rng.normal(0, 0.2, a.size), -0.5, 1.5)
    a[:3], b[:3] = (0.0, 1.0, 0.5), (1.0, 0.0, 1.0)  # the edges of the range
    joint, _, _ = np.histogram2d(np.clip(a, 0, 1), np.clip(b, 0, 1), bins=24, range=[[0, 1]] * 2)
    p = joint / joint.sum()
    outer = p.sum(1)[:, None] * p.sum(0)[None, :]
    seen = p > 0
    assert mutual_information(a, b) == pytest.approx(float((p[seen] * np.log(p[seen] / outer[seen])).sum()), abs=1e-12)
    levels = np.repeat([0.1, 0.3, 0.6, 0.9], 1000)  # an image against itself: its entropy, log 4 for 4 even levels
    assert mutual_information(levels, levels) == pytest.approx(np.log(4), abs=1e-12)
    assert mutual_information(levels, np.full(levels.shape, 0.5)) == pytest.approx(0.0, abs=1e-12)


def test_the_24_rotations_map_axes_onto_axes_once_each():
    assert len(ROTATIONS) == 24 and np.array_equal(ROTATIONS[0], np.eye(3))
    for rotation in ROTATIONS:
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3))
        assert np.linalg.det(rotation) == pytest.approx(1.0) and set(np.abs(rotation).sum(0)) == {1.0}
    assert len({rotation.tobytes() for rotation in ROTATIONS}) == 24


def test_a_right_header_stands(brain):
    found = AnatomyOrientation().execute(brain)
    assert found.header_is_right and found.match > 1.1 * found.runner_up


@pytest.mark.parametrize("which", [3, 7, 12, 21])
def test_the_rotation_a_header_hides_is_found(brain, which):
    rotation = ROTATIONS[which]
    found = AnatomyOrientation().execute(turned(brain, rotation))
    np.testing.assert_array_equal(found.rotation, rotation)
    np.testing.assert_array_equal(found.working_axes(), rotation @ NETWORK_AXES)


def test_an_object_that_is_no_brain_keeps_its_header():
    rng = np.random.default_rng(0)
    k, j, i = np.indices((60, 60, 60)) - 29.5
    ellipsoid = ((i / 25) ** 2 + (j / 28) ** 2 + (k / 22) ** 2 < 1) * (1 + gaussian_filter(rng.normal(size=k.shape), 2))
    objects = [to_image(ellipsoid.astype(np.float32), (2.5, 2.5, 2.5))]  # a brain's size, no brain's shape
    objects += [to_image(phantom((40, 44, 36), seed)[0]) for seed in range(4)]  # small, lopsided
    for image in objects:
        for rotation in ROTATIONS[:3]:
            assert AnatomyOrientation().execute(turned(image, rotation)).header_is_right


def test_the_network_sees_a_brain_the_same_whatever_its_header_says(brain):
    """The working grid follows the anatomy: a turned header gives the same network input, voxel for voxel."""
    views = []
    for rotation in (np.eye(3), ROTATIONS[3], ROTATIONS[12]):
        image = turned(brain, rotation)
        axes = AnatomyOrientation().execute(image).working_axes()
        grid = grid_for(image, None, 2.0, axes=axes)
        views.append(prepare(image, grid))
    for view in views[1:]:
        assert view.shape == views[0].shape
        np.testing.assert_allclose(view, views[0], atol=1e-4)


def quadrant_labels(image: sitk.Image) -> sitk.Image:
    """The brain's voxels labelled by quadrant (left/right x anterior/posterior of its centre): labels that only
    overlap when the anatomy is aligned the right way round, not mirrored or turned."""
    array = sitk.GetArrayFromImage(image)
    inside = array > 0.1 * array.max()
    points = np.stack(np.nonzero(inside), -1)
    centre = points.mean(0)
    _, j, i = np.indices(array.shape)
    labels = (1 + (i > centre[2]) + 2 * (j > centre[1])) * inside
    out = sitk.GetImageFromArray(labels.astype(np.int16))
    out.CopyInformation(image)
    return out


def test_a_moving_brain_whose_header_is_turned_against_the_fixed_ones_is_aligned_from_that_turn(brain):
    """The moving brain under a header turned by 180 degrees about S-I (LPBA40's against a right one): the affine
    starts from the turn the two anatomies show, and the pair registers as well as with agreeing headers."""
    from conftest import deform, smooth_field
    from SlicerVoxelMorphLib.register import register

    labels = quadrant_labels(brain)
    field = smooth_field(brain, amplitude=4.0, seed=2, sigma_mm=15.0)
    moving, moving_labels = deform(brain, field, sitk.sitkLinear), deform(labels, field, sitk.sitkNearestNeighbor)
    dice = {}
    for name, rotation in (("agreeing", np.eye(3)), ("turned", ROTATIONS[3])):
        result = register(brain, turned(moving, rotation), fixed_labels=labels,
                          moving_labels=turned(moving_labels, rotation), auto_refine=False)
        dice[name] = result.report["mean_dice_after"]
        turn = result.report["orientation"]["moving_turn_lps"]
        assert (turn is None) == (name == "agreeing") and (turn is None or np.allclose(turn, rotation))
    assert dice["turned"] > 0.9 and dice["turned"] == pytest.approx(dice["agreeing"], abs=0.01), dice


def test_training_sees_a_brain_the_same_way_round_whatever_its_header_says(brain, tmp_path):
    """One path: the training grid follows the first image's anatomy as registration's does, so the network is
    shown the same voxels for training data stored under a right and under a turned header."""
    import torch

    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    labels = quadrant_labels(brain)
    seen = {}
    for name, rotation in (("right", np.eye(3)), ("turned", ROTATIONS[3])):
        folder = tmp_path / name
        folder.mkdir()
        paths = []
        for n, (image, label_map) in enumerate(((brain, labels), (brain * 0.9, labels))):
            paths.append((str(folder / f"s{n}.nii.gz"), str(folder / f"s{n}_labels.nii.gz")))
            sitk.WriteImage(turned(image, rotation), paths[-1][0])
            sitk.WriteImage(turned(label_map, rotation), paths[-1][1])
        config = TrainConfig(images=[p[0] for p in paths], labels=[p[1] for p in paths], iterations=1)
        trainer = Trainer(config, folder / "run", torch.device("cpu"))
        np.testing.assert_array_equal(np.array(trainer.grid.GetDirection()).reshape(3, 3), rotation @ NETWORK_AXES)
        seen[name] = trainer.train_subjects[0]
    torch.testing.assert_close(seen["turned"].image, seen["right"].image, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(seen["turned"].labels, seen["right"].labels)


def _centre(image: sitk.Image, labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """World centre (LPS mm) of the voxels carrying ``ids``."""
    k, j, i = np.nonzero(np.isin(labels, ids))
    return np.array(image.TransformContinuousIndexToPhysicalPoint([i.mean(), j.mean(), k.mean()]))


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/LPBA40")
def test_lpba40_brains_are_found_where_their_labels_put_the_anatomy():
    """LPBA40 as provided stores R, A, S under an L, P, S header (its labels say so: the frontal gyri lie at +y,
    the left ones at -x); found as stored and under a header that tells the anatomy right."""
    labels_of = SHARED / "label" / "{}.delineation.structure.label.nii.gz"
    for image_path, label_path in ((SHARED / "fixed.nii.gz", str(labels_of).format("S01")),
                                   (SHARED / "train" / "S35.delineation.skullstripped.nii.gz",
                                    str(labels_of).format("S35"))):
        image, labels = sitk.ReadImage(str(image_path)), sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        frontal, occipital = (_centre(image, labels, ids) for ids in ([21, 22], [61, 62]))  # superior gyri
        left, right = (_centre(image, labels, ids) for ids in ([21, 61], [22, 62]))
        assert frontal[1] > occipital[1] + 50 and left[0] < right[0] - 10  # anterior at +y, left at -x
        stored = AnatomyOrientation().execute(image)
        np.testing.assert_array_equal(stored.rotation, np.diag([-1.0, -1.0, 1.0]))
        assert AnatomyOrientation().execute(turned(image, stored.rotation.T)).header_is_right
