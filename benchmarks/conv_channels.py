"""The first convolution of each UNet on the CPU: PyTorch's conv3d on 2 input channels (slow path) against
the same convolution with the input and weights padded to networks.FAST_CPU_CHANNELS zero channels (oneDNN),
and the bundled model's whole network stage with and without that padding. Median of repeats, milliseconds.

    python benchmarks/conv_channels.py [--threads 2] [--repeats 10]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib import networks
from SlicerVoxelMorphLib.models import BUNDLED, load_model

LEVEL = (80, 96, 80)  # the network level of an LPBA40 brain at 2 mm


def median_ms(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = networks.ConvBlock(2, 16).eval()
    moving, fixed = torch.rand(1, 1, *LEVEL), torch.rand(1, 1, *LEVEL)
    pair = torch.cat([moving, fixed], dim=1)
    net, _ = load_model(BUNDLED)
    net.eval()
    rows = []
    with torch.no_grad():
        for padded in (False, True):
            networks.FAST_CPU_CHANNELS = 4 if padded else 0
            rows.append((padded, median_ms(lambda: block(pair), args.repeats),
                         median_ms(lambda: net.velocity(moving, fixed), max(3, args.repeats // 3))))
    print(f"{args.threads} threads, level {LEVEL}, bundled model {BUNDLED.name}\n")
    print("| input channels | first convolution, ms | network velocity, ms |\n|---|---|---|")
    for padded, conv, whole in rows:
        print(f"| {'4 (2 zero)' if padded else 2} | {conv:.1f} | {whole:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
