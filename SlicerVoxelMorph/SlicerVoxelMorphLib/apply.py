"""Applying a saved displacement field to images, label maps and points.

A field u on a grid says: the point x of that grid corresponds to the point x + u(x) (LPS mm). So
images are resampled through it onto a reference grid (``displacement.nii.gz`` brings moving images
onto the fixed grid; ``inverse_displacement.nii.gz`` brings fixed images onto the moving grid), and
points are mapped x -> x + u(x) (fixed points to the moving image with ``displacement.nii.gz``).
"""

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import images, metrics
from .errors import InputError
from .layers import sample_at
from .preprocess import background_value

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def check_field(field: sitk.Image, what: str = "transform") -> sitk.Image:
    """A 3D displacement field (3 components per voxel, finite); InputError otherwise."""
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"{what} is not a displacement field: {field.GetDimension()}D with "
                         f"{field.GetNumberOfComponentsPerPixel()} component(s) per voxel (3D, 3 components needed)")
    array = sitk.GetArrayViewFromImage(field)
    if not np.isfinite(array).all():
        raise InputError(f"{what} has NaN or infinite displacements")
    return field


def check_scalar_3d(image: sitk.Image, what: str) -> sitk.Image:
    """A 3D scalar image; InputError otherwise."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image, not {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    return image


def warp_image(image: sitk.Image, field: sitk.Image, reference: sitk.Image, interpolation: str = "linear",
               labels: bool = False) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid through ``field``; outside it: the image's background
    level (0 for labels). Label maps keep their type: nearest neighbour, or with "linear" each label's
    mask is interpolated and every voxel takes the label of largest weight (smooth boundaries, never a
    value in between two labels); bspline is refused for labels."""
    if interpolation not in INTERPOLATORS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATORS)}, not {interpolation!r}")
    transform = images.field_transform(field)
    if labels:
        if interpolation == "bspline":
            raise InputError("label maps are warped with nearest or (per-label) linear interpolation, not bspline")
        if interpolation == "linear":
            return _warp_labels_linear(image, transform, reference)
        return sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    fill = background_value(sitk.GetArrayViewFromImage(image))
    return sitk.Resample(image, reference, transform, INTERPOLATORS[interpolation], fill, sitk.sitkFloat32)


def _warp_labels_linear(labels: sitk.Image, transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Per-label linear interpolation: the label (0 included, 1 outside the image) of largest weight."""
    values = [0, *metrics.label_ids(sitk.GetArrayViewFromImage(labels))]
    best = np.full(reference.GetSize()[::-1], -1.0, np.float32)
    out = np.zeros(best.shape, sitk.GetArrayViewFromImage(labels).dtype)
    for value in values:
        weight = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(labels == value, sitk.sitkFloat32), reference,
                                                      transform, sitk.sitkLinear, 1.0 if value == 0 else 0.0))
        larger = weight > best
        best[larger] = weight[larger]
        out[larger] = value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(reference)
    return result


def map_points(points_lps: np.ndarray, field: sitk.Image) -> np.ndarray:
    """x -> x + u(x) for points (N, 3) in LPS mm, u trilinear on the field's grid; InputError for
    points outside the grid's voxel centres."""
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    to_index = np.linalg.inv(images.index_to_physical(field))
    index = points @ to_index[:3, :3].T + to_index[:3, 3]
    size = np.array(field.GetSize())
    outside = np.nonzero(np.any((index < -1e-6) | (index > size - 1 + 1e-6), axis=1))[0]
    if outside.size:
        rows = ", ".join(str(r + 1) for r in outside[:10])
        raise InputError(f"{outside.size} point(s) lie outside the displacement field's grid (rows {rows})")
    vectors = torch.from_numpy(sitk.GetArrayFromImage(field).astype(np.float64)).permute(3, 0, 1, 2)[None]
    u = sample_at(vectors.contiguous(), torch.from_numpy(index), "border").T.numpy()
    return points + u


def read_points(path: str | Path, ras: bool = False) -> np.ndarray:
    """Points (N, 3) in LPS mm from a CSV with a header x,y,z (LPS, or RAS with ``ras``), a CSV with
    columns l,p,s or r,a,s (Slicer markups CSV), or a Slicer markups JSON file; every coordinate finite."""
    points = _read_points(Path(path), ras)
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size:
        raise InputError(f"{path}: non-finite coordinates in point(s) {', '.join(str(i + 1) for i in bad[:10])}")
    return points


def _read_points(path: Path, ras: bool) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"points file not found: {path}")
    if path.suffix.lower() == ".json":
        return _read_markups_json(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read points from {path}: {type(exc).__name__}") from None
    if not rows:
        raise InputError(f"{path} holds no points (a header x,y,z and one row per point are required)")
    columns = {c.strip().lower() for c in rows[0] if c}
    for names, flip in ((("x", "y", "z"), ras), (("l", "p", "s"), False), (("r", "a", "s"), True)):
        if set(names) <= columns:
            try:
                points = np.array([[float(_cell(r, n)) for n in names] for r in rows])
            except (TypeError, ValueError):
                raise InputError(f"{path}: non-numeric coordinates") from None
            return images.vectors_to_ras(points) if flip else points
    raise InputError(f"{path}: a CSV header with x,y,z (or l,p,s or r,a,s) is required")


def _cell(row: dict, name: str) -> str:
    return next(v for k, v in row.items() if k and k.strip().lower() == name)


def _read_markups_json(path: Path) -> np.ndarray:
    points = []
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read points from {path}: {type(exc).__name__}") from None
    try:
        for markup in document.get("markups", []):
            system = markup.get("coordinateSystem", "LPS")
            for point in markup.get("controlPoints", []):
                position = np.array(point["position"], dtype=float).reshape(3)
                points.append(images.vectors_to_ras(position) if system == "RAS" else position)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not a Slicer markups file (markups with control point positions)") from None
    if not points:
        raise InputError(f"{path}: no control points in this markups file")
    return np.array(points)


def write_points(points_lps: np.ndarray, path: str | Path, ras: bool = False) -> None:
    """A CSV with a header x,y,z (LPS mm, or RAS with ``ras``), written atomically."""
    from .files import atomic_path

    values = images.vectors_to_ras(points_lps) if ras else points_lps
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "z"])
        writer.writerows([[f"{v:.6f}" for v in row] for row in values])
