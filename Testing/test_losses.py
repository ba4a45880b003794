"""Losses against hand-computed values."""

import numpy as np
import pytest
import torch

from SlicerVoxelMorphLib import losses


def _local_ncc_numpy(a: np.ndarray, b: np.ndarray, window: int, centre: tuple[int, int, int]) -> float:
    """Squared NCC over the window around ``centre`` (zero padding counts as samples), by hand."""
    h = window // 2
    pa, pb = np.pad(a, h), np.pad(b, h)
    sl = tuple(slice(c, c + window) for c in centre)
    x, y = pa[sl].ravel(), pb[sl].ravel()
    cross = (x * y).mean() - x.mean() * y.mean()
    return cross**2 / (x.var() * y.var() + 1e-5)


def test_ncc_matches_hand_computation_everywhere():
    rng = np.random.default_rng(0)
    a, b = rng.random((11, 12, 10)), rng.random((11, 12, 10))
    expected = np.mean([_local_ncc_numpy(a, b, 5, c) for c in np.ndindex(a.shape)])
    got = losses.ncc(torch.tensor(a)[None, None], torch.tensor(b)[None, None], window=5)
    assert abs(got.item() + expected) < 1e-4


def test_ncc_of_image_with_itself_and_a_scaled_copy_is_minus_one():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.random((16, 16, 16)))[None, None]
    # only eps (1e-5 against local variances ~0.08^2) keeps it from exactly -1
    assert abs(losses.ncc(a, a, 9).item() + 1) < 3e-3
    assert abs(losses.ncc(a, 3 * a, 9).item() + 1) < 3e-3


def test_dice_hand_values():
    a = torch.zeros(1, 2, 4, 4, 4)
    b = torch.zeros(1, 2, 4, 4, 4)
    a[0, 0, :2], b[0, 0, :1] = 1, 1  # 32 and 16 voxels, overlap 16: dice 2*16/48
    a[0, 1], b[0, 1] = 1, 1  # identical: dice 1
    assert abs(losses.dice(a, b).item() + (2 * 16 / 48 + 1) / 2) < 1e-6


def test_grad_of_linear_ramp():
    ramp = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 3, 5, 4, 3)
    assert abs(losses.grad(ramp, "l2").item() - 1 / 3) < 1e-6  # d/dz = 1, others 0
    assert abs(losses.grad(3 * ramp, "l1").item() - 1.0) < 1e-6
    assert abs(losses.grad(3 * ramp, "l2").item() - 3.0) < 1e-6


def test_mse():
    assert losses.mse(torch.zeros(2, 2), torch.full((2, 2), 3.0)).item() == 9.0


@pytest.mark.parametrize("window", [3, 5, 9])
def test_box_mean_matches_scipy_uniform_filter_with_zero_padding(window):
    from scipy.ndimage import uniform_filter

    from SlicerVoxelMorphLib.losses import box_mean

    x = np.random.default_rng(window).random((2, 11, 12, 13)).astype(np.float32)
    expected = np.stack([uniform_filter(c.astype(np.float64), window, mode="constant") for c in x])
    np.testing.assert_allclose(box_mean(torch.from_numpy(x)[None], window)[0].numpy(), expected, atol=1e-5)


def test_bending_energy_of_a_linear_field_is_zero_and_of_a_quadratic_is_hand_computed():
    z = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 3, 6, 5, 4)
    assert losses.bending(2 * z + 1).item() == pytest.approx(0.0, abs=1e-10)  # an affine field bends nothing
    # v = z^2 / 2 in every channel: second difference along z is 1, the other second and mixed differences 0
    assert losses.bending(z * z / 2).item() == pytest.approx(1.0, abs=1e-6)
    # v = y z: d2v/dydz = 1, counted twice (the mixed terms of the Hessian's Frobenius norm)
    y = torch.arange(5.0).view(1, 1, 1, 5, 1)
    assert losses.bending((y * z).contiguous()).item() == pytest.approx(2.0, abs=1e-6)


def test_bending_energy_matches_numpy_second_differences():
    v = np.random.default_rng(4).normal(size=(1, 3, 6, 7, 5))
    expected = sum(np.mean(np.diff(v, n=2, axis=a) ** 2) for a in (2, 3, 4))
    expected += 2 * sum(np.mean(np.diff(np.diff(v, axis=a), axis=b) ** 2) for a, b in ((2, 3), (2, 4), (3, 4)))
    assert losses.bending(torch.from_numpy(v)).item() == pytest.approx(expected, rel=1e-9)
