"""RealSense-like aligned RGB-D frames of a textured mesh, by ray casting (Open3D, CPU).

Usage:
    from train.render import RenderOptions, RenderPose, ScanRenderer
    with ScanRenderer(RenderOptions(seed=0)) as renderer:
        result = renderer.process(mesh, RenderPose(yaw=20, distance_mm=600))
        frame = result.frame  # realtime.frames.RGBDFrame, depth aligned to colour

    python -m train.render --out /tmp/render.png      # render a test head and save colour | depth

The mesh (any :class:`~train.mesh.TexturedMesh`: mm, +x subject's left, +y up, +z toward the
viewer) is rotated about its pivot by the pose (yaw/pitch/roll as
:func:`realtime.canonical.rotation_from_angles`) and the pivot is put at ``offset_mm`` /
``distance_mm`` in the camera frame (x right, y down, z forward). One primary ray per pixel
through the pixel centre gives the hit triangle; colour = texture (bilinear, barycentric UVs)
x (ambient + Lambert + a little Blinn-Phong) with smooth vertex normals, depth = the hit's
camera z. The depth then gets what a D4xx does to it: noise whose sigma grows with z^2,
holes at depth edges, random dropouts, and the stereo shadow band beside near objects.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from calib.camera import D4XX_COLOR_640x480, CameraIntrinsics
from realtime.canonical import CAMERA_FROM_HEAD, rotation_from_angles
from realtime.frames import RGBDFrame
from train.mesh import TexturedMesh


def random_light_direction(rng: np.random.Generator, spread_deg: float) -> tuple[float, float, float]:
    """A unit vector toward the light (camera frame), uniform over the cap within ``spread_deg``
    of the camera axis (the sqrt makes it uniform over the cap's area, not its angle)."""
    theta = np.radians(spread_deg) * np.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2.0 * np.pi)
    return (float(np.sin(theta) * np.cos(phi)), float(np.sin(theta) * np.sin(phi)), -float(np.cos(theta)))


