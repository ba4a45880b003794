"""Checks of a registration's inputs, torch-free, so that the command line can refuse bad input before
its slow stages (the affine alignment, the torch import) and ``register`` checks the same way."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import images, metrics
from .errors import InputError
from .preprocess import check_scale


@dataclass
class CheckedInputs:
    """Label maps as int32 and masks as uint8 0/1 (None when not given), label ids present in each map."""

    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    fixed_ids: list[int]
    moving_ids: list[int]

    @property
    def shared_ids(self) -> list[int]:
        return sorted(set(self.fixed_ids) & set(self.moving_ids))


def check_inputs(fixed: sitk.Image, moving: sitk.Image, *, fixed_labels: sitk.Image | None = None,
                 moving_labels: sitk.Image | None = None, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None, smoothness: float = 1.0,
                 fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None) -> CheckedInputs:
    """Check everything ``register`` is given except the model and device; InputError names the problem."""
    images.check_image(fixed, "fixed image")
    images.check_image(moving, "moving image")
    check_scale(fixed, "fixed image")
    check_scale(moving, "moving image")
    check_memory(fixed, moving)
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving labels, or neither")
    fixed_ids: list[int] = []
    moving_ids: list[int] = []
    if fixed_labels is not None:
        fixed_labels = images.check_labels(fixed_labels, fixed, "fixed labels")
        moving_labels = images.check_labels(moving_labels, moving, "moving labels")
        fixed_ids = metrics.label_ids(sitk.GetArrayViewFromImage(fixed_labels))
        moving_ids = metrics.label_ids(sitk.GetArrayViewFromImage(moving_labels))
        if not set(fixed_ids) & set(moving_ids):
            raise InputError("fixed and moving label maps share no label")
    if not (math.isfinite(smoothness) and smoothness > 0):
        raise InputError(f"smoothness must be a positive number, not {smoothness}")
    if (fixed_points is None) != (moving_points is None) or (
            fixed_points is not None and np.shape(fixed_points) != np.shape(moving_points)):
        raise InputError("landmarks: give fixed and moving points with the same number of rows, matched by row")
    for points in (p for p in (fixed_points, moving_points) if p is not None):
        if np.ndim(points) != 2 or np.shape(points)[1] != 3:
            raise InputError(f"landmarks: points must be N x 3 (x, y, z in mm), not {np.shape(points)}")
        if not np.isfinite(points).all():
            raise InputError("landmarks: every coordinate must be finite")
    if fixed_mask is not None:
        fixed_mask = images.check_mask(fixed_mask, fixed, "fixed mask")
    if moving_mask is not None:
        moving_mask = images.check_mask(moving_mask, moving, "moving mask")
    return CheckedInputs(fixed_labels, moving_labels, fixed_mask, moving_mask, fixed_ids, moving_ids)


# peak resident memory of a command-line registration (register, all outputs written), fitted on LPBA40 pairs at 1 and
# 0.7 mm (4.9 and 14.4 M voxels each, 2026-12-08): 1.09 GB at 4.9 M + 4.9 M, +52 bytes a voxel of the fixed image
# (the outputs live on its grid), +19 a voxel of the moving one; rounded up, and 12 bytes a moving voxel more for the
# inverse field of --inverse
BASE_BYTES, BYTES_PER_FIXED_VOXEL, BYTES_PER_MOVING_VOXEL = 0.8e9, 60, 32
ASSUMED_MEMORY = 8e9  # bytes, where the available memory cannot be read (Windows)
MEMINFO, CGROUP = Path("/proc/meminfo"), Path("/sys/fs/cgroup")


def available_memory() -> float | None:
    """Bytes of memory available now: Linux's MemAvailable, less where a cgroup (a container) allows less; else
    the physical memory (sysconf: macOS); else None."""
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        lines = []
    free = [float(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    if free:
        try:
            limit, used = ((CGROUP / name).read_text().strip() for name in ("memory.max", "memory.current"))
            if limit != "max":
                return min(free[0], float(limit) - float(used))
        except (OSError, ValueError):
            pass
        return free[0]
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def peak_memory(fixed: sitk.Image, moving: sitk.Image) -> float:
    """Estimated peak bytes of registering ``moving`` to ``fixed``."""
    return BASE_BYTES + BYTES_PER_FIXED_VOXEL * fixed.GetNumberOfPixels() + \
        BYTES_PER_MOVING_VOXEL * moving.GetNumberOfPixels()


def check_memory(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Refuse a pair whose registration would need more memory than is available (ASSUMED_MEMORY if unknown)."""
    needed, available = peak_memory(fixed, moving), available_memory() or ASSUMED_MEMORY
    if needed > available:
        sizes = ", ".join(f"{what} {'x'.join(map(str, image.GetSize()))} ({image.GetNumberOfPixels() / 1e6:.0f} M "
                          "voxels)" for what, image in (("fixed image", fixed), ("moving image", moving)))
        raise InputError(f"{sizes}: registering them needs about {needed / 1e9:.1f} GB of memory, "
                         f"{available / 1e9:.1f} GB is available: resample to a coarser spacing (1 mm is enough for "
                         "the network) or crop first")
