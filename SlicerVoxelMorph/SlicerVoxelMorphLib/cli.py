"""Command line: ``slicer-voxelmorph register``, ``apply`` and ``train``."""

import argparse
import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import Cancelled, InputError

REGISTER_EXAMPLES = """examples:
  slicer-voxelmorph register --fixed atlas.nii.gz --moving subject.nrrd --out result/
  slicer-voxelmorph register --fixed F.nii.gz --moving M.nii.gz --fixed-labels FL.nii.gz \\
      --moving-labels ML.nii.gz --label-names labels.csv --refine 50 --out result/
  slicer-voxelmorph register --fixed F.mha --moving M.mha --model none --refine 150 --out result/
"""

# gzip levels of the .nii.gz outputs (images and label maps, float fields): float32 displacement and
# Jacobian fields shrink by 10-20 % only (LPBA40 pair: 58 -> 53 MB) at seconds of CPU, so "fast" stores them
COMPRESSION = {"fast": (1, 0), "small": (9, 9), "none": (0, 0)}
# GIL switch interval (s) while torch imports in a thread: the affine stage measured 2.1 -> 1.7 s on an LPBA40
# pair with 0.5 ms (Python's default is 5 ms)
IMPORT_SWITCH_INTERVAL = 0.0005
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

APPLY_EXAMPLES = """examples:
  slicer-voxelmorph apply --transform result/displacement.nii.gz --input moving_t2.nii.gz \
      --reference fixed.nii.gz --output t2_on_fixed.nii.gz
  slicer-voxelmorph apply --transform result/inverse_displacement.nii.gz --input atlas_labels.nii.gz --labels \
      --reference moving.nii.gz --output atlas_labels_on_moving.nii.gz
  slicer-voxelmorph apply --transform result/displacement.nii.gz --points fixed_points.csv --output on_moving.csv
"""

TRAIN_EXAMPLES = """examples:
  slicer-voxelmorph train --images data/train --labels data/label --atlas data/fixed.nii.gz \\
      --atlas-labels data/label/S01.nii.gz --val-subjects S35,S36 --iterations 5000 --out runs/lpba40
  slicer-voxelmorph train --list pairs.csv --out runs/mine --resume
"""


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (argparse reports anything else in one line, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer is required, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value
    return parse


def subject_name(path: Path) -> str:
    """Subject id of a file: its name up to the first dot (S11.delineation.nii.gz -> S11)."""
    return path.name.split(".")[0]


def image_files(folder: Path) -> list[Path]:
    """Image files in a folder, sorted by name."""
    from .images import FREESURFER_SUFFIXES, IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES + FREESURFER_SUFFIXES))


def training_lists(args: argparse.Namespace) -> tuple[list[str], list[str] | None, list[str], list[str] | None]:
    """(train images, train labels, validation images, validation labels) from folders or a list file."""
    if args.list:
        with open(args.list, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "image" not in rows[0]:
            raise InputError(f"{args.list}: a CSV with columns image[,labels][,split] is required")
        base = Path(args.list).parent
        columns = ("image", "labels") if rows[0].get("labels") else ("image",)
        for row, r in enumerate(rows, start=2):  # row 1 is the header
            blank = [c for c in columns if not (r.get(c) or "").strip()]
            if blank:
                raise InputError(f"{args.list} row {row}: no {' and no '.join(blank)} (give labels for every image "
                                 "or for none)")
        images = [str(base / r["image"].strip()) for r in rows]
        labels = [str(base / r["labels"].strip()) for r in rows] if len(columns) == 2 else None
        splits = {r.get("split") or "train" for r in rows}
        if not splits <= {"train", "val"}:
            raise InputError(f"{args.list}: split must be train or val, not {', '.join(sorted(splits))}")
        is_val = [(r.get("split") or "train") == "val" for r in rows]
    else:
        if not args.images or not Path(args.images).is_dir():
            raise InputError("--images must be a folder of images (or give --list)")
        files = image_files(Path(args.images))
        images = [str(p) for p in files]
        labels = None
        if args.labels:
            by_name = {subject_name(p): p for p in image_files(Path(args.labels))}
            missing = [subject_name(p) for p in files if subject_name(p) not in by_name]
            if missing:
                raise InputError(f"no label map in {args.labels} for: {', '.join(missing)}")
            labels = [str(by_name[subject_name(p)]) for p in files]
        val = set(filter(None, (args.val_subjects or "").split(",")))
        unknown = sorted(val - {subject_name(p) for p in files})
        if unknown:
            raise InputError(f"--val-subjects names no image in {args.images}: {', '.join(unknown)}")
        is_val = [subject_name(p) in val for p in files]
    pick = [i for i, v in enumerate(is_val) if not v]
    held = [i for i, v in enumerate(is_val) if v]
    return ([images[i] for i in pick], [labels[i] for i in pick] if labels else None,
            [images[i] for i in held], [labels[i] for i in held] if labels else None)


def read_label_names(path: str | None) -> dict[int, str] | None:
    """Label names from a CSV with columns id,name (a header row is required)."""
    if path is None:
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        ids = [int(r["id"]) for r in rows]
        names = {label: r["name"] for label, r in zip(ids, rows, strict=True)}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read label names from {path}: a CSV with columns id,name is required "
                         f"({type(exc).__name__})") from None
    twice = sorted({label for label in ids if ids.count(label) > 1})
    if twice:
        raise InputError(f"{path}: id {', '.join(map(str, twice))} named more than once")
    return names


