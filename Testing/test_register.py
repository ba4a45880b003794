"""The registration pipeline end to end, against SimpleITK as the independent reference."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import deform, phantom, smooth_field, to_image, write_phantom_pair
from SlicerVoxelMorphLib import images
from SlicerVoxelMorphLib.cli import main
from SlicerVoxelMorphLib.preprocess import foreground_mask, grid_for, working_pair
from SlicerVoxelMorphLib.register import register


def _foreground(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image) > 10


def test_cli_outputs_and_label_warp_reproduced_by_simpleitk(pair, tmp_path):
    paths, _ = pair
    out = tmp_path / "out"
    code = main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                 "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
                 "--model", "none", "--refine", "20", "--quiet", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz",
                     "report.json", "report.png"}
    fixed = sitk.ReadImage(str(paths["fixed"]))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3 and images.same_grid(field, fixed)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    moving_labels = sitk.ReadImage(str(paths["moving_labels"]))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    # independent of ITK's resampling: scipy nearest-neighbour lookup at x + u(x), in moving voxel indices
    from scipy.ndimage import map_coordinates

    points = images.physical_points(fixed) + sitk.GetArrayFromImage(field)
    to_index = np.linalg.inv(images.index_to_physical(moving_labels))
    index = points @ to_index[:3, :3].T + to_index[:3, 3]  # (K, J, I, 3) as (i, j, k)
    looked_up = map_coordinates(sitk.GetArrayFromImage(moving_labels), index[..., ::-1].transpose(3, 0, 1, 2),
                                order=0, mode="constant", cval=0)
    assert (looked_up == theirs).mean() >= 0.999
    warped_again = sitk.Resample(sitk.ReadImage(str(paths["moving"])), fixed, transform, sitk.sitkLinear)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped_again),
                               sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))), atol=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["mean_dice_after"] > report["mean_dice_before"]
    assert [r["label"] for r in report["labels"]] == [1, 2, 3]
    assert report["folding_percent"] == 0.0
    assert set(report["seconds"]) >= {"affine", "refine", "compose", "warp", "metrics", "total"}
    jac = sitk.ReadImage(str(out / "jacobian.nii.gz"))
    assert images.same_grid(jac, fixed)


def test_known_smooth_displacement_is_recovered():
    image, _ = phantom((48, 48, 48), seed=3)
    fixed = to_image(image, (1.0, 1.0, 1.0))
    truth = smooth_field(fixed, amplitude=4.0, seed=4, sigma_mm=8.0)
    moving = deform(fixed, truth, sitk.sitkLinear)
    result = register(fixed, moving, model=None, refine_steps=150, affine=False)
    mask = _foreground(fixed)
    u_true = sitk.GetArrayFromImage(truth)[mask]
    u_found = sitk.GetArrayFromImage(result.displacement)[mask]
    error_before = np.linalg.norm(u_true, axis=1).mean()
    error_after = np.linalg.norm(u_true - u_found, axis=1).mean()
    # measured: mean end-point error 0.44 mm against 0.95 mm mean (4 mm max) true displacement
    assert error_after < 0.5 and error_after < 0.5 * error_before, (error_before, error_after)


def _flip_copy(image: sitk.Image, axis: int) -> sitk.Image:
    """The same physical image stored with voxel axis ``axis`` (0 = i) reversed: no resampling."""
    array = sitk.GetArrayFromImage(image)
    flipped = np.flip(array, axis=2 - axis).copy()
    copy = sitk.GetImageFromArray(flipped)
    copy.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    last = [0, 0, 0]
    last[axis] = image.GetSize()[axis] - 1
    copy.SetOrigin(image.TransformIndexToPhysicalPoint(last))
    direction[:, axis] *= -1
    copy.SetDirection(direction.flatten().tolist())
    return copy


def _permuted_copy(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with voxel axes (i, j, k) -> (j, k, i)."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    copy = sitk.GetImageFromArray(np.transpose(array, (2, 0, 1)).copy())  # new (k', j', i') = (i, k, j)
    spacing = image.GetSpacing()
    copy.SetSpacing((spacing[1], spacing[2], spacing[0]))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    copy.SetDirection(direction[:, [1, 2, 0]].flatten().tolist())
    copy.SetOrigin(image.GetOrigin())
    return copy


@pytest.mark.parametrize("variant", ["flip_i", "flip_j_and_k", "permute", "spacing", "origin"])
def test_same_image_in_another_storage_gives_identity(variant):
    image, _ = phantom((40, 44, 36), seed=5)
    fixed = to_image(image, (1.0, 1.2, 0.9), (3.0, -2.0, 1.0))
    if variant == "flip_i":
        moving = _flip_copy(fixed, 0)
    elif variant == "flip_j_and_k":
        moving = _flip_copy(_flip_copy(fixed, 1), 2)
    elif variant == "permute":
        moving = _permuted_copy(fixed)
    elif variant == "spacing":
        grid = sitk.Image([30, 40, 45], sitk.sitkFloat32)
        grid.SetSpacing((1.4, 1.3, 0.8))
        grid.SetOrigin(fixed.GetOrigin())
        moving = sitk.Resample(fixed, grid, sitk.Transform(), sitk.sitkLinear)
    else:  # a shifted origin with the content moved along: the physical image is the same
        moving = sitk.Image(fixed)
        moving.SetOrigin((3.0 + 0.5, -2.0, 1.0 - 1.8))
        fixed_shifted = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear)
        fixed = fixed_shifted
    result = register(fixed, moving, model=None, refine_steps=20, affine=True)
    mask = _foreground(fixed)
    u = sitk.GetArrayFromImage(result.displacement)[mask]
    assert np.linalg.norm(u, axis=1).mean() < 0.35, np.linalg.norm(u, axis=1).mean()
    warped, f = sitk.GetArrayFromImage(result.warped)[mask], sitk.GetArrayFromImage(fixed)[mask]
    assert np.abs(warped - f).mean() < 0.1 * np.abs(f).mean()


def test_ras_and_lps_storage_of_one_pair_give_one_physical_field_through_the_network(tmp_path):
    """A pair written in RAS storage (axes i, j flipped) is the same physical pair: the bundled network, the
    affine stage and the composition give the same, non-zero field in physical space."""
    from SlicerVoxelMorphLib.models import BUNDLED

    if not BUNDLED.is_file():
        pytest.skip("no bundled model in this checkout")
    image, _ = phantom((36, 40, 32), seed=6)
    fixed = to_image(image, (2.0, 2.0, 2.0), (-20.0, 15.0, 4.0))
    moving = deform(fixed, smooth_field(fixed, amplitude=6.0, seed=8, sigma_mm=16.0), sitk.sitkLinear)
    stored = {}
    for name, im in (("fixed", fixed), ("moving", moving)):
        path = tmp_path / f"{name}_ras.nii.gz"
        sitk.WriteImage(_flip_copy(_flip_copy(im, 0), 1), str(path))
        stored[name] = sitk.ReadImage(str(path))
    assert np.allclose(np.array(stored["fixed"].GetDirection()).reshape(3, 3).diagonal(), [-1, -1, 1])
    lps = register(fixed, moving, model="bundled", auto_refine=False).displacement
    ras = register(stored["fixed"], stored["moving"], model="bundled", auto_refine=False).displacement
    u_lps = sitk.GetArrayFromImage(lps)
    u_ras = sitk.GetArrayFromImage(ras)[:, ::-1, ::-1]  # back to the LPS voxel order; vectors are LPS in both
    mask = _foreground(fixed)
    assert np.linalg.norm(u_lps[mask], axis=1).mean() > 0.5  # a real field, not zero by construction
    assert np.abs(u_lps - u_ras)[mask].max() < 0.05


def test_affine_part_is_found_and_composed():
    """A pure affine misalignment is recovered by the affine stage and lands in the one field."""
    image, _ = phantom((48, 48, 48), seed=7)
    fixed = to_image(image)
    truth = sitk.AffineTransform(3)
    truth.SetMatrix([1.05, 0.03, 0.0, -0.02, 0.97, 0.0, 0.0, 0.02, 1.0])
    truth.SetTranslation((1.5, -1.0, 2.0))
    truth.SetCenter((24.0, 24.0, 24.0))
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear)
    result = register(fixed, moving, model=None, refine_steps=0, affine=True)
    mask = _foreground(fixed)
    points = images.physical_points(fixed)
    matrix = images.affine_matrix(truth)  # moving(T(x)) = fixed(x): the field must be T(x) - x
    expected = points @ matrix[:3, :3].T + matrix[:3, 3] - points
    error = np.linalg.norm(sitk.GetArrayFromImage(result.displacement)[mask] - expected[mask], axis=1).mean()
    assert error < 0.6, error  # the affine stage runs on one 3 mm level here (48 mm phantom, shrunk 3x)


def test_inputs_are_not_modified(pair):
    paths, _ = pair
    fixed = sitk.ReadImage(str(paths["fixed"]))
    moving = sitk.ReadImage(str(paths["moving"]))
    before = (sitk.GetArrayFromImage(fixed).copy(), sitk.GetArrayFromImage(moving).copy(), moving.GetOrigin())
    register(fixed, moving, model=None, refine_steps=2)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed), before[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving), before[1])
    assert moving.GetOrigin() == before[2]


def test_bundled_network_path_of_the_cli_improves_a_phantom_pair(tmp_path):
    """A phantom and a deformed copy of it are two scans of one head: the default model hands them to the bundled
    same-head network, whose result alone (safety net off) improves the labels' overlap."""
    from SlicerVoxelMorphLib.models import BUNDLED, read_model_file, same_head_model

    if not BUNDLED.is_file() or same_head_model("bundled") is None:
        pytest.skip("no bundled models in this checkout")
    # a head-sized phantom (150 x 160 x 130 mm at 2 mm) and a copy under a smooth 10 mm field
    paths, _ = write_phantom_pair(tmp_path, (65, 80, 75), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), amplitude=10.0,
                                  field_seed=2, sigma_mm=20.0, phantom_seed=3)
    out = tmp_path / "net"
    code = main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                 "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
                 "--no-auto-refine", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    record = read_model_file(same_head_model("bundled"))
    assert report["same_head"]["detected"] and report["model_sha256"] == record["sha256"]
    assert "refinement" not in report and report["refine_steps"] == 0
    # the working grid is the model's: whole multiples of 16 voxels at its spacing
    assert all(n % (16 * round(record["spacing_mm"])) == 0 for n in report["working_grid"]["size"])
    assert report["mean_dice_after"] > report["mean_dice_before"] + 0.01, report["mean_dice_after"]
    assert report["folding_percent"] < 0.1


