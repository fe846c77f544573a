"""The built-in demo clip: a small file of aligned 640x480 RGB-D frames.

A clip is one uncompressed ``.npz`` (a zip of ``.npy`` arrays, read without pickle) holding
every frame's colour as JPEG and depth as 16-bit PNG (``cv2.imencode``), so a few hundred
VGA frames stay in the tens of MB. Arrays in the file:

==================  ===============  ==================================================
key                 dtype / shape    meaning
==================  ===============  ==================================================
``format``          str ()           ``"afnet-demo-clip"``
``version``         int64 ()         :data:`CLIP_VERSION`
``camera_json``     str ()           :class:`calib.camera.CameraModel` as JSON; depth is
                                     aligned to colour, so ``depth`` == ``color`` geometry
``fps``             float64 ()       frames per second the clip plays at
``color_data``      uint8 (Nc,)      the N JPEG files (RGB content), concatenated
``color_offsets``   int64 (N+1,)     frame i is ``color_data[off[i]:off[i+1]]``
``depth_data``      uint8 (Nd,)      the N 16-bit PNG files (raw depth units), concatenated
``depth_offsets``   int64 (N+1,)     as ``color_offsets``
``labels``          str (N,)         optional per-frame ground truth, ``""`` = unlabelled
``extra_<name>``    any (N, ...)     optional per-frame data for benchmarks (e.g.
                                     ``extra_head_pose``: yaw, pitch, roll deg, x, y, z mm)
==================  ===============  ==================================================

Usage:
    clip = DemoClip.load("realtime/assets/demo_clip.npz")
    frame = clip.frame(0)          # RGBDFrame, decoded on demand
    write_demo_clip("out.npz", frames, fps=30.0, labels=["happiness", ...])
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from calib.camera import CameraModel
from realtime.frames import RGBDFrame

CLIP_FORMAT = "afnet-demo-clip"
CLIP_VERSION = 1
DEFAULT_DEMO_CLIP = Path(__file__).resolve().parent / "assets" / "demo_clip.npz"
"""Where the shipped demo clip lives (package data)."""

_EXTRA_PREFIX = "extra_"
_REQUIRED = ("format", "version", "camera_json", "fps",
             "color_data", "color_offsets", "depth_data", "depth_offsets")


class DemoClipError(ValueError):
    """A demo clip that is missing, corrupt or inconsistent; the message is one line naming it."""


class DemoClip:
    """A loaded demo clip: compressed frames in memory, decoded one at a time.

    Attributes:
        path: The file it was loaded from.
        camera: Camera model of the clip (colour intrinsics, depth scale).
        fps: Playback rate in frames per second.
        labels: Per-frame ground-truth labels (``None`` for an unlabelled frame), or ``None``.
        extras: Per-frame benchmark arrays by name (first axis = frame), e.g. ``head_pose``.
    """

    def __init__(self, path: Path, camera: CameraModel, fps: float,
                 color: tuple[np.ndarray, np.ndarray], depth: tuple[np.ndarray, np.ndarray],
                 labels: tuple[str | None, ...] | None, extras: dict[str, np.ndarray]):
        self.path = path
        self.camera = camera
        self.fps = fps
        self.labels = labels
        self.extras = extras
        self._color_data, self._color_offsets = color  # (Nc,) uint8, (N+1,) int64
        self._depth_data, self._depth_offsets = depth  # (Nd,) uint8, (N+1,) int64

    @classmethod
    def load(cls, path: str | Path) -> "DemoClip":
        """Read a clip written by :func:`write_demo_clip`.

        Raises:
            DemoClipError: The file is missing, not a clip, of another version or inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise DemoClipError(f"{path}: demo clip not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DemoClipError(f"{path}: not a readable demo clip ({exc})") from exc
        missing = [key for key in _REQUIRED if key not in arrays]
        if missing:
            raise DemoClipError(f"{path}: not a demo clip (missing {', '.join(missing)})")
        if str(arrays["format"]) != CLIP_FORMAT or int(arrays["version"]) != CLIP_VERSION:
            raise DemoClipError(f"{path}: unsupported clip format {str(arrays['format'])!r} "
                                f"version {int(arrays['version'])} (expected {CLIP_FORMAT!r} "
                                f"version {CLIP_VERSION})")
        try:
            camera = CameraModel.from_dict(json.loads(str(arrays["camera_json"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DemoClipError(f"{path}: bad camera model in clip ({exc})") from exc
        fps = float(arrays["fps"])
        if not fps > 0:
            raise DemoClipError(f"{path}: bad fps {fps}")
        color = _checked_stream(path, "color", arrays["color_data"], arrays["color_offsets"])
        depth = _checked_stream(path, "depth", arrays["depth_data"], arrays["depth_offsets"])
        n = len(color[1]) - 1
        if len(depth[1]) - 1 != n:
            raise DemoClipError(f"{path}: {n} colour frames but {len(depth[1]) - 1} depth frames")
        labels = None
        if "labels" in arrays:
            if arrays["labels"].shape != (n,):
                raise DemoClipError(f"{path}: labels of shape {arrays['labels'].shape} "
                                    f"for {n} frames")
            labels = tuple(str(label) or None for label in arrays["labels"])
        extras = {key[len(_EXTRA_PREFIX):]: value for key, value in arrays.items()
                  if key.startswith(_EXTRA_PREFIX)}
        for name, value in extras.items():
            if value.ndim == 0 or value.shape[0] != n:
                raise DemoClipError(f"{path}: extra {name!r} has shape {value.shape}, "
                                    f"expected {n} rows")
        return cls(path, camera, fps, color, depth, labels, extras)

    def __len__(self) -> int:
        return len(self._color_offsets) - 1

    def __iter__(self) -> Iterator[RGBDFrame]:
        return (self.frame(i) for i in range(len(self)))

    def frame(self, i: int) -> RGBDFrame:
        """Decode frame ``i`` (``sequence`` = i, ``timestamp_ms`` = i / fps, its label).

        Raises:
            IndexError: ``i`` is outside the clip.
            DemoClipError: The frame's JPEG or PNG does not decode to the clip's geometry.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: frame {i} out of range (clip has {len(self)})")
        color = self._decode(i, "colour JPEG", self._color_data, self._color_offsets,
                             cv2.IMREAD_COLOR, np.uint8, 3)
        depth = self._decode(i, "depth PNG", self._depth_data, self._depth_offsets,
                             cv2.IMREAD_UNCHANGED, np.uint16, 2)
        return RGBDFrame(
            color=cv2.cvtColor(color, cv2.COLOR_BGR2RGB),  # (H, W, 3) uint8
            depth=depth,  # (H, W) uint16
            depth_scale=self.camera.depth_scale,
            intrinsics=self.camera.color,
            sequence=i,
            timestamp_ms=i * 1000.0 / self.fps,
            ground_truth=self.labels[i] if self.labels is not None else None,
        )

    def _decode(self, i: int, what: str, data: np.ndarray, offsets: np.ndarray, flags: int,
                dtype: type, ndim: int) -> np.ndarray:
        image = cv2.imdecode(data[offsets[i]:offsets[i + 1]], flags)
        size = (self.camera.color.height, self.camera.color.width)
        if image is None or image.dtype != dtype or image.ndim != ndim or image.shape[:2] != size:
            got = "nothing" if image is None else f"{image.dtype} {image.shape}"
            raise DemoClipError(f"{self.path}: frame {i}: {what} does not decode to a "
                                f"{size[1]}x{size[0]} {np.dtype(dtype)} image (got {got})")
        return image


def _checked_stream(path: Path, name: str, data: np.ndarray,
                    offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one concatenated stream: uint8 bytes cut by non-decreasing offsets."""
    if (data.dtype != np.uint8 or data.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1
            or offsets.dtype.kind not in "iu"):
        raise DemoClipError(f"{path}: corrupt {name} stream (data {data.dtype} {data.shape}, "
                            f"offsets {offsets.dtype} {offsets.shape})")
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
        raise DemoClipError(f"{path}: corrupt {name} stream (offsets do not cut "
                            f"{len(data)} bytes into frames)")
    return data, offsets.astype(np.int64)


def write_demo_clip(path: str | Path, frames: Iterable[RGBDFrame], fps: float,
                    labels: Sequence[str | None] | None = None,
                    extras: Mapping[str, np.ndarray] | None = None,
                    camera: CameraModel | None = None, jpeg_quality: int = 90) -> Path:
    """Encode frames into a demo clip file (written to a temporary name, then renamed).

    Args:
        path: Output file (``.npz`` by convention; the name is used as given).
        frames: Aligned RGB-D frames, all with the first frame's size, intrinsics and depth
            scale. Their ``ground_truth`` is stored as the label when ``labels`` is None.
        fps: Playback rate of the clip.
        labels: One label per frame (``None`` or ``""`` = unlabelled), overriding the frames'.
        extras: Per-frame benchmark arrays by name, first axis = frame (e.g. ``head_pose``).
        camera: Camera model to store; default: the frames' colour intrinsics for both
            streams (depth is aligned), identity extrinsics, the frames' depth scale.
        jpeg_quality: Colour JPEG quality (0-100).

    Returns:
        The path written.

    Raises:
        ValueError: No frames, inconsistent frames, bad fps, or label/extra counts that do not
            match the number of frames.
    """
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    color_parts: list[np.ndarray] = []
    depth_parts: list[np.ndarray] = []
    frame_labels: list[str | None] = []
    first: RGBDFrame | None = None
    for i, frame in enumerate(frames):
        if first is None:
            first = frame
        size = (first.intrinsics.height, first.intrinsics.width)
        if (frame.intrinsics != first.intrinsics or frame.depth_scale != first.depth_scale
                or frame.color.shape != (*size, 3) or frame.color.dtype != np.uint8
                or frame.depth.shape != size or frame.depth.dtype != np.uint16):
            raise ValueError(f"{path}: frame {i}: expected {size[1]}x{size[0]} uint8 colour and "
                             f"uint16 depth with frame 0's intrinsics and depth scale")
        color_parts.append(_encode(".jpg", cv2.cvtColor(frame.color, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]))
        depth_parts.append(_encode(".png", frame.depth, [cv2.IMWRITE_PNG_COMPRESSION, 3]))
        frame_labels.append(frame.ground_truth)
    if first is None:
        raise ValueError(f"{path}: a demo clip needs at least one frame")
    n = len(color_parts)
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"{path}: {len(labels)} labels for {n} frames")
        frame_labels = list(labels)
    camera = camera or CameraModel(color=first.intrinsics, depth=first.intrinsics,
                                   depth_scale=first.depth_scale)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(CLIP_FORMAT),
        "version": np.array(CLIP_VERSION, dtype=np.int64),
        "camera_json": np.array(json.dumps(camera.to_dict())),
        "fps": np.array(float(fps)),
    }
    for name, parts in (("color", color_parts), ("depth", depth_parts)):
        arrays[f"{name}_data"] = np.concatenate(parts)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    if any(frame_labels):
        arrays["labels"] = np.array([label or "" for label in frame_labels], dtype=str)
    for name, value in (extras or {}).items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != n or value.dtype == object:
            raise ValueError(f"{path}: extra {name!r} must be a numeric or string array with "
                             f"{n} rows, got {value.dtype} {value.shape}")
        arrays[_EXTRA_PREFIX + name] = value
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def _encode(ext: str, image: np.ndarray, params: list[int]) -> np.ndarray:
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise ValueError(f"cv2.imencode({ext!r}) failed for a {image.dtype} {image.shape} image")
    return buf.reshape(-1)  # (nbytes,) uint8
