"""Model files: self-describing, loadable with weights_only=True, tamper-evident; networks' shapes."""

import numpy as np
import pytest
import torch

from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.models import (
    BUNDLED,
    DEFAULT_MODEL,
    content_hash,
    load_model,
    read_model_file,
    same_head_model,
    save_model,
)
from SlicerVoxelMorphLib.networks import VxmDense


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = VxmDense("vm1", half_res=False, int_steps=5)
    path = tmp_path / "m.pt"
    digest = save_model(path, net, 2.0, {"name": "test", "training": {"iterations": 3}})
    record = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert record["sha256"] == digest and record["config"] == {"features": "vm1", "half_res": False, "int_steps": 5,
                                                                 "residual_stage": False, "fine_stage": False}
    assert record["spacing_mm"] == 2.0 and "torch" in record["versions"]
    loaded, _ = load_model(path)
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, y), net.eval().velocity(x, y))


def test_tampered_weights_are_detected(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, VxmDense("vm1"), 2.0, {"name": "x"})
    record = torch.load(path, weights_only=True)
    record["state_dict"]["flow.bias"] += 1
    torch.save(record, path)
    with pytest.raises(InputError, match="corrupt"):
        read_model_file(path)


def test_content_hash_ignores_file_but_not_values():
    a = {"w": torch.zeros(3)}
    assert content_hash(a) == content_hash({"w": torch.zeros(3, dtype=torch.float64)})
    assert content_hash(a) != content_hash({"w": torch.ones(3)})


@pytest.mark.parametrize(("features", "half_res"), [("vm1", False), ("vm2", False), ("vm2", True)])
def test_network_output_shapes(features, half_res):
    net = VxmDense(features, half_res=half_res)
    x = torch.rand(1, 1, 32, 16, 48)
    warped, flow, velocity = net(x, x)
    assert warped.shape == x.shape and flow.shape == (1, 3, 32, 16, 48)
    assert velocity.shape[2:] == ((16, 8, 24) if half_res else (32, 16, 48))
    assert flow.abs().max() < 1e-2  # the flow head starts near zero, as in voxelmorph


def _residual_net() -> VxmDense:
    """A residual-stage network whose first stage predicts a constant velocity of one voxel along the last
    axis (two voxels of displacement at full resolution) and whose residual head predicts nothing."""
    torch.manual_seed(0)
    net = VxmDense("vm1", half_res=True, int_steps=5, residual_stage=True)
    with torch.no_grad():
        for head in (net.flow, net.residual_flow):
            head.weight.zero_()
            head.bias.zero_()
        net.flow.bias[2] = 1.0
    return net


def _velocity_and_stage_input(net: VxmDense, stage: torch.nn.Module) -> tuple:
    """The velocity of a random 32^3 pair and what ``stage`` saw, which must be the moving image shifted by two
    voxels along the last axis (the constant velocity of ``_residual_net``'s first stage), then the fixed image."""
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    seen = []
    stage.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        velocity = net.velocity(moving, fixed)
    torch.testing.assert_close(seen[0][:, 1:], fixed)
    torch.testing.assert_close(seen[0][:, :1][..., 4:-4, 4:-4, 4:-6], moving[..., 4:-4, 4:-4, 6:-4])
    return velocity, moving, fixed


def test_a_residual_stage_sees_the_image_warped_by_the_first_and_adds_its_velocity():
    net = _residual_net()
    velocity, moving, fixed = _velocity_and_stage_input(net, net.residual_unet)
    # first stage alone: a constant 1 voxel at half resolution
    torch.testing.assert_close(velocity, torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16))
    with torch.no_grad():
        net.residual_flow.bias.copy_(torch.tensor([0.25, -0.5, 0.0]))
        torch.testing.assert_close(net.velocity(moving, fixed)[0, :, 5, 6, 7], torch.tensor([0.25, -0.5, 1.0]))


def test_a_fine_stage_sees_the_image_warped_by_the_others_and_refines_their_velocity_at_full_resolution():
    net = _residual_net()
    fine = VxmDense("vm1", half_res=True, int_steps=5, residual_stage=True, fine_stage=True)
    fine.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        fine.fine_flow.weight.zero_()
        fine.fine_flow.bias.zero_()
    velocity, moving, fixed = _velocity_and_stage_input(fine, fine.fine_unet)
    # the others' constant velocity of one half-resolution voxel is two voxels of the full grid
    torch.testing.assert_close(velocity, torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 32, 32, 32))
    with torch.no_grad():
        fine.fine_flow.bias.copy_(torch.tensor([0.5, 0.0, -0.25]))
        torch.testing.assert_close(fine.velocity(moving, fixed)[0, :, 5, 6, 7], torch.tensor([0.5, 0.0, 1.75]))
    assert [len(stage) for stage in fine.stages()] == [2, 2, 2] and fine.stages()[-1][0] is fine.fine_unet