@dataclass
class RenderPose:
    """Where the head is: rotation about ``pivot`` (degrees), then the pivot's camera position (mm)."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    distance_mm: float = 600.0  # camera z of the pivot
    offset_mm: tuple[float, float] = (0.0, 0.0)  # camera x (right), y (down) of the pivot
    pivot: tuple[float, float, float] | None = None  # mesh point (mm); None = bounding-box centre


@dataclass
class RenderOptions:
    """Camera, lighting, background and D4xx depth artefacts. ``RenderOptions.ideal()`` turns all off."""

    intrinsics: CameraIntrinsics = D4XX_COLOR_640x480
    depth_scale: float = 0.001  # metres per raw unit (1 mm, as a D4xx by default)
    min_depth_mm: float = 280.0  # D4xx minimum range at 640x480; nearer -> 0
    max_depth_mm: float = 4000.0
    # lighting: colour = texture * (ambient + diffuse * max(0, n.l)) + 255 * specular * (n.h)^shininess
    ambient: float = 0.45
    diffuse: float = 0.65
    specular: float = 0.06
    shininess: float = 24.0
    light_direction: tuple[float, float, float] | None = None  # toward the light, camera frame; None = random
    light_spread_deg: float = 40.0  # random lights: up to this far from the camera axis
    # background: "noise" (random smooth colours), "flat" (background_color) or "black"
    background: str = "noise"
    background_color: tuple[int, int, int] = (120, 120, 120)
    background_depth_mm: float | None = None  # a fronto-parallel wall at this z (None: no depth)
    color_noise: float = 2.0  # sensor noise, std in 8-bit levels
    # depth artefacts
    depth_noise: bool = True
    subpixel: float = 0.08  # disparity noise (px); sigma_z = z^2 * subpixel / (depth_focal_px * baseline_mm)
    baseline_mm: float = 50.0
    depth_focal_px: float = 385.0  # focal length of the depth imagers; sets the noise's grain
    edge_jump_mm: float = 15.0  # neighbours further apart than this are a depth edge ...
    edge_holes_px: int = 1  # ... and this many pixels around it lose their depth
    dropout: float = 0.005  # fraction of pixels lost at random
    dropout_blobs: int = 3  # random round holes (2-6 px radius) on the object
    stereo_shadow: bool = True
    shadow_side: str = "left"  # the side of a near object where the shadow band falls (left imager = origin)
    seed: int | None = None  # None: a fresh random stream

    @classmethod
    def ideal(cls, **changes) -> "RenderOptions":
        """Noise-free: fixed frontal light, black background, exact depth (for tests and templates)."""
        base = dict(light_direction=(0.0, 0.0, -1.0), background="black", color_noise=0.0, depth_noise=False,
                    edge_holes_px=0, dropout=0.0, dropout_blobs=0, stereo_shadow=False, specular=0.0)
        base.update(changes)
        return cls(**base)

    def __post_init__(self) -> None:
        if self.background not in ("noise", "flat", "black"):
            raise ValueError(f"background must be 'noise', 'flat' or 'black', got {self.background!r}")
        if self.shadow_side not in ("left", "right"):
            raise ValueError(f"shadow_side must be 'left' or 'right', got {self.shadow_side!r}")


@dataclass
class RenderResult:
    """One rendered frame and its ground truth."""

    frame: RGBDFrame
    depth_true_mm: np.ndarray  # (H, W) float32 noise-free camera z (0 where the mesh is not hit)
    hit: np.ndarray  # (H, W) bool, the mesh covers the pixel
    rotation: np.ndarray  # (3, 3) mesh -> camera: p_cam = rotation @ p_mesh + translation
    translation: np.ndarray  # (3,) mm
    landmarks_px: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, 2) pixel x, y
    landmarks_camera_mm: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, 3)
    landmarks_visible: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) bool, not occluded


class ScanRenderer:
    """Renders meshes as a D4xx colour camera with aligned depth would see them.

    The ray-casting scene is built once per mesh object and reused while the same object is
    passed again (treat meshes as immutable), so many poses of one scan are cheap.
    """

    def __init__(self, options: RenderOptions | None = None) -> None:
        import open3d as o3d  # training-only dependency, imported where it is used

        self._o3d = o3d
        self.options = options or RenderOptions()
        self.rng = np.random.default_rng(self.options.seed)
        k = self.options.intrinsics
        cols, rows = np.meshgrid(np.arange(k.width, dtype=np.float32), np.arange(k.height, dtype=np.float32))
        self._dirs = np.stack([(cols - k.ppx) / k.fx, (rows - k.ppy) / k.fy, np.ones_like(cols)], -1)  # (H, W, 3)
        self._mesh: TexturedMesh | None = None
        self._scene = None
        self._normals: np.ndarray | None = None

    def __enter__(self) -> "ScanRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cached scene."""
        self._mesh = self._scene = self._normals = None

    def _set_mesh(self, mesh: TexturedMesh) -> None:
        if mesh is self._mesh:
            return
        o3d = self._o3d
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, np.float32)),
                            o3d.core.Tensor(np.ascontiguousarray(mesh.triangles, np.uint32)))
        self._scene, self._mesh = scene, mesh
        self._normals = vertex_normals(mesh.vertices, mesh.triangles)

    def process(self, mesh: TexturedMesh, pose: RenderPose | None = None, sequence: int = 0) -> RenderResult:
        """Render ``mesh`` at ``pose`` (default: frontal at 600 mm)."""
        pose = pose or RenderPose()
        opt, k = self.options, self.options.intrinsics
        self._set_mesh(mesh)
        pivot = (np.asarray(pose.pivot, np.float64) if pose.pivot is not None
                 else 0.5 * (mesh.vertices.min(0) + mesh.vertices.max(0)).astype(np.float64))
        rotation = CAMERA_FROM_HEAD @ rotation_from_angles(pose.yaw, pose.pitch, pose.roll)  # mesh -> camera
        cam_pivot = np.array([pose.offset_mm[0], pose.offset_mm[1], pose.distance_mm])
        translation = cam_pivot - rotation @ pivot

        # Rays in the mesh frame; directions keep camera z = 1 so that t_hit is the camera z.
        origin = -rotation.T @ translation  # camera centre in the mesh frame
        dirs = (self._dirs.reshape(-1, 3) @ rotation.astype(np.float32)).reshape(self._dirs.shape)
        rays = np.concatenate([np.broadcast_to(origin.astype(np.float32), dirs.shape), dirs], -1)
        cast = self._scene.cast_rays(self._o3d.core.Tensor(np.ascontiguousarray(rays)))
        z = cast["t_hit"].numpy()  # (H, W)
        hit = np.isfinite(z)
        prim = cast["primitive_ids"].numpy()[hit].astype(np.int64)
        bary = cast["primitive_uvs"].numpy()[hit]  # point = (1-a-b) p0 + a p1 + b p2
        weights = np.stack([1.0 - bary[:, 0] - bary[:, 1], bary[:, 0], bary[:, 1]], -1)  # (N, 3)

        color = self._background(k.height, k.width)
        shaded = self._shade(mesh, prim, weights, rotation, self._dirs[hit])
        color[hit] = shaded
        if opt.color_noise > 0:
            color += np.float32(opt.color_noise) * self.rng.standard_normal(color.shape, dtype=np.float32)
        color = np.clip(color + 0.5, 0, 255).astype(np.uint8)

        depth_true = np.where(hit, z, 0.0).astype(np.float32)
        depth = depth_true.copy()
        if opt.background_depth_mm is not None:
            depth[~hit] = opt.background_depth_mm
        depth = self._depth_artefacts(depth)
        depth[(depth < opt.min_depth_mm) | (depth > opt.max_depth_mm)] = 0.0
        raw = np.round(depth / (opt.depth_scale * 1000.0)).clip(0, 65535).astype(np.uint16)

        result = RenderResult(
            frame=RGBDFrame(color=color, depth=raw, depth_scale=opt.depth_scale, intrinsics=k, sequence=sequence),
            depth_true_mm=depth_true, hit=hit, rotation=rotation, translation=translation)
        for name, points in (mesh.landmarks or {}).items():
            cam = np.asarray(points, np.float64).reshape(-1, 3) @ rotation.T + translation
            px = k.project(cam)
            result.landmarks_camera_mm[name] = cam.astype(np.float32)
            result.landmarks_px[name] = px
            result.landmarks_visible[name] = _visible(px, cam[:, 2], depth_true)
        return result

    def _background(self, h: int, w: int) -> np.ndarray:
        opt = self.options
        if opt.background == "black":
            return np.zeros((h, w, 3), np.float32)
        if opt.background == "flat":
            return np.broadcast_to(np.asarray(opt.background_color, np.float32), (h, w, 3)).copy()
        # smooth random colour field: a few blobs of colour at 1/16 resolution, upsampled
        small = self.rng.uniform(20, 235, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
        small = cv2.GaussianBlur(small, (0, 0), self.rng.uniform(1.0, 3.0))
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

    def _shade(self, mesh: TexturedMesh, prim: np.ndarray, weights: np.ndarray, rotation: np.ndarray,
               view_dirs: np.ndarray) -> np.ndarray:
        """Texture x lighting for the hit pixels (N, 3) float32."""
        opt = self.options
        uv = np.einsum("nk,nkc->nc", weights, mesh.uv[prim])  # (N, 2)
        th, tw = mesh.texture.shape[:2]
        tex = sample_bilinear(mesh.texture, uv[:, 0] * tw - 0.5, uv[:, 1] * th - 0.5)  # (N, 3)
        corners = mesh.triangles[prim]  # (N, 3)
        n = np.einsum("nk,nkc->nc", weights, self._normals[corners]) @ rotation.T.astype(np.float32)
        n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
        view = -view_dirs / np.linalg.norm(view_dirs, axis=1, keepdims=True)  # toward the camera
        n *= np.where(np.sum(n * view, axis=1) < 0, -1.0, 1.0)[:, None]  # two-sided (inside of the mouth)
        light = self._light_direction()
        diffuse = np.clip(n @ light, 0.0, None)
        half = light[None, :] + view
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        spec = np.clip(np.sum(n * half, axis=1), 0.0, None) ** opt.shininess
        return tex * (opt.ambient + opt.diffuse * diffuse)[:, None] + 255.0 * opt.specular * spec[:, None]

    def _light_direction(self) -> np.ndarray:
        opt = self.options
        if opt.light_direction is not None:
            light = np.asarray(opt.light_direction, np.float32)
        else:
            light = np.asarray(random_light_direction(self.rng, opt.light_spread_deg), np.float32)
        return light / np.linalg.norm(light)

    def _depth_artefacts(self, depth: np.ndarray) -> np.ndarray:
        """D4xx-like noise and holes on a (H, W) mm depth image (0 = none)."""
        opt, k, rng = self.options, self.options.intrinsics, self.rng
        valid = depth > 0
        h, w = depth.shape
        if opt.depth_noise:
            # noise is drawn on the depth imager's coarser grid and upsampled: neighbouring colour
            # pixels share a stereo match, so their errors are correlated as a real camera's are
            scale = min(1.0, opt.depth_focal_px / k.fx)
            coarse = rng.standard_normal((max(2, int(h * scale)), max(2, int(w * scale)))).astype(np.float32)
            noise = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
            noise /= noise.std() + 1e-6
            sigma = depth**2 * opt.subpixel / (opt.depth_focal_px * opt.baseline_mm)
            depth = np.where(valid, depth + sigma * noise, 0.0).astype(np.float32)
        holes = np.zeros((h, w), bool)
        if opt.edge_holes_px > 0:
            holes |= cv2.dilate(depth_edges(depth, opt.edge_jump_mm).astype(np.uint8),
                                np.ones((2 * opt.edge_holes_px + 1,) * 2, np.uint8)).astype(bool)
        if opt.stereo_shadow:
            holes |= stereo_shadow(depth, k.fx * opt.baseline_mm, opt.shadow_side)
        if opt.dropout > 0:
            holes |= rng.uniform(size=(h, w)) < opt.dropout
        ys, xs = np.nonzero(valid)
        for _ in range(opt.dropout_blobs if len(ys) else 0):
            i = rng.integers(len(ys))
            cv2.circle(holes.view(np.uint8), (int(xs[i]), int(ys[i])), int(rng.integers(2, 7)), 1, -1)
        depth[holes] = 0.0
        return depth


def sample_bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` (H, W, C) at pixel coordinates x, y (N,), edges replicated -> (N, C) float32."""
    n, width = len(x), 4096  # cv2.remap wants maps narrower than 32767: fold the points into rows
    rows = -(-n // width)
    pad = rows * width - n
    mx = np.pad(np.asarray(x, np.float32), (0, pad)).reshape(rows, width)
    my = np.pad(np.asarray(y, np.float32), (0, pad)).reshape(rows, width)
    out = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * width, -1)[:n].astype(np.float32)


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) float32 (outward for counter-clockwise triangles)."""
    v = vertices.astype(np.float64)
    face_n = np.cross(v[triangles[:, 1]] - v[triangles[:, 0]], v[triangles[:, 2]] - v[triangles[:, 0]])
    normals = np.zeros_like(v)
    for corner in range(3):
        for axis in range(3):
            normals[:, axis] += np.bincount(triangles[:, corner], face_n[:, axis], minlength=len(v))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    return normals.astype(np.float32)


def depth_edges(depth: np.ndarray, jump_mm: float) -> np.ndarray:
    """Pixels with a 4-neighbour more than ``jump_mm`` nearer or farther, or at a valid/invalid border."""
    edges = np.zeros(depth.shape, bool)
    for a, b in ((np.s_[:, 1:], np.s_[:, :-1]), (np.s_[1:, :], np.s_[:-1, :])):
        da, db = depth[a], depth[b]
        jump = ((da > 0) != (db > 0)) | (np.abs(da - db) > jump_mm)
        edges[a] |= jump & (da > 0)
        edges[b] |= jump & (db > 0)
    return edges


def stereo_shadow(depth: np.ndarray, focal_baseline: float, side: str = "left", max_shift: int = 64) -> np.ndarray:
    """Pixels the second imager cannot see because a nearer surface beside them blocks it.

    With the second imager to the right of the reference one (a D4xx), a pixel at column x with
    disparity d(x) = focal_baseline / z is hidden when a pixel s columns to its right has
    d(x + s) - s >= d(x): the band falls on the left of near objects (``side="left"``).

    Args:
        depth: (H, W) mm, 0 = none.
        focal_baseline: focal length (px of this image) x baseline (mm).
        side: where the band falls, ``"left"`` or ``"right"``.
        max_shift: widest band considered (px).

    Returns:
        (H, W) bool.
    """
    disparity = np.where(depth > 0, focal_baseline / np.maximum(depth, 1e-3), 0.0).astype(np.float32)
    if side == "right":
        disparity = disparity[:, ::-1]
    valid = disparity > 0
    if not valid.any():
        return np.zeros(depth.shape, bool)
    span = int(min(max_shift, np.ceil(disparity[valid].max() - disparity[valid].min())))
    blocker = np.full_like(disparity, -np.inf)  # max over s of d(x + s) - s
    for s in range(1, span + 1):
        np.maximum(blocker[:, :-s], disparity[:, s:] - s, out=blocker[:, :-s])
    shadow = valid & (blocker > disparity + 0.5)  # half a pixel of slack: smooth slopes are not shadows
    return shadow[:, ::-1] if side == "right" else shadow


def _visible(px: np.ndarray, z: np.ndarray, depth_true: np.ndarray, tolerance_mm: float = 5.0) -> np.ndarray:
    """Landmarks whose pixel shows their own surface (not something nearer, not off-image)."""
    h, w = depth_true.shape
    col, row = np.round(px[:, 0]).astype(int), np.round(px[:, 1]).astype(int)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    seen = np.zeros(len(px), bool)
    seen[inside] = np.abs(depth_true[row[inside], col[inside]] - z[inside]) < tolerance_mm
    return seen


def main() -> None:
    """Render the ICT mean head at a pose and save colour | depth side by side."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--yaw", type=float, default=0.0)
    parser.add_argument("--pitch", type=float, default=0.0)
    parser.add_argument("--roll", type=float, default=0.0)
    parser.add_argument("--distance", type=float, default=600.0, help="mm")
    parser.add_argument("--expression", default="neutral")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from train.face_model import FaceModel, expression_weights

    model = FaceModel.load()
    rng = np.random.default_rng(args.seed)
    mesh = model.mesh(None, expression_weights(args.expression), model.procedural_texture(rng))
    with ScanRenderer(RenderOptions(seed=args.seed)) as renderer:
        result = renderer.process(mesh, RenderPose(args.yaw, args.pitch, args.roll, args.distance))
    depth = result.frame.depth_mm()
    valid = depth > 0
    vis = np.zeros(depth.shape, np.uint8)
    if valid.any():
        lo, hi = np.percentile(depth[valid], [1, 99])
        vis[valid] = np.clip(255 * (hi - depth[valid]) / max(hi - lo, 1), 0, 255).astype(np.uint8)
    sheet = np.concatenate([result.frame.color, cv2.cvtColor(vis, cv2.COLOR_GRAY2RGB)], 1)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
