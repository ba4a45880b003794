"""LPBA40 benchmark: this tool (network only, and with refinement) against ANTs SyN, same pairs, same machine.

Each moving subject is registered to the atlas fixed.nii.gz (S01). Per subject and method: mean Dice
over the atlas's labels (56), % of voxels in the atlas's labelled brain with det J <= 0, seconds, and
the time ratio ANTs / method. Writes results.md, results.csv and boxplot.png to --out.

    python benchmarks/lpba40.py [--data DIR] [--subjects S02,S03] [--refine 50] [--skip-ants] [--out DIR]

Subjects' images are ``<S>.delineation.skullstripped.nii.gz`` (or any name starting ``<S>.``) in the
data folder or its train/ or test/ subfolder; their label maps are in label/.
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib import metrics
from SlicerVoxelMorphLib.cli import image_files, subject_name
from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.models import BUNDLED
from SlicerVoxelMorphLib.register import register

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "LPBA40"
VALIDATION_SUBJECTS = [f"S{n}" for n in range(35, 41)]
ATLAS = "S01"
ANTS = "ANTs SyN"
BEFORE = "before (identity)"
FIELDS = ["subject", "method", "mean_dice", "folding_percent", "seconds", "ants_time_ratio"]


def find_file(folders: list[Path], subject: str) -> Path | None:
    """The first image file of ``subject`` (name up to the first dot) in ``folders``, or None."""
    hits = [p for folder in folders if folder.is_dir() for p in image_files(folder) if subject_name(p) == subject]
    return hits[0] if hits else None


def find_subject(data: Path, subject: str) -> tuple[Path, Path]:
    """(image, label map) of a subject: the image in data/, data/train/ or data/test/, labels in data/label/."""
    image = find_file([data, data / "train", data / "test"], subject)
    labels = find_file([data / "label"], subject)
    if image is None or labels is None:
        raise InputError(f"subject {subject}: no image in {data}[/train|/test] or no label map in {data / 'label'}")
    return image, labels


def default_subjects(data: Path) -> list[str]:
    """The held-out validation subjects S35..S40 present in ``data``."""
    present = []
    for subject in VALIDATION_SUBJECTS:
        try:
            find_subject(data, subject)
        except InputError:
            continue
        present.append(subject)
    return present


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray, ids: list[int]) -> float:
    """Mean Dice over ``ids`` (labels missing from both maps are left out)."""
    return float(np.nanmean(list(metrics.dice(fixed_labels, warped_labels, ids).values())))


def run_tool(fixed: sitk.Image, fixed_labels: sitk.Image, image: Path, labels: Path, model: str,
             refine: int, ids: list[int]) -> dict:
    """Register one subject with this tool; Dice, folding % and seconds of the whole ``register`` call."""
    moving, moving_labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(labels))
    start = time.perf_counter()
    result = register(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, model=model,
                      device="cpu", refine_steps=refine)
    seconds = time.perf_counter() - start
    dice = mean_dice(sitk.GetArrayViewFromImage(fixed_labels), sitk.GetArrayViewFromImage(result.warped_labels), ids)
    return {"mean_dice": dice, "folding_percent": result.report["folding_percent"], "seconds": seconds,
            "before": result.report["mean_dice_before"]}


def run_ants(fixed_path: Path, fixed_labels: sitk.Image, image: Path, labels: Path, ids: list[int]) -> dict:
    """Register one subject with ANTs SyN (antspyx defaults); labels warped with 'genericLabel'."""
    import ants

    fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(image))
    moving_labels = ants.image_read(str(labels))
    start = time.perf_counter()
    out = ants.registration(fixed, moving, type_of_transform="SyN")
    warped_labels = ants.apply_transforms(fixed, moving_labels, transformlist=out["fwdtransforms"],
                                          interpolator="genericLabel")
    seconds = time.perf_counter() - start
    # ants arrays are indexed (i, j, k); SimpleITK's (k, j, i)
    warped = warped_labels.numpy().transpose(2, 1, 0).round().astype(np.int32)
    det = ants.create_jacobian_determinant_image(fixed, out["fwdtransforms"][0]).numpy().transpose(2, 1, 0)
    fixed_array = sitk.GetArrayViewFromImage(fixed_labels)
    for path in {*out["fwdtransforms"], *out["invtransforms"]}:
        Path(path).unlink(missing_ok=True)
    return {"mean_dice": mean_dice(fixed_array, warped, ids),
            "folding_percent": metrics.folding_percent(det, fixed_array > 0), "seconds": seconds}


def plural(n: int, word: str) -> str:
    """'1 subject', '6 subjects'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_table(rows: list[dict], methods: list[str]) -> list[str]:
    """Markdown lines: per method, mean +- sd Dice, mean folding, mean seconds, median ANTs time ratio."""
    lines = ["| method | subjects | mean Dice (mean +- sd) | % det J <= 0 (mean) | seconds (mean) | "
             "ANTs time / method time (median) |", "|---|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice = [r["mean_dice"] for r in mine]
        sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
        folding = [r["folding_percent"] for r in mine if r["folding_percent"] != ""]
        seconds = [r["seconds"] for r in mine if r["seconds"] != ""]
        ratios = [r["ants_time_ratio"] for r in mine if r["ants_time_ratio"] != ""]
        lines.append(f"| {method} | {len(mine)} | {statistics.mean(dice):.3f} +- {sd:.3f} | "
                     f"{f'{statistics.mean(folding):.4f}' if folding else '-'} | "
                     f"{f'{statistics.mean(seconds):.1f}' if seconds else '-'} | "
                     f"{f'{statistics.median(ratios):.1f}' if ratios else '-'} |")
    return lines


def subject_table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per subject and method."""
    lines = ["| subject | method | mean Dice | % det J <= 0 | seconds | ANTs time / method time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["subject"], r["method"], f"{r['mean_dice']:.3f}"]
        cells += [f"{r['folding_percent']:.4f}" if r["folding_percent"] != "" else "-",
                  f"{r['seconds']:.1f}" if r["seconds"] != "" else "-",
                  f"{r['ants_time_ratio']:.1f}" if r["ants_time_ratio"] != "" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def boxplot(rows: list[dict], methods: list[str], path: Path) -> None:
    """Box plots of per-subject mean Dice and of seconds, one box per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    timed = [m for m in methods if any(r["seconds"] != "" for r in rows if r["method"] == m)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(methods), 4.5),
                                      gridspec_kw={"width_ratios": [len(methods), max(1, len(timed))]})
    left.boxplot([[r["mean_dice"] for r in rows if r["method"] == m] for m in methods])
    left.set_xticks(range(1, len(methods) + 1), methods, rotation=20, ha="right")
    left.set_ylabel("mean Dice over the labels, per subject")
    right.boxplot([[r["seconds"] for r in rows if r["method"] == m] for m in timed])
    right.set_xticks(range(1, len(timed) + 1), timed, rotation=20, ha="right")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(ScalarFormatter())
    right.set_ylabel("seconds per pair")
    fig.suptitle(f"LPBA40, {plural(len({r['subject'] for r in rows}), 'subject')} -> {ATLAS}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="LPBA40 folder (fixed.nii.gz, label/, ...)")
    parser.add_argument("--subjects", help="comma-separated moving subjects (default: S35..S40 present)")
    parser.add_argument("--model", default="bundled" if BUNDLED.is_file() else "none",
                        help="bundled (default when installed), none (no network) or a model file")
    parser.add_argument("--refine", type=int, default=50, help="refinement steps of the second run (default 50)")
    parser.add_argument("--skip-ants", action="store_true", help="run this tool only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, ITK and ANTs (default 2)")
    parser.add_argument("--out", default="benchmark_output", help="output folder (default benchmark_output)")
    args = parser.parse_args(argv)

    # the same number of threads for every method; ANTs' ITK reads the variable when it first starts threads
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data, out = Path(args.data), Path(args.out)
    try:
        subjects = args.subjects.split(",") if args.subjects else default_subjects(data)
        if not subjects:
            raise InputError(f"no subjects S35..S40 in {data}; name them with --subjects")
        pairs = {s: find_subject(data, s) for s in subjects}
        fixed_path, fixed_labels_path = data / "fixed.nii.gz", find_file([data / "label"], ATLAS)
        if not fixed_path.is_file() or fixed_labels_path is None:
            raise InputError(f"{data} needs fixed.nii.gz (the atlas, {ATLAS}) and its label map in label/")
    except InputError as exc:
        print(f"lpba40: error: {exc}", file=sys.stderr)
        return 2
    ants_version = None
    if not args.skip_ants:
        try:
            import ants
        except ImportError:
            print("lpba40: antspyx is not installed (pip install antspyx); running without ANTs", file=sys.stderr)
        else:
            ants_version = ants.__version__

    fixed, fixed_labels = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(fixed_labels_path))
    ids = metrics.label_ids(sitk.GetArrayViewFromImage(fixed_labels))
    network = "network only" if args.model != "none" else "affine only (no model)"
    refined = f"network + refine {args.refine}" if args.model != "none" else f"refine {args.refine} (no model)"
    methods = [BEFORE, network, refined] + ([ANTS] if ants_version else [])
    rows: list[dict] = []
    for subject, (image, labels) in pairs.items():
        found = {network: run_tool(fixed, fixed_labels, image, labels, args.model, 0, ids),
                 refined: run_tool(fixed, fixed_labels, image, labels, args.model, args.refine, ids)}
        if ants_version:
            found[ANTS] = run_ants(fixed_path, fixed_labels, image, labels, ids)
        rows.append({"subject": subject, "method": BEFORE, "mean_dice": found[network]["before"],
                     "folding_percent": "", "seconds": "", "ants_time_ratio": ""})
        for method, r in found.items():
            ratio = found[ANTS]["seconds"] / r["seconds"] if ants_version else ""
            rows.append({"subject": subject, "method": method, "mean_dice": r["mean_dice"],
                         "folding_percent": r["folding_percent"], "seconds": r["seconds"], "ants_time_ratio": ratio})
        print(f"{subject}: " + ", ".join(f"{m} Dice {r['mean_dice']:.3f} in {r['seconds']:.1f} s"
                                         for m, r in found.items()), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    boxplot(rows, methods, out / "boxplot.png")
    text = [
        f"# LPBA40: {plural(len(subjects), 'subject')} -> {ATLAS}",
        "",
        f"Subjects {', '.join(subjects)}; mean Dice over the {len(ids)} labels of the atlas; "
        "% det J <= 0 inside the atlas's labelled brain; "
        "seconds of the whole registration including the label warp, this tool's affine step and model loading.",
        f"Model `{args.model}`; {args.threads} threads for torch, ITK and ANTs; CPU; "
        f"ANTs: {f'antspyx {ants_version}, SyN defaults' if ants_version else 'not run'}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        *summary_table(rows, methods),
        "",
        "## Per subject",
        "",
        *subject_table(rows),
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
