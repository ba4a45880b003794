"""Training: runs on tiny synthetic data, learns, and resumes to exactly the uninterrupted result."""

import csv

import pytest
import SimpleITK as sitk
import torch

from conftest import deform, phantom, smooth_field, to_image
from SlicerVoxelMorphLib.cli import main
from SlicerVoxelMorphLib.models import load_model


def _dataset(tmp_path, n: int = 4, shape: tuple[int, int, int] = (32, 32, 32)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    image, labels = phantom(shape, seed=0)
    base, base_labels = to_image(image), to_image(labels)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for s in range(n):
        field = smooth_field(base, amplitude=3.0, seed=10 + s)
        sitk.WriteImage(deform(base, field, sitk.sitkLinear), str(tmp_path / "img" / f"S{s}.nii.gz"))
        sitk.WriteImage(deform(base_labels, field, sitk.sitkNearestNeighbor), str(tmp_path / "lab" / f"S{s}.nii.gz"))
    return tmp_path / "img", tmp_path / "lab"


def _train(images, labels, out, *extra):
    args = ["train", "--images", str(images), "--labels", str(labels), "--val-subjects", "S3",
            "--iterations", "6", "--val-every", "3", "--checkpoint-every", "3", "--lr", "1e-3",
            "--device", "cpu", "--quiet", "--out", str(out), *extra]
    assert main(args) == 0


def test_train_resume_is_exact_and_writes_a_model(tmp_path):
    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "straight")
    _train(images, labels, tmp_path / "chunked", "--chunk", "3")
    _train(images, labels, tmp_path / "chunked", "--resume")
    a, rec_a = load_model(tmp_path / "straight" / "model.pt")
    b, _ = load_model(tmp_path / "chunked" / "model.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    rows = list(csv.DictReader(open(tmp_path / "straight" / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    assert rows[2]["val_dice"] and 0 < float(rows[2]["val_dice"]) <= 1
    assert rec_a["training"]["iterations"] == 6
    assert rec_a["training"]["val_subjects"] == ["S3"]
    assert (tmp_path / "straight" / "learning_curves.png").stat().st_size > 0


def test_bfloat16_training_resumes_exactly_and_float32_is_kept_where_a_level_is_two_voxels_deep(tmp_path):
    from SlicerVoxelMorphLib.devices import cpu_has_native_bfloat16
    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    if not cpu_has_native_bfloat16():
        pytest.skip("this CPU has no native bfloat16")
    images, labels = _dataset(tmp_path, shape=(96, 32, 32))  # 48 voxels deep at the network level
    paths, label_paths = (sorted(str(p) for p in folder.iterdir()) for folder in (images, labels))
    deep = Trainer(TrainConfig(images=paths, labels=label_paths), tmp_path / "deep", torch.device("cpu"))
    assert deep.grid.GetSize()[2] // deep.factor == 48 and deep.dtype is torch.bfloat16
    _train(images, labels, tmp_path / "straight")
    _train(images, labels, tmp_path / "chunked", "--chunk", "3")
    _train(images, labels, tmp_path / "chunked", "--resume")
    (a, record), (b, _) = (load_model(tmp_path / run / "model.pt") for run in ("straight", "chunked"))
    assert record["training"]["hardware"].endswith("bfloat16 convolutions")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.isfinite(pa).all(), name
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    shallow_images, shallow_labels = _dataset(tmp_path / "small")  # 16 deep: float32
    shallow = Trainer(TrainConfig(images=sorted(str(p) for p in shallow_images.iterdir()),
                                  labels=sorted(str(p) for p in shallow_labels.iterdir())), tmp_path / "s",
                      torch.device("cpu"))
    assert shallow.grid.GetSize()[2] // shallow.factor == 16 and shallow.dtype is None


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    images, labels = _dataset(tmp_path, 2)
    code = main(["train", "--images", str(images), "--labels", str(labels), "--quiet", "--out",
                 str(tmp_path / "new"), "--resume"])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_synthesis_training_warm_starts_logs_variants_and_keeps_the_best(tmp_path):
    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "base")
    _train(images, labels, tmp_path / "synth", "--synth-fraction", "0.5", "--init-model",
           str(tmp_path / "base" / "model.pt"))
    rows = list(csv.DictReader(open(tmp_path / "synth" / "log.csv")))
    kinds = {r["synthetic"] for r in rows}
    assert kinds == {"0", "1"}
    assert all(r["ncc"] == "" for r in rows if r["synthetic"] == "1")  # no image similarity across contrasts
    validated = [r for r in rows if r["val_worst"]]
    assert validated
    for row in validated:
        dices = [float(row[f"val_dice_{k}"]) for k in ("plain", "inverted", "t2", "flair", "monotone",
                                                         "nonmonotone", "head")]
        assert float(row["val_worst"]) == min(dices)
    _, best = load_model(tmp_path / "synth" / "best_model.pt")
    assert best["validation"]["val_worst"] == max(float(r["val_worst"]) for r in validated)


