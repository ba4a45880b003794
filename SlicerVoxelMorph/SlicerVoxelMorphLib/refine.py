"""Instance optimisation: refine a velocity field for one image pair with the registration loss."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import losses
from .layers import ResizeTransform, SpatialTransformer, VecInt


def displacement_from_velocity(velocity: torch.Tensor, size: tuple[int, ...], steps: int = 7) -> torch.Tensor:
    """Integrate a velocity field (voxels of its grid) and resize it to ``size`` (voxels of that grid)."""
    flow = VecInt(steps)(velocity)
    if tuple(flow.shape[2:]) == tuple(size):
        return flow
    return ResizeTransform(size[0] / flow.shape[2])(flow, size)


def refine(velocity: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, steps: int,
           smooth_weight: float = 1.0, window: int = 5, lr: float = 0.1, int_steps: int = 7,
           progress: Callable[[str, float], None] | None = None) -> torch.Tensor:
    """``steps`` Adam steps on ``velocity`` minimising NCC(fixed, moving o phi) + w * grad(velocity).

    ``velocity`` (1, 3, d, h, w) is in voxels of its own grid, which may be coarser than the images
    (1, 1, D, H, W); the loss is computed at the images' resolution. Returns the refined velocity.
    """
    velocity = velocity.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([velocity], lr=lr)
    warp = SpatialTransformer()
    size = tuple(fixed.shape[2:])
    for step in range(steps):
        flow = displacement_from_velocity(velocity, size, int_steps)
        loss = losses.ncc(fixed, warp(moving, flow), window) + smooth_weight * losses.grad(velocity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress("refine", (step + 1) / steps)
    return velocity.detach()


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool an image tensor by an integer factor (as training does)."""
    return F.avg_pool3d(image, factor) if factor > 1 else image
