"""Write a model card (markdown) from a model file's own record, plus measured evaluation rows.

    python scripts/model_card.py MODEL.pt CARD.md [--evaluation results.md]
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

LIMITS = """\
- Trained on 24 LPBA40 subjects (one site, one scanner protocol, healthy young adults); other
  contrasts, children, large lesions, or images with skull will register worse: use `--refine`
  (instance optimisation adapts to the pair) or train your own model with `slicer-voxelmorph train`.
- The network sees images at 2 mm and predicts a velocity at 4 mm; structures smaller than a few
  millimetres are aligned by the refinement step, not by the network alone.
- Dice figures below are on validation subjects of the same data set, not on an independent test set."""


def render(record: dict, evaluation: str | None) -> str:
    """The card's markdown text."""
    t = record["training"]
    c = t["config"]
    v = record.get("validation", {})
    lines = [
        f"# Model card: {record['name']}",
        "",
        f"File `{record['name']}.pt`, content hash (SHA-256 of the weights, architecture, spacing and "
        f"normalisation) `{record['sha256']}`.",
        "",
        "## Data and split",
        "LPBA40 in delineation space (Shattuck et al., NeuroImage 2008): skull-stripped T1 MRIs, 56 labelled",
        "structures, 160x192x160 at 1 mm, already affinely aligned.",
        f"- training subjects ({len(t['train_subjects'])}): {', '.join(t['train_subjects'])}",
        f"- validation subjects ({len(t['val_subjects'])}): {', '.join(t['val_subjects'])}",
        f"- atlas (fixed image of atlas pairs): {t['atlas']}",
        "- test subjects S02..S10 were never on the training machine.",
        "",
        "## Preprocessing",
        f"Intensity: {record['normalisation']}. Images average-pooled to {record['spacing_mm']} mm for the network.",
        "",
        "## Architecture",
        f"VoxelMorph UNet `{c['features']}`, half-resolution flow head: {c['half_res']}, "
        f"scaling and squaring with {c['int_steps']} steps (diffeomorphic).",
        "",
        "## Training",
        f"- pairs: {c['mode']}-to-scan, {c['atlas_fraction']:.0%} of pairs to the atlas" if c["mode"] == "scan"
        else "- pairs: all to the atlas",
        f"- loss: NCC (window {c['ncc_window']}) + {c['smooth_weight']} x gradient smoothness of the velocity "
        f"+ {c['dice_weight']} x soft Dice on {c['dice_labels_per_iteration']} random labels per iteration",
        "- augmentation: " + ("small random affine on the moving image, gamma and noise on both"
                              if c["augment"] else "none"),
        f"- Adam, learning rate {c['lr']}, batch 1, seed {c['seed']}",
        f"- iterations: {t['iterations']}, training wall time {t['seconds'] / 3600:.2f} h on {t['hardware']}",
        f"- library versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}",
        "- command: see `training/lpba40/COMMAND` in the repository; resume with `--resume`.",
        "",
        "## Validation (during training, no affine, network only)",
        f"- mean Dice over labels, validation pairs to the atlas: {v.get('val_dice', float('nan')):.4f}",
        f"- % voxels with det J <= 0 in the brain: {v.get('val_folding_percent', float('nan')):.4f}",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation (measured with the full `register` pipeline)", evaluation.strip(), ""]
    lines += ["## Intended use", INTENDED_USE, "", "## Limits", LIMITS, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("card")
    parser.add_argument("--evaluation", help="markdown file with measured results to include")
    args = parser.parse_args()
    evaluation = Path(args.evaluation).read_text() if args.evaluation else None
    Path(args.card).write_text(render(read_model_file(args.model), evaluation))


if __name__ == "__main__":
    main()
