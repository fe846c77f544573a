"""The canonical face frame on rendered ICT heads at known poses, bad inputs, and the model feeds."""

from dataclasses import replace

import numpy as np
import pytest

from realtime.canonical import (CAMERA_FROM_HEAD, TEMPLATE_PATH, CanonicalOptions, Canonicalizer,
                                CanonicalTemplate, angles_from_rotation, fill_holes, kabsch, rigid_fit,
                                rotation_from_angles, template_id)
from realtime.frames import FaceLandmarks
from realtime.model_inputs import arrays_to_feeds, face_to_arrays, flip_arrays, make_feeds
from realtime.model_metadata import INPUT_NAMES
from realtime.spec import MASK_NAMES, SPEC, TEMPLATE_ID

pytest.importorskip("open3d", reason="rendering test heads needs open3d (train extra)")
from realtime.landmarks import LandmarkDetector, LandmarkOptions  # noqa: E402
from train.face_model import FaceModel, expression_weights  # noqa: E402
from train.render import RenderOptions, RenderPose, ScanRenderer  # noqa: E402

POSE = RenderPose(yaw=20.0, pitch=-8.0, roll=6.0, distance_mm=650.0, offset_mm=(25.0, -15.0))


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return FaceModel.load()


@pytest.fixture(scope="module")
def texture(model) -> np.ndarray:
    return model.procedural_texture(np.random.default_rng(7), skin_tone=0.4)


@pytest.fixture(scope="module")
def detector():
    with LandmarkDetector(LandmarkOptions(static_image_mode=True)) as det:
        yield det


@pytest.fixture(scope="module")
def canon():
    with Canonicalizer() as c:
        yield c


def render(model, texture, expression=None, pose=POSE, seed=0):
    mesh = model.mesh(None, expression, texture)  # the mean head: the template's own shape
    with ScanRenderer(RenderOptions(seed=seed)) as renderer:
        return renderer.process(mesh, pose)


@pytest.fixture(scope="module")
def scene(model, texture, detector, canon):
    result = render(model, texture)
    faces = detector.process(result.frame)
    assert len(faces) == 1
    return result, faces[0], canon.process(result.frame, faces[0])


def test_template_id_matches_the_file_and_the_template_is_sane():
    assert template_id(TEMPLATE_PATH) == TEMPLATE_ID
    t = CanonicalTemplate.load()
    assert np.allclose(t.points[t.nose_index], 0.0)
    assert t.points[:, 2].max() <= 1e-6  # the nose tip is the most forward landmark
    assert np.allclose(t.points[t.mirror] * [-1, 1, 1], t.points, atol=1e-4)  # mirror-symmetric
    assert (t.mirror[t.mirror] == np.arange(468)).all()
    assert t.points[263, 0] > 30 and t.points[33, 0] < -30  # subject's left eye at +x
    assert t.points[10, 1] > 50 and t.points[152, 1] < -50  # forehead up, chin down
    assert np.allclose(np.linalg.norm(t.normals, axis=1), 1.0, atol=1e-5)
    assert t.normals[t.nose_index, 2] > 0.9


def test_recovers_the_rendered_pose(scene):
    result, _, out = scene
    assert out.status == "ok" and out.reason == ""
    face = out.face
    assert abs(face.yaw - POSE.yaw) < 4 and abs(face.pitch - POSE.pitch) < 4 and abs(face.roll - POSE.roll) < 4
    rotation_error = np.degrees(np.arccos(np.clip((np.trace(face.rotation.T @ result.rotation) - 1) / 2, -1, 1)))
    assert rotation_error < 4
    # the canonical origin is the template's nose tip, a known point of the mean head
    with np.load(TEMPLATE_PATH) as z:
        origin = z["ict_origin_mm"].astype(np.float64)
    assert np.linalg.norm(face.translation - (result.rotation @ origin + result.translation)) < 5
    assert face.residual_mm < 3 and face.inliers >= 20


def test_maps_put_the_nose_on_its_pixel_and_the_face_behind_it(scene):
    face = scene[2].face
    s = SPEC.size
    assert face.texture.shape == (s, s, 3) and face.texture.dtype == np.uint8
    assert face.depth_mm.shape == (s, s) and face.depth_mm.dtype == np.float32
    assert face.normals.shape == (3, s, s) and face.masks.shape == (6, s, s) and face.valid.dtype == bool
    nose = face.landmarks_canonical[4]
    assert abs(nose[0]) < 2.5 and abs(nose[1]) < 2.5  # lands on (nose_col, nose_row)
    r, c = int(SPEC.nose_row), int(SPEC.nose_col)
    assert abs(face.depth_mm[r, c:c + 2].mean()) < 4
    valid = face.valid
    assert 0.6 < valid.mean() < 0.95
    assert np.percentile(face.depth_mm[valid], 98) < 4  # everything else is behind the tip
    assert face.depth_mm[valid].min() > SPEC.depth_min_mm
    assert face.depth_mm[r, 5] < -30 and face.depth_mm[r, s - 6] < -30  # cheeks well behind
    assert np.allclose(np.linalg.norm(face.normals, axis=0), 1.0, atol=1e-4)
    assert face.normals[2][valid].mean() > 0.7  # facing the camera
    # the nose's flanks: normals point to the sides they are on
    assert face.normals[0, r - 8, c + 6] > 0.2 and face.normals[0, r - 8, c - 5] < -0.2
    # off the face: background depth, black, normal +z, not valid
    assert face.depth_mm[s - 1, 0] == SPEC.depth_min_mm and not valid[s - 1, 0]
    assert (face.texture[s - 1, 0] == 0).all() and face.normals[2, s - 1, 0] == 1.0


