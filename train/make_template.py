"""Build the canonical landmark template from the ICT neutral mean head.

Usage:
    python -m train.make_template            # writes realtime/assets/canonical_template.npz
    python -m train.make_template --out /tmp/t.npz --seeds 4

Then set ``realtime.spec.TEMPLATE_ID`` to the id this prints (tests/test_canonical.py checks it).

Steps: render the ICT neutral mean head (noise-free depth) at a few small yaw/pitch offsets with
a few procedural skins and light directions; run FaceMesh (static mode) on each; lift the 468
landmarks with the exact rendered depth and map them back into the head frame with the known
pose; take the per-landmark median over the renders. The result is made mirror-symmetric
(MediaPipe's left/right pairs are found by matching the mirrored points) and moved so that
landmark :data:`NOSE_INDEX` is the origin. Surface normals at the landmarks (from FaceMesh's
triangles) let the pose fit weigh distance along the surface less than distance off it.
Axes: +x subject's left, +y up, +z toward the camera, mm. ``ict_origin_mm`` records where the
origin sits on the ICT mean head (for tests that know the rendered pose).

The rigid-fit subset is :data:`FIT_LANDMARKS`; to check it, the same head is rendered with every
basic expression at full intensity and the largest head-frame motion of each landmark is stored
as ``expression_motion_mm``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION
from scipy.optimize import linear_sum_assignment

from realtime.canonical import TEMPLATE_PATH, template_id
from realtime.landmarks import NUM_LANDMARKS, LandmarkDetector, LandmarkOptions
from train.face_model import EXPRESSION_TABLE, FaceModel, expression_weights
from train.render import RenderOptions, RenderPose, RenderResult, ScanRenderer

NOSE_INDEX = 4  # the most forward FaceMesh landmark on the ICT head (landmark 1 is 6 mm lower, 2 mm behind)
POSE_OFFSETS = ((0, 0), (-6, 0), (6, 0), (0, -5), (0, 5))  # (yaw, pitch) degrees
# The pose is fitted on these (expression-invariant, spread in x, y and z so that pitch is well
# conditioned): eye corners and canthi, the nose from bridge to tip, the forehead. Chosen by anatomy and
# checked with the measured FaceMesh motion under the ICT expressions (``expression_motion_mm``:
# 1-3.5 mm for these, except the nose tip, 5 mm under noseSneer, and the upper forehead, 3-5 mm under
# brow raises, which the robust fit drops when they move). Left out: mouth, jaw, cheeks (5-7 mm under a
# smile), brows and lids, the face contour (its depth is the silhouette's) and the temples (hair, and
# hidden at moderate yaw). Eye-level points alone leave pitch nearly free; the forehead fixes it.
FIT_LANDMARKS = (33, 133, 362, 263, 243, 463, 130, 359,  # eye corners and canthi
                 168, 6, 197, 195, 5, 4,  # nose: bridge to tip
                 151, 9, 108, 337, 69, 299, 10, 338, 109, 104, 333, 67, 297)  # forehead
MAX_BROKEN_EDGES = 10  # FaceMesh's tessellation has 6 diagonals that are not mirror images
LIGHTS = ((0.0, 0.0, -1.0), (-0.4, -0.3, -1.0), (0.4, -0.3, -1.0))


def lift_exact(result: RenderResult, points: np.ndarray) -> np.ndarray:
    """Landmark pixels (N, 2) -> head-frame points (N, 3) mm using the noise-free depth.

    Bilinear depth where the 2x2 neighbourhood is one surface (within 3 mm), else the nearest
    pixel's; NaN where there is no depth.
    """
    depth = result.depth_true_mm
    x, y = points[:, 0], points[:, 1]
    x0 = np.clip(np.floor(x).astype(int), 0, depth.shape[1] - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, depth.shape[0] - 2)
    fx, fy = x - x0, y - y0
    quad = np.stack([depth[y0, x0], depth[y0, x0 + 1], depth[y0 + 1, x0], depth[y0 + 1, x0 + 1]], 1)
    w = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    smooth = (quad > 0).all(1) & (np.ptp(quad, axis=1) < 3.0)
    z = np.where(smooth, (quad * w).sum(1), quad[np.arange(len(quad)), w.argmax(1)])
    z = np.where(z > 0, z, np.nan)
    cam = result.frame.intrinsics.backproject(x, y, z).astype(np.float64)
    return (cam - result.translation) @ result.rotation  # rotation is orthonormal: inverse = transpose


def landmarks_in_head_frame(model: FaceModel, detector: LandmarkDetector, renderer: ScanRenderer,
                            expression: dict[str, float] | None, seeds: int) -> np.ndarray:
    """Median head-frame landmarks (468, 3) over pose offsets, skins and lights (NaN if never lifted)."""
    samples = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        mesh = model.mesh(None, expression, model.procedural_texture(rng, skin_tone=0.15 + 0.2 * seed))
        for i, (yaw, pitch) in enumerate(POSE_OFFSETS):
            renderer.options.light_direction = LIGHTS[(i + seed) % len(LIGHTS)]
            result = renderer.process(mesh, RenderPose(yaw=yaw, pitch=pitch, distance_mm=550.0))
            faces = detector.process(result.frame)
            if faces:
                samples.append(lift_exact(result, faces[0].points))
    if not samples:
        raise RuntimeError("FaceMesh found no face in any template render")
    samples = np.stack(samples)  # (R, 468, 3)
    lifted = np.isfinite(samples[..., 2]).any(axis=0)
    out = np.full(samples.shape[1:], np.nan)
    out[lifted] = np.nanmedian(samples[:, lifted], axis=0)
    return out


def mirror_pairs(points: np.ndarray, bonus_mm: float = 5.0, iterations: int = 5) -> np.ndarray:
    """For each landmark, the index of its left/right partner (itself on the midline) (468,).

    An assignment on the mirrored (x, y) positions (the lifted depth of silhouette landmarks is
    unreliable), re-solved a few times with a bonus of ``bonus_mm`` per mesh neighbour whose
    partner is a neighbour of the candidate, so that the pairing follows FaceMesh's topology
    where the geometry is ambiguous (the face contour).
    """
    n = len(points)
    edges = np.array(sorted(FACEMESH_TESSELATION))
    adjacency = np.zeros((n, n))
    adjacency[edges[:, 0], edges[:, 1]] = adjacency[edges[:, 1], edges[:, 0]] = 1.0
    xy = points[:, :2]
    cost = np.linalg.norm(xy[:, None, :] - xy[None, :, :] * np.array([-1.0, 1.0]), axis=-1)  # (n, n)
    partner = linear_sum_assignment(cost)[1]
    for _ in range(iterations):
        permutation = np.zeros((n, n))
        permutation[np.arange(n), partner] = 1.0
        agree = adjacency @ permutation @ adjacency  # [i, j]: neighbours of i whose partner neighbours j
        new = linear_sum_assignment(cost - bonus_mm * agree)[1]
        if (new == partner).all():
            break
        partner = new
    return partner


def tessellation_triangles() -> np.ndarray:
    """FaceMesh's triangles (T, 3), recovered from its edge list (every 3-cycle)."""
    neighbours = [set() for _ in range(NUM_LANDMARKS)]
    for a, b in FACEMESH_TESSELATION:
        neighbours[a].add(b)
        neighbours[b].add(a)
    triangles = {tuple(sorted((a, b, c))) for a, b in FACEMESH_TESSELATION for c in neighbours[a] & neighbours[b]}
    return np.array(sorted(triangles))


