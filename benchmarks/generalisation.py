"""Generalisation benchmark: LPBA40 validation subjects to the atlas, as they are and with other contrasts
or a synthetic head, through the whole ``register`` pipeline (network only by default; default settings with
--auto-refine --polish), per model.
With --scan-to-scan each subject goes to the next one of the list instead (the last to the first).

Variants (SlicerVoxelMorphLib.variants): plain; the moving image remapped to inverted, T2-like, FLAIR-like,
random monotone and random non-monotone contrasts (the fixed image stays T1); both images with synthetic CSF
rim, skull and scalp around the brain; both with their blanked-out cerebellum drawn in (``cerebellum``:
``variants.fill_blanked``, as other datasets' brains have one); and, not in the default list, one image with
head layers, the other skull-stripped (``moving_head``, ``fixed_head``), the moving subject made to look older
(``aged``: image and labels pushed away from its CSF, ``variants.aged``: wider ventricles and sulci), or both
images under headers that tell their anatomy right (``right_header``: as other datasets store brains; LPBA40's
own headers have them turned by 180 degrees about the inferior-superior axis), or only the fixed one
(``mixed_headers``: an LPBA40 subject as provided to an atlas of another dataset).
With --score tissue the Dice is over the tissue labels of each subject (``synth.tissue_map`` of its T1 image
and structure labels: CSF inside the labelled structures, CSF outside them (the ventricles), grey and white
matter), like the whole-brain aseg labels of other datasets, instead of LPBA40's 56 structures.
Writes generalisation.md and .csv to --out.

    python benchmarks/generalisation.py --models lpba40=PATH,synth=PATH [--subjects S35,S36] [--refine 0] [--accurate]
        [--auto-refine] [--polish] [--scan-to-scan] [--score tissue]

A model PATH of ``ants`` runs ANTs SyN instead (antspyx defaults, mutual information; antspyx installed).
"""

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpba40 import ATLAS, DEFAULT_DATA, ants_syn, default_subjects, find_file, find_subject

from SlicerVoxelMorphLib import metrics, variants
from SlicerVoxelMorphLib.orientation import turned_header
from SlicerVoxelMorphLib.preprocess import normalise
from SlicerVoxelMorphLib.register import register
from SlicerVoxelMorphLib.synth import TISSUE_LABELS, blanked_region, csf_of, make_subject, tissue_map

TISSUE_NAMES = {1: "sulcal CSF", 2: "ventricular CSF", 3: "grey matter", 4: "white matter"}
assert len(TISSUE_NAMES) == TISSUE_LABELS
FIELDS = ["model", "variant", "subject", "mean_dice", *[f"dice_{n}" for n in TISSUE_NAMES],
          "folding_percent", "seconds", "refined", "same_head_score",
          "alignment_ratio", "intensity_correlation", "head_masked"]
ANTS = "ants"  # a model PATH that means ANTs SyN


MOVING_HEAD = "moving_head"  # a head registered to a skull-stripped brain
FIXED_HEAD = "fixed_head"  # a skull-stripped brain registered to a head
AGED = "aged"  # the moving subject with wider ventricles and sulci
RIGHT_HEADER = "right_header"  # both images and labels under headers that tell their anatomy right
MIXED_HEADERS = "mixed_headers"  # the fixed image and labels under such headers, the moving ones as stored
# LPBA40 as provided stores its voxels R, A, S under an L, P, S header (Testing/test_orientation.py): other
# datasets' files put the same brains at directions turned by this rotation (LPS columns)
LPBA40_ANATOMY = np.diag([-1.0, -1.0, 1.0])


def right_header(image: sitk.Image) -> sitk.Image:
    """An LPBA40 image (or label map) under a header that tells its anatomy right: the same voxels, the
    directions (and origin) turned by LPBA40_ANATOMY^T, as a file of another dataset would store the brain."""
    return turned_header(image, LPBA40_ANATOMY.T)