@pytest.mark.parametrize("stage", ["affine", "refine"])
def test_cancelling_during_a_stage_stops_the_registration(pair, stage):
    from SlicerVoxelMorphLib.errors import Cancelled

    paths, _ = pair
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    seen = []

    def progress(name: str, fraction: float) -> None:
        seen.append(name)
        if name == stage and 0 < fraction < 1:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        register(fixed, moving, model=None, refine_steps=30, progress=progress)
    assert seen[-1] == stage and "compose" not in seen


def test_cancelling_the_affine_stage_stops_its_optimiser_at_once(pair, monkeypatch):
    from SlicerVoxelMorphLib.errors import Cancelled

    paths, _ = pair
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    iterations = []
    add_command = sitk.ImageRegistrationMethod.AddCommand

    def counting(method, event, callback):  # counts the optimiser's iteration events
        return add_command(method, event, lambda: (iterations.append(1), callback()))

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "AddCommand", counting)

    def progress(name: str, fraction: float) -> None:
        if name == "affine" and 0 < fraction < 1:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        register(fixed, moving, model=None, progress=progress)
    assert len(iterations) <= 2  # the first iteration cancels; StopRegistration ends the optimisation there


def test_warped_volume_outside_the_moving_image_has_its_background_value():
    image, _ = phantom((40, 44, 36), seed=3)
    ct = image * 1000.0 - 1000.0  # air at -1000 HU
    fixed = to_image(ct)
    moving = to_image(ct[4:-4], origin=(0.0, 0.0, 4.0))  # 8 slices shorter: the fixed grid reaches beyond it
    result = register(fixed, moving, model=None, affine=False, auto_refine=False)
    warped = sitk.GetArrayFromImage(result.warped)
    assert warped[0].max() == pytest.approx(-1000.0) and warped[-1].max() == pytest.approx(-1000.0)


