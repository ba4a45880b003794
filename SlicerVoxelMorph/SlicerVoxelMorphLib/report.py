"""report.png: orthogonal slices of the inputs and results, the deformation grid, Jacobian and Dice.

Drawn with numpy and Pillow at the fixed image's voxel size (one pixel a voxel): no plotting library
to import, so the picture costs a fraction of a second next to the registration.
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import images
from .files import atomic_path
from .preprocess import intensity_window, scale_to_window

GRID_EVERY = 6  # voxels between drawn grid lines
GAP = 4  # pixels between mosaic cells
TITLE_PX, FONT_PX, SMALL_PX = 42, 14, 10
CHART_PX = 260  # height of the Dice chart (bars and names)
NAME_PX = 140  # length of a structure's name under its bars
BEFORE, AFTER, GRID = (150, 150, 150), (31, 119, 180), (255, 255, 0)
# the 11 colours of ColorBrewer's RdBu, reversed (blue for negative, red for positive): matplotlib's "RdBu_r"
DIVERGING = np.array([[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240],
                      [247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43],
                      [103, 0, 31]], np.float32)


def _slices(array: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a (K, J, I[, C]) array through ``centre`` (k, j, i)."""
    k, j, i = centre
    return [array[k], array[:, j], array[:, :, i]]


def _grid_segments(u_index: np.ndarray, axes: tuple[int, int], flip: bool) -> list[np.ndarray]:
    """Polylines (n, 2) of the deformed grid in cell pixels (x, y): in-plane positions plus displacement,
    ``u_index`` (rows, cols, 3) in (i, j, k); ``flip`` for a cell drawn upside down."""
    rows, cols = u_index.shape[:2]
    r, c = np.mgrid[0:rows, 0:cols].astype(float)
    y = r + u_index[..., axes[0]]
    x = c + u_index[..., axes[1]]
    if flip:
        y = rows - 1 - y
    return [np.stack([x[n], y[n]], -1) for n in range(0, rows, GRID_EVERY)] + \
        [np.stack([x[:, n], y[:, n]], -1) for n in range(0, cols, GRID_EVERY)]


def colour(values: np.ndarray, diverging: bool) -> np.ndarray:
    """RGB uint8 (..., 3) of values in [0, 1]: grey levels, or blue-white-red for ``diverging``."""
    values = np.clip(values, 0, 1)
    if not diverging:
        return np.repeat((values * 255 + 0.5).astype(np.uint8)[..., None], 3, -1)
    position = values * (len(DIVERGING) - 1)
    low = np.minimum(position.astype(int), len(DIVERGING) - 2)
    weight = (position - low)[..., None]
    return (DIVERGING[low] * (1 - weight) + DIVERGING[low + 1] * weight + 0.5).astype(np.uint8)


