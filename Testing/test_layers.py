"""Layers against independent references: scipy's map_coordinates and inverse consistency."""

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from SlicerVoxelMorphLib.layers import ResizeTransform, SpatialTransformer, VecInt, compose_flows


def _random_case(seed: int = 0, shape=(12, 14, 10)):
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    flow = rng.uniform(-2, 2, (3, *shape)).astype(np.float32)
    return image, flow


@pytest.mark.parametrize(("mode", "order"), [("bilinear", 1), ("nearest", 0)])
def test_spatial_transformer_matches_scipy(mode, order):
    image, flow = _random_case()
    coords = np.indices(image.shape).astype(np.float32) + flow
    expected = map_coordinates(image, coords, order=order, mode="nearest")
    out = SpatialTransformer(mode)(torch.from_numpy(image)[None, None], torch.from_numpy(flow)[None])[0, 0]
    if order == 1:
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    else:  # nearest: ties at exactly .5 may round either way; they have probability ~0 here
        assert (out.numpy() == expected).mean() > 0.999


def test_spatial_transformer_zero_flow_is_identity():
    image, _ = _random_case(1)
    out = SpatialTransformer()(torch.from_numpy(image)[None, None], torch.zeros(1, 3, *image.shape))
    np.testing.assert_allclose(out[0, 0].numpy(), image, atol=1e-5)


def test_vecint_of_v_composed_with_minus_v_is_identity():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    v = np.stack([gaussian_filter(rng.normal(size=(24, 24, 24)), 4) for _ in range(3)])
    v = torch.from_numpy(3 * v / np.abs(v).max()).float()[None]  # up to 3 voxels
    forward, backward = VecInt(7)(v), VecInt(7)(-v)
    # phi_v(phi_-v(x)) - x = b(x) + a(x + b(x))
    residual = backward + SpatialTransformer()(forward, backward)
    inner = (slice(None), slice(None), *[slice(4, -4)] * 3)
    assert residual[inner].abs().max() < 0.05
    assert forward[inner].abs().max() > 1.0  # the test is not vacuous


def test_vecint_zero_steps_returns_velocity():
    v = torch.randn(1, 3, 8, 8, 8)
    torch.testing.assert_close(VecInt(0)(v), v)


def test_resize_transform_scales_vectors_and_matches_centres():
    flow = torch.ones(1, 3, 4, 4, 4)
    up = ResizeTransform(2.0)(flow)
    assert up.shape == (1, 3, 8, 8, 8)
    torch.testing.assert_close(up, 2 * torch.ones_like(up))
    # a linear ramp in coarse voxel centres stays a ramp at the fine centres: c -> (f - 0.5) / 2
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4).contiguous()
    fine = ResizeTransform(2.0)(ramp)[0, 0, 1:-1, 0, 0] / 2
    expected = (torch.arange(1, 7.0) - 0.5) / 2
    torch.testing.assert_close(fine, expected)


def test_composed_flows_move_a_point_through_both_deformations():
    """x -> x + inner(x) -> then + outer there: a shift of 1.5 voxels along D followed by a field that grows
    along D (outer = 0.1 * d along H) gives 1.5 along D and 0.1 * (d + 1.5) along H, where it stays inside."""
    shape = (8, 6, 4)
    inner = torch.zeros(1, 3, *shape)
    inner[0, 0] = 1.5
    d = torch.arange(8.0)[:, None, None].expand(*shape)
    outer = torch.zeros(1, 3, *shape)
    outer[0, 1] = 0.1 * d
    total = compose_flows(inner, outer)
    torch.testing.assert_close(total[0, 0], torch.full(shape, 1.5))
    torch.testing.assert_close(total[0, 1, :5], 0.1 * (d[:5] + 1.5))  # d + 1.5 <= 7: inside the grid
    assert torch.count_nonzero(total[0, 2]) == 0


