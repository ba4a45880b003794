"""Write a model card (markdown) from a model file's own record, plus measured evaluation rows.

    python scripts/model_card.py MODEL.pt CARD.md [--evaluation results.md] [--run RUN]

The card is named after CARD (bundled/synth.md: model `synth`, file `synth.pt`); the training command
is that of the run the file came from (training/<run>/COMMAND: RUN, by default the run's folder name in its
record).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"))

from SlicerVoxelMorphLib.models import read_model_file

INTENDED_USE = """\
Deformable registration of two skull-stripped T1-weighted brain MRIs of adults, after the engine's
affine pre-alignment (on by default). Research use only: not a medical device, not validated for
clinical decisions."""

INTENDED_USE_SYNTH = """\
Deformable registration of two brain MRIs of adults, T1-, T2- or FLAIR-like, skull-stripped or with
skull and scalp, after the engine's affine pre-alignment (on by default). For inputs unlike these, use
`--accurate` (Slicer: Accurate mode). Research use only: not a medical device, not validated for
clinical decisions."""

SYNTHESIS = """\
  label maps: the 56 LPBA40 structures, each split into CSF / grey / white matter by 1D k-means of the
  subject's intensities in the brain (a structure its image blanked out, LPBA40's cerebellum: grey
  matter with a white core deeper than 7.5 mm, in runs started from 2026-12-08), plus CSF rim, skull and
  scalp layers of random thickness (1-8 mm each, smoothly varying) drawn around the brain in 60 % of
  images; each image: random affine (rotation +-10 deg, log-scale +-0.12, shear +-0.05) and a random
  stationary velocity field (SD up to 3 voxels at 1/8 resolution, integrated), CSF grown into
  neighbouring tissue in half of them (atrophy), one random intensity per tissue class (or per label,
  30 %) with per-structure jitter, Gaussian noise per label, blur (SD up to 1 voxel), bias field,
  resolution loss along one axis (30 %), gamma and noise; the moving and fixed maps are two subjects (or
  one, 20 %), each with its own contrast"""

LIMITS = """\
- Trained on 24 LPBA40 subjects (one site, one scanner protocol, healthy young adults); other
  contrasts, children, large lesions, or images with skull will register worse: use `--refine`
  (instance optimisation adapts to the pair) or train your own model with `slicer-voxelmorph train`.
- The network sees images at 2 mm and predicts a velocity at 4 mm; structures smaller than a few
  millimetres are aligned by the refinement step, not by the network alone.
- Dice figures below are on validation subjects of the same data set, not on an independent test set."""


LIMITS_SYNTH = """\
- The anatomy comes from 25 LPBA40 label maps (healthy young adults), widened by random deformations;
  contrasts and heads are synthetic. Real T2/FLAIR scans, children, large lesions (use a mask) and
  strong atrophy were not in training: check the result, and use `--accurate` when in doubt.
- {velocity}
- Two scans of the same head (follow-up, a deformed copy): the network alone does not recover their
  fine deformation; the default safety net recognises such pairs and refines them (whole-head proxy
  above), and `--model bundled` hands them to the `same_head` network (its card), trained on such pairs.
- The figures above are on LPBA40 validation subjects with remapped contrasts and synthetic heads, not on
  real other-contrast scans or an independent test set."""


INTENDED_USE_SAME_HEAD = """\
Two scans of one adult head, T1-, T2- or FLAIR-like, skull-stripped or with skull and scalp (a follow-up, a
rescan, a deformed copy), after the engine's affine pre-alignment. `--model bundled` (the default, and Slicer's
bundled model) hands a pair to this network when it takes it for two scans of one head (`same_head_score`);
`--model same_head` uses it for any pair. Not for two different subjects: it was never trained on them. Research
use only: not a medical device, not validated for clinical decisions."""

LIMITS_SAME_HEAD = """\
- Trained on 24 LPBA40 subjects (healthy young adults) under random smooth deformations of a few millimetres;
  heads and contrasts are synthetic. Real rescans differ by more than a deformation (noise, bias, motion,
  another protocol): check the result; the default safety net refines this network's field.
- Between two different subjects it aligns structures worse than the inter-subject default (validation
  above).