def test_a_moving_mask_hiding_a_lesion_keeps_the_field_of_the_lesion_free_pair():
    image, _ = phantom((40, 44, 36), seed=9)
    fixed = to_image(image)
    moving = deform(fixed, smooth_field(fixed, amplitude=3.0, seed=6), sitk.sitkLinear)
    k, j, i = np.mgrid[0:40, 0:44, 0:36]
    blob = (k - 20) ** 2 + (j - 24) ** 2 + (i - 14) ** 2 <= 16  # a 4-voxel lesion inside the object
    lesion = sitk.GetArrayFromImage(moving)
    lesion[blob] = 3 * lesion.max()
    with_lesion = to_image(lesion)
    hide = to_image((~((k - 20) ** 2 + (j - 24) ** 2 + (i - 14) ** 2 <= 25)).astype(np.uint8))
    settings = {"model": None, "refine_steps": 40, "affine": False}

    def field(moving_image, mask=None):
        return sitk.GetArrayFromImage(register(fixed, moving_image, moving_mask=mask, **settings).displacement)

    r2 = (k - 20) ** 2 + (j - 24) ** 2 + (i - 14) ** 2
    around = (r2 > 25) & (r2 <= 100) & _foreground(fixed)  # just outside the hidden region
    pulled = np.linalg.norm(field(with_lesion) - field(moving), axis=-1)
    assert pulled[around].mean() > 0.1  # without a mask the lesion pulls the field around it ...
    hidden = np.linalg.norm(field(with_lesion, hide) - field(moving, hide), axis=-1)
    assert hidden[around].mean() < 0.2 * pulled[around].mean()  # ... with it, the lesion hardly matters
    assert hidden[_foreground(fixed)].mean() < 0.05


