"""Stable track ids for faces across frames, by bounding-box overlap.

Each frame's faces are matched to the live tracks greedily by IoU, best pair first (ties
broken by track age, then face order, so the result is deterministic). With the one to a few
faces FaceMesh returns, greedy matching equals the optimal assignment in practice and needs
no solver. A face left unmatched starts a new track; ids are never reused. A track unseen for
more than ``max_unseen_frames`` frames is dropped, so a face that leaves and another that
enters later get different ids.

Usage:
    tracker = FaceTracker()
    faces = detector.process(frame)
    tracker.process(faces)  # sets faces[i].track_id
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from realtime.frames import FaceLandmarks


@dataclass
class TrackerOptions:
    """Matching and track-lifetime settings."""

    min_iou: float = 0.3  # a face overlapping a track less than this starts a new track
    max_unseen_frames: int = 10  # drop a track after this many frames without its face

    def __post_init__(self) -> None:
        if not 0.0 < self.min_iou <= 1.0:
            raise ValueError(f"tracker min_iou {self.min_iou}: must lie in (0, 1]")
        if self.max_unseen_frames < 0:
            raise ValueError(f"tracker max_unseen_frames {self.max_unseen_frames}: must be >= 0")


@dataclass
class TrackingResult:
    """Track ids of one frame's faces (in input order) and track changes."""

    track_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    dropped_ids: list[int] = field(default_factory=list)


@dataclass
class _Track:
    bbox: np.ndarray  # (4,) float64, last seen x0, y0, x1, y1
    unseen_frames: int = 0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (N, 4) with every box in ``b`` (M, 4) -> (N, M)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)  # (N, M)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class FaceTracker:
    """Assigns ``track_id`` to each frame's faces; one instance per stream."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        self._tracks: dict[int, _Track] = {}  # insertion order = age, oldest first
        self._next_id = 0

    @property
    def track_ids(self) -> list[int]:
        """Live tracks, oldest first."""
        return list(self._tracks)

    def process(self, faces: list[FaceLandmarks]) -> TrackingResult:
        """Match ``faces`` to tracks and set each face's ``track_id`` in place.

        Call on every frame, with an empty list when no face was found, so tracks age.

        Raises:
            ValueError: a face's bbox is not 4 finite numbers.
        """
        boxes = np.array([_bbox(face, i) for i, face in enumerate(faces)], dtype=np.float64).reshape(-1, 4)
        ids = list(self._tracks)
        tracks = np.array([self._tracks[t].bbox for t in ids], dtype=np.float64).reshape(-1, 4)
        iou = iou_matrix(tracks, boxes)  # (T, F)

        result = TrackingResult(track_ids=[-1] * len(faces))
        pairs = np.argwhere(iou >= self.options.min_iou)  # (P, 2) rows (track index, face index), sorted
        order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
        used_tracks: set[int] = set()
        for t, f in pairs[order].tolist():
            if t in used_tracks or result.track_ids[f] != -1:
                continue
            used_tracks.add(t)
            result.track_ids[f] = ids[t]
        for f in range(len(faces)):
            if result.track_ids[f] == -1:
                result.track_ids[f] = self._next_id
                result.new_ids.append(self._next_id)
                self._tracks[self._next_id] = _Track(boxes[f])
                self._next_id += 1
            else:
                track = self._tracks[result.track_ids[f]]
                track.bbox, track.unseen_frames = boxes[f], 0
            faces[f].track_id = result.track_ids[f]

        for t in (t for i, t in enumerate(ids) if i not in used_tracks):
            self._tracks[t].unseen_frames += 1
            if self._tracks[t].unseen_frames > self.options.max_unseen_frames:
                del self._tracks[t]
                result.dropped_ids.append(t)
        return result

    def reset(self) -> None:
        """Forget every track; ids keep increasing."""
        self._tracks.clear()

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _bbox(face: FaceLandmarks, index: int) -> np.ndarray:
    try:
        box = np.asarray(face.bbox, dtype=np.float64)  # (4,)
    except (TypeError, ValueError):
        box = np.empty(0)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"face {index}: bbox must be 4 finite numbers x0, y0, x1, y1, got {face.bbox!r}")
    return box
