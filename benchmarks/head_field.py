"""Whole-head proxy: an LPBA40 validation subject with a synthetic head (CSF rim, skull, scalp) registered to
a copy of itself deformed by a known smooth field (largest displacement 6 mm inside the head); mean
end-point error (mm) of the recovered field inside the head, before (identity) and after, per model.

    python benchmarks/head_field.py --models it3500=PATH,it5000=PATH [--subjects S35,S36] [--accurate]
        [--auto-refine] [--polish] [--cerebellum] [--threads 2] [--out DIR]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalisation import add_common_arguments, common_settings, variant_image
from lpba40 import find_subject

from SlicerVoxelMorphLib import images
from SlicerVoxelMorphLib.preprocess import foreground_mask
from SlicerVoxelMorphLib.register import register

LARGEST_MM = 6.0  # the known field's largest displacement inside the head
CONTROL_MM = 24.0  # spacing of the field's random control values


def known_field(image: sitk.Image, head: np.ndarray, seed: int) -> sitk.Image:
    """A smooth random displacement field on ``image``'s grid (LPS mm): Gaussian noise on a grid of
    CONTROL_MM, B-spline interpolated; scaled so that its largest norm in ``head`` is LARGEST_MM."""
    rng = np.random.default_rng(seed)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    coarse = sitk.Image([int(np.ceil(e / CONTROL_MM)) + 3 for e in extent], sitk.sitkFloat32)
    coarse.SetSpacing([CONTROL_MM] * 3)
    coarse.SetDirection(image.GetDirection())
    coarse.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([-0.5 - CONTROL_MM / s for s in image.GetSpacing()]))
    components = []
    for _ in range(3):
        noise = sitk.GetImageFromArray(rng.normal(size=coarse.GetSize()[::-1]).astype(np.float32))
        noise.CopyInformation(coarse)
        components.append(sitk.GetArrayFromImage(sitk.Resample(noise, image, sitk.Transform(), sitk.sitkBSpline)))
    u = np.stack(components, -1)
    u *= LARGEST_MM / np.linalg.norm(u[head], axis=1).max()
    return images.displacement_image(u, image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--cerebellum", action="store_true",
                        help="draw the cerebellum LPBA40 blanked out into the head first (variants.fill_blanked)")
    args = parser.parse_args(argv)
    data, out, models, subjects = common_settings(args)
    rows = []
    for n, subject in enumerate(subjects):
        image_path, labels_path = find_subject(data, subject)
        image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(labels_path))
        if args.cerebellum:
            image = variant_image(image, labels, "cerebellum", 500 + n)
        head = variant_image(image, labels, "head", n)
        truth = known_field(head, foreground_mask(head), seed=100 + n)
        # the deformed copy is the fixed image: its point x shows the head at x + u(x), so the registration
        # (fixed: deformed, moving: head) should find u itself
        deformed = sitk.Resample(head, head, images.field_transform(truth), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        inside = foreground_mask(deformed)
        u_true = sitk.GetArrayViewFromImage(truth)[inside]
        before = float(np.linalg.norm(u_true, axis=1).mean())
        for name, model in models.items():
            start = time.perf_counter()
            result = register(deformed, head, model=model, device="cpu", accurate=args.accurate,
                              auto_refine=args.auto_refine, polish=args.polish, precision=args.precision)
            u = sitk.GetArrayViewFromImage(result.displacement)[inside]
            after = float(np.linalg.norm(u - u_true, axis=1).mean())
            rows.append({"model": name, "subject": subject, "before": before, "after": after,
                         "refined": bool(result.report.get("auto_refined")),
                         "same_head": result.report.get("same_head", {}).get("score"),
                         "ratio": result.report.get("alignment", {}).get("ratio"),
                         "folding": result.report["folding_percent"], "seconds": time.perf_counter() - start})
            print(f"{subject} {name}: end-point error {before:.2f} -> {after:.2f} mm, same-head score "
                  f"{rows[-1]['same_head']}, alignment ratio {rows[-1]['ratio']}"
                  f"{' (safety net refined)' if rows[-1]['refined'] else ''}", flush=True)
    lines = [f"# Whole-head proxy: LPBA40 {', '.join(subjects)} with a synthetic head"
             f"{' and a drawn-in cerebellum' if args.cerebellum else ''}, registered to a copy "
             f"deformed by a known smooth field (largest {LARGEST_MM:g} mm), "
             f"{'accurate preset' if args.accurate else 'network, polished' if args.polish else 'network only'}, "
             f"safety net {'on' if args.auto_refine else 'off'}, polish {'on' if args.polish else 'off'}", "",
             "Mean end-point error (mm) inside the head, mean over subjects.", "",
             "| model | before (identity) | after | max % det J <= 0 | mean seconds | refined by the safety net "
             "| same-head scores |", "|---|---|---|---|---|---|---|"]
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        scores = [r["same_head"] for r in mine if r["same_head"] is not None]  # none without a network
        lines.append(f"| {name} | {statistics.mean(r['before'] for r in mine):.2f} | "
                     f"{statistics.mean(r['after'] for r in mine):.2f} | {max(r['folding'] for r in mine):.4f} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.1f} | "
                     f"{sum(r['refined'] for r in mine)} of {len(mine)} | "
                     f"{f'{min(scores):.3f}-{max(scores):.3f}' if scores else '-'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_field.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
