"""The registration pipeline: affine, working grid, network, refinement, one displacement field, metrics."""

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import images, losses, metrics
from .devices import autocast, network_dtype, pick_device, weight_layout
from .errors import InputError
from .inputs import CheckedInputs, check_inputs
from .layers import (
    SpatialTransformer,
    affine_on_grid,
    compose_flows,
    displacement_from_velocity,
    downsample,
    identity_grid,
    sample_at,
    sample_on_grid,
)
from .models import load_model, resolve_model, same_head_model, trained_on_one_head_pairs, versions
from .orientation import AnatomyOrientation, PairOrientation, pair_orientations
from .preprocess import (
    WORKING_SPACING_MM,
    Alignment,
    WorkingPair,
    align,
    background_value,
    foreground_mask,
    level_factor,
    working_pair,
)
from .refine import (
    SAME_CONTRAST_CORRELATION,
    SIMILARITIES,
    Refiner,
    intensity_correlation,
    mask_interior,
    mind_ssc,
    same_head_score,
)

NO_MODEL_FACTOR = 2  # without a model, refinement works on images at 2 mm ...
COARSE_VELOCITY = 2  # ... and a velocity grid twice coarser still
# --accurate: chosen on the LPBA40 validation pairs S35..S40 -> S01 (network 0.720 mean Dice): Adam at lr 0.02
# with a light regulariser (0.1) gains 2 points in 30 steps (0.741); lr 0.1 or smoothness 1 gained
# little or lost, 50-100 steps no more than 30, lr 0.03 folded more (see README, "Accurate mode"). Pairs of two
# contrasts (MIND-SSC): neighbours 1 voxel apart (2 mm at the network level) instead of 2, S35..S40 -> S01 with the
# moving image remapped: T2-like 0.6894 -> 0.6939 (every subject gained; ANTs SyN 0.6924), FLAIR-like 0.7011 ->
# 0.7022, non-monotone 0.6588 -> 0.6634, inverted 0.6694 -> 0.6665; both dilations at once: T2-like 0.6928,
# inverted 0.6697; with dilation 1, 50 steps or lr 0.03 lost again on T2-like (0.690, 0.689), 20 steps 0.692
ACCURATE = {"steps": 30, "velocity_factor": 1, "window": 5, "smooth_weight": 0.1, "lr": 0.02, "tolerance": 1e-4,
            "mind_dilation": 1}
