"""Anatomical orientation of a brain image, whatever its header says.

The network sees an image on a working grid whose voxel axes point along fixed anatomical directions,
NETWORK_AXES: Right, Anterior, Superior, the order in which the bundled models' training images (LPBA40 as
provided here) store their voxels. Their header calls that order L, P, S, so every brain read through it
looks rotated by 180 degrees about the inferior-superior axis; other files (arrays saved by one tool under
another's axis convention) are wrong in other ways, and most are right. ``AnatomyOrientation`` finds which
of the 24 axis-aligned rotations takes a small bundled brain template (TEMPLATE: the MNI ICBM 2009a
symmetric T1, 6 mm) onto the image best: by mutual information after a short similarity registration from
the header's own orientation and from the most promising others (by mutual information with the centres
aligned). The header stands unless another rotation matches clearly better than every other (CONFIDENCE)
and well enough for a brain (MIN_MATCH).
Settings, then ``execute``, as SimpleITK's filters.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .preprocess import NETWORK_AXES, normalise

TEMPLATE = Path(__file__).parent / "bundled" / "orientation_template.nii.gz"
SPACING_MM = 6.0  # the level the template and the images are compared at
SMOOTHING_MM = 3.0  # Gaussian sigma before that level is sampled
# another rotation replaces the header's when its match is this many times that of every other one registered:
# LPBA40 S01, S11..S40 as stored and under right headers, plain, T2-like, inverted and with a synthetic head (248
# cases, benchmarks/orientation.py, the reference from each subject's labels): all right, 1.17-1.49 times the next;
# a textured ellipsoid of a brain's size: 1.00
CONFIDENCE = 1.1
# ... and when it matches at least this well: those LPBA40 cases 0.52-0.80 in the orientation found, the phantoms of
# the tests (ellipsoids of 30-40 mm, where two of the three rotations registered can differ by 1.3) 0.20-0.33. Random
# non-monotone contrasts of LPBA40 match weakly (0.21-0.39 in the right orientation): the header stands for them
MIN_MATCH = 0.4


def _rotations() -> list[np.ndarray]:
    """The 24 rotations that map axes onto axes (signed permutations of determinant 1), the identity first."""
    out = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), order] = signs
            if np.linalg.det(matrix) > 0:
                out.append(matrix)
    return out


ROTATIONS = _rotations()


def coarse_view(image: sitk.Image) -> sitk.Image:
    """What the orientation is judged on: the image in LPS voxel order (axes permuted and flipped, no
    interpolation, so RAS- and LPS-stored copies give the same view), averaged in blocks to about half of
    SPACING_MM, normalised to [0, 1], smoothed by SMOOTHING_MM and sampled every SPACING_MM (float32)."""
    ordered = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "LPS")
    factors = [max(1, int(SPACING_MM / 2 // s)) for s in ordered.GetSpacing()]
    small = sitk.BinShrink(ordered, factors) if max(factors) > 1 else ordered
    normalised = sitk.GetImageFromArray(normalise(sitk.GetArrayViewFromImage(small)))
    normalised.CopyInformation(small)
    smooth = sitk.SmoothingRecursiveGaussian(normalised, SMOOTHING_MM)
    extent = np.array(small.GetSize()) * np.array(small.GetSpacing())
    size = [max(1, round(float(e) / SPACING_MM)) for e in extent]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([SPACING_MM] * 3)
    grid.SetDirection(small.GetDirection())
    first = small.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)  # the corner of the first voxel
    axes = np.array(small.GetDirection()).reshape(3, 3)
    grid.SetOrigin((np.array(first) + axes @ np.full(3, SPACING_MM / 2)).tolist())
    return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def centroid(view: sitk.Image, level: float = 0.1) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of the voxels of a coarse view brighter than ``level``."""
    array = sitk.GetArrayViewFromImage(view)
    weight = np.where(array > level, array, 0.0)
    if weight.sum() <= 0:
        weight = np.ones_like(array)
    k, j, i = np.indices(array.shape)
    index = [float((weight * axis).sum() / weight.sum()) for axis in (i, j, k)]
    return np.array(view.TransformContinuousIndexToPhysicalPoint(index))


def turned_header(image: sitk.Image, rotation: np.ndarray, centre: np.ndarray | None = None) -> sitk.Image:
    """The same voxels under a header turned by ``rotation`` about ``centre`` (LPS mm; the world origin when None):
    what lay along e now lies along ``rotation`` @ e."""
    pivot = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    out = sitk.Image(image)
    out.SetDirection((rotation @ np.array(image.GetDirection()).reshape(3, 3)).flatten().tolist())
    out.SetOrigin((pivot + rotation @ (np.array(image.GetOrigin()) - pivot)).tolist())
    return out


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 24) -> float:
    """Mutual information (nats) of two arrays of values in [0, 1] (clipped), from their joint histogram."""
    rows, columns = (np.minimum((np.clip(x, 0, 1).ravel() * bins).astype(np.intp), bins - 1) for x in (a, b))
    joint = np.bincount(rows * bins + columns, minlength=bins * bins).reshape(bins, bins)  # histogram2d's, faster
    p = joint / joint.sum()
    independent = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    seen = p > 0
    return float((p[seen] * np.log(p[seen] / independent[seen])).sum())


