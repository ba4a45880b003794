"""Instance optimisation: refine a velocity field for one image pair, with early stopping.

Settings, then ``execute`` (SimpleITK-style): ``Refiner(steps=..., similarity=...).execute(velocity,
moving, fixed)``. The velocity may live on a coarser grid than the images; ``velocity_factor``
first upsamples it (more degrees of freedom than the network's own velocity grid). The similarity is
local NCC for same-contrast pairs or MIND-SSC (modality independent) when contrasts differ; 'auto'
picks by the sign and size of the global intensity correlation inside the foreground.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import losses
from .layers import SpatialTransformer, displacement_from_velocity

SIMILARITIES = ("auto", "ncc", "mind")
SAME_CONTRAST_CORRELATION = 0.5  # 'auto': NCC above this global correlation, MIND below
SAME_HEAD_WINDOW = 9  # voxels of the level the pair is compared at
OPTIMIZERS = ("adam", "lbfgs")
LBFGS_HISTORY = 10  # corrections L-BFGS keeps (torch's default 100 holds 100 copies of the velocity)
LBFGS_TOLERANCE = 1e-7  # L-BFGS stops when the loss or the step changes less than this


class Adam:
    """Adam (Kingma and Ba, 2015) on one tensor, with torch.optim.Adam's defaults (betas 0.9 and 0.999, eps 1e-8,
    no weight decay): the same steps without torch.optim, whose first use imports torch._dynamo (1.4 s of a
    command-line registration on 2 CPU cores)."""

    def __init__(self, parameter: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.parameter, self.lr, self.betas, self.eps = parameter, lr, betas, eps
        self.mean, self.square = torch.zeros_like(parameter), torch.zeros_like(parameter)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameter's gradient."""
        (beta1, beta2), grad = self.betas, self.parameter.grad
        self.steps += 1
        self.mean.lerp_(grad, 1 - beta1)
        self.square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (self.square.sqrt() / (1 - beta2 ** self.steps) ** 0.5).add_(self.eps)
        self.parameter.addcdiv_(self.mean, denominator, value=-self.lr / (1 - beta1 ** self.steps))


