"""Pure logic between engine results and a Slicer scene: arrays and tables the Slicer module writes into nodes.

No slicer, qt, ctk or vtk here (the module does the node work); geometry goes through ``images``.
"""

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import images, metrics


@dataclass
class GridArrays:
    """What a Slicer FromParent grid transform (vtkOrientedGridTransform) needs, all in RAS.

    ``origin_ras``, ``spacing`` and ``dimensions`` (i, j, k) describe the displacement grid image,
    ``direction_ras`` is the 3x3 IJK-to-RAS direction for ``SetGridDirectionMatrix`` and
    ``vectors_ras`` (K, J, I, 3) float64 is what goes into ``slicer.util.arrayFromGridTransform``.
    A world point x maps to x + u(x) (resampling convention).
    """

    origin_ras: np.ndarray
    spacing: np.ndarray
    direction_ras: np.ndarray
    vectors_ras: np.ndarray

    @property
    def dimensions(self) -> tuple[int, int, int]:
        """Grid size in (i, j, k) order, as vtkImageData.SetDimensions takes it."""
        k, j, i = self.vectors_ras.shape[:3]
        return (i, j, k)


def grid_transform_arrays(displacement: sitk.Image) -> GridArrays:
    """Split an engine displacement field (vector image, LPS mm, fixed-to-moving) into RAS grid parts."""
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("a 3D displacement field with 3 components per voxel is required")
    matrix = images.ijk_to_ras(displacement)
    spacing = np.array(displacement.GetSpacing(), dtype=float)
    direction = matrix[:3, :3] / spacing
    vectors = images.vectors_to_ras(sitk.GetArrayFromImage(displacement).astype(np.float64))
    return GridArrays(matrix[:3, 3].copy(), spacing, direction, np.ascontiguousarray(vectors))


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def pair_labels(fixed: dict[int, str], moving: dict[int, str], by_value: bool) -> list[tuple[int, int, str]]:
    """Pairs (fixed value, moving value, name) of labels both maps have, by value or by name, sorted by
    fixed value. Label 0 (background) is never paired."""
    pairs = []
    if by_value:
        for value in sorted(set(fixed) & set(moving) - {0}):
            pairs.append((value, value, fixed[value]))
        return pairs
    moving_by_key: dict[str, int] = {}
    for value in sorted(moving):
        if value != 0:
            moving_by_key.setdefault(_key(moving[value]), value)
    used: set[int] = set()
    for value in sorted(fixed):
        other = moving_by_key.get(_key(fixed[value]))
        if value != 0 and other is not None and other not in used:
            used.add(other)
            pairs.append((value, other, fixed[value]))
    return pairs


