"""Write the bundled orientation template (SlicerVoxelMorphLib/bundled/orientation_template.nii.gz).

The MNI ICBM 2009a symmetric T1 template that ships inside nilearn (no download), through the same
``orientation.coarse_view`` the images are judged with (LPS order, normalised, smoothed, 6 mm), stored
as uint8 (255 = 1).

    python scripts/make_orientation_template.py
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nilearn.datasets import MNI152_FILE_PATH

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib.orientation import TEMPLATE, coarse_view


def main() -> int:
    view = coarse_view(sitk.ReadImage(str(MNI152_FILE_PATH)))
    stored = sitk.GetImageFromArray(np.round(np.clip(sitk.GetArrayViewFromImage(view), 0, 1) * 255).astype(np.uint8))
    stored.CopyInformation(view)
    sitk.WriteImage(stored, str(TEMPLATE), useCompression=True)
    print(f"{TEMPLATE}: {stored.GetSize()} voxels of {stored.GetSpacing()[0]} mm, {TEMPLATE.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
