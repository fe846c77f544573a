"""MediaPipe FaceMesh stage: 468 landmarks per face, in pixels of the colour image.

Usage:
    from realtime.landmarks import LandmarkDetector, LandmarkOptions
    with LandmarkDetector(LandmarkOptions(max_faces=2)) as detector:
        faces = detector.process(frame)  # list[FaceLandmarks], largest face first; [] = no face

Uses the legacy ``mediapipe.solutions.face_mesh`` API of mediapipe 0.10.21, whose wheel
carries the models (no download). In tracking mode (``static_image_mode=False``, the default)
MediaPipe reuses the previous frame's faces, so feed one stream's frames in order; use
``static_image_mode=True`` for unrelated images (datasets). Points follow the project's pixel
convention (pixel centres at integer coordinates): MediaPipe's normalised ``x`` becomes
``x * width - 0.5``. Track ids are assigned by a later stage, so they stay -1 here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from realtime.frames import FaceLandmarks, RGBDFrame
from realtime.native_log import quiet_native_stderr

NUM_LANDMARKS = 468
_QUIET_FACE_FRAMES = 3  # frames with a face whose MediaPipe C++ warnings are held back


@dataclass
class LandmarkOptions:
    """FaceMesh settings (the names and meanings of mediapipe's ``FaceMesh`` arguments)."""

    max_faces: int = 1
    static_image_mode: bool = False
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    refine_landmarks: bool = False  # adds 10 iris points; only the first 468 are returned

    def __post_init__(self) -> None:
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        for name in ("min_detection_confidence", "min_tracking_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class LandmarkDetector:
    """Finds faces and their 468 FaceMesh landmarks in RGB frames."""

    def __init__(self, options: LandmarkOptions | None = None) -> None:
        self.options = options or LandmarkOptions()
        with quiet_native_stderr():  # MediaPipe's C++ start-up lines
            import mediapipe as mp  # heavy import, only when a detector is made

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=self.options.static_image_mode,
                max_num_faces=self.options.max_faces,
                refine_landmarks=self.options.refine_landmarks,
                min_detection_confidence=self.options.min_detection_confidence,
                min_tracking_confidence=self.options.min_tracking_confidence,
            )
            # The graph opens its models on its own threads; one frame waits for that (and warms up).
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))
        self._quiet_frames = _QUIET_FACE_FRAMES

    def __enter__(self) -> "LandmarkDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe graph (safe to call twice)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def process(self, frame: RGBDFrame) -> list[FaceLandmarks]:
        """Landmarks of the faces in ``frame.color`` (RGB), largest bounding box first.

        Raises:
            ValueError: the colour image is not (H, W, 3) uint8, or the detector is closed.
        """
        return self.process_image(frame.color)

    def process_image(self, color: np.ndarray) -> list[FaceLandmarks]:
        """Same as :meth:`process` for a bare (H, W, 3) uint8 RGB image."""
        if self._mesh is None:
            raise ValueError("LandmarkDetector is closed")
        if color.ndim != 3 or color.shape[2] != 3 or color.dtype != np.uint8:
            raise ValueError(f"colour image must be (H, W, 3) uint8 RGB, got {color.shape} {color.dtype}")
        h, w = color.shape[:2]
        # MediaPipe's first tracked faces print one more C++ warning
        with quiet_native_stderr() if self._quiet_frames else nullcontext():
            result = self._mesh.process(np.ascontiguousarray(color))
        if self._quiet_frames and result.multi_face_landmarks:
            self._quiet_frames -= 1
        faces = []
        for face in result.multi_face_landmarks or []:
            xy = np.array([(p.x, p.y) for p in face.landmark[:NUM_LANDMARKS]], np.float32)  # (468, 2)
            points = xy * np.array([w, h], np.float32) - 0.5
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            faces.append(FaceLandmarks(points=points, bbox=(float(x0), float(y0), float(x1), float(y1))))
        faces.sort(key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]), reverse=True)
        return faces