def test_sample_at_matches_scipy_inside_and_is_zero_outside():
    from SlicerVoxelMorphLib.layers import sample_at

    rng = np.random.default_rng(3)
    volume = rng.random((2, 6, 7, 8)).astype(np.float32)  # (C, D, H, W)
    index = rng.uniform(0, [7, 6, 5], (10, 3)).astype(np.float32)  # (i, j, k) inside
    out = sample_at(torch.from_numpy(volume)[None], torch.from_numpy(index)).numpy()
    for c in range(2):
        expected = map_coordinates(volume[c], index[:, ::-1].T, order=1)
        np.testing.assert_allclose(out[c], expected, atol=1e-5)
    far = sample_at(torch.from_numpy(volume)[None], torch.tensor([[-5.0, 0.0, 0.0], [0.0, 0.0, 20.0]]))
    assert (far == 0).all()


def test_affine_on_grid_is_the_matrix_at_every_index():
    from SlicerVoxelMorphLib.layers import affine_on_grid

    matrix = np.array([[1.1, 0.2, -0.3, 5.0], [0.0, 0.9, 0.4, -7.0], [0.1, 0.0, 1.3, 2.5], [0, 0, 0, 1]])
    k, j, i = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    expected = np.stack([i, j, k, np.ones_like(i)], -1) @ matrix[:3].T
    np.testing.assert_allclose(affine_on_grid(matrix, (5, 6, 7)).numpy(), expected, atol=1e-5)


def test_sample_on_grid_matches_scipy_through_an_index_map():
    from SlicerVoxelMorphLib.layers import sample_on_grid

    rng = np.random.default_rng(4)
    volume = rng.random((2, 9, 10, 11)).astype(np.float32)  # (C, D, H, W)
    index_map = np.array([[0.7, 0.1, 0.0, 1.2], [0.0, 0.8, -0.1, 1.5], [0.05, 0.0, 0.6, 0.9], [0, 0, 0, 1]])
    shape = (8, 7, 9)  # (K, J, I) of the output grid
    out = sample_on_grid(torch.from_numpy(volume)[None], index_map, shape).numpy()[0]
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    index = np.stack([i, j, k, np.ones_like(i)], -1) @ index_map[:3].T  # (i, j, k) in the volume
    for c in range(2):
        expected = map_coordinates(volume[c], np.moveaxis(index[..., ::-1], -1, 0), order=1, mode="constant")
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


@pytest.mark.parametrize("padding, mode", [("zeros", "grid-constant"), ("border", "nearest")])
def test_sample_on_grid_of_a_permuted_flipped_map_matches_scipy_outside_too(padding, mode):
    from SlicerVoxelMorphLib.layers import sample_on_grid

    rng = np.random.default_rng(5)
    volume = rng.random((3, 6, 7, 8)).astype(np.float32)  # (C, D, H, W)
    # volume i follows grid k (flipped), volume j follows grid i, volume k follows grid j: partly outside
    index_map = np.array([[0, 0, -0.6, 8.4], [0.45, 0, 0, -1.3], [0, 0.7, 0, -0.8], [0, 0, 0, 1]])
    shape = (13, 10, 19)  # (K, J, I)
    out = sample_on_grid(torch.from_numpy(volume)[None], index_map, shape, padding).numpy()[0]
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    index = np.stack([i, j, k, np.ones_like(i)], -1) @ index_map[:3].T
    assert (index < -0.5).any() and (index[..., 0] > 7.5).any()  # the check reaches beyond the volume
    for c in range(3):
        expected = map_coordinates(volume[c], np.moveaxis(index[..., ::-1], -1, 0), order=1, mode=mode)
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


def test_half_precision_velocities_and_images_are_integrated_and_sampled_in_single_precision():
    # what CUDA's bf16 autocast hands the integration during training: it must not round the sampling grid
    rng = np.random.default_rng(4)
    coarse = torch.from_numpy(rng.normal(0, 4.0, (1, 3, 4, 4, 4)).astype(np.float32))
    velocity = torch.nn.functional.interpolate(coarse, size=(24, 24, 24), mode="trilinear").to(torch.bfloat16)
    half, single = VecInt(7)(velocity), VecInt(7)(velocity.float())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, single, rtol=0, atol=1e-5)
    image = velocity[:, :1]
    torch.testing.assert_close(SpatialTransformer()(image, single), SpatialTransformer()(image.float(), single),
                               rtol=0, atol=1e-6)