def test_synthesis_needs_labels_and_a_matching_warm_start(tmp_path, capsys):
    images, labels = _dataset(tmp_path)
    code = main(["train", "--images", str(images), "--synth-fraction", "0.5", "--quiet", "--out", str(tmp_path / "a")])
    assert code == 2 and "needs training label maps" in capsys.readouterr().err
    _train(images, labels, tmp_path / "base")
    code = main(["train", "--images", str(images), "--labels", str(labels), "--features", "vm1", "--init-model",
                 str(tmp_path / "base" / "model.pt"), "--quiet", "--out", str(tmp_path / "b")])
    assert code == 2 and "architecture" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_drops_rows_logged_after_the_checkpoint(tmp_path, capsys):
    images, labels = _dataset(tmp_path)
    out = tmp_path / "run"
    _train(images, labels, out, "--chunk", "3")
    with open(out / "log.csv", "a") as f:  # a crash after iteration 3 had logged rows 4 and 5
        f.write("4,1.0,0,-0.5\n5,1.1,0,-0.5\n")
    code = main(["train", "--images", str(images), "--labels", str(labels), "--val-subjects", "S3",
                 "--iterations", "6", "--lr", "5e-3", "--device", "cpu", "--quiet", "--out", str(out), "--resume"])
    assert code == 2 and "lr" in capsys.readouterr().err
    _train(images, labels, out, "--resume")
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))


