"""Image synthesis from label maps (SynthMorph-style): random shapes, contrasts, heads and artefacts.

A ``SynthSubject`` holds a generation label map made once from a labelled brain: every brain
structure split into three tissue classes (CSF, grey, white matter, by intensity clustering of its
image) and the distance outside the brain, from which random extra-cerebral layers (CSF rim,
skull, scalp) are drawn at each sample. ``Synthesiser`` deforms two such maps at random and draws
an image from each with its own random contrast, blur, bias field, gamma, noise and resolution
loss. The loss sees only the brain (its structures and, optionally, its tissue classes), so the
network learns to ignore everything else.
"""

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import metrics
from .errors import InputError
from .images import check_labels
from .layers import displacement_from_velocity, identity_grid
from .preprocess import normalise

TISSUES = 3  # CSF, grey matter, white matter inside the brain
HEAD_LAYERS = 3  # CSF rim, skull, scalp outside it
HEAD_LABEL = 1  # generation labels 1..HEAD_LAYERS are the head layers, 0 is background
TISSUE_LABELS = 4  # ``tissue_map``: 1 CSF in a structure, 2 CSF outside the structures, 3 grey, 4 white matter


@dataclass
class SynthSubject:
    """A labelled brain prepared for synthesis, on one grid (spacing ``spacing_mm``)."""

    name: str
    generation: torch.Tensor  # (1, 1, D, H, W) float: 0 outside the brain, else 1 + HEAD_LAYERS + s * TISSUES + t
    distance: torch.Tensor  # (1, 1, D, H, W) float: mm outside the brain mask (0 inside)
    structures: int  # number of structures s (0 = brain voxels without a structure label)
    spacing_mm: float


def tissue_centres(values: np.ndarray, classes: int = TISSUES, iterations: int = 30) -> np.ndarray:
    """Increasing 1D k-means centres of ``values`` (for T1 brain voxels: CSF, grey, white matter)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    centres = np.percentile(values, np.linspace(10, 90, classes))
    for _ in range(iterations):
        assign = np.abs(values[:, None] - centres[None]).argmin(1)
        updated = np.array([values[assign == c].mean() if (assign == c).any() else centres[c] for c in range(classes)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def tissue_classes(image: np.ndarray, brain: np.ndarray, classes: int = TISSUES) -> np.ndarray:
    """Class 0..classes-1 of every voxel inside ``brain`` by the nearest ``tissue_centres``; 0 outside."""
    values = image[brain]
    centres = tissue_centres(values, classes)
    out = np.zeros(image.shape, dtype=np.int64)
    out[brain] = np.abs(values[:, None] - centres[None]).argmin(1)
    return out


BRAIN_CLOSING_MM = 10.0  # gaps between labelled structures up to twice this wide are closed over (LPBA40: at 8 mm
# S20 and S22 kept ~10 % of their foreground outside the brain, at 10 mm every subject at most 0.26 %)


def brain_mask(labels: sitk.Image) -> sitk.Image:
    """The brain of a label map (UInt8): its labelled voxels and the unlabelled tissue they enclose (white
    matter, ventricles, sulci), even where that opens to the outside through gaps between structures:
    dilated by BRAIN_CLOSING_MM (in a margin, so the image's faces do not matter), holes filled, eroded back."""
    labelled = sitk.Cast(labels > 0, sitk.sitkUInt8)
    radius = [max(1, round(BRAIN_CLOSING_MM / spacing)) for spacing in labels.GetSpacing()]
    padded = sitk.ConstantPad(labelled, radius, radius, 0)
    enclosed = sitk.BinaryErode(sitk.BinaryFillhole(sitk.BinaryDilate(padded, radius)), radius)
    enclosed = sitk.Crop(enclosed, radius, radius)
    enclosed.CopyInformation(labelled)
    return sitk.Or(enclosed, labelled)


BLANKED_LEVEL = 0.05  # a structure whose median normalised intensity is below this was blanked out of its image
CEREBELLUM_CORE_MM = 7.5  # a blanked structure is drawn white matter deeper than this (LPBA40 S01's cerebellum: 25 %)


def blanked_region(intensity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Voxels (bool) of the labelled structures that an image has blanked out: median normalised ``intensity``
    below BLANKED_LEVEL (LPBA40's images are black in their cerebellum label, while other datasets' brains have
    a cerebellum)."""
    ids = metrics.label_ids(labels)
    if not ids:
        return np.zeros(labels.shape, dtype=bool)
    compact = metrics.compact_labels(labels, ids).reshape(labels.shape)
    medians = [np.median(intensity[compact == n]) for n in range(1, len(ids) + 1)]
    blanked = [n for n, median in enumerate(medians, start=1) if median < BLANKED_LEVEL]
    return np.isin(compact, blanked)


def depth_mm(region: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Distance (mm, float32) from every voxel of ``region`` (bool) to the nearest voxel outside it; 0 outside."""
    outside = sitk.GetImageFromArray((~region).astype(np.uint8))  # the nearest outside voxel is on its boundary
    outside.SetSpacing([spacing_mm] * 3)
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False,
                                                                squaredDistance=False, useImageSpacing=True))
    return np.where(region, depth, 0).astype(np.float32)


