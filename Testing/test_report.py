"""report.png, drawn with Pillow: colours against matplotlib's colour maps, cells against the input slices."""

import numpy as np
import SimpleITK as sitk
from PIL import Image

from conftest import phantom, to_image
from SlicerVoxelMorphLib import images, report
from SlicerVoxelMorphLib.preprocess import intensity_window, scale_to_window


def test_colours_match_matplotlib_maps():
    from matplotlib import colormaps

    values = np.linspace(0, 1, 101)
    expected = (colormaps["RdBu_r"](values)[:, :3] * 255).round()
    np.testing.assert_allclose(report.colour(values, diverging=True), expected, atol=3)  # 256-entry table
    grey = (colormaps["gray"](values)[:, :3] * 255).round()
    np.testing.assert_allclose(report.colour(values, diverging=False), grey, atol=1)
    assert report.colour(np.array([-3.0, 7.0]), diverging=False).tolist() == [[0, 0, 0], [255, 255, 255]]


def test_report_png_shows_the_fixed_axial_slice_pixel_for_pixel(tmp_path):
    array, _ = phantom((20, 24, 28))
    fixed = to_image(array, spacing=(1.0, 1.0, 1.0))
    field = images.displacement_image(np.zeros((*array.shape, 3)), fixed)
    jacobian = to_image(np.ones(array.shape, np.float32))
    rows = [{"name": "a", "dice_before": 0.5, "dice_after": 0.8}, {"name": "b", "dice_before": float("nan"),
                                                                    "dice_after": 0.4}]
    summary = {"model": "none", "refine_steps": 0, "folding_percent": 0.0, "labels": rows,
               "mean_dice_before": 0.5, "mean_dice_after": 0.6}
    report.write_report_png(tmp_path / "report.png", fixed, fixed, fixed, field, jacobian, summary)
    picture = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
    assert picture.shape[1] == 6 * (28 + report.GAP) - report.GAP
    mask = scale_to_window(array, *intensity_window(array)) > 0.05
    k = int(np.mean(np.nonzero(mask)[0]))
    window = intensity_window(sitk.GetArrayViewFromImage(fixed)[::2, ::2, ::2])
    expected = (scale_to_window(array[k], *window) * 255 + 0.5).astype(np.uint8)
    cell = picture[report.TITLE_PX:report.TITLE_PX + 24, :28]
    np.testing.assert_array_equal(cell[..., 0], expected)  # axial row: not flipped
    assert (cell[..., 0] == cell[..., 2]).all()  # grey
