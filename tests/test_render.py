"""The scan renderer against geometry computable by hand: planes, spheres, a marked texture."""

import numpy as np
import pytest

pytest.importorskip("open3d", reason="the renderer needs open3d (train extra)")

from calib.camera import D4XX_COLOR_640x480 as K  # noqa: E402
from train.mesh import TexturedMesh  # noqa: E402
from train.render import (RenderOptions, RenderPose, ScanRenderer, sample_bilinear,  # noqa: E402
                          stereo_shadow, vertex_normals)


def square(half_mm: float = 50.0, z_mm: float = 0.0, texture: np.ndarray | None = None) -> TexturedMesh:
    """A square facing +z; its top-left corner as the camera sees it (-x, +y) has uv (0, 0)."""
    v = np.array([[-half_mm, half_mm, z_mm], [half_mm, half_mm, z_mm], [half_mm, -half_mm, z_mm],
                  [-half_mm, -half_mm, z_mm]], np.float32)
    tris = np.array([[0, 3, 2], [0, 2, 1]], np.int32)  # counter-clockwise seen from +z
    corner_uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    if texture is None:
        texture = np.full((64, 64, 3), 200, np.uint8)
    return TexturedMesh(v, tris, corner_uv[tris], texture, landmarks={"corners": v.copy()})


