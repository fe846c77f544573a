"""The published message, versioned: one :class:`FrameMessage` per processed frame.

A message travels as a ZeroMQ multipart ``[topic, payload]`` (see ``publisher.py``); the
payload is ``FrameMessage.to_dict()`` encoded as msgpack or JSON. :func:`validate` checks a
decoded dict against this module's schema, so producer and consumers agree on one
definition. ``docs/schema.md`` documents every field for users.

Class names travel in every message (about 60 bytes): a subscriber that joins late needs no
side channel to interpret ``probs``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime.spec import EXPRESSIONS, PREPROCESSING_VERSION

SCHEMA_VERSION = 1

RESULT_STATUSES: tuple[str, ...] = ("ok", "no_face", "bad_depth", "bad_fit")
"""Frame statuses of a processed frame, published on the result topic."""

STATUS_ONLY_STATUSES: tuple[str, ...] = ("camera_lost", "reconnected", "end_of_stream")
"""Events without a processed frame, published on the status topic."""

STATUSES: tuple[str, ...] = RESULT_STATUSES + STATUS_ONLY_STATUSES
FACE_STATUSES: tuple[str, ...] = ("ok", "bad_depth", "bad_fit")

TOPIC_RESULT = "result"
TOPIC_STATUS = "status"

PROB_SUM_TOLERANCE = 1e-3  # a float32 softmax strays ~1e-6 from 1; a wrong distribution far more


class SchemaError(ValueError):
    """A message does not follow the schema."""


def topic_for(status: str, prefix: str = "afnet") -> str:
    """The topic a message with frame ``status`` is published on, e.g. ``"afnet.result"``."""
    if status in RESULT_STATUSES:
        return f"{prefix}.{TOPIC_RESULT}"
    if status in STATUS_ONLY_STATUSES:
        return f"{prefix}.{TOPIC_STATUS}"
    raise SchemaError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")


@dataclass
class HeadPose:
    """Head pose from the canonical fit: canonical face frame -> camera."""

    yaw: float  # degrees
    pitch: float  # degrees
    roll: float  # degrees
    translation_mm: Sequence[float]  # (3,) nose tip in camera coordinates

    def to_dict(self) -> dict[str, Any]:
        return {
            "yaw": float(self.yaw),
            "pitch": float(self.pitch),
            "roll": float(self.roll),
            "translation_mm": _float_list(self.translation_mm),
        }


@dataclass
class ModelInfo:
    """Which model produced the probabilities."""

    model_version: str
    preprocessing_version: str

    def to_dict(self) -> dict[str, str]:
        return {"model_version": self.model_version, "preprocessing_version": self.preprocessing_version}


@dataclass(kw_only=True)
class FaceMessage:
    """One face in a frame.

    A face that could not be classified (``status`` ``bad_depth``/``bad_fit``) has no label
    (``None``), empty ``probs``/``probs_raw``/``modality_weights``, and a one-line
    ``status_reason``.
    """

    track_id: int
    bbox: Sequence[float]  # (4,) x0, y0, x1, y1 in colour-image pixels
    status: str = "ok"
    status_reason: str = ""
    label: str | None = None  # after temporal smoothing and hysteresis
    label_raw: str | None = None  # top class of this frame alone
    probs: Sequence[float] = ()  # (C,) smoothed, in class_names order
    probs_raw: Sequence[float] = ()  # (C,) this frame alone
    modality_weights: Sequence[Sequence[float]] = ()  # (F, 2) IWC weights (w2d, w3d) per fused stage
    head_pose: HeadPose | None = None
    fit_residual_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "track_id": int(self.track_id),
            "bbox": _float_list(self.bbox),
            "status": self.status,
            "status_reason": self.status_reason,
            "label": self.label,
            "label_raw": self.label_raw,
            "probs": _float_list(self.probs),
            "probs_raw": _float_list(self.probs_raw),
            "modality_weights": np.asarray(self.modality_weights, dtype=np.float64).reshape(-1, 2).tolist(),
            "head_pose": None if self.head_pose is None else self.head_pose.to_dict(),
            "fit_residual_mm": None if self.fit_residual_mm is None else float(self.fit_residual_mm),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FaceMessage":
        """Inverse of :meth:`to_dict` for an already validated dict."""
        pose = d["head_pose"]
        return cls(**{**d, "head_pose": None if pose is None else HeadPose(**pose)})


@dataclass(kw_only=True)
class FrameMessage:
    """Everything published about one processed frame (or one capture event).

    ``publish_time_ns``, ``wall_time``, ``publish_seq``, ``fps`` and the latency keys
    ``capture_to_publish``/``publish`` are stamped by ``Publisher.publish``; whatever the
    message holds there is overwritten.
    """

    seq: int  # capture sequence number; a status-only message carries the last frame's (-1 if none)
    capture_ts_ms: float | None  # the source's own clock; None on a status-only message without a frame
    host_time_ns: int  # time.monotonic_ns() at capture (or when a status event was noticed)
    status: str
    status_reason: str = ""  # one line, "" when ok
    class_names: Sequence[str]
    model: ModelInfo
    faces: list[FaceMessage] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    frames_dropped: int = 0
    frames_processed: int = 0
    fps: float = 0.0
    publish_time_ns: int = 0
    wall_time: float = 0.0
    publish_seq: int = 0
    schema: int = SCHEMA_VERSION

    @classmethod
    def status_only(
        cls,
        status: str,
        reason: str,
        *,
        class_names: Sequence[str],
        model: ModelInfo,
        seq: int = -1,
        capture_ts_ms: float | None = None,
        host_time_ns: int,
        frames_dropped: int = 0,
        frames_processed: int = 0,
    ) -> "FrameMessage":
        """A message for a capture event (``camera_lost``, ``reconnected``, ``end_of_stream``)."""
        if status not in STATUS_ONLY_STATUSES:
            raise ValueError(f"{status!r} is not a status-only status; expected one of {STATUS_ONLY_STATUSES}")
        return cls(
            seq=seq, capture_ts_ms=capture_ts_ms, host_time_ns=host_time_ns, status=status,
            status_reason=reason, class_names=class_names, model=model,
            frames_dropped=frames_dropped, frames_processed=frames_processed,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (dict/list/str/int/float/None): msgpack- and JSON-safe."""
        return {
            "schema": int(self.schema),
            "seq": int(self.seq),
            "capture_ts_ms": None if self.capture_ts_ms is None else float(self.capture_ts_ms),
            "host_time_ns": int(self.host_time_ns),
            "publish_time_ns": int(self.publish_time_ns),
            "wall_time": float(self.wall_time),
            "publish_seq": int(self.publish_seq),
            "status": self.status,
            "status_reason": self.status_reason,
            "class_names": [str(name) for name in self.class_names],
            "model": self.model.to_dict(),
            "faces": [face.to_dict() for face in self.faces],
            "latency_ms": {str(k): float(v) for k, v in self.latency_ms.items()},
            "fps": float(self.fps),
            "frames_dropped": int(self.frames_dropped),
            "frames_processed": int(self.frames_processed),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "message") -> "FrameMessage":
        """Build from a decoded dict; raises :class:`SchemaError` (naming ``source``) if invalid."""
        ensure_valid(d, source)
        return cls(**{
            **d,
            "model": ModelInfo(**d["model"]),
            "faces": [FaceMessage.from_dict(face) for face in d["faces"]],
        })


