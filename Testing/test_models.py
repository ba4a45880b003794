"""Model files: self-describing, loadable with weights_only=True, tamper-evident; networks' shapes."""

import pytest
import torch

from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.models import BUNDLED, content_hash, load_model, read_model_file, save_model
from SlicerVoxelMorphLib.networks import VxmDense


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = VxmDense("vm1", half_res=False, int_steps=5)
    path = tmp_path / "m.pt"
    digest = save_model(path, net, 2.0, {"name": "test", "training": {"iterations": 3}})
    record = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert record["sha256"] == digest and record["config"] == {"features": "vm1", "half_res": False, "int_steps": 5}
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


def test_bundled_model_when_present_is_valid():
    if not BUNDLED.is_file():
        pytest.skip("no bundled model in this checkout")
    net, record = load_model(BUNDLED)
    assert record["training"]["iterations"] > 0 and record["spacing_mm"] > 0
    assert isinstance(net, VxmDense)


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
