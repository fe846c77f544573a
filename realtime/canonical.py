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
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from realtime.frames import FaceLandmarks, RGBDFrame
from realtime.masks import DILATE_MM, FACE_OVAL, canonical_to_pixels, disk, rasterize_masks
from realtime.spec import SPEC, CanonicalSpec

TEMPLATE_PATH = Path(__file__).with_name("assets") / "canonical_template.npz"

CAMERA_FROM_HEAD = np.diag([1.0, -1.0, -1.0])
"""Head axes (+x subject's left, +y up, +z toward the camera) -> camera axes (x right, y down, z forward)."""

_OVAL_INDEX = np.array(FACE_OVAL)
_EYE3 = np.eye(3)
_RIDGE6 = 1e-9 * np.eye(6)  # keeps the Gauss-Newton system solvable when the points are degenerate
_LEVI_CIVITA = np.zeros((3, 3, 3))  # epsilon_ijk: (a x b)_i = sum_jk epsilon_ijk a_j b_k
_LEVI_CIVITA[[0, 1, 2], [1, 2, 0], [2, 0, 1]] = 1.0
_LEVI_CIVITA[[0, 1, 2], [2, 0, 1], [1, 2, 0]] = -1.0
_SKEW = -_LEVI_CIVITA  # (3, 3, 3): _SKEW @ s is the matrix of s x (.)
_CROSS_OF_MOMENT = _LEVI_CIVITA.reshape(3, 9)  # _CROSS_OF_MOMENT @ sum(a b^T).ravel() = sum(a x b)
_SQUARE3 = np.ones((3, 3), np.uint8)
_BACKGROUND_NORMAL = np.array([0.0, 0.0, 1.0], np.float32)[:, None, None]  # (3, 1, 1): +z, off the face


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
    mask_dilate_mm: float = DILATE_MM
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
        self._fit_basis = _fit_basis(self.template.points, self.template.normals)  # (468, 9)
        _normal_equations_map(float(self.options.tangential_weight))  # built once here, not on the first frame
        r = self.options.lift_window // 2
        self._window_offsets = np.arange(-r, r + 1)  # (k,) lift window around a landmark
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
        rotation, translation, residual, inliers = self._robust_fit(fit, lifted[fit])
        clock("fit")
        yaw, pitch, roll = angles_from_rotation(CAMERA_FROM_HEAD @ rotation)
        self._check_pose(rotation, translation, residual, inliers, yaw, pitch, roll)

        canon_lm = self._landmarks_canonical(frame, points, lifted, rotation, translation)
        region = self._face_region(canon_lm)
        depth, sampled = self._rasterize_depth(frame, rotation, translation)
        clock("raster")
        valid = cv2.dilate(sampled.view(np.uint8), _SQUARE3).view(bool) & region
        valid_count, region_count = np.count_nonzero(valid), np.count_nonzero(region)
        if valid_count < max(1.0, opt.min_valid_fraction * region_count):
            raise _Reject("bad_depth", f"only {valid_count} of {region_count} face pixels have depth")
        # one push-pull fills colour and depth where nothing was measured (holes, hidden behind the nose):
        # projecting a guessed depth there would fetch the colour of whatever is in front or behind
        colour = self._sample_texture(frame, depth, rotation, translation)
        stack = cv2.cvtColor(colour, cv2.COLOR_RGB2RGBA).astype(np.float32)  # (S, S, 4) r, g, b, depth
        stack[..., 3] = depth
        filled = fill_holes(stack, sampled)
        depth = np.ascontiguousarray(filled[..., 3])
        clock("fill")
        # outside the face: the background (normals from the filled depth first, the oval's edge needs it)
        normals = depth_normals(depth, opt.spec.mm_per_px, opt.normal_smoothing_px)
        outside = ~region
        np.copyto(normals, _BACKGROUND_NORMAL, where=outside)
        np.copyto(depth, np.float32(opt.spec.depth_min_mm), where=outside)
        # rounds and saturates to uint8; a masked copy into a new image is black where the mask is 0
        texture = cv2.copyTo(cv2.cvtColor(cv2.convertScaleAbs(filled), cv2.COLOR_RGBA2RGB), region.view(np.uint8))
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
            raise _Reject("bad_fit", f"landmarks must be {self.template.points[:, :2].shape}, got {points.shape}")
        if not np.isfinite(points).all():
            raise _Reject("bad_fit", "landmarks contain NaN or inf")
        if frame.depth.ndim != 2 or frame.depth.shape != frame.color.shape[:2]:
            raise _Reject("bad_depth", f"depth {frame.depth.shape} is not aligned to colour {frame.color.shape}")
        if not frame.depth_scale > 0:
            raise _Reject("bad_depth", f"depth scale {frame.depth_scale} is not positive")
        return points

    def _window_median_depth(self, frame: RGBDFrame, points: np.ndarray) -> np.ndarray:
        """Median of the non-zero depth (mm) in a window around each point (N,); NaN if too few."""
        h, w = frame.depth.shape
        offsets = self._window_offsets  # (k,)
        col = np.rint(points[:, 0]).astype(np.int64)
        row = np.rint(points[:, 1]).astype(np.int64)
        inside = (col.view(np.uint64) < w) & (row.view(np.uint64) < h)  # negatives wrap to huge
        # window pixels clipped to the image per axis, laid out (k, k, N): numpy's inner loops run
        # over the points, not over the few window offsets
        rows = np.minimum(np.maximum(row + offsets[:, None], 0), h - 1) * w  # (k, N)
        cols = np.minimum(np.maximum(col + offsets[:, None], 0), w - 1)
        index = (rows[:, None, :] + cols[None, :, :]).reshape(len(offsets) ** 2, -1)  # (k*k, N) flat pixels
        window = np.sort(frame.depth.ravel().take(index.T), axis=1)  # (N, k*k) raw, zeros first
        size = window.shape[1]
        count = np.where(window[:, -1] > 0, size - np.argmax(window > 0, axis=1), 0)  # non-zero depths
        # the lower median of each row's non-zero tail (the last element when there is none)
        median = window.ravel().take(np.arange(size - 1, window.size, size) - count // 2)
        z = median.astype(np.float64) * (frame.depth_scale * 1000.0)
        return np.where(inside & (count >= self.options.min_window_samples), z, np.nan)

    def _robust_fit(self, fit: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Rigid fit ``measured ~ R @ model + t`` of the template landmarks ``fit``, re-fitted without
        the points whose residual is large."""
        opt = self.options
        basis = self._fit_basis[fit]  # (K, 9) float64 (m, m x n, n)
        model, normals = basis[:, :3], basis[:, 6:]
        inlier = np.ones(len(fit), bool)
        rotation, translation = kabsch(model, measured)
        for round_ in range(opt.outlier_iterations + 1):
            # Gauss-Newton converges in 2-3 steps from Kabsch, fewer from the previous round's pose
            rotation, translation = _gauss_newton(basis[inlier], measured[inlier], opt.tangential_weight,
                                                  rotation, translation, 3 if round_ == 0 else 2)
            residuals = fit_residuals(model, normals, measured, rotation, translation, opt.tangential_weight)
            threshold = max(opt.outlier_floor_mm, opt.outlier_factor * _median(residuals[inlier]))
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
            region = cv2.dilate(region, disk(r))
        return region.view(bool)

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
        offset = rotation.T @ translation
        to_mm = frame.depth_scale * 1000.0
        scaled = np.array([[to_mm / s.mm_per_px], [-to_mm / s.mm_per_px], [to_mm]]) * rotation.T  # (3, 3)
        per_col = (scaled[:, :1] * ((np.arange(c0, c1) - k.ppx) / k.fx) + scaled[:, 2:]).astype(np.float32)  # (3, w)
        per_row = (scaled[:, 1:2] * ((np.arange(r0, r1) - k.ppy) / k.fy)).astype(np.float32)  # (3, h)
        coords = per_row[:, :, None] + per_col[:, None, :]  # (3, h, w): map col, row, canonical z
        coords *= raw.astype(np.float32)
        origin = np.array([s.nose_col - offset[0] / s.mm_per_px + 0.5,  # +0.5: floor = nearest
                           s.nose_row + offset[1] / s.mm_per_px + 0.5, -offset[2]], np.float32)  # where z = 0 lands
        coords += origin[:, None, None]
        col, row, qz = coords
        keep = (col >= 0) & (col < s.size) & (row >= 0) & (row < s.size) \
            & (qz >= s.depth_min_mm) & (qz <= s.depth_max_mm)
        if s.depth_min_mm <= origin[2] <= s.depth_max_mm:
            keep &= raw > 0  # otherwise the z range test already drops the pixels without depth (z = 0)
        keep = np.flatnonzero(keep)  # take() beats boolean indexing
        cells = coords[:2].reshape(2, -1).take(keep, axis=1).astype(np.intp)  # (2, M) floor of col, row
        index = cells[1] * s.size + cells[0]
        qz = qz.ravel().take(keep)
        n = s.size * s.size
        nearest = np.full(n, -np.inf, np.float32)
        np.maximum.at(nearest, index, qz)
        near = qz >= (nearest - opt.zbuffer_tolerance_mm).take(index)
        total = np.bincount(index, qz * near, n)
        count = np.bincount(index, near, n)
        sampled = count > 0
        depth = np.where(sampled, (total / np.maximum(count, 1.0)).astype(np.float32), np.float32(s.depth_min_mm))
        return depth.reshape(s.size, s.size), sampled.reshape(s.size, s.size)

    def _image_box(self, frame: RGBDFrame, rotation: np.ndarray, translation: np.ndarray
                   ) -> tuple[int, int, int, int] | None:
        """Image pixels (col0, row0, col1, row1) that can land in the map: its corners' projections."""
        k = frame.intrinsics
        cam = self._box_corners @ rotation.T + translation  # (8, 3)
        if cam[:, 2].min() <= 1.0:
            return None
        px = cam[:, :2] / cam[:, 2:] * np.array([k.fx, k.fy]) + np.array([k.ppx, k.ppy])
        (x0, y0), (x1, y1) = px.min(axis=0).tolist(), px.max(axis=0).tolist()
        h, w = frame.depth.shape
        c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        c1, r1 = min(math.ceil(x1) + 1, w), min(math.ceil(y1) + 1, h)
        return (c0, r0, c1, r1) if c1 > c0 and r1 > r0 else None

    def _sample_texture(self, frame: RGBDFrame, depth: np.ndarray, rotation: np.ndarray,
                        translation: np.ndarray) -> np.ndarray:
        """Colour at each map pixel's surface point, projected into the image (S, S, 3) uint8."""
        k = frame.intrinsics
        r, t = rotation.astype(np.float32), translation.astype(np.float32)
        # camera coordinates of (x, y, depth): affine in the map's fixed x, y planes plus the depth term
        cam = self._grid_x * r[:, :1, None] + (self._grid_y * r[:, 1:2, None] + t[:, None, None]) \
            + depth * r[:, 2:, None]  # (3, S, S)
        inv_z = 1.0 / np.maximum(cam[2], 1.0)
        maps = cam[:2] * inv_z * np.array([[[k.fx]], [[k.fy]]], np.float32) \
            + np.array([[[k.ppx]], [[k.ppy]]], np.float32)  # (2, S, S) image x, y
        return cv2.remap(frame.color, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


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
    return _gauss_newton(_fit_basis(model, normals), measured, tangential_weight, rotation, translation, iterations)


def _fit_basis(model: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Rows (m, m x n, n) (N, 9) float64 of model points and normals for :func:`_gauss_newton`."""
    model, normals = np.asarray(model, np.float64), np.asarray(normals, np.float64)
    return np.concatenate([model, _cross(model, normals), normals], axis=1)


def _gauss_newton(basis: np.ndarray, measured: np.ndarray, tangential_weight: float, rotation: np.ndarray,
                  translation: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rigid_fit` on rows of :func:`_fit_basis` (precomputed once for the template)."""
    equations = _normal_equations_map(float(tangential_weight))
    # one product with blockdiag(R^T, R^T, R^T) turns a point, its normal and their cross product
    # (R m x R n = R (m x n)); its columns (a, u) are the first of the columns the moments come from
    turn = np.zeros((9, 9))
    columns = np.empty((len(basis), 14))  # a (3) | u = (a x n, n) (6) | 1 | r = a + t - p (3) | n . r
    columns[:, 9] = 1.0
    r = columns[:, 10:13]
    for _ in range(iterations):
        turn[:3, :3] = turn[3:6, 3:6] = turn[6:, 6:] = rotation.T
        np.matmul(basis, turn, out=columns[:, :9])
        np.add(columns[:, :3], translation, out=r)
        r -= measured
        np.einsum("ij,ij->i", columns[:, 6:9], r, out=columns[:, 13])
        system = equations @ (columns[:, :10].T @ columns).ravel()  # (42,)
        step = cv2.solve(system[:36].reshape(6, 6) + _RIDGE6, -system[36:], flags=cv2.DECOMP_LU)[1][:, 0]
        rotation = cv2.Rodrigues(step[:3])[0] @ rotation
        translation = translation + step[3:]
        if np.abs(step[:3]).max() < 1e-4 and np.abs(step[3:]).max() < 1e-2:  # 0.006 deg, 0.01 mm
            break
    return rotation, translation


def _normal_equations(moments: np.ndarray, tangential_weight: float) -> np.ndarray:
    """Gauss-Newton system (6, 6) and gradient (6,) of :func:`rigid_fit`'s cost, flattened (42,).

    ``moments`` (10, 14) = C[:, :10]^T C for the columns C of :func:`_gauss_newton`. The residual
    linearised in the step (dw, dt) is r + dw x a + dt. Its point-to-point part (weight w^2) comes
    in closed form from sum(a a^T), sum(a), N and sum(a x r) (the antisymmetric part of sum(a r^T));
    the normal part (weight 1 - w^2) is n . (r + dw x a + dt) = n . r + u . (dw, dt).
    """
    w2 = tangential_weight**2
    aa = moments[:3, :3]
    h = np.empty((6, 6))
    h[:3, :3] = np.trace(aa) * _EYE3 - aa
    h[:3, 3:] = _SKEW @ moments[9, :3]
    h[3:, :3] = -h[:3, 3:]
    h[3:, 3:] = moments[9, 9] * _EYE3
    g = np.concatenate([_CROSS_OF_MOMENT @ moments[:3, 10:13].ravel(), moments[9, 10:13]])
    return np.concatenate([(w2 * h + (1.0 - w2) * moments[3:9, 3:9]).ravel(), w2 * g + (1.0 - w2) * moments[3:9, 13]])


@lru_cache(maxsize=8)
def _normal_equations_map(tangential_weight: float) -> np.ndarray:
    """:func:`_normal_equations` is linear in the moments: its matrix (42, 140), one product per step."""
    basis = np.eye(140).reshape(140, 10, 14)
    matrix = np.stack([_normal_equations(m, tangential_weight) for m in basis], axis=1)
    matrix.flags.writeable = False  # shared by every caller
    return matrix


def fit_residuals(model: np.ndarray, normals: np.ndarray, measured: np.ndarray, rotation: np.ndarray,
                  translation: np.ndarray, tangential_weight: float) -> np.ndarray:
    """Per-point residual of :func:`rigid_fit`'s cost, sqrt((n . r)^2 + w^2 |r_tangential|^2) (N,) mm."""
    n = normals @ rotation.T
    r = model @ rotation.T + translation - measured
    along = np.einsum("ij,ij->i", r, n)
    tangential = r - along[:, None] * n
    return np.sqrt(along**2 + tangential_weight**2 * np.einsum("ij,ij->i", tangential, tangential))


def _median(values: np.ndarray) -> float:
    """``np.median`` of a short 1-D array (the same number, without its overhead)."""
    ordered = np.sort(values)
    half = len(ordered) // 2
    return float(ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2)


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
    values, known = np.asarray(values, np.float32), np.asarray(known, bool)
    if known.all() or not known.any():
        return values.copy()
    mask = known.view(np.uint8)
    channels = values.shape[2] if values.ndim == 3 else 1
    # weights repeated per channel keep every product below between same-shaped arrays (fast)
    weight = cv2.merge([mask.astype(np.float32)] * channels) if values.ndim == 3 else mask.astype(np.float32)
    levels = [(cv2.copyTo(values, mask), weight)]  # premultiplied values (0 where unknown), weights
    while min(levels[-1][1].shape[:2]) > 8:
        v, k = levels[-1]
        size = ((k.shape[1] + 1) // 2, (k.shape[0] + 1) // 2)
        levels.append((cv2.resize(v, size, interpolation=cv2.INTER_AREA),
                       cv2.resize(k, size, interpolation=cv2.INTER_AREA)))
    v, k = levels[-1]
    # coarsest level (<= 8 px): unknown cells take the mean of the known ones
    mean = v.reshape(-1, channels).sum(axis=0) / max(float(k.reshape(-1, channels)[:, 0].sum()), 1e-6)
    estimate = np.where(k > 0, v * (1.0 / np.maximum(k, 1e-6)), mean if channels > 1 else mean[0])
    for v, k in reversed(levels[1:-1]):
        up = cv2.resize(estimate, (k.shape[1], k.shape[0]), interpolation=cv2.INTER_LINEAR)
        # blend this level's own average with the coarser estimate by the share k of known pixels
        # under it: k * (v / k) + (1 - k) * up, v being premultiplied
        estimate = v + up * (1.0 - k)
    # the finest level's share is 0 or 1: known pixels keep their value, the others take the estimate
    filled = cv2.resize(estimate, (values.shape[1], values.shape[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.copyTo(values, mask, filled)


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