# without a model, and when the safety net finds the network's result unusable, the optimisation has to
# travel further: larger steps, more of them, a stronger regulariser (the earlier accurate preset)
RESCUE = {"steps": 100, "velocity_factor": 1, "window": 5, "smooth_weight": 1.0, "lr": 0.1, "tolerance": 1e-4}
# two scans of one head: the bending energy instead of the gradient penalty, which continues a smooth deformation
# through texture-free tissue (skull, scalp) instead of pulling it towards zero there. Whole-head proxy
# (benchmarks/head_field.py), S35, S36, S37 from the identity: the rescue preset 0.645, 0.64, 0.64 mm; bending 0.3
# at lr 0.1: 0.441, 0.435, 0.440; bending 1.0: 0.490, 0.483, 0.479; on S35 bending 0.1 0.530, 0.03 0.709. Bending 3
# and 10 at lr 0.1 on S35, and 0.3 at lr 0.1 on the 48^3 phantom of the tests, made Adam diverge (the identity was
# kept); at lr 0.05 the phantom converges (0.44 mm, gradient penalty 0.49) and S35 reaches 0.467 in 100 steps, 0.440
# in 135 of up to 150. L-BFGS (strong Wolfe line search) instead of Adam, S35, S36, S37 from the identity, one loss
# evaluation costing what an Adam step does (1 thread, /tmp probes, 2026-12-04): Adam's 138, 111, 113 steps (early
# stop) 0.513, 0.513, 0.506 mm in 31, 25, 24 s of refinement; L-BFGS' 70 evaluations 0.507, 0.515, 0.510 mm in 16,
# 16, 15 s (on S35: 40 evaluations 0.563 mm, 60 0.512, 80 0.493)
SAME_HEAD = {**RESCUE, "steps": 70, "optimizer": "lbfgs", "smooth_weight": 0.0, "bending_weight": 0.3}
# Fast mode polishes the network's result of a pair of one contrast with three Adam steps of the accurate preset at
# a larger learning rate: about 0.7 s on 2 CPU cores. Chosen on training subjects S11, S14, S17, S20, S23, S26 -> S01
# (a /tmp probe of register(refine_steps=N) with the accurate preset's lr replaced, 2026-12-04, bundled synth_fine;
# mean Dice over the 56 structures / the tissue labels of benchmarks/generalisation.py / its grey matter): network
# 0.760 / 0.674 / 0.683; lr 0.02 (the accurate preset's) 5 steps 0.767 / 0.688 / 0.710; lr 0.05 3 steps 0.768 /
# 0.692 / 0.719, 5 steps 0.769 / 0.697 / 0.733; lr 0.07 3 steps 0.768 / 0.695 / 0.727, 4 steps 0.768 / 0.698 /
# 0.736; lr 0.1 3 steps 0.767 / 0.697 / 0.736, 4 steps 0.767 / 0.700 / 0.745, 5 steps 0.767 / 0.702 / 0.753;
# L-BFGS 6 evaluations 0.763 / 0.681 / 0.696; no folding in any
POLISH = {**ACCURATE, "steps": 3, "lr": 0.1, "patience": 3}
# pairs of two contrasts (MIND-SSC): the accurate preset's schedule at a larger learning rate reaches further in two
# thirds of its steps. Training subjects as for POLISH, moving image T2-like (variants.py), a /tmp probe of
# register(refine_steps=N) without early stopping, 2026-12-04 (structures / tissue labels / grey matter, refinement
# seconds on 2 busy cores): lr 0.02 (the accurate preset) 30 steps 0.702 / 0.644 / 0.660 in 10.3 s; lr 0.05 12
# steps 0.696 / 0.642 / 0.657 in 4.4 s, 20 steps 0.704 / 0.647 / 0.668 in 6.9 s; lr 0.1 8 steps 0.694 / 0.643 /
# 0.660 in 3.1 s; no folding in any
TWO_CONTRASTS = {**ACCURATE, "steps": 20, "lr": 0.05, "patience": 20}
# the network's result is refined with the accurate preset when it lowers the MIND-SSC distance of the affinely
# aligned pair to more than this fraction (network / affine only): LPBA40 T1 pairs, bundled model (/tmp probes,
# 2026-12-02): S11..S34 -> S01 0.654-0.803, S35..S40 -> S01 0.720-0.785 (FLAIR-like 0.735-0.786, monotone curve
# 0.724-0.789), S01 -> S35..S40 0.647-0.777, S35..S40 scan to scan 0.616-0.770; S35..S40 -> S01 with a synthetic
# head on both 0.827-0.943, where the network alone reaches a mean Dice of 0.661 and the accurate preset 0.713.
# Midway between 0.803 and 0.827. A pair flagged wrongly costs seconds, not accuracy (plain: 0.729 -> 0.740).
# With the head variant corrected (commit 76818d9): 0.834-0.939, network alone 0.676, default settings 0.705.
WEAK_NETWORK_RATIO = 0.815
# the safety net compares descriptors on every other voxel of the network level (4 mm apart): the same
# decisions on the LPBA40 validation pairs, their contrast and head variants, as on every voxel
ALIGNMENT_STRIDE = 2
# two scans of one head (a follow-up, a deformed copy) are told from two brains by ``same_head_score`` after the
# affine: LPBA40 S35..S37 against a copy under a smooth field (largest 6 mm), with and without a synthetic head,
# with and without noise and bias: 0.926-0.969; S11..S40 to the atlas S01: 0.754-0.866 (S35..S37 with synthetic
# heads on both: 0.627-0.707; with the head variant corrected in commit 76818d9: S35..S40 against deformed copies
# with a head 0.935-1.061, heads of two subjects 0.600-0.741, a head against another subject's skull-stripped brain,
# judged inside the masks, 0.648-0.847). The network, trained on different subjects, does not recover such a pair's
# deformation (S35, S36: mean end-point error 2.18 -> 2.31 mm in the brain); refinement does (SAME_HEAD), so such
# pairs are refined, and the default model hands them to a network trained on such pairs only (bundled/same_head.md).
# Refinement from its field (iteration 2250) or from the identity, S35 of head_field.py, 70 L-BFGS evaluations, 1 thread
# beside a training run (/tmp probe, 2026-12-04): 0.500 mm in 36 s against 0.507 mm in 39 s; 35 from its field 0.570.
SAME_HEAD_SCORE = 0.90
# two contrasts (intensity correlation of the affinely aligned pair at or below SAME_CONTRAST_CORRELATION, where the
# refinement would pick MIND-SSC): the network alone reaches less than on one contrast (LPBA40 S35..S40 -> S01,
# moving image remapped: T2-like 0.665, inverted 0.620, non-monotone 0.625, against 0.729 plain), the accurate
# preset more (0.694, 0.667, 0.663), so Fast mode refines such pairs (now with TWO_CONTRASTS). Flagged
# (benchmarks/generalisation.py variants):
# inverted and T2-like 6 of 6, non-monotone 5, FLAIR-like 4, plain, monotone and synthetic head 0.
TAPER_MM = 20.0  # outside the working grid the deformation fades to zero over this distance
SLAB_VOXELS = 2_000_000  # the composed field is computed this many voxels of the fixed grid at a time


