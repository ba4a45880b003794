"""Registration losses: local NCC, MSE, gradient smoothness, soft Dice."""

from collections.abc import Callable

import torch

SHIFTED_SUM_MAX_WINDOW = 5  # box_mean: up to this window a sum of shifted copies is faster than cumsum


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred cubic window with zero padding, separably: a sum of shifted copies for small
    windows (exact), running sums for larger ones (O(N) per axis)."""
    half = window // 2
    for dim in (2, 3, 4):
        n = x.shape[dim]
        before = list(x.shape)
        before[dim] = half
        padded = torch.cat([x.new_zeros(before), x, x.new_zeros(before)], dim)
        if window <= SHIFTED_SUM_MAX_WINDOW:
            x = padded.narrow(dim, 0, n)
            for offset in range(1, window):
                x = x + padded.narrow(dim, offset, n)
        else:
            sums = torch.cat([x.new_zeros((*x.shape[:dim], 1, *x.shape[dim + 1:])), padded.cumsum(dim)], dim)
            x = sums.narrow(dim, window, n) - sums.narrow(dim, 0, n)
    return x / window**3


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (over all elements), or weighted by ``weight`` (broadcast over channels)."""
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1e-6)


def local_moments(a: torch.Tensor, b: torch.Tensor,
                  mean: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local covariance of ``a`` and ``b`` and the local variance of each, with the local ``mean`` given."""
    mu_a, mu_b = mean(a), mean(b)
    return mean(a * b) - mu_a * mu_b, mean(a * a) - mu_a * mu_a, mean(b * b) - mu_b * mu_b


def ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5,
        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mean squared local normalised cross-correlation over a cubic ``window``.

    With ``weight`` (e.g. a 0/1 mask of the voxels to compare) the local means and variances are
    weighted averages over the window and the mean over voxels is weighted too, so voxels of weight 0
    take no part at all.
    """
    fixed, warped = fixed.float(), warped.float()
    if weight is None:
        def mean(x: torch.Tensor) -> torch.Tensor:
            return box_mean(x, window)
    else:
        weight = weight.float()
        total = box_mean(weight, window).clamp_min(1e-6)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return box_mean(weight * x, window) / total
    cross, var_f, var_w = local_moments(fixed, warped, mean)
    cc = cross * cross / (var_f * var_w + eps)
    return -weighted_mean(cc, weight)


def mse(fixed: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (weighted by ``weight`` where given)."""
    return weighted_mean((fixed - warped) ** 2, weight)


def grad(flow: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """Smoothness: mean of the (squared for l2) forward differences of a field along each axis."""
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', not {penalty!r}")
    total = flow.new_zeros(())
    for axis in (2, 3, 4):
        diff = torch.diff(flow, dim=axis)
        total = total + (diff.abs() if penalty == "l1" else diff * diff).mean()
    return total / 3


def bending(flow: torch.Tensor) -> torch.Tensor:
    """Bending energy: the squared Frobenius norm of the Hessian of a field (B, C, D, H, W) from second
    differences, mean over voxels, summed over the Hessian's entries. Zero for any affine field, so unlike
    ``grad`` it does not pull a field towards a constant where the images carry no information."""
    total = flow.new_zeros(())
    for axis in (2, 3, 4):
        total = total + (torch.diff(flow, n=2, dim=axis) ** 2).mean()
    for a, b in ((2, 3), (2, 4), (3, 4)):
        total = total + 2 * (torch.diff(torch.diff(flow, dim=a), dim=b) ** 2).mean()
    return total


def dice(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean soft Dice over the channels (labels) of two (B, L, D, H, W) probability maps."""
    dims = (2, 3, 4)
    top = 2 * (fixed_onehot * warped_onehot).sum(dims)
    bottom = (fixed_onehot + warped_onehot).sum(dims).clamp_min(eps)
    return -(top / bottom).mean()
