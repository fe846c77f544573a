"""Pinhole camera intrinsics, extrinsics and depth scale as small dataclasses.

One camera model serves the live RealSense path (read from the device), the scan renderer
(which renders what a D4xx would see) and the tests. Pixels follow the RealSense/OpenCV
convention: x to the right, y down, z forward from the camera, pixel centres at integer
coordinates. Lens distortion is ignored: a D4xx colour stream reports near-zero
Brown-Conrady coefficients, and aligned depth is already resampled into the colour image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for annotations: calib imports without pyrealsense2
    import pyrealsense2 as rs


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of one stream, in pixels."""

    width: int
    height: int
    fx: float
    fy: float
    ppx: float
    ppy: float

    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K."""
        return np.array([[self.fx, 0.0, self.ppx], [0.0, self.fy, self.ppy], [0.0, 0.0, 1.0]])

    def backproject(self, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Pixel coordinates and depth (any unit) to camera-frame points (N, 3), same unit."""
        z = np.asarray(z, dtype=np.float32)
        x = (np.asarray(u, dtype=np.float32) - self.ppx) / self.fx * z
        y = (np.asarray(v, dtype=np.float32) - self.ppy) / self.fy * z
        return np.stack([x, y, z], axis=-1)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame points (N, 3) to pixel coordinates (N, 2); points must have z > 0."""
        points = np.asarray(points, dtype=np.float32)
        z = points[..., 2]
        return np.stack(
            [points[..., 0] / z * self.fx + self.ppx, points[..., 1] / z * self.fy + self.ppy], axis=-1
        )

    def scaled(self, width: int, height: int) -> "CameraIntrinsics":
        """The same lens at another resolution (as the RealSense resamples it)."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(width, height, self.fx * sx, self.fy * sy,
                                (self.ppx + 0.5) * sx - 0.5, (self.ppy + 0.5) * sy - 0.5)

    @classmethod
    def from_realsense(cls, intr: rs.intrinsics) -> "CameraIntrinsics":
        """From a ``pyrealsense2.intrinsics`` (``video_stream_profile.get_intrinsics()``)."""
        return cls(int(intr.width), int(intr.height), float(intr.fx), float(intr.fy),
                   float(intr.ppx), float(intr.ppy))

    def to_realsense(self) -> rs.intrinsics:
        """As a ``pyrealsense2.intrinsics`` without distortion (imports pyrealsense2)."""
        import pyrealsense2 as rs  # lazy: calib imports without pyrealsense2

        intr = rs.intrinsics()
        intr.width, intr.height = self.width, self.height
        intr.fx, intr.fy, intr.ppx, intr.ppy = self.fx, self.fy, self.ppx, self.ppy
        intr.model = rs.distortion.none
        intr.coeffs = [0.0] * 5
        return intr

    def is_close(self, other: "CameraIntrinsics", tol: float = 1e-4) -> bool:
        """Same size and focal lengths/principal point within ``tol`` pixels."""
        return (self.width, self.height) == (other.width, other.height) and bool(np.allclose(
            [self.fx, self.fy, self.ppx, self.ppy], [other.fx, other.fy, other.ppx, other.ppy],
            rtol=0.0, atol=tol))


@dataclass(frozen=True)
class Extrinsics:
    """Rigid transform from one stream's frame to another's: p_to = R @ p_from + t (metres)."""

    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major 3x3
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous transform."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        m[:3, 3] = self.translation
        return m

    def is_identity(self, tol: float = 1e-6) -> bool:
        """Whether this is the identity transform (within ``tol``; metres for the translation)."""
        return bool(np.allclose(self.matrix(), np.eye(4), rtol=0.0, atol=tol))

    @classmethod
    def from_realsense(cls, ext: rs.extrinsics) -> "Extrinsics":
        """From a ``pyrealsense2.extrinsics`` (``stream_profile.get_extrinsics_to()``).

        librealsense stores the rotation column-major; this class stores it row-major.
        """
        rotation = np.asarray(ext.rotation, dtype=np.float64).reshape(3, 3).T
        return cls(tuple(float(r) for r in rotation.reshape(-1)),
                   tuple(float(t) for t in ext.translation))

    def to_realsense(self) -> rs.extrinsics:
        """As a ``pyrealsense2.extrinsics`` (imports pyrealsense2)."""
        import pyrealsense2 as rs  # lazy: calib imports without pyrealsense2

        ext = rs.extrinsics()
        ext.rotation = [float(r) for r in np.asarray(self.rotation).reshape(3, 3).T.reshape(-1)]
        ext.translation = [float(t) for t in self.translation]
        return ext


@dataclass(frozen=True)
class CameraModel:
    """What the pipeline needs to know about an RGB-D camera.

    ``depth_scale`` is metres per raw depth unit (a D4xx reports 0.001 by default).
    """

    color: CameraIntrinsics
    depth: CameraIntrinsics
    depth_to_color: Extrinsics = field(default_factory=Extrinsics)
    depth_scale: float = 0.001

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    def depth_is_registered(self) -> bool:
        """Whether depth already lies in the colour image (same intrinsics, identity extrinsics)."""
        return self.depth.is_close(self.color) and self.depth_to_color.is_identity()

    @classmethod
    def from_realsense_profile(cls, profile: rs.pipeline_profile) -> "CameraModel":
        """Read a started ``pyrealsense2.pipeline_profile`` (live camera or recording).

        Colour and depth intrinsics come from the stream profiles, the depth-to-colour
        extrinsics from the depth profile, the depth scale from the device's depth sensor.

        Raises:
            ValueError: The profile lacks a depth or a colour stream, or a depth sensor.
        """
        import pyrealsense2 as rs  # lazy: calib imports without pyrealsense2

        try:
            depth = profile.get_stream(rs.stream.depth).as_video_stream_profile()
            color = profile.get_stream(rs.stream.color).as_video_stream_profile()
            depth_scale = float(profile.get_device().first_depth_sensor().get_depth_scale())
        except RuntimeError as exc:  # e.g. "Profile does not contain the requested stream"
            raise ValueError(f"pipeline profile needs depth and colour streams ({exc})") from exc
        return cls(
            color=CameraIntrinsics.from_realsense(color.get_intrinsics()),
            depth=CameraIntrinsics.from_realsense(depth.get_intrinsics()),
            depth_to_color=Extrinsics.from_realsense(depth.get_extrinsics_to(color)),
            depth_scale=depth_scale,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "CameraModel":
        return cls(
            color=CameraIntrinsics(**d["color"]),
            depth=CameraIntrinsics(**d["depth"]),
            depth_to_color=Extrinsics(tuple(d["depth_to_color"]["rotation"]),
                                      tuple(d["depth_to_color"]["translation"])),
            depth_scale=float(d["depth_scale"]),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "CameraModel":
        """Load a camera model written by :meth:`to_json`; a bad file raises ``ValueError``."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a camera model JSON ({exc})") from exc


# A D435/D455-like colour stream at 640x480 (typical factory values; a live camera reports
# its own). Aligned depth uses the colour intrinsics, so this is also the rendered depth's.
D4XX_COLOR_640x480 = CameraIntrinsics(640, 480, 615.0, 615.0, 319.5, 239.5)
D4XX_CAMERA = CameraModel(color=D4XX_COLOR_640x480, depth=D4XX_COLOR_640x480)
