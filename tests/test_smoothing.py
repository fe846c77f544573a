"""Temporal smoothing: EMA by hand, hysteresis, off switch, fresh tracks, forgetting."""

import numpy as np

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


def test_forgotten_tracks_lose_their_state_and_others_keep_theirs():
    smoother = TemporalSmoother(_opts(alpha=0.3))
    smoother.process({0: A, 1: A}, 0.0)
    smoother.forget([0, 7])  # 7 was never seen: nothing to drop
    assert smoother.track_ids == [1]
    result = smoother.process({0: B, 1: B}, DT)
    np.testing.assert_allclose(result.tracks[0].probs, B)  # an id that comes back starts fresh
    np.testing.assert_allclose(result.tracks[1].probs, 0.7 * A + 0.3 * B, atol=1e-6)


def test_a_track_unclassified_for_too_long_restarts_but_is_not_forgotten():
    smoother = TemporalSmoother(_opts(alpha=0.3, restart_after_ms=1000.0))
    smoother.process({0: A}, 0.0)
    for i in range(1, 40):  # the face is tracked but unclassified (e.g. bad_fit) for 1.3 s
        assert smoother.process({}, i * DT).tracks == {}
    assert smoother.track_ids == [0]  # only the tracker ends tracks
    back = smoother.process({0: B}, 1400.0).tracks[0]
    np.testing.assert_allclose(back.probs, B)
    assert back.label == 1  # the old label is not held over the gap
    within = TemporalSmoother(_opts(alpha=0.3, restart_after_ms=1000.0))
    within.process({0: A}, 0.0)
    np.testing.assert_allclose(within.process({0: B}, 900.0).tracks[0].probs, 0.7 * A + 0.3 * B, atol=1e-6)