def frame_status(faces: Sequence[FaceMessage]) -> tuple[str, str]:
    """Frame status and reason from its faces' statuses.

    ``ok`` if at least one face was classified; ``no_face`` if there are none; otherwise the
    first (largest) face's failure status and reason.
    """
    if not faces:
        return "no_face", "no face found"
    if any(face.status == "ok" for face in faces):
        return "ok", ""
    return faces[0].status, faces[0].status_reason


# --- validation -----------------------------------------------------------------------------

_FRAME_KEYS = (
    "schema", "seq", "capture_ts_ms", "host_time_ns", "publish_time_ns", "wall_time", "publish_seq",
    "status", "status_reason", "class_names", "model", "faces", "latency_ms", "fps",
    "frames_dropped", "frames_processed",
)
_FACE_KEYS = (
    "track_id", "bbox", "status", "status_reason", "label", "label_raw", "probs", "probs_raw",
    "modality_weights", "head_pose", "fit_residual_mm",
)
_POSE_KEYS = ("yaw", "pitch", "roll", "translation_mm")
_MODEL_KEYS = ("model_version", "preprocessing_version")


def validate(d: Any) -> list[str]:
    """Check a decoded message against schema version :data:`SCHEMA_VERSION`.

    Returns:
        One line per problem, each naming the field (e.g. ``faces[0].probs: sums to 0.8``);
        an empty list when the message is valid.
    """
    errors: list[str] = []
    if not _keys(d, _FRAME_KEYS, "", errors):
        return errors
    if d["schema"] != SCHEMA_VERSION or isinstance(d["schema"], bool):
        errors.append(f"schema: version {d['schema']!r}, this validator reads {SCHEMA_VERSION}")
    _int(d, "seq", "", errors, minimum=-1)
    if d["capture_ts_ms"] is not None:
        _number(d, "capture_ts_ms", "", errors)
    for key in ("host_time_ns", "publish_time_ns", "publish_seq", "frames_dropped", "frames_processed"):
        _int(d, key, "", errors, minimum=0)
    _number(d, "wall_time", "", errors)
    _number(d, "fps", "", errors, minimum=0.0)
    _status(d, "", STATUSES, errors)

    names = d["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        errors.append("class_names: must be a non-empty list of strings")
        names = None
    elif len(set(names)) != len(names):
        errors.append("class_names: duplicate names")

    if _keys(d["model"], _MODEL_KEYS, "model.", errors):
        for key in _MODEL_KEYS:
            if not isinstance(d["model"][key], str):
                errors.append(f"model.{key}: must be a string")

    latency = d["latency_ms"]
    if not isinstance(latency, dict):
        errors.append("latency_ms: must be a map of stage name -> milliseconds")
    else:
        for key in latency:
            if not isinstance(key, str):
                errors.append(f"latency_ms: key {key!r} is not a string")
            else:
                _number(latency, key, "latency_ms.", errors, minimum=0.0)

    faces = d["faces"]
    if not isinstance(faces, list):
        errors.append("faces: must be a list")
        return errors
    for i, face in enumerate(faces):
        _validate_face(face, f"faces[{i}].", names, errors)
    _frame_consistency(d, faces, errors)
    return errors


def ensure_valid(d: Any, source: str = "message") -> None:
    """Raise :class:`SchemaError` (one line, naming ``source``) if ``d`` is not a valid message."""
    errors = validate(d)
    if errors:
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise SchemaError(f"{source}: invalid schema-{SCHEMA_VERSION} message: {'; '.join(errors[:3])}{more}")


def _validate_face(face: Any, where: str, names: list[str] | None, errors: list[str]) -> None:
    if not _keys(face, _FACE_KEYS, where, errors):
        return
    _int(face, "track_id", where, errors, minimum=-1)
    _number_list(face["bbox"], 4, where + "bbox", errors)
    if not _status(face, where, FACE_STATUSES, errors):
        return
    if face["fit_residual_mm"] is not None:
        _number(face, "fit_residual_mm", where, errors, minimum=0.0)
    if face["head_pose"] is not None and _keys(face["head_pose"], _POSE_KEYS, where + "head_pose.", errors):
        for key in _POSE_KEYS[:3]:
            _number(face["head_pose"], key, where + "head_pose.", errors)
        _number_list(face["head_pose"]["translation_mm"], 3, where + "head_pose.translation_mm", errors)

    if face["status"] != "ok":
        for key in ("label", "label_raw"):
            if face[key] is not None:
                errors.append(f"{where}{key}: must be null on a face with status {face['status']!r}")
        for key in ("probs", "probs_raw", "modality_weights"):
            if face[key] != []:
                errors.append(f"{where}{key}: must be empty on a face with status {face['status']!r}")
        return

    for key in ("label", "label_raw"):
        if names is not None and face[key] not in names:
            errors.append(f"{where}{key}: {face[key]!r} is not in class_names")
    for key in ("probs", "probs_raw"):
        if names is not None and _number_list(face[key], len(names), where + key, errors):
            _distribution(face[key], where + key, errors)
    weights = face["modality_weights"]
    if not isinstance(weights, list):
        errors.append(f"{where}modality_weights: must be a list of [w2d, w3d] rows")
    else:
        for j, row in enumerate(weights):
            if _number_list(row, 2, f"{where}modality_weights[{j}]", errors):
                _distribution(row, f"{where}modality_weights[{j}]", errors)
    if face["head_pose"] is None:
        errors.append(f"{where}head_pose: required on a face with status 'ok'")
    if face["fit_residual_mm"] is None:
        errors.append(f"{where}fit_residual_mm: required on a face with status 'ok'")


def _frame_consistency(d: Mapping[str, Any], faces: list[Any], errors: list[str]) -> None:
    """The frame status must agree with its faces (see :func:`frame_status`)."""
    status = d["status"]
    face_statuses = [f.get("status") for f in faces if isinstance(f, dict)]
    if status == "ok":
        if "ok" not in face_statuses:
            errors.append("status: 'ok' needs at least one face with status 'ok'")
        if d["status_reason"] != "":
            errors.append("status_reason: must be empty when status is 'ok'")
    elif status in ("no_face",) + STATUS_ONLY_STATUSES:
        if faces:
            errors.append(f"faces: must be empty when status is {status!r}")
    elif status in ("bad_depth", "bad_fit"):
        if not faces or "ok" in face_statuses:
            errors.append(f"status: {status!r} needs faces, none of them 'ok'")


def _keys(d: Any, expected: tuple[str, ...], where: str, errors: list[str]) -> bool:
    name = where.rstrip(".") or "message"
    if not isinstance(d, dict):
        errors.append(f"{name}: must be a map, got {type(d).__name__}")
        return False
    missing = [k for k in expected if k not in d]
    unknown = [k for k in d if k not in expected]
    if missing:
        errors.append(f"{name}: missing key(s) {', '.join(missing)}")
    if unknown:
        errors.append(f"{name}: unknown key(s) {', '.join(map(str, unknown))}")
    return not missing


def _is_number(x: Any) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)  # type(True) is bool: excluded