@dataclass
class RegistrationResult:
    """Everything ``register`` produces; images are on the fixed image's grid."""

    warped: sitk.Image
    displacement: sitk.Image  # vector float32, LPS mm: fixed point x maps to x + u(x) in the moving image
    jacobian: sitk.Image
    warped_labels: sitk.Image | None
    report: dict = field(default_factory=dict)
    inverse_displacement: sitk.Image | None = None  # on the moving grid: moving point y maps to y + w(y)


class _Clock:
    """Seconds per stage, and progress reporting."""

    def __init__(self, progress: Callable[[str, float], None] | None) -> None:
        self.progress = progress or (lambda stage, fraction: None)
        self.seconds: dict[str, float] = {}
        self.stage, self.start = "", time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.stop()
        self.stage, self.start = stage, time.perf_counter()
        self.progress(stage, 0.0)

    def stop(self) -> None:
        if self.stage:
            self.seconds[self.stage] = round(time.perf_counter() - self.start, 3)
            self.progress(self.stage, 1.0)
        self.stage = ""


def _label_names(ids: list[int], names: dict[int, str] | None) -> dict[int, str]:
    names = names or {}
    return {i: names.get(i, f"label {i}") for i in ids}


def register(fixed: sitk.Image, moving: sitk.Image, *, fixed_labels: sitk.Image | None = None,
             moving_labels: sitk.Image | None = None, label_names: dict[int, str] | None = None,
             model: str | None = "bundled", device: str = "auto", refine_steps: int = 0, accurate: bool = False,
             similarity: str = "auto", auto_refine: bool = True, affine: bool = True,
             affine_transform: sitk.AffineTransform | None = None, inverse: bool = False,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None, smoothness: float = 1.0,
             fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
             progress: Callable[[str, float], None] | None = None, checked: CheckedInputs | None = None,
             working: WorkingPair | None = None, polish: bool = True, precision: str = "auto") -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (any 3D scalar images, any geometry); inputs are not modified.

    Refinement: ``accurate`` (the ACCURATE preset; RESCUE without a model, SAME_HEAD for two scans of one head,
    see SAME_HEAD_SCORE, TWO_CONTRASTS for two contrasts) or ``refine_steps`` steps with the same settings,
    ``similarity`` 'auto', 'ncc' or 'mind';
    with ``auto_refine`` the network's result is refined with SAME_HEAD when the pair looks like two scans of one
    head, with TWO_CONTRASTS when its contrasts differ, with RESCUE when it does not improve on the affine alignment
    (a warning says so). With ``polish`` (Fast mode) the network's result of a pair of one contrast (not two
    scans of one head) that nothing else refines gets the POLISH preset's three steps (report: ``polished``);
    without it, and without the above, the result
    is the network's alone. With the default model ('bundled') a pair that looks like two scans of one
    head is registered by the bundled network trained on such pairs (``models.same_head_model``), whose field the
    SAME_HEAD refinement continues (so does that of ``--model same_head``); with a network trained on different
    subjects it starts from the identity.
    The working grid's axes follow the fixed brain's anatomy whatever its header says, and when the two headers
    disagree about where the anatomy lies the affine starts from the turn between them (``orientation``).
    Masks (binary, on their image's grid) hide what is outside them from the affine metric, the network and the
    refinement similarity (lesions, skull, electrodes); the working grid and the metrics follow the
    fixed mask. ``smoothness`` scales the refinement's regulariser (higher: smoother, less folding).
    ``precision``: 'auto' runs the network's convolutions in bfloat16 on a CPU that computes it natively
    (``devices.network_dtype``; report: ``precision``), 'float32' always in float32.
    Landmarks ``fixed_points`` / ``moving_points`` (N x 3, LPS mm, matched by row) give the target
    registration error before (identity) and after, per point and mean, in the report.
    ``affine_transform``: the affine already found for this pair (``preprocess.affine_align``, fixed to
    moving points), used instead of the affine stage (whatever ``affine`` says). Callers that did the
    torch-free stages already (the command line, while torch imports) hand over ``checked``
    (``inputs.check_inputs`` of these inputs) and ``working`` (``preprocess.working_pair`` of these
    images and the checked masks, or of what ``preprocess.align`` gave): its transform and masks replace the
    affine stage and the head check, and it is rebuilt with them when its spacing is not the model's. The
    result lives on the fixed image's grid; with ``inverse`` also the inverse field on the moving image's grid
    (velocity integrated backwards, inverse affine).
    ``progress(stage, fraction)`` is called often; it may raise ``errors.Cancelled`` to stop.
    Bad input raises ``errors.InputError``.
    """
    clock = _Clock(progress)
    clock("check")
    if refine_steps < 0:
        raise InputError(f"refine steps must be >= 0, not {refine_steps}")
    if similarity not in SIMILARITIES:
        raise InputError(f"similarity must be one of {', '.join(SIMILARITIES)}, not {similarity!r}")
    torch_device = pick_device(device)
    dtype = network_dtype(torch_device, precision)
    checked = checked or check_inputs(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                      fixed_mask=fixed_mask, moving_mask=moving_mask, smoothness=smoothness,
                                      fixed_points=fixed_points, moving_points=moving_points)
    fixed_labels, moving_labels = checked.fixed_labels, checked.moving_labels
    fixed_mask, moving_mask = checked.fixed_mask, checked.moving_mask
    fixed_ids, moving_ids, ids = checked.fixed_ids, checked.moving_ids, checked.shared_ids
    model_path = resolve_model(model)
    net, record = load_model(model_path) if model_path is not None else (None, {})

    if working is not None:  # as the caller built it: its transform and masks
        clock("affine")
        aligned = working.alignment or Alignment(working.transform, fixed_mask, moving_mask, None)
        orientations = aligned.orientations
    else:  # headers that disagree about where the anatomy lies: the affine starts from their turn
        clock("orientation")
        orientations = pair_orientations(fixed, moving, both=affine and affine_transform is None)
        clock("affine")
        aligned = align(fixed, moving, clock.progress, fixed_mask, moving_mask, affine, affine_transform,
                        orientations)
    transform = aligned.transform
    anatomy = working.anatomy if working is not None else orientations.fixed
    if orientations is not None and orientations.turn is not None:
        warnings.warn("the two images' headers disagree about where the anatomy lies (the moving brain is turned by "
                      f"{orientations.turn_degrees():.0f} degrees against the fixed one): the affine alignment starts "
                      "from that turn", RuntimeWarning, stacklevel=2)
    if aligned.head_side is not None:
        warnings.warn(f"the {aligned.head_side} image shows a head (skull, scalp) around a brain that the other shows "
                      "skull-stripped: aligning and registering the brains only (the other's outline masks it)",
                      RuntimeWarning, stacklevel=2)
    views = ((aligned.moving_view_share, "moving", "fixed"), (aligned.fixed_view_share, "fixed", "moving"))
    for shown, side, other in views:
        if shown is not None:
            warnings.warn(f"the {side} image shows {100 * shown:.0f} % of what the {other} one does (its field of "
                          "view): registering the part both show; outside it the deformation fades out",
                          RuntimeWarning, stacklevel=2)

    spacing = record.get("spacing_mm", NO_MODEL_FACTOR * WORKING_SPACING_MM)
    factor = level_factor(spacing)
    rebuild = working is None or working.spacing_mm != spacing
    if rebuild and anatomy is None:
        anatomy = AnatomyOrientation().execute(fixed)
    clock("resample")
    if rebuild:
        working = working_pair(fixed, moving, transform, spacing, aligned.fixed_mask, aligned.moving_mask, aligned,
                               anatomy)
    if anatomy is not None and not anatomy.header_is_right:
        warnings.warn("the fixed image's header does not tell its anatomy's directions right (the brain lies turned "
                      "against them): the network sees it the right way round; the outputs keep the header's "
                      "geometry", RuntimeWarning, stacklevel=2)
    grid, fixed_foreground = working.grid, working.fixed_foreground
    f, m = (torch.from_numpy(a)[None, None] for a in (working.fixed, working.moving))
    masks = [None if a is None else torch.from_numpy(a)[None, None] for a in (working.fixed_mask, working.moving_mask)]

    def preset(values: dict) -> dict:
        weights = {name: values.get(name, 0.0) * smoothness for name in ("smooth_weight", "bending_weight")}
        return {**values, **weights, "similarity": similarity}

    f_small, m_small = downsample(f, factor), downsample(m, factor)  # the network's image level
    small_masks = [None if mask is None else (downsample(mask, factor) > 0.5).float() for mask in masks]
    same_head, correlation = None, None
    if net is not None:
        clock("network")  # the network stage starts with these checks of the pair
        # prepared images are 0 outside their masks: judged on the outline alone, two brains in one mask (the
        # head's mask is the other image's brain outline) would match like one head, so only the inside counts
        given = [mask for mask in small_masks if mask is not None]
        region = mask_interior(torch.stack(given).prod(0)) if given else None
        score = same_head_score(m_small, f_small, region)
        same_head = {"score": round(score, 3), "detected": score >= SAME_HEAD_SCORE}
        correlation = intensity_correlation(m_small, f_small)
    one_head = same_head is not None and same_head["detected"]
    # two scans of one head: with the default model, the network trained on such pairs registers them (same image
    # level: both work at 2 mm); the field of a network trained on different subjects is no better than none, so
    # refinement then starts from the identity
    pair_model = same_head_model(model) if one_head else None
    if pair_model is not None:
        net, record = load_model(pair_model)
    for_one_head = one_head and trained_on_one_head_pairs(record)
    if for_one_head:
        same_head["model"] = record.get("name")
    from_identity = one_head and not for_one_head
    two_contrasts = correlation is not None and correlation <= SAME_CONTRAST_CORRELATION
    settings = preset(SAME_HEAD if one_head else RESCUE if net is None else TWO_CONTRASTS if two_contrasts
                      else ACCURATE)
    auto_reason = None
    if accurate:
        refiner = Refiner(**settings)
    elif refine_steps > 0:  # experts' --refine N: N Adam steps (no early stop), or at most N L-BFGS evaluations
        refiner = Refiner(**{**settings, "steps": refine_steps, "patience": refine_steps})
    elif auto_refine and one_head:
        start = ("the network trained on such pairs registers them, then its field is refined" if for_one_head else
                 "the network, trained on different subjects, does not recover their deformation; refining it from "
                 "the identity")
        warnings.warn(f"the images look like two scans of one head (score {same_head['score']:.2f}): {start} "
                      "(image similarity, bending-energy regulariser)", RuntimeWarning, stacklevel=2)
        refiner, auto_reason = Refiner(**settings), "same head"
    elif auto_refine and two_contrasts:
        warnings.warn(f"the images have different contrasts (intensity correlation {correlation:.2f}), where the "
                      "network alone is less accurate; refining (MIND-SSC)", RuntimeWarning, stacklevel=2)
        refiner, auto_reason = Refiner(**settings), "two contrasts"
    else:
        refiner = None
    fallbacks = (Refiner(**preset(RESCUE)), Refiner(**preset(ACCURATE))) if auto_refine else None
    polisher = Refiner(**preset(POLISH)) if polish and not (one_head or two_contrasts) else None
    deformed = None
    try:
        deformed = _deform(net, record, f_small, m_small, refiner, fallbacks, torch_device, clock, inverse,
                           small_masks, from_identity, polisher, dtype)
    except RuntimeError as error:
        if not out_of_device_memory(error):
            raise
    if deformed is None:  # retried outside the handler, so that the failed attempt's tensors are freed first
        warnings.warn("CUDA ran out of memory; running on the CPU instead", RuntimeWarning, stacklevel=2)
        torch.cuda.empty_cache()
        deformed = _deform(net, record, f_small, m_small, refiner, fallbacks, torch.device("cpu"), clock, inverse,
                           small_masks, from_identity, polisher, network_dtype(torch.device("cpu"), precision))
    flow, inverse_flow, used, deform_report = deformed
    if auto_reason is not None:
        deform_report.update(auto_refined=True, auto_refine_reason=auto_reason)

    clock("compose")
    coarse = images.downsampled_grid(grid, factor)
    displacement = compose(flow, coarse, transform, fixed)
    inverse_displacement = compose_inverse(inverse_flow, coarse, transform, moving) if inverse else None

    clock("warp")
    fill = background_value(sitk.GetArrayViewFromImage(moving))  # outside the moving image: its background
    warped = images.warp_on_field_grid(moving, displacement, sitk.sitkLinear, fill, sitk.sitkFloat32)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = images.warp_on_field_grid(moving_labels, displacement, sitk.sitkNearestNeighbor, 0,
                                                  sitk.sitkInt32)

    clock("metrics")
    vectors = sitk.GetArrayViewFromImage(displacement)
    det = metrics.jacobian_determinant(vectors, images.index_to_physical(fixed)[:3, :3])
    jacobian = sitk.GetImageFromArray(det)
    jacobian.CopyInformation(fixed)
    mask = (sitk.GetArrayViewFromImage(fixed_labels) > 0) if fixed_labels is not None else fixed_foreground
    if fixed_mask is not None:
        mask = mask & (sitk.GetArrayViewFromImage(fixed_mask) > 0)
    report = {
        "device": str(used), "model": record.get("name", "none"), "model_sha256": record.get("sha256"),
        "refine_steps": refine_steps, "accurate": accurate, "affine": affine or affine_transform is not None,
        **deform_report,
        **({"same_head": same_head} if same_head is not None else {}),
        **({"intensity_correlation": round(correlation, 3)} if correlation is not None else {}),
        **({"head_masked": aligned.head_side} if aligned.head_side is not None else {}),
        **({"moving_view_share": round(aligned.moving_view_share, 3)} if aligned.moving_view_share is not None else {}),
        **({"fixed_view_share": round(aligned.fixed_view_share, 3)} if aligned.fixed_view_share is not None else {}),
        **({"orientation": (orientations or PairOrientation(anatomy)).as_report()} if anatomy is not None else {}),
        "affine_matrix_lps": images.affine_matrix(transform).round(6).tolist(),
        "working_grid": {"size": list(grid.GetSize()), "spacing_mm": list(grid.GetSpacing()),
                         "origin_lps": list(grid.GetOrigin()), "direction_lps": list(grid.GetDirection())},
        "folding_percent": metrics.folding_percent(det, mask),
        "std_log_jacobian": metrics.std_log_jacobian(det, mask),
        "versions": versions(),
    }
    if inverse_displacement is not None:
        moving_region = (sitk.GetArrayViewFromImage(moving_labels) > 0) if moving_labels is not None \
            else foreground_mask(moving)
        report["inverse_round_trip"] = {
            "fixed_points": round_trip_error(displacement, inverse_displacement, mask),
            "moving_points": round_trip_error(inverse_displacement, displacement, moving_region)}
    if fixed_points is not None:
        report["landmarks"] = landmark_errors(fixed_points, moving_points, displacement)
    if fixed_labels is not None:
        report.update(_dice_report(fixed_labels, moving_labels, warped_labels, fixed, ids, label_names))
        report["labels_only_in_fixed"] = sorted(set(fixed_ids) - set(ids))
        report["labels_only_in_moving"] = sorted(set(moving_ids) - set(ids))
    clock.stop()
    report["seconds"] = {**clock.seconds, "total": round(sum(clock.seconds.values()), 3)}
    return RegistrationResult(warped, displacement, jacobian, warped_labels, report, inverse_displacement)


def out_of_device_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is the GPU running out of memory: torch's OutOfMemoryError, or cuDNN failing to allocate
    its workspace (a plain RuntimeError)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDNN_STATUS_ALLOC_FAILED" in str(error)


def _deform(net, record: dict, fixed: torch.Tensor, moving: torch.Tensor, refiner: Refiner | None,
            fallbacks: tuple[Refiner, Refiner] | None, device: torch.device, clock: _Clock, inverse: bool = False,
            masks: list[torch.Tensor | None] | None = None, from_identity: bool = False,
            polisher: Refiner | None = None,
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray | None, torch.device, dict]:
    """Network prediction and optional refinement of ``fixed`` and ``moving`` at the network's image level
    (the working grid downsampled by the model's factor, as are the 0/1 ``masks``); returns the
    displacement (3, d, h, w) in voxels of that level, with ``inverse`` that of the inverse (the velocity
    integrated backwards), and a report.

    Refinement works on a velocity grid twice coarser than the level, where a half-resolution network puts its
    velocity and the presets were chosen: it continues from that velocity; from a full-resolution one (a fine
    stage) it optimises a correction from zero, applied before the network's deformation (the moving image
    warped by the network is what it sees); without a network it starts from zero, as with ``from_identity``
    (the network's result is then only reported). A network result that aligns the pair no better than the
    affine alone (MIND-SSC distance) is refined with the first of ``fallbacks`` when they are given, one that
    improves on it less than the network does on its training data (WEAK_NETWORK_RATIO) with the second; a
    network result that nothing refines is refined by ``polisher`` when one is given. The network runs under
    autocast to ``dtype`` when one is given (None: float32).
    """
    fixed_small, moving_small = fixed.to(device), moving.to(device)
    fixed_mask, moving_mask = (None if mask is None else mask.to(device) for mask in (masks or [None, None]))
    size = tuple(fixed_small.shape[2:])
    int_steps = record.get("config", {}).get("int_steps", 7)
    info: dict = {}
    if net is not None:
        with torch.no_grad():
            net = net.to(device, memory_format=weight_layout(device))
            with autocast(device, dtype):
                velocity = net.velocity(moving_small, fixed_small).contiguous()
            info["precision"] = str(dtype or torch.float32).removeprefix("torch.")
            flow = displacement_from_velocity(velocity, size, int_steps)
            descriptors = mind_ssc(moving_small), mind_ssc(fixed_small)  # for both alignment checks
            info["alignment"] = alignment(*descriptors, flow)
        ratio = info["alignment"]["network"] / max(info["alignment"]["affine_only"], 1e-12)
        info["alignment"]["ratio"] = round(ratio, 4)
        if refiner is None and fallbacks is not None and ratio >= 1:
            warnings.warn("the network did not improve on the affine alignment of this pair (inputs unlike its "
                          "training data?): refining with the rescue preset", RuntimeWarning, stacklevel=3)
            refiner = fallbacks[0]
            info.update(auto_refined=True, auto_refine_reason="network no better than the affine")
        elif refiner is None and fallbacks is not None and ratio > WEAK_NETWORK_RATIO:
            warnings.warn(f"the network improved the alignment of this pair less than on its training data "
                          f"(distance ratio {ratio:.2f}): refining with the accurate preset", RuntimeWarning,
                          stacklevel=3)
            refiner = fallbacks[1]
            info.update(auto_refined=True, auto_refine_reason="network weaker than on its training data")
        if refiner is None and polisher is not None:
            refiner = polisher
            info["polished"] = True
    else:
        velocity = torch.zeros(1, 3, *[n // COARSE_VELOCITY for n in size], device=device)
        flow = torch.zeros(1, 3, *size, device=device)
    base = None  # the network's deformation, when the refinement corrects it instead of its velocity
    if refiner is not None:
        clock("refine")
        coarse = [n // COARSE_VELOCITY for n in size]
        if from_identity:
            velocity = torch.zeros(1, 3, *coarse, device=device)
        elif list(velocity.shape[2:]) != coarse:  # a full-resolution last stage: refined where the presets were
            # chosen (integration a fifth of the cost), by a correction applied before the network's deformation
            base, base_velocity = flow, velocity
            warp = SpatialTransformer()
            moving_small = warp(moving_small, base)
            moving_mask = None if moving_mask is None else warp(moving_mask, base)
            velocity = torch.zeros(1, 3, *coarse, device=device)
        velocity, info["refinement"] = replace(refiner, int_steps=int_steps).execute(
            velocity, moving_small, fixed_small, clock.progress, fixed_mask, moving_mask)
        with torch.no_grad():
            flow = displacement_from_velocity(velocity, size, int_steps)
            if base is not None:
                flow = compose_flows(flow, base)
            if net is not None:
                info["alignment"]["refined"] = alignment(*descriptors, flow)["network"]
    backward = None
    if inverse:
        with torch.no_grad():
            backward = displacement_from_velocity(-velocity, size, int_steps)
            if base is not None:
                backward = compose_flows(displacement_from_velocity(-base_velocity, size, int_steps), backward)
        backward = backward[0].cpu().numpy()
    return flow[0].cpu().numpy(), backward, device, info


def alignment(source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor,
              stride: int = ALIGNMENT_STRIDE) -> dict[str, float]:
    """Mean squared MIND-SSC difference (modality independent; lower is better) between the fixed image's
    descriptors ``target`` and the moving image's ``source`` as they are (affine only) and warped by
    ``flow`` (voxels of their grid), over every ``stride``-th voxel along each axis."""
    lattice = (slice(None), slice(None), *[slice(None, None, stride)] * 3)
    target, flow = target[lattice], flow[lattice]
    points = identity_grid(tuple(flow.shape[2:]), flow.device) * stride + flow  # (1, 3, d, h, w) along D, H, W
    warped = sample_at(source, points[0].permute(1, 2, 3, 0).flip(-1), "border")[None]
    return {"affine_only": round(losses.mse(target, source[lattice]).item(), 6),
            "network": round(losses.mse(target, warped).item(), 6)}


def compose(flow: np.ndarray, grid: sitk.Image, transform: sitk.Transform, fixed: sitk.Image) -> sitk.Image:
    """One displacement field on the fixed grid (LPS mm): x -> A(x + d(x)), minus x.

    ``flow`` is the deformable part d in voxels of ``grid`` (channels dk, dj, di), sampled
    trilinearly at the fixed voxel centres. Outside ``grid`` d keeps its edge value and fades
    smoothly to zero over TAPER_MM, so the field has no seam at the working grid's border.
    """
    return _field(flow, grid, np.eye(4), images.affine_matrix(transform), fixed)


def compose_inverse(inverse_flow: np.ndarray, grid: sitk.Image, transform: sitk.Transform,
                    moving: sitk.Image) -> sitk.Image:
    """The inverse displacement field on the moving grid (LPS mm): y -> z + e(z) with z = A^-1 y, minus y,
    where e (voxels of ``grid``) is the deformable part of the inverse (the velocity integrated backwards)."""
    return _field(inverse_flow, grid, np.linalg.inv(images.affine_matrix(transform)), np.eye(4), moving)


def _field(flow: np.ndarray, grid: sitk.Image, before: np.ndarray, after: np.ndarray,
           reference: sitk.Image) -> sitk.Image:
    """p -> after(q + d(q)) - p with q = before(p), for every voxel centre p of ``reference``, float32."""
    # after (q + d) - p  =  after_linear d + (after before - I) p: the linear part is applied on the coarse grid
    vectors = images.voxel_flow_to_physical(flow, grid) @ after[:3, :3].T
    tapered, pad = _tapered(torch.from_numpy(vectors.astype(np.float32)), grid)
    shift = np.eye(4)
    shift[:3, 3] = pad
    shape = reference.GetSize()[::-1]
    to_grid = shift @ np.linalg.inv(images.index_to_physical(grid)) @ before @ images.index_to_physical(reference)
    linear = (after @ before - np.eye(4)) @ images.index_to_physical(reference)
    out = np.empty((*shape, 3), np.float32)
    rows = max(1, SLAB_VOXELS // (shape[1] * shape[2]))
    for first in range(0, shape[0], rows):  # slabs of K: the working buffers stay small on a large fixed grid
        slab = (min(rows, shape[0] - first), *shape[1:])
        offset = np.eye(4)
        offset[2, 3] = first  # the slab's index (i, j, k) -> the reference's (i, j, k + first)
        total = affine_on_grid(linear @ offset, slab)
        total += sample_on_grid(tapered, to_grid @ offset, slab)[0].permute(1, 2, 3, 0)
        out[first:first + slab[0]] = total.numpy()
    return images.displacement_image(out, reference, np.float32)


def _tapered(vectors: torch.Tensor, grid: sitk.Image) -> tuple[torch.Tensor, list[int]]:
    """The field (K, J, I, 3) on ``grid`` padded by its edge values as far as TAPER_MM beyond the grid's
    extent and faded smoothly (C1) to zero there: (1, 3, K', J', I') and the padding (i, j, k) in voxels."""
    spacing = grid.GetSpacing()
    pad = [math.ceil(TAPER_MM / s + 0.5) for s in spacing]
    padded = F.pad(vectors.permute(3, 0, 1, 2)[None], [pad[0], pad[0], pad[1], pad[1], pad[2], pad[2]],
                   mode="replicate")
    squared = torch.zeros(padded.shape[2:])
    for axis, (n, p, s) in enumerate(zip(grid.GetSize(), pad, spacing, strict=True)):  # i, j, k
        index = torch.arange(n + 2 * p, dtype=torch.float32) - p
        outside = torch.maximum(-0.5 - index, index - (n - 0.5)).clamp_min(0) * s  # mm beyond the face
        shape = [1, 1, 1]
        shape[2 - axis] = -1
        squared = squared + (outside ** 2).view(shape)
    t = (1 - squared.sqrt() / TAPER_MM).clamp(0, 1)
    return padded * (t * t * (3 - 2 * t)), pad


def round_trip_error(forward: sitk.Image, inverse: sitk.Image, mask: np.ndarray) -> dict[str, float]:
    """x -> y = x + u(x) -> y + w(y) for the voxels x of ``forward``'s grid in ``mask``: mean and 95th
    percentile of the distance back to x (mm); w is sampled trilinearly on its own grid."""
    points = images.physical_points(forward)[mask]
    there = points + sitk.GetArrayViewFromImage(forward)[mask]
    to_index = np.linalg.inv(images.index_to_physical(inverse))
    there_index = there @ to_index[:3, :3].T + to_index[:3, 3]
    w = torch.from_numpy(sitk.GetArrayFromImage(inverse).astype(np.float32)).permute(3, 0, 1, 2)[None]
    back = there + sample_at(w.contiguous(), torch.from_numpy(there_index.astype(np.float32)), "border").T.numpy()
    error = np.linalg.norm(back - points, axis=1)
    return {"mean_mm": round(float(error.mean()), 4), "p95_mm": round(float(np.percentile(error, 95)), 4)}


def landmark_errors(fixed_points: np.ndarray, moving_points: np.ndarray, displacement: sitk.Image) -> dict:
    """Target registration error (mm) of landmark pairs: |y - x| before (no registration) and
    |y - (x + u(x))| after, per pair (matched by row) and mean; fixed points outside the field count
    with their before value after and are listed."""
    from .apply import map_points

    fixed_points, moving_points = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    mapped, outside = fixed_points.copy(), []
    for n, point in enumerate(fixed_points):
        try:
            mapped[n] = map_points(point[None], displacement)[0]
        except InputError:
            outside.append(n + 1)
    before = np.linalg.norm(moving_points - fixed_points, axis=1)
    after = np.linalg.norm(moving_points - mapped, axis=1)
    return {"tre_before_mm": [round(float(v), 3) for v in before], "tre_after_mm": [round(float(v), 3) for v in after],
            "mean_tre_before_mm": round(float(before.mean()), 3), "mean_tre_after_mm": round(float(after.mean()), 3),
            "rows_outside_the_field": outside}


def _dice_report(fixed_labels: sitk.Image, moving_labels: sitk.Image, warped_labels: sitk.Image,
                 fixed: sitk.Image, ids: list[int], names: dict[int, str] | None) -> dict:
    """Per-label Dice before (moving labels on the fixed grid, identity) and after registration."""
    fixed_array = sitk.GetArrayViewFromImage(fixed_labels)
    before = images.labels_on_grid(moving_labels, fixed)  # kept alive while its array view is used
    dice_before = metrics.dice(fixed_array, sitk.GetArrayViewFromImage(before), ids)
    dice_after = metrics.dice(fixed_array, sitk.GetArrayViewFromImage(warped_labels), ids)
    voxel_mm3 = float(np.prod(fixed.GetSpacing()))
    counts = metrics.label_counts(fixed_array, ids)
    named = _label_names(ids, names)
    rows = [{"label": i, "name": named[i], "dice_before": round(dice_before[i], 4),
             "dice_after": round(dice_after[i], 4), "fixed_volume_mm3": round(float(counts[i]) * voxel_mm3, 1)}
            for i in ids]
    return {"labels": rows,
            "mean_dice_before": round(float(np.nanmean([r["dice_before"] for r in rows])), 4),
            "mean_dice_after": round(float(np.nanmean([r["dice_after"] for r in rows])), 4)}
