"""Inverse fields and `apply`: against SimpleITK's displacement-field transform and field inversion."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_phantom_pair
from SlicerVoxelMorphLib import metrics
from SlicerVoxelMorphLib.cli import main


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A phantom pair registered with --inverse (classical refinement: a real, non-trivial field)."""
    tmp = tmp_path_factory.mktemp("apply")
    paths, _ = write_phantom_pair(tmp, amplitude=3.0, field_seed=4)
    paths = {name: str(path) for name, path in paths.items()}
    out = tmp / "out"
    assert main(["register", "--fixed", paths["fixed"], "--moving", paths["moving"], "--fixed-labels",
                 paths["fixed_labels"], "--moving-labels", paths["moving_labels"], "--model", "none", "--refine",
                 "40", "--inverse", "--quiet", "--out", str(out)]) == 0
    return paths, out


def _transform(path) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))


def _brain_points(labels_path, every: int = 3) -> list[tuple[float, ...]]:
    labels = sitk.ReadImage(labels_path)
    k, j, i = np.nonzero(sitk.GetArrayFromImage(labels) > 0)
    return [labels.TransformContinuousIndexToPhysicalPoint((float(a), float(b), float(c)))
            for a, b, c in zip(i[::every], j[::every], k[::every], strict=True)]


def test_inverse_round_trips_both_ways_through_simpleitk(registered):
    paths, out = registered
    forward, inverse = _transform(out / "displacement.nii.gz"), _transform(out / "inverse_displacement.nii.gz")
    fixed_points = _brain_points(paths["fixed_labels"])
    moving_points = _brain_points(paths["moving_labels"])
    there_and_back = [np.linalg.norm(np.subtract(inverse.TransformPoint(forward.TransformPoint(p)), p))
                      for p in fixed_points]
    back_and_there = [np.linalg.norm(np.subtract(forward.TransformPoint(inverse.TransformPoint(p)), p))
                      for p in moving_points]
    for errors in (there_and_back, back_and_there):
        assert np.mean(errors) < 0.2 and np.percentile(errors, 95) < 0.5, (np.mean(errors), np.percentile(errors, 95))
    moved = np.mean([np.linalg.norm(np.subtract(forward.TransformPoint(p), p)) for p in fixed_points])
    assert moved > 0.5  # the field is not trivial
    trip = json.loads((out / "report.json").read_text())["inverse_round_trip"]
    assert trip["fixed_points"]["mean_mm"] == pytest.approx(np.mean(there_and_back), abs=0.05)


def test_inverse_agrees_with_simpleitk_field_inversion(registered):
    paths, out = registered
    forward = sitk.ReadImage(str(out / "displacement.nii.gz"))
    theirs = sitk.InvertDisplacementField(sitk.Cast(forward, sitk.sitkVectorFloat64), maximumNumberOfIterations=50,
                                          maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.0001)
    mine = sitk.ReadImage(str(out / "inverse_displacement.nii.gz"))  # moving grid = fixed grid for this pair
    brain = sitk.GetArrayFromImage(sitk.ReadImage(paths["moving_labels"])) > 0
    difference = np.linalg.norm(sitk.GetArrayFromImage(mine) - sitk.GetArrayFromImage(theirs), axis=-1)[brain]
    assert difference.mean() < 0.15, difference.mean()


def test_apply_nearest_reproduces_the_registration_label_warp(registered, tmp_path):
    paths, out = registered
    result = tmp_path / "labels.nii.gz"
    assert main(["apply", "--transform", str(out / "displacement.nii.gz"), "--input", paths["moving_labels"],
                 "--labels", "--reference", paths["fixed"], "--output", str(result)]) == 0
    mine = sitk.GetArrayFromImage(sitk.ReadImage(str(result)))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    assert (mine == theirs).mean() >= 0.999


