"""Refinement schedules on LPBA40 validation pairs (to the atlas): Dice, folding and seconds per setting.

    python benchmarks/refine.py [--subjects S35,S36] [--model bundled] [--steps 60]
"""

import argparse
import sys
import time
from pathlib import Path

import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpba40 import ATLAS, DEFAULT_DATA, find_file, find_subject

from SlicerVoxelMorphLib import register as pipeline

SCHEDULES = {  # name: overrides of register.ACCURATE
    "network only": None,
    "window 5, velocity 4 mm": {"window": 5, "velocity_factor": 1},
    "window 9, velocity 4 mm": {"window": 9, "velocity_factor": 1},
    "window 5, velocity 2 mm": {"window": 5, "velocity_factor": 2},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--subjects", default="S35,S36")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    fixed = sitk.ReadImage(str(data / "fixed.nii.gz"))
    fixed_labels = sitk.ReadImage(str(find_file([data / "label"], ATLAS)))
    default = dict(pipeline.ACCURATE)
    print("| subject | schedule | mean Dice | folding % | refine steps run | seconds |\n|---|---|---|---|---|---|")
    for subject in args.subjects.split(","):
        image, labels = find_subject(data, subject)
        moving, moving_labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(labels))
        for name, overrides in SCHEDULES.items():
            pipeline.ACCURATE.clear()
            pipeline.ACCURATE.update({**default, **(overrides or {}), "steps": args.steps})
            start = time.perf_counter()
            result = pipeline.register(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                       model=args.model, device="cpu", accurate=overrides is not None,
                                       auto_refine=False)
            seconds = time.perf_counter() - start
            r = result.report
            print(f"| {subject} | {name} | {r['mean_dice_after']:.4f} | {r['folding_percent']:.4f} | "
                  f"{r.get('refinement', {}).get('steps_run', 0)} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
