"""Geometry: IJK/RAS/LPS conversions against nibabel, Jacobians against known affine maps."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from SlicerVoxelMorphLib import images, metrics

ROTATED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def test_ijk_to_ras_matches_nibabel_affine(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    image.SetSpacing((0.7, 1.2, 2.5))
    image.SetOrigin((3.0, -4.0, 5.0))
    image.SetDirection(ROTATED.flatten().tolist())
    path = tmp_path / "x.nii.gz"
    sitk.WriteImage(image, str(path))
    np.testing.assert_allclose(images.ijk_to_ras(image), nib.load(path).affine, atol=1e-5)


def test_image_from_array_round_trip_keeps_geometry_and_voxels():
    rng = np.random.default_rng(0)
    array = rng.random((4, 5, 6)).astype(np.float32)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = ROTATED @ np.diag([0.7, 1.2, 2.5])
    ijk_to_ras[:3, 3] = [1.0, 2.0, 3.0]
    image = images.image_from_array(array, ijk_to_ras)
    np.testing.assert_allclose(images.ijk_to_ras(image), ijk_to_ras, atol=1e-12)
    np.testing.assert_array_equal(images.array_kji(image), array)
    # a voxel's RAS point from Slicer's matrix is the LPS point of SimpleITK with x, y negated
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))
    ras = ijk_to_ras @ [1.0, 2.0, 3.0, 1.0]
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-12)


def test_physical_points_match_simpleitk():
    image = sitk.Image([5, 4, 3], sitk.sitkFloat32)
    image.SetSpacing((0.5, 2.0, 1.5))
    image.SetOrigin((1.0, -2.0, 7.0))
    image.SetDirection(ROTATED.flatten().tolist())
    points = images.physical_points(image)
    for k, j, i in [(0, 0, 0), (2, 3, 4), (1, 2, 0)]:
        np.testing.assert_allclose(points[k, j, i], image.TransformIndexToPhysicalPoint((i, j, k)), atol=1e-12)


def test_voxel_flow_to_physical_uses_direction_and_spacing():
    image = sitk.Image([3, 3, 3], sitk.sitkFloat32)
    image.SetSpacing((2.0, 3.0, 4.0))
    image.SetDirection(ROTATED.flatten().tolist())
    flow = np.zeros((3, 3, 3, 3))
    flow[2] = 1.0  # one voxel along i (channels are dk, dj, di)
    expected = ROTATED @ [2.0, 0.0, 0.0]
    np.testing.assert_allclose(images.voxel_flow_to_physical(flow, image)[1, 1, 1], expected)


def test_jacobian_of_affine_field_is_its_determinant():
    a = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]])
    image = sitk.Image([9, 8, 7], sitk.sitkFloat32)
    image.SetSpacing((1.5, 0.8, 2.0))
    image.SetDirection(ROTATED.flatten().tolist())
    image.SetOrigin((4.0, 5.0, -6.0))
    x = images.physical_points(image)
    u = x @ (a - np.eye(3)).T + [1.0, -2.0, 0.5]
    det = metrics.jacobian_determinant(u, images.index_to_physical(image)[:3, :3])
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-5)


def test_affine_field_equals_matrix_on_points():
    image = sitk.Image([4, 3, 5], sitk.sitkFloat32)
    image.SetSpacing((1.0, 2.0, 0.5))
    image.SetDirection(ROTATED.flatten().tolist())
    m = np.eye(4)
    m[:3] = [[1.0, 0.1, 0.0, 3.0], [0.0, 1.1, 0.2, -1.0], [0.3, 0.0, 0.9, 2.0]]
    expected = images.physical_points(image) @ m[:3, :3].T + m[:3, 3]
    np.testing.assert_allclose(images.affine_field(m, image), expected, atol=1e-12)


def test_affine_matrix_maps_points_like_simpleitk():
    t = sitk.AffineTransform(3)
    t.SetMatrix([1.1, 0.1, 0.0, 0.0, 0.9, 0.2, 0.1, 0.0, 1.0])
    t.SetCenter((5.0, -3.0, 2.0))
    t.SetTranslation((1.0, 2.0, -1.0))
    m = images.affine_matrix(t)
    for p in [(0.0, 0.0, 0.0), (10.0, -4.0, 7.5)]:
        np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], t.TransformPoint(p), atol=1e-12)


@pytest.mark.parametrize("joint_limit", [1 << 22, 1])  # one joint histogram, or per-map counts (many labels)
def test_dice_hand_values(joint_limit, monkeypatch):
    monkeypatch.setattr(metrics, "JOINT_LIMIT", joint_limit)
    a = np.array([0, 1, 1, 2, 2, 2, 3])
    b = np.array([0, 1, 2, 2, 2, 0, 0])
    d = metrics.dice(a, b, [1, 2, 3, 4])
    assert d[1] == 2 * 1 / 3
    assert d[2] == 2 * 2 / 6
    assert d[3] == 0.0
    assert np.isnan(d[4])


def test_folding_and_log_jacobian_statistics():
    det = np.array([1.0, -0.5, 2.0, 0.0])
    mask = np.array([True, True, True, False])
    assert metrics.folding_percent(det, mask) == 100 / 3
    assert abs(metrics.std_log_jacobian(np.array([1.0, np.e]), np.array([True, True])) - 0.5) < 1e-9


def test_downsampled_grid_centres_match_average_pooling():
    image = sitk.Image([8, 6, 4], sitk.sitkFloat32)
    image.SetSpacing((1.0, 0.5, 2.0))
    image.SetOrigin((3.0, 1.0, -2.0))
    image.SetDirection(ROTATED.flatten().tolist())
    coarse = images.downsampled_grid(image, 2)
    assert coarse.GetSize() == (4, 3, 2)
    # coarse voxel (1, 2, 1) averages fine voxels 2..3, 4..5, 2..3: its centre is their mean
    fine = [image.TransformContinuousIndexToPhysicalPoint((2.5, 4.5, 2.5))]
    np.testing.assert_allclose(coarse.TransformIndexToPhysicalPoint((1, 2, 1)), fine[0], atol=1e-12)
    np.testing.assert_allclose(images.index_in(coarse, image)[2, 4, 2], [(2 - 0.5) / 2, (4 - 0.5) / 2,
                                                                        (2 - 0.5) / 2], atol=1e-12)


def test_written_gzip_images_read_back_exactly_at_every_level(tmp_path):
    import gzip

    from SlicerVoxelMorphLib.images import write_image

    field = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 7, 8, 3)).astype(np.float32), isVector=True)
    field.SetSpacing((1.0, 2.0, 3.0))
    field.SetOrigin((4.0, 5.0, 6.0))
    for level in (0, 1, 9):
        path = tmp_path / f"field{level}.nii.gz"
        write_image(field, path, level)
        with gzip.open(path) as f:
            f.read(348)  # a valid gzip stream holding a NIfTI header
        back = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field))
        assert back.GetSpacing() == field.GetSpacing() and back.GetOrigin() == field.GetOrigin()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field0.nii.gz", "field1.nii.gz", "field9.nii.gz"]


@pytest.mark.parametrize("slab_voxels", [2_000_000, 6000])  # one slab; seven slabs of 4 slices and one of 2
def test_float32_composition_agrees_with_float64_within_a_hundredth_of_a_millimetre(monkeypatch, slab_voxels):
    from SlicerVoxelMorphLib import register
    from SlicerVoxelMorphLib.register import compose

    monkeypatch.setattr(register, "SLAB_VOXELS", slab_voxels)

    rng = np.random.default_rng(1)
    fixed = sitk.Image([40, 36, 30], sitk.sitkFloat32)
    fixed.SetSpacing((0.9, 1.1, 1.3))
    fixed.SetOrigin((-120.0, 95.0, 40.0))
    angle = 0.3
    fixed.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    grid = images.working_grid(fixed, np.ones((30, 36, 40), bool), 2.0, 4)
    flow = rng.normal(0, 1.5, (3, *grid.GetSize()[::-1])).astype(np.float32)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.04, 0.05, -0.02, -0.03, 0.97, 0.04, 0.02, -0.01, 1.02))
    affine.SetTranslation((3.0, -4.0, 2.5))
    affine.SetCenter((-100.0, 110.0, 60.0))
    got = sitk.GetArrayFromImage(compose(flow, grid, affine, fixed)).astype(np.float64)
    # float64 reference: A (x + d(x)) + b - x with d sampled by SimpleITK's linear interpolation
    vectors = images.voxel_flow_to_physical(flow.astype(np.float64), grid)
    d_image = images.displacement_image(vectors, grid)
    points = images.physical_points(fixed)
    index = images.index_in(grid, fixed)
    inside = np.all((index >= 0) & (index <= np.array(grid.GetSize()) - 1), axis=-1)
    matrix = images.affine_matrix(affine)
    for p, idx in zip(points[inside][::97], index[inside][::97], strict=True):
        d = np.array(d_image.EvaluateAtContinuousIndex(idx.tolist(), sitk.sitkLinear))
        expected = matrix[:3, :3] @ (p + d) + matrix[:3, 3] - p
        k, j, i = np.argwhere(np.all(points == p, axis=-1))[0]
        np.testing.assert_allclose(got[k, j, i], expected, atol=0.01)


def test_dice_and_counts_with_huge_sparse_label_ids():
    a = np.zeros((4, 4, 4), np.int64)
    b = np.zeros((4, 4, 4), np.int64)
    a[0] = 600_000_000
    b[0, :2] = 600_000_000
    a[1, 0, 0] = b[1, 0, 0] = 7
    result = metrics.dice(a, b, [7, 600_000_000])
    assert result[7] == 1.0
    assert result[600_000_000] == pytest.approx(2 * 8 / (16 + 8))
    assert metrics.label_counts(a, [7, 600_000_000]) == {7: 1, 600_000_000: 16}
    assert metrics.label_counts(a, [5]) == {5: 0}


def test_working_grid_covers_the_mask_with_margin_in_whole_multiples():
    image = sitk.Image([50, 60, 40], sitk.sitkFloat32)
    image.SetSpacing((0.8, 1.0, 1.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    mask = np.zeros((40, 60, 50), bool)
    mask[10:20, 15:45, 5:30] = True  # k, j, i
    grid = images.working_grid(image, mask, 1.0, 16, margin_mm=4.0)
    size = np.array(grid.GetSize())
    assert (size % 16 == 0).all() and grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    low = np.array([10.0 + 0.8 * 4.5, -20.0 + 14.5, 5.0 + 1.5 * 9.5]) - 4.0  # mask bounds (voxel edges) - margin
    high = np.array([10.0 + 0.8 * 29.5, -20.0 + 44.5, 5.0 + 1.5 * 19.5]) + 4.0
    first = np.array(grid.GetOrigin()) - 0.5
    last = np.array(grid.TransformIndexToPhysicalPoint([int(n - 1) for n in size])) + 0.5
    assert (first <= low + 1e-9).all() and (last >= high - 1e-9).all()  # covered
    np.testing.assert_allclose((first + last) / 2, (low + high) / 2, atol=1e-9)  # centred
    assert ((last - first) - (high - low) < 16).all()  # no more than one extra multiple


def test_working_grid_along_other_axes_covers_the_mask_in_its_own_frame():
    image = sitk.Image([50, 60, 40], sitk.sitkFloat32)
    image.SetSpacing((0.8, 1.0, 1.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    mask = np.zeros((40, 60, 50), bool)
    mask[10:20, 15:45, 5:30] = True
    axes = ROTATED  # columns: the grid's i along world +y, j along -x, k along -z
    grid = images.working_grid(image, mask, 1.0, 16, margin_mm=4.0, direction=axes)
    np.testing.assert_allclose(np.array(grid.GetDirection()).reshape(3, 3), axes)
    low = np.array([10.0 + 0.8 * 4.5, -20.0 + 14.5, 5.0 + 1.5 * 9.5]) - 4.0  # world box, as in the test above
    high = np.array([10.0 + 0.8 * 29.5, -20.0 + 44.5, 5.0 + 1.5 * 19.5]) + 4.0
    size = np.array(grid.GetSize())
    assert (size % 16 == 0).all()
    # the grid's extent along world x, y, z: its voxel edges on the axes i, j, k point along (y, -x, -z)
    corners = np.array([grid.TransformContinuousIndexToPhysicalPoint([a, b, c]) for a in (-0.5, size[0] - 0.5)
                        for b in (-0.5, size[1] - 0.5) for c in (-0.5, size[2] - 0.5)])
    first, last = corners.min(0), corners.max(0)
    assert (first <= low + 1e-9).all() and (last >= high - 1e-9).all()
    np.testing.assert_allclose((first + last) / 2, (low + high) / 2, atol=1e-9)
    extent = high - low  # world x, y, z; the grid's i, j, k run along y, x, z
    np.testing.assert_array_equal(size, np.ceil(extent[[1, 0, 2]] / 16).astype(int) * 16)


def test_jacobian_of_a_smooth_field_matches_simpleitk_inside():
    image = sitk.Image([14, 12, 10], sitk.sitkFloat32)
    image.SetSpacing((1.5, 0.8, 2.0))
    x = images.physical_points(image)
    u = np.stack([2 * np.sin(x[..., 0] / 4) + np.sin(x[..., 1] / 3), 0.005 * x[..., 0] * x[..., 2],
                  np.cos(x[..., 0] / 5)], -1)
    det = metrics.jacobian_determinant(u, images.index_to_physical(image)[:3, :3])
    field = images.displacement_image(u, image)
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], reference[1:-1, 1:-1, 1:-1], rtol=1e-4)
    assert np.ptp(det) > 0.3  # the field is far from affine: the check is not vacuous


@pytest.mark.parametrize("slab", [2, 8])  # slabs of 2 slices: slab edges inside the volume of 5
def test_jacobian_matches_numpy_gradient_everywhere_on_a_rotated_grid(slab):
    image = sitk.Image([7, 6, 5], sitk.sitkFloat32)
    image.SetSpacing((1.5, 0.8, 2.0))
    image.SetDirection(ROTATED.flatten().tolist())
    rng = np.random.default_rng(3)
    u = rng.normal(0, 0.3, (5, 6, 7, 3))
    linear = images.index_to_physical(image)[:3, :3]
    by_index = np.stack([np.stack(np.gradient(u[..., a], axis=(2, 1, 0)), -1) for a in range(3)], -2)
    expected = np.linalg.det(np.eye(3) + by_index @ np.linalg.inv(linear))  # d u / d x = d u / d index . d index / d x
    det = metrics.jacobian_determinant(u, linear, slab)
    np.testing.assert_allclose(det, expected, rtol=1e-4, atol=1e-5)  # borders (one-sided) included


def test_jacobian_on_an_oblique_grid_matches_numpy_gradient():
    angle = 0.4
    oblique = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    linear = oblique @ np.diag([1.5, 0.8, 2.0])
    u = np.random.default_rng(8).normal(0, 0.3, (5, 6, 7, 3))
    by_index = np.stack([np.stack(np.gradient(u[..., a], axis=(2, 1, 0)), -1) for a in range(3)], -2)
    expected = np.linalg.det(np.eye(3) + by_index @ np.linalg.inv(linear))
    np.testing.assert_allclose(metrics.jacobian_determinant(u, linear), expected, rtol=1e-4, atol=1e-5)


def test_warping_on_the_field_grid_equals_resampling_through_the_field_transform():
    field_grid = sitk.Image([14, 12, 10], sitk.sitkFloat32)
    field_grid.SetSpacing((1.5, 0.8, 2.0))
    field_grid.SetDirection(ROTATED.flatten().tolist())
    field_grid.SetOrigin((3.0, -2.0, 1.0))
    rng = np.random.default_rng(5)
    u = rng.normal(0, 1.5, (10, 12, 14, 3)) + np.array([2.0, 0.0, 0.0])  # some points fall outside the moving image
    field = images.displacement_image(u, field_grid, np.float32)
    moving = sitk.GetImageFromArray(rng.uniform(0, 1, (11, 13, 17)).astype(np.float32))
    moving.SetSpacing((1.2, 1.1, 1.3))
    moving.SetDirection(ROTATED.flatten().tolist())
    moving.SetOrigin((3.0, -2.0, 1.0))
    labels = sitk.GetImageFromArray(rng.integers(0, 5, (11, 13, 17)).astype(np.int32))
    labels.CopyInformation(moving)
    transform = images.field_transform(field)
    for image, interpolator, fill, pixel in ((moving, sitk.sitkLinear, -7.0, sitk.sitkFloat32),
                                             (labels, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)):
        expected = sitk.GetArrayFromImage(sitk.Resample(image, field_grid, transform, interpolator, fill, pixel))
        warped = images.warp_on_field_grid(image, field, interpolator, fill, pixel)
        assert warped.GetPixelID() == pixel and images.same_grid(warped, field_grid)
        np.testing.assert_allclose(sitk.GetArrayFromImage(warped), expected, atol=1e-6)
        assert (expected == fill).mean() > 0.05 and (expected != fill).mean() > 0.3  # both cases exercised


def test_freesurfer_volumes_read_with_the_geometry_itk_gives_the_same_data_as_nifti(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 60, (6, 5, 4)).astype(np.int32)  # (i, j, k), as FreeSurfer's aseg
    affine = np.eye(4)
    affine[:3, :3] = ROTATED @ np.diag([0.8, 1.0, 1.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nib.MGHImage(data, affine).to_filename(tmp_path / "aseg.mgz")
    nib.Nifti1Image(data, affine).to_filename(tmp_path / "aseg.nii.gz")
    freesurfer = images.read_image(tmp_path / "aseg.mgz")
    itk = sitk.ReadImage(str(tmp_path / "aseg.nii.gz"))  # ITK's own NIfTI reader as the reference
    np.testing.assert_array_equal(sitk.GetArrayFromImage(freesurfer), sitk.GetArrayFromImage(itk))
    np.testing.assert_allclose(freesurfer.GetSpacing(), itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(freesurfer.GetOrigin(), itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(freesurfer.GetDirection(), itk.GetDirection(), atol=1e-5)
    assert freesurfer.GetOrigin()[0] == pytest.approx(-10.0, abs=1e-4)  # RAS x = 10 is LPS x = -10


def test_damaged_and_multi_frame_freesurfer_volumes_are_input_errors(tmp_path):
    from SlicerVoxelMorphLib.errors import InputError

    nib.MGHImage(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)).to_filename(tmp_path / "frames.mgz")
    with pytest.raises(InputError, match="one 3D frame"):
        images.read_image(tmp_path / "frames.mgz")
    nib.MGHImage(np.ones((8, 8, 8), np.float32), np.eye(4)).to_filename(tmp_path / "whole.mgh")
    (tmp_path / "cut.mgh").write_bytes((tmp_path / "whole.mgh").read_bytes()[:300])
    with pytest.raises(InputError, match="cannot read image"):
        images.read_image(tmp_path / "cut.mgh")
