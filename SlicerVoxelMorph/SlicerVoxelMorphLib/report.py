"""report.png: orthogonal slices of the inputs and results, the deformation grid, Jacobian and Dice.

The slices are coloured in numpy and drawn as one mosaic image, the grid as one line collection and
the Dice values as one bar chart: a handful of artists, so the figure renders in a fraction of a second.
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import images
from .files import atomic_path
from .preprocess import intensity_window, scale_to_window

GRID_EVERY = 6  # voxels between drawn grid lines
GAP = 4  # pixels between mosaic cells


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


def write_report_png(path: str | Path, fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                     displacement: sitk.Image, jacobian: sitk.Image, report: dict) -> None:
    """Write the visual report (atomically); ``moving`` is shown resampled onto the fixed grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

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
    columns = [("fixed", f, "gray", (0, 1)), ("moving", m, "gray", (0, 1)), ("warped", w, "gray", (0, 1)),
               ("fixed - warped", [a - b for a, b in zip(f, w, strict=True)], "RdBu_r", (-0.5, 0.5)),
               ("grid on warped", w, "gray", (0, 1)), ("det J", slices(jacobian), "RdBu_r", (0, 2))]
    heights = [s.shape[0] for s in f]
    width = max(s.shape[1] for s in f)
    mosaic = np.ones((sum(heights) + GAP * 2, len(columns) * (width + GAP) - GAP, 3), np.float32)
    grid_axes = {0: (1, 0), 1: (2, 0), 2: (2, 1)}  # in-plane (row, col) axes as (i, j, k) components
    segments = []
    top = 0
    for row in range(3):
        flip = row > 0  # for an LPS-aligned fixed image: anterior up in the axial row, superior up in the others
        for col, (title, arrays, cmap, (lo, hi)) in enumerate(columns):
            cell = np.clip((arrays[row] - lo) / (hi - lo), 0, 1)
            left = col * (width + GAP)
            rgb = plt.get_cmap(cmap)(cell[::-1] if flip else cell)[..., :3]
            mosaic[top:top + heights[row], left:left + rgb.shape[1]] = rgb
            if title == "grid on warped":
                segments += [s + np.array([left, top]) for s in _grid_segments(u[row], grid_axes[row], flip)]
        top += heights[row] + GAP

    has_dice = "labels" in report
    fig = plt.figure(figsize=(16, 9.5 if has_dice else 8))
    ax = fig.add_axes((0.005, 0.3, 0.99, 0.62) if has_dice else (0.005, 0.01, 0.99, 0.9))
    ax.imshow(mosaic, interpolation="nearest")
    ax.add_collection(LineCollection(segments, colors="yellow", linewidths=0.5))
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    for col, (title, *_) in enumerate(columns):
        ax.text(col * (width + GAP) + width / 2, -2, title, ha="center", va="bottom", fontsize=12)
    ax.set_axis_off()
    if has_dice:
        bars = fig.add_axes((0.04, 0.07, 0.95, 0.18))
        names = [r["name"] for r in report["labels"]]
        x = np.arange(len(names))
        bars.bar(x - 0.2, [r["dice_before"] for r in report["labels"]], 0.4, label="before", color="0.6")
        bars.bar(x + 0.2, [r["dice_after"] for r in report["labels"]], 0.4, label="after", color="tab:blue")
        bars.set_xticks(x, names, rotation=90, fontsize=5)
        bars.set_xlim(-0.6, len(names) - 0.4)
        bars.set_ylim(0, 1)
        bars.set_ylabel("Dice")
        bars.legend(loc="lower right")
        bars.set_title(f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}")
    fig.suptitle(f"model {report.get('model')}, refine {report.get('refine_steps')}, "
                 f"folding {report.get('folding_percent', float('nan')):.3f} %")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