def relabel(array: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """int32 copy of a label array with each value v replaced by mapping[v]; values not in mapping become 0
    (one table lookup: no mask per label)."""
    ids = sorted(mapping)
    table = np.array([0, *(mapping[i] for i in ids)], np.int32)
    return table[metrics.compact_labels(array, ids)].reshape(np.shape(array))


def merge_masks(masks: list[np.ndarray]) -> np.ndarray:
    """int32 label array with value k + 1 where masks[k] is set (masks that do not overlap)."""
    out = np.zeros(np.shape(masks[0]), np.int32)
    for value, mask in enumerate(masks, start=1):
        out[np.asarray(mask, bool)] = value
    return out


# Slicer's default colour tables whose entry names are not structures ("jake", "Peach"; numbers)
UNNAMED_COLOR_TABLES = frozenset({"Labels", "GenericColors"})


def structure_name(value: int, color_name: str | None, table_name: str | None) -> str:
    """Name of a label map value for tables: "17: hippocampus" from a colour table that names structures,
    "label 17" when the table is one of Slicer's unnamed defaults or has no name for the value."""
    if not color_name or color_name == "(none)" or table_name in UNNAMED_COLOR_TABLES:
        return f"label {value}"
    return f"{value}: {color_name}"


def match_landmarks(fixed: list[tuple[str, np.ndarray]], moving: list[tuple[str, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair (label, RAS point) lists: by label when each side's labels are unique and the same set,
    else by row when the counts match. Returns fixed and moving points (N, 3) in LPS and the names."""
    fixed_labels, moving_labels = [name for name, _ in fixed], [name for name, _ in moving]
    if not fixed or not moving:
        raise ValueError("landmarks: both point lists need at least one point")
    unique = len(set(fixed_labels)) == len(fixed) and len(set(moving_labels)) == len(moving)
    if unique and set(fixed_labels) == set(moving_labels):
        by_label = dict(moving)
        pairs = [(name, point, by_label[name]) for name, point in fixed]
    elif len(fixed) == len(moving):
        pairs = [(f"{a} / {b}" if a != b else a, p, q) for (a, p), (b, q) in zip(fixed, moving, strict=True)]
    else:
        raise ValueError(f"landmarks: {len(fixed)} fixed and {len(moving)} moving points, and their labels do "
                         "not match one to one: give the same labels, or the same number of points in order")
    to_lps = np.array([-1.0, -1.0, 1.0])
    return (np.array([p for _, p, _ in pairs], float).reshape(-1, 3) * to_lps,
            np.array([q for _, _, q in pairs], float).reshape(-1, 3) * to_lps, [n for n, _, _ in pairs])


def landmark_table_rows(report: dict, names: list[str]) -> list[tuple[str, float, float]]:
    """(landmark, TRE before mm, TRE after mm) per pair and a final mean row; [] without landmarks."""
    errors = report.get("landmarks")
    if not errors:
        return []
    rows = [(name, float(before), float(after)) for name, before, after
            in zip(names, errors["tre_before_mm"], errors["tre_after_mm"], strict=True)]
    return [*rows, ("mean", float(errors["mean_tre_before_mm"]), float(errors["mean_tre_after_mm"]))]


LANDMARK_COLUMNS = ("Landmark", "TRE before (mm)", "TRE after (mm)")


def masks_overlap(masks: list[np.ndarray]) -> bool:
    """True when any voxel is inside two or more of the boolean arrays."""
    if len(masks) < 2:
        return False
    return bool((np.sum([np.asarray(m, bool) for m in masks], axis=0, dtype=np.int32) > 1).any())


def warp_mask(mask: sitk.Image, transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """A binary mask (K, J, I) on ``reference``'s grid through ``transform`` (``images.field_transform`` of a
    result, or the identity): linear interpolation of the 0/1 mask, inside where >= 0.5 (smooth
    boundaries, no nearest-neighbour staircase)."""
    moved = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(moved) >= 0.5


def mask_dice_report(fixed_masks: list[np.ndarray], moving_masks: list[sitk.Image], displacement: sitk.Image,
                     fixed: sitk.Image, names: list[str]) -> dict:
    """Dice rows as ``register`` reports them, one per structure from separate masks (segments may
    overlap): fixed masks (K, J, I) on the fixed grid, moving masks as images on the moving grid."""
    voxel_mm3 = float(np.prod(fixed.GetSpacing()))
    transforms = (sitk.Transform(), images.field_transform(displacement))  # before (identity) and after
    rows = []
    for name, target, source in zip(names, fixed_masks, moving_masks, strict=True):
        target = np.asarray(target, np.uint8)
        dice = [round(metrics.dice(target, warp_mask(source, t, fixed).astype(np.uint8), [1])[1], 4)
                for t in transforms]
        rows.append({"label": len(rows) + 1, "name": name, "dice_before": dice[0], "dice_after": dice[1],
                     "fixed_volume_mm3": round(float(target.sum()) * voxel_mm3, 1)})
    return {"labels": rows,
            "mean_dice_before": round(float(np.nanmean([r["dice_before"] for r in rows])), 4),
            "mean_dice_after": round(float(np.nanmean([r["dice_after"] for r in rows])), 4)}


def dice_table_rows(report: dict) -> list[tuple[str, float, float, float]]:
    """(name, Dice before, Dice after, fixed volume mm3) per label, in report order; [] without labels."""
    return [(str(row["name"]), float(row["dice_before"]), float(row["dice_after"]), float(row["fixed_volume_mm3"]))
            for row in report.get("labels", [])]


DICE_COLUMNS = ("Structure", "Dice before", "Dice after", "Volume (mm3)")


def summary_text(report: dict) -> str:
    """One-line status text for the module panel from a registration report."""
    parts = [f"Done on {report.get('device', '?')}"]
    seconds = report.get("seconds", {})
    if "total" in seconds:
        parts[0] += f" in {seconds['total']:.1f} s"
    if "mean_dice_after" in report:
        parts.append(f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}")
    if "folding_percent" in report:
        parts.append(f"folding {report['folding_percent']:.3f} %")
    if report.get("head_masked"):
        parts.append(f"the {report['head_masked']} volume's skull and scalp were masked by the other's brain outline")
    for side, other in (("moving", "fixed"), ("fixed", "moving")):
        if report.get(f"{side}_view_share") is not None:
            parts.append(f"the {side} volume shows {100 * report[f'{side}_view_share']:.0f} % of the {other} one "
                         "(registered on the part both show)")
    orientation = report.get("orientation", {})
    if orientation.get("header_matches_anatomy") is False:
        parts.append("the fixed volume's header does not give its anatomy's directions right (the network saw the "
                     "brain the right way round)")
    if orientation.get("moving_turn_lps") is not None:
        parts.append("the two volumes' headers disagree about the anatomy's directions (aligned from the turn the "
                     "brains show)")
    reason = report.get("auto_refine_reason", NO_BETTER) if report.get("auto_refined") else None
    if report.get("same_head", {}).get("model"):
        parts.append("the volumes look like two scans of one head: registered by the network trained on such pairs"
                     + (", then refined" if reason == "same head" else ""))
        reason = None if reason == "same head" else reason
    if reason is not None:
        parts.append(REFINE_REASONS.get(reason, REFINE_REASONS[NO_BETTER]))
    return "; ".join(parts)


# the status line's words for each ``auto_refine_reason`` of a report (reports without one: NO_BETTER)
NO_BETTER = "network no better than the affine"
REFINE_REASONS = {
    "same head": "the images look like two scans of one head, whose fine deformation the refinement recovers, so the "
                 "result was refined",
    "two contrasts": "the images have different contrasts, where the network alone is less accurate, so the result "
                     "was refined",
    "network weaker than on its training data": "the network aligned these images less well than its training "
                                                "data, so the result was refined",
    NO_BETTER: "the network did not improve on the affine alignment, so the result was refined (use Accurate mode for "
          "inputs unlike the model's training data)",
}


# Stages the engine reports through ``progress(stage, fraction)``, with a rough share of the run time.
STAGES = {
    "check": ("Checking inputs", 1),
    "orientation": ("Finding the brains' orientation", 4),
    "affine": ("Affine pre-alignment", 12),
    "resample": ("Resampling to the working grid", 3),
    "network": ("Running the network", 6),
    "refine": ("Refining (instance optimisation)", 60),
    "compose": ("Composing the displacement field", 5),
    "warp": ("Warping the moving image", 5),
    "metrics": ("Computing Jacobian and Dice", 4),
}


# the refinement's share of the bar: "full" (Accurate mode, optimisation only), "polish" (Fast mode: a few steps,
# or the safety net's preset now and then), "none"
REFINE_WEIGHTS = {"full": STAGES["refine"][1], "polish": 6, "none": 0}


class ProgressTracker:
    """Turns engine ``(stage, fraction)`` reports into an overall percentage and a label text.

    Stages that will not run (affine off, no refinement) are left out of the total; ``refine`` is a key of
    REFINE_WEIGHTS.
    """

    def __init__(self, affine: bool = True, refine: str = "none") -> None:
        if refine not in REFINE_WEIGHTS:
            raise ValueError(f"refine must be one of {', '.join(REFINE_WEIGHTS)}, not {refine!r}")
        weights = {stage: weight for stage, (_, weight) in STAGES.items() if affine or stage != "affine"}
        weights["refine"] = REFINE_WEIGHTS[refine]
        self._start: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        total = sum(weights.values())
        done = 0.0
        for stage, weight in weights.items():
            if weight == 0:
                continue
            self._start[stage] = done / total
            self._weight[stage] = weight / total
            done += weight
        self.percent = 0

    def update(self, stage: str, fraction: float) -> tuple[int, str]:
        """Overall percentage (never going back) and a text for ``stage`` at ``fraction`` (0 to 1)."""
        text = STAGES.get(stage, (stage, 0))[0]
        if stage in self._start:
            fraction = min(max(float(fraction), 0.0), 1.0)
            percent = int(100 * (self._start[stage] + self._weight[stage] * fraction))
            self.percent = max(self.percent, min(percent, 100))
        return self.percent, text
