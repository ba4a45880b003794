"""Variants of a real T1 brain image: remapped contrasts, a synthetic head around it, a cerebellum drawn in
where it was blanked out, an older brain, a rescan.

Each validation variant is a fixed, seeded function of one normalised image, so validation figures
are comparable across checkpoints and models: they measure generalisation to other contrasts and to
images with skull and scalp, not to the training set's appearance. ``rescan_pair`` draws a training
pair from one image: the same head twice, the second under a known random smooth deformation.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import normalise
from .synth import (
    CEREBELLUM_CORE_MM,
    Synthesiser,
    SynthSettings,
    blur,
    depth_mm,
    expansion_flow,
    flow_of_grid,
    sampling_grid,
    tissue_centres,
)

CONTRASTS = ("inverted", "t2", "flair", "monotone", "nonmonotone")
VARIANTS = ("plain", *CONTRASTS, "head", "cerebellum")
BOTH_IMAGES = ("head", "cerebellum")  # variants of both images of a pair (the others: of the moving image)
BRAIN_THRESHOLD = 0.05


def remap_contrast(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A T1 image (normalised to [0, 1]) with another contrast, normalised again.

    't2': CSF bright, grey above white matter; 'flair': CSF dark, grey above white matter;
    'inverted': 1 - image (background bright too); 'monotone' / 'nonmonotone': a random increasing
    or arbitrary piecewise-linear intensity curve drawn from ``seed``.
    """
    image = np.asarray(image, dtype=np.float32)
    brain = image > BRAIN_THRESHOLD
    if kind == "inverted":
        return normalise(1.0 - image)
    if kind in ("t2", "flair"):
        csf, grey, white = tissue_centres(image[brain])
        knots = [0.0, csf, grey, white, 1.0]
        values = [0.0, 1.0, 0.55, 0.3, 0.25] if kind == "t2" else [0.0, 0.1, 0.75, 0.5, 0.45]
    elif kind in ("monotone", "nonmonotone"):
        rng = np.random.default_rng(seed)
        knots = list(np.linspace(0, 1, 7))
        values = rng.uniform(0, 1, 7)
        values = list(np.sort(values) if kind == "monotone" else values)
    else:
        raise ValueError(f"unknown contrast {kind!r}; one of {CONTRASTS}")
    return normalise(np.interp(image, knots, values).astype(np.float32))


HEAD_LAYERS_MM = (2.0, 6.0, 6.0)  # CSF rim, skull, scalp of the head variant


