"""LPBA40 benchmark: this tool (network only, fast, accurate) against ANTs SyN, same pairs, same machine, as processes.

Each moving subject is registered to the atlas fixed.nii.gz (S01), or with --scan-to-scan to the next
subject of the list (the last to the first: pairs without the atlas, which training saw as a fixed image),
every method as its own process
(``slicer-voxelmorph register`` with all its outputs written; ANTs SyN through antspyx with the labels
warped), so the seconds include start-up, imports and writing, as a user waits for them. Per subject and
method: mean Dice over the fixed image's labels (56), % of voxels in its labelled brain with
det J <= 0, seconds, peak resident memory, and the time ratio ANTs / method; per-stage seconds of this
tool from its report.json. Writes results.md, results.csv and boxplot.png to --out.

    python benchmarks/lpba40.py [--data DIR] [--subjects S02,S03] [--refine 50] [--skip-ants] [--repeats 3]
        [--scan-to-scan] [--out DIR]

Subjects' images are ``<S>.delineation.skullstripped.nii.gz`` (or any name starting ``<S>.``) in the
data folder or its train/ or test/ subfolder; their label maps are in label/.
"""

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib import metrics
from SlicerVoxelMorphLib.cli import image_files, subject_name
from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.models import BUNDLED

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "LPBA40"
VALIDATION_SUBJECTS = [f"S{n}" for n in range(35, 41)]
ATLAS = "S01"
ANTS = "ANTs SyN"
BEFORE = "before (identity)"
FIELDS = ["subject", "method", "mean_dice", "folding_percent", "seconds", "peak_mb", "ants_time_ratio"]


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


def timed_process(command: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``command``; (wall seconds, its peak resident MB, stdout). RuntimeError when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "SlicerVoxelMorph"), "OMP_NUM_THREADS": str(threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource use
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])}... failed: {errors.read().strip().splitlines()[-1:]}")
    return seconds, usage.ru_maxrss / 1024, stdout


def run_tool(fixed: Path, fixed_labels: Path, image: Path, labels: Path, model: str, options: list[str],
             threads: int, work: Path, precision: str = "auto") -> dict:
    """One ``slicer-voxelmorph register`` process: Dice, folding and stages from its report.json."""
    out = work / "tool"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "SlicerVoxelMorphLib.cli", "register", "--fixed", str(fixed), "--moving",
               str(image), "--fixed-labels", str(fixed_labels), "--moving-labels", str(labels), "--model", model,
               "--threads", str(threads), "--precision", precision, "--quiet", "--out", str(out), *options]
    seconds, peak_mb, _ = timed_process(command, threads)
    report = json.loads((out / "report.json").read_text())
    return {"mean_dice": report["mean_dice_after"], "folding_percent": report["folding_percent"],
            "seconds": seconds, "peak_mb": peak_mb, "before": report["mean_dice_before"], "stages": report["seconds"],
            "device": report["device"] + (f" ({report['precision']} network)" if "precision" in report else "")}


