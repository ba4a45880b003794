"""Cross-dataset benchmark: LPBA40 subjects registered to the MNI152 template (another dataset: an average of
152 adults, scanner, preprocessing, cerebellum kept), scored on tissue labels.

The template's labels come from nilearn's own grey and white matter maps (the most probable of CSF, grey,
white matter inside the brain, as in ``make demo``); each subject's from ``synth.tissue_map`` of its T1 image
and structures (its two CSF classes merged). LPBA40's images have the cerebellum blanked out, so the
template's cerebellum lowers every method's grey and white matter Dice alike. Subjects are shown under
headers that tell their anatomy right (as the template's does), or as stored with ``--headers stored``.
Writes mni_tissue.md and .csv to --out.

    python benchmarks/mni_tissue.py --models bundled=bundled,syn=ants [--accurate] [--subjects S35,S36]
        [--headers right|stored] [--auto-refine] [--polish] [--threads 1]
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalisation import ANTS, add_common_arguments, common_settings, right_header, syn, tissue_labels, write_csv
from lpba40 import find_subject

from SlicerVoxelMorphLib import metrics
from SlicerVoxelMorphLib.register import register

TISSUES = {1: "CSF", 2: "grey matter", 3: "white matter"}
BRAIN_LEVEL = 0.05  # template intensity (scaled to [0, 1]) above which a voxel is brain, as in make demo
FIELDS = ["model", "subject", *[f"dice_{name}" for name in TISSUES.values()], "mean_grey_white", "folding_percent",
          "seconds", "refined"]


def template(folder: Path) -> tuple[sitk.Image, sitk.Image]:
    """The MNI152 template (1 mm) and its tissue labels, written as NIfTI and read back with SimpleITK."""
    import nibabel as nib
    from nilearn import datasets

    with warnings.catch_warnings():  # nilearn's resampling announces future changes of its defaults
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=1)
        grey = datasets.load_mni152_gm_template(resolution=1).get_fdata()
        white = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    array = t1.get_fdata(dtype=np.float32)
    array = array / np.percentile(array, 99.5)
    other = np.clip(1.0 - grey - white, 0.0, None)
    labels = np.where(array > BRAIN_LEVEL, np.argmax(np.stack([other, grey, white]), axis=0) + 1, 0)
    nib.save(nib.Nifti1Image(array, t1.affine), folder / "mni.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), t1.affine), folder / "mni_labels.nii.gz")
    return sitk.ReadImage(str(folder / "mni.nii.gz")), sitk.ReadImage(str(folder / "mni_labels.nii.gz"))


def subject_tissues(image: sitk.Image, labels: sitk.Image) -> sitk.Image:
    """The subject's tissue labels as the template's: CSF (both of its classes), grey, white matter."""
    four = sitk.GetArrayFromImage(tissue_labels(image, labels))
    out = sitk.GetImageFromArray(np.choose(four, [0, 1, 1, 2, 3]).astype(np.uint8))
    out.CopyInformation(labels)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--headers", choices=["right", "stored"], default="right",
                        help="the subjects under headers that tell their anatomy right (default) or as stored")
    args = parser.parse_args(argv)
    data, out, models, subjects = common_settings(args)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        fixed, fixed_labels = template(Path(work))
    ids = list(TISSUES)
    for subject in subjects:
        moving, labels = (sitk.ReadImage(str(path)) for path in find_subject(data, subject))
        moving_labels = subject_tissues(moving, labels)
        if args.headers == "right":
            moving, moving_labels = right_header(moving), right_header(moving_labels)
        for name, model in models.items():
            start, refined = time.perf_counter(), False
            if model == ANTS:
                warped, folding = syn(fixed, moving, moving_labels, fixed_labels)
            else:
                result = register(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, model=model,
                                  device="cpu", auto_refine=args.auto_refine, accurate=args.accurate,
                                  polish=args.polish, precision=args.precision)
                warped, folding = sitk.GetArrayFromImage(result.warped_labels), result.report["folding_percent"]
                refined = bool(result.report.get("auto_refined"))
            seconds = time.perf_counter() - start
            dice = metrics.dice(sitk.GetArrayViewFromImage(fixed_labels), warped, ids)
            rows.append({"model": name, "subject": subject,
                         **{f"dice_{TISSUES[n]}": round(dice[n], 4) for n in ids},
                         "mean_grey_white": round((dice[2] + dice[3]) / 2, 4),
                         "folding_percent": round(folding, 4), "seconds": round(seconds, 1), "refined": refined})
            print(f"{subject} {name}: grey {dice[2]:.3f}, white {dice[3]:.3f}, {seconds:.1f} s", flush=True)
    write_csv(out / "mni_tissue.csv", FIELDS, rows)
    columns = [f"dice_{name}" for name in TISSUES.values()] + ["mean_grey_white", "folding_percent", "seconds",
                                                               "refined"]
    preset = "accurate preset" if args.accurate else "network, polished" if args.polish else "network only"
    lines = [f"# LPBA40 {', '.join(subjects)} -> MNI152 template, subjects' headers {args.headers}, {preset}, "
             f"safety net {'on' if args.auto_refine else 'off'}, polish {'on' if args.polish else 'off'}",
             "", "| model | " + " | ".join(c.replace("dice_", "Dice ") for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(r[c] for r in mine):.3f}" for c in columns) + " |")
    (out / "mni_tissue.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