def make_subject(name: str, image: sitk.Image, labels: sitk.Image, label_set: list[int],
                 blanked: np.ndarray | None = None) -> SynthSubject:
    """Generation label map and outside-brain distance of one labelled image (labels on its grid); the
    brain is ``brain_mask`` of the labels. Structures the image blanked out (``blanked``, by default
    ``blanked_region`` of the two) are drawn as a cerebellum: grey matter with a white matter core
    (CEREBELLUM_CORE_MM), not as dark tissue."""
    labels = check_labels(labels, image, f"{name} labels")
    label_array = sitk.GetArrayFromImage(labels).astype(np.int64)
    if not np.isin(label_array, [0, *label_set]).all():
        raise InputError(f"{name}: label ids outside the synthesis label set")
    brain_image = brain_mask(labels)
    brain = sitk.GetArrayFromImage(brain_image).astype(bool)
    intensity = normalise(sitk.GetArrayFromImage(image))
    tissue = tissue_classes(intensity, brain)
    spacing = image.GetSpacing()
    blanked = blanked_region(intensity, label_array) if blanked is None else blanked
    tissue = np.where(blanked, np.where(depth_mm(blanked, spacing[0]) > CEREBELLUM_CORE_MM, 2, 1), tissue)
    structure = metrics.compact_labels(label_array, label_set).reshape(label_array.shape)
    generation = np.where(brain, 1 + HEAD_LAYERS + structure * TISSUES + tissue, 0)
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        brain_image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    if not np.allclose(spacing, spacing[0], rtol=1e-3):
        raise InputError(f"{name}: synthesis needs isotropic voxels, not {spacing}")
    return SynthSubject(name, torch.from_numpy(generation.astype(np.float32))[None, None],
                        torch.from_numpy(np.clip(distance, 0, None).astype(np.float32))[None, None],
                        len(label_set), float(spacing[0]))


def smooth_noise(rng: np.random.Generator, channels: int, coarse: tuple[int, ...], size: tuple[int, ...],
                 sd: float) -> torch.Tensor:
    """Gaussian noise of SD ``sd`` drawn on a ``coarse`` grid and upsampled (trilinear) to ``size``."""
    noise = torch.from_numpy(rng.normal(0, sd, (1, channels, *coarse)).astype(np.float32))
    return F.interpolate(noise, size=size, mode="trilinear", align_corners=True)


