"""report.png: orthogonal slices of the inputs and results, the deformation grid, Jacobian and Dice."""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import images
from .files import atomic_path
from .preprocess import intensity_window, scale_to_window

GRID_EVERY = 6  # voxels between drawn grid lines


def _slices(array: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a (K, J, I[, C]) array through ``centre`` (k, j, i)."""
    k, j, i = centre
    return [array[k], array[:, j], array[:, :, i]]


def _grid_lines(ax, u_index: np.ndarray, axes: tuple[int, int]) -> None:
    """Draw the deformed grid: in-plane index positions plus displacement, (rows, cols, 3) in (i, j, k)."""
    rows, cols = u_index.shape[:2]
    r, c = np.mgrid[0:rows, 0:cols].astype(float)
    y = r + u_index[..., axes[0]]
    x = c + u_index[..., axes[1]]
    for n in range(0, rows, GRID_EVERY):
        ax.plot(x[n], y[n], color="yellow", lw=0.5)
    for n in range(0, cols, GRID_EVERY):
        ax.plot(x[:, n], y[:, n], color="yellow", lw=0.5)


def write_report_png(path: str | Path, fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                     displacement: sitk.Image, jacobian: sitk.Image, report: dict) -> None:
    """Write the visual report (atomically); ``moving`` is shown resampled onto the fixed grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_array = sitk.GetArrayViewFromImage(fixed)
    window = intensity_window(fixed_array[::2, ::2, ::2])  # display only: every 8th voxel is enough
    mask = scale_to_window(fixed_array, *window) > 0.05
    centre = tuple(int(np.mean(a)) for a in np.nonzero(mask)) if mask.any() else tuple(n // 2 for n in mask.shape)

    def slices(image: sitk.Image, scaled: bool = False) -> list[np.ndarray]:
        array = sitk.GetArrayViewFromImage(image)
        cut = [np.array(s) for s in _slices(array, centre)]
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
    has_dice = "labels" in report
    fig = plt.figure(figsize=(16, 9.5 if has_dice else 8))
    rows = 4 if has_dice else 3
    grid_axes = {0: (1, 0), 1: (2, 0), 2: (2, 1)}  # in-plane (row, col) axes as (i, j, k) components
    for row in range(3):
        for col, (title, array, cmap, (lo, hi)) in enumerate(columns):
            ax = fig.add_subplot(rows, len(columns), row * len(columns) + col + 1)
            # for an LPS-aligned fixed image: anterior up in the axial row, superior up in the others
            ax.imshow(array[row], cmap=cmap, vmin=lo, vmax=hi,
                      origin="upper" if row == 0 else "lower", interpolation="nearest")
            if title == "grid on warped":
                _grid_lines(ax, u[row], grid_axes[row])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    if has_dice:
        ax = fig.add_subplot(rows, 1, rows)
        names = [r["name"] for r in report["labels"]]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r["dice_before"] for r in report["labels"]], 0.4, label="before", color="0.6")
        ax.bar(x + 0.2, [r["dice_after"] for r in report["labels"]], 0.4, label="after", color="tab:blue")
        ax.set_xticks(x, names, rotation=90, fontsize=5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.legend(loc="lower right")
        ax.set_title(f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}")
    fig.suptitle(f"model {report.get('model')}, refine {report.get('refine_steps')}, "
                 f"folding {report.get('folding_percent', float('nan')):.3f} %")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