def add_head(image: np.ndarray, distance_mm: np.ndarray, seed: int = 0,
             layers_mm: tuple[float, ...] = HEAD_LAYERS_MM, values: tuple[float, ...] = (0.1, 0.05, 0.9),
             voxel_mm: float = 1.0) -> np.ndarray:
    """A skull-stripped image with T1-like head layers (CSF rim, skull, scalp) drawn around the brain,
    where ``distance_mm`` is the distance outside the brain; thickness varies smoothly (seeded)."""
    rng = np.random.default_rng(seed)
    shape = image.shape
    wobble = F.interpolate(torch.from_numpy(rng.normal(0, 1.5, (1, 1, *[max(2, n // 10) for n in shape]))).float(),
                           size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    edges = np.cumsum(layers_mm)
    layer = np.digitize(distance_mm + wobble, edges)
    head = np.zeros(shape, dtype=np.float32)
    for n, value in enumerate(values):
        head[layer == n] = value
    outside = distance_mm > 0
    out = np.where(outside, head, image) + rng.normal(0, 0.02, shape).astype(np.float32)
    out = blur(torch.from_numpy(out.astype(np.float32))[None, None], np.full(3, 0.5 / voxel_mm))[0, 0].numpy()
    return normalise(out)


CEREBELLUM_CORTEX_MM = 1.5  # the outer layer of a drawn-in cerebellum is grey matter
FOLIA_SD_MM = 1.2  # smoothness of the random noise whose peaks are its white matter branches (folia)
FOLIA_LEVEL = 1.0  # noise (unit SD) above which a voxel between cortex and core is white matter


def fill_blanked(image: np.ndarray, region: np.ndarray, rng: np.random.Generator,
                 voxel_mm: float = 1.0) -> np.ndarray:
    """A normalised T1 image with ``region`` (bool: structures it blanked out, ``synth.blanked_region``) drawn in
    as a cerebellum at the grey and white matter levels of the rest of its brain: grey cortex, white core and
    random white branches between them (seeded by ``rng``), a little noise; unchanged without a region."""
    if not region.any():
        return image
    brain = (image > BRAIN_THRESHOLD) & ~region
    _, grey, white = tissue_centres(image[brain])
    depth = depth_mm(region, voxel_mm)
    noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))[None, None]
    noise = blur(noise, np.full(3, FOLIA_SD_MM / voxel_mm))[0, 0].numpy()
    noise /= max(float(noise[region].std()), 1e-6)
    white_matter = (depth > CEREBELLUM_CORE_MM) | ((depth > CEREBELLUM_CORTEX_MM) & (noise > FOLIA_LEVEL))
    tissue = np.where(white_matter, white, grey).astype(np.float32)
    tissue += rng.normal(0, 0.02, image.shape).astype(np.float32)
    drawn = np.where(region, tissue, image).astype(np.float32)
    edge = blur(torch.from_numpy(drawn)[None, None], np.full(3, 0.5 / voxel_mm))[0, 0].numpy()
    return np.where(region, edge, image).clip(0, 1).astype(np.float32)


def variant(image: np.ndarray, kind: str, distance_mm: np.ndarray | None = None, seed: int = 0,
            voxel_mm: float = 1.0, blanked: np.ndarray | None = None) -> np.ndarray:
    """One of ``VARIANTS`` of a normalised T1 image ('head' needs the outside-brain distance, 'cerebellum' the
    ``blanked`` region)."""
    if kind == "plain":
        return image
    if kind == "cerebellum":
        if blanked is None:
            raise ValueError("the cerebellum variant needs the blanked region")
        return fill_blanked(image, blanked, np.random.default_rng(seed), voxel_mm)
    if kind == "head":
        if distance_mm is None:
            raise ValueError("the head variant needs the distance outside the brain")
        return add_head(image, distance_mm, seed, voxel_mm=voxel_mm)
    return remap_contrast(image, kind, seed)


AGED_MM = 8.0  # largest velocity of the older-brain variant's push away from CSF
AGED_SD_MM = 4.0  # blur of the CSF map whose gradient is that push


def aged(image: np.ndarray, labels: np.ndarray, csf: np.ndarray, voxel_mm: float = 1.0,
         amplitude_mm: float = AGED_MM) -> tuple[np.ndarray, np.ndarray]:
    """An older-looking brain: ``image`` (linear) and ``labels`` (nearest) under ``synth.expansion_flow`` of
    its CSF map ``csf`` (bool, same grid): wider ventricles and sulci, structures pushed away from them."""
    flow = expansion_flow(torch.from_numpy(csf)[None, None], amplitude_mm / voxel_mm, AGED_SD_MM / voxel_mm)
    grid = sampling_grid(flow)
    warped_image = F.grid_sample(torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None], grid,
                                 align_corners=False, padding_mode="border")
    warped_labels = F.grid_sample(torch.from_numpy(labels.astype(np.float32))[None, None], grid, mode="nearest",
                                  align_corners=False)
    return warped_image[0, 0].numpy(), warped_labels[0, 0].numpy().astype(labels.dtype)


# rescans: a small residual affine (the registration's affine stage removes the rest) and a smooth deformation
RESCAN_DEFORMATION = SynthSettings(rotation_deg=2.0, scale=0.02, shear=0.01, shift=0.01, velocity_sd=2.0)
RESCAN_HEAD_PROBABILITY = 0.5  # draw head layers of random thickness and brightness around the brain
RESCAN_CONTRAST_PROBABILITY = 0.3  # remap both scans' contrast the same way


def rescan_pair(image: torch.Tensor, distance_mm: torch.Tensor, soft_labels: torch.Tensor | None,
                rng: np.random.Generator, voxel_mm: float) -> tuple[torch.Tensor, ...]:
    """Two scans of one head whose deformation is known: ``image`` (1, 1, D, H, W), normalised, skull-stripped,
    with head layers of random thickness and brightness drawn around the brain or not, and its contrast
    remapped or not; the fixed scan is the moving one under a random smooth deformation (small affine
    included). ``distance_mm`` is the distance outside the brain on the same grid. Returns (moving, fixed,
    moving soft labels, fixed soft labels, flow, fixed head): flow (1, 3, D, H, W) in voxels along D, H, W
    with fixed(x) = moving(x + flow(x)); fixed head (1, 1, D, H, W) bool, where the flow is scored."""
    array, distance = image[0, 0].numpy(), distance_mm[0, 0].numpy()
    extent_mm = voxel_mm / 2  # skull-stripped: the brain, up to the resampled mask's blur
    if rng.random() < RESCAN_HEAD_PROBABILITY:
        layers = tuple(float(t) for t in rng.uniform(1.0, 8.0, 3))
        brightness = tuple(float(v) for v in rng.uniform(0, 1, 3))
        array = add_head(array, distance, int(rng.integers(2**31)), layers, brightness, voxel_mm)
        extent_mm = sum(layers)
    if rng.random() < RESCAN_CONTRAST_PROBABILITY:
        array = remap_contrast(array, CONTRASTS[rng.integers(len(CONTRASTS))], int(rng.integers(2**31)))
    moving = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    grid = Synthesiser(RESCAN_DEFORMATION).deformation(rng, tuple(array.shape))
    fixed = F.grid_sample(moving, grid, align_corners=False, padding_mode="border")
    head = (distance_mm < extent_mm).float()
    fixed_head = F.grid_sample(head, grid, align_corners=False) > 0.5
    fixed_soft = None if soft_labels is None else F.grid_sample(soft_labels, grid, align_corners=False)
    return moving, fixed, soft_labels, fixed_soft, flow_of_grid(grid), fixed_head
