"""Instance optimisation: refine a velocity field for one image pair with the registration loss."""

from collections.abc import Callable

import torch

from . import losses
from .layers import SpatialTransformer, displacement_from_velocity


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