def test_texture_is_the_face_and_masks_are_on_the_right_sides(scene):
    face = scene[2].face
    cols = np.arange(SPEC.size)
    for name, side in (("left_eye", 1), ("right_eye", -1), ("left_brow", 1), ("right_brow", -1)):
        m = face.masks[MASK_NAMES.index(name)]
        assert m.sum() > 20
        assert side * ((m * cols).sum() / m.sum() - SPEC.nose_col) > 15, name
    lips = face.masks[MASK_NAMES.index("mouth")] > 0
    skin = face.valid & (face.masks.sum(0) == 0)
    assert face.texture[lips, 0].mean() > face.texture[lips, 1].mean() + 15  # lips are red
    eyes = face.masks[0] > 0
    assert face.texture[eyes].std() > face.texture[skin].std()  # sclera, iris, lashes


def test_smile_does_not_tilt_the_frame_and_open_mouth_grows_the_mouth_mask(model, texture, detector, canon, scene):
    neutral = scene[2].face
    faces = {}
    for name in ("happiness", "surprise"):
        result = render(model, texture, expression_weights(name))
        landmarks = detector.process(result.frame)
        faces[name] = canon.process(result.frame, landmarks[0]).face
    for face in faces.values():
        assert face is not None
        angle = np.degrees(np.arccos(np.clip((np.trace(face.rotation.T @ neutral.rotation) - 1) / 2, -1, 1)))
        assert angle < 3.5
    mouth = MASK_NAMES.index("mouth")
    assert faces["surprise"].masks[mouth].sum() > 1.15 * neutral.masks[mouth].sum()
    assert faces["surprise"].landmarks_canonical[14, 1] < neutral.landmarks_canonical[14, 1] - 5  # lower lip drops


def test_status_for_bad_inputs(scene, canon):
    result, landmarks, _ = scene
    frame = result.frame
    no_depth = replace(frame, depth=np.zeros_like(frame.depth))
    out = canon.process(no_depth, landmarks)
    assert out.status == "bad_depth" and out.face is None and "\n" not in out.reason and "depth" in out.reason
    assert canon.process(frame, None).status == "no_face"
    # a detected face with malformed landmarks is a failed fit ("no_face" is for frames without faces)
    bad_shape = FaceLandmarks(points=landmarks.points[:100], bbox=landmarks.bbox)
    assert canon.process(frame, bad_shape).status == "bad_fit"
    nan = FaceLandmarks(points=np.full_like(landmarks.points, np.nan), bbox=landmarks.bbox)
    assert canon.process(frame, nan).status == "bad_fit"
    # a photo of a face: real landmarks, but the depth is a flat sheet
    flat = replace(frame, depth=np.full_like(frame.depth, 650))
    out = canon.process(flat, landmarks)
    assert out.status == "bad_fit" and "residual" in out.reason
    # landmarks scrambled: no rigid pose explains them
    shuffled = FaceLandmarks(points=np.random.default_rng(0).permutation(landmarks.points), bbox=landmarks.bbox)
    assert canon.process(frame, shuffled).status in ("bad_fit", "bad_depth")
    # too far for the configured range
    with Canonicalizer(CanonicalOptions(max_distance_mm=500.0)) as near_only:
        out = near_only.process(frame, landmarks)
    assert out.status == "bad_fit" and "mm" in out.reason
    # landmarks off the image: no depth under them
    away = FaceLandmarks(points=landmarks.points + 2000.0, bbox=landmarks.bbox)
    assert canon.process(frame, away).status == "bad_depth"
    with pytest.raises(ValueError, match="lift_window"):
        Canonicalizer(CanonicalOptions(lift_window=4))


def test_face_turned_away_is_bad_fit(model, texture, detector, canon, scene):
    result, landmarks, _ = scene
    with Canonicalizer(CanonicalOptions(max_yaw_deg=10.0)) as strict:
        out = strict.process(result.frame, landmarks)
    assert out.status == "bad_fit" and "turned" in out.reason