def test_a_residual_model_round_trips_and_old_model_files_load_as_single_stage(tmp_path):
    net = _residual_net()
    save_model(tmp_path / "r.pt", net, 2.0, {"name": "r"})
    loaded, record = load_model(tmp_path / "r.pt")
    assert record["config"]["residual_stage"] and loaded.config == net.config
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, y), net.eval().velocity(x, y))
    record = torch.load(tmp_path / "r.pt", weights_only=True)  # a file written before residual stages existed
    single = VxmDense("vm1", int_steps=5)
    record["config"] = {"features": "vm1", "half_res": True, "int_steps": 5}
    record["state_dict"] = single.state_dict()
    record["sha256"] = content_hash(record["state_dict"], {k: record[k] for k in ("config", "spacing_mm",
                                                                                  "normalisation")})
    torch.save(record, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert not old.config["residual_stage"] and not hasattr(old, "residual_unet")
    assert not old.config["fine_stage"] and not hasattr(old, "fine_unet")


def test_bundled_model_when_present_is_valid():
    if not BUNDLED.is_file():
        pytest.skip("no bundled model in this checkout")
    net, record = load_model(BUNDLED)
    assert record["training"]["iterations"] > 0 and record["spacing_mm"] > 0
    assert isinstance(net, VxmDense)


def test_the_same_head_network_goes_with_the_default_model_only_and_sees_its_image_level():
    """register() swaps networks after the default model's working pair and image level are built."""
    path = same_head_model("bundled")
    if path is None or not BUNDLED.is_file():
        pytest.skip("no bundled models in this checkout")
    assert path.parent == BUNDLED.parent
    assert all(same_head_model(choice) is None for choice in (DEFAULT_MODEL, "lpba40", "none", None, str(path)))
    same_head, default = read_model_file(path), read_model_file(BUNDLED)
    assert same_head["spacing_mm"] == default["spacing_mm"] and same_head["normalisation"] == default["normalisation"]


@pytest.mark.parametrize(("key", "value"), [("spacing_mm", 1.0), ("config", {"features": "vm2", "half_res": True,
                                                                            "int_steps": 3})])
def test_edited_settings_are_detected(tmp_path, key, value):
    path = tmp_path / "m.pt"
    save_model(path, VxmDense("vm2"), 2.0, {"name": "x"})
    record = torch.load(path, weights_only=True)
    record[key] = value
    torch.save(record, path)
    with pytest.raises(InputError, match="corrupt"):
        read_model_file(path)


def test_model_files_without_weights_or_with_unknown_features_are_input_errors(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, VxmDense("vm1"), 2.0, {"name": "x"})
    record = torch.load(path, weights_only=True)
    del record["state_dict"]
    torch.save(record, tmp_path / "empty.pt")
    with pytest.raises(InputError, match="no network weights"):
        read_model_file(tmp_path / "empty.pt")
    record = torch.load(path, weights_only=True)
    record["config"]["features"] = "vm9"
    record["sha256"] = content_hash(record["state_dict"], {k: record[k] for k in ("config", "spacing_mm",
                                                                                  "normalisation")})
    torch.save(record, tmp_path / "odd.pt")
    with pytest.raises(InputError, match="architecture"):
        load_model(tmp_path / "odd.pt")


def test_bundled_models_match_their_model_cards():
    import re

    for model in sorted(BUNDLED.parent.glob("*.pt")):
        card = model.with_suffix(".md").read_text()
        recorded = re.search(r"`([0-9a-f]{64})`", card).group(1)
        assert read_model_file(model)["sha256"] == recorded, model.name


def test_a_conv_block_on_two_channels_matches_a_direct_correlation_and_trains_its_weights():
    from scipy import ndimage

    from SlicerVoxelMorphLib.networks import ConvBlock

    torch.manual_seed(0)
    block = ConvBlock(2, 3)
    x = torch.rand(1, 2, 6, 5, 4)
    out = block(x)
    w, b = block.conv.weight.detach().double().numpy(), block.conv.bias.detach().double().numpy()
    data = x[0].double().numpy()
    for o in range(3):
        linear = sum(ndimage.correlate(data[c], w[o, c], mode="constant") for c in range(2)) + b[o]
        expected = np.where(linear > 0, linear, 0.2 * linear)
        np.testing.assert_allclose(out[0, o].detach().numpy(), expected, atol=1e-5)
    out.sum().backward()
    assert block.conv.weight.grad.shape == (3, 2, 3, 3, 3) and block.conv.weight.grad.abs().sum() > 0