def test_a_given_affine_is_used_instead_of_the_affine_stage():
    array, _ = phantom()
    fixed = to_image(array, spacing=(1.0, 1.1, 0.9), origin=(10.0, -5.0, 3.0))
    given = sitk.AffineTransform(3)
    given.SetMatrix([1.05, 0.02, 0.0, -0.03, 0.98, 0.0, 0.0, 0.01, 1.0])
    given.SetTranslation((1.5, -2.0, 0.7))
    given.SetCenter((30.0, 20.0, 18.0))
    result = register(fixed, fixed, model="none", affine_transform=given, auto_refine=False)
    points = images.physical_points(fixed)
    expected = np.array([given.TransformPoint(p) for p in points.reshape(-1, 3)]).reshape(points.shape) - points
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.displacement), expected, atol=1e-4)
    assert result.report["affine_matrix_lps"] == images.affine_matrix(given).round(6).tolist()


def test_a_working_pair_brings_its_affine_and_is_rebuilt_for_another_network_spacing():
    array, _ = phantom()
    fixed = to_image(array, spacing=(1.0, 1.1, 0.9), origin=(10.0, -5.0, 3.0))
    given = sitk.AffineTransform(3)
    given.SetTranslation((1.5, -2.0, 0.7))
    stale = working_pair(fixed, fixed, given, 8.0)  # sized for an 8 mm network level; no model works at 2 mm
    expected = grid_for(fixed, foreground_mask(fixed), 2.0)
    assert stale.grid.GetSize() != expected.GetSize()
    result = register(fixed, fixed, model="none", working=stale, auto_refine=False, refine_steps=1)
    assert result.report["working_grid"]["size"] == list(expected.GetSize())
    assert result.report["affine_matrix_lps"] == images.affine_matrix(given).round(6).tolist()


@pytest.mark.parametrize("settings,words", [
    ({"refine_steps": -3}, ("refine", "-3")),
    ({"similarity": "foo", "refine_steps": 1}, ("similarity", "foo")),
    ({"fixed_points": np.zeros((2, 2)), "moving_points": np.zeros((2, 2))}, ("landmarks", "3")),
    ({"fixed_points": np.full((1, 3), np.nan), "moving_points": np.zeros((1, 3))}, ("landmarks", "finite")),
])
def test_the_python_api_refuses_bad_settings_with_input_errors(pair, settings, words):
    from SlicerVoxelMorphLib.errors import InputError

    paths, _ = pair
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    with pytest.raises(InputError) as error:
        register(fixed, moving, model=None, **settings)
    assert all(word in str(error.value) for word in words), error.value
