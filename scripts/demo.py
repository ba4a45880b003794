"""Demo: register a synthetically deformed MNI152 brain back to the template and check the answer.

The MNI152 2009 T1 template and its grey/white-matter maps ship inside nilearn (no download). The
moving image is the template pushed through a known smooth random deformation, with a gamma change,
a bias field and noise; the tool must recover the deformation. Printed: Dice of three tissue labels
and the mean end-point error (mm) of the recovered displacement in the brain, before and after.

    python scripts/demo.py [--out demo_output] [--model bundled|none|PATH] [--refine N] [--seed 0]
"""

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib import cli
from SlicerVoxelMorphLib.images import displacement_image
from SlicerVoxelMorphLib.models import BUNDLED

RESOLUTION_MM = 2  # the template at 2 mm keeps the demo within a minute or two on two CPU cores
BRAIN_THRESHOLD = 0.05  # template intensity (scaled to [0, 1]) above which a voxel is brain
FIELD_SMOOTHING_MM = 12.0
FIELD_MAX_MM = 4.0  # largest displacement in the brain
BIAS_SMOOTHING_MM = 40.0
BIAS_AMPLITUDE = 0.15  # the bias field ranges over exp(+-0.15)
GAMMA = 0.8
NOISE = 0.02  # standard deviation, in units of the template's intensity range
MOVING_SCALE = 1000.0  # the moving image also gets another intensity range than the fixed one
TISSUES = {1: "CSF and other brain", 2: "grey matter", 3: "white matter"}

README = """\
SlicerVoxelMorph demo: the MNI152 2009 T1 template (fixed) and a copy of it deformed by a known smooth
random field, with an intensity change (moving); both at {resolution} mm.

Inputs made by scripts/demo.py
  fixed.nii.gz               MNI152 2009 T1 template (skull-stripped, nilearn's copy)
  fixed_labels.nii.gz        tissue labels of the template: 1 CSF/other brain, 2 grey matter, 3 white matter
  moving.nii.gz              the template deformed by the known field, gamma {gamma}, bias field, noise
  moving_labels.nii.gz       the tissue labels deformed by the same field
  tissue_labels.csv          label names (id,name)
  true_displacement.nii.gz   the known field, same convention as displacement.nii.gz: a fixed point x
                             corresponds to the moving point x + u(x) (LPS mm, on the fixed grid)

Outputs of `slicer-voxelmorph register` (model {model}, {refine} refinement steps)
  warped.nii.gz              moving image warped onto the fixed grid
  displacement.nii.gz        the recovered displacement field (compare with true_displacement.nii.gz)
  jacobian.nii.gz            det of the Jacobian of x -> x + u(x)
  warped_labels.nii.gz       moving labels warped onto the fixed grid
  report.json                Dice per label before/after, folding %, seconds per stage, versions
  report.png                 slices, deformation grid, Jacobian and Dice bars

Result
{result}
"""


def load_template(out: Path) -> tuple[sitk.Image, sitk.Image]:
    """Template T1 (float32, [0, 1]) and tissue labels, written to ``out`` and read back with SimpleITK.

    Writing the NIfTI files and reading them with SimpleITK leaves the RAS/LPS geometry to the readers.
    """
    import nibabel as nib
    from nilearn import datasets

    with warnings.catch_warnings():  # nilearn's resampling announces future changes of its defaults
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=RESOLUTION_MM)
        gm = datasets.load_mni152_gm_template(resolution=RESOLUTION_MM).get_fdata()
        wm = datasets.load_mni152_wm_template(resolution=RESOLUTION_MM).get_fdata()
    t1_array = t1.get_fdata(dtype=np.float32)
    other = np.clip(1.0 - gm - wm, 0.0, None)
    labels = np.where(t1_array > BRAIN_THRESHOLD, np.argmax(np.stack([other, gm, wm]), axis=0) + 1, 0)
    nib.save(nib.Nifti1Image(t1_array, t1.affine), out / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), t1.affine), out / "fixed_labels.nii.gz")
    return sitk.ReadImage(str(out / "fixed.nii.gz")), sitk.ReadImage(str(out / "fixed_labels.nii.gz"))


def smooth_noise(reference: sitk.Image, rng: np.random.Generator, components: int, sigma_mm: float) -> np.ndarray:
    """Gaussian-smoothed white noise on the grid of ``reference``, shape (K, J, I, components)."""
    shape = sitk.GetArrayViewFromImage(reference).shape
    out = np.empty((*shape, components), dtype=np.float32)
    for c in range(components):
        noise = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
        noise.CopyInformation(reference)
        out[..., c] = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_mm))
    return out