def median_run(runs: list[dict]) -> dict:
    """The run of median time (the upper one of an even number): machine noise, not the method, varies."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def run_ants(fixed: Path, fixed_labels: Path, image: Path, labels: Path, threads: int) -> dict:
    """One process registering with ANTs SyN (antspyx defaults), labels warped with 'genericLabel'."""
    command = [sys.executable, str(Path(__file__).resolve()), "--ants-worker", str(fixed), str(fixed_labels),
               str(image), str(labels)]
    seconds, peak_mb, stdout = timed_process(command, threads)
    return {**json.loads(stdout.strip().splitlines()[-1]), "seconds": seconds, "peak_mb": peak_mb}


def ants_syn(fixed_path: str, image: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """ANTs SyN (antspyx defaults) of ``image`` to ``fixed_path``, labels warped with 'genericLabel':
    the warped labels and det J of the forward warp, both (K, J, I) on the fixed grid."""
    import ants

    fixed, moving = ants.image_read(fixed_path), ants.image_read(image)
    out = ants.registration(fixed, moving, type_of_transform="SyN")
    warped_labels = ants.apply_transforms(fixed, ants.image_read(labels), transformlist=out["fwdtransforms"],
                                          interpolator="genericLabel")
    # ants arrays are indexed (i, j, k); SimpleITK's (k, j, i)
    warped = warped_labels.numpy().transpose(2, 1, 0).round().astype(np.int32)
    det = ants.create_jacobian_determinant_image(fixed, out["fwdtransforms"][0]).numpy().transpose(2, 1, 0)
    for path in {*out["fwdtransforms"], *out["invtransforms"]}:
        Path(path).unlink(missing_ok=True)
    return warped, det


def ants_worker(fixed_path: str, fixed_labels_path: str, image: str, labels: str) -> None:
    """The ANTs process: register, warp the labels, print Dice and folding as JSON."""
    warped, det = ants_syn(fixed_path, image, labels)
    fixed_array = sitk.GetArrayFromImage(sitk.ReadImage(fixed_labels_path))
    ids = metrics.label_ids(fixed_array)
    print(json.dumps({"mean_dice": mean_dice(fixed_array, warped, ids),
                      "folding_percent": metrics.folding_percent(det, fixed_array > 0)}))


def plural(n: int, word: str) -> str:
    """'1 subject', '6 subjects'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_table(rows: list[dict], methods: list[str]) -> list[str]:
    """Markdown lines: per method, mean +- sd Dice, folding, seconds, peak memory, median ANTs time ratio."""
    lines = ["| method | subjects | mean Dice (mean +- sd) | % det J <= 0 (mean) | seconds (mean) | peak MB (max) | "
             "ANTs time / method time (median) |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice = [r["mean_dice"] for r in mine]
        sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
        folding = [r["folding_percent"] for r in mine if r["folding_percent"] != ""]
        seconds = [r["seconds"] for r in mine if r["seconds"] != ""]
        peaks = [r["peak_mb"] for r in mine if r["peak_mb"] != ""]
        ratios = [r["ants_time_ratio"] for r in mine if r["ants_time_ratio"] != ""]
        lines.append(f"| {method} | {len(mine)} | {statistics.mean(dice):.3f} +- {sd:.3f} | "
                     f"{f'{statistics.mean(folding):.4f}' if folding else '-'} | "
                     f"{f'{statistics.mean(seconds):.1f}' if seconds else '-'} | "
                     f"{f'{max(peaks):.0f}' if peaks else '-'} | "
                     f"{f'{statistics.median(ratios):.1f}' if ratios else '-'} |")
    return lines


def stage_table(stages: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: mean seconds of each stage of register() (from report.json), per method."""
    names = list(dict.fromkeys(name for runs in stages.values() for run in runs for name in run))
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, runs in stages.items():
        cells = [f"{statistics.mean(run.get(name, 0.0) for run in runs):.2f}" for name in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def subject_table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per subject and method."""
    lines = ["| subject | method | mean Dice | % det J <= 0 | seconds | peak MB | ANTs time / method time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["subject"], r["method"], f"{r['mean_dice']:.3f}"]
        cells += [f"{r['folding_percent']:.4f}" if r["folding_percent"] != "" else "-",
                  f"{r['seconds']:.1f}" if r["seconds"] != "" else "-",
                  f"{r['peak_mb']:.0f}" if r["peak_mb"] != "" else "-",
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
    if argv is None and sys.argv[1:2] == ["--ants-worker"]:
        ants_worker(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="LPBA40 folder (fixed.nii.gz, label/, ...)")
    parser.add_argument("--subjects", help="comma-separated moving subjects (default: S35..S40 present)")
    parser.add_argument("--model", default="bundled" if BUNDLED.is_file() else "none",
                        help="bundled (default when installed), none (no network) or a model file")
    parser.add_argument("--refine", type=int, help="also run --refine N (experts' fixed number of steps)")
    parser.add_argument("--skip-ants", action="store_true", help="run this tool only")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of this tool per subject and preset; the run of median time is kept (default 1)")
    parser.add_argument("--scan-to-scan", action="store_true",
                        help="register each subject to the next one of the list instead of the atlas")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, ITK and ANTs (default 2)")
    parser.add_argument("--precision", choices=["auto", "float32"], default="auto",
                        help="this tool's --precision (auto: bfloat16 convolutions where the hardware has them)")
    parser.add_argument("--out", default="benchmark_output", help="output folder (default benchmark_output)")
    args = parser.parse_args(argv)

    data, out = Path(args.data), Path(args.out)
    try:
        subjects = args.subjects.split(",") if args.subjects else default_subjects(data)
        if not subjects:
            raise InputError(f"no subjects S35..S40 in {data}; name them with --subjects")
        found_subjects = {s: find_subject(data, s) for s in subjects}
        if args.scan_to_scan:
            if len(subjects) < 2:
                raise InputError("--scan-to-scan needs at least two subjects")
            fixed_names = subjects[1:] + subjects[:1]
            pairs = {f"{s}->{f}": (*found_subjects[s], *found_subjects[f])
                     for s, f in zip(subjects, fixed_names, strict=True)}
        else:
            atlas = data / "fixed.nii.gz", find_file([data / "label"], ATLAS)
            if not atlas[0].is_file() or atlas[1] is None:
                raise InputError(f"{data} needs fixed.nii.gz (the atlas, {ATLAS}) and its label map in label/")
            pairs = {s: (*found_subjects[s], *atlas) for s in subjects}
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

    ids = metrics.label_ids(sitk.GetArrayFromImage(sitk.ReadImage(str(next(iter(pairs.values()))[3]))))
    network = "fast (default)" if args.model != "none" else "affine only (no model)"
    presets = {network: [], "accurate": ["--accurate"]}
    if args.model != "none":  # Fast mode without its polish: the network's field as it is
        presets = {"network only": ["--no-polish", "--no-auto-refine"], **presets}
    if args.refine:
        presets[f"refine {args.refine}"] = ["--refine", str(args.refine)]
    methods = [BEFORE, *presets] + ([ANTS] if ants_version else [])
    rows: list[dict] = []
    stages: dict[str, list[dict]] = {method: [] for method in presets}
    devices: set[str] = set()  # where this tool ran (report.json): a GPU when one is there
    with tempfile.TemporaryDirectory() as work:
        for subject, (image, labels, fixed_path, fixed_labels_path) in pairs.items():
            found = {method: median_run([run_tool(fixed_path, fixed_labels_path, image, labels, args.model, options,
                                                  args.threads, Path(work), args.precision)
                                         for _ in range(max(1, args.repeats))])
                     for method, options in presets.items()}
            if ants_version:
                found[ANTS] = run_ants(fixed_path, fixed_labels_path, image, labels, args.threads)
            rows.append({"subject": subject, "method": BEFORE, "mean_dice": found[network]["before"],
                         "folding_percent": "", "seconds": "", "peak_mb": "", "ants_time_ratio": ""})
            for method, r in found.items():
                ratio = found[ANTS]["seconds"] / r["seconds"] if ants_version else ""
                rows.append({"subject": subject, "method": method, "mean_dice": r["mean_dice"],
                             "folding_percent": r["folding_percent"], "seconds": r["seconds"],
                             "peak_mb": r["peak_mb"], "ants_time_ratio": ratio})
                if method in stages:
                    stages[method].append(r["stages"])
                    devices.add(r["device"])
            print(f"{subject}: " + ", ".join(f"{m} Dice {r['mean_dice']:.3f} in {r['seconds']:.1f} s"
                                             for m, r in found.items()), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    boxplot(rows, methods, out / "boxplot.png")
    import torch

    text = [
        f"# LPBA40: {plural(len(subjects), 'subject')} -> "
        f"{'the next subject (scan to scan)' if args.scan_to_scan else ATLAS}",
        "",
        f"Subjects {', '.join(subjects)}; mean Dice over the {len(ids)} labels of the fixed image; "
        "% det J <= 0 inside the fixed image's labelled brain; seconds and peak resident memory of each method as "
        "its own process (start-up, imports, reading, registration, label warp and, for this tool, all its "
        f"outputs written); this tool: the run of median time of {max(1, args.repeats)} per subject and preset, "
        "ANTs: one run.",
        f"Model `{args.model}`; {args.threads} threads for torch, ITK and ANTs; this tool on "
        f"{', '.join(sorted(devices))}; "
        f"ANTs: {f'antspyx {ants_version}, SyN defaults' if ants_version else 'not run'}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        *summary_table(rows, methods),
        "",
        "## Seconds per stage of register() (report.json, mean)",
        "",
        *stage_table(stages),
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