def check_output(out: Path, overwrite: bool, inputs: list[str] = ()) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``, and an overwrite that would
    replace one of the ``inputs`` (nothing is created here: outputs are staged and moved in when the run succeeds)."""
    from .files import RUN_OUTPUTS

    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} is not empty (use --overwrite)")
    replaced = [out / name for name in RUN_OUTPUTS if (out / name).is_file()]
    for given in (Path(p) for p in inputs if p and Path(p).is_file()):
        if any(given.samefile(old) for old in replaced):
            raise InputError(f"input {given} is an output of an earlier run in {out} that --overwrite would replace: "
                             "copy it elsewhere or choose another --out")
    nearest = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        raise InputError(f"output {out}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise InputError(f"output {out}: no permission to write in {nearest}")


def run_register(args: argparse.Namespace) -> None:
    import importlib
    import json
    import time
    import warnings

    from .files import Background, staged_output

    # torch and the network code load in a thread (~2 s) while the inputs are read, checked, affinely aligned
    # and prepared for the network; meanwhile a shorter GIL switch interval lets the main thread's Python
    # steps between ITK calls run sooner
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(IMPORT_SWITCH_INTERVAL)
    loading = Background(importlib.import_module, f"{__package__}.register")
    bar = None
    try:
        import SimpleITK as sitk

        from .inputs import check_inputs
        from .orientation import pair_orientations
        from .preprocess import NETWORK_SPACING_MM, align, working_pair
        from .report import write_report_png

        out = Path(args.out)
        if args.threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
        names = read_label_names(args.label_names)
        inputs = _read_register_inputs(args)
        check_output(out, args.overwrite, [args.fixed, args.moving, args.fixed_labels, args.moving_labels,
                                           args.fixed_mask, args.moving_mask, args.fixed_points, args.moving_points,
                                           args.label_names])
        refine_steps = args.refine if args.refine is not None else (0 if args.model != "none" else 100)
        bar = _progress_bar(args.quiet, total=100, leave=False,
                            bar_format="{desc:<10} {percentage:3.0f}%|{bar}| {elapsed}")

        def show(stage: str, fraction: float) -> None:
            bar.set_description_str(stage)
            bar.n = round(100 * fraction)
            bar.refresh()

        progress = None if bar.disable else show  # no bar (quiet, or not a terminal): no callbacks either
        # bad input is refused before the slow stages (register would check it too)
        checked = check_inputs(**inputs, smoothness=args.smoothness)
        fixed, moving = inputs["fixed"], inputs["moving"]
        start = time.perf_counter()
        orientations = pair_orientations(fixed, moving, both=not args.no_affine)
        orientation_seconds = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        aligned = align(fixed, moving, progress, checked.fixed_mask, checked.moving_mask, not args.no_affine,
                        orientations=orientations)
        affine_seconds = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        working = working_pair(fixed, moving, aligned.transform, NETWORK_SPACING_MM, aligned.fixed_mask,
                               aligned.moving_mask, aligned, orientations.fixed)
        resample_seconds = round(time.perf_counter() - start, 3)
        register = loading.join().register  # the import's own warnings are not the user's business
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _one_line_warning
            result = register(**inputs, label_names=names, model=args.model, device=args.device,
                              refine_steps=refine_steps, accurate=args.accurate, similarity=args.similarity,
                              auto_refine=not args.no_auto_refine, affine=not args.no_affine, inverse=args.inverse,
                              smoothness=args.smoothness, progress=progress, checked=checked, working=working,
                              polish=not args.no_polish and args.refine != 0,  # --refine 0: no steps at all
                              precision=args.precision)
    finally:
        sys.setswitchinterval(switch_interval)
        if bar is not None:
            bar.close()
    seconds = result.report["seconds"]  # the stages done here, before register, add to its own
    seconds = {**seconds, "affine": affine_seconds, "orientation": orientation_seconds,
               "resample": round(seconds["resample"] + resample_seconds, 3)}
    result.report["seconds"] = {**seconds, "total": round(sum(v for k, v in seconds.items() if k != "total"), 3)}
    images_level, fields_level = COMPRESSION[args.compression]
    report = {"fixed": str(args.fixed), "moving": str(args.moving), **result.report}
    # float32 vectors (as ANTs writes them): half the size and time of float64, 1e-5 mm precision
    fields = [(result.displacement, "displacement.nii.gz"), (result.jacobian, "jacobian.nii.gz"),
              (result.inverse_displacement, "inverse_displacement.nii.gz")]
    scans = [(result.warped, "warped.nii.gz"), (result.warped_labels, "warped_labels.nii.gz")]
    with staged_output(out) as stage:
        # three threads: report.png (mostly Python), the compressed scans and the stored fields (zlib,
        # file writes and ITK release the GIL)
        workers = [Background(write_report_png, stage / "report.png", fixed, moving, result.warped,
                              result.displacement, result.jacobian, result.report),
                   Background(_write_images, scans, stage, images_level)]
        try:
            _write_images(fields, stage, fields_level)
            (stage / "report.json").write_text(json.dumps(report, indent=2))
        finally:
            for worker in workers:
                worker.thread.join()  # never leave a thread writing into a stage that is being removed
        for worker in workers:
            worker.join()  # re-raises the thread's own error
    if not args.quiet:
        summary = f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}, " \
            if "mean_dice_after" in report else ""
        if "landmarks" in report:
            tre = report["landmarks"]
            summary += f"TRE {tre['mean_tre_before_mm']:.2f} -> {tre['mean_tre_after_mm']:.2f} mm, "
        print(f"{summary}folding {report['folding_percent']:.4f} %, {report['seconds']['total']:.1f} s "
              f"on {report['device']}; results in {out}")


def _read_register_inputs(args: argparse.Namespace) -> dict:
    """The images, label maps, landmarks and masks ``register`` is given, by its keyword names, read in that order."""
    from .images import read_image

    inputs = {"fixed": read_image(args.fixed, "fixed image"), "moving": read_image(args.moving, "moving image")}
    for name in ("fixed_labels", "moving_labels"):
        path = getattr(args, name)
        inputs[name] = read_image(path, name.replace("_", " ")) if path else None
    inputs["fixed_points"] = inputs["moving_points"] = None
    if args.fixed_points or args.moving_points:
        from .apply import read_points

        for name in ("fixed_points", "moving_points"):
            path = getattr(args, name)
            inputs[name] = read_points(path, args.ras) if path else None
    for name in ("fixed_mask", "moving_mask"):
        path = getattr(args, name)
        inputs[name] = read_image(path, name.replace("_", " ")) if path else None
    return inputs


def _write_images(named: list, folder: Path, compression: int) -> None:
    """Write each (image or None, file name) pair into ``folder``."""
    from .images import write_image

    for image, name in named:
        if image is not None:
            write_image(image, folder / name, compression)


def run_apply(args: argparse.Namespace) -> None:
    from . import apply
    from .images import check_image, check_image_output, read_image, write_image

    if (args.input is None) == (args.points is None):
        raise InputError("give either --input (an image) or --points (a CSV), not both or neither")
    output = check_image_output(args.output) if args.input else Path(args.output)
    if args.points and output.suffix.lower() != ".csv":
        raise InputError(f"output {output}: mapped points are written as a CSV file (.csv)")
    if output.exists() and not args.overwrite:
        raise InputError(f"output {output} exists (use --overwrite)")
    if not output.parent.is_dir():
        raise InputError(f"the folder of the output {output} does not exist")
    inputs = [Path(p) for p in (args.transform, args.input, args.points, args.reference) if p]
    if output.exists() and any(p.exists() and p.samefile(output) for p in inputs):
        raise InputError(f"output {output} is one of the inputs: choose another name (inputs are never overwritten)")
    field = apply.check_field(read_image(args.transform, "transform"))
    if args.points:
        apply.write_points(apply.map_points(apply.read_points(args.points, args.ras), field), output, args.ras)
        return
    image = read_image(args.input, "input image")
    if args.labels:
        apply.check_scalar_3d(image, "input label map")
    else:
        check_image(image, "input image")
    reference = apply.check_scalar_3d(read_image(args.reference, "reference image"), "reference image") \
        if args.reference else field
    interpolation = args.interpolation or ("nearest" if args.labels else "linear")
    write_image(apply.warp_image(image, field, reference, interpolation, args.labels), output)


def run_train(args: argparse.Namespace) -> None:
    from dataclasses import fields

    import torch

    from .devices import pick_device
    from .train import TrainConfig, Trainer, hardware_description

    images, labels, val_images, val_labels = training_lists(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
               if f.name not in ("images", "labels") and getattr(args, f.name, None) is not None}
    config = TrainConfig(images=images, labels=labels, val_images=val_images, val_labels=val_labels, **options)
    device = pick_device(args.device)
    bar = _progress_bar(args.quiet, total=config.iterations, unit="it")
    if not args.resume and (Path(args.out) / "checkpoint.pt").exists():
        raise InputError(f"{args.out} holds a training run already: add --resume, or choose another --out")
    trainer = Trainer(config, Path(args.out), device, warm_start=not args.resume, precision=args.precision)
    if args.resume:
        trainer.resume()
        bar.update(trainer.iteration)

    def progress(stage: str, fraction: float) -> None:
        bar.n = trainer.iteration
        last = trainer.history[-1] if trainer.history else {}
        bar.set_postfix({k: round(v, 4) for k, v in last.items() if k in ("loss", "dice", "val_dice")})
        bar.refresh()

    trainer.progress = progress
    try:
        trainer.run(args.chunk, args.workers)
    finally:
        bar.close()
    path = trainer.export_model(hardware_description(device, trainer.dtype))
    print(f"model written to {path} after {trainer.iteration} iterations")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"slicer-voxelmorph: warning: {message}", file=sys.stderr)


def _progress_bar(quiet: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(disable=True if quiet else None, dynamic_ncols=True, **kwargs)  # None: off when not a terminal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slicer-voxelmorph", description="VoxelMorph deformable registration.")
    commands = parser.add_subparsers(dest="command", required=True)

    r = commands.add_parser("register", help="register a moving image to a fixed image",
                            epilog=REGISTER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--fixed", required=True, help="fixed image (any 3D format SimpleITK reads)")
    r.add_argument("--moving", required=True, help="moving image")
    r.add_argument("--fixed-labels", help="label map of the fixed image (for Dice)")
    r.add_argument("--moving-labels", help="label map of the moving image (warped with nearest neighbour)")
    r.add_argument("--label-names", help="CSV with columns id,name")
    r.add_argument("--fixed-points", help="landmarks in the fixed image: CSV x,y,z (LPS mm) or Slicer markups")
    r.add_argument("--moving-points", help="the same landmarks in the moving image, matched by row (TRE report)")
    r.add_argument("--ras", action="store_true", help="x,y,z columns of the landmark CSVs are RAS")
    r.add_argument("--smoothness", type=float, default=1.0,
                   help="scales the refinement's smoothness weight (default 1; higher: smoother, less folding)")
    r.add_argument("--fixed-mask", help="binary mask on the fixed grid: only voxels inside are compared")
    r.add_argument("--moving-mask", help="binary mask on the moving grid (e.g. excluding a lesion or the skull)")
    r.add_argument("--model", default="bundled",
                   help="'bundled' (default: the inter-subject network, and for two scans of one head a network "
                        "trained on such pairs), a bundled model's name (e.g. lpba40, same_head), 'none' "
                        "(classical), or a file")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--precision", default="auto", choices=["auto", "float32"],
                   help="the network's convolutions: 'auto' (default) in bfloat16 on a CPU that computes it natively "
                        "(AVX512-BF16, AMX; the network stage 1.28 -> 0.96 s, the same Dice), else and with 'float32' "
                        "in float32")
    r.add_argument("--accurate", action="store_true",
                   help="refine the network's result by instance optimisation with the measured best schedule")
    r.add_argument("--refine", type=at_least(0),
                   help="expert: refinement steps instead of the presets (default: none beyond the safety net and Fast "
                        "mode's three polishing steps, see --no-polish; 100 with --model none); 0: no polishing "
                        "either (the safety net stays: --no-auto-refine)")
    r.add_argument("--similarity", choices=["auto", "ncc", "mind"], default="auto",
                   help="refinement similarity: local NCC (same contrast), MIND-SSC (any contrast), auto (default)")
    r.add_argument("--no-auto-refine", action="store_true",
                   help="no safety net: do not refine two scans of one head, two contrasts, or a network result "
                        "no better than the affine alignment or weaker than on the network's training data")
    r.add_argument("--no-polish", action="store_true",
                   help="the network's field as it is: no three refinement steps after it (what the default does to "
                        "a pair of one contrast, not two scans of one head, that nothing else refines; about 0.7 s "
                        "on 2 CPU cores)")
    r.add_argument("--inverse", action="store_true",
                   help="also write inverse_displacement.nii.gz (moving grid: moving point y -> fixed y + w(y))")
    r.add_argument("--no-affine", action="store_true", help="skip affine pre-alignment (images already aligned)")
    r.add_argument("--threads", type=at_least(1), help="CPU threads for torch and SimpleITK (default: all cores)")
    r.add_argument("--compression", choices=list(COMPRESSION), default="fast",
                   help="gzip of the .nii.gz outputs: fast (default: images level 1, float fields stored), "
                   "small (level 9), none (all stored)")
    r.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    r.add_argument("--out", required=True, help="output folder")
    r.set_defaults(func=run_register)

    a = commands.add_parser("apply", help="apply a saved displacement field to an image, label map or points",
                            epilog=APPLY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--transform", required=True, help="displacement field (displacement.nii.gz or the inverse)")
    a.add_argument("--input", help="image or label map to warp")
    a.add_argument("--reference", help="grid of the output image (default: the field's grid)")
    a.add_argument("--interpolation", choices=["linear", "nearest", "bspline"],
                   help="default linear for images, nearest for --labels (linear with --labels: each label "
                        "interpolated on its own, the largest wins: smooth boundaries)")
    a.add_argument("--labels", action="store_true", help="the input is a label map (keeps its type, 0 outside)")
    a.add_argument("--points", help="CSV x,y,z (LPS mm; l,p,s / r,a,s columns or Slicer markups JSON also read)")
    a.add_argument("--ras", action="store_true", help="x,y,z columns of --points and of the output are RAS")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a.add_argument("--output", required=True, help="output image or CSV")
    a.set_defaults(func=run_apply)

    t = commands.add_parser("train", help="train a model", epilog=TRAIN_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--images", help="folder of training images (already aligned, one grid)")
    t.add_argument("--labels", help="folder of label maps, matched to images by name up to the first dot")
    t.add_argument("--list", help="CSV with columns image, labels, split (train|val) instead of folders")
    t.add_argument("--val-subjects", help="comma-separated subject names held out for validation")
    t.add_argument("--atlas", help="atlas image (fixed image of atlas pairs)")
    t.add_argument("--atlas-labels", help="label map of the atlas")
    t.add_argument("--mode", choices=["scan", "atlas"], help="scan-to-scan (default) or all-to-atlas pairs")
    t.add_argument("--atlas-fraction", type=float, help="share of atlas pairs in scan mode (default 0.3)")
    t.add_argument("--iterations", type=int, help="total iterations (default 1000)")
    t.add_argument("--chunk", type=int, help="stop after this many more iterations (resume later)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    t.add_argument("--smooth-weight", type=float, help="weight of the smoothness loss (default 1)")
    t.add_argument("--dice-weight", type=float, help="weight of the label Dice loss, 0 = unsupervised (default 1)")
    t.add_argument("--ncc-weight", type=float, help="weight of the local NCC of real pairs (default 1)")
    t.add_argument("--ncc-window", type=int,
                   help="window of the local NCC of real pairs, odd, voxels of the training grid (default 9)")
    t.add_argument("--spacing-mm", type=float, help="training grid spacing in mm (default 2)")
    t.add_argument("--features", choices=["vm1", "vm2"], help="UNet feature sizes (default vm2)")
    t.add_argument("--synth-fraction", type=float,
                   help="share of iterations on image pairs synthesised from the label maps (default 0)")
    t.add_argument("--known-fraction", type=float,
                   help="share of the synthesised pairs drawn from one label map and a randomly deformed copy of "
                        "it, each with its own contrast, so that their deformation is known (default 0)")
    t.add_argument("--field-weight", type=float,
                   help="weight of the squared end-point error against a known pair's deformation (default 0)")
    t.add_argument("--rescan-fraction", type=float,
                   help="share of iterations on a real training image and a copy of it under a known random "
                        "deformation (two scans of one head, with or without skull), scored by --field-weight "
                        "(default 0)")
    t.add_argument("--csf-expansion", type=float,
                   help="share of synthesised label maps whose tissue is pushed away from the CSF by a random "
                        "amount (wider ventricles and sulci, as in older brains; default 0)")
    t.add_argument("--tissue-weight", type=float,
                   help="weight of the label overlap of the brain's tissue classes (CSF in and outside the labelled "
                        "structures, grey and white matter, from each image's intensities) on every pair (default 0)")
    t.add_argument("--fill-blanked", type=float,
                   help="share of real pairs whose structures that the images blanked out (LPBA40's cerebellum) are "
                        "drawn in as a cerebellum on both images, grey and white matter at each image's levels "
                        "(default 0)")
    t.add_argument("--init-model", help="start from the weights of a model file ('bundled': the bundled model)")
    t.add_argument("--residual-stage", action="store_true", default=None,
                   help="add a second network that refines the --init-model's field from the image it warps, "
                        "training only the new stage (inference runs both, about twice the network time)")
    t.add_argument("--fine-stage", action="store_true", default=None,
                   help="add a last network at full resolution that refines the --init-model's field from the image "
                        "it warps, training only the new stage (finer detail; more network time)")
    t.add_argument("--all-stages", action="store_true", default=None,
                   help="train every stage of a cascade together, end to end (default: only the newest stage)")
    t.add_argument("--val-every", type=int, help="validate every N iterations (default 250)")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations (default 250)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--precision", default="auto", choices=["auto", "float32"],
                   help="the training steps' convolutions on the CPU: 'auto' (default) in bfloat16 where the CPU "
                        "computes it natively (AVX512-BF16, AMX; a same_head step 0.99 -> 0.70 s), 'float32' always; "
                        "CUDA: mixed precision. Not part of the recipe: a run may resume in the other")
    t.add_argument("--threads", type=at_least(1), help="CPU threads for torch")
    t.add_argument("--workers", type=at_least(0), default=0,
                   help="processes that draw (synthesise) the training pairs ahead of the network step (default 0: "
                        "one background thread); on a GPU the step waits for one drawer: give it several cores. "
                        "The pairs are the same for any number")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--out", required=True, help="output folder (checkpoint, log.csv, model.pt)")
    t.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as exc:
        print(f"slicer-voxelmorph: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (permissions, space, a path that cannot be made)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"slicer-voxelmorph: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("slicer-voxelmorph: stopped", file=sys.stderr)
        return 130
    return 0


def keep_freed_memory() -> bool:
    """glibc only: serve large blocks from the heap too and never hand freed heap back to the system, so
    a new array reuses pages the process already has instead of mapping fresh ones (a page fault each 4 kB)
    and unmapping them when freed. For a process that does one job and ends: a long-lived one (Slicer)
    would keep its peak. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def run() -> None:
    """The process entry point: ``main``, then exit at once. Every output is written and closed by then;
    skipping the interpreter's teardown (finalising torch's modules) saves ~0.8 s a call. Freed memory is
    kept for reuse (``keep_freed_memory``): an LPBA40 pair, alternating 7 runs each, 4.4 -> 3.9 s, peak
    0.96 -> 1.07 GB."""
    keep_freed_memory()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
