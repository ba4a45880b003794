"""Shared fixtures: small synthetic 3D images with known geometry and labels."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "LPBA40"


def phantom(shape: tuple[int, int, int] = (40, 44, 36), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like phantom (K, J, I): a textured ellipsoid with three labelled inner regions."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = (k / 0.8) ** 2 + (j / 0.85) ** 2 + (i / 0.75) ** 2
    labels = np.zeros(shape, np.int16)
    labels[r < 1] = 1
    labels[(r < 1) & (i > 0.15) & (k < 0.3)] = 2
    labels[((k - 0.2) ** 2 + (j + 0.2) ** 2 + (i + 0.3) ** 2) < 0.12] = 3
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.normal(size=shape), 1.5)
    image = (labels > 0) * (0.5 + 0.2 * labels + 2.0 * texture)
    image = gaussian_filter(image, 0.7) * 100
    return image.astype(np.float32), labels


def to_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """SimpleITK image from a (K, J, I) array with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction, float).flatten().tolist())
    return image


def write_phantom_pair(folder: Path, shape=(40, 44, 36), spacing=(1.0, 1.1, 0.9), origin=(10.0, -5.0, 3.0),
                       amplitude: float = 4.0, field_seed: int = 1, sigma_mm: float = 6.0,
                       phantom_seed: int = 0) -> tuple[dict[str, Path], sitk.Image]:
    """Fixed and moving phantoms with labels (moving = fixed under a smooth known warp) written to NIfTI
    files in ``folder``; returns their paths and the field."""
    image, labels = phantom(shape, seed=phantom_seed)
    fixed, fixed_labels = to_image(image, spacing, origin), to_image(labels, spacing, origin)
    field = smooth_field(fixed, amplitude=amplitude, seed=field_seed, sigma_mm=sigma_mm)
    images = {"fixed": fixed, "moving": deform(fixed, field, sitk.sitkLinear), "fixed_labels": fixed_labels,
              "moving_labels": deform(fixed_labels, field, sitk.sitkNearestNeighbor)}
    paths = {}
    for name, im in images.items():
        paths[name] = Path(folder) / f"{name}.nii.gz"
        sitk.WriteImage(im, str(paths[name]))
    return paths, field


@pytest.fixture
def pair(tmp_path):
    """Fixed and moving phantoms (moving = fixed under a smooth known warp) written to NIfTI files."""
    return write_phantom_pair(tmp_path)


def smooth_field(reference: sitk.Image, amplitude: float, seed: int, sigma_mm: float = 6.0) -> sitk.Image:
    """A smooth random displacement field (LPS mm) on the grid of ``reference``, max |u| ~ amplitude."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = reference.GetSize()[::-1]
    sigma = [sigma_mm / s for s in reference.GetSpacing()[::-1]]
    u = np.stack([gaussian_filter(rng.normal(size=shape), sigma) for _ in range(3)], axis=-1)
    u *= amplitude / np.abs(u).max()
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(reference)
    return field


def deform(image: sitk.Image, field: sitk.Image, interpolator: int) -> sitk.Image:
    """The moving image that ``field`` registers to ``image``: moving(x + u(x)) = image(x).

    moving(y) = image(psi^-1(y)) with psi(x) = x + u(x), the inverse taken by SimpleITK.
    """
    inverse = sitk.InvertDisplacementField(field, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=0.001, enforceBoundaryCondition=False)
    return sitk.Resample(image, image, sitk.DisplacementFieldTransform(inverse), interpolator)
