"""The bundled model on a real LPBA40 pair (held-out validation subject to the atlas).

Skips cleanly without ../shared/data/LPBA40 or without a bundled model in the checkout.
"""

import pytest
import SimpleITK as sitk

from conftest import SHARED
from SlicerVoxelMorphLib.models import BUNDLED
from SlicerVoxelMorphLib.register import register

pytestmark = pytest.mark.skipif(not SHARED.is_dir() or not BUNDLED.is_file(),
                                reason="needs ../shared/data/LPBA40 and the bundled model")


def test_bundled_model_registers_a_held_out_subject_to_the_atlas():
    def read(path: str) -> sitk.Image:
        return sitk.ReadImage(str(SHARED / path))

    result = register(read("fixed.nii.gz"), read("train/S40.delineation.skullstripped.nii.gz"),
                      fixed_labels=read("label/S01.delineation.structure.label.nii.gz"),
                      moving_labels=read("label/S40.delineation.structure.label.nii.gz"), model="bundled")
    report = result.report
    assert len(report["labels"]) == 56
    assert report["mean_dice_after"] > report["mean_dice_before"] + 0.08
    assert report["folding_percent"] < 0.05
