"""Bad input: a one-line error naming the problem, exit status 2, no traceback, inputs untouched."""

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import to_image
from SlicerVoxelMorphLib.cli import main


def _run(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _write(path, image: sitk.Image):
    sitk.WriteImage(image, str(path))
    return str(path)


def _digest(paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


@pytest.fixture
def files(pair):
    paths, _ = pair
    return {k: str(v) for k, v in paths.items()}


def _expect_error(capsys, args, *words):
    code, err = _run(capsys, args)
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    for word in words:
        assert word in err, err
    return err


def test_2d_and_4d_images_are_rejected(files, tmp_path, capsys):
    flat = _write(tmp_path / "flat.nii.gz", sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32)))
    _expect_error(capsys, ["register", "--fixed", flat, "--moving", files["moving"], "--out", str(tmp_path / "o")],
                  "2D", "3D image is required")
    four = sitk.JoinSeries([sitk.ReadImage(files["fixed"])] * 2)
    path4 = _write(tmp_path / "four.nii.gz", four)
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", path4, "--out", str(tmp_path / "o")],
                  "4D")


def test_nan_and_constant_images_are_rejected(files, tmp_path, capsys):
    array = sitk.GetArrayFromImage(sitk.ReadImage(files["fixed"])).astype(np.float32)
    array[3, 4, 5] = np.nan
    nan = _write(tmp_path / "nan.mha", to_image(array))  # NIfTI I/O drops NaN in ITK
    _expect_error(capsys, ["register", "--fixed", nan, "--moving", files["moving"], "--out", str(tmp_path / "o")],
                  "NaN")
    flat = _write(tmp_path / "const.nii.gz", to_image(np.full((10, 10, 10), 7.0, np.float32)))
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", flat, "--out", str(tmp_path / "o")],
                  "constant")


def test_label_problems_are_named(files, tmp_path, capsys):
    base = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none"]
    small = _write(tmp_path / "small.nii.gz", to_image(np.ones((8, 8, 8), np.int16)))
    _expect_error(capsys, [*base, "--fixed-labels", small, "--moving-labels", files["moving_labels"],
                           "--out", str(tmp_path / "o")], "another grid")
    moved = sitk.GetArrayFromImage(sitk.ReadImage(files["moving_labels"])) + 10
    moved[moved == 10] = 0
    reference = sitk.ReadImage(files["moving_labels"])
    other = to_image(moved.astype(np.int16), reference.GetSpacing(), reference.GetOrigin())
    other_path = _write(tmp_path / "other.nii.gz", other)
    _expect_error(capsys, [*base, "--fixed-labels", files["fixed_labels"], "--moving-labels", other_path,
                           "--out", str(tmp_path / "o")], "share no label")
    empty = to_image(np.zeros(moved.shape, np.int16), reference.GetSpacing(), reference.GetOrigin())
    empty_path = _write(tmp_path / "empty.nii.gz", empty)
    _expect_error(capsys, [*base, "--fixed-labels", files["fixed_labels"], "--moving-labels", empty_path,
                           "--out", str(tmp_path / "o")], "empty")


def test_bad_labels_and_smoothness_are_refused_before_the_affine_stage(files, tmp_path, capsys, monkeypatch):
    from SlicerVoxelMorphLib import preprocess

    def affine_align(*args, **kwargs):
        raise AssertionError("the affine stage ran before the inputs were checked")

    monkeypatch.setattr(preprocess, "affine_align", affine_align)
    base = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out", str(tmp_path / "o")]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(files["moving_labels"])) + 10
    labels[labels == 10] = 0
    reference = sitk.ReadImage(files["moving_labels"])
    other = _write(tmp_path / "other.nii.gz", to_image(labels.astype(np.int16), reference.GetSpacing(),
                                                         reference.GetOrigin()))
    _expect_error(capsys, [*base, "--fixed-labels", files["fixed_labels"], "--moving-labels", other], "share no label")
    _expect_error(capsys, [*base, "--smoothness", "-1"], "smoothness")


