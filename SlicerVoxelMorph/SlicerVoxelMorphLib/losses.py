"""Registration losses: local NCC, MSE, gradient smoothness, soft Dice."""

import torch


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred cubic window with zero padding, by separable running sums (O(N) per axis)."""
    half = window // 2
    for dim in (2, 3, 4):
        n = x.shape[dim]
        before = list(x.shape)
        before[dim] = half + 1
        after = list(x.shape)
        after[dim] = half
        sums = torch.cat([x.new_zeros(before), x, x.new_zeros(after)], dim).cumsum(dim)
        x = sums.narrow(dim, window, n) - sums.narrow(dim, 0, n)
    return x / window**3


def ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean squared local normalised cross-correlation over a cubic ``window``."""
    fixed, warped = fixed.float(), warped.float()
    mu_f, mu_w = box_mean(fixed, window), box_mean(warped, window)
    cross = box_mean(fixed * warped, window) - mu_f * mu_w
    var_f = box_mean(fixed * fixed, window) - mu_f * mu_f
    var_w = box_mean(warped * warped, window) - mu_w * mu_w
    cc = cross * cross / (var_f * var_w + eps)
    return -cc.mean()


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference."""
    return ((fixed - warped) ** 2).mean()


def grad(flow: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """Smoothness: mean of the (squared for l2) forward differences of a field along each axis."""
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', not {penalty!r}")
    total = flow.new_zeros(())
    for axis in (2, 3, 4):
        diff = torch.diff(flow, dim=axis)
        total = total + (diff.abs() if penalty == "l1" else diff * diff).mean()
    return total / 3


def dice(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean soft Dice over the channels (labels) of two (B, L, D, H, W) probability maps."""
    dims = (2, 3, 4)
    top = 2 * (fixed_onehot * warped_onehot).sum(dims)
    bottom = (fixed_onehot + warped_onehot).sum(dims).clamp_min(eps)
    return -(top / bottom).mean()
