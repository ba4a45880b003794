"""Checks of the Slicer module that need no Slicer: panel file, module source, scene helpers, CMake lists.

The grid transform check rebuilds Slicer's vtkOrientedGridTransform from plain VTK classes and compares it
with SimpleITK's DisplacementFieldTransform on a rotated, flipped, anisotropic grid.
"""

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SlicerVoxelMorphLib import images, scene

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SlicerVoxelMorph"
MODULE_PY = MODULE_DIR / "SlicerVoxelMorph.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SlicerVoxelMorph.ui"

# widget name suffix -> the class the module code expects behind self.ui.<name>
SUFFIX_CLASS = {
    "Selector": "qMRMLNodeComboBox",
    "CheckableComboBox": "qMRMLCheckableNodeComboBox",
    "SliderWidget": "ctkSliderWidget",
    "Button": "QPushButton",
    "ComboBox": "QComboBox",
    "SpinBox": "QSpinBox",
    "CheckBox": "QCheckBox",
    "Label": "QLabel",
    "LineEdit": "ctkPathLineEdit",
    "CollapsibleButton": "ctkCollapsibleButton",
}


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    source = MODULE_PY.read_text()
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.get_source_segment(source, item.annotation)
                    for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in SlicerVoxelMorph.py")


def enum_classes() -> set[str]:
    return {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)
            and any(isinstance(b, ast.Attribute) and b.attr == "Enum" for b in node.bases)}


# --- panel (.ui) -------------------------------------------------------------------------------------------


def test_ui_parses_and_scene_reaches_every_node_selector():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SlicerVoxelMorph"
    selectors = {name for name, w in ui_widgets().items()
                 if w.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == "SlicerVoxelMorph"
                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors == connected
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in ui_widgets().values() if not w.get("class").startswith("Q")}
    assert used <= declared


def test_every_ui_attribute_used_by_the_module_exists_with_its_class():
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert {"applyButton", "statusLabel", "modelPathLineEdit", "alsoWarpCheckableComboBox"} <= used
    widgets = ui_widgets()
    for name in sorted(used):
        assert name in widgets, f"self.ui.{name} is not in {UI_FILE.name}"
        suffix = next(s for s in sorted(SUFFIX_CLASS, key=len, reverse=True) if name.endswith(s))
        assert widgets[name].get("class") == SUFFIX_CLASS[suffix], name


def test_parameter_names_match_parameter_node_fields_and_widget_types():
    fields = parameter_fields()
    enums = enum_classes()
    bound = {parameter_name(w): w for w in ui_widgets().values() if parameter_name(w)}
    assert set(bound) == set(fields)
    for name, widget in bound.items():
        annotation, cls = fields[name], widget.get("class")
        if "vtkMRML" in annotation:
            assert cls == "qMRMLNodeComboBox", name
            node_types = {s.text for p in widget.findall("property") if p.get("name") == "nodeTypes"
                          for s in p.iter("string")}
            assert node_types == set(re.findall(r"vtkMRML\w+", annotation)), name
            optional = "None" in annotation
            none_enabled = any(p.get("name") == "noneEnabled" and p.findtext("bool") == "true"
                               for p in widget.findall("property"))
            assert none_enabled == (optional or name not in ("fixedVolume", "movingVolume")), name
        elif annotation == "bool":
            assert cls == "QCheckBox", name
        elif annotation in enums:
            assert cls == "QComboBox", name
        elif annotation == "Path":
            assert cls == "ctkPathLineEdit", name
        elif annotation.startswith("Annotated[int"):
            assert cls == "QSpinBox", name
        elif annotation.startswith("Annotated[float, WithinRange("):  # a slider needs a bounded float
            assert cls == "ctkSliderWidget", name
            low, high = map(float, re.findall(r"WithinRange\(([^,]+), ([^)]+)\)", annotation)[0])
            limits = {prop.get("name"): float(prop.findtext("double")) for prop in widget.findall("property")
                      if prop.get("name") in ("minimum", "maximum")}
            assert limits == {"minimum": low, "maximum": high}, name
        else:
            raise AssertionError(f"no widget rule for {name}: {annotation}")


