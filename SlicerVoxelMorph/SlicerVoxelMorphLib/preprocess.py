"""Preprocessing: intensity normalisation, affine pre-alignment, the network's working grid."""

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled

LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.5


def normalise(array: np.ndarray) -> np.ndarray:
    """Robust min-max to [0, 1] (float32): 0.5th percentile of all voxels -> 0, 99.5th of brighter -> 1.

    The upper percentile ignores voxels at or below the lower one, so the amount of empty
    background around an object does not change the scaling.
    """
    array = np.asarray(array, dtype=np.float32)
    lower = np.percentile(array, LOWER_PERCENTILE)
    above = array[array > lower]
    upper = np.percentile(above, UPPER_PERCENTILE) if above.size else lower
    if upper <= lower:
        return np.zeros_like(array)
    return np.clip((array - lower) / (upper - lower), 0.0, 1.0)


def foreground_mask(image: sitk.Image, fraction: float = 0.05) -> np.ndarray:
    """Voxels brighter than ``fraction`` of the robust intensity range, (K, J, I) bool."""
    return normalise(sitk.GetArrayFromImage(image)) > fraction


def affine_align(fixed: sitk.Image, moving: sitk.Image,
                 progress: Callable[[str, float], None] | None = None, iterations: int = 100) -> sitk.AffineTransform:
    """Affine transform mapping fixed-space points to moving-space points (ITK resampling direction).

    Moments initialisation, then Mattes mutual information on every voxel of 4x shrunk, 2 mm
    smoothed images (deterministic: no random sampling), regular-step gradient descent with
    physical-shift scales.
    """
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    transform = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([max(1, min(4, min(fixed.GetSize()) // 16))])
    method.SetSmoothingSigmasPerLevel([2.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    cancelled = []

    def report() -> None:
        if progress is None or cancelled:
            return
        try:
            progress("affine", min(1.0, method.GetOptimizerIteration() / iterations))
        except Cancelled as exc:
            cancelled.append(exc)

    method.AddCommand(sitk.sitkIterationEvent, report)
    method.Execute(f, m)
    if cancelled:
        raise cancelled[0]
    return transform
