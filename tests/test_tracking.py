"""Face track ids: stable under small motion, new for a new face, dropped after absence."""

import numpy as np
import pytest

from realtime.frames import FaceLandmarks
from realtime.tracking import FaceTracker, TrackerOptions, iou_matrix


def _face(x0, y0, size=120.0):
    return FaceLandmarks(points=np.zeros((468, 2), np.float32), bbox=(x0, y0, x0 + size, y0 + size))


def test_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], dtype=np.float64)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float64)
    np.testing.assert_allclose(iou_matrix(a, b), [[50 / 150, 0, 1], [0, 0, 0]])


def test_two_moving_faces_keep_their_ids():
    tracker = FaceTracker()
    faces = [_face(100, 100), _face(400, 120)]
    first = tracker.process(faces)
    assert first.track_ids == [0, 1] and first.new_ids == [0, 1]
    assert [f.track_id for f in faces] == [0, 1]
    for step in range(1, 20):
        # Detection order changes with size: present the faces in swapped order every other frame.
        moved = [_face(100 + 4 * step, 100 - 2 * step), _face(400 - 5 * step, 120 + 3 * step)]
        order = [1, 0] if step % 2 else [0, 1]
        frame = [moved[i] for i in order]
        result = tracker.process(frame)
        assert result.track_ids == order and result.new_ids == [] and result.dropped_ids == []
        assert [f.track_id for f in frame] == order


def test_face_leaving_and_another_entering_gets_a_new_id():
    tracker = FaceTracker(TrackerOptions(max_unseen_frames=3))
    tracker.process([_face(100, 100)])
    dropped = []
    for _ in range(4):  # the face is gone
        dropped += tracker.process([]).dropped_ids
    assert dropped == [0] and tracker.track_ids == []
    result = tracker.process([_face(100, 100)])  # same place, new person: the old id is never reused
    assert result.track_ids == [1] and result.new_ids == [1]


def test_brief_absence_keeps_the_id_and_a_far_face_is_new():
    tracker = FaceTracker(TrackerOptions(max_unseen_frames=3))
    tracker.process([_face(100, 100)])
    tracker.process([])  # one missed detection
    result = tracker.process([_face(104, 102), _face(450, 300)])
    assert result.track_ids == [0, 1] and result.new_ids == [1]


def test_greedy_takes_the_best_overlap_first():
    tracker = FaceTracker()
    tracker.process([_face(100, 100), _face(200, 100)])  # overlapping tracks 0 and 1
    # The face at 160 prefers track 1 (IoU 0.50 vs 0.33), but the face at 190 fits it better
    # (0.85): best pair first gives track 1 to the face at 190 and track 0 to the one at 160.
    result = tracker.process([_face(160, 100), _face(190, 100)])
    assert result.track_ids == [0, 1] and result.new_ids == []
    # A lone face nearer track 1 takes it; track 0 ages but stays.
    assert tracker.process([_face(230, 100)]).track_ids == [1]
    assert tracker.track_ids == [0, 1]


def test_bad_bbox_names_the_face():
    tracker = FaceTracker()
    bad = FaceLandmarks(points=np.zeros((468, 2), np.float32), bbox=(0.0, np.nan, 10.0, 10.0))
    with pytest.raises(ValueError, match="face 1: bbox must be 4 finite numbers"):
        tracker.process([_face(0, 0), bad])
    with pytest.raises(ValueError, match="min_iou"):
        TrackerOptions(min_iou=0.0)