def _number(d: Mapping[str, Any], key: str, where: str, errors: list[str], minimum: float | None = None) -> None:
    x = d[key]
    if not _is_number(x):
        errors.append(f"{where}{key}: must be a finite number, got {x!r}")
    elif minimum is not None and x < minimum:
        errors.append(f"{where}{key}: {x!r} is below {minimum}")


def _int(d: Mapping[str, Any], key: str, where: str, errors: list[str], minimum: int) -> None:
    x = d[key]
    if not isinstance(x, int) or isinstance(x, bool):
        errors.append(f"{where}{key}: must be an integer, got {x!r}")
    elif x < minimum:
        errors.append(f"{where}{key}: {x} is below {minimum}")


def _status(d: Mapping[str, Any], where: str, allowed: tuple[str, ...], errors: list[str]) -> bool:
    ok = True
    if d["status"] not in allowed:
        errors.append(f"{where}status: {d['status']!r} is not one of {', '.join(allowed)}")
        ok = False
    reason = d["status_reason"]
    if not isinstance(reason, str) or "\n" in reason:
        errors.append(f"{where}status_reason: must be a one-line string")
    return ok


def _number_list(x: Any, length: int, where: str, errors: list[str]) -> bool:
    if not isinstance(x, list) or len(x) != length:
        errors.append(f"{where}: must be a list of {length} numbers, got {x!r}")
        return False
    # sum() is NaN or inf if any element is: one finiteness test for the whole list
    if not all(type(v) is float or type(v) is int for v in x) or not math.isfinite(sum(x)):
        errors.append(f"{where}: must hold finite numbers only")
        return False
    return True


