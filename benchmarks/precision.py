"""The network's precision, float32 against bfloat16 (``--precision``): whole ``register`` command-line calls
(Fast mode, default settings) as processes, the two precisions interleaved call by call so that a drifting
machine weighs on both alike. Per precision: median seconds of the call and of its network stage
(report.json), and the mean Dice. Writes precision.md to --out.

    python benchmarks/precision.py [--subjects S35,S36] [--rounds 5] [--threads 2] [--out DIR]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from lpba40 import ATLAS, DEFAULT_DATA, find_file, find_subject, run_tool

PRECISIONS = ("float32", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--subjects", default="S35,S36")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmark_output")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    fixed, fixed_labels = data / "fixed.nii.gz", find_file([data / "label"], ATLAS)
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for subject in args.subjects.split(","):
                image, labels = find_subject(data, subject)
                for precision in PRECISIONS:
                    runs[precision].append(run_tool(fixed, fixed_labels, image, labels, "bundled", [], args.threads,
                                                    Path(work), precision))
    lines = [f"# Precision: LPBA40 {args.subjects} -> {ATLAS}, Fast mode, {args.rounds} interleaved rounds, "
             f"{args.threads} threads", "",
             "| --precision | device (report.json) | calls | median seconds a call | median network stage (s) "
             "| mean Dice |",
             "|---|---|---|---|---|---|"]
    for precision, found in runs.items():
        reported = ", ".join(sorted({r["device"] for r in found}))
        seconds = statistics.median(r["seconds"] for r in found)
        network = statistics.median(r["stages"]["network"] for r in found)
        lines.append(f"| {precision} | {reported} | {len(found)} | {seconds:.2f} | {network:.2f} "
                     f"| {statistics.mean(r['mean_dice'] for r in found):.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
