"""Speed and memory of one whole ``register`` call on a 160x192x160 pair, per stage, median of repeats.

Each repeat runs in a fresh Python process, so its peak resident memory (getrusage maxrss) belongs
to that one call. Uses the LPBA40 pair S35 -> S01 when the shared data folder exists, else a
synthetic pair of the same size. Writes a markdown table to stdout and to benchmarks/results/speed.md.

    python benchmarks/speed.py [--device cpu|cuda] [--refine 50] [--repeats 3] [--threads 2]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib.models import BUNDLED

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "LPBA40"
SIZE = (160, 192, 160)
STAGES = ["check", "affine", "resample", "network", "refine", "compose", "warp", "metrics"]


def lpba40_pair(data: Path) -> tuple[sitk.Image, sitk.Image] | None:
    """The LPBA40 pair (fixed S01, moving S35), or None when the data folder is not there."""
    fixed, moving = data / "fixed.nii.gz", data / "train" / "S35.delineation.skullstripped.nii.gz"
    if not (fixed.is_file() and moving.is_file()):
        return None
    return sitk.ReadImage(str(fixed)), sitk.ReadImage(str(moving))


def synthetic_pair() -> tuple[sitk.Image, sitk.Image]:
    """A textured ellipsoid of SIZE voxels at 1 mm and a copy shifted and scaled by a few percent."""
    rng = np.random.default_rng(0)
    texture = sitk.GetImageFromArray(rng.standard_normal(SIZE[::-1]).astype(np.float32))
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(texture, 3.0))
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in SIZE[::-1]], indexing="ij")
    inside = (i**2 + j**2 + k**2) < 0.7
    fixed = sitk.GetImageFromArray(np.where(inside, 100 + 400 * texture, 0).astype(np.float32))
    transform = sitk.Similarity3DTransform()
    transform.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in SIZE]))
    transform.SetScale(1.03)
    transform.SetTranslation((2.0, -3.0, 1.5))
    moving = sitk.Resample(fixed, fixed, transform, sitk.sitkLinear, 0.0)
    return fixed, moving


def worker(config: dict) -> dict:
    """One register call in this process: stage seconds, wall seconds and peak memory (MiB)."""
    from SlicerVoxelMorphLib.register import register

    torch.set_num_threads(config["threads"])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config["threads"])
    pair = lpba40_pair(Path(config["data"]))
    fixed, moving = pair if pair is not None else synthetic_pair()
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = register(fixed, moving, model=config["model"], device=config["device"],
                      refine_steps=config["refine"])
    wall = time.perf_counter() - start
    out = {"seconds": result.report["seconds"], "wall": wall, "device": result.report["device"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mib": before_mib, "input": "LPBA40 S35 -> S01" if pair is not None else "synthetic"}
    if config["device"] == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_repeats(config: dict, repeats: int) -> list[dict]:
    """``repeats`` fresh worker processes for one configuration."""
    runs = []
    for n in range(repeats):
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"worker failed ({config}):\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {config['name']}: repeat {n + 1}/{repeats}, {runs[-1]['wall']:.1f} s", file=sys.stderr)
    return runs


def flatten(run: dict) -> dict[str, float]:
    """The numbers of one run in one flat dict: stage seconds, wall and memory."""
    return {**run["seconds"], **{k: v for k, v in run.items() if isinstance(v, float)}}


def table(rows: list[tuple[str, list[dict]]]) -> str:
    """Markdown table of medians: one row per configuration, one column per stage."""
    gpu = any("peak_gpu_mib" in run for _, runs in rows for run in runs)
    columns = [*STAGES, "total", "wall", "peak_rss_mib", "rss_before_mib", *(["peak_gpu_mib"] if gpu else [])]
    header = ["configuration", *STAGES, "total (s)", "wall (s)", "peak RSS (MiB)", "RSS before call (MiB)",
              *(["peak GPU (MiB)"] if gpu else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in rows:
        flat = [flatten(run) for run in runs]
        cells = [name]
        for column in columns:
            if column not in flat[0]:
                cells.append("-")
                continue
            value = statistics.median(f[column] for f in flat)
            cells.append(f"{value:.0f}" if column.endswith("mib") else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--refine", type=int, default=50, help="refinement steps of the second configuration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and ITK threads (default 2)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="LPBA40 folder (synthetic pair if absent)")
    parser.add_argument("--model", default="bundled" if BUNDLED.is_file() else "none",
                        help="bundled (default when installed) or none: no network, refinement only")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    base = {"device": args.device, "threads": args.threads, "data": args.data, "model": args.model}
    first = "network only" if args.model != "none" else "no model, no refinement (affine only)"
    second = f"network + refine {args.refine}" if args.model != "none" else f"no model, refine {args.refine}"
    rows = [(name, run_repeats({**base, "name": name, "refine": refine}, args.repeats))
            for name, refine in ((first, 0), (second, args.refine))]
    runs = rows[0][1]
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    text = "\n".join([
        "# Speed of one `register` call",
        "",
        f"Input: {runs[0]['input']} ({'x'.join(map(str, SIZE))} at 1 mm), no label maps; model `{args.model}`; "
        f"device {runs[0]['device']}, {args.threads} torch/ITK threads; median of {args.repeats} run(s), each in a "
        "fresh process, so each pays one-time start-up (model loading, CUDA initialisation). Seconds per stage "
        "are the report's `seconds`; wall is the `register` call timed from outside.",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs{gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, SimpleITK {sitk.Version_VersionString()}; {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        table(rows),
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