def known_field(fixed: sitk.Image, brain: np.ndarray, rng: np.random.Generator) -> sitk.Image:
    """A smooth random displacement (LPS mm, fixed grid) whose largest vector in the brain is FIELD_MAX_MM."""
    vectors = smooth_noise(fixed, rng, 3, FIELD_SMOOTHING_MM)
    vectors *= FIELD_MAX_MM / np.linalg.norm(vectors[brain], axis=-1).max()
    return displacement_image(vectors, fixed)


def make_moving(fixed: sitk.Image, fixed_labels: sitk.Image, field: sitk.Image,
                rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """Moving image and labels such that moving(x + u(x)) = fixed(x) for the known field u.

    Resampling needs the opposite map (moving point y -> fixed point y + v(y)), the inverse of x + u(x).
    """
    inverse = sitk.InvertDisplacementField(field, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=1e-4, enforceBoundaryCondition=False)
    # DisplacementFieldTransform takes over its image's buffer: give each one a copy
    moving = sitk.Resample(fixed, fixed, sitk.DisplacementFieldTransform(sitk.Image(inverse)), sitk.sitkLinear,
                           0.0, sitk.sitkFloat32)
    moving_labels = sitk.Resample(fixed_labels, fixed, sitk.DisplacementFieldTransform(sitk.Image(inverse)),
                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = np.clip(sitk.GetArrayFromImage(moving), 0.0, None) ** GAMMA
    bias = smooth_noise(fixed, rng, 1, BIAS_SMOOTHING_MM)[..., 0]
    array *= np.exp(BIAS_AMPLITUDE * bias / np.abs(bias).max())
    array += NOISE * rng.standard_normal(array.shape).astype(np.float32)
    out = sitk.GetImageFromArray((MOVING_SCALE * np.clip(array, 0.0, None)).astype(np.float32))
    out.CopyInformation(fixed)
    return out, moving_labels


def end_point_error(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean length (mm) of the difference of two (K, J, I, 3) displacement fields inside ``mask``."""
    return float(np.linalg.norm(estimate[mask] - truth[mask], axis=-1).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    parser.add_argument("--model", default="bundled" if BUNDLED.is_file() else "none",
                        help="bundled (default when installed), none (classical) or a model file")
    parser.add_argument("--refine", type=int, default=50, help="refinement steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random deformation and noise")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    fixed, fixed_labels = load_template(out)
    brain = sitk.GetArrayViewFromImage(fixed_labels) > 0
    field = known_field(fixed, brain, rng)
    moving, moving_labels = make_moving(fixed, fixed_labels, field, rng)
    sitk.WriteImage(moving, str(out / "moving.nii.gz"), useCompression=True)
    sitk.WriteImage(moving_labels, str(out / "moving_labels.nii.gz"), useCompression=True)
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(out / "true_displacement.nii.gz"),
                    useCompression=True)
    with open(out / "tissue_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name"])
        writer.writerows(TISSUES.items())

    status = cli.main(["register", "--fixed", str(out / "fixed.nii.gz"), "--moving", str(out / "moving.nii.gz"),
                       "--fixed-labels", str(out / "fixed_labels.nii.gz"),
                       "--moving-labels", str(out / "moving_labels.nii.gz"),
                       "--label-names", str(out / "tissue_labels.csv"), "--model", args.model,
                       "--refine", str(args.refine), "--out", str(out), "--overwrite"])
    if status:
        return status

    report = json.loads((out / "report.json").read_text())
    truth = sitk.GetArrayFromImage(field)
    recovered = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    lines = [f"{'':24}{'before':>8}{'after':>8}"]
    lines += [f"Dice {row['name']:<19}{row['dice_before']:8.3f}{row['dice_after']:8.3f}" for row in report["labels"]]
    lines.append(f"{'Dice, mean':<24}{report['mean_dice_before']:8.3f}{report['mean_dice_after']:8.3f}")
    lines.append(f"{'end-point error, mm':<24}{end_point_error(np.zeros_like(truth), truth, brain):8.2f}"
                 f"{end_point_error(recovered, truth, brain):8.2f}")
    lines.append(f"folding (det J <= 0): {report['folding_percent']:.4f} % of the brain; "
                 f"{report['seconds']['total']:.1f} s for the registration on {report['device']}")
    result = "\n".join(lines)
    (out / "README.txt").write_text(README.format(resolution=RESOLUTION_MM, gamma=GAMMA, model=report["model"],
                                                  refine=args.refine, result=result))
    print(result)
    print(f"files and their description: {out / 'README.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
