"""Synthesis from label maps and validation variants, checked on small hand-made volumes."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import phantom, to_image
from SlicerVoxelMorphLib import synth, variants
from SlicerVoxelMorphLib.errors import InputError
from SlicerVoxelMorphLib.synth import HEAD_LAYERS, TISSUES, Synthesiser, SynthSettings, make_subject

QUIET = SynthSettings(rotation_deg=0, scale=0, shear=0, shift=0, velocity_sd=0, atrophy_probability=0,
                      head_probability=0, background_zero_probability=0, label_sd=0, blur_sd=0, bias_sd=0,
                      gamma_sd=0, noise_sd=0, thick_slice_probability=0)


def _subject(shape=(32, 32, 32)):
    image, labels = phantom(shape, seed=0)
    return make_subject("P", to_image(image), to_image(labels), [1, 2, 3]), labels


def test_tissue_classes_recover_three_hand_made_intensity_groups():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (10, 10, 10))
    image = np.choose(truth, [0.2, 0.5, 0.8]) + rng.normal(0, 0.02, truth.shape)
    classes = synth.tissue_classes(image, np.ones(truth.shape, bool))
    assert (classes == truth).all()


def test_generation_labels_keep_structures_and_split_tissues():
    subject, labels = _subject()
    generation = subject.generation[0, 0].numpy().astype(int)
    brain = generation > HEAD_LAYERS
    assert brain[labels > 0].all()  # every labelled voxel is brain
    structure = (generation[labels > 0] - 1 - HEAD_LAYERS) // TISSUES
    np.testing.assert_array_equal(structure, labels[labels > 0])  # compact ids of [1, 2, 3] are 1, 2, 3
    distance = subject.distance[0, 0].numpy()
    assert (distance[brain] == 0).all() and (distance[~brain] > 0).all()


def test_tissue_map_of_hand_made_generation_labels():
    # generation label = 1 + HEAD_LAYERS + structure * TISSUES + tissue (0 CSF, 1 grey, 2 white matter)
    brain = 1 + HEAD_LAYERS
    generation = torch.tensor([0, 1, HEAD_LAYERS, brain, brain + 1, brain + 2,
                               brain + TISSUES, brain + TISSUES + 1, brain + 2 * TISSUES + 2])
    # background and head layers 0; CSF outside the structures 2 (ventricles), inside one 1 (sulci);
    # grey matter 3, white matter 4 wherever they are
    np.testing.assert_array_equal(synth.tissue_map(generation).numpy(), [0, 0, 0, 2, 3, 4, 1, 3, 4])


def test_unlabelled_tissue_enclosed_by_structures_is_brain_even_where_a_gap_opens_it_to_the_outside():
    # LPBA40 labels the cortex and a few deep structures, not the white matter and ventricles they enclose,
    # and that inside reaches the outside through gaps between structures: it is brain, not background
    shape = (48, 48, 48)
    z, y, x = np.indices(shape) - 23.5
    radius = np.sqrt(z**2 + y**2 + x**2)
    labels = np.where((radius > 14) & (radius < 18), 1, 0)
    labels[(z > 0) & (np.abs(y) < 3) & (np.abs(x) < 3)] = 0  # a 6-voxel channel from the inside out
    image = np.where(radius < 18, 0.6, 0.0) + np.where(radius < 14, 0.3, 0.0)
    subject = make_subject("shell", to_image(image.astype(np.float32)), to_image(labels), [1])
    brain = subject.generation[0, 0].numpy() > HEAD_LAYERS
    assert brain[radius < 13].all()  # the enclosed white matter
    assert not brain[radius > 20].any()  # the background stays outside
    assert (subject.distance[0, 0].numpy()[radius < 13] == 0).all()  # no head layers drawn inside


def test_without_deformation_the_structures_are_the_label_map_and_the_image_is_constant_per_label():
    subject, labels = _subject()
    rng = np.random.default_rng(3)
    synthesiser = Synthesiser(QUIET)
    generation = synthesiser.labels(subject, rng, (32, 32, 32))
    np.testing.assert_array_equal(generation[0, 0].numpy(), subject.generation[0, 0].numpy())
    image = synthesiser.image(generation, subject.structures, rng)[0, 0].numpy()
    for value in np.unique(generation.numpy()):
        inside = image[generation[0, 0].numpy() == value]
        assert inside.max() - inside.min() < 1e-5  # one intensity per generation label
    _, _, moving_structures, *_ = synthesiser.pair(subject, subject, rng, (32, 32, 32))
    np.testing.assert_array_equal(moving_structures[0, 0].numpy(), labels)


def test_deformed_structures_match_the_deformed_generation_map_and_the_image_follows_them():
    subject, _ = _subject()
    settings = SynthSettings(head_probability=1.0, blur_sd=0, bias_sd=0, noise_sd=0, label_sd=0, gamma_sd=0,
                             thick_slice_probability=0, background_zero_probability=0)
    synthesiser = Synthesiser(settings)
    rng = np.random.default_rng(5)
    generation = synthesiser.labels(subject, rng, (16, 16, 16))
    still = Synthesiser(QUIET).labels(subject, np.random.default_rng(5), (16, 16, 16))
    assert (generation != still).float().mean() > 0.05  # it moved
    values = np.unique(generation.numpy())
    assert set(range(1, 1 + HEAD_LAYERS)) & set(values)  # head layers were drawn
    image = synthesiser.image(generation, subject.structures, rng)[0, 0].numpy()
    g = generation[0, 0].numpy()
    for value in values:
        inside = image[g == value]
        assert inside.max() - inside.min() < 1e-5
    # the pair's structure maps are the generation maps' structures
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    _, _, m_structures, *_ = synthesiser.pair(subject, subject, rng_a, (16, 16, 16))
    g = synthesiser.labels(subject, rng_b, (16, 16, 16))[0, 0].numpy()
    expected = np.where(g > HEAD_LAYERS, (g - 1 - HEAD_LAYERS) // TISSUES, 0)
    np.testing.assert_array_equal(m_structures[0, 0].numpy(), expected)


def test_same_seed_same_pair_other_seed_other_pair():
    subject, _ = _subject()
    synthesiser = Synthesiser()
    a = synthesiser.pair(subject, subject, np.random.default_rng([0, 7]), (16, 16, 16))
    b = synthesiser.pair(subject, subject, np.random.default_rng([0, 7]), (16, 16, 16))
    c = synthesiser.pair(subject, subject, np.random.default_rng([0, 8]), (16, 16, 16))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert 0 <= float(a[0].min()) and float(a[0].max()) <= 1


def test_bad_label_maps_are_one_line_errors():
    image, labels = phantom((16, 16, 16))
    with pytest.raises(InputError, match="empty"):
        make_subject("E", to_image(image), to_image(np.zeros_like(labels)), [1, 2, 3])
    with pytest.raises(InputError, match="outside the synthesis label set"):
        make_subject("X", to_image(image), to_image(labels), [1, 2])
    with pytest.raises(InputError, match="another grid"):
        make_subject("G", to_image(image), to_image(labels, spacing=(2.0, 2.0, 2.0)), [1, 2, 3])


def test_contrast_variants_reorder_tissues_as_named():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (12, 12, 12))  # background, CSF, grey, white
    t1 = np.choose(truth, [0.0, 0.25, 0.55, 0.85]).astype(np.float32)
    mean = {kind: [variants.remap_contrast(t1, kind)[truth == c].mean() for c in range(4)]
            for kind in ("t2", "flair", "inverted")}
    bg, csf, grey, white = mean["t2"]
    assert csf > grey > white > bg
    bg, csf, grey, white = mean["flair"]
    assert grey > white > csf and bg <= csf
    assert mean["inverted"] == sorted(mean["inverted"], reverse=True)
    monotone = variants.remap_contrast(t1, "monotone", seed=2)
    means = [monotone[truth == c].mean() for c in range(4)]
    assert means == sorted(means)


def test_head_variant_changes_only_the_outside_of_the_brain():
    image = np.zeros((24, 24, 24), np.float32)
    image[6:18, 6:18, 6:18] = 0.6
    brain = sitk.GetImageFromArray((image > 0).astype(np.uint8))
    distance = np.clip(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False,
                                                                           squaredDistance=False)), 0, None)
    head = variants.variant(image, "head", distance, seed=1)
    assert head[distance > 6].max() > 0.5  # scalp drawn
    inside = head[8:16, 8:16, 8:16]
    assert inside.std() < 0.05 * inside.mean() + 0.05  # brain kept (up to noise and blur)


def test_a_known_pair_shows_one_label_map_under_its_known_flow_in_two_contrasts():
    from scipy.ndimage import map_coordinates

    subject, _ = _subject()
    synthesiser = Synthesiser(SynthSettings(velocity_sd=3.0, head_probability=1.0))
    pair = synthesiser.known_pair(subject, np.random.default_rng(4), (32, 32, 32))
    again = synthesiser.known_pair(subject, np.random.default_rng(4), (32, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(pair, again, strict=True))  # seeded
    m_image, f_image, m_structures, f_structures, flow, head, m_tissues, f_tissues = pair
    assert flow.abs().max() > 1  # not a trivial field
    # the known flow (voxels along D, H, W) carries the moving structures onto the fixed ones:
    # fixed(x) = moving(x + flow(x)), by scipy's nearest-neighbour sampling
    index = np.indices((32, 32, 32)) + flow[0].numpy()
    expected = map_coordinates(m_structures[0, 0].numpy(), index, order=0, mode="constant")
    assert (f_structures[0, 0].numpy() == expected).mean() > 0.99
    expected = map_coordinates(m_tissues[0, 0].numpy(), index, order=0, mode="constant")
    assert (f_tissues[0, 0].numpy() == expected).mean() > 0.99  # the tissue labels move with them
    # the scored region is the fixed head: every structure voxel and the head layers around them
    assert head[f_structures > 0].all() and head.sum() > 1.2 * (f_structures > 0).sum()
    # each image its own contrast: the mean intensity of a structure differs between them
    means = [[image[structures == s].mean().item() for s in range(1, 4)]
             for image, structures in ((m_image, m_structures), (f_image, f_structures))]
    assert np.abs(np.subtract(*means)).max() > 0.1


def test_a_rescan_pair_is_one_image_under_its_known_flow_and_scores_the_head():
    from scipy.ndimage import map_coordinates

    subject, labels = _subject()
    image = torch.from_numpy(phantom((32, 32, 32), seed=0)[0].astype(np.float32))[None, None]
    soft = torch.from_numpy((labels[None, None] == 2).astype(np.float32))
    pairs = [variants.rescan_pair(image / image.max(), subject.distance, soft, np.random.default_rng(seed), 1.0)
             for seed in range(12)]
    again = variants.rescan_pair(image / image.max(), subject.distance, soft, np.random.default_rng(3), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(pairs[3], again, strict=True))  # seeded
    for moving, fixed, m_soft, f_soft, flow, head in pairs:
        assert flow.abs().max() > 0.3  # not a trivial field
        # fixed(x) = moving(x + flow(x)) (voxels along D, H, W), by scipy's linear sampling, away from the border
        index = np.indices((32, 32, 32)) + flow[0].numpy()
        inner = (slice(4, -4),) * 3
        for a, b in ((moving, fixed), (m_soft, f_soft)):
            expected = map_coordinates(a[0, 0].numpy(), index, order=1, mode="nearest")
            np.testing.assert_allclose(b[0, 0].numpy()[inner], expected[inner], atol=1e-4)
        # the scored region covers the fixed brain (structure 2 included) and is the whole head with head layers
        assert head[0, 0][f_soft[0, 0] > 0.5].all()
    sizes = [int(p[5].sum()) for p in pairs]
    assert max(sizes) > 1.3 * min(sizes)  # with head layers the scored region grows beyond the brain


def test_expansion_pushes_tissue_away_from_a_region_without_folding():
    region = torch.zeros(1, 1, 40, 40, 40)
    region[..., 14:26, 14:26, 14:26] = 1
    flow = synth.expansion_flow(region, amplitude=2.0, sd=2.0)
    # just outside each face the sample point moves into the cube: +W on its low-W side, -D on its high-D side
    assert flow[0, 2, 20, 20, 12] > 0.5 and abs(flow[0, 0, 20, 20, 12]) < 0.1
    assert flow[0, 0, 27, 20, 20] < -0.5
    assert flow.abs().max() < 2.0 * 2  # the velocity is capped; integration moves a point little further
    grown = torch.nn.functional.grid_sample(region, synth.sampling_grid(flow), align_corners=False)
    assert (grown > 0.5).sum() > 1.3 * region.sum()  # 12^3 -> about 14^3 voxels
    # independent reference: numpy finite differences of the mapping x -> x + flow(x)
    grad = np.stack([np.stack(np.gradient(flow[0, c].numpy()), 0) for c in range(3)], 0)  # (3, 3, D, H, W)
    jacobian = np.moveaxis(grad, (0, 1), (-2, -1)) + np.eye(3)
    assert np.linalg.det(jacobian).min() > 0


def test_expansion_off_leaves_the_random_stream_of_older_recipes():
    subject, _ = _subject()
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    off = Synthesiser(SynthSettings(expansion_probability=0.0)).labels(subject, a, (32, 32, 32))
    default = Synthesiser().labels(subject, b, (32, 32, 32))
    assert torch.equal(off, default) and a.random() == b.random()


def test_aged_variant_moves_image_and_labels_together_and_widens_the_csf():
    shape = (40, 40, 40)
    z, y, x = np.indices(shape) - 19.5
    radius = np.sqrt(z**2 + y**2 + x**2)
    labels = np.where((radius > 6) & (radius < 16), 1, 0).astype(np.int16)  # tissue around a CSF-filled centre
    csf = radius <= 6
    image = np.where(labels > 0, 0.8, 0.0) + np.where(csf, 0.2, 0.0)
    aged_image, aged_labels = variants.aged(image.astype(np.float32), labels, csf, voxel_mm=1.0, amplitude_mm=3.0)
    assert aged_labels.dtype == labels.dtype
    assert (aged_labels[radius < 6] == 0).all()
    assert ((aged_labels == 0) & (radius < 12)).sum() > 1.2 * csf.sum()  # the CSF-filled centre grew
    tissue = aged_labels > 0
    assert np.abs(aged_image[tissue] - 0.8).mean() < 0.05  # the image went where its labels went
    assert (aged_image[~tissue & (radius < 10)] < 0.5).mean() > 0.9


def _blanked_phantom(shape=(48, 40, 40)):
    """A ball of grey (0.5) and white (0.8) matter, structure 1, above a ball that the image blanked out
    (structure 2, black, as LPBA40's cerebellum), on a dark background."""
    z, y, x = np.indices(shape).astype(float)
    upper = (z - 12) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 9**2
    lower = ((z - 33) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 13**2) & ~upper
    labels = np.where(upper, 1, np.where(lower, 2, 0))
    image = np.where(upper, np.where((z - 12) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 5**2, 0.8, 0.5), 0.0)
    return image.astype(np.float32), labels, lower


def test_a_structure_the_image_blanked_out_is_found_and_a_visible_one_is_not():
    image, labels, lower = _blanked_phantom()
    np.testing.assert_array_equal(synth.blanked_region(image, labels), lower)
    assert not synth.blanked_region(image, np.where(labels == 1, 1, 0)).any()


def test_a_blanked_structure_is_generated_as_grey_matter_with_a_white_core():
    from scipy import ndimage

    image, labels, lower = _blanked_phantom()
    subject = make_subject("B", to_image(image), to_image(labels), [1, 2])
    tissue = (subject.generation[0, 0].numpy().astype(int) - 1 - HEAD_LAYERS) % TISSUES
    depth = ndimage.distance_transform_edt(lower)  # independent of SimpleITK's distance map
    np.testing.assert_allclose(synth.depth_mm(lower, 2.0), 2 * depth, atol=1e-4)
    core = depth > synth.CEREBELLUM_CORE_MM + 0.5
    cortex = lower & (depth < synth.CEREBELLUM_CORE_MM - 0.5)
    assert core.sum() > 20 and cortex.sum() > 1000
    assert (tissue[core] == 2).all() and (tissue[cortex] == 1).all()  # white core, grey rest, no CSF
    np.testing.assert_array_equal(synth.tissue_map(subject.generation.long())[0, 0].numpy()[lower],
                                  np.where(tissue[lower] == 2, 4, 3))  # scored as grey and white matter


def test_fill_blanked_draws_grey_and_white_matter_only_inside_the_region():
    image, _, lower = _blanked_phantom()
    filled = variants.fill_blanked(image, lower, np.random.default_rng(3))
    np.testing.assert_array_equal(filled[~lower], image[~lower])  # outside untouched
    inside = filled[lower]
    assert 0.4 < inside.mean() < 0.8  # between the brain's grey (0.5) and white (0.8) levels
    white = inside > 0.65
    assert 0.03 < white.mean() < 0.6  # a grey cortex with some white matter: not one level
    depth = synth.depth_mm(lower, 1.0)
    assert filled[depth > synth.CEREBELLUM_CORE_MM + 1].mean() > 0.7  # the core is white
    assert filled[lower & (depth < variants.CEREBELLUM_CORTEX_MM)].mean() < 0.6  # the outer layer grey
    np.testing.assert_array_equal(variants.fill_blanked(image, lower, np.random.default_rng(3)), filled)
    assert not np.array_equal(variants.fill_blanked(image, lower, np.random.default_rng(4)), filled)
    np.testing.assert_array_equal(variants.fill_blanked(image, np.zeros_like(lower), np.random.default_rng(3)), image)
