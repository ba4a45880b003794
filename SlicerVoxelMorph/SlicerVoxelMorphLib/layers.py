"""Spatial layers: warping, integration of velocity fields, resizing of displacement fields.

Tensors are (batch, channel, D, H, W). A displacement field has 3 channels: the shift in voxels
along D, H and W (for images from SimpleITK arrays: along k, j, i).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def identity_grid(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Voxel coordinates of a grid, shape (1, 3, D, H, W)."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def at_least_single(dtype: torch.dtype) -> torch.dtype:
    """Float32, or ``dtype`` if wider: sampling coordinates and integrated fields are never rounded to half
    precision (bf16 autocast on CUDA hands the layers bf16 velocities; a bf16 grid is off by up to half a voxel)."""
    return torch.promote_types(dtype, torch.float32)


class SpatialTransformer(nn.Module):
    """Warp ``source`` by ``flow``: out(x) = source(x + flow(x)), linear or nearest interpolation."""

    def __init__(self, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation mode must be 'bilinear' or 'nearest', not {mode!r}")
        self.mode = mode

    def forward(self, source: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        shape = flow.shape[2:]
        coords = identity_grid(shape, flow.device) + flow
        scale = torch.tensor([2.0 / (n - 1) for n in shape], device=flow.device).view(1, 3, 1, 1, 1)
        coords = coords * scale - 1.0
        grid = coords.permute(0, 2, 3, 4, 1).flip(-1)  # grid_sample wants (x=W, y=H, z=D)
        dtype = at_least_single(source.dtype)
        return F.grid_sample(source.to(dtype), grid.to(dtype), mode=self.mode, padding_mode="border",
                             align_corners=True)


class VecInt(nn.Module):
    """Integrate a stationary velocity field by scaling and squaring (a diffeomorphism)."""

    def __init__(self, steps: int = 7) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError("integration steps must be >= 0")
        self.steps = steps

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        flow = velocity.to(at_least_single(velocity.dtype)) / (2 ** self.steps)
        for _ in range(self.steps):
            flow = compose_flows(flow, flow)
        return flow


class ResizeTransform(nn.Module):
    """Resize a displacement field by ``factor``, scaling its vectors (voxel units) by the same factor.

    Voxel centres are matched as in average pooling (``align_corners=False``): coarse voxel c covers
    fine voxels factor*c .. factor*c + factor - 1.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, flow: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        if self.factor == 1 and size is None:
            return flow
        if size is None:
            return self.factor * F.interpolate(flow, scale_factor=self.factor, mode="trilinear",
                                               align_corners=False)
        return self.factor * F.interpolate(flow, size=size, mode="trilinear", align_corners=False)