def random_affine_matrix(rng: np.random.Generator, rotation_deg: float, scale: float, shear: float,
                         shift: float) -> torch.Tensor:
    """Random affine (1, 3, 4) in normalised coordinates: rotations, scalings, shears and a shift."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
        matrix = matrix @ r
    shears = np.eye(3)
    shears[np.triu_indices(3, 1)] = rng.uniform(-shear, shear, 3)
    matrix = matrix @ shears @ np.diag(np.exp(rng.uniform(-scale, scale, 3)))
    theta = np.concatenate([matrix, rng.uniform(-shift, shift, (3, 1))], axis=1)
    return torch.tensor(theta, dtype=torch.float32)[None]


@dataclass
class SynthSettings:
    """Ranges of the random draws (intensities on a 0..1 scale; lengths in output voxels unless mm)."""

    rotation_deg: float = 10.0
    scale: float = 0.12  # log-scale range per axis
    shear: float = 0.05
    shift: float = 0.05
    velocity_sd: float = 3.0  # SD of the stationary velocity, voxels of the output grid, at 1/8 resolution
    atrophy_probability: float = 0.5  # grow CSF into neighbouring tissue (larger sulci and ventricles)
    expansion_probability: float = 0.0  # push tissue away from CSF (a shape change: wider ventricles and sulci)
    expansion_voxels: float = 3.0  # largest velocity of that push, output voxels
    expansion_sd: float = 2.0  # blur of the CSF map whose gradient is the push, output voxels
    head_probability: float = 0.6  # draw skull and scalp layers (else a skull-stripped look)
    head_mm: tuple[float, float] = (1.0, 8.0)  # thickness range of each head layer
    background_zero_probability: float = 0.3
    independent_labels_probability: float = 0.3  # every label its own mean (else tissue classes share one)
    label_sd: float = 0.08
    blur_sd: float = 1.0
    bias_sd: float = 0.3
    gamma_sd: float = 0.25
    noise_sd: float = 0.04
    thick_slice_probability: float = 0.3
    thick_slice_factor: float = 3.0


class Synthesiser:
    """Draws (moving, fixed) image pairs with their brain-structure maps from ``SynthSubject`` s.

    ``pair(a, b, rng, size)`` returns images (1, 1, *size) normalised like inference inputs and
    structure maps (1, 1, *size) long, 0 = no structure, s = compact structure id.
    """

    def __init__(self, settings: SynthSettings | None = None) -> None:
        self.settings = settings or SynthSettings()

    def deformation(self, rng: np.random.Generator, size: tuple[int, ...], affine: bool = True) -> torch.Tensor:
        """A random diffeomorphic sampling grid (1, *size, 3) in normalised coordinates (align_corners=False):
        a random affine (unless ``affine`` is False) and a random smooth deformation."""
        s = self.settings
        theta = random_affine_matrix(rng, s.rotation_deg, s.scale, s.shear, s.shift) if affine \
            else torch.eye(3, 4)[None]
        grid = F.affine_grid(theta, [1, 1, *size], align_corners=False)
        half = tuple(max(2, n // 2) for n in size)  # integrated at half size, where it is smooth anyway
        velocity = smooth_noise(rng, 3, tuple(max(2, n // 8) for n in size), half, rng.uniform(0, s.velocity_sd) / 2)
        return grid + normalised_flow(displacement_from_velocity(velocity, size, steps=5))

    def labels(self, subject: SynthSubject, rng: np.random.Generator, size: tuple[int, ...]) -> torch.Tensor:
        """Deformed generation labels on an output grid of ``size`` (spacing of the subject times
        ``subject size / size``), head layers drawn, long (1, 1, *size)."""
        s = self.settings
        grid = self.deformation(rng, size)
        generation = F.grid_sample(subject.generation, grid, mode="nearest", align_corners=False).long()
        if s.expansion_probability > 0 and rng.random() < s.expansion_probability:  # no draw: older runs' streams
            flow = expansion_flow(csf_of(generation), rng.uniform(0, s.expansion_voxels), s.expansion_sd)
            generation = F.grid_sample(generation.float(), sampling_grid(flow), mode="nearest",
                                       align_corners=False).long()
        if rng.random() < s.head_probability:
            distance = F.grid_sample(subject.distance, grid, mode="bilinear", align_corners=False,
                                     padding_mode="border")
            wobble = smooth_noise(rng, 1, tuple(max(2, n // 8) for n in size), size, 1.5)  # mm
            edges = torch.tensor(np.cumsum(rng.uniform(*s.head_mm, HEAD_LAYERS)), dtype=torch.float32)
            layer = torch.bucketize(distance + wobble, edges)
            head = (generation == 0) & (layer < HEAD_LAYERS)
            generation = torch.where(head, HEAD_LABEL + layer, generation)
        if rng.random() < s.atrophy_probability:
            generation = self.atrophy(generation, rng)
        return generation

    def atrophy(self, generation: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Grow the CSF class one voxel into neighbouring brain tissue where a smooth random map allows."""
        brain = generation > HEAD_LAYERS
        tissue = (generation - 1 - HEAD_LAYERS) % TISSUES
        csf = (brain & (tissue == 0)).float()
        grown = F.max_pool3d(csf, 3, stride=1, padding=1) > 0
        allowed = smooth_noise(rng, 1, tuple(max(2, n // 6) for n in generation.shape[2:]),
                               tuple(generation.shape[2:]), 1.0) > rng.uniform(-0.5, 1.0)
        change = grown & brain & (tissue != 0) & allowed
        return torch.where(change, generation - tissue, generation)

    def image(self, generation: torch.Tensor, structures: int, rng: np.random.Generator) -> torch.Tensor:
        """A random-contrast image (1, 1, *size) of a generation label map with ``structures`` structures
        (plus the unlabelled brain), normalised to [0, 1] like inference inputs."""
        s = self.settings
        n_structures = structures + 1
        tissue_means = rng.uniform(0, 1, TISSUES)
        if rng.random() < s.independent_labels_probability:
            brain_means = rng.uniform(0, 1, n_structures * TISSUES)
        else:
            jitter = rng.normal(0, rng.uniform(0, 0.08), (n_structures, TISSUES))
            brain_means = (tissue_means[None] + jitter).ravel()
        background = rng.uniform(0, 1) if rng.random() < 0.3 else rng.uniform(0, 0.1)
        means = np.concatenate([[background], rng.uniform(0, 1, HEAD_LAYERS), brain_means])
        sds = rng.uniform(0, s.label_sd, len(means))
        size = tuple(generation.shape[2:])
        mean = torch.from_numpy(means.astype(np.float32))[generation]
        sd = torch.from_numpy(sds.astype(np.float32))[generation]
        image = mean + sd * torch.from_numpy(rng.standard_normal(size).astype(np.float32))
        image = blur(image, rng.uniform(0, s.blur_sd, 3))
        if rng.random() < s.background_zero_probability:
            image = torch.where(generation == 0, torch.zeros_like(image), image)
        bias = smooth_noise(rng, 1, tuple(max(2, n // 20) for n in size), size, rng.uniform(0, s.bias_sd))
        image = image.clamp_min(0) * bias.exp()
        if rng.random() < s.thick_slice_probability:
            image = thick_slices(image, int(rng.integers(3)), rng.uniform(1.5, s.thick_slice_factor))
        image = image / image.max().clamp_min(1e-6)
        image = image.clamp_min(0) ** float(np.exp(rng.normal(0, s.gamma_sd)))
        image = image + torch.from_numpy(rng.normal(0, rng.uniform(0, s.noise_sd), size).astype(np.float32))
        return torch.from_numpy(normalise(image.numpy()))

    def one(self, subject: SynthSubject, rng: np.random.Generator,
            size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, structures, tissues), each (1, 1, *size): one random draw of ``subject``."""
        return self.draw(self.labels(subject, rng, size), subject.structures, rng)

    def draw(self, generation: torch.Tensor, structures: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, structures, tissues) of a generation label map: a random-contrast image, its brain
        structures and its ``tissue_map``."""
        brain = generation > HEAD_LAYERS
        structure_map = torch.where(brain, (generation - 1 - HEAD_LAYERS) // TISSUES, 0)
        return self.image(generation, structures, rng), structure_map, tissue_map(generation)

    def pair(self, moving: SynthSubject, fixed: SynthSubject, rng: np.random.Generator,
             size: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(moving image, fixed image, moving structures, fixed structures, moving tissues, fixed tissues),
        each (1, 1, *size)."""
        (m_image, m_structures, m_tissues), (f_image, f_structures, f_tissues) = (
            self.one(s, rng, size) for s in (moving, fixed))
        return m_image, f_image, m_structures, f_structures, m_tissues, f_tissues

    def known_pair(self, subject: SynthSubject, rng: np.random.Generator,
                   size: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """A pair whose true deformation is known: one random draw of ``subject``'s labels (head layers
        included) and the same labels under a random smooth deformation (no affine: registration
        removes it before the network), each drawn with its own contrast. Returns (moving image, fixed
        image, moving structures, fixed structures, flow, fixed head, moving tissues, fixed tissues):
        flow (1, 3, *size) in voxels along D, H, W with fixed(x) = moving(x + flow(x)), the network's
        convention; fixed head (1, 1, *size) bool marks the fixed labels' brain and head layers, where
        the flow is scored."""
        generation = self.labels(subject, rng, size)
        grid = self.deformation(rng, size, affine=False)
        moved = F.grid_sample(generation.float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False).long()
        (m_image, m_structures, m_tissues), (f_image, f_structures, f_tissues) = (
            self.draw(g, subject.structures, rng) for g in (generation, moved))
        return m_image, f_image, m_structures, f_structures, flow_of_grid(grid), moved > 0, m_tissues, f_tissues


def tissue_map(generation: torch.Tensor) -> torch.Tensor:
    """Tissue labels (long, the shape of ``generation``) of a generation label map: 0 outside the brain,
    1 CSF inside a labelled structure (sulci), 2 CSF in the brain outside the structures (LPBA40: the
    ventricles), 3 grey matter, 4 white matter. Whole-brain labels such as FreeSurfer's aseg score these
    (cortex, white matter, ventricles), which LPBA40's structures do not label."""
    code = generation - 1 - HEAD_LAYERS
    tissue, structure = code % TISSUES, code // TISSUES
    labels = torch.where(tissue == 0, torch.where(structure == 0, 2, 1), tissue + 2)
    return torch.where(generation > HEAD_LAYERS, labels, 0)


def flow_of_grid(grid: torch.Tensor) -> torch.Tensor:
    """The displacement (1, 3, D, H, W) in voxels along D, H, W of a sampling grid (1, D, H, W, 3) in
    normalised coordinates (align_corners=False, x = W first), so that sampling with it is sampling at
    x + flow(x)."""
    size = tuple(grid.shape[1:4])
    extent = torch.tensor(size[::-1], dtype=torch.float32, device=grid.device)  # W, H, D as the grid's x, y, z
    index = ((grid + 1) * extent - 1) / 2  # align_corners=False: voxel centre i sits at (2 i + 1) / n - 1
    return index.flip(-1).permute(0, 4, 1, 2, 3) - identity_grid(size, grid.device)


def sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """The sampling grid (1, D, H, W, 3) in normalised coordinates (align_corners=False) of a displacement
    (1, 3, D, H, W) in voxels along D, H, W: sampling with it is sampling at x + flow(x)."""
    identity = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *flow.shape[2:]], align_corners=False)
    return identity + normalised_flow(flow)


def normalised_flow(flow: torch.Tensor) -> torch.Tensor:
    """A displacement (1, 3, D, H, W) in voxels along D, H, W as an offset (1, D, H, W, 3) of a sampling grid
    in normalised coordinates (align_corners=False, x = W first): the inverse of ``flow_of_grid``'s step."""
    size = tuple(flow.shape[2:])
    scale = torch.tensor([2.0 / n for n in size[::-1]], dtype=flow.dtype, device=flow.device).view(1, 1, 1, 1, 3)
    return flow.permute(0, 2, 3, 4, 1).flip(-1) * scale


def csf_of(generation: torch.Tensor) -> torch.Tensor:
    """Where a generation label map (1, 1, *size) has the CSF class inside the brain, bool."""
    return (generation > HEAD_LAYERS) & ((generation - 1 - HEAD_LAYERS) % TISSUES == 0)


def expansion_flow(region: torch.Tensor, amplitude: float, sd: float) -> torch.Tensor:
    """A diffeomorphic displacement (1, 3, D, H, W), voxels along D, H, W, that grows ``region`` (1, 1, D, H, W):
    the velocity is the gradient of the region blurred by ``sd`` voxels, scaled to ``amplitude`` voxels at the
    edge of a large region (less at thin ones) and capped there, so sampling at x + flow(x) draws the region
    outwards (atrophy: wider ventricles and sulci, tissue pushed away from them)."""
    smooth = blur(region.float(), np.full(3, sd))[0, 0]
    velocity = torch.stack(torch.gradient(smooth), 0)[None] * (amplitude * math.sqrt(2 * math.pi) * sd)
    velocity = velocity * (amplitude / velocity.norm(dim=1, keepdim=True).clamp_min(amplitude))
    size = tuple(region.shape[2:])
    half = tuple(max(2, n // 2) for n in size)  # integrated at half size (voxels of that grid), as it is smooth
    half_velocity = F.interpolate(velocity, size=half, mode="trilinear", align_corners=False) / 2
    return displacement_from_velocity(half_velocity, size, steps=5)


def blur(image: torch.Tensor, sds: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, D, H, W) with one SD (voxels) per axis; SD < 0.1 is skipped."""
    for axis, sd in enumerate(sds):
        if sd < 0.1:
            continue
        radius = max(1, math.ceil(3 * sd))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sd) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(x)
        padding = [0, 0, 0]
        padding[axis] = radius
        image = F.conv3d(image, (kernel / kernel.sum()).view(shape), padding=tuple(padding))
    return image


def thick_slices(image: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Resolution loss along one axis: average into slices ``factor`` voxels thick and interpolate back."""
    size = list(image.shape[2:])
    coarse = list(size)
    coarse[axis] = max(2, round(size[axis] / factor))
    small = F.adaptive_avg_pool3d(image, coarse)
    return F.interpolate(small, size=size, mode="trilinear", align_corners=False)