# --- module source -----------------------------------------------------------------------------------------


def test_module_compiles_and_imports_no_torch_at_load(tmp_path):
    py_compile.compile(str(MODULE_PY), cfile=str(tmp_path / "m.pyc"), doraise=True)
    top_level = set()
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert not any(name.split(".")[0] in ("torch", "SlicerVoxelMorphLib", "SimpleITK") for name in top_level)
    lazy = [node for node in ast.walk(module_tree()) if isinstance(node, ast.ImportFrom)
            and node.module == "SlicerVoxelMorphLib.register"]
    assert lazy, "register() must be imported inside the logic"
    source = MODULE_PY.read_text()
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        assert f"({name}" in source


def test_cmake_installs_every_engine_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"SlicerVoxelMorphLib/[\w/]+\.py", text))
    engine = {f"SlicerVoxelMorphLib/{p.name}" for p in (MODULE_DIR / "SlicerVoxelMorphLib").glob("*.py")}
    assert engine == listed
    assert "SlicerVoxelMorphLib/bundled/lpba40.pt" in text
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in text
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "SlicerVoxelMorph")).is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "project(VoxelMorph)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top
    for icon in (ROOT / "Resources/Icons/SlicerVoxelMorph.png", MODULE_DIR / "Resources/Icons/SlicerVoxelMorph.png"):
        header = icon.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == int.from_bytes(header[20:24], "big") == 128


def test_every_bundled_file_is_installed_by_cmake_and_by_pip():
    """The models and the orientation template reach Slicer (CMake resources) and a pip install (package data)."""
    import fnmatch
    import tomllib

    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    bundled = [p for p in (MODULE_DIR / "SlicerVoxelMorphLib" / "bundled").iterdir() if p.suffix != ".md"]
    assert {p.name for p in bundled} >= {"synth.pt", "lpba40.pt", "orientation_template.nii.gz"}
    for path in bundled:
        assert f"SlicerVoxelMorphLib/bundled/{path.name}" in cmake
        assert any(fnmatch.fnmatch(f"bundled/{path.name}", pattern) for pattern in patterns["SlicerVoxelMorphLib"])


# --- scene helpers -----------------------------------------------------------------------------------------


def rotated_flipped_grid() -> sitk.Image:
    """A 14 x 12 x 10 grid, anisotropic spacing, direction = rotation times a flip (det -1)."""
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    angle = 0.7
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    direction = rotation @ np.diag([1.0, -1.0, 1.0])
    grid = sitk.Image([14, 12, 10], sitk.sitkFloat32)
    grid.SetSpacing([1.5, 0.8, 2.0])
    grid.SetOrigin([10.0, -20.0, 5.0])
    grid.SetDirection(direction.flatten().tolist())
    return grid


def smooth_displacement(grid: sitk.Image) -> sitk.Image:
    """u(x) in LPS mm, smooth in physical space, |u| up to ~3 mm, on ``grid``."""
    x = images.physical_points(grid)
    u = np.stack([2.0 * np.sin(x[..., 1] / 7.0) + 0.5,
                  1.5 * np.cos(x[..., 2] / 5.0) * np.sin(x[..., 0] / 9.0),
                  -2.5 * np.sin((x[..., 0] + x[..., 1]) / 11.0)], axis=-1)
    return images.displacement_image(u, grid)


