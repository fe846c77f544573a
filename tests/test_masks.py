"""Salient-region masks: index sets, placement, dilation, flipping."""

import numpy as np
import pytest

from realtime.canonical import CanonicalTemplate
from realtime.masks import (FACE_OVAL, FLIP_PERMUTATION, MASK_LANDMARKS, canonical_to_pixels, flip_masks,
                            rasterize_masks)
from realtime.spec import MASK_NAMES, SPEC


@pytest.fixture(scope="module")
def template() -> CanonicalTemplate:
    return CanonicalTemplate.load()


def test_index_sets_are_mediapipes():
    fc = pytest.importorskip("mediapipe").solutions.face_mesh_connections
    sets = {"left_eye": fc.FACEMESH_LEFT_EYE, "right_eye": fc.FACEMESH_RIGHT_EYE,
            "left_brow": fc.FACEMESH_LEFT_EYEBROW, "right_brow": fc.FACEMESH_RIGHT_EYEBROW,
            "nose": fc.FACEMESH_NOSE, "mouth": fc.FACEMESH_LIPS}
    assert set(MASK_LANDMARKS) == set(MASK_NAMES)
    for name, edges in sets.items():
        assert set(MASK_LANDMARKS[name]) == {i for e in edges for i in e}, name
    loop = {tuple(sorted(e)) for e in zip(FACE_OVAL, FACE_OVAL[1:] + FACE_OVAL[:1])}
    assert loop == {tuple(sorted(e)) for e in fc.FACEMESH_FACE_OVAL}


def test_nose_tip_maps_to_the_nose_pixel_and_axes_point_right_and_up():
    px = canonical_to_pixels(np.array([[0.0, 0.0], [SPEC.mm_per_px, SPEC.mm_per_px]]))
    assert np.allclose(px[0], [SPEC.nose_col, SPEC.nose_row])
    assert np.allclose(px[1], [SPEC.nose_col + 1, SPEC.nose_row - 1])  # +x right, +y up


def test_template_masks_sit_where_the_regions_are(template):
    masks = rasterize_masks(template.points)
    assert masks.shape == (6, SPEC.size, SPEC.size) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    cols = np.arange(SPEC.size)
    rows = np.arange(SPEC.size)[:, None]

    def centre(name):
        m = masks[MASK_NAMES.index(name)]
        assert m.sum() > 20, name
        return (m * cols).sum() / m.sum(), (m * rows).sum() / m.sum()

    # the subject's left is +x: the right half of the map
    assert centre("left_eye")[0] > SPEC.nose_col > centre("right_eye")[0]
    assert centre("left_brow")[0] > SPEC.nose_col > centre("right_brow")[0]
    assert centre("left_brow")[1] < centre("left_eye")[1] < SPEC.nose_row < centre("mouth")[1]
    assert abs(centre("nose")[0] - SPEC.nose_col) < 1 and abs(centre("mouth")[0] - SPEC.nose_col) < 1
    assert masks[MASK_NAMES.index("nose"), int(SPEC.nose_row), int(SPEC.nose_col)] == 1
    # eyes and brows are disjoint, each eye is a few cm^2
    assert (masks[0] * masks[2]).sum() < 5
    assert 150 < masks[0].sum() * SPEC.mm_per_px**2 < 1500


def test_dilation_grows_the_masks_and_nan_rows_are_skipped(template):
    tight = rasterize_masks(template.points, dilate_mm=0.0)
    loose = rasterize_masks(template.points, dilate_mm=4.0)
    assert (loose >= tight).all() and loose.sum() > 1.2 * tight.sum()
    holes = template.points.copy()
    holes[[33, 133]] = np.nan
    assert rasterize_masks(holes).sum() > 0
    few = template.points.copy()
    few[list(MASK_LANDMARKS[MASK_NAMES[0]])[2:]] = np.nan  # fewer than 3 points left for that mask
    masks = rasterize_masks(few)
    assert masks[0].sum() == 0 and masks[1:].sum() > 0


def test_flip_swaps_sides_and_matches_the_mirrored_face(template):
    assert [MASK_NAMES[i] for i in FLIP_PERMUTATION] == ["right_eye", "left_eye", "right_brow", "left_brow",
                                                         "nose", "mouth"]
    masks = rasterize_masks(template.points)
    flipped = flip_masks(masks)
    assert np.array_equal(flip_masks(flipped), masks)
    mirrored = template.points[template.mirror] * np.array([-1.0, 1.0, 1.0])
    expected = rasterize_masks(mirrored)
    for c in range(6):
        inter = (flipped[c] * expected[c]).sum()
        union = np.maximum(flipped[c], expected[c]).sum()
        assert inter / union > 0.95, MASK_NAMES[c]
    batch = np.stack([masks, masks])
    assert np.array_equal(flip_masks(batch)[1], flipped)