def test_worker_processes_draw_the_same_pairs_in_order(tmp_path):
    images, labels = _dataset(tmp_path)
    options = ("--synth-fraction", "0.5", "--known-fraction", "0.5", "--field-weight", "0.1")
    _train(images, labels, tmp_path / "thread", *options)
    _train(images, labels, tmp_path / "workers", *options, "--workers", "3")
    a, _ = load_model(tmp_path / "thread" / "model.pt")
    b, _ = load_model(tmp_path / "workers" / "model.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    rows = [list(csv.DictReader(open(tmp_path / run / "log.csv"))) for run in ("thread", "workers")]
    assert [r["synthetic"] for r in rows[0]] == [r["synthetic"] for r in rows[1]]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_the_log_records_how_long_each_step_waited_for_its_pair(tmp_path, monkeypatch):
    import time

    from SlicerVoxelMorphLib import train

    images, labels = _dataset(tmp_path)
    sample = train.Trainer.sample

    def slow(self, iteration):
        time.sleep(0.5 if iteration >= 3 else 0.0)
        return sample(self, iteration)

    monkeypatch.setattr(train.Trainer, "sample", slow)
    _train(images, labels, tmp_path / "x", "--val-every", "100", "--checkpoint-every", "100")
    waits = [float(r["wait"]) for r in csv.DictReader(open(tmp_path / "x" / "log.csv"))]
    assert max(waits[:3]) < 0.3  # drawn ahead while the first steps ran
    assert all(0.3 < w < 0.6 for w in waits[4:])  # 0.5 s a pair, less the step the drawer ran beside


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_failing_batch_producer_stops_training_with_its_error(tmp_path, monkeypatch, workers):
    from SlicerVoxelMorphLib import train

    images, labels = _dataset(tmp_path)

    sample = train.Trainer.sample

    def broken(self, iteration):
        if iteration == 1:
            raise ValueError("synthetic failure in the batch producer")
        return sample(self, iteration)

    monkeypatch.setattr(train.Trainer, "sample", broken)
    with pytest.raises(ValueError, match="batch producer"):
        main(["train", "--images", str(images), "--labels", str(labels), "--iterations", "3", "--device", "cpu",
              "--workers", workers, "--quiet", "--out", str(tmp_path / "x")])
    rows = list(csv.DictReader(open(tmp_path / "x" / "log.csv")))
    assert [r["iteration"] for r in rows] == ["1"]  # the pair before the failing one trained


def test_bad_training_settings_and_a_used_folder_are_refused(tmp_path, capsys):
    images, labels = _dataset(tmp_path)
    base = ["train", "--images", str(images), "--labels", str(labels), "--val-subjects", "S3", "--iterations", "2",
            "--device", "cpu", "--quiet"]
    assert main([*base, "--synth-fraction", "0.5", "--dice-weight", "0", "--out", str(tmp_path / "a")]) == 2
    assert "dice-weight" in capsys.readouterr().err
    assert main([*base, "--known-fraction", "0.5", "--out", str(tmp_path / "c")]) == 2
    assert "--synth-fraction" in capsys.readouterr().err
    for window in ("4", "1"):  # an NCC window has a centre voxel and neighbours
        assert main([*base, "--ncc-window", window, "--out", str(tmp_path / "d")]) == 2
        assert "--ncc-window" in capsys.readouterr().err
    for option, value in (("--tissue-weight", "-1"), ("--ncc-weight", "-1"), ("--lr", "-1"), ("--lr", "0"),
                          ("--iterations", "-3"), ("--smooth-weight", "-0.5"), ("--field-weight", "-1"),
                          ("--val-every", "0"), ("--checkpoint-every", "-1"), ("--atlas-fraction", "1.5")):
        assert main([*base, option, value, "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert option in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists(), err
    assert main([*base, "--atlas", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "f")]) == 2
    assert "atlas" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_atlas_mode_and_a_list_file_train(tmp_path):
    images, labels = _dataset(tmp_path)
    rows = ["image,labels,split"] + [f"img/S{s}.nii.gz,lab/S{s}.nii.gz,{'val' if s == 3 else 'train'}"
                                     for s in range(4)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert main(["train", "--list", str(tmp_path / "list.csv"), "--atlas", str(images / "S0.nii.gz"),
                 "--atlas-labels", str(labels / "S0.nii.gz"), "--mode", "atlas", "--iterations", "3",
                 "--val-every", "3", "--device", "cpu", "--quiet", "--out", str(tmp_path / "atlas")]) == 0
    _, record = load_model(tmp_path / "atlas" / "model.pt")
    assert record["training"]["val_subjects"] == ["S3"] and record["training"]["atlas"] == "S0"
    assert record["training"]["config"]["mode"] == "atlas" and 0 < record["validation"]["val_dice"] <= 1


def test_training_lowers_the_loss(tmp_path):
    images, labels = _dataset(tmp_path)
    assert main(["train", "--images", str(images), "--labels", str(labels), "--val-subjects", "S3", "--iterations",
                 "40", "--val-every", "40", "--lr", "2e-3", "--no-augment", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path / "learn")]) == 0
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "learn" / "log.csv"))]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.01, (first, last)  # measured: -1.732 -> -1.747


def test_too_many_labels_for_memory_are_refused(tmp_path, capsys, monkeypatch):
    from SlicerVoxelMorphLib import train

    images, labels = _dataset(tmp_path)
    monkeypatch.setattr(train, "MAX_LABEL_BYTES", 1000)  # 3 labels x 4 subjects x 16^3 voxels is more
    code = main(["train", "--images", str(images), "--labels", str(labels), "--iterations", "1", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "x")])
    assert code == 2 and "merge labels" in capsys.readouterr().err