def write_report_png(path: str | Path, fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                     displacement: sitk.Image, jacobian: sitk.Image, report: dict) -> None:
    """Write the visual report (atomically); ``moving`` is shown resampled onto the fixed grid."""
    from PIL import Image, ImageDraw, ImageFont

    moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_array = sitk.GetArrayViewFromImage(fixed)
    window = intensity_window(fixed_array[::2, ::2, ::2])  # display only: every 8th voxel is enough
    mask = scale_to_window(fixed_array, *window) > 0.05
    centre = tuple(int(np.mean(a)) for a in np.nonzero(mask)) if mask.any() else tuple(n // 2 for n in mask.shape)

    def slices(image: sitk.Image, scaled: bool = False) -> list[np.ndarray]:
        array = sitk.GetArrayViewFromImage(image)
        cut = [np.array(s, dtype=np.float32) for s in _slices(array, centre)]
        if scaled:
            limits = intensity_window(array[::2, ::2, ::2])
            cut = [scale_to_window(s, *limits) for s in cut]
        return cut

    f, m, w = slices(fixed, True), slices(moving_on_fixed, True), slices(warped, True)
    to_index = np.linalg.inv(images.index_to_physical(fixed)[:3, :3]).T
    u = [s @ to_index for s in slices(displacement)]
    columns = [("fixed", f, False, (0, 1)), ("moving", m, False, (0, 1)), ("warped", w, False, (0, 1)),
               ("fixed - warped", [a - b for a, b in zip(f, w, strict=True)], True, (-0.5, 0.5)),
               ("grid on warped", w, False, (0, 1)), ("det J", slices(jacobian), True, (0, 2))]
    heights = [s.shape[0] for s in f]
    width = max(s.shape[1] for s in f)
    has_dice = "labels" in report
    size = (len(columns) * (width + GAP) - GAP, TITLE_PX + sum(heights) + GAP * 3 + (CHART_PX if has_dice else 0))
    mosaic = np.full((size[1], size[0], 3), 255, np.uint8)
    grid_axes = {0: (1, 0), 1: (2, 0), 2: (2, 1)}  # in-plane (row, col) axes as (i, j, k) components
    segments = []
    top = TITLE_PX
    for row in range(3):
        flip = row > 0  # for an LPS-aligned fixed image: anterior up in the axial row, superior up in the others
        for col, (title, arrays, diverging, (lo, hi)) in enumerate(columns):
            cell = (arrays[row] - lo) / (hi - lo)
            left = col * (width + GAP)
            rgb = colour(cell[::-1] if flip else cell, diverging)
            mosaic[top:top + heights[row], left:left + rgb.shape[1]] = rgb
            if title == "grid on warped":
                segments += [s + np.array([left, top]) for s in _grid_segments(u[row], grid_axes[row], flip)]
        top += heights[row] + GAP

    picture = Image.fromarray(mosaic)
    draw = ImageDraw.Draw(picture)
    font, small = ImageFont.load_default(FONT_PX), ImageFont.load_default(SMALL_PX)
    for line in segments:
        draw.line([tuple(p) for p in line.round(1).tolist()], fill=GRID, width=1)
    draw.text((4, 2), f"model {report.get('model')}, refine {report.get('refine_steps')}, "
                      f"folding {report.get('folding_percent', float('nan')):.3f} %", fill=0, font=font)
    for col, (title, *_) in enumerate(columns):
        draw.text((col * (width + GAP) + width / 2, TITLE_PX - 3), title, fill=0, font=font, anchor="md")
    if has_dice:
        _dice_chart(picture, draw, report, top, font, small)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", compress_level=1)


def _dice_chart(picture, draw, report: dict, top: int, font, small) -> None:
    """Bars of Dice before (grey) and after (blue) per structure, names written upwards below them."""
    from PIL import Image, ImageDraw

    rows = report["labels"]
    left, right = 40, picture.width - 10
    bottom = top + CHART_PX - NAME_PX - 6  # 0 on the Dice axis; the names hang below it
    height = bottom - (top + 24)
    draw.text((left, top), f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}   "
                           "(grey: before, blue: after)", fill=0, font=font)
    for value in (0.0, 0.5, 1.0):
        y = bottom - value * height
        draw.line([(left - 4, y), (right, y)], fill=(210, 210, 210))
        draw.text((left - 6, y), f"{value:.1f}", fill=0, font=small, anchor="rm")
    step = (right - left) / max(len(rows), 1)
    for n, row in enumerate(rows):
        x = left + n * step
        for offset, key, fill in ((0.1, "dice_before", BEFORE), (0.5, "dice_after", AFTER)):
            value = row[key]
            if value == value:  # NaN: no bar
                draw.rectangle([x + offset * step, bottom - value * height, x + (offset + 0.4) * step, bottom],
                               fill=fill)
        name = Image.new("L", (NAME_PX, SMALL_PX + 4), 255)
        ImageDraw.Draw(name).text((NAME_PX - 2, 1), str(row["name"])[:26], fill=0, font=small, anchor="ra")
        upright = name.rotate(90, expand=True)
        picture.paste((0, 0, 0), (round(x + step / 2 - upright.width / 2), bottom + 4),
                      Image.eval(upright, lambda v: 255 - v))