def intensity_correlation(moving: torch.Tensor, fixed: torch.Tensor) -> float:
    """Pearson correlation of the two images' intensities over voxels where either is foreground."""
    mask = (moving > 0.05) | (fixed > 0.05)
    a, b = moving[mask].double(), fixed[mask].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def local_match(fixed: torch.Tensor, moving: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """How well two images match locally: the sum of squared local covariances over the sum of the products
    of local variances (window SAME_HEAD_WINDOW), over the voxels where either image is foreground (and, when
    given, inside ``region``); 1 for identical images. Weighting by local variance makes flat regions and
    background noise count little."""
    foreground = ((fixed > 0.05) | (moving > 0.05)).float()
    if region is not None:
        foreground = foreground * region
    cross, var_f, var_m = losses.local_moments(fixed, moving, lambda x: losses.box_mean(x, SAME_HEAD_WINDOW))
    return float((cross.clamp_min(0) ** 2 * foreground).sum() / (var_f * var_m * foreground).sum().clamp_min(1e-12))


def same_head_score(moving: torch.Tensor, fixed: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """``local_match`` of an affinely aligned pair (1, 1, D, H, W) relative to that of the fixed image and itself
    shifted by one voxel (mean over the three axes), which sets the scale for this image's content (skull,
    noise, resolution); only inside ``region`` when given. Two scans of one head in one contrast that differ by
    a smooth deformation of a few millimetres match about as well as the one-voxel shift, two different brains
    clearly worse."""
    shifted = []
    for axis in (2, 3, 4):
        length = fixed.shape[axis]
        inside = None if region is None else region.narrow(axis, 0, length - 1)
        shifted.append(local_match(fixed.narrow(axis, 1, length - 1), fixed.narrow(axis, 0, length - 1), inside))
    return local_match(fixed, moving, region) / max(sum(shifted) / 3, 1e-12)


def mask_interior(mask: torch.Tensor, margin: int = SAME_HEAD_WINDOW // 2 + 1) -> torch.Tensor:
    """Voxels of a 0/1 ``mask`` (1, 1, D, H, W) at least ``margin`` voxels inside it (float 0/1): where a
    ``local_match`` window does not see the mask's outline."""
    return (-F.max_pool3d(-mask.float(), 2 * margin + 1, stride=1, padding=margin) > 0.5).float()


def choose_similarity(similarity: str, moving: torch.Tensor, fixed: torch.Tensor) -> str:
    """'ncc' or 'mind' for a pair: as given, or by ``intensity_correlation`` for 'auto'."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {similarity!r}")
    if similarity != "auto":
        return similarity
    return "ncc" if intensity_correlation(moving, fixed) > SAME_CONTRAST_CORRELATION else "mind"


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., MICCAI 2013): 12 channels of exp(-patch distance / local
    variance) between the six-neighbourhood pairs; invariant to monotone and non-monotone intensity maps
    that keep local structure. (1, 1, D, H, W) -> (1, 12, D, H, W)."""
    six = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]], device=image.device)
    distance = ((six[:, None] - six[None]) ** 2).sum(-1)
    i, j = torch.triu_indices(6, 6, 1)
    pairs = [(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if distance[a, b] == 2]  # 12 pairs
    padded = F.pad(image, [dilation] * 6, mode="replicate")
    shape = image.shape[2:]

    def shifted(offset: torch.Tensor) -> torch.Tensor:
        k, j_, i_ = (int(o) * dilation for o in offset)
        return padded[:, :, k:k + shape[0], j_:j_ + shape[1], i_:i_ + shape[2]]

    size = 2 * radius + 1
    ssd = losses.box_mean(torch.cat([(shifted(six[a]) - shifted(six[b])) ** 2 for a, b in pairs], dim=1), size)
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)
    variance = variance.clamp(variance.mean() * 1e-3, variance.mean() * 1e3)
    descriptor = torch.exp(-ssd / variance)
    return descriptor / descriptor.max(dim=1, keepdim=True).values.clamp_min(1e-12)


