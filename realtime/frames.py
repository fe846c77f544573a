"""Data that flows between the runtime stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from calib.camera import CameraIntrinsics


@dataclass
class RGBDFrame:
    """One aligned colour + depth frame, as it leaves capture.

    ``depth`` is aligned to ``color`` (same size, same ``intrinsics``); 0 means no depth.
    ``sequence`` and ``host_time_ns`` are assigned once at capture and carried to the
    published message.
    """

    color: np.ndarray  # (H, W, 3) uint8, RGB
    depth: np.ndarray  # (H, W) uint16 raw units
    depth_scale: float  # metres per raw unit
    intrinsics: CameraIntrinsics
    sequence: int = 0
    timestamp_ms: float = 0.0  # the source's own clock (device or recording)
    host_time_ns: int = field(default_factory=time.monotonic_ns)
    ground_truth: str | None = None  # label of a generated clip's frame, for benchmarks

    def depth_mm(self) -> np.ndarray:
        """Depth in millimetres as float32 (0 where there is none)."""
        return self.depth.astype(np.float32) * np.float32(self.depth_scale * 1000.0)


@dataclass
class FaceLandmarks:
    """One face's landmarks in the colour image."""

    points: np.ndarray  # (N, 2) float32, pixel x (right), y (down); N = 468 (MediaPipe mesh)
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    track_id: int = -1