def test_freesurfer_label_maps_and_references_apply_like_their_nifti_copies(registered, tmp_path):
    import nibabel as nib

    paths, out = registered
    for name in ("moving_labels", "fixed"):  # FreeSurfer copies: same voxels and voxel-to-RAS affine
        nifti = nib.load(paths[name])
        nib.MGHImage(np.asarray(nifti.dataobj).astype(np.float32 if name == "fixed" else np.int32),
                     nifti.affine).to_filename(tmp_path / f"{name}.mgz")
    result = tmp_path / "labels.nii.gz"
    assert main(["apply", "--transform", str(out / "displacement.nii.gz"), "--input",
                 str(tmp_path / "moving_labels.mgz"), "--labels", "--reference", str(tmp_path / "fixed.mgz"),
                 "--output", str(result)]) == 0
    mine = sitk.ReadImage(str(result))
    theirs = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
    np.testing.assert_allclose(mine.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mine.GetDirection(), theirs.GetDirection(), atol=1e-5)
    assert (sitk.GetArrayFromImage(mine) == sitk.GetArrayFromImage(theirs)).mean() >= 0.999


def test_apply_writes_freesurfer_output_and_refuses_unknown_output_types_before_working(registered, tmp_path,
                                                                                        capsys):
    import nibabel as nib

    paths, out = registered
    transform = str(out / "displacement.nii.gz")
    for name in ("labels.mgz", "labels.nii.gz"):
        assert main(["apply", "--transform", transform, "--input", paths["moving_labels"], "--labels",
                     "--reference", paths["fixed"], "--output", str(tmp_path / name)]) == 0
    freesurfer, nifti = nib.load(tmp_path / "labels.mgz"), nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asarray(freesurfer.dataobj), np.asarray(nifti.dataobj))
    np.testing.assert_allclose(freesurfer.affine, nifti.affine, atol=1e-4)
    _one_error(capsys, ["apply", "--transform", transform, "--input", paths["moving"], "--output",
                        str(tmp_path / "warped.xyz")], "warped.xyz", ".nii.gz", ".mgz")
    _one_error(capsys, ["apply", "--transform", transform, "--points", str(tmp_path / "missing.csv"), "--output",
                        str(tmp_path / "points.nii.gz")], "points.nii.gz", ".csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.mgz", "labels.nii.gz"]  # nothing half-written


def test_apply_never_writes_over_one_of_its_inputs(registered, tmp_path, capsys):
    paths, out = registered
    moving = tmp_path / "moving.nii.gz"
    moving.write_bytes(open(paths["moving"], "rb").read())
    before = moving.read_bytes()
    for target in (moving, out / "displacement.nii.gz"):
        _one_error(capsys, ["apply", "--transform", str(out / "displacement.nii.gz"), "--input", str(moving),
                            "--output", str(target), "--overwrite"], "input")
    assert moving.read_bytes() == before


def test_apply_of_the_inverse_puts_fixed_labels_on_the_moving_grid(registered, tmp_path):
    paths, out = registered
    result = tmp_path / "fixed_on_moving.nii.gz"
    assert main(["apply", "--transform", str(out / "inverse_displacement.nii.gz"), "--input",
                 paths["fixed_labels"], "--labels", "--reference", paths["moving"], "--output", str(result)]) == 0
    moving_labels = sitk.GetArrayFromImage(sitk.ReadImage(paths["moving_labels"]))
    before = sitk.GetArrayFromImage(sitk.ReadImage(paths["fixed_labels"]))
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(result)))
    ids = [1, 2, 3]
    dice_before = np.mean(list(metrics.dice(moving_labels, before, ids).values()))
    dice_after = np.mean(list(metrics.dice(moving_labels, after, ids).values()))
    assert dice_after > dice_before, (dice_before, dice_after)
    # SimpleITK's own inversion of the forward field, used the same way, puts the labels at the same place
    forward = sitk.Cast(sitk.ReadImage(str(out / "displacement.nii.gz")), sitk.sitkVectorFloat64)
    theirs = sitk.InvertDisplacementField(forward, maximumNumberOfIterations=50)
    reference = sitk.Resample(sitk.ReadImage(paths["fixed_labels"]), sitk.ReadImage(paths["moving"]),
                              sitk.DisplacementFieldTransform(theirs), sitk.sitkNearestNeighbor)
    inside = (after > 0) | (sitk.GetArrayFromImage(reference) > 0)
    assert (after == sitk.GetArrayFromImage(reference))[inside].mean() > 0.99