def vtk_oriented_grid_transform(grid: scene.GridArrays, vectors_ras: np.ndarray):
    """vtkOrientedGridTransform emulated: Rot^-1 o vtkGridTransform o Rot, Rot(p) = R^T (p - o) + o.

    The displacement grid is axis-aligned in the rotated frame, so its vectors are rotated into it (R^T u).
    """
    vtk = pytest.importorskip("vtk")
    from vtkmodules.util.numpy_support import numpy_to_vtk

    r, o = grid.direction_ras, grid.origin_ras
    image = vtk.vtkImageData()
    image.SetOrigin(*o)
    image.SetSpacing(*grid.spacing)
    image.SetDimensions(*grid.dimensions)
    in_frame = np.ascontiguousarray((vectors_ras @ r).reshape(-1, 3))  # rows: (R^T u)^T = u^T R
    scalars = numpy_to_vtk(in_frame, deep=True, array_type=vtk.VTK_DOUBLE)
    scalars.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(scalars)
    displacement = vtk.vtkGridTransform()
    displacement.SetDisplacementGridData(image)
    displacement.SetInterpolationModeToLinear()

    def affine(matrix: np.ndarray):
        transform = vtk.vtkTransform()
        transform.SetMatrix(matrix.flatten().tolist())
        return transform

    to_frame, from_frame = np.eye(4), np.eye(4)
    to_frame[:3, :3], to_frame[:3, 3] = r.T, o - r.T @ o
    from_frame[:3, :3], from_frame[:3, 3] = r, o - r @ o
    general = vtk.vtkGeneralTransform()
    general.PostMultiply()
    general.Concatenate(affine(to_frame))
    general.Concatenate(displacement)
    general.Concatenate(affine(from_frame))
    return general


def test_grid_transform_arrays_match_sitk_displacement_field(tmp_path):
    pytest.importorskip("vtk")
    grid = rotated_flipped_grid()
    path = tmp_path / "displacement.nii.gz"
    sitk.WriteImage(smooth_displacement(grid), str(path))
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)

    arrays = scene.grid_transform_arrays(field)
    assert arrays.dimensions == field.GetSize()
    assert arrays.vectors_ras.shape == (*field.GetSize()[::-1], 3) and arrays.vectors_ras.dtype == np.float64
    np.testing.assert_allclose(arrays.spacing, field.GetSpacing())
    matrix = images.ijk_to_ras(field)
    np.testing.assert_allclose(arrays.direction_ras @ np.diag(arrays.spacing), matrix[:3, :3], atol=1e-9)
    np.testing.assert_allclose(arrays.origin_ras, matrix[:3, 3])
    # diag(-1, -1, 1) keeps the handedness: the flipped grid (det -1) stays flipped, also through NIfTI
    assert np.linalg.det(arrays.direction_ras) == pytest.approx(-1.0)

    rng = np.random.default_rng(3)
    size = np.array(field.GetSize())
    indices = rng.uniform(1.0, 1.0 + (size - 3), size=(200, 3))  # interior: away from the last cells
    lps_points = np.array([field.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in indices])
    itk = sitk.DisplacementFieldTransform(sitk.Image(field))
    expected_lps = np.array([itk.TransformPoint(p.tolist()) for p in lps_points])
    flip = images.LPS_TO_RAS.diagonal()[:3]
    assert np.abs(expected_lps - lps_points).max() > 1.0  # the field really moves points

    vtk_transform = vtk_oriented_grid_transform(arrays, arrays.vectors_ras)
    mapped_ras = np.array([vtk_transform.TransformPoint(*(p * flip)) for p in lps_points])
    np.testing.assert_allclose(mapped_ras * flip, expected_lps, atol=0.01)

    # the check is sensitive: LPS vectors taken as RAS vectors are far off
    wrong = vtk_oriented_grid_transform(arrays, arrays.vectors_ras * flip)
    wrong_ras = np.array([wrong.TransformPoint(*(p * flip)) for p in lps_points])
    assert np.abs(wrong_ras * flip - expected_lps).max() > 0.5


def test_grid_transform_arrays_rejects_scalar_images():
    with pytest.raises(ValueError, match="3 components"):
        scene.grid_transform_arrays(rotated_flipped_grid())


