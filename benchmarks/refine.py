"""Refinement schedules on LPBA40 validation pairs (to the atlas): Dice, folding and seconds per setting.

Each schedule overrides register.ACCURATE (50 steps unless it says otherwise); the accurate preset was
chosen with this sweep on S35..S40 (README, "Accurate mode").

    python benchmarks/refine.py [--subjects S35,S36,S37,S38,S39,S40] [--model bundled] [--threads 1] [--only TEXT]
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

SCHEDULES = {  # name: overrides of register.ACCURATE (window 5, velocity at the network's 4 mm)
    "network only": None,
    "lr 0.1, smoothness 1 (the earlier preset)": {"lr": 0.1, "smooth_weight": 1.0},
    "lr 0.02, smoothness 1": {"lr": 0.02, "smooth_weight": 1.0},
    "lr 0.1, smoothness 0.25": {"lr": 0.1, "smooth_weight": 0.25},
    "lr 0.02, smoothness 0.25": {"lr": 0.02, "smooth_weight": 0.25},
    "lr 0.02, smoothness 0.1": {"lr": 0.02, "smooth_weight": 0.1},
    "lr 0.02, smoothness 0.05": {"lr": 0.02, "smooth_weight": 0.05},
    "lr 0.03, smoothness 0.1": {"lr": 0.03, "smooth_weight": 0.1},
    "lr 0.01, smoothness 0.25, 100 steps": {"lr": 0.01, "smooth_weight": 0.25, "steps": 100},
    "lr 0.02, smoothness 0.1, 30 steps (the preset)": {"lr": 0.02, "smooth_weight": 0.1, "steps": 30},
    "velocity 2 mm, lr 0.02, smoothness 0.1, 30 steps": {"velocity_factor": 2, "lr": 0.02, "smooth_weight": 0.1,
                                                         "steps": 30},
    "velocity 2 mm, lr 0.02, smoothness 0.3, 30 steps": {"velocity_factor": 2, "lr": 0.02, "smooth_weight": 0.3,
                                                         "steps": 30},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--subjects", default="S35,S36,S37,S38,S39,S40")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="run the schedules whose names contain this text (and network only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data = Path(args.data)
    fixed = sitk.ReadImage(str(data / "fixed.nii.gz"))
    fixed_labels = sitk.ReadImage(str(find_file([data / "label"], ATLAS)))
    default = dict(pipeline.ACCURATE)
    print("| subject | schedule | mean Dice | folding % | refine steps run | seconds |\n|---|---|---|---|---|---|")
    for subject in args.subjects.split(","):
        image, labels = find_subject(data, subject)
        moving, moving_labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(labels))
        for name, overrides in SCHEDULES.items():
            if args.only and overrides is not None and args.only not in name:
                continue
            pipeline.ACCURATE.clear()
            pipeline.ACCURATE.update({**default, "steps": 50, **(overrides or {})})
            start = time.perf_counter()
            result = pipeline.register(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                       model=args.model, device="cpu", accurate=overrides is not None,
                                       auto_refine=False, polish=False)
            seconds = time.perf_counter() - start
            r = result.report
            print(f"| {subject} | {name} | {r['mean_dice_after']:.4f} | {r['folding_percent']:.4f} | "
                  f"{r.get('refinement', {}).get('steps_run', 0)} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
