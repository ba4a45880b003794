"""The safety net's alignment check on the LPBA40 validation pairs: MIND-SSC distance after the affine alone
and after the network (the network refined when the second is not lower), on every voxel of the network
level and on the lattice ``register`` uses (every ALIGNMENT_STRIDE-th voxel), for the generalisation
variants and the whole-head same-scan proxy. Writes safety_net.md to --out.

    python benchmarks/safety_net.py [--subjects S35,S36] [--out benchmark_output]
"""

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalisation import variant_image
from head_field import known_field
from lpba40 import ATLAS, DEFAULT_DATA, default_subjects, find_file, find_subject

from SlicerVoxelMorphLib import images, register, variants
from SlicerVoxelMorphLib.preprocess import foreground_mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--subjects", help="comma-separated moving subjects (default: S35..S40 present)")
    parser.add_argument("--out", default="benchmark_output")
    args = parser.parse_args(argv)
    data = Path(args.data)
    subjects = args.subjects.split(",") if args.subjects else default_subjects(data)
    fixed = sitk.ReadImage(str(data / "fixed.nii.gz"))
    fixed_labels = sitk.ReadImage(str(find_file([data / "label"], ATLAS)))
    checked = []
    lattice = register.alignment

    def both(source, target, flow):  # what register decides on, and the same on every voxel
        every, used = lattice(source, target, flow, 1), lattice(source, target, flow)
        checked.append((every, used))
        return used

    register.alignment = both
    lines = [f"# Safety-net check (MIND-SSC distance, network / affine only; refined when >= 1), LPBA40 -> {ATLAS}",
             "", f"| pair | every voxel | stride {register.ALIGNMENT_STRIDE} (used) | same decision |",
             "|---|---|---|---|"]
    for n, subject in enumerate(subjects):
        image_path, labels_path = find_subject(data, subject)
        moving, moving_labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(labels_path))
        pairs = {}
        for kind in variants.VARIANTS:
            m = variant_image(moving, moving_labels, kind, n)
            both = kind in variants.BOTH_IMAGES
            pairs[kind] = (variant_image(fixed, fixed_labels, kind, 1000 + n) if both else fixed, m)
        head = pairs["head"][1]
        truth = known_field(head, foreground_mask(head), seed=100 + n)  # as benchmarks/head_field.py
        pairs["same head"] = (sitk.Resample(head, head, images.field_transform(truth), sitk.sitkLinear, 0.0,
                                            sitk.sitkFloat32), head)
        for kind, (f, m) in pairs.items():
            register.register(f, m, auto_refine=False, polish=False)
            every, used = (c["network"] / c["affine_only"] for c in checked[-1])
            lines.append(f"| {subject} {kind} | {every:.3f} | {used:.3f} | {(every >= 1) == (used >= 1)} |")
            print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "safety_net.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