def _distribution(x: list[float], where: str, errors: list[str]) -> None:
    if min(x) < 0.0 or max(x) > 1.0:
        errors.append(f"{where}: values must lie in [0, 1]")
    total = math.fsum(x)
    if abs(total - 1.0) > PROB_SUM_TOLERANCE:
        errors.append(f"{where}: sums to {total:.6g}, not 1")


def _float_list(x: Sequence[float] | np.ndarray) -> list[float]:
    return np.asarray(x, dtype=np.float64).ravel().tolist()


def example_message(seq: int = 0, num_faces: int = 1) -> FrameMessage:
    """A valid, realistic message (for docs/schema.md, tests and subscriber development)."""
    probs_raw = np.array([0.05, 0.02, 0.03, 0.02, 0.81, 0.04, 0.03])  # (C,) happiness leads
    probs = np.array([0.08, 0.03, 0.03, 0.03, 0.74, 0.05, 0.04])  # (C,)
    faces = [
        FaceMessage(
            track_id=i,
            bbox=(212.0 + 200 * i, 131.5, 398.0 + 200 * i, 352.0),
            label="happiness",
            label_raw="happiness",
            probs=probs,
            probs_raw=probs_raw,
            modality_weights=np.array([[0.58, 0.42], [0.47, 0.53]]),  # (F, 2)
            head_pose=HeadPose(yaw=-4.2, pitch=3.1, roll=0.8, translation_mm=(12.0, -20.5, 540.0)),
            fit_residual_mm=1.7,
        )
        for i in range(num_faces)
    ]
    status, reason = frame_status(faces)
    return FrameMessage(
        seq=seq, capture_ts_ms=1_700_000_000_000.0 + 33.3 * seq,
        host_time_ns=time.monotonic_ns() - 9_400_000,  # as if captured 9.4 ms ago
        status=status, status_reason=reason, class_names=EXPRESSIONS,
        model=ModelInfo(model_version="afnet-m-example", preprocessing_version=PREPROCESSING_VERSION),
        faces=faces,
        latency_ms={"landmarks": 2.4, "canonical": 2.1, "engine": 3.2, "postprocess": 0.1, "total": 7.8},
        frames_dropped=0, frames_processed=seq + 1,
    )
