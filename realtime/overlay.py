"""What the pipeline sees, drawn over the colour image: for ``--show`` and ``--save-video``.

Usage:
    with Overlay(OverlayOptions(video_path="out.mp4")) as overlay:
        pipeline = Pipeline(options, frame_callback=overlay.process)

Per face: landmarks, the salient-region outlines the masks come from, the box with track id
and label, class probabilities as bars, and the IWC modality weights (2D vs 3D) of the last
fused stage. A header line holds status, fps and latency.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import cv2
import numpy as np

from realtime.masks import MASK_LANDMARKS
from realtime.pipeline import FrameResult

REGION_COLORS = {  # BGR
    "left_eye": (255, 200, 0), "right_eye": (255, 200, 0), "left_brow": (0, 200, 255),
    "right_brow": (0, 200, 255), "nose": (200, 0, 255), "mouth": (0, 0, 255),
}
WINDOW = "afnet-m"


class DisplayError(RuntimeError):
    """``--show`` was asked for where no window can open."""


@dataclass
class OverlayOptions:
    show: bool = False  # an OpenCV window
    video_path: str | None = None  # an .mp4 of the overlay
    fps: float = 30.0  # frame rate written into the video


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=(255, 255, 255)) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def draw(result: FrameResult) -> np.ndarray:
    """The overlay image (H, W, 3) uint8 BGR of one processed frame."""
    img = cv2.cvtColor(result.frame.color, cv2.COLOR_RGB2BGR)
    msg = result.message
    for face, face_msg in zip(result.faces, msg.faces):
        pts = face.points
        for x, y in pts[::2].astype(np.int32):
            img[np.clip(y, 0, img.shape[0] - 1), np.clip(x, 0, img.shape[1] - 1)] = (160, 255, 160)
        for region, idx in MASK_LANDMARKS.items():
            hull = cv2.convexHull(pts[list(idx)].astype(np.int32))
            cv2.polylines(img, [hull], True, REGION_COLORS[region], 1, cv2.LINE_AA)
        x0, y0, x1, y1 = (int(v) for v in face_msg.bbox)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 255, 0) if face_msg.status == "ok" else (0, 0, 255), 1)
        if face_msg.status != "ok":
            _text(img, f"#{face_msg.track_id} {face_msg.status}", (x0, max(12, y0 - 6)), color=(0, 0, 255))
            continue
        label_prob = face_msg.probs[msg.class_names.index(face_msg.label)]  # hysteresis may hold a non-top label
        _text(img, f"#{face_msg.track_id} {face_msg.label} {label_prob:.2f}", (x0, max(12, y0 - 6)))
        _draw_bars(img, msg.class_names, face_msg.probs, (x1 + 8, y0))
        w2d, w3d = np.asarray(face_msg.modality_weights)[-1]
        _draw_weights(img, w2d, w3d, (x1 + 8, y0 + 14 * len(msg.class_names) + 6))
        pose = face_msg.head_pose
        _text(img, f"yaw {pose.yaw:+.0f} pitch {pose.pitch:+.0f} roll {pose.roll:+.0f}  fit {face_msg.fit_residual_mm:.1f} mm",
              (x0, min(img.shape[0] - 4, y1 + 16)))
    sent = result.published or msg.to_dict()
    header = (f"{msg.status}  fps {sent['fps']:.1f}  latency {sent['latency_ms'].get('capture_to_publish', 0):.1f} ms"
              f"  dropped {msg.frames_dropped}  seq {msg.seq}")
    _text(img, header, (8, 18), 0.5)
    return img


def _draw_bars(img: np.ndarray, names, probs, origin: tuple[int, int], width: int = 80) -> None:
    x, y = origin
    for i, (name, p) in enumerate(zip(names, probs)):
        row = y + 14 * i
        cv2.rectangle(img, (x, row), (x + int(width * p), row + 10), (0, 200, 0), -1)
        cv2.rectangle(img, (x, row), (x + width, row + 10), (90, 90, 90), 1)
        _text(img, name[:9], (x + width + 4, row + 9), 0.35)


def _draw_weights(img: np.ndarray, w2d: float, w3d: float, origin: tuple[int, int], width: int = 80) -> None:
    x, y = origin
    split = x + int(width * w2d)
    cv2.rectangle(img, (x, y), (split, y + 10), (255, 160, 60), -1)
    cv2.rectangle(img, (split, y), (x + width, y + 10), (60, 160, 255), -1)
    _text(img, f"2D {w2d:.2f} / 3D {w3d:.2f}", (x + width + 4, y + 9), 0.35)


class Overlay:
    """Shows and/or records the overlay of every processed frame."""

    def __init__(self, options: OverlayOptions) -> None:
        if options.show and sys.platform.startswith("linux") and not (
                os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise DisplayError("--show: no display here (DISPLAY is not set); use --save-video out.mp4 instead")
        self.options = options
        self._writer: cv2.VideoWriter | None = None
        self.frames_written = 0

    def __enter__(self) -> "Overlay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def process(self, result: FrameResult) -> None:
        img = draw(result)
        if self.options.video_path:
            if self._writer is None:
                h, w = img.shape[:2]
                self._writer = cv2.VideoWriter(self.options.video_path, cv2.VideoWriter_fourcc(*"mp4v"),
                                               self.options.fps, (w, h))
                if not self._writer.isOpened():
                    raise OSError(f"{self.options.video_path}: cannot open a video writer (mp4v)")
            self._writer.write(img)
            self.frames_written += 1
        if self.options.show:
            cv2.imshow(WINDOW, img)
            if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                raise KeyboardInterrupt  # the pipeline treats it as Ctrl-C: a clean stop

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.options.show:
            cv2.destroyAllWindows()