def test_dice_table_rows_follow_the_report():
    report = {"labels": [
        {"label": 3, "name": "caudate", "dice_before": 0.41, "dice_after": 0.78, "fixed_volume_mm3": 3520.5},
        {"label": 1, "name": "label 1", "dice_before": 0.6, "dice_after": 0.9, "fixed_volume_mm3": 12.0},
    ], "mean_dice_before": 0.505, "mean_dice_after": 0.84, "device": "cpu", "seconds": {"total": 2.5}}
    rows = scene.dice_table_rows(report)
    assert rows == [(e["name"], e["dice_before"], e["dice_after"], e["fixed_volume_mm3"]) for e in report["labels"]]
    assert scene.dice_table_rows({"device": "cpu"}) == []
    assert len(scene.DICE_COLUMNS) == 4
    text = scene.summary_text(report)
    assert "cpu" in text and "0.505" in text and "0.840" in text
    assert "refined" not in text
    assert "two scans of one head" in scene.summary_text({**report, "auto_refined": True,
                                                          "auto_refine_reason": "same head"})
    assert "network trained on such pairs" in scene.summary_text(
        {**report, "same_head": {"score": 0.95, "detected": True, "model": "same_head"}})
    both = scene.summary_text({**report, "same_head": {"score": 0.95, "detected": True, "model": "same_head"},
                               "auto_refined": True, "auto_refine_reason": "same head"})
    assert both.count("two scans of one head") == 1 and both.endswith("trained on such pairs, then refined")
    assert "network trained on such pairs" not in scene.summary_text(
        {**report, "same_head": {"score": 0.95, "detected": True}})
    assert "different contrasts" in scene.summary_text({**report, "auto_refined": True,
                                                        "auto_refine_reason": "two contrasts"})
    assert "less well than its training data" in scene.summary_text({
        **report, "auto_refined": True, "auto_refine_reason": "network weaker than on its training data"})
    assert "did not improve" in scene.summary_text({**report, "auto_refined": True})
    assert "moving volume's skull and scalp were masked" in scene.summary_text({**report, "head_masked": "moving"})
    assert "moving volume shows 42 % of the fixed one" in scene.summary_text({**report, "moving_view_share": 0.423})
    assert "fixed volume shows 80 % of the moving one" in scene.summary_text({**report, "fixed_view_share": 0.8})
    assert "% of the fixed one" not in text
    assert "header" not in text and "header" not in scene.summary_text(
        {**report, "orientation": {"header_matches_anatomy": True}})
    assert "header does not give its anatomy's directions right" in scene.summary_text(
        {**report, "orientation": {"header_matches_anatomy": False}})
    assert "headers disagree" not in scene.summary_text({**report, "orientation": {"moving_turn_lps": None}})
    assert "headers disagree" in scene.summary_text(
        {**report, "orientation": {"header_matches_anatomy": True, "moving_turn_lps": np.diag([-1, -1, 1]).tolist()}})


def test_labels_are_paired_by_value_or_by_name():
    fixed = {1: "Left Caudate", 2: "putamen", 5: "thalamus"}
    moving = {1: "Putamen", 2: "left  caudate", 7: "hippocampus"}
    assert scene.pair_labels(fixed, moving, by_value=False) == [(1, 2, "Left Caudate"), (2, 1, "putamen")]
    assert scene.pair_labels(fixed, moving, by_value=True) == [(1, 1, "Left Caudate"), (2, 2, "putamen")]
    assert scene.pair_labels({0: "background"}, {0: "background"}, by_value=False) == []
    array = np.array([[0, 1, 2], [5, 2, 9]])
    np.testing.assert_array_equal(scene.relabel(array, {1: 2, 2: 1}), [[0, 2, 1], [0, 1, 0]])
    masks = [np.array([[0, 1, 1], [0, 0, 0]], bool), np.array([[0, 0, 0], [1, 0, 0]], bool)]
    np.testing.assert_array_equal(scene.merge_masks(masks), [[0, 1, 1], [2, 0, 0]])