def test_geometry_helpers():
    rng = np.random.default_rng(0)
    for angles in ((0, 0, 0), (30, -20, 10), (-60, 45, -30)):
        assert np.allclose(angles_from_rotation(rotation_from_angles(*angles)), angles, atol=1e-9)
    nose = rotation_from_angles(30, 0, 0) @ [0, 0, 1]
    assert nose[0] > 0  # yaw > 0: nose toward the subject's left (image right)
    assert (CAMERA_FROM_HEAD @ [0, 1, 0])[1] < 0  # head up is image up (camera y down)
    model = rng.normal(size=(30, 3)) * 40
    true_r, true_t = rotation_from_angles(25, -10, 5), np.array([10.0, -20.0, 600.0])
    measured = model @ true_r.T + true_t
    r, t = kabsch(model, measured)
    assert np.allclose(r, true_r) and np.allclose(t, true_t)
    normals = rng.normal(size=(30, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    r2, t2 = rigid_fit(model, normals, measured + rng.normal(size=(30, 3)) * 0.01, 0.3,
                       rotation_from_angles(20, -5, 0), true_t + 5)
    assert np.allclose(r2, true_r, atol=1e-3) and np.allclose(t2, true_t, atol=0.05)
    values = rng.normal(size=(112, 112, 4)).astype(np.float32)
    known = rng.uniform(size=(112, 112)) > 0.3
    filled = fill_holes(values, known)
    assert np.allclose(filled[known], values[known], atol=1e-5) and np.isfinite(filled).all()


def test_feeds_follow_the_model_contract(scene):
    face = scene[2].face
    feeds = make_feeds([face, face])
    s = SPEC.size
    assert list(feeds) == list(INPUT_NAMES)
    assert feeds["texture"].shape == (2, 3, s, s) and feeds["geometry"].shape == (2, 4, s, s)
    assert feeds["masks"].shape == (2, 6, s, s)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in feeds.values())
    assert 0 <= feeds["texture"].min() and feeds["texture"].max() <= 1
    assert np.allclose(feeds["texture"][0].transpose(1, 2, 0) * 255, face.texture, atol=1e-3)
    depth = feeds["geometry"][0, 0]
    assert np.allclose(depth, np.clip(face.depth_mm, SPEC.depth_min_mm, SPEC.depth_max_mm) / SPEC.depth_scale_mm)
    assert depth.min() >= SPEC.depth_min_mm / SPEC.depth_scale_mm
    assert np.array_equal(feeds["geometry"][0, 1:], face.normals)
    # the cached-array path gives the same numbers
    arrays = face_to_arrays(face)
    cached = {k: np.asarray(v).astype(np.float16 if k == "normals" else v.dtype) for k, v in arrays.items()}
    again = arrays_to_feeds([cached])
    assert np.allclose(again["geometry"], feeds["geometry"][:1], atol=1e-3)
    with pytest.raises(ValueError, match="no samples"):
        make_feeds([])
    with pytest.raises(ValueError, match="sample 0: masks"):
        arrays_to_feeds([{**arrays, "masks": arrays["masks"][:5]}])


def test_flip_mirrors_maps_and_swaps_masks(scene):
    arrays = face_to_arrays(scene[2].face)
    flipped = flip_arrays(arrays)
    twice = flip_arrays(flipped)
    for key in arrays:
        assert np.array_equal(twice[key], arrays[key]), key
    assert np.array_equal(flipped["depth_mm"][:, 10], arrays["depth_mm"][:, SPEC.size - 11])
    assert np.array_equal(flipped["normals"][0, :, 10], -arrays["normals"][0, :, SPEC.size - 11])
    assert np.array_equal(flipped["masks"][MASK_NAMES.index("left_eye")],
                          arrays["masks"][MASK_NAMES.index("right_eye")][:, ::-1])
    with pytest.raises(ValueError, match="nose_col"):
        flip_arrays(arrays, replace(SPEC, nose_col=50.0))


def test_picture_grid_for_a_human_to_look_at(scene, tmp_path):
    """Writes texture | depth | normals | masks | valid of the test scan (look at it when changing maps)."""
    import cv2

    face = scene[2].face
    depth = np.clip((face.depth_mm - SPEC.depth_min_mm) / (SPEC.depth_max_mm - SPEC.depth_min_mm) * 255, 0, 255)
    normals = ((face.normals.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    palette = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)], np.uint8)
    masks = (face.masks[..., None] * palette[:, None, None, :]).max(axis=0).astype(np.uint8)
    grey = lambda a: np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    row = np.concatenate([face.texture, grey(depth), normals, masks, grey(face.valid * 255)], axis=1)
    path = tmp_path / "canonical_grid.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
    assert path.stat().st_size > 1000


def test_depth_units_come_from_the_frame(scene, canon):
    """A camera set to 0.1 mm depth units gives the same face as one at 1 mm."""
    result, landmarks, out = scene
    fine = replace(result.frame, depth=(result.frame.depth.astype(np.uint32) * 10).astype(np.uint16),
                   depth_scale=0.0001)
    again = canon.process(fine, landmarks)
    assert again.ok
    assert np.allclose(again.face.rotation, out.face.rotation, atol=1e-4)
    same = np.isclose(again.face.depth_mm, out.face.depth_mm, atol=1e-2)
    assert same.mean() > 0.995  # float rounding may move a sample across a pixel border
