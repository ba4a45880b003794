"""Training: scan-to-scan or atlas VoxelMorph with optional label supervision, resumable."""

import csv
import math
import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import losses, metrics, variants
from .devices import autocast, training_dtype, weight_layout
from .errors import Cancelled, InputError
from .files import atomic_path
from .images import check_image, check_labels, read_image
from .layers import ResizeTransform, SpatialTransformer, downsample
from .models import load_model, resolve_model, save_model
from .networks import VxmDense
from .orientation import AnatomyOrientation
from .preprocess import grid_for, level_factor, prepare, resample
from .synth import (
    TISSUE_LABELS,
    Synthesiser,
    SynthSettings,
    SynthSubject,
    blanked_region,
    flow_of_grid,
    make_subject,
    random_affine_matrix,
    tissue_map,
)


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in checkpoints and the model card)."""

    images: list[str]
    labels: list[str] | None = None
    val_images: list[str] = field(default_factory=list)
    val_labels: list[str] | None = None
    atlas: str | None = None
    atlas_labels: str | None = None
    mode: str = "scan"  # "scan": any subject to any subject (+ atlas pairs), "atlas": all to the atlas
    atlas_fraction: float = 0.3
    iterations: int = 1000
    lr: float = 1e-4
    smooth_weight: float = 1.0
    dice_weight: float = 1.0
    dice_labels_per_iteration: int = 16
    ncc_window: int = 9
    ncc_weight: float = 1.0  # weight of the local NCC of real pairs
    spacing_mm: float = 2.0
    features: str = "vm2"
    half_res: bool = True
    int_steps: int = 7
    augment: bool = True
    seed: int = 0
    val_every: int = 250
    checkpoint_every: int = 250
    synth_fraction: float = 0.0  # share of iterations on image pairs synthesised from the label maps
    known_fraction: float = 0.0  # of those, the share drawn from one label map and a deformed copy of it
    field_weight: float = 0.0  # weight of the squared end-point error against a known pair's deformation
    rescan_fraction: float = 0.0  # share of iterations on a real image and a deformed copy (variants.rescan_pair)
    csf_expansion: float = 0.0  # share of synthesised label maps with tissue pushed away from CSF (older brains)
    tissue_weight: float = 0.0  # weight of the soft Dice of the brain's tissue classes (synth.tissue_map), every pair
    fill_blanked: float = 0.0  # share of real pairs whose blanked structures are drawn in (variants.fill_blanked)
    init_model: str | None = None  # warm start from a model file (or 'bundled')
    residual_stage: bool = False  # train a second stage on top of the frozen --init-model (networks.VxmDense)
    fine_stage: bool = False  # train a full-resolution last stage on top of the frozen --init-model
    all_stages: bool = False  # train every stage together (fine-tuning a cascade end to end) instead of the newest


@dataclass
class Subject:
    """One decoded training subject, cached in memory at the training resolution."""

    name: str
    image: torch.Tensor  # (1, 1, D, H, W) float32 in [0, 1], at the training spacing
    soft_labels: torch.Tensor | None  # (1, L, D, H, W) uint8, 255 x fraction of each label
    soft_tissues: torch.Tensor | None  # (1, TISSUE_LABELS, D, H, W) uint8, the same of each synth.tissue_map class
    labels: np.ndarray | None  # full-resolution label map, for validation Dice
    blanked: np.ndarray | None = None  # (D, H, W) bool at the training spacing: structures the image blanked out


def load_subject(image_path: str, label_path: str | None, label_set: list[int], grid: sitk.Image, factor: int,
                 for_synthesis: bool = False, tissues: bool = False) -> tuple[Subject, SynthSubject | None]:
    """Read and check one subject and put it through ``prepare`` on the training grid (as registration
    does), downsampled to the network level; with ``for_synthesis`` also its synthesis label map, and with
    ``tissues`` as well the soft maps of its tissue classes (``synth.tissue_map``) for a tissue loss."""
    image = check_image(read_image(image_path, "training image"), f"training image {image_path}")
    name = Path(image_path).name.split(".")[0]
    prepared = prepare(image, grid)
    small = downsample(torch.from_numpy(prepared)[None, None], factor)
    labels = soft = soft_tissues = synthetic = blanked = None
    if label_path is not None:
        label_image = check_labels(read_image(label_path, "training labels"), image, f"labels {label_path}")
        on_grid = resample(label_image, grid, labels=True)
        labels = sitk.GetArrayFromImage(on_grid)
        soft = _soft_maps(labels, label_set, factor)
        region = blanked_region(prepared, labels)
        blanked = downsample(torch.from_numpy(region).float()[None, None], factor)[0, 0].numpy() > 0.5
        if for_synthesis:
            synthetic = make_subject(name, resample(image, grid), on_grid, label_set, region)
            if tissues:
                classes = tissue_map(synthetic.generation.long())[0, 0].numpy()
                soft_tissues = _soft_maps(classes, list(range(1, TISSUE_LABELS + 1)), factor)
    return Subject(name, small.contiguous(), soft, soft_tissues, labels, blanked), synthetic


def _soft_maps(labels: np.ndarray, ids: list[int], factor: int) -> torch.Tensor:
    """(1, len(ids), ...) uint8: 255 x the fraction of each label in every voxel of the network level."""
    return torch.cat([(downsample(torch.from_numpy(labels == i).float()[None, None], factor) * 255).round()
                      .to(torch.uint8) for i in ids], dim=1)


def augment_pair(moving: torch.Tensor, fixed: torch.Tensor, moving_soft: torch.Tensor | None,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random small affine on the moving side; random gamma and noise on both intensities."""
    theta = random_affine_matrix(rng, rotation_deg=4.0, scale=0.04, shear=0.0, shift=0.03)
    grid = F.affine_grid(theta, list(moving.shape), align_corners=True)
    moving = F.grid_sample(moving, grid, align_corners=True, padding_mode="border")
    if moving_soft is not None:
        moving_soft = F.grid_sample(moving_soft, grid, align_corners=True)
    return jitter(moving, rng), jitter(fixed, rng), moving_soft