def test_labels_on_grid_resamples_only_when_needed():
    grid = rotated_flipped_grid()
    labels = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(grid)
    labels[5, 5, 5] = 3
    same = images.labels_on_grid(labels, grid)
    assert same.GetPixelID() == sitk.sitkInt32 and same[5, 5, 5] == 3
    coarse = sitk.Image([7, 6, 5], sitk.sitkFloat32)
    coarse.SetSpacing([3.0, 1.6, 4.0])
    coarse.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    coarse.SetDirection(grid.GetDirection())
    moved = images.labels_on_grid(labels, coarse)
    assert moved.GetSize() == coarse.GetSize() and moved.GetPixelID() == sitk.sitkInt32


def test_world_ijk_to_ras_applies_parent_transform():
    ijk = np.diag([2.0, 2.0, 3.0, 1.0])
    parent = np.eye(4)
    parent[:3, 3] = [1, 2, 3]
    np.testing.assert_allclose(images.world_ijk_to_ras(ijk, None), ijk)
    np.testing.assert_allclose(images.world_ijk_to_ras(ijk, parent)[:3, 3], [1, 2, 3])


def test_progress_tracker_is_monotone_and_ends_at_100():
    tracker = scene.ProgressTracker(affine=True, refine="full")
    seen = []
    for stage in scene.STAGES:
        for fraction in (0.0, 0.5, 1.0):
            seen.append(tracker.update(stage, fraction)[0])
    assert seen == sorted(seen) and seen[-1] == 100
    plain = scene.ProgressTracker(affine=False, refine="none")
    assert plain.update("refine", 1.0)[0] == 0  # a stage that is not expected does not move the bar
    percent, text = plain.update("network", 1.0)
    assert 0 < percent < 100 and text == scene.STAGES["network"][0]
    assert plain.update("unknown stage", 0.5) == (percent, "unknown stage")


def test_fast_modes_polish_moves_the_bar_by_a_small_share():
    fast, full = scene.ProgressTracker(refine="polish"), scene.ProgressTracker(refine="full")
    start, middle, end = (fast.update(stage, fraction)[0] for stage, fraction in
                          (("network", 1.0), ("refine", 0.5), ("refine", 1.0)))
    assert start < middle < end < fast.update("compose", 1.0)[0]
    full_start = full.update("network", 1.0)[0]
    full_share = full.update("refine", 1.0)[0] - full_start
    assert end - start < full_share / 4
    with pytest.raises(ValueError, match="refine"):
        scene.ProgressTracker(refine="some")


def test_structure_names_ignore_slicer_default_tables_and_show_the_value():
    assert scene.structure_name(3, "Brain", "Labels") == "label 3"  # legacy table: 1 jake, 2 Peach, 3 Brain
    assert scene.structure_name(12, "12", "GenericColors") == "label 12"
    assert scene.structure_name(17, "Left-Hippocampus", "FreeSurferColorLUT") == "17: Left-Hippocampus"
    assert scene.structure_name(5, "(none)", "Custom") == "label 5"
    assert scene.structure_name(5, "", None) == "label 5"


def test_landmarks_are_matched_by_label_or_by_row_and_converted_to_lps():
    a, b, c = np.array([1.0, 2.0, 3.0]), np.array([-4.0, 5.0, 6.0]), np.array([7.0, -8.0, 9.0])
    fixed, moving, names = scene.match_landmarks([("AC", a), ("PC", b)], [("PC", c), ("AC", b)])
    assert names == ["AC", "PC"]
    np.testing.assert_array_equal(fixed, [[-1, -2, 3], [4, -5, 6]])
    np.testing.assert_array_equal(moving, [[4, -5, 6], [-7, 8, 9]])  # AC's partner is b, PC's is c
    _, moving, names = scene.match_landmarks([("F-1", a), ("F-2", b)], [("M-1", c), ("M-2", a)])
    assert names == ["F-1 / M-1", "F-2 / M-2"]
    np.testing.assert_array_equal(moving[0], [-7, 8, 9])
    with pytest.raises(ValueError, match="2 fixed and 1 moving"):
        scene.match_landmarks([("F-1", a), ("F-2", b)], [("M-1", c)])


