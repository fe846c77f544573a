"""The canonical face frame: rigid head pose from landmarks + depth, and orthographic face maps.

Usage:
    from realtime.canonical import Canonicalizer, CanonicalOptions
    with Canonicalizer(CanonicalOptions()) as canon:
        result = canon.process(frame, landmarks)  # never raises on bad input
        if result.status == "ok":
            face = result.face  # texture, depth_mm, valid, normals, masks, pose, ...

Canonical frame (``realtime.spec``): origin at the template's nose tip (FaceMesh landmark 4),
+x toward the subject's left, +y up, +z toward the camera, millimetres. The fit is rigid
(rotation + translation, no scale): the maps keep real face size.

Steps of :meth:`Canonicalizer.process`:
1. lift: each landmark's depth is the median of the non-zero raw depth in a small window
   around it; landmarks without depth are left out of the fit, never guessed;
2. fit: rigid fit of the template's expression-invariant landmarks (eye corners, nose bridge
   and tip, forehead; ``train.make_template``) onto the lifted points: Kabsch, then
   Gauss-Newton on a cost that forgives slips along the surface (:func:`rigid_fit`),
   re-fitted a few times without the points whose residual is large (holes, occlusion);
3. maps: the depth pixels that can land on the map (the image box of the map's corners) are
   back-projected, moved into the canonical frame and rasterised orthographically
   (``SPEC.mm_per_px``, nose tip at (``nose_col``, ``nose_row``)) with a z-buffer that keeps
   the nearest surface (samples within ``zbuffer_tolerance_mm`` of it are averaged, which also
   averages sensor noise); gaps are filled by push-pull interpolation; ``valid`` marks pixels
   that got a sample or have one next to them (what a 3x3 splat would cover); outside the face
   oval the maps hold the background (depth ``SPEC.depth_min_mm``, black texture, normal +z)
   and are not valid;
4. texture: each sampled map pixel's 3D point is projected into the colour image and sampled
   bilinearly (sharp, no splat blur); depth and colour of unsampled pixels are filled together;
5. normals: from the filled depth's slopes (Sobel on a lightly blurred copy), unit length, +z
   toward the camera;
6. masks: ``realtime.masks`` from this face's landmarks in the canonical frame (a landmark
   with reliable depth is lifted; otherwise its ray is cut at the template's depth).

A face that cannot be canonicalised gives ``CanonicalResult(status, reason, None)`` with
status ``"no_face"``, ``"bad_depth"`` or ``"bad_fit"`` and a one-line reason.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from realtime.frames import FaceLandmarks, RGBDFrame
from realtime.masks import FACE_OVAL, canonical_to_pixels, rasterize_masks
from realtime.spec import SPEC, CanonicalSpec

TEMPLATE_PATH = Path(__file__).with_name("assets") / "canonical_template.npz"

CAMERA_FROM_HEAD = np.diag([1.0, -1.0, -1.0])
"""Head axes (+x subject's left, +y up, +z toward the camera) -> camera axes (x right, y down, z forward)."""

STATUSES = ("ok", "no_face", "bad_depth", "bad_fit")
_OVAL_INDEX = np.array(FACE_OVAL)


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation R = Ry(yaw) @ Rx(pitch) @ Rz(roll), degrees, right-handed, head axes (3, 3).

    yaw > 0 turns the nose toward the subject's left (the image right), pitch > 0 tilts the nose
    down, roll > 0 turns the face counter-clockwise as the camera sees it. The camera-frame
    rotation of a head is ``CAMERA_FROM_HEAD @ rotation_from_angles(...)``.
    """
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


def angles_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_angles`: (yaw, pitch, roll) in degrees."""
    r = np.asarray(rotation, np.float64)
    pitch = np.degrees(np.arcsin(np.clip(-r[1, 2], -1.0, 1.0)))
    yaw = np.degrees(np.arctan2(r[0, 2], r[2, 2]))
    roll = np.degrees(np.arctan2(r[1, 0], r[1, 1]))
    return float(yaw), float(pitch), float(roll)


def template_id(path: str | Path = TEMPLATE_PATH) -> str:
    """Short hash of a template file's arrays (names, dtypes, shapes, bytes); zip metadata is ignored."""
    digest = hashlib.sha256()
    with np.load(path) as z:
        for name in sorted(z.files):
            a = np.ascontiguousarray(z[name])
            digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()[:10]


@dataclass(frozen=True)
class CanonicalTemplate:
    """The metric landmark template made by ``python -m train.make_template``."""

    points: np.ndarray  # (468, 3) float32 mm, canonical frame (nose tip at the origin)
    normals: np.ndarray  # (468, 3) float32 unit outward surface normals at the landmarks
    fit_indices: np.ndarray  # (K,) int: the expression-invariant landmarks used for the pose
    mirror: np.ndarray  # (468,) int: each landmark's left/right partner (itself on the midline)
    nose_index: int

    @classmethod
    def load(cls, path: str | Path = TEMPLATE_PATH) -> "CanonicalTemplate":
        """Read a template; a missing or malformed file raises ``ValueError`` naming it."""
        try:
            with np.load(path) as z:
                t = cls(z["points"].astype(np.float32), z["normals"].astype(np.float32),
                        z["fit_indices"].astype(np.int64), z["mirror"].astype(np.int64), int(z["nose_index"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a canonical template ({exc})") from exc
        if t.points.shape != (468, 3) or t.normals.shape != (468, 3) or t.mirror.shape != (468,) \
                or len(t.fit_indices) < 4:
            raise ValueError(f"{path}: template arrays have wrong shapes")
        return t


@dataclass
class CanonicalOptions:
    """Settings of the canonicalisation (the raster itself is ``spec``)."""

    spec: CanonicalSpec = SPEC
    template_path: Path = TEMPLATE_PATH
    lift_window: int = 5  # px (odd): landmark depth = median of the non-zero depth in this window
    min_window_samples: int = 3  # fewer non-zero depths in the window -> the landmark has no depth
    min_fit_landmarks: int = 10  # fewer lifted fit landmarks (or inliers) -> bad_depth / bad_fit
    tangential_weight: float = 0.3  # weight of a landmark's slip along the surface vs. off it (see rigid_fit)
    outlier_iterations: int = 4  # robust re-fits
    outlier_floor_mm: float = 3.0  # residuals below this are never outliers ...
    outlier_factor: float = 2.5  # ... above max(floor, factor * median residual) they are
    max_residual_mm: float = 6.0  # RMS over inliers above this -> bad_fit (real faces: ~1-4 mm)
    max_yaw_deg: float = 70.0  # turned further away -> bad_fit
    max_pitch_deg: float = 60.0
    max_roll_deg: float = 60.0
    min_distance_mm: float = 150.0  # nose tip z outside this range -> bad_fit
    max_distance_mm: float = 2500.0
    zbuffer_tolerance_mm: float = 4.0  # samples this close to a pixel's nearest are averaged
    landmark_depth_tolerance_mm: float = 20.0  # lifted landmarks this far from the template depth are not trusted
    normal_smoothing_px: float = 1.5  # Gaussian sigma on the depth before its slopes are taken
    mask_dilate_mm: float = 2.5
    oval_margin_mm: float = 4.0  # the face region = FaceMesh's face oval grown by this
    min_valid_fraction: float = 0.2  # fewer valid map pixels inside the face oval -> bad_depth


@dataclass
class CanonicalFace:
    """One face in the canonical frame (maps are SPEC.size square)."""

    texture: np.ndarray  # (S, S, 3) uint8 RGB
    depth_mm: np.ndarray  # (S, S) float32, z relative to the nose tip (<= 0 behind it), holes filled
    valid: np.ndarray  # (S, S) bool, measured depth (not filled, inside the face oval)
    normals: np.ndarray  # (3, S, S) float32 unit normals (nx, ny, nz) in the canonical frame
    masks: np.ndarray  # (6, S, S) float32 in [0, 1], MASK_NAMES order
    rotation: np.ndarray  # (3, 3) canonical -> camera (the head pose)
    translation: np.ndarray  # (3,) mm: the canonical origin (nose tip) in the camera frame
    yaw: float  # degrees, see rotation_from_angles
    pitch: float
    roll: float
    residual_mm: float  # RMS fit residual over the inliers
    inliers: int
    landmarks_canonical: np.ndarray  # (468, 3) float32 mm


@dataclass
class CanonicalResult:
    """The outcome for one face: ``face`` is set only when ``status == "ok"``."""

    status: str  # "ok" | "no_face" | "bad_depth" | "bad_fit"
    reason: str = ""  # one line, empty when ok
    face: CanonicalFace | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Reject(Exception):
    """Internal: a face that cannot be canonicalised (becomes a CanonicalResult)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Canonicalizer:
    """Turns (frame, landmarks) into a :class:`CanonicalFace`; see the module docstring."""

    def __init__(self, options: CanonicalOptions | None = None) -> None:
        self.options = options or CanonicalOptions()
        if self.options.lift_window < 1 or self.options.lift_window % 2 == 0:
            raise ValueError(f"lift_window must be a positive odd number, got {self.options.lift_window}")
        self.template = CanonicalTemplate.load(self.options.template_path)
        s = self.options.spec
        cols, rows = np.meshgrid(np.arange(s.size, dtype=np.float32), np.arange(s.size, dtype=np.float32))
        self._grid_x = (cols - s.nose_col) * s.mm_per_px  # (S, S) canonical x of each map pixel
        self._grid_y = (s.nose_row - rows) * s.mm_per_px
        edges_x = (np.array([-0.5, s.size - 0.5]) - s.nose_col) * s.mm_per_px
        edges_y = (s.nose_row - np.array([-0.5, s.size - 0.5])) * s.mm_per_px
        self._box_corners = np.array([[x, y, z] for x in edges_x for y in edges_y  # (8, 3): the map's volume
                                      for z in (s.depth_min_mm, s.depth_max_mm)])
        self.timing = False  # set True to fill CanonicalResult.timings_ms (bench)

    def __enter__(self) -> "Canonicalizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release; present so every stage closes the same way."""

    # ------------------------------------------------------------------ public
    def process(self, frame: RGBDFrame, landmarks: FaceLandmarks | None) -> CanonicalResult:
        """Canonicalise one face. Bad input is a result with a status and a reason, not an exception.

        Raises:
            ValueError: only for misuse (a colour image that is not (H, W, 3) uint8 RGB).
        """
        timings: dict[str, float] = {}
        try:
            face = self._process(frame, landmarks, timings)
        except _Reject as rej:
            return CanonicalResult(rej.status, f"frame {frame.sequence}: {rej.reason}", None, timings)
        return CanonicalResult("ok", "", face, timings)

    def lift(self, frame: RGBDFrame, points: np.ndarray) -> np.ndarray:
        """Camera-frame 3D points (N, 3) mm of pixel landmarks (N, 2); NaN rows where no depth."""
        z = self._window_median_depth(frame, points)
        return frame.intrinsics.backproject(points[:, 0], points[:, 1], z).astype(np.float64)

    # ------------------------------------------------------------------ steps
    def _process(self, frame: RGBDFrame, landmarks: FaceLandmarks | None, timings: dict[str, float]) -> CanonicalFace:
        opt, tmpl = self.options, self.template
        clock = _Clock(timings if self.timing else None)
        points = self._check_input(frame, landmarks)

        lifted = self.lift(frame, points)  # (468, 3)
        clock("lift")
        fit = tmpl.fit_indices[np.isfinite(lifted[tmpl.fit_indices, 2])]
        if len(fit) < opt.min_fit_landmarks:
            raise _Reject("bad_depth", f"only {len(fit)} of {len(tmpl.fit_indices)} pose landmarks have depth "
                                       f"(need {opt.min_fit_landmarks})")
        rotation, translation, residual, inliers = self._robust_fit(tmpl.points[fit], tmpl.normals[fit], lifted[fit])
        clock("fit")
        yaw, pitch, roll = angles_from_rotation(CAMERA_FROM_HEAD @ rotation)
        self._check_pose(rotation, translation, residual, inliers, yaw, pitch, roll)

        canon_lm = self._landmarks_canonical(frame, points, lifted, rotation, translation)
        region = self._face_region(canon_lm)
        depth, sampled = self._rasterize_depth(frame, rotation, translation)
        clock("raster")
        valid = cv2.dilate(sampled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & region
        if valid.sum() < max(1.0, opt.min_valid_fraction * region.sum()):
            raise _Reject("bad_depth", f"only {valid.sum()} of {region.sum()} face pixels have depth")
        # one push-pull fills depth and colour where nothing was measured (holes, hidden behind the nose):
        # projecting a guessed depth there would fetch the colour of whatever is in front or behind
        stack = np.empty((opt.spec.size, opt.spec.size, 4), np.float32)  # depth, r, g, b
        stack[..., 0] = depth
        stack[..., 1:] = self._sample_texture(frame, depth, rotation, translation)
        filled = fill_holes(stack, sampled)
        depth = np.ascontiguousarray(filled[..., 0])
        clock("fill")
        outside = ~region
        normals = depth_normals(depth, opt.spec.mm_per_px, opt.normal_smoothing_px)
        normals[:2, outside] = 0.0
        normals[2, outside] = 1.0
        filled[outside] = 0.0
        filled[outside, 0] = opt.spec.depth_min_mm
        depth = np.ascontiguousarray(filled[..., 0])
        texture = cv2.convertScaleAbs(filled[..., 1:])  # rounds and saturates to uint8
        clock("normals")
        masks = rasterize_masks(canon_lm, opt.spec, opt.mask_dilate_mm)
        clock("masks")
        return CanonicalFace(texture=texture, depth_mm=depth, valid=valid, normals=normals, masks=masks,
                             rotation=rotation.astype(np.float32), translation=translation.astype(np.float32),
                             yaw=yaw, pitch=pitch, roll=roll, residual_mm=residual, inliers=inliers,
                             landmarks_canonical=canon_lm.astype(np.float32))

    def _check_input(self, frame: RGBDFrame, landmarks: FaceLandmarks | None) -> np.ndarray:
        """Landmark points (468, 2) float64, or a reject; a colour image that is not RGB raises ValueError."""
        if frame.color.ndim != 3 or frame.color.shape[2] != 3 or frame.color.dtype != np.uint8:
            raise ValueError(f"frame {frame.sequence}: colour must be (H, W, 3) uint8 RGB, "
                             f"got {frame.color.shape} {frame.color.dtype}")
        if landmarks is None:
            raise _Reject("no_face", "no landmarks")
        points = np.asarray(landmarks.points, np.float64)
        if points.shape != self.template.points[:, :2].shape:
            raise _Reject("no_face", f"landmarks must be {self.template.points[:, :2].shape}, got {points.shape}")
        if not np.isfinite(points).all():
            raise _Reject("no_face", "landmarks contain NaN or inf")
        if frame.depth.ndim != 2 or frame.depth.shape != frame.color.shape[:2]:
            raise _Reject("bad_depth", f"depth {frame.depth.shape} is not aligned to colour {frame.color.shape}")
        if not frame.depth_scale > 0:
            raise _Reject("bad_depth", f"depth scale {frame.depth_scale} is not positive")
        return points

    def _window_median_depth(self, frame: RGBDFrame, points: np.ndarray) -> np.ndarray:
        """Median of the non-zero depth (mm) in a window around each point (N,); NaN if too few."""
        h, w = frame.depth.shape
        r = self.options.lift_window // 2
        col = np.round(points[:, 0]).astype(np.int64)
        row = np.round(points[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        offsets = np.arange(-r, r + 1)
        cols = np.clip(col[:, None] + offsets, 0, w - 1)  # (N, k)
        rows = np.clip(row[:, None] + offsets, 0, h - 1)
        window = frame.depth[rows[:, :, None], cols[:, None, :]].reshape(len(points), -1)  # (N, k*k) raw
        window = np.sort(window, axis=1)
        count = (window > 0).sum(axis=1)
        first = window.shape[1] - count  # zeros sort first
        middle = np.minimum(first + np.maximum(count - 1, 0) // 2, window.shape[1] - 1)  # lower median
        median = np.take_along_axis(window, middle[:, None], axis=1)[:, 0]
        z = median.astype(np.float64) * (frame.depth_scale * 1000.0)
        return np.where(inside & (count >= self.options.min_window_samples), z, np.nan)

    def _robust_fit(self, model: np.ndarray, normals: np.ndarray, measured: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Rigid fit ``measured ~ R @ model + t``, re-fitted without the points whose residual is large."""
        opt = self.options
        inlier = np.ones(len(model), bool)
        rotation, translation = kabsch(model, measured)
        for round_ in range(opt.outlier_iterations + 1):
            # Gauss-Newton converges in 2-3 steps from Kabsch, fewer from the previous round's pose
            rotation, translation = rigid_fit(model[inlier], normals[inlier], measured[inlier],
                                              opt.tangential_weight, rotation, translation, 3 if round_ == 0 else 2)
            residuals = fit_residuals(model, normals, measured, rotation, translation, opt.tangential_weight)
            threshold = max(opt.outlier_floor_mm, opt.outlier_factor * float(np.median(residuals[inlier])))
            new = residuals < threshold
            if new.sum() < 6 or (new == inlier).all():
                break
            inlier = new
        residual = float(np.sqrt(np.mean(residuals[inlier] ** 2)))
        return rotation, translation, residual, int(inlier.sum())

    def _check_pose(self, rotation: np.ndarray, translation: np.ndarray, residual: float, inliers: int,
                    yaw: float, pitch: float, roll: float) -> None:
        opt = self.options
        if inliers < opt.min_fit_landmarks:
            raise _Reject("bad_fit", f"only {inliers} pose landmarks agree with the template "
                                     f"(need {opt.min_fit_landmarks})")
        if residual > opt.max_residual_mm:
            raise _Reject("bad_fit", f"fit residual {residual:.1f} mm > {opt.max_residual_mm:g} mm")
        if abs(yaw) > opt.max_yaw_deg or abs(pitch) > opt.max_pitch_deg or abs(roll) > opt.max_roll_deg:
            raise _Reject("bad_fit", f"head turned too far (yaw {yaw:.0f}, pitch {pitch:.0f}, roll {roll:.0f} deg)")
        if not opt.min_distance_mm <= translation[2] <= opt.max_distance_mm:
            raise _Reject("bad_fit", f"face at {translation[2]:.0f} mm, outside "
                                     f"{opt.min_distance_mm:g}..{opt.max_distance_mm:g} mm")

    def _landmarks_canonical(self, frame: RGBDFrame, points: np.ndarray, lifted: np.ndarray,
                             rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
        """All 468 landmarks in the canonical frame (468, 3).

        Lifted where the depth agrees with the template within tolerance; elsewhere (holes,
        silhouettes, depth of an occluder) the landmark's camera ray is cut at the template depth.
        """
        k = frame.intrinsics
        rays = np.stack([(points[:, 0] - k.ppx) / k.fx, (points[:, 1] - k.ppy) / k.fy, np.ones(len(points))], 1)
        origin = -rotation.T @ translation  # camera centre, canonical frame
        dirs = rays @ rotation  # (N, 3) = R^T ray
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (self.template.points[:, 2] - origin[2]) / dirs[:, 2]
            cut = origin + s[:, None] * dirs
        cut = np.where(np.isfinite(cut), cut, self.template.points)  # a ray parallel to the plane: keep the template's
        measured = (lifted - translation) @ rotation
        trusted = np.isfinite(measured[:, 2]) & (
            np.abs(measured[:, 2] - self.template.points[:, 2]) < self.options.landmark_depth_tolerance_mm)
        return np.where(trusted[:, None], measured, cut)

    def _face_region(self, canon_lm: np.ndarray) -> np.ndarray:
        """The face oval polygon, grown by ``oval_margin_mm`` (S, S) bool."""
        s = self.options.spec
        region = np.zeros((s.size, s.size), np.uint8)
        px = canonical_to_pixels(canon_lm[_OVAL_INDEX, :2], s)
        cv2.fillPoly(region, [np.round(px * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        r = int(round(self.options.oval_margin_mm / s.mm_per_px))
        if r:
            region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        return region.astype(bool)

    def _rasterize_depth(self, frame: RGBDFrame, rotation: np.ndarray, translation: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Z-buffered orthographic depth (S, S) float32 and the sampled-pixel map (S, S) bool."""
        opt, s, k = self.options, self.options.spec, frame.intrinsics
        empty = (np.full((s.size, s.size), s.depth_min_mm, np.float32), np.zeros((s.size, s.size), bool))
        box = self._image_box(frame, rotation, translation)
        if box is None:
            return empty
        c0, r0, c1, r1 = box
        raw = frame.depth[r0:r1, c0:c1]  # (h, w) uint16
        # map column/row of each pixel, and its canonical z, are affine in (col, row) once scaled by
        # the depth: R^T (z * ray - t) with ray = ((col - ppx) / fx, (row - ppy) / fy, 1)
        rt = rotation.T
        a = (np.arange(c0, c1) - k.ppx) / k.fx  # (w,) ray x
        b = (np.arange(r0, r1) - k.ppy) / k.fy  # (h,) ray y
        offset = rt @ translation
        to_mm = frame.depth_scale * 1000.0
        scale = np.array([to_mm / s.mm_per_px, -to_mm / s.mm_per_px, to_mm])  # canonical axis -> col, row, z
        z = raw.astype(np.float32)
        coords = []
        for axis in range(3):
            sa, sb, sc = scale[axis] * rt[axis]
            per_col = (sa * a + sc).astype(np.float32)
            per_row = (sb * b).astype(np.float32)
            coords.append(z * (per_row[:, None] + per_col[None, :]))
        col = coords[0] + np.float32(s.nose_col - offset[0] / s.mm_per_px + 0.5)  # +0.5: floor = nearest
        row = coords[1] + np.float32(s.nose_row + offset[1] / s.mm_per_px + 0.5)
        qz = coords[2] - np.float32(offset[2])
        keep = np.flatnonzero((raw > 0) & (col >= 0) & (col < s.size) & (row >= 0) & (row < s.size)
                              & (qz >= s.depth_min_mm) & (qz <= s.depth_max_mm))  # take() beats boolean indexing
        index = row.ravel().take(keep).astype(np.intp) * s.size + col.ravel().take(keep).astype(np.intp)
        qz = qz.ravel().take(keep)
        n = s.size * s.size
        nearest = np.full(n, -np.inf, np.float32)
        np.maximum.at(nearest, index, qz)
        near = (qz >= nearest.take(index) - opt.zbuffer_tolerance_mm).astype(np.float32)
        total = np.bincount(index, qz * near, n)
        count = np.bincount(index, near, n)
        sampled = count > 0
        depth = np.full(n, s.depth_min_mm, np.float32)
        np.divide(total, count, out=depth, where=sampled, casting="same_kind")
        return depth.reshape(s.size, s.size), sampled.reshape(s.size, s.size)

    def _image_box(self, frame: RGBDFrame, rotation: np.ndarray, translation: np.ndarray
                   ) -> tuple[int, int, int, int] | None:
        """Image pixels (col0, row0, col1, row1) that can land in the map: its corners' projections."""
        k = frame.intrinsics
        cam = self._box_corners @ rotation.T + translation  # (8, 3)
        if (cam[:, 2] <= 1.0).any():
            return None
        px = cam[:, :2] / cam[:, 2:] * np.array([k.fx, k.fy]) + np.array([k.ppx, k.ppy])
        h, w = frame.depth.shape
        c0, r0 = np.maximum(np.floor(px.min(axis=0)).astype(int), 0)
        c1, r1 = np.minimum(np.ceil(px.max(axis=0)).astype(int) + 1, [w, h])
        return (int(c0), int(r0), int(c1), int(r1)) if c1 > c0 and r1 > r0 else None

    def _sample_texture(self, frame: RGBDFrame, depth: np.ndarray, rotation: np.ndarray,
                        translation: np.ndarray) -> np.ndarray:
        """Colour at each map pixel's surface point, projected into the image (S, S, 3) uint8."""
        k = frame.intrinsics
        r, t = rotation.astype(np.float32), translation.astype(np.float32)
        # camera coordinates of (x, y, depth): affine in the map's fixed x, y planes plus the depth term
        cam = [self._grid_x * r[i, 0] + (self._grid_y * r[i, 1] + t[i]) + depth * r[i, 2] for i in range(3)]
        inv_z = 1.0 / np.maximum(cam[2], 1.0)
        map_x = cam[0] * inv_z * np.float32(k.fx) + np.float32(k.ppx)
        map_y = cam[1] * inv_z * np.float32(k.fy) + np.float32(k.ppy)
        return cv2.remap(frame.color, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def kabsch(model: np.ndarray, measured: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid transform with ``measured ~ R @ model + t`` (no scale, no reflection).

    Args:
        model: (N, 3) points in the source frame.
        measured: (N, 3) corresponding points in the target frame.
        weights: (N,) non-negative, or None for equal weights.

    Returns:
        R (3, 3), t (3,).
    """
    w = np.ones(len(model)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mc, pc = w @ model, w @ measured
    cov = (model - mc).T @ ((measured - pc) * w[:, None])  # (3, 3)
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rotation, pc - rotation @ mc


def rigid_fit(model: np.ndarray, normals: np.ndarray, measured: np.ndarray, tangential_weight: float,
              rotation: np.ndarray, translation: np.ndarray, iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Rigid fit that forgives landmarks for sliding along the surface (Gauss-Newton from a start pose).

    A detector's landmark is only known up to a slip along the face (a forehead point a few mm
    higher or lower is the same forehead), while its distance off the surface is real geometry.
    Each residual ``r = R @ m + t - p`` is split along the model normal ``n`` (rotated by R):
    cost = sum (n . r)^2 + w^2 |r - (n . r) n|^2 with w = ``tangential_weight`` (1 = Kabsch).

    Args:
        model: (N, 3) template points; normals: (N, 3) their unit normals.
        measured: (N, 3) lifted points.
        tangential_weight: w above, in [0, 1].
        rotation, translation: start pose (e.g. from :func:`kabsch`).
        iterations: Gauss-Newton steps (it converges in 2-4).

    Returns:
        R (3, 3), t (3,).
    """
    rotation, translation = rotation.copy(), translation.copy()
    w2 = tangential_weight**2
    for _ in range(iterations):
        a = model @ rotation.T  # (N, 3)
        n = normals @ rotation.T
        r = a + translation - measured
        # linearised residual: r + dw x a + dt. Point-to-point part (weight w^2) in closed form ...
        sx, sy, sz = a.sum(axis=0)
        cross_total = np.array([[0.0, -sz, sy], [sz, 0.0, -sx], [-sy, sx, 0.0]])
        h = np.empty((6, 6))
        h[:3, :3] = np.sum(a * a) * np.eye(3) - a.T @ a
        h[:3, 3:], h[3:, :3], h[3:, 3:] = cross_total, -cross_total, len(a) * np.eye(3)
        g = np.concatenate([_cross(a, r).sum(axis=0), r.sum(axis=0)])
        # ... plus the normal part (weight 1 - w^2): n . (r + dw x a + dt) = n . r + u . (dw, dt)
        u = np.concatenate([_cross(a, n), n], axis=1)  # (N, 6)
        h = w2 * h + (1.0 - w2) * (u.T @ u)
        g = w2 * g + (1.0 - w2) * (u.T @ np.sum(n * r, axis=1))
        step = np.linalg.solve(h + 1e-9 * np.eye(6), -g)
        rotation = cv2.Rodrigues(step[:3])[0] @ rotation
        translation = translation + step[3:]
        if np.abs(step[:3]).max() < 1e-4 and np.abs(step[3:]).max() < 1e-2:  # 0.006 deg, 0.01 mm
            break
    return rotation, translation


def fit_residuals(model: np.ndarray, normals: np.ndarray, measured: np.ndarray, rotation: np.ndarray,
                  translation: np.ndarray, tangential_weight: float) -> np.ndarray:
    """Per-point residual of :func:`rigid_fit`'s cost, sqrt((n . r)^2 + w^2 |r_tangential|^2) (N,) mm."""
    n = normals @ rotation.T
    r = model @ rotation.T + translation - measured
    along = np.sum(r * n, axis=1)
    tangential = r - along[:, None] * n
    return np.sqrt(along**2 + tangential_weight**2 * np.sum(tangential**2, axis=1))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross products of (N, 3) arrays (np.cross is slow on small arrays)."""
    return np.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], axis=1)


def fill_holes(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Push-pull interpolation: unknown pixels of ``values`` (H, W) or (H, W, C) get smooth values.

    Known pixels are unchanged. Each coarser level averages the known pixels below it
    (``cv2.resize`` with area weights); on the way back up each pixel blends its own average
    with the upsampled coarser estimate by the share of known pixels under it, so holes of any
    size fill in a few small image operations.
    """
    values = np.asarray(values, np.float32)
    known = known.astype(np.float32)  # (H, W)
    if known.all() or not known.any():
        return values.copy()
    channels = values.shape[2] if values.ndim == 3 else 1
    levels = [(values * _per_pixel(known, channels), known)]  # premultiplied values, weights
    while min(levels[-1][1].shape) > 8:
        v, k = levels[-1]
        size = ((k.shape[1] + 1) // 2, (k.shape[0] + 1) // 2)
        levels.append((cv2.resize(v, size, interpolation=cv2.INTER_AREA),
                       cv2.resize(k, size, interpolation=cv2.INTER_AREA)))
    v, k = levels[-1]
    # coarsest level (<= 8 px): unknown cells take the mean of the known ones
    mean = v.reshape(-1, channels).sum(axis=0) / max(float(k.sum()), 1e-6)
    estimate = np.where(_per_pixel(k > 0, channels), v * _per_pixel(1.0 / np.maximum(k, 1e-6), channels),
                        mean if channels > 1 else mean[0])
    for v, k in reversed(levels[:-1]):
        up = cv2.resize(estimate, (k.shape[1], k.shape[0]), interpolation=cv2.INTER_LINEAR)
        # blend this level's own average with the coarser estimate by the share of known pixels
        # under it (0 or 1 at the finest level): up + alpha * (v / k - up)
        alpha = np.minimum(k, 1.0)
        own = v * _per_pixel(alpha / np.maximum(k, 1e-6), channels)  # = alpha * v / k
        estimate = own + up * _per_pixel(1.0 - alpha, channels)
    return estimate


def _per_pixel(weights: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) weights shaped to multiply an (H, W) or (H, W, C) image."""
    return weights[..., None] if channels > 1 else weights


def depth_normals(depth_mm: np.ndarray, mm_per_px: float, smoothing_px: float = 0.0) -> np.ndarray:
    """Unit surface normals (3, H, W) float32 of a canonical depth map (+x right/subject's left, +y up).

    ``smoothing_px`` > 0 blurs the depth first (Gaussian sigma, pixels): sensor noise of a few
    tenths of the pixel size would otherwise dominate the slopes.
    """
    depth_mm = np.asarray(depth_mm, np.float32)
    if smoothing_px > 0:
        depth_mm = cv2.GaussianBlur(depth_mm, (0, 0), smoothing_px)
    # Sobel / 8 is the smoothed central difference per pixel; n ~ (-dz/dx, -dz/dy, 1) with y up = rows down
    nx = cv2.Sobel(depth_mm, cv2.CV_32F, 1, 0, ksize=3, scale=-1.0 / (8.0 * mm_per_px))
    ny = cv2.Sobel(depth_mm, cv2.CV_32F, 0, 1, ksize=3, scale=1.0 / (8.0 * mm_per_px))
    normals = np.empty((3,) + depth_mm.shape, np.float32)
    np.sqrt(nx * nx + ny * ny + 1.0, out=normals[2])
    np.divide(1.0, normals[2], out=normals[2])
    np.multiply(nx, normals[2], out=normals[0])
    np.multiply(ny, normals[2], out=normals[1])
    return normals


class _Clock:
    """Step timer that records into ``timings`` (ms) only when given a dict."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self._timings, self._last = timings, time.perf_counter()

    def __call__(self, step: str) -> None:
        if self._timings is not None:
            now = time.perf_counter()
            self._timings[step] = (now - self._last) * 1000.0
            self._last = now