def _mutual_information_method() -> sitk.ImageRegistrationMethod:
    """Mattes mutual information (24 bins) over every voxel of a coarse view, linear interpolation."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=24)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def read_template() -> sitk.Image:
    """The bundled template view (stored as uint8) as float32 in [0, 1]."""
    return sitk.Cast(sitk.Cast(sitk.ReadImage(str(TEMPLATE)), sitk.sitkFloat32) / 255.0, sitk.sitkFloat32)


@dataclass
class Orientation:
    """Where the anatomy lies in an image's world: ``rotation`` maps anatomical LPS directions to the
    image's LPS directions (the identity when the header is right)."""

    rotation: np.ndarray
    match: float  # mutual information of the template with the image in that orientation
    header_match: float  # ... in the orientation its header gives
    runner_up: float  # the best match of the other rotations registered (the header's, unless it won)
    view: sitk.Image | None = field(default=None, repr=False)  # the ``coarse_view`` it was judged on

    @property
    def header_is_right(self) -> bool:
        return bool(np.allclose(self.rotation, np.eye(3)))

    def working_axes(self) -> np.ndarray:
        """The directions (LPS columns) of the working grid's axes in this image's world: NETWORK_AXES turned
        with the anatomy."""
        return self.rotation @ NETWORK_AXES

    def as_report(self) -> dict:
        return {"header_matches_anatomy": self.header_is_right, "rotation_lps": self.rotation.tolist(),
                "template_match": round(self.match, 4), "header_template_match": round(self.header_match, 4),
                "runner_up_match": round(self.runner_up, 4)}


@dataclass
class AnatomyOrientation:
    """Finds an image's anatomical orientation against the bundled brain template (see the module text)."""

    candidates: int = 2  # rotations registered, best first by their unregistered match (plus the header's)
    iterations: int = 20
    confidence: float = CONFIDENCE

    def execute(self, image: sitk.Image) -> Orientation:
        template = read_template()
        view = coarse_view(image)
        centre, template_centre = centroid(view), centroid(template)
        method = _mutual_information_method()
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01,
                                                        numberOfIterations=self.iterations)
        method.SetOptimizerScalesFromPhysicalShift()

        def start() -> sitk.Similarity3DTransform:  # template centre onto the image's centre
            transform = sitk.Similarity3DTransform()
            transform.SetCenter(template_centre.tolist())
            transform.SetTranslation((centre - template_centre).tolist())
            return transform

        views = [turned_header(view, rotation.T, centre) for rotation in ROTATIONS]  # each anatomy brought home
        shift = sitk.TranslationTransform(3, (centre - template_centre).tolist())
        fixed = sitk.GetArrayViewFromImage(template)
        unregistered = [mutual_information(fixed, sitk.GetArrayFromImage(
            sitk.Resample(candidate, template, shift, sitk.sitkLinear, 0.0))) for candidate in views]
        order = [int(n) for n in np.argsort(unregistered)[::-1][:self.candidates]]
        matches = {}
        for n in sorted({0, *order}):  # 0: the header's own orientation
            method.SetInitialTransform(start(), inPlace=False)
            method.Execute(template, views[n])
            matches[n] = -method.GetMetricValue()
        best = max(matches, key=matches.get)
        if matches[best] < max(MIN_MATCH, self.confidence * max(value for n, value in matches.items() if n != best)):
            best = 0  # no brain, or no clear winner: the header stands
        runner_up = max(value for n, value in matches.items() if n != best)
        return Orientation(ROTATIONS[best], matches[best], matches[0], runner_up, view)


@dataclass
class PairOrientation:
    """The anatomical orientations of a pair: the fixed image's (the working grid follows it) and, when the affine
    alignment starts from them, the moving image's, with ``turn``: the rotation (LPS) taking a direction of the
    fixed image's world to the direction of the same anatomy in the moving image's world, None when the headers
    agree (or the moving image was not judged, or the images themselves do not confirm it)."""

    fixed: Orientation
    moving: Orientation | None = None
    turn: np.ndarray | None = None

    def turn_degrees(self) -> float:
        """The angle of ``turn`` (0 without one)."""
        return 0.0 if self.turn is None else float(np.degrees(np.arccos(np.clip((np.trace(self.turn) - 1) / 2, -1, 1))))

    def as_report(self) -> dict:
        return {**self.fixed.as_report(), **({"moving": self.moving.as_report()} if self.moving is not None else {}),
                "moving_turn_lps": None if self.turn is None else self.turn.tolist()}


def confirmed(turn: np.ndarray, target: sitk.Image, source: sitk.Image) -> bool:
    """Whether the moving image's coarse view ``source`` matches the fixed one's ``target`` CONFIDENCE times
    better turned by ``turn`` than as its header has it (centres aligned, Mattes mutual information): the two
    template judgements agree with what the images show of each other (phantoms, heads, non-brains can fool
    them). Unregistered: a short registration of two coarse views can drift (a 30 mm phantom against its own
    head: from the header 0.41 -> 0.40, turned 0.26 -> 0.47)."""
    target_centre, centre = centroid(target), centroid(source)
    method = _mutual_information_method()
    method.SetInitialTransform(sitk.TranslationTransform(3, (centre - target_centre).tolist()))
    header, turned = (-method.MetricEvaluate(target, turned_header(source, rotation.T, centre))
                      for rotation in (np.eye(3), turn))
    return turned >= CONFIDENCE * header


def pair_orientations(fixed: sitk.Image, moving: sitk.Image, both: bool = True) -> PairOrientation:
    """``AnatomyOrientation`` of the fixed image and, with ``both``, of the moving one (in a second thread: ITK
    releases the GIL), and the turn between them when the images confirm it."""
    if not both:
        return PairOrientation(AnatomyOrientation().execute(fixed))
    with ThreadPoolExecutor(max_workers=1) as pool:
        moving_orientation = pool.submit(AnatomyOrientation().execute, moving)
        pair = PairOrientation(AnatomyOrientation().execute(fixed), moving_orientation.result())
    turn = pair.moving.rotation @ pair.fixed.rotation.T
    if not np.allclose(turn, np.eye(3)) and confirmed(turn, pair.fixed.view, pair.moving.view):
        pair.turn = turn
    return pair