def aged_subject(image: sitk.Image, labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The image and its labels made to look older (``variants.aged`` of its CSF class), same grid."""
    ids = metrics.label_ids(sitk.GetArrayViewFromImage(labels))
    csf = csf_of(make_subject("v", image, labels, ids).generation)[0, 0].numpy()
    arrays = variants.aged(sitk.GetArrayFromImage(image).astype(np.float32), sitk.GetArrayFromImage(labels), csf,
                           image.GetSpacing()[0])
    out = [sitk.GetImageFromArray(a) for a in arrays]
    for new, old in zip(out, (image, labels), strict=True):
        new.CopyInformation(old)
    return out[0], sitk.Cast(out[1], labels.GetPixelID())


def tissue_labels(image: sitk.Image, labels: sitk.Image) -> sitk.Image:
    """``synth.tissue_map`` of a T1 image and its structure labels, as a label image on their grid."""
    ids = metrics.label_ids(sitk.GetArrayViewFromImage(labels))
    generation = make_subject("v", image, labels, ids).generation.long()
    out = sitk.GetImageFromArray(tissue_map(generation)[0, 0].numpy().astype(np.uint8))
    out.CopyInformation(labels)
    return out


def variant_image(image: sitk.Image, labels: sitk.Image, kind: str, seed: int) -> sitk.Image:
    """The image with one validation variant applied (same grid)."""
    if kind == "plain":
        return image
    array = normalise(sitk.GetArrayFromImage(image))
    distance = None
    if kind == "head":
        ids = metrics.label_ids(sitk.GetArrayViewFromImage(labels))
        distance = make_subject("v", image, labels, ids).distance[0, 0].numpy()
    blanked = blanked_region(array, sitk.GetArrayFromImage(labels)) if kind == "cerebellum" else None
    out = sitk.GetImageFromArray(variants.variant(array, kind, distance, seed, image.GetSpacing()[0], blanked))
    out.CopyInformation(image)
    return out


def syn(fixed: sitk.Image, moving: sitk.Image, moving_labels: sitk.Image,
        fixed_labels: sitk.Image) -> tuple[np.ndarray, float]:
    """ANTs SyN of a variant pair (through files): warped labels (K, J, I) and % det J <= 0 in the fixed labels."""
    with tempfile.TemporaryDirectory() as work:
        paths = [str(Path(work) / f"{name}.nii.gz") for name in ("fixed", "moving", "labels")]
        for image, path in zip((fixed, moving, moving_labels), paths, strict=True):
            sitk.WriteImage(image, path)
        warped, det = ants_syn(*paths)
    return warped, metrics.folding_percent(det, sitk.GetArrayViewFromImage(fixed_labels) > 0)


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """The rows as a CSV file (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options these benchmarks share: data, models, subjects, presets, threads, output."""
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--models", required=True, help="comma-separated NAME=PATH (PATH may be 'bundled')")
    parser.add_argument("--subjects", help="comma-separated moving subjects (default: S35..S40 present)")
    parser.add_argument("--accurate", action="store_true", help="the accurate preset (network + refinement)")
    parser.add_argument("--auto-refine", action="store_true", help="keep the safety net on (default: network only)")
    parser.add_argument("--polish", action="store_true",
                        help="Fast mode's few refinement steps after the network (default: network only); with "
                             "--auto-refine: default settings")
    parser.add_argument("--precision", choices=["auto", "float32"], default="auto",
                        help="the network's convolutions (register's precision; auto: bfloat16 where native)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmark_output")


def common_settings(args: argparse.Namespace) -> tuple[Path, Path, dict[str, str], list[str]]:
    """Threads set; (data folder, output folder, models by name, subjects)."""
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # ANTs, read when it is imported
    data = Path(args.data)
    models = dict(item.split("=", 1) for item in args.models.split(","))
    return data, Path(args.out), models, args.subjects.split(",") if args.subjects else default_subjects(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--variants", default=",".join(variants.VARIANTS))
    parser.add_argument("--refine", type=int, default=0)
    parser.add_argument("--scan-to-scan", action="store_true",
                        help="register each subject to the next one of the list instead of the atlas")
    parser.add_argument("--score", choices=["structures", "tissue"], default="structures",
                        help="Dice over LPBA40's structures (default) or each subject's tissue labels")
    args = parser.parse_args(argv)
    data, out, models, subjects = common_settings(args)
    kinds = args.variants.split(",")
    atlas = None if args.scan_to_scan else (sitk.ReadImage(str(data / "fixed.nii.gz")),
                                            sitk.ReadImage(str(find_file([data / "label"], ATLAS))))
    rows = []
    for n, subject in enumerate(subjects):
        moving, moving_labels = (sitk.ReadImage(str(path)) for path in find_subject(data, subject))
        fixed, fixed_labels = atlas or tuple(sitk.ReadImage(str(path))
                                             for path in find_subject(data, subjects[(n + 1) % len(subjects)]))
        tissue = args.score == "tissue"
        f_scored = tissue_labels(fixed, fixed_labels) if tissue else fixed_labels
        moving_scored = tissue_labels(moving, moving_labels) if tissue else moving_labels  # every variant but aged
        ids = metrics.label_ids(sitk.GetArrayViewFromImage(f_scored))
        for kind in kinds:
            m_labels, m_scored = moving_labels, moving_scored
            if kind == AGED:
                m, m_labels = aged_subject(moving, moving_labels)
                m_scored = tissue_labels(m, m_labels) if tissue else m_labels
            else:
                m = variant_image(moving, moving_labels, "head" if kind == MOVING_HEAD else kind, n) \
                    if kind not in (FIXED_HEAD, RIGHT_HEADER, MIXED_HEADERS) else moving
            f = variant_image(fixed, fixed_labels, "head" if kind == FIXED_HEAD else kind, 1000 + n) \
                if kind in (*variants.BOTH_IMAGES, FIXED_HEAD) else fixed
            f_labels = f_scored
            if kind == RIGHT_HEADER:
                f, m, f_labels, m_scored = (right_header(image) for image in (fixed, moving, f_scored, m_scored))
            elif kind == MIXED_HEADERS:
                f, f_labels = right_header(fixed), right_header(f_scored)
            for name, model in models.items():
                start = time.perf_counter()
                refined, score, report = False, None, {}
                if model == ANTS:
                    warped, folding = syn(f, m, m_scored, f_labels)
                else:
                    result = register(f, m, fixed_labels=f_labels, moving_labels=m_scored, model=model,
                                      device="cpu", refine_steps=args.refine, auto_refine=args.auto_refine,
                                      accurate=args.accurate, polish=args.polish, precision=args.precision)
                    warped, folding = sitk.GetArrayFromImage(result.warped_labels), result.report["folding_percent"]
                    report = result.report
                    refined = bool(report.get("auto_refined"))
                    score = report.get("same_head", {}).get("score")
                seconds = time.perf_counter() - start
                per_label = metrics.dice(sitk.GetArrayViewFromImage(f_scored), warped, ids)
                dice = float(np.nanmean(list(per_label.values())))  # lpba40.mean_dice, from the per-label values
                tissues = {f"dice_{n}": round(per_label[n], 4) for n in TISSUE_NAMES if tissue}
                rows.append({"model": name, "variant": kind, "subject": subject, "mean_dice": round(dice, 4), **tissues,
                             "folding_percent": round(folding, 4), "seconds": round(seconds, 2), "refined": refined,
                             "same_head_score": score, "alignment_ratio": report.get("alignment", {}).get("ratio"),
                             "intensity_correlation": report.get("intensity_correlation"),
                             "head_masked": report.get("head_masked")})
                print(f"{subject} {kind:12s} {name}: Dice {dice:.3f}, {seconds:.1f} s", flush=True)
    write_csv(out / "generalisation.csv", FIELDS, rows)
    header = "| variant | " + " | ".join(models) + " |"
    target = "the next subject" if args.scan_to_scan else ATLAS
    lines = [f"# Generalisation: LPBA40 {', '.join(subjects)} -> {target}, refine {args.refine}, "
             f"{'accurate preset, ' if args.accurate else ''}"
             f"safety net {'on' if args.auto_refine else 'off'}, polish {'on' if args.polish else 'off'}", "",
             f"Mean Dice over the fixed image's {'tissue labels' if args.score == 'tissue' else 'labels'} (mean over "
             "subjects); max % det J <= 0 below.", "",
             header, "|---" * (len(models) + 1) + "|"]
    worst = {name: 1.0 for name in models}
    for kind in kinds:
        cells = []
        for name in models:
            value = statistics.mean(r["mean_dice"] for r in rows if r["model"] == name and r["variant"] == kind)
            worst[name] = min(worst[name], value)
            cells.append(f"{value:.3f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        for n, tissue_name in TISSUE_NAMES.items() if args.score == "tissue" else ():
            scored = [r for r in rows if r["variant"] == kind]
            cells = [f"{statistics.mean(r[f'dice_{n}'] for r in scored if r['model'] == name):.3f}"
                     for name in models]
            lines.append(f"| {kind}: {tissue_name} | " + " | ".join(cells) + " |")
    lines.append("| **worst** | " + " | ".join(f"**{worst[name]:.3f}**" for name in models) + " |")
    lines.append("| max folding % | " + " | ".join(
        f"{max(r['folding_percent'] for r in rows if r['model'] == name):.4f}" for name in models) + " |")
    lines.append("| mean seconds | " + " | ".join(
        f"{np.mean([r['seconds'] for r in rows if r['model'] == name]):.1f}" for name in models) + " |")
    if args.auto_refine:
        lines.append("| refined by the safety net | " + " | ".join(
            f"{sum(r['refined'] for r in rows if r['model'] == name)} of "
            f"{sum(r['model'] == name for r in rows)}" for name in models) + " |")
    (out / "generalisation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