def sphere(radius: float, subdivisions: int = 5) -> TexturedMesh:
    """A unit icosphere scaled to ``radius`` (grey texture)."""
    t = (1 + 5**0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], np.float64)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                  [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
                  [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    for _ in range(subdivisions):
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        unique, inverse = np.unique(edges, axis=0, return_inverse=True)
        mid = len(v) + inverse.reshape(3, -1).T  # (F, 3) new vertex per edge
        v = np.concatenate([v, (v[unique[:, 0]] + v[unique[:, 1]]) / 2])
        a, b, c = f.T
        ab, bc, ca = mid.T
        f = np.concatenate([np.stack(x, 1) for x in ((a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca))])
    v = v / np.linalg.norm(v, axis=1, keepdims=True) * radius
    return TexturedMesh(v.astype(np.float32), f.astype(np.int32), np.full((len(f), 3, 2), 0.5, np.float32),
                        np.full((4, 4, 3), 128, np.uint8))


def test_plane_depth_is_its_distance_and_its_corners_project_by_the_pinhole():
    with ScanRenderer(RenderOptions.ideal()) as renderer:
        result = renderer.process(square(), RenderPose(distance_mm=700.0))
    frame = result.frame
    assert frame.color.shape == (480, 640, 3) and frame.depth.dtype == np.uint16
    assert frame.depth_scale == 0.001 and frame.intrinsics == K
    assert np.allclose(result.depth_true_mm[result.hit], 700.0, atol=1e-3)
    assert (frame.depth[result.hit] == 700).all() and (frame.depth[~result.hit] == 0).all()
    # corners: x = fx * X / Z + ppx, with the subject's left (+x) on the image right, +y up = image up
    corners = result.landmarks_px["corners"]
    expected = np.array([[K.ppx - K.fx * 50 / 700, K.ppy - K.fy * 50 / 700],
                         [K.ppx + K.fx * 50 / 700, K.ppy - K.fy * 50 / 700]])
    assert np.allclose(corners[:2], expected, atol=1e-3)
    cols = np.flatnonzero(result.hit.any(axis=0))
    rows = np.flatnonzero(result.hit.any(axis=1))
    assert abs(cols[0] - expected[0, 0]) <= 1 and abs(cols[-1] - expected[1, 0]) <= 1
    assert abs(rows[0] - expected[0, 1]) <= 1


def test_sphere_depth_matches_ray_sphere_intersection():
    radius, distance = 80.0, 600.0
    with ScanRenderer(RenderOptions.ideal()) as renderer:
        result = renderer.process(sphere(radius), RenderPose(distance_mm=distance))
    rows, cols = np.nonzero(result.hit)
    d = np.stack([(cols - K.ppx) / K.fx, (rows - K.ppy) / K.fy, np.ones(len(rows))], 1)
    # |t d - c|^2 = r^2 with c = (0, 0, distance): nearest root
    a, b, c = (d * d).sum(1), -2 * distance * d[:, 2], distance**2 - radius**2
    z = (-b - np.sqrt(np.maximum(b * b - 4 * a * c, 0))) / (2 * a)
    miss = distance * np.linalg.norm(d[:, :2], axis=1) / np.linalg.norm(d, axis=1)  # ray's distance to the centre
    inner = miss < 0.9 * radius  # away from the rim, where the facets' sag shows most
    err = np.abs(result.depth_true_mm[rows, cols] - z)[inner]
    assert err.max() < 0.3  # facet sag of a 5-times subdivided icosphere
    assert abs(result.depth_true_mm[int(K.ppy), int(K.ppx)] - (distance - radius)) < 0.1


def test_marked_texture_corner_lands_top_left_and_colour_is_lit():
    texture = np.full((64, 64, 3), 60, np.uint8)
    texture[:32, :32] = (255, 0, 0)  # uv (0..0.5, 0..0.5) with v from the top: the top-left quarter
    with ScanRenderer(RenderOptions.ideal(ambient=0.0, diffuse=1.0)) as renderer:
        result = renderer.process(square(texture=texture), RenderPose(distance_mm=700.0))
    color = result.frame.color
    cx, cy, q = int(K.ppx), int(K.ppy), 20
    assert tuple(color[cy - q, cx - q]) == (255, 0, 0)  # frontal light on a frontal plane: full texture
    assert tuple(color[cy - q, cx + q]) == (60, 60, 60)
    assert tuple(color[cy + q, cx - q]) == (60, 60, 60)
    with ScanRenderer(RenderOptions.ideal(ambient=0.0, diffuse=1.0, light_direction=(0.0, -1.0, -1.0))) as renderer:
        oblique = renderer.process(square(texture=texture), RenderPose(distance_mm=700.0)).frame.color
    assert abs(int(oblique[cy - q, cx - q, 0]) - 255 / 2**0.5) <= 1.5  # Lambert: cos 45 deg


def test_yaw_turns_the_front_toward_the_image_right_and_tilts_the_plane():
    nose = square()
    nose.landmarks = {"tip": np.array([[0.0, 0.0, 100.0]], np.float32)}
    with ScanRenderer(RenderOptions.ideal()) as renderer:
        result = renderer.process(nose, RenderPose(yaw=30, distance_mm=700.0, pivot=(0.0, 0.0, 0.0)))
    tip = result.landmarks_camera_mm["tip"][0]
    assert np.allclose(tip, [100 * np.sin(np.radians(30)), 0.0, 700 - 100 * np.cos(np.radians(30))], atol=1e-3)
    assert result.landmarks_px["tip"][0, 0] > K.ppx
    # the plane turned with it: its image-right half (subject's left) went away from the camera
    row = int(K.ppy)
    z_left, z_right = result.depth_true_mm[row, int(K.ppx) - 20], result.depth_true_mm[row, int(K.ppx) + 20]
    assert z_right > 700 > z_left


def test_depth_noise_grows_with_distance_squared():
    options = RenderOptions.ideal(depth_noise=True, seed=1)
    sigmas = {}
    with ScanRenderer(options) as renderer:
        for z in (500.0, 1000.0):
            result = renderer.process(square(300.0), RenderPose(distance_mm=z))
            err = result.frame.depth_mm()[result.hit] - result.depth_true_mm[result.hit]
            sigmas[z] = err.std()
            expected = z**2 * options.subpixel / (options.depth_focal_px * options.baseline_mm)
            assert abs(sigmas[z] - expected) < 0.15 * expected + 0.3  # + 1 mm quantisation
    assert 3.0 < sigmas[1000.0] / sigmas[500.0] < 5.0


def test_dropout_edge_holes_and_range_limits():
    with ScanRenderer(RenderOptions.ideal(dropout=0.2, seed=2)) as renderer:
        result = renderer.process(square(200.0), RenderPose(distance_mm=700.0))
    lost = (result.frame.depth == 0)[result.hit].mean()
    assert 0.17 < lost < 0.23
    with ScanRenderer(RenderOptions.ideal(edge_holes_px=2)) as renderer:
        result = renderer.process(square(), RenderPose(distance_mm=700.0))
    rows = np.flatnonzero(result.hit[:, int(K.ppx)])
    column = result.frame.depth[:, int(K.ppx)]
    assert (column[rows[:2]] == 0).all() and (column[rows[-2:]] == 0).all()  # silhouette pixels lost
    assert (column[rows[3:-3]] > 0).all()
    with ScanRenderer(RenderOptions.ideal(min_depth_mm=800.0)) as renderer:
        assert (renderer.process(square(), RenderPose(distance_mm=700.0)).frame.depth == 0).all()


def test_stereo_shadow_band_left_of_a_near_object_has_the_disparity_width():
    near, wall = 500.0, 800.0
    options = RenderOptions.ideal(stereo_shadow=True, background_depth_mm=wall)
    with ScanRenderer(options) as renderer:
        result = renderer.process(square(50.0), RenderPose(distance_mm=near))
    depth = result.frame.depth
    row = int(K.ppy)
    left_edge = np.flatnonzero(result.hit[row])[0]
    band = np.flatnonzero(depth[row, :left_edge] == 0)
    width = K.fx * options.baseline_mm * (1 / near - 1 / wall)  # disparity difference, colour pixels
    assert abs(len(band) - width) <= 1.5 and band[-1] == left_edge - 1
    right_edge = np.flatnonzero(result.hit[row])[-1]
    assert (depth[row, right_edge + 1:] == wall).all()  # no band on the right
    assert (depth[row, left_edge:right_edge + 1] == near).all()
    # mirrored geometry with the second imager on the other side: the mirrored band
    scene = np.where(result.hit, result.depth_true_mm, wall).astype(np.float32)
    band_left = stereo_shadow(scene, K.fx * options.baseline_mm, "left")
    band_mirror = stereo_shadow(np.ascontiguousarray(scene[:, ::-1]), K.fx * options.baseline_mm, "right")[:, ::-1]
    assert band_left.any() and (band_left == band_mirror).all()


def test_options_are_checked_and_helpers_behave():
    with pytest.raises(ValueError, match="background"):
        RenderOptions(background="sky")
    with pytest.raises(ValueError, match="shadow_side"):
        RenderOptions(shadow_side="up")
    mesh = square()
    n = vertex_normals(mesh.vertices, mesh.triangles)
    assert np.allclose(n, [0, 0, 1], atol=1e-6)
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 10
    assert np.allclose(sample_bilinear(img, np.array([0.5]), np.array([0.0]))[0], (img[0, 0] + img[0, 1]) / 2)


def test_renders_the_ict_head_with_plausible_depth_and_the_same_scene_for_many_poses():
    from train.face_model import FaceModel

    model = FaceModel.load()
    rng = np.random.default_rng(0)
    mesh = model.mesh(model.random_identity(rng), None, model.procedural_texture(rng))
    with ScanRenderer(RenderOptions(seed=0)) as renderer:
        first = renderer.process(mesh, RenderPose(distance_mm=600.0))
        scene = renderer._scene
        second = renderer.process(mesh, RenderPose(yaw=20, distance_mm=600.0))
        assert renderer._scene is scene  # built once per mesh
    for result in (first, second):
        depth = result.frame.depth_mm()
        valid = depth > 0
        assert 0.1 < valid.mean() < 0.5
        assert 450 < np.percentile(depth[valid], 5) and np.percentile(depth[valid], 95) < 750
        assert result.landmarks_visible["nose_tip"][0]
    nose = first.landmarks_px["nose_tip"][0]
    assert abs(nose[0] - K.ppx) < 25  # the head's bounding-box centre is on the optical axis


# ---------------------------------------------------------------- the ICT face model
@pytest.fixture(scope="module")
def ict():
    from train.face_model import FaceModel

    return FaceModel.load()


def test_vendored_model_is_in_millimetres_with_consistent_indices(ict):
    v = ict.vertices()
    lm = v[ict.landmarks_multipie68]
    assert abs(lm[30, 2] - 130.7) < 0.5  # nose tip 13.07 cm in front of the head centre
    assert abs(np.linalg.norm(lm[36] - lm[45]) - 89.2) < 1.0  # outer eye corners 8.9 cm apart
    assert lm[45, 0] > 0 > lm[36, 0]  # +x is the subject's left
    assert ict.triangles.min() >= 0 and ict.triangles.max() < len(v)
    assert np.isin(np.arange(len(v)), ict.triangles).all()  # no vertex left without a triangle
    assert ict.uv.shape == (len(ict.triangles), 3, 2) and 0 <= ict.uv.min() and ict.uv.max() <= 1
    normals = vertex_normals(v, ict.triangles)
    assert normals[ict.landmarks_multipie68[30], 2] > 0.9  # counter-clockwise = outward at the nose


def test_vendor_script_reproduces_the_vendored_arrays(tmp_path):
    import importlib.util
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "shared" / "assets" / "ict-facekit" / "face_model.npz"
    if not source.exists():
        pytest.skip(f"{source} (the shared source asset) is not on this machine")
    script = Path(__file__).parents[1] / "train" / "assets" / "ict_facekit" / "vendor.py"
    spec = importlib.util.spec_from_file_location("vendor", script)
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    counts = vendor.vendor(source, tmp_path / "ict.npz")
    assert counts["vertices"] == 16744 and counts["bytes"] < 10_000_000
    with np.load(tmp_path / "ict.npz") as new, np.load(script.with_name("ict_face.npz")) as shipped:
        for key in shipped.files:
            assert np.array_equal(new[key], shipped[key]), key
    with np.load(source) as src, np.load(script.with_name("ict_face.npz")) as shipped:
        kept = shipped["source_vertex"]
        assert np.array_equal(src["neutral"][kept], shipped["neutral"])  # re-indexing kept vertex identity
        assert np.array_equal(kept[shipped["landmarks_multipie68"]], src["landmarks_multipie68"])


def test_expression_weights_scale_jitter_and_deform(ict):
    from train.face_model import expression_weights

    assert expression_weights("neutral") == {}
    happy = expression_weights("happiness")
    assert happy["mouthSmile_L"] == happy["mouthSmile_R"] == 0.9
    half = expression_weights("happiness", 0.5)
    assert half["mouthSmile_L"] == pytest.approx(0.45)
    jittered = expression_weights("surprise", 1.0, np.random.default_rng(0))
    assert jittered["browInnerUp_L"] != jittered["browInnerUp_R"]
    assert all(0.0 <= w <= 1.0 for w in jittered.values())
    assert abs(jittered["jawOpen"] - 0.35) < 0.2
    with pytest.raises(ValueError, match="unknown expression"):
        expression_weights("contempt")
    with pytest.raises(ValueError, match="unknown ICT blendshape"):
        ict.vertices(expression_weights={"smile": 1.0})
    with pytest.raises(ValueError, match="identity"):
        ict.vertices(identity=np.zeros(3))
    chin = ict.landmarks_multipie68[8]
    drop = ict.vertices()[chin, 1] - ict.vertices(expression_weights=expression_weights("surprise"))[chin, 1]
    assert drop > 5  # jawOpen lowers the chin
    other = ict.vertices(ict.random_identity(np.random.default_rng(1)))
    assert 1.0 < np.abs(other - ict.neutral).mean() < 15.0


def test_procedural_textures_vary_and_follow_the_skin_tone(ict):
    light = ict.procedural_texture(np.random.default_rng(0), skin_tone=0.0)
    dark = ict.procedural_texture(np.random.default_rng(0), skin_tone=1.0)
    assert light.shape == (ict.tile_px, 4 * ict.tile_px, 3) and light.dtype == np.uint8
    tile = np.s_[:, : ict.tile_px]  # the face tile
    assert light[tile].mean() > dark[tile].mean() + 80
    again = ict.procedural_texture(np.random.default_rng(1), skin_tone=0.0)
    assert np.abs(again.astype(int) - light.astype(int)).mean() > 2