def test_known_pairs_train_without_image_similarity_and_validation_scores_the_head_field(tmp_path):
    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "known", "--synth-fraction", "1", "--known-fraction", "1",
           "--field-weight", "0.1")
    rows = list(csv.DictReader(open(tmp_path / "known" / "log.csv")))
    assert all(r["synthetic"] == "1" and r["ncc"] == "" and r["dice"] != "" for r in rows)  # contrasts differ
    assert all(float(r["field"]) > 0 for r in rows)  # squared end-point error, voxels^2
    errors = [float(r["val_head_epe_mm"]) for r in rows if r["val_head_epe_mm"]]
    # a barely trained network moves little: the error is about the known field's mean size (largest 6 mm)
    assert errors and all(0.3 < e < 6 for e in errors)


def test_rescan_pairs_train_on_the_known_field_and_need_labels_and_a_field_weight(tmp_path, capsys):
    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "rescan", "--rescan-fraction", "1", "--field-weight", "0.5")
    rows = list(csv.DictReader(open(tmp_path / "rescan" / "log.csv")))
    assert all(r["rescan"] == "1" and r["synthetic"] == "0" and r["ncc"] == "" for r in rows)
    assert all(float(r["field"]) > 0 and r["dice"] != "" for r in rows)  # end-point error and label overlap
    base = ["train", "--images", str(images), "--val-subjects", "S3", "--iterations", "2", "--device", "cpu",
            "--quiet", "--rescan-fraction", "0.5"]
    assert main([*base, "--labels", str(labels), "--out", str(tmp_path / "a")]) == 2
    assert "--field-weight" in capsys.readouterr().err
    assert main([*base, "--field-weight", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main([*base, "--labels", str(labels), "--field-weight", "1", "--synth-fraction", "0.7",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--rescan-fraction" in capsys.readouterr().err


def test_the_tissue_weight_scores_the_tissue_classes_beside_the_structures_without_changing_the_pairs(tmp_path):
    from SlicerVoxelMorphLib.synth import TISSUE_LABELS
    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    images, labels = _dataset(tmp_path)
    paths = sorted(str(p) for p in images.iterdir())
    label_paths = sorted(str(p) for p in labels.iterdir())

    def trainer(tissue_weight: float, out: str) -> Trainer:
        config = TrainConfig(images=paths[:3], labels=label_paths[:3], val_images=paths[3:], val_labels=label_paths[3:],
                             synth_fraction=0.5, tissue_weight=tissue_weight, seed=3)
        return Trainer(config, tmp_path / out, torch.device("cpu"))

    with_tissue, without = trainer(1.0, "with"), trainer(0.0, "without")
    kinds = set()
    for iteration in range(8):
        a, b = with_tissue.sample(iteration), without.sample(iteration)
        kinds.add(a[-1])
        torch.testing.assert_close(a[0], b[0])  # the same images: the tissue maps draw no random numbers
        for side in (2, 3):  # moving and fixed label maps
            torch.testing.assert_close(a[side][:, :3], b[side])  # the structures as before (3 labels in the phantom)
            tissues = a[side][:, 3:]
            assert a[side].shape[1] == 3 + TISSUE_LABELS and b[side].shape[1] == 3
            rounding = TISSUE_LABELS * 0.5 / 255  # each channel's fraction is stored as uint8 (255 = all)
            assert tissues.sum(1).max() <= 1 + rounding  # the tissue fractions of a voxel add up to one at most
            assert (tissues.sum(1)[b[side].sum(1) > 0.99] > 0.99 - rounding).all()  # structure voxels have tissue
    assert kinds == {"real", "synthetic"}
    # tissue maps are built only for a tissue loss
    assert all(s.soft_tissues is not None for s in with_tissue.train_subjects)
    assert all(s.soft_tissues is None for s in without.train_subjects)
    # the tissue overlap is logged beside the structures' and enters the loss with its weight
    terms = with_tissue.step(with_tissue.sample(0))
    assert 0 < terms["tissue"] <= 1 and 0 < terms["dice"] <= 1
    expected = terms["smooth"] + terms.get("ncc", 0) - terms["dice"] - 1.0 * terms["tissue"]
    assert abs(terms["loss"] - expected) < 1e-5
    # validation reports the tissue labels' Dice of the plain pairs
    assert set(map(int, with_tissue.val_tissues["S3"].ravel())) == set(range(TISSUE_LABELS + 1))
    scores = with_tissue.validate()
    assert 0 < scores["val_tissue_dice"] <= 1


def test_a_residual_stage_starts_as_its_init_model_and_trains_only_itself(tmp_path, capsys):
    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "base")
    code = main(["train", "--images", str(images), "--labels", str(labels), "--residual-stage", "--quiet",
                 "--out", str(tmp_path / "alone")])
    assert code == 2 and "--init-model" in capsys.readouterr().err
    base, _ = load_model(tmp_path / "base" / "model.pt")
    grow = ("--residual-stage", "--init-model", str(tmp_path / "base" / "model.pt"))
    _train(images, labels, tmp_path / "cascade", *grow, "--chunk", "3")
    halfway = torch.load(tmp_path / "cascade" / "checkpoint.pt", weights_only=True)["net"]
    _train(images, labels, tmp_path / "cascade", *grow, "--resume")
    cascade, record = load_model(tmp_path / "cascade" / "model.pt")
    assert record["config"]["residual_stage"] and record["training"]["config"]["residual_stage"]
    trained = cascade.state_dict()
    for name, value in base.state_dict().items():  # the first stage is the init model's, untouched, resumed or not
        torch.testing.assert_close(trained[name], value, msg=name)
        torch.testing.assert_close(halfway[name], value, msg=name)
    residual = [name for name in trained if name.startswith("residual_")]
    assert residual and any(not torch.equal(trained[name], halfway[name]) for name in residual)
    config = TrainConfig(images=sorted(str(p) for p in images.iterdir()),
                         labels=sorted(str(p) for p in labels.iterdir()), init_model=grow[2], residual_stage=True)
    grown = Trainer(config, tmp_path / "fresh", torch.device("cpu")).net
    for name, value in base.unet.state_dict().items():  # the residual UNet starts as a copy of the first stage's
        torch.testing.assert_close(grown.residual_unet.state_dict()[name], value, msg=name)
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():  # with its near-zero residual head the pair starts as the init model
        torch.testing.assert_close(grown.eval().velocity(x, y), base.velocity(x, y), atol=1e-3, rtol=0)


def _trained_cascade(tmp_path) -> tuple:
    """A small dataset and a two-stage model trained on it (a base model, then a residual stage on it)."""
    images, labels = _dataset(tmp_path)
    _train(images, labels, tmp_path / "base")
    _train(images, labels, tmp_path / "cascade", "--residual-stage", "--init-model",
           str(tmp_path / "base" / "model.pt"))
    return images, labels, load_model(tmp_path / "cascade" / "model.pt")[0]


def test_all_stages_fine_tunes_a_cascade_end_to_end(tmp_path):
    images, labels, cascade = _trained_cascade(tmp_path)
    _train(images, labels, tmp_path / "joint", "--residual-stage", "--all-stages", "--init-model",
           str(tmp_path / "cascade" / "model.pt"))
    joint, record = load_model(tmp_path / "joint" / "model.pt")
    assert record["training"]["config"]["all_stages"] and joint.config == cascade.config
    before, after = cascade.state_dict(), joint.state_dict()
    for prefix in ("unet.", "flow.", "residual_unet.", "residual_flow."):  # every stage learned
        assert any(not torch.equal(after[name], before[name]) for name in before if name.startswith(prefix)), prefix


def test_a_fine_stage_grows_on_a_cascade_and_starts_as_it(tmp_path):
    from SlicerVoxelMorphLib.layers import ResizeTransform
    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    images, labels, cascade = _trained_cascade(tmp_path)
    _train(images, labels, tmp_path / "fine", "--residual-stage", "--fine-stage", "--init-model",
           str(tmp_path / "cascade" / "model.pt"))
    fine, record = load_model(tmp_path / "fine" / "model.pt")
    assert record["config"]["fine_stage"] and record["config"]["residual_stage"]
    trained = fine.state_dict()
    for name, value in cascade.state_dict().items():  # both earlier stages untouched
        torch.testing.assert_close(trained[name], value, msg=name)
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    config = TrainConfig(images=sorted(str(p) for p in images.iterdir()),
                         labels=sorted(str(p) for p in labels.iterdir()),
                         init_model=str(tmp_path / "cascade" / "model.pt"), residual_stage=True, fine_stage=True)
    start = Trainer(config, tmp_path / "fresh", torch.device("cpu")).net.eval()
    for name, value in cascade.residual_unet.encoder.state_dict().items():  # encoder copied from the last UNet
        torch.testing.assert_close(start.fine_unet.encoder.state_dict()[name], value, msg=name)
    assert not torch.equal(trained["fine_flow.weight"], start.fine_flow.weight)  # and training moved it
    with torch.no_grad():  # with its near-zero head the grown network starts as the cascade, at full resolution
        coarse = cascade.velocity(x, y)
        torch.testing.assert_close(start.velocity(x, y), ResizeTransform(2)(coarse, (32, 32, 32)), atol=1e-3, rtol=0)


def test_a_list_file_with_a_blank_cell_names_its_row(tmp_path, capsys):
    images, labels = _dataset(tmp_path)
    names = sorted(p.name for p in images.iterdir())
    rows = [f"{images / names[0]},{labels / names[0]}", f"{images / names[1]},"]
    (tmp_path / "list.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    assert main(["train", "--list", str(tmp_path / "list.csv"), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "row 3" in err and "labels" in err and len(err.strip().splitlines()) == 1, err


def test_fill_blanked_draws_the_blanked_structure_into_both_real_images_and_validation_scores_it(tmp_path, capsys):
    from SlicerVoxelMorphLib.train import TrainConfig, Trainer

    image, labels = phantom((32, 32, 32), seed=0)
    image[labels == 2] = 0  # blanked out of the image, as LPBA40's cerebellum
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    base, base_labels = to_image(image), to_image(labels)
    for s in range(4):
        field = smooth_field(base, amplitude=2.0, seed=10 + s)
        sitk.WriteImage(deform(base, field, sitk.sitkLinear), str(tmp_path / "img" / f"S{s}.nii.gz"))
        sitk.WriteImage(deform(base_labels, field, sitk.sitkNearestNeighbor), str(tmp_path / "lab" / f"S{s}.nii.gz"))
    paths = sorted(str(p) for p in (tmp_path / "img").iterdir())
    label_paths = sorted(str(p) for p in (tmp_path / "lab").iterdir())

    def trainer(fill: float, out: str) -> Trainer:
        config = TrainConfig(images=paths[:3], labels=label_paths[:3], val_images=paths[3:], val_labels=label_paths[3:],
                             fill_blanked=fill, augment=False, seed=3)
        return Trainer(config, tmp_path / out, torch.device("cpu"))

    filled, plain = trainer(1.0, "filled"), trainer(0.0, "plain")
    for subject in filled.train_subjects:  # the blanked structure, found at the network level
        region = torch.from_numpy(subject.blanked)
        inside = subject.soft_labels[0, 1].float() / 255  # label 2, the second of [1, 2, 3]
        assert region.any() and (inside[region] > 0.5).all()
    for iteration in range(4):
        a, b = filled.sample(iteration), plain.sample(iteration)
        for side in (0, 1):  # moving and fixed image
            sides = [subject for subject in filled.train_subjects
                     if torch.equal(subject.image, b[side])]  # which subject: the pair is the same with or without
            region = torch.from_numpy(sides[0].blanked)[None, None]
            torch.testing.assert_close(a[side][~region], b[side][~region])  # nothing else changes
            assert a[side][region].mean() > 0.3 > b[side][region].mean()  # drawn in, where it was dark
    scores = filled.validate()
    assert 0 < scores["val_dice_cerebellum"] <= 1 and scores["val_worst"] <= scores["val_dice_cerebellum"]
    base = ["train", "--images", paths[0].rsplit("/", 1)[0], "--labels", label_paths[0].rsplit("/", 1)[0],
            "--val-subjects", "S3", "--iterations", "2", "--device", "cpu", "--quiet"]
    assert main([*base, "--fill-blanked", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--fill-blanked" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