def test_unreadable_and_missing_files(files, tmp_path, capsys):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image at all")
    _expect_error(capsys, ["register", "--fixed", str(junk), "--moving", files["moving"],
                           "--out", str(tmp_path / "o")], "cannot read", "junk.nii.gz")
    _expect_error(capsys, ["register", "--fixed", str(tmp_path / "nope.nii"), "--moving", files["moving"],
                           "--out", str(tmp_path / "o")], "not found")


def test_model_files_of_the_wrong_kind(files, tmp_path, capsys):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path in (text, foreign, tmp_path / "missing.pt"):
        _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model",
                               str(path), "--out", str(tmp_path / "o")], str(path.name))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(foreign.read_bytes()[:300])
    pickled = tmp_path / "pickled.pt"
    torch.save({"settings": ValueError("x")}, pickled)  # a Python object no weights-only load accepts
    for path, reason in ((text, "damaged or truncated"), (truncated, "damaged or truncated"),
                         (pickled, "Python objects")):
        err = _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model",
                                     str(path), "--out", str(tmp_path / "o")], path.name, reason)
        assert err.endswith(")"), err  # a whole reason, not one cut off mid-word


def test_output_folder_must_be_empty_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none", "--refine", "1",
            "--quiet", "--out", str(out)]
    _expect_error(capsys, args, "not empty", "--overwrite")
    assert main([*args, "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "user data"
    assert not list(out.glob(".*partial*"))


def test_inputs_unchanged_by_cli_runs_and_errors(files, tmp_path, capsys):
    inputs = [files[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels")]
    before = _digest(inputs)
    main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed-labels",
          files["fixed_labels"], "--moving-labels", files["moving_labels"], "--model", "none", "--refine", "2",
          "--quiet", "--out", str(tmp_path / "o")])
    main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out", str(tmp_path / "o")])
    capsys.readouterr()
    assert _digest(inputs) == before


def test_cuda_request_without_gpu_is_a_clear_error(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none",
                           "--device", "cuda", "--out", str(tmp_path / "o")], "cuda")


def test_overwrite_removes_the_earlier_runs_outputs(files, tmp_path):
    out = tmp_path / "o"
    base = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none", "--refine", "1",
            "--quiet", "--out", str(out)]
    assert main([*base, "--fixed-labels", files["fixed_labels"], "--moving-labels", files["moving_labels"]]) == 0
    assert (out / "warped_labels.nii.gz").is_file()
    assert main([*base, "--overwrite"]) == 0  # no labels this time
    assert not (out / "warped_labels.nii.gz").exists()  # the stale label warp is gone
    assert "mean_dice_after" not in (out / "report.json").read_text()
    warped = out / "warped.nii.gz"
    before = warped.read_bytes()  # registering an earlier result again into its folder would replace the input
    assert main(["register", "--fixed", files["fixed"], "--moving", str(warped), "--model", "none", "--refine", "1",
                 "--quiet", "--overwrite", "--out", str(out)]) == 2
    assert warped.read_bytes() == before


def test_a_failed_run_leaves_no_output_folder_and_no_partial_files(files, tmp_path, capsys):
    out = tmp_path / "never"
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model",
                           str(tmp_path / "missing.pt"), "--out", str(out)], "not found")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def _image(size, spacing):
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image[0, 0, 0] = 1.0
    return image


def test_a_pair_that_needs_more_memory_than_is_available_is_refused_in_one_line(monkeypatch):
    from SlicerVoxelMorphLib import inputs
    from SlicerVoxelMorphLib.errors import InputError
    from SlicerVoxelMorphLib.register import register

    ct, brain = _image((512, 512, 300), (0.8, 0.8, 1.0)), _image((160, 192, 160), (1.0, 1.0, 1.0))
    # 0.8 GB + 60 bytes a fixed voxel + 32 a moving voxel (inputs.py), rounded
    assert inputs.peak_memory(ct, brain) == pytest.approx(0.8e9 + 60 * 512 * 512 * 300 + 32 * 160 * 192 * 160)
    monkeypatch.setattr(inputs, "available_memory", lambda: 4e9)
    with pytest.raises(InputError, match=r"fixed image 512x512x300 \(79 M voxels\), moving image 160x192x160 \(5 M "
                                         r"voxels\): registering them needs about 5\.7 GB of memory, 4\.0 GB is "
                                         r"available: resample to a coarser spacing") as error:
        register(ct, brain, model="none")
    assert "\n" not in str(error.value)
    inputs.check_inputs(brain, ct)  # 0.8 + 0.29 + 2.5 GB: fits
    monkeypatch.setattr(inputs, "available_memory", lambda: None)  # unknown: 8 GB assumed
    inputs.check_inputs(ct, brain)
    monkeypatch.setattr(inputs, "ASSUMED_MEMORY", 5e9)
    with pytest.raises(InputError, match=r"needs about 5\.7 GB of memory, 5\.0 GB is available"):
        inputs.check_inputs(ct, brain)