def test_apply_points_agree_with_simpleitk_transform_point(registered, tmp_path):
    _, out = registered
    points = [(20.0, 5.0, 15.0), (25.5, 12.25, 20.0), (30.0, 20.0, 12.0)]
    source = tmp_path / "in.csv"
    source.write_text("x,y,z\n" + "\n".join(",".join(str(v) for v in p) for p in points) + "\n")
    result = tmp_path / "out.csv"
    assert main(["apply", "--transform", str(out / "displacement.nii.gz"), "--points", str(source),
                 "--output", str(result)]) == 0
    mapped = np.array([[float(r[c]) for c in "xyz"] for r in csv.DictReader(open(result))])
    transform = _transform(out / "displacement.nii.gz")
    expected = np.array([transform.TransformPoint(p) for p in points])
    np.testing.assert_allclose(mapped, expected, atol=0.01)
    # the same points as RAS in a Slicer markups JSON give the same answer (in LPS) ...
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                            "controlPoints": [{"position": [-p[0], -p[1], p[2]]} for p in points]}]}
    (tmp_path / "in.mrk.json").write_text(json.dumps(markups))
    assert main(["apply", "--transform", str(out / "displacement.nii.gz"), "--points",
                 str(tmp_path / "in.mrk.json"), "--output", str(tmp_path / "json.csv")]) == 0
    again = np.array([[float(r[c]) for c in "xyz"] for r in csv.DictReader(open(tmp_path / "json.csv"))])
    np.testing.assert_allclose(again, mapped, atol=1e-6)
    # ... and with --ras, RAS in and RAS out
    ras = tmp_path / "ras_in.csv"
    ras.write_text("x,y,z\n" + "\n".join(f"{-p[0]},{-p[1]},{p[2]}" for p in points) + "\n")
    assert main(["apply", "--transform", str(out / "displacement.nii.gz"), "--points", str(ras), "--ras",
                 "--output", str(tmp_path / "ras.csv")]) == 0
    got = np.array([[float(r[c]) for c in "xyz"] for r in csv.DictReader(open(tmp_path / "ras.csv"))])
    np.testing.assert_allclose(got, expected * [-1, -1, 1], atol=0.01)


def _one_error(capsys, args, *words):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_apply_bad_inputs_are_one_line_errors(registered, tmp_path, capsys):
    paths, out = registered
    scalar = paths["fixed"]
    _one_error(capsys, ["apply", "--transform", scalar, "--input", paths["moving"], "--output",
                        str(tmp_path / "x.nii.gz")], "not a displacement field")
    far = tmp_path / "far.csv"
    far.write_text("x,y,z\n20,5,15\n900,0,0\n")
    _one_error(capsys, ["apply", "--transform", str(out / "displacement.nii.gz"), "--points", str(far),
                        "--output", str(tmp_path / "y.csv")], "outside", "rows 2")
    assert not (tmp_path / "y.csv").exists()
    headless = tmp_path / "headless.csv"
    headless.write_text("1,2,3\n")
    _one_error(capsys, ["apply", "--transform", str(out / "displacement.nii.gz"), "--points", str(headless),
                        "--output", str(tmp_path / "z.csv")], "header")
    _one_error(capsys, ["apply", "--transform", str(out / "displacement.nii.gz"), "--output",
                        str(tmp_path / "w.csv")], "--input", "--points")


