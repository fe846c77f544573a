"""Capture sources and thread, through real librealsense software devices and recordings.

No camera exists here: frames are pushed through ``rs.software_device`` (the demo source's
path) and recorded to / replayed from real ``.db3`` files. The live-camera test skips.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from calib.camera import CameraIntrinsics, CameraModel, Extrinsics
from realtime.capture import (
    STATUS_CAMERA_LOST, STATUS_END_OF_STREAM, STATUS_RECONNECTED, CaptureError, CaptureOptions,
    CaptureThread, DemoSource, EndOfStream, FrameSource, RealSenseSource, ReplaySource,
    SoftwareDeviceSource, camera_connected, resolve_source,
)
from realtime.demo_clip import DemoClip, write_demo_clip
from realtime.frames import RGBDFrame
from test_demo_clip import synthetic_frames

# A D435-like pair: depth has a wider field of view than colour and sits 15 mm to its side,
# so aligning is real work (unlike the demo clip, whose depth is already registered).
COLOR = CameraIntrinsics(640, 480, 615.0, 615.0, 319.5, 239.5)
DEPTH = CameraIntrinsics(640, 480, 385.0, 385.0, 321.0, 238.0)
D435_LIKE = CameraModel(color=COLOR, depth=DEPTH,
                        depth_to_color=Extrinsics(translation=(0.015, 0.0, 0.0)),
                        depth_scale=0.0001)
PLANE_RAW = 8000  # 800 mm at 0.1 mm per unit


def plane_images(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Colour frames with their index in the red channel, depth = a plane at 800 mm."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        color = rng.integers(0, 255, (COLOR.height, COLOR.width, 3), dtype=np.uint8)
        color[..., 0] = i
        images.append((color, np.full((DEPTH.height, DEPTH.width), PLANE_RAW, np.uint16)))
    return images


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.npz"
    return write_demo_clip(path, synthetic_frames(5), fps=30.0)


@pytest.fixture(scope="module")
def clip(clip_path) -> DemoClip:
    return DemoClip.load(clip_path)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, clip_path) -> Path:
    """The 5-frame demo clip recorded from its software device with rs.recorder."""
    path = tmp_path_factory.mktemp("rec") / "demo.db3"
    with DemoSource(clip_path, CaptureOptions(realtime=False, record=str(path))) as source:
        for _ in range(5):
            source.read(1000)
    return path


def drain(capture: CaptureThread, limit: int = 100, timeout: float = 5.0) -> list[RGBDFrame]:
    """Every frame until the stream finishes (or ``limit`` frames)."""
    frames = []
    while len(frames) < limit:
        frame = capture.get(timeout)
        if frame is None:
            break
        frames.append(frame)
    return frames


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_software_device_frames_come_out_aligned_with_scale_and_intrinsics():
    options = CaptureOptions(realtime=False)
    with SoftwareDeviceSource(D435_LIKE, plane_images(3), fps=30.0, options=options) as source:
        frames = [source.read(1000) for _ in range(3)]
    for i, frame in enumerate(frames):
        assert frame.intrinsics == COLOR and frame.depth_scale == 0.0001
        assert frame.depth.shape == (480, 640) and frame.depth.dtype == np.uint16
        assert frame.color.shape == (480, 640, 3) and np.all(frame.color[..., 0] == i)
        # The wider depth view covers the whole colour image; a plane facing the camera
        # keeps its distance through the 15 mm sideways shift.
        covered = frame.depth > 0
        assert covered.mean() > 0.99
        assert np.all(frame.depth[covered] == PLANE_RAW)
        assert frame.depth_mm()[240, 320] == pytest.approx(800.0)
        assert frame.timestamp_ms == pytest.approx((i + 1) * 1000.0 / 30.0)


def test_sequence_numbers_increase_and_a_slow_consumer_drops_frames():
    options = CaptureOptions(realtime=True)  # paced at 60 fps: latest frame wins
    source = SoftwareDeviceSource(D435_LIKE, plane_images(30), fps=60.0, options=options)
    with CaptureThread(source, options) as capture:
        taken = []
        while (frame := capture.get(timeout=2.0)) is not None:
            taken.append(frame)
            time.sleep(0.08)  # a consumer at ~12 fps
        stats = capture.stats()
    assert capture.finished.is_set()
    sequences = [f.sequence for f in taken]
    assert sequences == sorted(set(sequences))  # increasing; the gaps are the drops
    assert stats.dropped > 0 and stats.captured == 30
    assert stats.captured == stats.dropped + len(taken)
    assert [f.color[0, 0, 0] for f in taken] == [s for s in sequences]  # newest, never stale


def test_unpaced_source_drops_nothing_for_a_slow_consumer(clip_path, clip):
    options = CaptureOptions(realtime=False)
    with CaptureThread(DemoSource(clip_path, options), options) as capture:
        frames = []
        while (frame := capture.get(timeout=5.0)) is not None:
            frames.append(frame)
            time.sleep(0.03)
        events = capture.events()
        stats = capture.stats()
    assert [f.sequence for f in frames] == list(range(len(clip)))
    assert stats.dropped == 0 and stats.captured == len(clip)
    assert [e.status for e in events] == [STATUS_END_OF_STREAM]


def test_demo_source_yields_the_clips_frames(clip_path, clip):
    options = CaptureOptions(realtime=False)
    with CaptureThread(DemoSource(clip_path, options), options) as capture:
        frames = drain(capture)
        assert capture.get(timeout=1.0) is None and capture.finished.is_set()
    assert len(frames) == len(clip)
    for i, frame in enumerate(frames):
        want = clip.frame(i)
        np.testing.assert_array_equal(frame.depth, want.depth)
        np.testing.assert_array_equal(frame.color, want.color)
        assert frame.intrinsics == clip.camera.color
        assert frame.depth_scale == clip.camera.depth_scale
        assert frame.ground_truth == clip.labels[i]
        assert frame.timestamp_ms == pytest.approx((i + 1) * 1000.0 / clip.fps)


def test_demo_loops_with_increasing_timestamps(clip_path, clip):
    options = CaptureOptions(realtime=False, loop=True)
    with CaptureThread(DemoSource(clip_path, options), options) as capture:
        frames = drain(capture, limit=2 * len(clip) + 1)
        assert not capture.finished.is_set()
    assert len(frames) == 2 * len(clip) + 1
    assert np.all(np.diff([f.timestamp_ms for f in frames]) > 0)
    np.testing.assert_array_equal(frames[len(clip)].depth, frames[0].depth)
    assert frames[len(clip)].ground_truth == clip.labels[0]


def test_demo_paced_at_the_clip_rate_still_delivers(clip_path):
    options = CaptureOptions(realtime=True)
    with CaptureThread(DemoSource(clip_path, options), options) as capture:
        frames = drain(capture)
        stats = capture.stats()
    assert len(frames) + stats.dropped == 5 and len(frames) >= 1


def test_demo_with_post_processing_stays_close_to_the_clip(clip_path, clip):
    options = CaptureOptions(realtime=False, post_processing=True, decimation=2)
    with DemoSource(clip_path, options) as source:
        frame = source.read(1000)
    assert frame.depth.shape == (480, 640) and frame.intrinsics == clip.camera.color
    diff = np.abs(frame.depth.astype(np.int32) - clip.frame(0).depth)  # mm
    inner = (slice(100, 380), slice(120, 520))  # the bump, away from the hole and borders
    assert np.all(frame.depth[inner] > 0)
    # librealsense's spatial filter (default settings) flattens the 30 mm bump by up to ~8 mm.
    assert diff[inner].max() <= 10
    assert np.median(diff[440:, 100:540]) == 0  # the flat plane far from the bump


def test_corrupt_clip_frame_is_skipped_with_one_log_line(tmp_path, caplog):
    path = write_demo_clip(tmp_path / "c.npz", synthetic_frames(3), fps=30.0)
    with np.load(path) as npz:
        arrays = {key: npz[key].copy() for key in npz.files}
    off = arrays["depth_offsets"]
    arrays["depth_data"][off[1]:off[2]] = 0  # frame 1's PNG is garbage
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    options = CaptureOptions(realtime=False)
    with caplog.at_level(logging.WARNING, logger="realtime.capture"):
        with CaptureThread(DemoSource(path, options), options) as capture:
            frames = drain(capture)
    assert [f.ground_truth for f in frames] == ["neutral", "disgust"]
    bad = [r.getMessage() for r in caplog.records if "frame 1" in r.getMessage()]
    assert len(bad) == 1 and str(path) in bad[0] and "\n" not in bad[0]


def test_recording_replays_as_fast_as_possible_without_loss(recording, clip):
    options = CaptureOptions(source=str(recording), realtime=False)
    source = resolve_source(options)
    assert isinstance(source, ReplaySource) and not source.paced
    with CaptureThread(source, options) as capture:
        frames = []
        while (frame := capture.get(timeout=5.0)) is not None:
            frames.append(frame)
            time.sleep(0.02)  # slower than the file could be read
        events = capture.events()
        assert source.camera.color.is_close(clip.camera.color)
        assert source.camera.depth_scale == pytest.approx(clip.camera.depth_scale)
    assert len(frames) == len(clip)
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.depth, clip.frame(i).depth)
        np.testing.assert_array_equal(frame.color, clip.frame(i).color)
    assert [f.sequence for f in frames] == list(range(len(clip)))
    assert [e.status for e in events] == [STATUS_END_OF_STREAM]


def test_recording_through_the_thread_is_finalised_on_close(clip_path, tmp_path):
    path = tmp_path / "session.db3"
    options = CaptureOptions(realtime=True, loop=True, record=str(path))
    with CaptureThread(DemoSource(clip_path, options), options) as capture:
        assert all(capture.get(timeout=5.0) is not None for _ in range(3))
    pushed = capture.stats().captured + capture.stats().rejected
    with CaptureThread(ReplaySource(path, CaptureOptions(realtime=False))) as replay:
        frames = drain(replay)
    assert 3 <= len(frames) <= pushed + 1  # the thread may have pushed one more than it kept


def test_looping_replay_keeps_timestamps_increasing_and_pairs_intact(recording, clip):
    options = CaptureOptions(realtime=False, loop=True)
    with CaptureThread(ReplaySource(recording, options), options) as capture:
        frames = drain(capture, limit=12)
        stats = capture.stats()
    assert len(frames) == 12 and stats.rejected == 0
    assert np.all(np.diff([f.timestamp_ms for f in frames]) > 0)
    recorded = [clip.frame(i) for i in range(5)]
    laps = []
    for frame in frames:
        k = next(k for k, r in enumerate(recorded) if np.array_equal(frame.depth, r.depth))
        # Each depth comes with its own colour: the syncer's pair across the wrap (last
        # colour, first depth) is skipped, not passed on.
        np.testing.assert_array_equal(frame.color, recorded[k].color)
        laps.append(k)
    # Laps repeat in order; under load librealsense may lose the first frame of a lap.
    assert laps[:5] == [0, 1, 2, 3, 4]
    assert all(b == a + 1 or (a == 4 and b in (0, 1)) for a, b in zip(laps, laps[1:]))


def test_lost_source_reports_reconnects_with_backoff_and_closes_cleanly(recording, tmp_path):
    path = tmp_path / "live.db3"
    os.link(recording, path)
    options = CaptureOptions(realtime=True, loop=True, frame_timeout_ms=1000,
                             first_frame_timeout_ms=5000, reconnect_initial_s=0.05,
                             reconnect_max_s=0.2)
    source = ReplaySource(path, options)
    capture = CaptureThread(source, options)
    try:
        assert capture.get(timeout=5.0) is not None
        source.playback.pause()  # frames stop, as when a camera is unplugged
        hidden = tmp_path / "hidden.db3"
        path.rename(hidden)  # reopening fails until the file is back
        assert wait_for(capture.lost.is_set)
        assert wait_for(lambda: capture.stats().losses == 1)
        time.sleep(0.5)  # several failed attempts at 0.05, 0.1, 0.2, 0.2 s
        assert capture.lost.is_set() and not capture.finished.is_set()
        start = time.monotonic()
        while capture.get(timeout=0.05) is not None:  # the consumer is never blocked
            pass
        assert time.monotonic() - start < 1.0
        hidden.rename(path)
        assert wait_for(lambda: capture.stats().reconnects == 1)
        before = capture.stats().captured
        assert capture.get(timeout=5.0) is not None
        assert wait_for(lambda: capture.stats().captured > before)
        statuses = [e.status for e in capture.events()]
        assert statuses == [STATUS_CAMERA_LOST, STATUS_RECONNECTED]
        assert capture.stats().timeouts == 1 and not capture.lost.is_set()
    finally:
        capture.close()
    assert not capture._thread.is_alive() and capture.finished.is_set()


class ScriptedSource(FrameSource):
    """Frames with given timestamps (tests the thread's timestamp rule, not a device)."""

    description = "scripted"

    def __init__(self, timestamps: list[float]):
        self.paced = False
        self._timestamps = list(timestamps)

    def open(self) -> None:
        pass

    def read(self, timeout_ms: int) -> RGBDFrame:
        if not self._timestamps:
            raise EndOfStream("scripted: done")
        return RGBDFrame(color=np.zeros((2, 2, 3), np.uint8), depth=np.zeros((2, 2), np.uint16),
                         depth_scale=0.001, intrinsics=COLOR,
                         timestamp_ms=self._timestamps.pop(0))

    def close(self) -> None:
        pass


def test_zero_and_non_increasing_timestamps_are_rejected():
    with CaptureThread(ScriptedSource([0.0, 10.0, 20.0, 20.0, 15.0, 30.0])) as capture:
        frames = drain(capture)
        stats = capture.stats()
    assert [f.timestamp_ms for f in frames] == [10.0, 20.0, 30.0]
    assert [f.sequence for f in frames] == [0, 1, 2] and stats.rejected == 3


@pytest.mark.skipif(camera_connected(), reason="a RealSense camera is connected")
def test_auto_without_camera_falls_back_to_the_demo_in_one_line(clip_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="realtime.capture"):
        source = resolve_source(CaptureOptions(source="auto", demo_clip=str(clip_path)))
    assert isinstance(source, DemoSource)
    assert [r.getMessage() for r in caplog.records] == [
        f"no RealSense camera found: playing the built-in demo clip {clip_path}"]


def test_bad_sources_fail_in_one_line(tmp_path):
    for options in (CaptureOptions(source="webcam"),
                    CaptureOptions(source=str(tmp_path / "missing.npz")),
                    CaptureOptions(source="demo", demo_clip=str(tmp_path / "nope.npz"))):
        with pytest.raises(CaptureError) as exc:
            resolve_source(options)
        assert "\n" not in str(exc.value)
    missing = tmp_path / "missing.db3"
    with pytest.raises(CaptureError, match="missing.db3.*not found"):
        CaptureThread(ReplaySource(missing, CaptureOptions()))
    garbage = tmp_path / "garbage.bag"
    garbage.write_bytes(b"not a bag")
    with pytest.raises(CaptureError, match="garbage.bag"):
        CaptureThread(ReplaySource(garbage, CaptureOptions()))


@pytest.mark.skipif(camera_connected(), reason="a RealSense camera is connected")
def test_realsense_without_a_camera_fails_in_one_line():
    with pytest.raises(CaptureError, match="RealSense camera: not connected") as exc:
        CaptureThread(resolve_source(CaptureOptions(source="realsense")))
    assert "\n" not in str(exc.value)


def test_option_misuse_is_a_value_error():
    with pytest.raises(ValueError, match=".db3"):
        CaptureOptions(record="out.bag")
    with pytest.raises(ValueError):
        CaptureOptions(decimation=0)
    with pytest.raises(ValueError):
        CaptureOptions(reconnect_initial_s=2.0, reconnect_max_s=1.0)


@pytest.mark.skipif(not camera_connected(), reason="no RealSense camera connected")
def test_live_camera_streams_aligned_frames(tmp_path):
    record = tmp_path / "live.db3"
    options = CaptureOptions(source="realsense", record=str(record))
    with CaptureThread(RealSenseSource(options), options) as capture:
        frames = [capture.get(timeout=5.0) for _ in range(10)]
    assert all(f is not None for f in frames)
    assert frames[0].depth.shape == frames[0].color.shape[:2] == (480, 640)
    assert [f.sequence for f in frames] == sorted({f.sequence for f in frames})
    with CaptureThread(ReplaySource(record, CaptureOptions(realtime=False))) as replay:
        assert len(drain(replay)) > 0