def test_available_memory_follows_meminfo_a_cgroup_limit_and_the_physical_memory(monkeypatch, tmp_path):
    from SlicerVoxelMorphLib import inputs

    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(inputs, "MEMINFO", meminfo)
    monkeypatch.setattr(inputs, "CGROUP", cgroup)
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\n")
    assert inputs.available_memory() == 4000000 * 1024  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert inputs.available_memory() == 4000000 * 1024  # a cgroup without a limit
    (cgroup / "memory.max").write_text("3000000000\n")
    assert inputs.available_memory() == 2e9  # a container's 3 GB, of which 1 GB is in use
    meminfo.unlink()  # not Linux: the physical memory
    monkeypatch.setattr(inputs.os, "sysconf", lambda name: {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    assert inputs.available_memory() == 4096000


def test_small_animal_images_and_thin_slabs_are_refused_in_one_line():
    from SlicerVoxelMorphLib.errors import InputError
    from SlicerVoxelMorphLib.register import register

    mouse = _image((100, 120, 80), (0.1, 0.1, 0.1))
    with pytest.raises(InputError, match="at least 32 mm"):
        register(mouse, mouse, model="none")
    slab = _image((200, 200, 2), (1.0, 1.0, 5.0))
    with pytest.raises(InputError, match="at least 32 mm"):
        register(slab, slab, model="none")


def test_masks_on_another_grid_or_empty_are_named(files, tmp_path, capsys):
    base = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none", "--refine", "1",
            "--out", str(tmp_path / "o")]
    small = _write(tmp_path / "small_mask.nii.gz", to_image(np.ones((8, 8, 8), np.uint8)))
    _expect_error(capsys, [*base, "--fixed-mask", small], "fixed mask", "another grid")
    reference = sitk.ReadImage(files["moving"])
    empty = to_image(np.zeros(sitk.GetArrayFromImage(reference).shape, np.uint8), reference.GetSpacing(),
                     reference.GetOrigin())
    _expect_error(capsys, [*base, "--moving-mask", _write(tmp_path / "empty_mask.nii.gz", empty)], "moving mask",
                  "empty")
    _expect_error(capsys, [*base, "--fixed-mask", files["fixed"]], "fixed mask", "non-integer")  # an image, not a mask


def test_masks_that_miss_the_working_region_and_bad_smoothness_are_named(files, tmp_path, capsys):
    reference = sitk.ReadImage(files["moving"])
    far = np.zeros(sitk.GetArrayFromImage(reference).shape, np.uint8)
    far[-2:, -2:, -2:] = 1  # a corner far outside the fixed image's foreground
    mask = _write(tmp_path / "corner.nii.gz", to_image(far, reference.GetSpacing(), reference.GetOrigin()))
    base = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none", "--refine", "1",
            "--no-affine", "--out", str(tmp_path / "o")]
    moved = sitk.ReadImage(mask)
    moved.SetOrigin([o + 200.0 for o in moved.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "corner_far.nii.gz"))
    shifted = sitk.ReadImage(files["moving"])
    shifted.SetOrigin([o + 200.0 for o in shifted.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "moving_far.nii.gz"))
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", str(tmp_path / "moving_far.nii.gz"),
                           "--moving-mask", str(tmp_path / "corner_far.nii.gz"), "--model", "none", "--refine", "1",
                           "--no-affine", "--out", str(tmp_path / "o")], "covers no voxel")
    _expect_error(capsys, [*base, "--smoothness", "nan"], "smoothness")
    _expect_error(capsys, [*base, "--smoothness", "0"], "smoothness")
    assert not (tmp_path / "o").exists()