@dataclass
class Refiner:
    """Adam (or L-BFGS) on the velocity minimising similarity(fixed, moving o phi) + smooth_weight *
    grad(velocity) + bending_weight * bending(velocity).

    Adam stops early when the loss has not improved by ``tolerance`` (relative) over ``patience`` steps.
    """

    steps: int = 100
    similarity: str = "auto"
    smooth_weight: float = 1.0
    bending_weight: float = 0.0  # second-order regulariser: affine parts of the field cost nothing
    window: int = 9  # the training loss's NCC window
    lr: float = 0.1
    velocity_factor: int = 1  # upsample the starting velocity by this factor first
    mind_dilation: int = 2  # voxels between the neighbours MIND-SSC compares
    patience: int = 10
    tolerance: float = 1e-3
    int_steps: int = 7
    optimizer: str = "adam"  # or "lbfgs": steps are then loss evaluations (lr, patience, tolerance unused)

    def execute(self, velocity: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                progress: Callable[[str, float], None] | None = None, fixed_mask: torch.Tensor | None = None,
                moving_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The refined velocity of lowest loss seen (voxels of its own grid, possibly finer than the input's;
        Adam's first steps move even a velocity that is already optimal by about ``lr``) and a record:
        similarity used, steps run, first, last and lowest loss. Masks (0/1, on the images' grid) restrict the
        similarity to voxels inside the fixed mask whose warped position lies inside the moving mask."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        similarity = choose_similarity(self.similarity, moving, fixed)
        if self.velocity_factor > 1:
            velocity = self.velocity_factor * F.interpolate(velocity, scale_factor=self.velocity_factor,
                                                            mode="trilinear", align_corners=False)
        velocity = velocity.detach().clone().requires_grad_(True)
        warp = SpatialTransformer()
        size = tuple(fixed.shape[2:])
        if similarity == "mind":
            # descriptors of the moving image are warped
            target, source = (mind_ssc(image, dilation=self.mind_dilation) for image in (fixed, moving))
        else:
            target, source = fixed, moving

        def objective(velocity: torch.Tensor) -> torch.Tensor:
            flow = displacement_from_velocity(velocity, size, self.int_steps)
            warped = warp(source, flow)
            weight = None
            if fixed_mask is not None or moving_mask is not None:
                weight = fixed_mask if fixed_mask is not None else torch.ones_like(fixed)
                if moving_mask is not None:
                    weight = weight * warp(moving_mask, flow)
            if similarity == "mind":
                match = losses.mse(target, warped, weight)
            else:
                match = losses.ncc(target, warped, self.window, weight=weight)
            penalty = self.smooth_weight * losses.grad(velocity)
            if self.bending_weight > 0:
                penalty = penalty + self.bending_weight * losses.bending(velocity)
            return match + penalty

        run = self._lbfgs if self.optimizer == "lbfgs" else self._adam
        history, best, best_loss = run(velocity, objective, progress)
        record = {"similarity": similarity, "velocity_grid": list(best.shape[2:]), "steps_run": len(history),
                  "loss_first": round(history[0], 6) if history else None,
                  "loss_last": round(history[-1], 6) if history else None,
                  "loss_best": round(best_loss, 6) if history else None, "optimizer": self.optimizer}
        return best, record

    def _adam(self, velocity: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
              progress: Callable[[str, float], None] | None) -> tuple[list[float], torch.Tensor, float]:
        """Adam for up to ``steps`` steps with early stopping; (losses, velocity of the lowest, lowest)."""
        optimizer = Adam(velocity, lr=self.lr)
        history: list[float] = []
        best, best_loss = velocity.detach().clone(), math.inf
        for step in range(self.steps):
            loss = objective(velocity)
            history.append(loss.item())
            if history[-1] < best_loss:  # the loss just computed is that of this velocity
                best, best_loss = velocity.detach().clone(), history[-1]
            velocity.grad = None
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress("refine", (step + 1) / self.steps)
            if len(history) > self.patience and \
                    history[-1 - self.patience] - min(history[-self.patience:]) < self.tolerance * abs(history[0]):
                break
        if history:
            with torch.no_grad():  # the velocity after the last step
                last = objective(velocity).item()
            if last < best_loss:
                best, best_loss = velocity.detach().clone(), last
        return history, best, best_loss

    def _lbfgs(self, velocity: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
               progress: Callable[[str, float], None] | None) -> tuple[list[float], torch.Tensor, float]:
        """L-BFGS with a strong Wolfe line search for up to ``steps`` loss evaluations (each costs an Adam
        step); every velocity evaluated, line-search trials included, may be the lowest returned. Stops
        when the gradient vanishes or the loss stops changing."""
        optimizer = torch.optim.LBFGS([velocity], lr=1, max_iter=self.steps, max_eval=self.steps,
                                      history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
                                      tolerance_change=LBFGS_TOLERANCE)
        history: list[float] = []
        best, best_loss = velocity.detach().clone(), math.inf

        def closure() -> torch.Tensor:
            nonlocal best, best_loss
            optimizer.zero_grad(set_to_none=True)
            loss = objective(velocity)
            loss.backward()
            history.append(loss.item())
            if history[-1] < best_loss:  # the line search sets the velocity to each point it tries
                best, best_loss = velocity.detach().clone(), history[-1]
            if progress is not None:
                progress("refine", min(len(history) / self.steps, 1.0))
            return loss

        if self.steps > 0:
            optimizer.step(closure)
        return history, best, best_loss
