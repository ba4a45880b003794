"""The bundled network's velocity on CPU with its weights in the default and in the channels-last layout: one fresh
process per run, the first (cold, as in a command-line call) and a second (warm) call timed.

    python benchmarks/network_layout.py [--runs 8] [--threads 2]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (80, 96, 80)  # about the 2 mm working grid of an adult brain


def one_run(layout: str, threads: int) -> tuple[float, float]:
    """(cold, warm) seconds of ``velocity`` in this process."""
    import torch

    from SlicerVoxelMorphLib.models import BUNDLED, load_model

    torch.set_num_threads(threads)
    net, _ = load_model(BUNDLED)
    net.eval()
    moving, fixed = torch.rand(1, 1, *SIZE), torch.rand(1, 1, *SIZE)
    with torch.no_grad():
        start = time.perf_counter()
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last_3d)
        net.velocity(moving, fixed)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        net.velocity(moving, fixed)
        return cold, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(*one_run(args.worker, args.threads))
        return
    times: dict[str, list[tuple[float, float]]] = {"default": [], "channels_last": []}
    for _ in range(args.runs):  # alternating, so that machine drift hits both
        for layout, found in times.items():
            out = subprocess.run([sys.executable, __file__, "--worker", layout, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={"PYTHONPATH": str(ROOT / "SlicerVoxelMorph")})
            found.append(tuple(float(x) for x in out.stdout.split()))
    print(f"| layout | cold s (median of {args.runs}) | warm s (median) |\n|---|---|---|")
    for layout, found in times.items():
        cold, warm = (statistics.median(run[k] for run in found) for k in (0, 1))
        print(f"| {layout} | {cold:.3f} | {warm:.3f} |")


if __name__ == "__main__":
    main()
