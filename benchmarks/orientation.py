"""Orientation benchmark: does ``orientation.AnatomyOrientation`` find where each LPBA40 brain's anatomy lies?

The reference comes from each subject's own labels, not from the template: Left-minus-Right and
occipital-minus-frontal label centroids give the world directions of anatomical Left and Posterior,
their cross product Superior, snapped to the nearest axis-aligned rotation. Each subject is judged as
stored, with a header that tells its anatomy right (the same voxels), and with the validation variants
(``variants.py``: T2-like, inverted, synthetic head) under both headers. Reported per case: right or
wrong, the match of the orientation found against the best other one (their ratio is the margin that
``orientation.CONFIDENCE`` must stay below), and seconds. Writes orientation.md and .csv to --out.

    python benchmarks/orientation.py [--subjects S01,S11,...] [--variants t2,inverted,head] [--threads 1]
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpba40 import ATLAS, DEFAULT_DATA, find_file, find_subject

from SlicerVoxelMorphLib import metrics, orientation, variants
from SlicerVoxelMorphLib.preprocess import normalise
from SlicerVoxelMorphLib.synth import make_subject

FIELDS = ["subject", "header", "variant", "right", "found", "expected", "match", "best_other", "ratio", "seconds"]


def label_names(data: Path) -> dict[int, str]:
    with open(data / "labels.csv") as f:
        return {int(row["id"]): row["name"] for row in csv.DictReader(f)}


def anatomy_from_labels(labels: sitk.Image, names: dict[int, str]) -> np.ndarray:
    """The rotation (anatomical LPS directions -> the image's LPS world) that the labels' anatomy shows."""
    array = sitk.GetArrayViewFromImage(labels)

    def centre(word: str) -> np.ndarray:
        ids = [i for i, name in names.items() if word in name]
        k, j, i = np.nonzero(np.isin(array, ids))
        return np.array(labels.TransformContinuousIndexToPhysicalPoint([float(i.mean()), float(j.mean()),
                                                                        float(k.mean())]))

    left = centre("Left") - centre("Right")
    posterior = centre("Occipital") - centre("Frontal")
    columns = [left, posterior, np.cross(left, posterior)]
    snapped = np.zeros((3, 3))
    for column, vector in enumerate(columns):
        axis = int(np.argmax(np.abs(vector)))
        snapped[axis, column] = np.sign(vector[axis])
    return snapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--subjects", help="comma-separated (default: S01 and every training subject)")
    parser.add_argument("--variants", default="t2,inverted,head")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmark_output")
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data, out = Path(args.data), Path(args.out)
    names = label_names(data)
    subjects = args.subjects.split(",") if args.subjects else \
        [ATLAS, *sorted(p.name.split(".")[0] for p in (data / "train").iterdir() if p.name.startswith("S"))]
    finder = orientation.AnatomyOrientation()
    rows = []
    for n, subject in enumerate(subjects):
        if subject == ATLAS:
            image_path, label_path = data / "fixed.nii.gz", find_file([data / "label"], ATLAS)
        else:
            image_path, label_path = find_subject(data, subject)
        image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        stored = anatomy_from_labels(labels, names)
        cases = {"plain": image}
        for kind in args.variants.split(",") if args.variants else []:
            distance = None
            if kind == "head":
                ids = metrics.label_ids(sitk.GetArrayViewFromImage(labels))
                distance = make_subject("v", image, labels, ids).distance[0, 0].numpy()
            variant = sitk.GetImageFromArray(variants.variant(normalise(sitk.GetArrayFromImage(image)), kind,
                                                              distance, n, image.GetSpacing()[0]))
            variant.CopyInformation(image)
            cases[kind] = variant
        for kind, case in cases.items():
            for header, shown, expected in (("stored", case, stored),
                                            ("right", orientation.turned_header(case, stored.T), np.eye(3))):
                start = time.perf_counter()
                found = finder.execute(shown)
                seconds = time.perf_counter() - start
                right = bool(np.allclose(found.rotation, expected))
                rows.append({"subject": subject, "header": header, "variant": kind, "right": right,
                             "found": found.rotation.astype(int).tolist(), "expected": expected.astype(int).tolist(),
                             "match": round(found.match, 4), "best_other": round(found.runner_up, 4),
                             "ratio": round(found.match / found.runner_up, 3),
                             "seconds": round(seconds, 2)})
                print(f"{subject} {header:6s} {kind:8s} {'right' if right else 'WRONG'} match {found.match:.3f} "
                      f"next {found.runner_up:.3f} {seconds:.2f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "orientation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    wrong = [r for r in rows if not r["right"]]

    def ratios(cases: list[dict]) -> str:
        return f"{min(r['ratio'] for r in cases):.3f}-{max(r['ratio'] for r in cases):.3f}" if cases else "none"

    seconds = [r["seconds"] for r in rows]
    lines = [f"# Orientation: {len(rows)} cases of {len(subjects)} LPBA40 subjects", "",
             f"right: {len(rows) - len(wrong)} of {len(rows)}; wrong: "
             + (", ".join(f"{r['subject']} {r['header']} {r['variant']}" for r in wrong) or "none"), "",
             "match of the orientation found over the best other one: right cases "
             f"{ratios([r for r in rows if r['right']])}, wrong cases {ratios(wrong)}", "",
             f"seconds per image: mean {statistics.mean(seconds):.2f}, max {max(seconds):.2f}"]
    (out / "orientation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