def sample_at(volume: torch.Tensor, index: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Trilinear samples of ``volume`` (1, C, D, H, W) at continuous voxel indices ``index``
    (..., 3) given as (i, j, k) = (W, H, D) order; outside: zero, or the nearest edge value with
    ``padding="border"``. Returns (C, ...)."""
    shape = volume.shape[2:]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape[::-1]], dtype=index.dtype, device=index.device)
    grid = (index * scale - 1.0).reshape(1, 1, 1, -1, 3)
    dtype = at_least_single(volume.dtype)
    out = F.grid_sample(volume.to(dtype), grid.to(dtype), mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(volume.shape[1], *index.shape[:-1])


def affine_on_grid(matrix: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """``matrix[:3] @ (i, j, k, 1)`` at every voxel index of a grid of ``shape`` (K, J, I): (K, J, I, 3)
    float32, as a sum of one broadcast term per axis (no coordinate arrays, no matrix product)."""
    matrix = torch.from_numpy(np.asarray(matrix, dtype=np.float64)[:3].T.astype(np.float32))  # rows: i, j, k, 1
    out = matrix[3].expand(*shape, 3).clone()
    for axis, n in enumerate(shape[::-1]):  # i, j, k -> tensor dims 2, 1, 0
        view = [1, 1, 1, 3]
        view[2 - axis] = n
        out += (torch.arange(n, dtype=torch.float32)[:, None] * matrix[axis]).view(view)
    return out


def sample_on_grid(volume: torch.Tensor, index_map: np.ndarray, shape: tuple[int, int, int],
                   padding: str = "zeros") -> torch.Tensor:
    """Trilinear samples (1, C, K, J, I) of ``volume`` (1, C, D, H, W) at the voxel centres of a grid of
    ``shape`` (K, J, I) whose index (i, j, k, 1) maps to a continuous index of ``volume`` through the
    4x4 ``index_map``; outside: zero, or the edge value with ``padding="border"``."""
    if _is_axis_aligned(index_map):
        return _sample_separably(volume, np.asarray(index_map, dtype=np.float64), shape, padding)
    d, h, w = volume.shape[2:]
    index_to_normalised = np.eye(4)
    index_to_normalised[:3, :3] = np.diag([2 / w, 2 / h, 2 / d])
    index_to_normalised[:3, 3] = [1 / w - 1, 1 / h - 1, 1 / d - 1]
    grid = affine_on_grid(index_to_normalised @ index_map, shape)
    return F.grid_sample(volume, grid[None].to(volume.dtype), mode="bilinear", padding_mode=padding,
                         align_corners=False)


def _is_axis_aligned(index_map: np.ndarray) -> bool:
    """Whether every volume axis follows exactly one grid axis (a scaled, flipped or permuted map)."""
    nonzero = np.abs(np.asarray(index_map, dtype=np.float64)[:3, :3]) > 1e-12
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all())


def _sample_separably(volume: torch.Tensor, index_map: np.ndarray, shape: tuple[int, int, int],
                      padding: str) -> torch.Tensor:
    """``sample_on_grid`` for an axis-aligned ``index_map``: linear interpolation along one axis at a time
    (two gathers a axis instead of a trilinear lookup a voxel)."""
    out = volume
    volume_dim_of = {0: 4, 1: 3, 2: 2}  # volume index i, j, k -> tensor dims W, H, D
    grid_axis_at = {}  # tensor dim -> grid axis (0 = i, 1 = j, 2 = k) it holds after resampling
    for axis in range(3):
        dim = volume_dim_of[axis]
        source = int(np.flatnonzero(np.abs(index_map[axis, :3]) > 1e-12)[0])  # the grid axis it follows
        n_out, n_in = shape[2 - source], volume.shape[dim]
        position = torch.arange(n_out, dtype=torch.float64, device=volume.device) * index_map[axis, source] \
            + index_map[axis, 3]
        if padding == "border":
            position = position.clamp(0, n_in - 1)
        low = position.floor()
        view = [1] * out.dim()
        view[dim] = n_out
        taken = []
        for index, weight in ((low, 1 - (position - low)), (low + 1, position - low)):
            inside = (index >= 0) & (index <= n_in - 1)
            taken.append((out.index_select(dim, index.clamp(0, n_in - 1).long()),
                          (weight * inside).to(out.dtype).view(view)))
        (first, first_weight), (second, second_weight) = taken
        out, grid_axis_at[dim] = first.mul_(first_weight).addcmul_(second, second_weight), source
    order = [0, 1, *sorted((2, 3, 4), key=lambda dim: -grid_axis_at[dim])]  # (k, j, i) of the grid
    return out.permute(order).contiguous()


def displacement_from_velocity(velocity: torch.Tensor, size: tuple[int, ...], steps: int = 7) -> torch.Tensor:
    """Integrate a velocity field (voxels of its grid) and resize it to ``size`` (voxels of that grid)."""
    flow = VecInt(steps)(velocity)
    if tuple(flow.shape[2:]) == tuple(size):
        return flow
    return ResizeTransform(size[0] / flow.shape[2])(flow, size)


def compose_flows(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """The displacement of x -> y = x + inner(x) -> y + outer(y) (voxels of one grid; outer sampled
    trilinearly, its edge value outside)."""
    return inner + SpatialTransformer()(outer, inner)


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool an image tensor by an integer factor (the network's image level)."""
    return F.avg_pool3d(image, factor) if factor > 1 else image