- The network sees images at 2 mm and predicts a velocity at 4 mm."""

RESCAN_PAIRS = """\
- {share:.0%} of iterations on two scans of one head (`variants.rescan_pair`): a real training image, with head
  layers (CSF rim, skull, scalp: random thickness 1-8 mm and brightness) drawn around the brain in 50 %, the
  contrast of both remapped the same way in 30 %, and a copy of it under a random smooth deformation (stationary
  velocity, SD 2 voxels, with a small affine: rotation +-2 deg, scale +-0.02, shear +-0.01, shift +-1 % of the
  half-extent); each scan then gets its own gamma and noise; loss: {weight} x the squared end-point error (voxels
  at the network level) against that known field inside the fixed head, plus the label and smoothness terms below
  (no image similarity)"""

KNOWN_PAIRS = """\
  of those, {share:.0%} drawn from one label map (head layers included) and a copy of it deformed by a
  random smooth field (no affine), each with its own contrast; loss: soft Dice + {weight} x the squared
  end-point error (voxels at the network level) against that known field inside the fixed head"""


def render(name: str, record: dict, evaluation: str | None, run: str | None = None) -> str:
    """The card's markdown text for the model called ``name``, trained by the run ``training/<run>`` (by default
    the run named in its record)."""
    t = record["training"]
    c = t["config"]
    rescan_only = c.get("rescan_fraction") == 1
    v = record.get("validation", {})
    lines = [
        f"# Model card: {name}",
        "",
        f"File `{name}.pt`, content hash (SHA-256 of the weights, architecture, spacing and "
        f"normalisation) `{record['sha256']}`.",
        "",
        "## Data and split",
        "LPBA40 in delineation space (Shattuck et al., NeuroImage 2008): skull-stripped T1 MRIs, 56 labelled",
        "structures, 160x192x160 at 1 mm, already affinely aligned.",
        f"- training subjects ({len(t['train_subjects'])}): {', '.join(t['train_subjects'])}",
        f"- validation subjects ({len(t['val_subjects'])}): {', '.join(t['val_subjects'])}",
        f"- atlas (fixed image of atlas pairs): {t['atlas']}" if t["atlas"] else "- no atlas: scan-to-scan only",
        "- test subjects S02..S10 were never on the training machine.",
        "",
        "## Preprocessing",
        f"Intensity: {record['normalisation']}. Images average-pooled to {record['spacing_mm']} mm for the network.",
        "",
        "## Architecture",
        f"VoxelMorph UNet `{c['features']}`, half-resolution flow head: {c['half_res']}, "
        f"scaling and squaring with {c['int_steps']} steps (diffeomorphic).",
        *([f"Two stages (`train --residual-stage`): the first is the frozen `--init-model` ({c['init_model']}); "
           "the second, the same UNet, sees the moving image warped by the first stage's field and adds a velocity "
           "correction, so the result is still one stationary velocity field."]
          if c.get("residual_stage") and not c.get("fine_stage") else []),
        *([f"Three stages (`train --residual-stage --fine-stage`): the first two are "
           f"{'those of' if c.get('all_stages') else 'the frozen'} `--init-model` ({c['init_model']}); "
           f"the third, a `vm1` UNet at full resolution ({record['spacing_mm']} mm, no "
           "half-resolution head), sees "
           "the moving image warped by the first two stages' field and adds a velocity correction to their "
           "velocity upsampled to its grid: still one stationary velocity field."
           + (" All three were fine-tuned together (`--all-stages`)." if c.get("all_stages") else "")]
          if c.get("fine_stage") else []),
        "",
        "## Training",
        *([f"- {c['synth_fraction']:.0%} of iterations on pairs synthesised from the label maps "
           "(SynthMorph-style; loss: soft Dice of 16 random brain structures + smoothness, no image similarity):",
           SYNTHESIS,
           *([KNOWN_PAIRS.format(share=c["known_fraction"], weight=c["field_weight"])]
             if c.get("known_fraction") else []),
           *([f"- in {c['csf_expansion']:.0%} of the synthesised label maps tissue pushed away from the CSF by a "
              "random amount (wider ventricles and sulci, as in older brains)"] if c.get("csf_expansion") else []),
           (f"- warm start: {c['init_model']}; all stages train together, end to end" if c.get("all_stages") else
            f"- first two stages, and the start of the third's encoder and decoder: {c['init_model']}; "
            "only the third stage trains" if c.get("fine_stage") else
            f"- first stage, and the start of the second: {c['init_model']}; only the second stage trains"
            if c.get("residual_stage") else f"- warm start: {c['init_model']}"),
           f"- the other {1 - c['synth_fraction']:.0%}: real pairs as below"]
          if c.get("synth_fraction") else []),
        *([RESCAN_PAIRS.format(share=c["rescan_fraction"], weight=c["field_weight"])]
          if c.get("rescan_fraction") else []),
        *([f"- warm start: {c['init_model']}"] if rescan_only and c.get("init_model") else []),
        *([f"- label and smoothness terms: {c['smooth_weight']} x gradient smoothness of the velocity + "
           f"{c['dice_weight']} x soft Dice on {c['dice_labels_per_iteration']} random labels per iteration"]
          if rescan_only else [
            "- pairs: all to the atlas" if c["mode"] == "atlas" else
            f"- pairs: scan-to-scan, {c['atlas_fraction']:.0%} of pairs to the atlas" if t["atlas"] else
            "- pairs: scan-to-scan between training subjects",
            f"- loss: {c['ncc_weight']} x NCC (window {c['ncc_window']}) + {c['smooth_weight']} x gradient smoothness "
            "of the velocity "
            f"+ {c['dice_weight']} x soft Dice on {c['dice_labels_per_iteration']} random labels per iteration"]),
        *([f"- in {c['fill_blanked']:.0%} of real pairs the structures the images blanked out (LPBA40's cerebellum) "
           "drawn in on both images (`variants.fill_blanked`: grey cortex, white core and random white branches at "
           "each image's grey and white matter levels)"] if c.get("fill_blanked") else []),
        *([f"- every pair, synthesised and real: + {c['tissue_weight']} x the soft Dice of the brain's tissue "
           "classes (`synth.tissue_map`: CSF inside and outside the labelled structures, grey and white matter)"]
          if c.get("tissue_weight") else []),
        *([] if rescan_only else ["- augmentation: " + ("small random affine on the moving image, gamma and noise "
                                                        "on both" if c["augment"] else "none")]),
        f"- Adam, learning rate {c['lr']}, batch 1, seed {c['seed']}",
        f"- iterations: {t['iterations']}, training wall time {t['seconds'] / 3600:.2f} h on {t['hardware']}",
        f"- library versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}",
        f"- command: see `training/{run or record['name']}/COMMAND` in the repository; resume with `--resume`.",
        "",
        "## Validation (during training, no affine, network only, at the iteration of this file)",
        f"- mean Dice over labels, validation pairs "
        f"{'to the atlas' if t['atlas'] else '(each validation subject to the next)'}: "
        f"{v.get('val_dice', float('nan')):.4f}",
        *[f"- the same with {kind} moving images: {v[f'val_dice_{kind}']:.4f}"
          for kind in ("inverted", "t2", "flair", "monotone", "nonmonotone") if f"val_dice_{kind}" in v],
        *([f"- the same with a synthetic head on both: {v['val_dice_head']:.4f}",
           *([f"- the same with the blanked cerebellum drawn into both: {v['val_dice_cerebellum']:.4f}"]
             if "val_dice_cerebellum" in v else []),
           f"- worst of these (the selection criterion): {v['val_worst']:.4f}"] if "val_worst" in v else []),
        f"- % voxels with det J <= 0 in the brain: {v.get('val_folding_percent', float('nan')):.4f}",
        *([f"- whole-head proxy (a validation subject with a synthetic head and a copy deformed by a known "
           f"smooth field, largest 6 mm): mean end-point error inside the head {v['val_head_epe_mm']:.2f} mm"]
          if "val_head_epe_mm" in v else []),
        "",
    ]
    if evaluation:
        lines += ["## Evaluation (measured with the full `register` pipeline)", evaluation.strip(), ""]
    synthetic = bool(c.get("synth_fraction"))
    if rescan_only:
        return "\n".join([*lines, "## Intended use", INTENDED_USE_SAME_HEAD, "", "## Limits", LIMITS_SAME_HEAD, ""])
    velocity = ("The network sees images at 2 mm; its first two stages predict a velocity at 4 mm, the third "
                "corrects it at 2 mm." if c.get("fine_stage") else
                "The network sees images at 2 mm and predicts a velocity at 4 mm.")
    lines += ["## Intended use", INTENDED_USE_SYNTH if synthetic else INTENDED_USE, "", "## Limits",
              LIMITS_SYNTH.format(velocity=velocity) if synthetic else LIMITS, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("card")
    parser.add_argument("--evaluation", help="markdown file with measured results to include")
    parser.add_argument("--run", help="the training run's folder under training/ (default: the name in the record)")
    args = parser.parse_args()
    evaluation = Path(args.evaluation).read_text() if args.evaluation else None
    Path(args.card).write_text(render(Path(args.card).stem, read_model_file(args.model), evaluation,
                                            args.run))


if __name__ == "__main__":
    main()