def test_landmark_errors_drop_and_match_the_true_field(tmp_path, capsys):
    from conftest import write_phantom_pair

    paths, truth = write_phantom_pair(tmp_path)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    rng = np.random.default_rng(1)
    k, j, i = np.nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"]))) > 0)
    pick = rng.choice(len(k), 12, replace=False)
    fixed_points = np.array([fixed.TransformContinuousIndexToPhysicalPoint((float(i[n]), float(j[n]), float(k[n])))
                             for n in pick])
    true = sitk.DisplacementFieldTransform(sitk.Cast(truth, sitk.sitkVectorFloat64))
    moving_points = np.array([true.TransformPoint(tuple(p)) for p in fixed_points])  # where they are in moving
    for name, points in (("fixed", fixed_points), ("moving", moving_points)):
        (tmp_path / f"{name}.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in points) + "\n")
    base = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model", "none",
            "--refine", "40", "--quiet", "--fixed-points", str(tmp_path / "fixed.csv")]
    assert main([*base, "--moving-points", str(tmp_path / "moving.csv"), "--out", str(tmp_path / "o")]) == 0
    landmarks = json.loads((tmp_path / "o" / "report.json").read_text())["landmarks"]
    np.testing.assert_allclose(landmarks["tre_before_mm"], np.linalg.norm(moving_points - fixed_points, axis=1),
                               atol=1e-3)
    assert landmarks["mean_tre_after_mm"] < 0.75 * landmarks["mean_tre_before_mm"], landmarks
    (tmp_path / "short.csv").write_text("x,y,z\n1,2,3\n")
    code = main([*base, "--moving-points", str(tmp_path / "short.csv"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "same number of rows" in err and len(err.splitlines()) == 1


def test_more_smoothness_gives_a_smoother_field(pair):
    from SlicerVoxelMorphLib.register import register

    paths, _ = pair
    fixed, moving = sitk.ReadImage(str(paths["fixed"])), sitk.ReadImage(str(paths["moving"]))
    rough = register(fixed, moving, model=None, refine_steps=30, smoothness=0.1).report["std_log_jacobian"]
    smooth = register(fixed, moving, model=None, refine_steps=30, smoothness=10.0).report["std_log_jacobian"]
    assert smooth < 0.7 * rough, (rough, smooth)


def test_apply_refuses_bad_label_maps_references_outputs_and_markups(registered, tmp_path, capsys):
    paths, out = registered
    field = str(out / "displacement.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(flat))
    _one_error(capsys, ["apply", "--transform", field, "--input", str(flat), "--labels", "--output",
                        str(tmp_path / "a.nii.gz")], "3D scalar")
    _one_error(capsys, ["apply", "--transform", field, "--input", paths["moving"], "--reference", str(flat),
                        "--output", str(tmp_path / "b.nii.gz")], "reference", "3D scalar")
    _one_error(capsys, ["apply", "--transform", field, "--input", paths["moving"], "--output",
                        str(tmp_path / "missing" / "c.nii.gz")], "does not exist")
    odd = tmp_path / "odd.mrk.json"
    odd.write_text(json.dumps([1, 2, 3]))
    _one_error(capsys, ["apply", "--transform", field, "--points", str(odd), "--output", str(tmp_path / "d.csv")],
               "markups")


def test_per_label_linear_warp_matches_scipy_and_never_invents_a_label():
    from scipy.ndimage import map_coordinates

    from SlicerVoxelMorphLib.apply import warp_image
    from SlicerVoxelMorphLib.images import displacement_image

    rng = np.random.default_rng(5)
    labels = np.zeros((10, 12, 14), np.uint16)
    labels[2:8, 3:9, 2:7] = 3
    labels[2:8, 3:9, 7:12] = 5  # 3 and 5 touch: plain linear interpolation would make 4 between them
    image = sitk.GetImageFromArray(labels)
    shift = np.zeros((*labels.shape, 3))
    shift[..., 0] = 0.4 + rng.uniform(-0.2, 0.2, labels.shape)  # x -> x + u, about half a voxel along i
    field = displacement_image(shift, image)
    got = sitk.GetArrayFromImage(warp_image(image, field, image, "linear", labels=True))
    assert set(np.unique(got)) <= {0, 3, 5} and got.dtype == np.uint16
    k, j, i = np.meshgrid(*(np.arange(n) for n in labels.shape), indexing="ij")
    where = np.stack([k, j, i + shift[..., 0]])
    weights = np.stack([map_coordinates((labels == v).astype(float), where, order=1, mode="nearest")
                        for v in (0, 3, 5)])
    expected = np.array([0, 3, 5])[weights.argmax(0)]
    inside = i + shift[..., 0] <= labels.shape[2] - 1  # beyond the last voxel centre SimpleITK says outside
    clear = np.sort(weights, 0)[-1] - np.sort(weights, 0)[-2] > 1e-3  # no tie between two labels
    np.testing.assert_array_equal(got[inside & clear], expected[inside & clear])


def test_points_with_infinite_or_missing_coordinates_are_refused(registered, tmp_path, capsys):
    _, out = registered
    (tmp_path / "inf.csv").write_text("x,y,z\n1,2,3\n1e400,2,3\n")
    (tmp_path / "nan.json").write_text('{"markups": [{"controlPoints": [{"position": [1, "NaN", 3]}]}]}')
    for name in ("inf.csv", "nan.json"):
        _one_error(capsys, ["apply", "--transform", str(out / "displacement.nii.gz"), "--points",
                            str(tmp_path / name), "--output", str(tmp_path / "out.csv")], name, "non-finite")
