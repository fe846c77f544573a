"""Salient-region masks in the canonical frame, rasterised from the face's own landmarks.

Usage:
    from realtime.masks import rasterize_masks, flip_masks
    masks = rasterize_masks(landmarks_canonical[:, :2])  # (6, 112, 112) float32 in MASK_NAMES order

Each region is the convex hull of its MediaPipe landmarks (index sets copied from
``mediapipe.solutions.face_mesh_connections`` 0.10.21; a test checks they still match), dilated
by ``dilate_mm``. The landmarks are the current face's, so the masks follow the expression: an
open mouth gives a taller mouth mask, raised brows move the brow masks up. MediaPipe's
"LEFT" sets are the subject's left: +x in the canonical frame, the right half of the maps.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from realtime.spec import MASK_NAMES, SPEC, CanonicalSpec

MASK_LANDMARKS: dict[str, tuple[int, ...]] = {
    "left_eye": (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466),
    "right_eye": (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246),
    "left_brow": (276, 282, 283, 285, 293, 295, 296, 300, 334, 336),
    "right_brow": (46, 52, 53, 55, 63, 65, 66, 70, 105, 107),
    "nose": (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327,
             344, 440),
    "mouth": (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267,
              269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415),
}
"""Landmark indices of each region (MediaPipe FACEMESH_LEFT_EYE, ..., FACEMESH_NOSE, FACEMESH_LIPS)."""

FACE_OVAL: tuple[int, ...] = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
                              400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
                              54, 103, 67, 109)
"""FACEMESH_FACE_OVAL as a closed polygon, in order around the face."""

_MASK_INDEX = [np.array(MASK_LANDMARKS[name]) for name in MASK_NAMES]


def flip_permutation(mask_names: tuple[str, ...] = MASK_NAMES) -> tuple[int, ...]:
    """Mask channel order after a horizontal flip: ``left_*`` and ``right_*`` trade places."""
    def mirrored(name: str) -> str:
        if name.startswith("left_"):
            return "right_" + name[5:]
        if name.startswith("right_"):
            return "left_" + name[6:]
        return name

    index = {name: i for i, name in enumerate(mask_names)}
    try:
        return tuple(index[mirrored(name)] for name in mask_names)
    except KeyError as exc:
        raise ValueError(f"mask {exc.args[0]!r} has no mirrored partner in {list(mask_names)}") from None


FLIP_PERMUTATION: tuple[int, ...] = flip_permutation()
"""Channel order of the masks after a horizontal flip (left and right swap)."""

DILATE_MM = 2.5


def canonical_to_pixels(points_mm: np.ndarray, spec: CanonicalSpec = SPEC) -> np.ndarray:
    """Canonical (x, y) in mm (N, 2) -> map (col, row) (N, 2) float32; the nose tip -> (nose_col, nose_row)."""
    points_mm = np.asarray(points_mm, np.float32)
    return np.stack([spec.nose_col + points_mm[:, 0] / spec.mm_per_px,
                     spec.nose_row - points_mm[:, 1] / spec.mm_per_px], axis=1)


@lru_cache(maxsize=None)
def disk(radius: int) -> np.ndarray:
    """Elliptic structuring element of this radius (2r+1, 2r+1) uint8, shared and read-only."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    kernel.flags.writeable = False
    return kernel


def _fixed_point(points_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel points (N, 2) -> (N, 2) int32 with 4 fractional bits (0 for NaN rows), and which rows are finite (N,)."""
    finite = np.isfinite(points_px).all(axis=1)
    if not finite.all():
        points_px = np.where(finite[:, None], points_px, 0.0)
    return np.round(points_px * 16).astype(np.int32), finite


def _draw_hull(out: np.ndarray, fixed: np.ndarray) -> None:
    """Fill the convex hull of (N, 2) fixed-point pixels into ``out`` (H, W) uint8 with 1 (subpixel
    exact); fewer than 3 points draw nothing."""
    if len(fixed) >= 3:
        cv2.fillConvexPoly(out, cv2.convexHull(fixed), 1, lineType=cv2.LINE_8, shift=4)


def rasterize_masks(points_mm: np.ndarray, spec: CanonicalSpec = SPEC, dilate_mm: float = DILATE_MM) -> np.ndarray:
    """The six region masks from canonical landmark positions.

    Args:
        points_mm: (468, 2) or (468, 3) canonical landmarks (only x, y are used); NaN rows are skipped.
        spec: the raster.
        dilate_mm: how far each hull grows.

    Returns:
        (6, size, size) float32 {0, 1} in ``MASK_NAMES`` order.
    """
    px = canonical_to_pixels(np.asarray(points_mm)[:, :2], spec)
    radius = int(round(dilate_mm / spec.mm_per_px))
    size, pad = spec.size, radius + 1
    # all hulls on one tall canvas, apart by more than the dilation radius: one dilate for all six
    canvas = np.zeros((len(MASK_NAMES) * (size + pad), size), np.uint8)
    fixed, finite = _fixed_point(px)
    for c, index in enumerate(_MASK_INDEX):
        top = c * (size + pad)
        _draw_hull(canvas[top:top + size], fixed[index if finite.all() else index[finite[index]]])
    if radius:
        canvas = cv2.dilate(canvas, disk(radius))
    tiles = canvas.reshape(len(MASK_NAMES), size + pad, size)[:, :size]
    return tiles.astype(np.float32)


def flip_masks(masks: np.ndarray) -> np.ndarray:
    """Mirror masks horizontally and swap left/right channels: (..., 6, H, W) -> same shape.

    The canonical raster is mirror-symmetric about the nose column (``nose_col`` is the centre
    between the two middle columns), so this is exactly the masks of the mirrored face.
    """
    return np.ascontiguousarray(masks[..., list(FLIP_PERMUTATION), :, ::-1])
