"""The published message: plain types, encodings, validation of every rule, status logic."""

import copy
import json

import msgpack
import numpy as np
import pytest

from realtime.schema import (
    SCHEMA_VERSION,
    FaceMessage,
    FrameMessage,
    ModelInfo,
    SchemaError,
    ensure_valid,
    example_message,
    frame_status,
    topic_for,
    validate,
)


def _plain(x):
    """True if x holds only the types msgpack and JSON carry natively."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def _failed_face(status="bad_depth"):
    return FaceMessage(track_id=3, bbox=(1, 2, 30, 40), status=status, status_reason="too few depth pixels")


def test_to_dict_is_plain_and_survives_msgpack_and_json():
    msg = example_message(seq=7, num_faces=2)
    msg.faces[0].probs = np.asarray(msg.faces[0].probs, dtype=np.float32)  # what the engine gives
    msg.fps = np.float32(29.5)
    d = msg.to_dict()
    assert _plain(d)
    assert validate(d) == []
    assert msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False) == d
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["schema"] == SCHEMA_VERSION and d["seq"] == 7
    assert d["faces"][1]["modality_weights"] == [[0.58, 0.42], [0.47, 0.53]]
    assert d["faces"][0]["probs"] == pytest.approx(np.float32([0.08, 0.03, 0.03, 0.03, 0.74, 0.05, 0.04]))


def test_from_dict_round_trips():
    d = example_message(seq=3).to_dict()
    again = FrameMessage.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert again.faces[0].head_pose.yaw == pytest.approx(-4.2)


def test_failed_face_and_status_only_messages_validate():
    model = ModelInfo("m1", "p1")
    faces = [_failed_face("bad_fit"), _failed_face("bad_depth")]
    status, reason = frame_status(faces)
    assert (status, reason) == ("bad_fit", "too few depth pixels")
    msg = FrameMessage(seq=1, capture_ts_ms=5.0, host_time_ns=9, status=status, status_reason=reason,
                       class_names=["a", "b"], model=model, faces=faces)
    assert validate(msg.to_dict()) == []
    lost = FrameMessage.status_only("camera_lost", "Frame didn't arrive within 5000", class_names=["a", "b"],
                                    model=model, host_time_ns=10)
    d = lost.to_dict()
    assert validate(d) == [] and d["capture_ts_ms"] is None and d["seq"] == -1
    with pytest.raises(ValueError, match="status-only"):
        FrameMessage.status_only("ok", "", class_names=["a"], model=model, host_time_ns=1)


def test_frame_status_rules():
    ok = example_message().faces[0]
    assert frame_status([]) == ("no_face", "no face found")
    assert frame_status([_failed_face(), ok])[0] == "ok"
    assert frame_status([_failed_face()]) == ("bad_depth", "too few depth pixels")


def test_topics():
    assert topic_for("ok") == "afnet.result"
    assert topic_for("bad_depth", "cam2") == "cam2.result"
    assert topic_for("end_of_stream") == "afnet.status"
    with pytest.raises(SchemaError, match="unknown status 'lost'"):
        topic_for("lost")


def _broken(mutate):
    d = example_message(num_faces=2).to_dict()
    mutate(d)
    return validate(d)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("fps"), "missing key(s) fps"),
    (lambda d: d.update(extra=1), "unknown key(s) extra"),
    (lambda d: d.update(schema=2), "schema: version 2"),
    (lambda d: d.update(seq="12"), "seq: must be an integer"),
    (lambda d: d.update(seq=True), "seq: must be an integer"),
    (lambda d: d.update(fps=float("nan")), "fps: must be a finite number"),
    (lambda d: d.update(status="lost"), "status: 'lost' is not one of"),
    (lambda d: d.update(status_reason="two\nlines"), "status_reason: must be a one-line string"),
    (lambda d: d.update(class_names=["a", "a"]), "class_names: duplicate"),
    (lambda d: d["model"].pop("model_version"), "model: missing key(s) model_version"),
    (lambda d: d["latency_ms"].update(engine=-1.0), "latency_ms.engine: -1.0 is below 0"),
    (lambda d: d["faces"][1]["probs"].pop(), "faces[1].probs: must be a list of 7 numbers"),
    (lambda d: d["faces"][0]["probs"].__setitem__(0, 0.5), "faces[0].probs: sums to 1.42"),
    (lambda d: d["faces"][0]["probs_raw"].__setitem__(0, "x"), "faces[0].probs_raw: must hold finite numbers"),
    (lambda d: d["faces"][0].update(label="joy"), "faces[0].label: 'joy' is not in class_names"),
    (lambda d: d["faces"][0]["modality_weights"][1].__setitem__(0, 0.9), "faces[0].modality_weights[1]: sums"),
    (lambda d: d["faces"][0]["bbox"].pop(), "faces[0].bbox: must be a list of 4 numbers"),
    (lambda d: d["faces"][0].update(status="no_face"), "faces[0].status: 'no_face' is not one of"),
    (lambda d: d["faces"][0].update(head_pose=None), "faces[0].head_pose: required"),
    (lambda d: d["faces"][0]["head_pose"].pop("roll"), "faces[0].head_pose: missing key(s) roll"),
    (lambda d: d["faces"][0].update(status="bad_fit"), "faces[0].label: must be null"),
    (lambda d: d.update(status="no_face"), "faces: must be empty when status is 'no_face'"),
    (lambda d: d.update(status="end_of_stream"), "faces: must be empty when status is 'end_of_stream'"),
    (lambda d: d.update(status_reason="why"), "status_reason: must be empty when status is 'ok'"),
    (lambda d: d.update(faces=[]), "status: 'ok' needs at least one face"),
])
def test_validate_names_each_problem(mutate, expected):
    errors = _broken(mutate)
    assert any(expected in e for e in errors), errors


def test_bad_status_needs_failed_faces():
    d = example_message().to_dict()
    d["status"], d["status_reason"] = "bad_depth", "no depth"
    assert any("'bad_depth' needs faces, none of them 'ok'" in e for e in validate(d))


def test_validate_rejects_non_maps_and_ensure_valid_raises_one_line():
    assert validate([1, 2]) == ["message: must be a map, got list"]
    d = example_message().to_dict()
    bad = copy.deepcopy(d)
    for key in ("fps", "seq", "status", "faces"):
        bad.pop(key)
    with pytest.raises(SchemaError) as err:
        ensure_valid(bad, "frame 12")
    text = str(err.value)
    assert text.startswith("frame 12: invalid schema-1 message") and "\n" not in text
    ensure_valid(d)  # a valid message passes silently
    with pytest.raises(SchemaError, match="from_dict"):
        FrameMessage.from_dict(bad, source="from_dict")