def _process(args: list[str]):
    import os
    import subprocess
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"
    env = {**os.environ, "PYTHONPATH": str(package)}
    return subprocess.run([sys.executable, "-m", "SlicerVoxelMorphLib.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_process_exits_2_with_one_line_for_a_missing_input(tmp_path):
    done = _process(["register", "--fixed", str(tmp_path / "nowhere.nii.gz"), "--moving",
                     str(tmp_path / "nowhere.nii.gz"), "--out", str(tmp_path / "out")])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "nowhere.nii.gz" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_process_writes_every_output_before_it_exits(pair, tmp_path):
    paths, _ = pair
    out = tmp_path / "out"
    done = _process(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                     "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
                     "--model", "none", "--refine", "2", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "mean Dice" in done.stdout  # printed and flushed before the fast exit
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz"):
        assert sitk.ReadImage(str(out / name)).GetSize() == sitk.ReadImage(str(paths["fixed"])).GetSize()
    from PIL import Image

    assert Image.open(out / "report.png").size[0] > 100
    assert "mean_dice_after" in json.loads((out / "report.json").read_text())


def test_masks_that_never_meet_fail_the_affine_stage_with_one_line(tmp_path, capsys):
    from conftest import phantom

    array, _ = phantom((40, 44, 36))
    corner, opposite = np.zeros(array.shape, np.uint8), np.zeros(array.shape, np.uint8)
    corner[:4, :4, :4] = 1
    opposite[-4:, -4:, -4:] = 1
    paths = {}
    for name, image in (("fixed", to_image(array)), ("fixed_mask", to_image(corner)),
                        ("moving_mask", to_image(opposite))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    code, err = _run(capsys, ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["fixed"]),
                              "--fixed-mask", str(paths["fixed_mask"]), "--moving-mask", str(paths["moving_mask"]),
                              "--quiet", "--out", str(tmp_path / "out")])
    assert code == 2 and "affine alignment failed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_made_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch):
    from SlicerVoxelMorphLib import register as register_module

    monkeypatch.setattr(register_module, "register", lambda *a, **k: pytest.fail("registered before the check"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out",
                           str(blocker / "result")], "a_file", "not a folder")
    assert blocker.read_text() == "not a folder"


def test_a_write_that_fails_is_one_line_and_leaves_no_partial_file(files, tmp_path, capsys, monkeypatch):
    def failing_write(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nsitk::ERROR: No space left")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    field = sitk.Image(sitk.ReadImage(files["fixed"]).GetSize(), sitk.sitkVectorFloat64, 3)
    field.CopyInformation(sitk.ReadImage(files["fixed"]))
    monkeypatch.undo()
    out = tmp_path / "applied"
    out.mkdir()
    transform = _write(out / "zero.nii.gz", field)
    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    _expect_error(capsys, ["apply", "--transform", transform, "--input", files["moving"], "--output",
                           str(out / "warped.nii.gz")], "cannot write", "warped.nii.gz", "No space left")
    assert sorted(p.name for p in out.iterdir()) == ["zero.nii.gz"]


def test_an_os_error_while_writing_is_one_line(files, tmp_path, capsys, monkeypatch):
    from SlicerVoxelMorphLib import files as files_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(files_module.tempfile, "mkdtemp", refuse)
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--model", "none",
                           "--refine", "2", "--out", str(tmp_path / "out")], "Permission denied", "out")


@pytest.mark.parametrize("option,value", [("--refine", "-5"), ("--threads", "-2"), ("--threads", "0")])
def test_negative_steps_and_threads_are_refused(files, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        main(["register", "--fixed", files["fixed"], "--moving", files["moving"], option, value, "--out",
              str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_label_names_that_name_one_id_twice_are_refused(files, tmp_path, capsys):
    names = tmp_path / "names.csv"
    names.write_text("id,name\n1,caudate\n1,putamen\n")
    _expect_error(capsys, ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed-labels",
                           files["fixed_labels"], "--moving-labels", files["moving_labels"], "--label-names",
                           str(names), "--out", str(tmp_path / "o")], "names.csv", "id 1")