def test_landmark_rows_follow_the_report_with_a_mean_row():
    report = {"landmarks": {"tre_before_mm": [3.0, 5.0], "tre_after_mm": [1.0, 2.0], "mean_tre_before_mm": 4.0,
                            "mean_tre_after_mm": 1.5, "rows_outside_the_field": []}}
    assert scene.landmark_table_rows(report, ["AC", "PC"]) == [("AC", 3.0, 1.0), ("PC", 5.0, 2.0),
                                                                ("mean", 4.0, 1.5)]
    assert scene.landmark_table_rows({}, []) == []


def test_dice_of_overlapping_segments_is_computed_from_separate_masks():
    shape = (12, 14, 16)
    reference = sitk.Image(shape[::-1], sitk.sitkFloat32)
    whole = np.zeros(shape, bool)
    whole[2:10, 3:11, 4:12] = True
    core = np.zeros(shape, bool)
    core[4:8, 5:9, 6:10] = True  # inside "whole": the segments overlap
    lower = whole.copy()
    lower[6:] = False
    assert scene.masks_overlap([whole, core]) and not scene.masks_overlap([lower, whole & ~lower])
    shift = np.zeros((*shape, 3))
    shift[..., 0] = 2.0  # the fixed point x corresponds to the moving point x + 2 mm along i
    field = images.displacement_image(shift, reference)

    def moving_mask(mask):  # the same structure 2 voxels further along i in the moving image
        image = sitk.GetImageFromArray(np.roll(mask, 2, axis=2).astype(np.uint8))
        image.CopyInformation(reference)
        return image

    report = scene.mask_dice_report([whole, core], [moving_mask(whole), moving_mask(core)], field, reference,
                                    ["whole", "core"])
    # before: shifted by 2 of 8 (whole) and 2 of 4 (core) voxels along i; after: exact
    assert [r["dice_before"] for r in report["labels"]] == [0.75, 0.5]
    assert [r["dice_after"] for r in report["labels"]] == [1.0, 1.0]
    assert report["labels"][1]["fixed_volume_mm3"] == 64.0 and report["mean_dice_after"] == 1.0


def test_inverse_grid_transform_on_the_moving_grid_undoes_the_forward_one_through_vtk():
    pytest.importorskip("vtk")
    from conftest import phantom, to_image
    from SlicerVoxelMorphLib.register import register

    image, _ = phantom((40, 44, 36), seed=2)
    fixed = to_image(image, spacing=(1.0, 1.1, 0.9), origin=(10.0, -5.0, 3.0))
    shifted = to_image(np.roll(image, (2, -1, 2), axis=(0, 1, 2)), spacing=(1.0, 1.1, 0.9), origin=(8.0, -4.0, 5.0))
    result = register(fixed, shifted, model=None, refine_steps=20, inverse=True, affine=False, auto_refine=False)
    forward = scene.grid_transform_arrays(result.displacement)
    inverse = scene.grid_transform_arrays(result.inverse_displacement)
    assert inverse.dimensions == shifted.GetSize()  # Slicer's inverse transform node lives on the moving grid
    np.testing.assert_allclose(inverse.origin_ras, images.ijk_to_ras(shifted)[:3, 3])

    inside = np.argwhere(sitk.GetArrayFromImage(shifted) > 0.5 * image.max())[::37]  # moving points (k, j, i)
    ijk_to_ras = images.ijk_to_ras(shifted)
    points = inside[:, ::-1] @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    to_fixed = vtk_oriented_grid_transform(inverse, inverse.vectors_ras)
    to_moving = vtk_oriented_grid_transform(forward, forward.vectors_ras)
    on_fixed = np.array([to_fixed.TransformPoint(*p) for p in points])
    back = np.array([to_moving.TransformPoint(*p) for p in on_fixed])
    assert np.linalg.norm(on_fixed - points, axis=1).mean() > 1.0  # the inverse really moves the points
    assert np.linalg.norm(back - points, axis=1).mean() < 0.3