def jitter(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random gamma and a little noise on an image in [0, 1]."""
    image = image.clamp(0, 1) ** float(np.exp(rng.uniform(-0.2, 0.2)))
    noise = torch.from_numpy(rng.normal(0, 0.01, image.shape).astype(np.float32))
    return (image + noise).clamp(0, 1)


class Trainer:
    """Holds data, network and optimiser; ``run`` trains with validation and checkpoints."""

    def __init__(self, config: TrainConfig, out: Path, device: torch.device,
                 progress: Callable[[str, float], None] | None = None, warm_start: bool = True,
                 precision: str = "auto") -> None:
        self.config, self.out, self.device = config, Path(out), device
        self.progress = progress or (lambda stage, fraction: None)
        self._load_data()
        # a property of the machine, like the device, not of the recipe (a run may resume in another precision)
        self.dtype = training_dtype(device, self.grid.GetSize()[2] // self.factor, precision)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.net = VxmDense(config.features, config.half_res, config.int_steps, config.residual_stage,
                            config.fine_stage)
        if config.init_model and warm_start:  # a resumed run takes its weights from the checkpoint
            self._warm_start(config.init_model)
        for stage in [] if config.all_stages else self.net.stages()[:-1]:  # only the newest stage learns
            for parameter in (p for module in stage for p in module.parameters()):
                parameter.requires_grad_(False)
        self.net.to(device, memory_format=weight_layout(device))
        self.synthesiser = Synthesiser(SynthSettings(expansion_probability=config.csf_expansion))
        self.best_score = -math.inf
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.iteration = 0
        self.seconds = 0.0  # training wall time over all chunks
        self.history: list[dict] = []
        self.transformer = SpatialTransformer()

    def _warm_start(self, model: str) -> None:
        """Weights of a model file. A model without this run's last stage grows it: the new stage starts
        with the weights of the model's own last UNet where their shapes agree (its flow head is
        zero-initialised, so the grown network starts as the given model)."""
        net, record = load_model(resolve_model(model))
        newest = "fine_stage" if self.net.config["fine_stage"] else "residual_stage"
        grows = self.net.config[newest] and net.config == {**self.net.config, newest: False}
        if (net.config != self.net.config and not grows) or record["spacing_mm"] != self.config.spacing_mm:
            raise InputError(f"--init-model {model}: its architecture {net.config} at {record['spacing_mm']} mm "
                             f"differs from this run's {self.net.config} at {self.config.spacing_mm} mm")
        self.net.load_state_dict(net.state_dict(), strict=not grows)
        if grows:
            given, grown = net.stages()[-1][0].state_dict(), self.net.stages()[-1][0]
            start = grown.state_dict()
            start.update({key: value for key, value in given.items()
                          if key in start and value.shape == start[key].shape})
            grown.load_state_dict(start)

    def _load_data(self) -> None:
        c = self.config
        for option, value, valid, rule in (
                ("--iterations", c.iterations, c.iterations >= 0, ">= 0"), ("--lr", c.lr, c.lr > 0, "> 0"),
                ("--smooth-weight", c.smooth_weight, c.smooth_weight >= 0, ">= 0"),
                ("--field-weight", c.field_weight, c.field_weight >= 0, ">= 0"),
                ("--val-every", c.val_every, c.val_every > 0, "> 0"),
                ("--checkpoint-every", c.checkpoint_every, c.checkpoint_every > 0, "> 0"),
                ("--atlas-fraction", c.atlas_fraction, 0 <= c.atlas_fraction <= 1, "in [0, 1]"),
                ("--synth-fraction", c.synth_fraction, 0 <= c.synth_fraction <= 1, "in [0, 1]"),
                ("--known-fraction", c.known_fraction, 0 <= c.known_fraction <= 1, "in [0, 1]"),
                ("--csf-expansion", c.csf_expansion, 0 <= c.csf_expansion <= 1, "in [0, 1]"),
                ("--fill-blanked", c.fill_blanked, 0 <= c.fill_blanked <= 1, "in [0, 1]"),
                ("--ncc-weight", c.ncc_weight, c.ncc_weight >= 0, ">= 0")):
            if not valid:
                raise InputError(f"{option} must be {rule}, not {value}")
        for option, path in (("--atlas", c.atlas), ("--atlas-labels", c.atlas_labels)):
            if path and not Path(path).is_file():
                raise InputError(f"{option} file not found: {path}")
        if c.synth_fraction > 0 and not c.labels:
            raise InputError("synthesis (--synth-fraction > 0) needs training label maps (--labels)")
        if c.known_fraction > 0 and c.synth_fraction == 0:
            raise InputError("--known-fraction is a share of the synthesised pairs: give --synth-fraction too")
        if not 0 <= c.rescan_fraction <= 1 - c.synth_fraction:
            raise InputError(f"--rescan-fraction must be in [0, 1 - synth fraction], not {c.rescan_fraction}")
        if c.rescan_fraction > 0 and (not c.labels or c.field_weight <= 0):
            raise InputError("rescan pairs (--rescan-fraction > 0) need training label maps (--labels, for the brain "
                             "outline) and --field-weight > 0 (their loss)")
        if c.tissue_weight < 0 or (c.tissue_weight > 0 and not c.labels):
            raise InputError(f"--tissue-weight must be >= 0 and needs training label maps (--labels), "
                             f"not {c.tissue_weight}")
        if (c.residual_stage or c.fine_stage) and not (c.init_model or c.all_stages):
            raise InputError("--residual-stage and --fine-stage train a stage on top of a trained model: "
                             "give --init-model (or --all-stages to train the whole cascade from scratch)")
        if c.ncc_window < 3 or c.ncc_window % 2 == 0:
            raise InputError(f"--ncc-window must be an odd number of voxels >= 3, not {c.ncc_window}")
        if c.synth_fraction > 0 and c.dice_weight <= 0:
            raise InputError("synthesis (--synth-fraction > 0) trains on label overlap: --dice-weight must be > 0")
        if not c.images:
            raise InputError("no training images given")
        if c.mode not in ("scan", "atlas"):
            raise InputError(f"mode must be 'scan' or 'atlas', not {c.mode!r}")
        if c.mode == "atlas" and c.atlas is None:
            raise InputError("atlas mode needs --atlas")
        for given, images, what in ((c.labels, c.images, "training"), (c.val_labels, c.val_images, "validation")):
            if given is not None and len(given) != len(images):
                raise InputError(f"{len(images)} {what} images but {len(given)} label maps")
        all_labels = (c.labels or []) + (c.val_labels or []) + ([c.atlas_labels] if c.atlas_labels else [])
        self.label_set: list[int] = []
        for path in all_labels:
            self.label_set = sorted(set(self.label_set) | set(metrics.label_ids(
                sitk.GetArrayFromImage(read_image(path, "labels")))))
        self.factor = level_factor(c.spacing_mm)
        # one training grid for all subjects: the working grid of the first image, over its whole extent, its axes
        # along that image's anatomy as in registration
        first = check_image(read_image(c.images[0], "training image"))
        self.grid = grid_for(first, None, c.spacing_mm, 0.0, AnatomyOrientation().execute(first).working_axes())
        subjects = len(c.images) + len(c.val_images) + (1 if c.atlas else 0)
        soft_bytes = len(self.label_set) * subjects * np.prod(self.grid.GetSize()) / self.factor ** 3
        if c.labels and soft_bytes > MAX_LABEL_BYTES:
            raise InputError(f"{len(self.label_set)} labels x {subjects} subjects need {soft_bytes / 1e9:.1f} GB of "
                             f"label maps at the training spacing (limit {MAX_LABEL_BYTES / 1e9:.0f} GB): merge labels "
                             "or train on fewer subjects")
        self.progress("decoding", 0.0)

        def load(paths: list[str], label_paths: list[str] | None) -> tuple[list[Subject], list[SynthSubject]]:
            subjects, synthetic = [], []
            for n, path in enumerate(paths):
                label = label_paths[n] if label_paths else None
                subject, generation = load_subject(path, label, self.label_set, self.grid, self.factor,
                                                   for_synthesis=label is not None, tissues=c.tissue_weight > 0)
                subjects.append(subject)
                if generation is not None:
                    synthetic.append(generation)
            return subjects, synthetic

        self.train_subjects, self.synth_subjects = load(c.images, c.labels)
        self.val_subjects, val_synthetic = load(c.val_images, c.val_labels)
        atlas, atlas_synthetic = load([c.atlas], [c.atlas_labels] if c.atlas_labels else None) if c.atlas else ([], [])
        self.atlas = atlas[0] if atlas else None
        self.synth_subjects += atlas_synthetic
        # tissue labels of the validation subjects and the atlas on the training grid (val_tissue_dice)
        self.val_tissues = {g.name: tissue_map(g.generation.long())[0, 0].numpy()
                            for g in val_synthetic + atlas_synthetic}
        # outside-brain distance at the network level, for the head variant and rescan pairs
        self.val_distance = {g.name: downsample(g.distance, self.factor) for g in val_synthetic + atlas_synthetic}
        self.train_distance = {g.name: downsample(g.distance, self.factor) for g in self.synth_subjects}

    def sample(self, iteration: int) -> tuple[torch.Tensor, ...]:
        """The training pair of an iteration, reproducible from (seed, iteration)."""
        c = self.config
        rng = np.random.default_rng([c.seed, iteration])
        draw = rng.random() if c.synth_fraction + c.rescan_fraction > 0 else 1.0  # no draw: older runs' streams
        if draw < c.synth_fraction:
            return self.sample_synthetic(rng)
        if draw < c.synth_fraction + c.rescan_fraction:
            return self.sample_rescan(rng)
        pool = self.train_subjects
        moving = pool[rng.integers(len(pool))]
        if self.atlas is not None and (c.mode == "atlas" or rng.random() < c.atlas_fraction):
            fixed = self.atlas
        else:
            others = [s for s in pool if s is not moving] or pool
            fixed = others[rng.integers(len(others))]
        use_labels = c.dice_weight > 0 and moving.soft_labels is not None and fixed.soft_labels is not None
        chosen = None
        if use_labels:
            n = min(c.dice_labels_per_iteration, len(self.label_set))
            chosen = torch.from_numpy(np.sort(rng.choice(len(self.label_set), n, replace=False)))
        m_soft = self._soft(moving, chosen) if use_labels else None
        f_soft = self._soft(fixed, chosen) if use_labels else None
        m_image, f_image = moving.image, fixed.image
        if c.fill_blanked > 0 and rng.random() < c.fill_blanked:  # no draw without it: older runs' streams
            m_image, f_image = (self._filled(subject, rng) for subject in (moving, fixed))
        if c.augment:
            m_image, f_image, m_soft = augment_pair(m_image, f_image, m_soft, rng)
        return m_image, f_image, m_soft, f_soft, None, "real"

    def _filled(self, subject: Subject, rng: np.random.Generator) -> torch.Tensor:
        """The subject's image with its blanked structures drawn in (``variants.fill_blanked``)."""
        if subject.blanked is None:
            return subject.image
        image = variants.fill_blanked(subject.image[0, 0].numpy(), subject.blanked, rng, self.config.spacing_mm)
        return torch.from_numpy(image)[None, None]

    def _soft(self, subject: Subject, chosen: torch.Tensor) -> torch.Tensor:
        """Soft maps (1, C, ...) in [0, 1] of the ``chosen`` labels, then, with ``tissue_weight``, of the
        TISSUE_LABELS tissue classes (the last channels, scored by ``step`` with their own weight)."""
        maps = subject.soft_labels[:, chosen]
        if self.config.tissue_weight > 0:
            maps = torch.cat([maps, subject.soft_tissues], dim=1)
        return maps.float() / 255

    def sample_rescan(self, rng: np.random.Generator) -> tuple:
        """A real training image and a copy of it under a known deformation (``variants.rescan_pair``), each
        with its own gamma and noise; scored by the end-point error inside the fixed head and by label overlap."""
        pool = [s for s in self.train_subjects if s.name in self.train_distance]
        subject = pool[rng.integers(len(pool))]
        n = min(self.config.dice_labels_per_iteration, len(self.label_set))
        chosen = torch.from_numpy(np.sort(rng.choice(len(self.label_set), n, replace=False)))
        moving, fixed, m_soft, f_soft, flow, head = variants.rescan_pair(
            subject.image, self.train_distance[subject.name], self._soft(subject, chosen), rng,
            self.config.spacing_mm)
        moving, fixed = (jitter(image, rng) for image in (moving, fixed))
        return moving, fixed, m_soft, f_soft, torch.cat([flow, head.float()], dim=1), "rescan"

    def sample_synthetic(self, rng: np.random.Generator) -> tuple:
        """A pair synthesised from two label maps (the same one with probability 0.2), one-hot maps of
        a random subset of brain structures; no image similarity (contrasts differ by design). With
        ``known_fraction``: a pair drawn from one label map and a randomly deformed copy of it, each with
        its own contrast, whose flow is known (the end-point error sees every voxel of the head, not
        only structure boundaries). With ``tissue_weight`` the brain's tissue classes (``synth.tissue_map``:
        sulcal and ventricular CSF, grey and white matter) follow the structures' channels."""
        c = self.config
        pool = self.synth_subjects
        moving = pool[rng.integers(len(pool))]
        size = tuple(n // self.factor for n in moving.generation.shape[2:])
        is_known = c.known_fraction > 0 and rng.random() < c.known_fraction
        known = None
        if is_known:
            m_image, f_image, m_structures, f_structures, flow, head, m_tissues, f_tissues = \
                self.synthesiser.known_pair(moving, rng, size)
            known = torch.cat([flow, head.float()], dim=1)  # the flow, and where it is scored
        else:
            fixed = moving if rng.random() < 0.2 else pool[rng.integers(len(pool))]
            m_image, f_image, m_structures, f_structures, m_tissues, f_tissues = \
                self.synthesiser.pair(moving, fixed, rng, size)
        n = min(c.dice_labels_per_iteration, len(self.label_set))
        chosen = torch.from_numpy(np.sort(rng.choice(len(self.label_set), n, replace=False)) + 1).view(1, -1, 1, 1, 1)
        m_soft, f_soft = (m_structures == chosen).float(), (f_structures == chosen).float()
        if c.tissue_weight > 0:
            tissues = torch.arange(1, TISSUE_LABELS + 1).view(1, -1, 1, 1, 1)
            m_soft = torch.cat([m_soft, (m_tissues == tissues).float()], dim=1)
            f_soft = torch.cat([f_soft, (f_tissues == tissues).float()], dim=1)
        return m_image, f_image, m_soft, f_soft, known, "known" if is_known else "synthetic"

    def step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """One optimisation step; returns the loss terms."""
        c = self.config
        *tensors, kind = batch  # "real", "synthetic", or "known" and "rescan" (label overlap, plus the known flow)
        use_similarity = kind == "real"
        moving, fixed, m_soft, f_soft, known = (t.to(self.device) if t is not None else None for t in tensors)
        with autocast(self.device, self.dtype):
            warped, flow, velocity = self.net(moving, fixed)
        smooth = losses.grad(velocity.float())
        loss = c.smooth_weight * smooth
        terms = {"smooth": smooth.item(), "synthetic": int(kind in ("synthetic", "known")),
                 "rescan": int(kind == "rescan")}
        if use_similarity:
            similarity = losses.ncc(fixed, warped.float(), c.ncc_window)
            loss = loss + c.ncc_weight * similarity
            terms["ncc"] = similarity.item()
        if known is not None and c.field_weight > 0:  # squared end-point error inside the fixed head
            error = losses.weighted_mean(((flow.float() - known[:, :3]) ** 2).sum(1, keepdim=True), known[:, 3:])
            loss = loss + c.field_weight * error
            terms["field"] = error.item()
        if m_soft is not None:
            warped_soft = self.transformer(m_soft, flow.float())
            structures = m_soft.shape[1] - (TISSUE_LABELS if c.tissue_weight > 0 else 0)
            overlap = losses.dice(f_soft[:, :structures], warped_soft[:, :structures])
            loss = loss + c.dice_weight * overlap
            terms["dice"] = -overlap.item()
            if c.tissue_weight > 0:
                tissue = losses.dice(f_soft[:, structures:], warped_soft[:, structures:])
                loss = loss + c.tissue_weight * tissue
                terms["tissue"] = -tissue.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        terms["loss"] = loss.item()
        return terms

    def _variant(self, subject: Subject, kind: str, seed: int) -> torch.Tensor:
        image = subject.image[0, 0].numpy()
        distance = self.val_distance.get(subject.name)
        if (kind == "head" and distance is None) or (kind == "cerebellum" and subject.blanked is None):
            return subject.image
        out = variants.variant(image, kind, None if distance is None else distance[0, 0].numpy(), seed,
                               voxel_mm=self.config.spacing_mm, blanked=subject.blanked)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None, None]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean Dice on validation pairs (each to the atlas, else to the next subject) for every
        validation variant (moving image with another contrast; both with a synthetic head), the worst
        of them, and % folding of the plain pairs; measured at full resolution on the hard label maps."""
        self.net.eval()
        subjects = self.val_subjects
        pairs = [(s, self.atlas) for s in subjects] if self.atlas is not None else list(
            zip(subjects, subjects[1:] + subjects[:1], strict=True))
        pairs = [(m, f) for m, f in pairs if m.labels is not None and f.labels is not None]
        result: dict[str, float] = {}
        for kind in variants.VARIANTS:
            dices = []
            for n, (moving, fixed) in enumerate(pairs):
                m_image = self._variant(moving, kind, n)
                f_image = self._variant(fixed, kind, 1000 + n) if kind in variants.BOTH_IMAGES else fixed.image
                dice, folding, tissue = self._validate_pair(moving, fixed, m_image, f_image, kind == "plain")
                dices.append(dice)
                if folding is not None:
                    result.setdefault("folds", []).append(folding)
                if tissue is not None:
                    result.setdefault("tissue", []).append(tissue)
            if dices:
                result[f"val_dice_{kind}"] = float(np.mean(dices))
        errors = [self._head_field_error(s, 2000 + n) for n, s in enumerate(subjects) if s.name in self.val_distance]
        self.net.train()
        if not result:
            return {}
        if errors:
            result["val_head_epe_mm"] = float(np.mean(errors))
        folds, tissue = result.pop("folds"), result.pop("tissue", None)
        result["val_dice"] = result["val_dice_plain"]
        result["val_worst"] = min(v for k, v in result.items() if k.startswith("val_dice_"))
        if tissue:
            result["val_tissue_dice"] = float(np.mean(tissue))
        result["val_folding_percent"] = float(np.mean(folds))
        return result

    def _validate_pair(self, moving: Subject, fixed: Subject, m_image: torch.Tensor, f_image: torch.Tensor,
                       plain: bool) -> tuple[float, float | None, float | None]:
        """Mean Dice over the fixed labels for one pair; for a ``plain`` pair also % folding in them and
        the mean Dice of the tissue labels (``synth.tissue_map``) where both subjects have them."""
        _, flow, _ = self.net(m_image.to(self.device), f_image.to(self.device))
        size = fixed.labels.shape
        full = ResizeTransform(size[0] / flow.shape[2])(flow, size)

        def mean_dice(moving_labels: np.ndarray, fixed_labels: np.ndarray) -> float:
            labels = torch.from_numpy(moving_labels.astype(np.float32))[None, None].to(self.device)
            warped = SpatialTransformer("nearest")(labels, full)[0, 0].cpu().numpy().astype(np.int64)
            ids = metrics.label_ids(fixed_labels)
            return float(np.nanmean(list(metrics.dice(fixed_labels, warped, ids).values())))

        dice = mean_dice(moving.labels, fixed.labels)
        if not plain:
            return dice, None, None
        vectors = np.moveaxis(full[0].cpu().numpy()[::-1], 0, -1)  # (K, J, I, 3) voxels (i, j, k)
        det = metrics.jacobian_determinant(vectors, np.eye(3))
        tissue = None
        if moving.name in self.val_tissues and fixed.name in self.val_tissues:
            tissue = mean_dice(self.val_tissues[moving.name], self.val_tissues[fixed.name])
        return dice, metrics.folding_percent(det, fixed.labels > 0), tissue

    def _head_field_error(self, subject: Subject, seed: int) -> float:
        """Mean end-point error (mm) inside the head when ``subject`` with a synthetic head is registered
        to a copy of itself deformed by a known smooth random field (largest HEAD_FIELD_MM there): the
        whole-head proxy at the network level. Computed in ``validate``'s no-grad, eval mode."""
        moving = self._variant(subject, "head", seed).to(self.device)
        size = tuple(moving.shape[2:])
        head = (self.val_distance[subject.name] < sum(variants.HEAD_LAYERS_MM)).float().to(self.device)
        truth = flow_of_grid(self.synthesiser.deformation(np.random.default_rng(seed), size, affine=False))
        truth = truth.to(self.device)
        truth *= HEAD_FIELD_MM / self.config.spacing_mm / truth.norm(dim=1)[head[:, 0] > 0].max().clamp_min(1e-6)
        fixed = self.transformer(moving, truth)
        inside = self.transformer(head, truth)[:, 0] > 0.5
        _, flow, _ = self.net(moving, fixed)
        return float((flow - truth).norm(dim=1)[inside].mean()) * self.config.spacing_mm

    def _keep_best(self, row: dict) -> None:
        """Write ``out/best_model.pt`` when the worst validation variant is the best seen so far."""
        score = row.get("val_worst")
        if score is not None and score > self.best_score:
            self.best_score = score
            self.export_model(hardware_description(self.device, self.dtype), "best_model.pt")

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Resumable state: weights, optimiser, iteration, history, config."""
        state = {"config": asdict(self.config), "iteration": self.iteration, "seconds": self.seconds,
                 "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "history": self.history}
        with atomic_path(self.checkpoint_path()) as tmp:
            torch.save(state, tmp)

    def resume(self) -> None:
        """Continue from ``out/checkpoint.pt`` (weights, optimiser, iteration, history)."""
        path = self.checkpoint_path()
        if not path.is_file():
            raise InputError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = {**asdict(TrainConfig(images=[])), **state["config"]}  # settings added since: their defaults
        changed = _changed_settings(saved, asdict(self.config))
        if changed:
            raise InputError(f"--resume: this run's settings differ from the checkpoint's: {', '.join(changed)} "
                             "(use the same command, or a new --out)")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.history = state["iteration"], state["history"]
        self.best_score = max((h["val_worst"] for h in self.history if "val_worst" in h), default=-math.inf)
        self.seconds = state["seconds"]
        _write_csv(self.out / "log.csv", self.history)  # rows logged after the checkpoint are dropped

    def export_model(self, hardware: str, name: str = "model.pt") -> Path:
        """Write ``out/<name>``: a self-describing model file with the training record."""
        c = self.config
        validations = [h for h in self.history if "val_dice" in h]
        record = {
            "name": self.out.name,
            "training": {"config": asdict(c), "iterations": self.iteration, "seconds": round(self.seconds),
                         "hardware": hardware, "label_set": self.label_set,
                         "train_subjects": [s.name for s in self.train_subjects],
                         "val_subjects": [s.name for s in self.val_subjects],
                         "atlas": self.atlas.name if self.atlas else None},
            "validation": validations[-1] if validations else {},
        }
        path = self.out / name
        save_model(path, self.net, c.spacing_mm, record)  # copies the weights to the CPU; the network stays
        return path

    def run(self, iterations: int | None = None, workers: int = 0) -> None:
        """Train up to ``config.iterations`` (or ``iterations`` more), validating and checkpointing; the pairs are
        drawn by ``workers`` processes (0: one background thread)."""
        c = self.config
        stop = c.iterations if iterations is None else self.iteration + iterations
        log_path = self.out / "log.csv"
        self.net.train()
        pairs = training_pairs(self.sample, self.iteration, stop, workers)
        try:
            while self.iteration < stop:
                tick = time.time()
                batch = next(pairs)
                waited = time.time() - tick  # the step waiting for its pair: synthesis slower than the step
                tick += waited
                terms = self.step(batch)
                self.seconds += time.time() - tick
                self.iteration += 1
                row = {"iteration": self.iteration, "seconds": round(self.seconds, 2), "wait": round(waited, 3),
                       **terms}
                if self.iteration % c.val_every == 0 or self.iteration == stop:
                    row.update(self.validate())
                self.history.append(row)
                self._keep_best(row)
                _append_csv(log_path, row)
                if self.iteration % c.checkpoint_every == 0 or self.iteration == stop:
                    self.save_checkpoint()
                    plot_history(self.history, self.out / "learning_curves.png")
                try:
                    self.progress("training", self.iteration / stop)
                except Cancelled:
                    self.save_checkpoint()
                    raise
        finally:
            pairs.close()


def training_pairs(sample: Callable[[int], tuple], start: int, stop: int, workers: int = 0) -> Iterator[tuple]:
    """``sample(i)`` for i in [start, stop), in order, drawn ahead of the training step: by one background thread
    (``workers`` 0), or by that many forked processes (synthesis is CPU work: on a GPU one drawer takes several
    times the network step, which then waits for it). The pairs are the same either way: each is drawn from
    (seed, iteration) alone."""
    if workers <= 0:
        yield from _pairs_in_a_thread(sample, start, stop)
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        raise InputError("--workers needs processes started by fork (Linux, macOS): use --workers 0 here")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                               initargs=(sample,))
    ahead: deque[Future] = deque()
    try:
        for iteration in range(start, stop):
            while len(ahead) < 2 * workers and iteration + len(ahead) < stop:
                ahead.append(pool.submit(_sample_in_worker, iteration + len(ahead)))
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _pairs_in_a_thread(sample: Callable[[int], tuple], start: int, stop: int) -> Iterator[tuple]:
    """``training_pairs`` by one producer thread, two pairs ahead."""
    batches: queue.Queue = queue.Queue(maxsize=2)

    def producer() -> None:
        try:
            for it in range(start, stop):
                batches.put(sample(it))
        except Exception as exc:  # handed to the training loop, which raises it
            batches.put(exc)

    threading.Thread(target=producer, daemon=True).start()
    for _ in range(start, stop):
        batch = batches.get()
        if isinstance(batch, Exception):
            raise batch
        yield batch


_WORKER_SAMPLE: Callable[[int], tuple] | None = None  # a worker process's sampler, set there by _start_worker


def _start_worker(sample: Callable[[int], tuple]) -> None:
    """A worker process: one torch thread (the workers are the parallelism) and the sampler it inherited by fork."""
    global _WORKER_SAMPLE
    torch.set_num_threads(1)
    _WORKER_SAMPLE = sample


def _sample_in_worker(iteration: int) -> tuple:
    return _WORKER_SAMPLE(iteration)


MAX_LABEL_BYTES = 4e9  # one-hot label maps of all subjects, uint8 at the training spacing
LOG_COLUMNS = ["iteration", "seconds", "wait", "synthetic", "rescan", "loss", "ncc", "smooth", "dice", "field",
               "tissue", "val_dice", "val_worst", *[f"val_dice_{kind}" for kind in variants.VARIANTS],
               "val_folding_percent", "val_head_epe_mm", "val_tissue_dice"]
HEAD_FIELD_MM = 6.0  # largest displacement inside the head of the whole-head validation proxy
RESUMABLE_CHANGES = {"iterations", "val_every", "checkpoint_every"}  # settings a resumed run may change


def _changed_settings(saved: dict, current: dict) -> list[str]:
    """Names of the training settings (other than RESUMABLE_CHANGES) that differ between two configs."""
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_history(history: list[dict], path: Path) -> None:
    """Learning curves (training loss terms smoothed, validation Dice) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.array([h["iteration"] for h in history])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("ncc", "dice"):
        values = np.array([h.get(key, np.nan) for h in history], dtype=float)
        if np.isfinite(values).any():
            k = max(1, len(values) // 50)
            smooth = np.convolve(np.nan_to_num(values), np.ones(k) / k, mode="valid")
            axes[0].plot(it[k - 1:], np.abs(smooth), label=f"|{key}| (train, running mean)")
    axes[0].set_xlabel("iteration")
    axes[0].legend()
    val = [(h["iteration"], h["val_dice"]) for h in history if "val_dice" in h]
    if val:
        axes[1].plot(*zip(*val, strict=True), "o-")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("validation mean Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def hardware_description(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Device, thread count and the training steps' convolution precision, for the model card."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return name + (f", {str(dtype).removeprefix('torch.')} convolutions" if dtype is not None else "")