def landmark_normals(points: np.ndarray, head_centre: tuple[float, float, float] = (0.0, 10.0, -100.0)) -> np.ndarray:
    """Unit outward surface normals (468, 3) of the template, area-weighted over FaceMesh's triangles.

    Outward = away from a point inside the head (the 3-cycles carry no orientation).
    """
    tri = tessellation_triangles()
    corners = points[tri]  # (T, 3, 3)
    face = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    face *= np.sign(np.sum(face * (corners.mean(axis=1) - np.asarray(head_centre)), axis=1))[:, None]
    normals = np.zeros_like(points)
    for k in range(3):
        np.add.at(normals, tri[:, k], face)
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def broken_edges(partner: np.ndarray) -> int:
    """How many FaceMesh edges do not map onto edges under ``partner`` (the mesh itself has 6 flips)."""
    edges = {tuple(e) for e in np.sort(np.array(sorted(FACEMESH_TESSELATION)), axis=1).tolist()}
    return sum(tuple(sorted((int(partner[a]), int(partner[b])))) not in edges for a, b in edges)


def symmetrise(points: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Average each point with its mirrored partner: an exactly mirror-symmetric template."""
    sym = 0.5 * (points + points[partner] * np.array([-1.0, 1.0, 1.0]))
    sym[partner == np.arange(len(points)), 0] = 0.0
    return sym


def build(seeds: int) -> dict[str, np.ndarray]:
    """All template arrays (see ``realtime.canonical.CanonicalTemplate``)."""
    model = FaceModel.load()
    options = RenderOptions.ideal(background="flat", ambient=0.4, diffuse=0.7)
    with LandmarkDetector(LandmarkOptions(static_image_mode=True)) as detector, ScanRenderer(options) as renderer:
        neutral = landmarks_in_head_frame(model, detector, renderer, None, seeds)
        motion = np.zeros(NUM_LANDMARKS)
        for name in EXPRESSION_TABLE:
            if name != "neutral":
                moved = landmarks_in_head_frame(model, detector, renderer, expression_weights(name), 1)
                motion = np.maximum(motion, np.linalg.norm(moved - neutral, axis=1))
    if np.isnan(neutral).any():
        raise RuntimeError(f"landmarks without depth in every render: {np.flatnonzero(np.isnan(neutral).any(1))}")
    partner = mirror_pairs(neutral)  # the ICT head is mirror-symmetric about x = 0
    if not (partner[partner] == np.arange(NUM_LANDMARKS)).all() or broken_edges(partner) > MAX_BROKEN_EDGES:
        raise RuntimeError(f"left/right landmark matching failed ({broken_edges(partner)} edges broken)")
    points = symmetrise(neutral, partner)
    origin = points[NOSE_INDEX].copy()  # where the canonical origin sits on the ICT mean head (mm)
    points -= origin
    motion = np.maximum(np.nan_to_num(motion, nan=np.inf), np.nan_to_num(motion[partner], nan=np.inf))
    if set(partner[list(FIT_LANDMARKS)].tolist()) != set(FIT_LANDMARKS):
        raise RuntimeError("FIT_LANDMARKS is not mirror-symmetric")
    return {"points": points.astype(np.float32), "normals": landmark_normals(points).astype(np.float32),
            "fit_indices": np.array(FIT_LANDMARKS, np.int32),
            "mirror": partner.astype(np.int32), "nose_index": np.array(NOSE_INDEX, np.int32),
            "ict_origin_mm": origin.astype(np.float32),
            "expression_motion_mm": motion.astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE_PATH)
    parser.add_argument("--seeds", type=int, default=3, help="procedural skins per pose")
    args = parser.parse_args()
    arrays = build(args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    motion = arrays["expression_motion_mm"][arrays["fit_indices"]]
    print(f"fit landmarks move {motion.min():.1f}..{motion.max():.1f} mm (median {np.median(motion):.1f}) "
          "under the basic expressions")
    print(f"{args.out}: TEMPLATE_ID = {template_id(args.out)!r}")


if __name__ == "__main__":
    main()
