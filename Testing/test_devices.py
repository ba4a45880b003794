"""The network's precision: bfloat16 convolutions on CPUs that compute them natively, float32 velocities always."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import deform, phantom, smooth_field, to_image
from SlicerVoxelMorphLib import devices
from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.networks import VxmDense

CPU = torch.device("cpu")


def native(monkeypatch, supported: bool) -> None:
    """Make this CPU look as if it had (or lacked) native bfloat16."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: supported, raising=False)


@pytest.mark.parametrize(("supported", "precision", "expected"), [
    (True, "auto", torch.bfloat16), (False, "auto", None), (True, "float32", None), (False, "float32", None)])
def test_bfloat16_only_where_native_and_asked_for(monkeypatch, supported, precision, expected):
    native(monkeypatch, supported)
    assert devices.network_dtype(CPU, precision) is expected


@pytest.mark.parametrize(("depth", "expected"), [(80, torch.bfloat16), (64, torch.bfloat16), (48, torch.bfloat16),
                                               (32, None), (16, None)])
def test_training_steps_use_bfloat16_unless_a_unet_level_is_two_voxels_deep(monkeypatch, depth, expected):
    native(monkeypatch, True)  # 32 -> 16, 8, 4, 2 and 16 -> 8, 4, 2: oneDNN's bfloat16 backward fails at depth 2
    assert devices.training_dtype(CPU, depth) is expected
    assert devices.training_dtype(CPU, depth, "float32") is None
    assert devices.training_dtype(torch.device("cuda"), depth) is torch.bfloat16  # mixed precision, as before
    native(monkeypatch, False)
    assert devices.training_dtype(CPU, depth) is None


def test_cuda_stays_float32_until_measured_there(monkeypatch):
    native(monkeypatch, True)
    assert devices.network_dtype(torch.device("cuda"), "auto") is None


def test_an_unknown_precision_is_an_input_error():
    with pytest.raises(InputError, match="precision must be one of auto, float32"):
        devices.network_dtype(CPU, "float16")


def cascade() -> VxmDense:
    """A three-stage network whose flow heads give velocities of a few voxels (as trained ones do)."""
    torch.manual_seed(0)
    net = VxmDense("vm2", half_res=True, residual_stage=True, fine_stage=True).eval()
    for head in (net.flow, net.residual_flow, net.fine_flow):
        torch.nn.init.normal_(head.weight, 0.0, 1.0)
    return net


def test_under_bfloat16_autocast_the_velocity_stays_float32_and_close_to_the_float32_one():
    net = cascade()
    generator = torch.Generator().manual_seed(1)
    moving, fixed = (torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32, generator=generator), 3, 1, 1)
                     for _ in range(2))
    with torch.no_grad():
        reference = net.velocity(moving, fixed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            velocity = net.velocity(moving, fixed)
    assert velocity.dtype == torch.float32  # the heads' output is not rounded to bfloat16 (8 bits of mantissa)
    assert reference.abs().max() > 1.0  # voxels: a field worth comparing
    assert (velocity - reference).abs().max() < 0.05 * reference.abs().max()


def test_register_reports_the_precision_and_bfloat16_gives_the_float32_result_within_a_tenth_of_a_voxel(
        monkeypatch, tmp_path):
    from SlicerVoxelMorphLib.models import BUNDLED
    from SlicerVoxelMorphLib.register import register

    if not BUNDLED.is_file():
        pytest.skip("no bundled model in this checkout")
    image, _ = phantom((72, 80, 64), seed=4)
    fixed = to_image(image, (2.0, 2.0, 2.0))
    moving = deform(fixed, smooth_field(fixed, amplitude=6.0, seed=3, sigma_mm=20.0), sitk.sitkLinear)
    native(monkeypatch, True)
    settings = {"auto_refine": False, "polish": False, "affine": False, "device": "cpu"}
    fast = register(fixed, moving, **settings)
    native(monkeypatch, False)
    plain = register(fixed, moving, **settings)
    exact = register(fixed, moving, precision="float32", **settings)
    assert (fast.report["precision"], plain.report["precision"], exact.report["precision"]) == (
        "bfloat16", "float32", "float32")
    u, v = (sitk.GetArrayFromImage(result.displacement) for result in (fast, exact))
    assert np.abs(v).max() > 1.0  # mm: the network moved something
    assert np.linalg.norm(u - v, axis=-1).max() < 0.2  # mm (a tenth of the 2 mm network voxel)
