"""Temporal smoothing: EMA by hand, hysteresis, off switch, fresh tracks, forgetting."""

import numpy as np
import pytest

from realtime.smoothing import SmoothingOptions, TemporalSmoother

A = np.array([0.8, 0.1, 0.1], dtype=np.float32)  # class 0 leads
B = np.array([0.1, 0.8, 0.1], dtype=np.float32)  # class 1 leads
DT = 1000.0 / 30.0


def _opts(**kw):
    return SmoothingOptions(**{"reference_dt_ms": None, "switch_frames": 1, "switch_margin": 0.0, **kw})


def test_ema_matches_hand_computation():
    smoother = TemporalSmoother(_opts(alpha=0.3))
    first = smoother.process({5: A}, 0.0).tracks[5]
    np.testing.assert_allclose(first.probs, A)  # a new track starts from its first frame
    second = smoother.process({5: B}, DT).tracks[5]
    np.testing.assert_allclose(second.probs, [0.59, 0.31, 0.1], atol=1e-6)  # 0.7 * A + 0.3 * B
    third = smoother.process({5: B}, 2 * DT).tracks[5]
    np.testing.assert_allclose(third.probs, [0.443, 0.457, 0.1], atol=1e-6)  # 0.7 * second + 0.3 * B
    np.testing.assert_allclose(third.probs_raw, B)
    assert third.label_raw == 1 and third.label == 1


def test_time_aware_alpha_follows_the_gap():
    smoother = TemporalSmoother(_opts(alpha=0.3, reference_dt_ms=DT))
    smoother.process({1: A}, 0.0)
    two_frames = smoother.process({1: B}, 2 * DT).tracks[1]
    a = 1 - 0.7 ** 2  # a gap of two frame intervals weighs the new frame as two updates would
    np.testing.assert_allclose(two_frames.probs, (1 - a) * A + a * B, atol=1e-6)
    one_frame = smoother.process({1: A}, 3 * DT).tracks[1]
    np.testing.assert_allclose(one_frame.probs, 0.7 * two_frames.probs + 0.3 * A, atol=1e-6)


def test_hysteresis_keeps_label_through_a_blip_and_switches_after_sustained_change():
    smoother = TemporalSmoother(_opts(alpha=1.0, switch_frames=3, switch_margin=0.2))  # alpha 1: no EMA
    labels = [smoother.process({0: p}, i * DT).tracks[0].label for i, p in enumerate([A, A, B, A, B, B, B, B])]
    assert labels == [0, 0, 0, 0, 0, 0, 1, 1]  # the blip at 2 is ignored; B wins on its 3rd frame in a row
    # A lead smaller than the margin never switches, however long it lasts.
    slight = np.array([0.55, 0.45, 0.0], dtype=np.float32)
    steady = [smoother.process({0: slight}, (8 + i) * DT).tracks[0] for i in range(5)]
    assert [(s.label, s.label_raw) for s in steady] == [(1, 0)] * 5
    back = [smoother.process({0: A}, (13 + i) * DT).tracks[0].label for i in range(3)]
    assert back == [1, 1, 0]


def test_off_means_smoothed_equals_raw():
    smoother = TemporalSmoother(SmoothingOptions(enabled=False))
    for i, p in enumerate([A, B, A]):
        pred = smoother.process({2: p}, i * DT).tracks[2]
        np.testing.assert_array_equal(pred.probs, p)
        assert pred.label == pred.label_raw == int(np.argmax(p))
    assert smoother.track_ids == []


def test_new_track_starts_fresh_beside_an_old_one():
    smoother = TemporalSmoother(_opts(alpha=0.3))
    smoother.process({0: A}, 0.0)
    result = smoother.process({0: B, 1: B}, DT)
    np.testing.assert_allclose(result.tracks[1].probs, B)
    assert result.tracks[1].label == 1
    np.testing.assert_allclose(result.tracks[0].probs, 0.7 * A + 0.3 * B, atol=1e-6)


def test_unseen_tracks_are_forgotten_by_frames_or_time():
    smoother = TemporalSmoother(_opts(forget_after_frames=2, forget_after_ms=1000.0))
    smoother.process({0: A, 1: A}, 0.0)
    assert smoother.process({1: A}, 10.0).forgotten == []
    assert smoother.process({1: A}, 20.0).forgotten == []
    assert smoother.process({1: A}, 30.0).forgotten == [0]  # unseen for 3 > 2 calls
    assert smoother.process({}, 1500.0).forgotten == [1]  # unseen for 1470 ms > 1000 ms
    assert smoother.track_ids == []
    again = smoother.process({0: B}, 1600.0).tracks[0]  # an id that comes back starts fresh
    np.testing.assert_allclose(again.probs, B)


def test_bad_input_and_options():
    smoother = TemporalSmoother()
    smoother.process({3: A}, 0.0)
    with pytest.raises(ValueError, match="track 3: 4 probabilities, this track had 3"):
        smoother.process({3: np.full(4, 0.25)}, DT)
    with pytest.raises(ValueError, match="track 4: probabilities must be a"):
        smoother.process({4: np.ones((2, 3))}, DT)
    with pytest.raises(ValueError, match="alpha"):
        SmoothingOptions(alpha=0.0)
    with pytest.raises(ValueError, match="switch_frames"):
        SmoothingOptions(switch_frames=0)
