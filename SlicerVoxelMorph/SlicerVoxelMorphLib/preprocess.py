"""Preprocessing shared by training and inference: working grid, resampling, intensity normalisation,
affine pre-alignment.

Every image the network sees, in training or registration, goes through ``prepare``: resampled
(linear) onto a working grid of WORKING_SPACING_MM whose axes point along NETWORK_AXES of the fixed
image's anatomy (``orientation.AnatomyOrientation``: whatever the stored orientation, spacing or extent,
and whether or not the header tells the anatomy right), the outside filled with the image's own
background level, then normalised.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from . import images
from .errors import Cancelled, InputError

if TYPE_CHECKING:  # orientation imports this module
    from .orientation import Orientation, PairOrientation

LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.5
WORKING_SPACING_MM = 1.0
GRID_MULTIPLE = 16  # the UNet's four poolings
AFFINE_SMOOTHING_MM = 2.0  # Gaussian sigma of the affine stage
# fraction of the shrunk voxels the affine metric samples: LPBA40 S35..S40 -> S01, fast mode, mean Dice
# 0.7200 with every voxel (1.28 s), 0.7207 with a quarter (0.50 s), 0.7182 with a tenth (0.27 s)
AFFINE_SAMPLING = 0.25
MIN_EXTENT_MM = 32.0  # the working grid is 1 mm and the network pools 32x: smaller anatomy is refused
# the network level of the bundled models (and of refinement without a model): the command line prepares
# the pair for it while torch imports; ``register`` rebuilds it for a model of another spacing
NETWORK_SPACING_MM = 2.0
# columns: the directions (LPS, in a header that tells the anatomy right) of the working grid's axes i, j, k:
# Right, Anterior, Superior, the order in which the bundled models' training images (LPBA40) store their voxels
NETWORK_AXES = np.diag([-1.0, -1.0, 1.0])


def normalise(array: np.ndarray) -> np.ndarray:
    """Robust min-max to [0, 1] (float32): 0.5th percentile of all voxels -> 0, 99.5th of brighter -> 1.

    The upper percentile ignores voxels at or below the lower one, so the amount of empty
    background around an object does not change the scaling.
    """
    array = np.asarray(array, dtype=np.float32)
    return scale_to_window(array, *intensity_window(array))


def intensity_window(array: np.ndarray) -> tuple[float, float]:
    """(lower, upper) intensities that ``normalise`` maps to 0 and 1."""
    lower = np.percentile(array, LOWER_PERCENTILE)
    above = array[array > lower]
    upper = np.percentile(above, UPPER_PERCENTILE) if above.size else lower
    return float(lower), float(upper)


def scale_to_window(array: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map ``lower`` -> 0 and ``upper`` -> 1, clipped to [0, 1] (float32); zeros for an empty window."""
    if upper <= lower:
        return np.zeros(np.shape(array), dtype=np.float32)
    out = np.subtract(array, np.float32(lower), dtype=np.float32)  # one new array, then in place
    np.divide(out, np.float32(upper - lower), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def check_scale(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Refuse images too small for the engine's working resolution (memory: ``inputs.check_memory``)."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    if extent.min() < MIN_EXTENT_MM:
        raise InputError(f"{what} is only {' x '.join(f'{e:.1f}' for e in extent)} mm: registration works on a "
                         f"{WORKING_SPACING_MM:g} mm grid for human-sized anatomy and needs at least "
                         f"{MIN_EXTENT_MM:g} mm along every axis (small-animal images: scale the spacing up first)")
    return image


def background_value(array: np.ndarray) -> float:
    """The image's background level: its lower normalisation percentile (0 for MR, about -1000 for CT)."""
    return float(np.percentile(array, LOWER_PERCENTILE))


def level_factor(spacing_mm: float) -> int:
    """Pooling factor from the working grid to a network level of ``spacing_mm`` (a whole multiple)."""
    factor = spacing_mm / WORKING_SPACING_MM
    if round(factor) < 1 or abs(factor - round(factor)) > 1e-3:
        raise InputError(f"network spacing {spacing_mm} mm must be a whole multiple of the working spacing "
                         f"{WORKING_SPACING_MM} mm")
    return round(factor)


def grid_for(image: sitk.Image, mask: np.ndarray | None, spacing_mm: float, margin_mm: float = 4.0,
             axes: np.ndarray = NETWORK_AXES) -> sitk.Image:
    """The working grid of an image: axes along the columns of ``axes`` (LPS; ``Orientation.working_axes``
    of the image, NETWORK_AXES when its header tells its anatomy right), WORKING_SPACING_MM, around ``mask``
    (the whole image when None) plus ``margin_mm``, each size a multiple of the network level's pooling."""
    if mask is None:
        mask = np.ones(image.GetSize()[::-1], dtype=bool)
    multiple = GRID_MULTIPLE * level_factor(spacing_mm)
    return images.working_grid(image, mask, WORKING_SPACING_MM, multiple, margin_mm, axes)


def resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
             labels: bool = False) -> sitk.Image:
    """``image`` on ``grid`` through ``transform`` (grid point -> image point): linear float32 with the
    image's background level outside, or nearest-neighbour int32 with 0 outside for ``labels``."""
    transform = transform or sitk.Transform()
    if labels:
        return sitk.Resample(image, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    fill = background_value(sitk.GetArrayViewFromImage(image))
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, fill, sitk.sitkFloat32)


def prepare(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
            mask: sitk.Image | None = None) -> np.ndarray:
    """The network's view of an image on the working grid: resampled, normalised, (K, J, I) float32.

    With a ``mask`` (on the image's grid) the intensity window comes from the voxels inside it and
    everything outside is set to 0, so what the mask hides changes nothing.
    """
    inside = None if mask is None else mask_on_grid(mask, grid, transform) > 0
    return _prepared(image, grid, transform, inside)


def mask_on_grid(mask: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """A mask (on its image's grid) on the working grid through ``transform``: float32 0/1, (K, J, I)."""
    return sitk.GetArrayFromImage(resample(mask, grid, transform, labels=True)).astype(np.float32)


def _prepared(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None,
              inside: np.ndarray | None) -> np.ndarray:
    """``prepare`` with the mask already on the grid (``inside``, bool, or None)."""
    array = sitk.GetArrayFromImage(resample(image, grid, transform))
    if inside is None:
        return normalise(array)
    if not inside.any():
        raise InputError("a mask covers no voxel of the working region (after the affine pre-alignment)")
    return scale_to_window(array, *intensity_window(array[inside])) * inside


@dataclass
class WorkingPair:
    """A pair on its working grid as the network sees it (``prepare``), and what it was built from."""

    spacing_mm: float  # the network level the grid was sized for
    transform: sitk.Transform  # the affine pre-alignment (fixed points to moving points)
    grid: sitk.Image
    fixed_foreground: np.ndarray  # (K, J, I) bool on the fixed image's own grid: the working region
    fixed: np.ndarray  # (K, J, I) float32 on the grid, as are the others
    moving: np.ndarray
    fixed_mask: np.ndarray | None  # 0/1
    moving_mask: np.ndarray | None
    alignment: "Alignment | None" = None  # the masks' source images and which side showed a head
    anatomy: "Orientation | None" = None  # the fixed image's anatomical orientation the grid follows


def working_pair(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, spacing_mm: float,
                 fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
                 alignment: "Alignment | None" = None, anatomy: "Orientation | None" = None) -> WorkingPair:
    """The working grid around the fixed foreground (or ``fixed_mask``) for a network level of
    ``spacing_mm``, its axes along ``anatomy.working_axes()`` (the fixed image's anatomical orientation;
    NETWORK_AXES of its header when None), both images prepared on it (the moving one through
    ``transform``) and the masks resampled onto it; ``alignment`` (from ``align``) is kept with it."""
    if fixed_mask is not None:
        foreground = sitk.GetArrayFromImage(fixed_mask) > 0
    else:
        foreground = foreground_mask(fixed)
    grid = grid_for(fixed, foreground, spacing_mm, axes=NETWORK_AXES if anatomy is None else anatomy.working_axes())
    masks = [None if mask is None else mask_on_grid(mask, grid, t)  # each resampled once, for both uses
             for mask, t in ((fixed_mask, None), (moving_mask, transform))]
    fixed_array, moving_array = (_prepared(image, grid, t, None if mask is None else mask > 0)
                                 for image, t, mask in ((fixed, None, masks[0]), (moving, transform, masks[1])))
    return WorkingPair(spacing_mm, transform, grid, foreground, fixed_array, moving_array, *masks, alignment, anatomy)


def foreground_mask(image: sitk.Image, fraction: float = 0.05) -> np.ndarray:
    """Voxels brighter than ``fraction`` of the robust intensity range, (K, J, I) bool."""
    return normalise(sitk.GetArrayFromImage(image)) > fraction


# one image's foreground this many times larger than the other's: a head (skull, scalp) and a skull-stripped brain.
# Measured as compared (4x4x4 block means): the 31 LPBA40 brains 1.06-1.58 L (largest / smallest 1.49); S35..S40
# with a synthetic head 2.22-2.68 L against the atlas S01's brain (1.15 L): 1.93-2.34; the atlas with a synthetic
# head (2.36-2.37 L) against S35..S40's brains: 1.72-2.20 (the head variant as corrected in commit 76818d9; it
# measured 1.74-2.37 before). Between 1.49 and 1.72
HEAD_VOLUME_RATIO = 1.6
# one image's extent, mapped by the affine, holds at least this share of the other's object (or mask) for a whole
# view; less and the pair is registered on the part both show (``_within_view``)
FULL_VIEW_SHARE = 0.98
CHECK_SHRINK = 4  # head volumes and the moving view are judged on images averaged in 4x4x4 blocks (0.18 s -> ms)


@dataclass
class Alignment:
    """The affine pre-alignment and the masks the later stages use (the given ones, or brain outlines)."""

    transform: sitk.Transform  # fixed points to moving points
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    head_side: str | None  # 'fixed' or 'moving': the image that shows a head around the other's stripped brain
    orientations: "PairOrientation | None" = None  # the anatomy's orientations the affine started from
    moving_view_share: float | None = None  # share of the fixed object in the moving image's view, when partial
    fixed_view_share: float | None = None  # share of the moving object in the fixed image's view, when partial


def head_side(fixed: sitk.Image, moving: sitk.Image) -> str | None:
    """'moving' when the moving image's object (``object_mask``) is HEAD_VOLUME_RATIO times the fixed one's or
    more in volume (a head against a skull-stripped brain), 'fixed' for the reverse, None otherwise."""
    coarse = [sitk.BinShrink(image, [CHECK_SHRINK] * 3) for image in (fixed, moving)]  # 4x4x4 means
    volumes = [object_mask(image).sum() * float(np.prod(image.GetSpacing())) for image in coarse]
    if volumes[1] >= HEAD_VOLUME_RATIO * volumes[0]:
        return "moving"
    return "fixed" if volumes[0] >= HEAD_VOLUME_RATIO * volumes[1] else None


def align(fixed: sitk.Image, moving: sitk.Image, progress: Callable[[str, float], None] | None = None,
          fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None, affine: bool = True,
          transform: sitk.Transform | None = None, orientations: "PairOrientation | None" = None) -> Alignment:
    """``affine_align`` (starting from ``orientations.turn``; identity without ``affine``; ``transform`` when one is
    given; ``orientations`` are kept with it), with brain outlines when one image shows a head and the other a
    skull-stripped brain and no mask is given: the brain's foreground masks the affine metric (else the brain is
    stretched onto the head) and, mapped through the affine, masks the head image's skull and scalp for the network
    and the refinement."""
    side = head_side(fixed, moving) if fixed_mask is None and moving_mask is None else None
    if side == "moving":
        fixed_mask = _mask_image(object_mask(fixed), fixed)
    elif side == "fixed":
        moving_mask = _mask_image(object_mask(moving), moving)
    if transform is None:
        transform = affine_align(fixed, moving, progress, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                 turn=orientations and orientations.turn) if affine else sitk.AffineTransform(3)
    if side == "moving":
        moving_mask = resample(fixed_mask, moving, transform.GetInverse(), labels=True)
    elif side == "fixed":
        fixed_mask = resample(moving_mask, fixed, transform, labels=True)
    fixed_mask, moving_share = _within_view(fixed, fixed_mask, moving, transform)
    moving_mask, fixed_share = _within_view(moving, moving_mask, fixed, transform.GetInverse())
    return Alignment(transform, fixed_mask, moving_mask, side, orientations, moving_share, fixed_share)


def _within_view(image: sitk.Image, mask: sitk.Image | None, other: sitk.Image,
                 transform: sitk.Transform) -> tuple[sitk.Image | None, float | None]:
    """``mask`` as it is and None when the ``other`` image (``transform``: image points to its points) shows
    FULL_VIEW_SHARE of ``image``'s object (or mask) or more; else the object (or mask) within the other's view
    and the share shown. An image that shows part of what the other does (a slab, a cut-off cerebellum) leaves the
    other's remainder out of the network's and the refinement's sight, else they stretch the part onto the whole."""
    if view_share(image, other, transform, mask, CHECK_SHRINK) >= FULL_VIEW_SHARE:
        return mask, None
    image_object = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else object_mask(image)
    seen = image_object & moving_view(image, other, transform)
    # decided again on the full grid: the blocks at a small image's edge lose more than its voxels do
    share = float(seen.sum() / max(image_object.sum(), 1))
    return (mask, None) if share >= FULL_VIEW_SHARE else (_mask_image(seen, image), share)


def view_share(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, fixed_mask: sitk.Image | None = None,
               shrink: int = 1) -> float:
    """The share of the fixed image's object (or of ``fixed_mask``) inside the moving image's view
    (``moving_view``), judged on the fixed grid averaged in ``shrink``-wide blocks."""
    fixed = sitk.BinShrink(fixed, [shrink] * 3)
    if fixed_mask is not None:
        fixed_object = sitk.GetArrayViewFromImage(sitk.BinShrink(sitk.Cast(fixed_mask > 0, sitk.sitkFloat32),
                                                                 [shrink] * 3)) >= 0.5
    else:
        fixed_object = object_mask(fixed)
    return float((fixed_object & moving_view(fixed, moving, transform)).sum() / max(fixed_object.sum(), 1))


def moving_view(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Fixed voxels (K, J, I) bool whose point ``transform`` maps inside the moving image's extent."""
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
    return sitk.GetArrayFromImage(sitk.Resample(inside, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0


def object_mask(image: sitk.Image, fraction: float = 0.05) -> np.ndarray:
    """Voxels that differ from the level at the image's faces (its background, dark or bright: an inverted or
    remapped contrast) by more than ``fraction`` of the robust intensity range, (K, J, I) bool."""
    array = normalise(sitk.GetArrayFromImage(image))
    faces = np.concatenate([array[index].ravel() for index in
                            ((0,), (-1,), (slice(None), 0), (slice(None), -1), (..., 0), (..., -1))])
    return np.abs(array - np.median(faces)) > fraction


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def affine_align(fixed: sitk.Image, moving: sitk.Image, progress: Callable[[str, float], None] | None = None,
                 iterations: int = 100, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None, turn: np.ndarray | None = None) -> sitk.AffineTransform:
    """Affine transform mapping fixed-space points to moving-space points (ITK resampling direction).

    Both images are normalised, shrunk (up to 4x: 2x bin averaging, 2 mm Gaussian, bin averaging
    again) and registered at that one level: moments initialisation (moments of raw CT or z-scored MR
    intensities mean nothing; the centres matched, and the matrix ``turn`` when given: the rotation between
    two headers that disagree about the anatomy, ``orientation.PairOrientation.turn``), then Mattes mutual information
    on a regular quarter of the voxels (fixed seed: deterministic), regular-step gradient descent with
    physical-shift scales. Masks stay on their full grids (the metric tests points in physical space).
    """
    factor = max(1, min(4, min(fixed.GetSize()) // 16))
    f, m = (_coarse_normalised(image, factor) for image in (fixed, moving))
    transform = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    if turn is not None:
        transform.SetMatrix(np.asarray(turn, dtype=float).flatten().tolist())
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(AFFINE_SAMPLING, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0.0])
    method.SetInitialTransform(transform, inPlace=True)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    cancelled = []

    def report() -> None:
        if cancelled:
            return
        try:
            progress("affine", min(1.0, method.GetOptimizerIteration() / iterations))
        except Cancelled as exc:
            cancelled.append(exc)
            method.StopRegistration()  # the optimiser ends after this iteration

    if progress is not None:  # a Python call each iteration waits for the GIL (torch may be importing)
        method.AddCommand(sitk.sitkIterationEvent, report)
    try:
        method.Execute(f, m)
    except RuntimeError as exc:  # ITK's own message is many lines; its gist is that the images do not meet
        raise InputError("the affine alignment failed: the images (or masks) do not overlap enough in physical "
                         "space; check their origins and directions, or register with --no-affine") from exc
    if cancelled:
        raise cancelled[0]
    return transform


def _coarse_normalised(image: sitk.Image, factor: int, sigma_mm: float = AFFINE_SMOOTHING_MM) -> sitk.Image:
    """``image`` stored in LPS order (axes permuted and flipped, no interpolation, so the metric samples
    the same points of an image stored RAS or LPS), shrunk by ``factor`` per axis (bin averaging, half
    of it before a Gaussian of ``sigma_mm``), normalised to [0, 1] (float32): what the affine stage registers."""
    first = max(1, factor // 2)
    small = sitk.BinShrink(sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "LPS"), [first] * 3)
    normalised = sitk.GetImageFromArray(normalise(sitk.GetArrayViewFromImage(small)))
    normalised.CopyInformation(small)
    smooth = sitk.SmoothingRecursiveGaussian(normalised, sigma_mm)
    return sitk.BinShrink(smooth, [factor // first] * 3) if factor // first > 1 else smooth
