"""Capture: RGB-D sources (RealSense camera, .bag/.db3 replay, demo clip) and the capture thread.

Every source hands out :class:`~realtime.frames.RGBDFrame` objects built by one converter
from librealsense framesets: optional depth post-processing, ``rs.align`` to colour, RGB
colour, the depth scale and colour intrinsics of the device or recording. The demo clip is
pushed through an ``rs.software_device`` and ``rs.syncer``, so it takes the camera's path.

:class:`CaptureThread` runs a source on its own thread with a one-slot mailbox (latest frame
wins, overwritten frames are counted), assigns the sequence number, rejects frames whose
timestamp does not increase, and turns a lost camera into ``camera_lost`` / ``reconnected``
events while it reconnects with exponential backoff.

Usage:
    options = CaptureOptions(source="auto")          # camera if present, else the demo clip
    with CaptureThread(resolve_source(options), options) as capture:
        while not capture.finished.is_set():
            frame = capture.get(timeout=0.5)          # None on timeout or at the end
            for event in capture.events():            # camera_lost / reconnected / end_of_stream
                ...
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyrealsense2 as rs

from calib.camera import CameraIntrinsics, CameraModel
from realtime.demo_clip import DEFAULT_DEMO_CLIP, DemoClip, DemoClipError
from realtime.frames import RGBDFrame

log = logging.getLogger(__name__)

REPLAY_SUFFIXES = (".bag", ".db3")
STATUS_CAMERA_LOST = "camera_lost"
STATUS_RECONNECTED = "reconnected"
STATUS_END_OF_STREAM = "end_of_stream"

# Colour formats a replay may hold, and how to turn each into RGB (None: already RGB).
_TO_RGB = {
    rs.format.rgb8: None,
    rs.format.bgr8: cv2.COLOR_BGR2RGB,
    rs.format.rgba8: cv2.COLOR_RGBA2RGB,
    rs.format.bgra8: cv2.COLOR_BGRA2RGB,
    rs.format.yuyv: cv2.COLOR_YUV2RGB_YUYV,
}
_POLL_MS = 100  # slice of a blocking wait, so end of playback and removal are seen promptly


class CaptureError(RuntimeError):
    """A source that cannot be opened or used; the message is one line naming it."""


class SourceLostError(CaptureError):
    """A streaming source failed mid-stream (device gone, librealsense error)."""


class FrameTimeoutError(SourceLostError):
    """No frame arrived within the frame timeout."""


class EndOfStream(Exception):
    """A non-looping replay or clip has no more frames."""


@dataclass
class CaptureOptions:
    """How to capture.

    Attributes:
        source: ``"auto"`` (camera if one is connected, else the demo clip), ``"realsense"``,
            ``"demo"``, or a path to a ``.bag``/``.db3`` recording or a demo-clip ``.npz``.
        width: Stream width of the camera (both streams).
        height: Stream height of the camera.
        fps: Camera frame rate.
        post_processing: Run the librealsense depth filter chain (decimation, disparity
            domain spatial + temporal smoothing, hole filling) before aligning to colour.
        decimation: Decimation factor of that chain (1 = none). Decimation shrinks depth
            before the other filters; the align step resamples it back to colour resolution.
        realtime: Replays and the demo play at their recorded rate (latest frame wins);
            False = as fast as the consumer takes frames, none dropped.
        loop: Replays and the demo start over at the end instead of finishing.
        record: ``.db3`` file to record the camera (or demo device) to; after a reconnect
            the next segment goes to ``<stem>-1.db3``, ``<stem>-2.db3``, ...
        frame_timeout_ms: A wait longer than this for a frame counts as a lost source.
        first_frame_timeout_ms: The same for the first frame after (re)opening.
        reconnect_initial_s: First reconnect delay; doubled after each failed attempt...
        reconnect_max_s: ...up to this.
        serial: Serial number of the camera to open (default: the first one found).
        demo_clip: Demo clip for ``"demo"``/``"auto"`` (default: the built-in one).
    """

    source: str = "auto"
    width: int = 640
    height: int = 480
    fps: int = 30
    post_processing: bool = False
    decimation: int = 2
    realtime: bool = True
    loop: bool = False
    record: str | None = None
    frame_timeout_ms: int = 1000
    first_frame_timeout_ms: int = 5000
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 8.0
    serial: str | None = None
    demo_clip: str | None = None

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.fps <= 0:
            raise ValueError(f"capture size and fps must be positive, got "
                             f"{self.width}x{self.height} @ {self.fps}")
        if not 1 <= self.decimation <= 8:
            raise ValueError(f"decimation must be 1..8, got {self.decimation}")
        if self.record is not None and Path(self.record).suffix != ".db3":
            raise ValueError(f"--record {self.record}: librealsense 2.59 records .db3 files only")
        if self.frame_timeout_ms <= 0 or self.first_frame_timeout_ms <= 0:
            raise ValueError("frame timeouts must be positive")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ValueError(f"need 0 < reconnect_initial_s <= reconnect_max_s, got "
                             f"{self.reconnect_initial_s}, {self.reconnect_max_s}")


@dataclass
class CaptureStats:
    """Counters of a :class:`CaptureThread`.

    Attributes:
        captured: Frames put into the mailbox.
        dropped: Frames overwritten in the mailbox before the consumer took them.
        rejected: Frames dropped for a zero or non-increasing timestamp.
        timeouts: Frame waits that timed out.
        losses: Times the source was lost (timeouts included).
        reconnects: Successful reconnections.
    """

    captured: int = 0
    dropped: int = 0
    rejected: int = 0
    timeouts: int = 0
    losses: int = 0
    reconnects: int = 0


@dataclass(frozen=True)
class CaptureEvent:
    """A status change for the pipeline to publish (``status`` is one of the STATUS_* names)."""

    status: str
    reason: str
    host_time_ns: int


class FrameSource:
    """One stream of aligned RGB-D frames: ``open()``, ``read()`` repeatedly, ``close()``.

    A closed source can be opened again (that is how a lost camera is reconnected).

    Attributes:
        description: Names the source in log lines and errors.
        paced: Frames come at the source's own rate (camera, real-time replay), so a slow
            consumer misses some; False: the source waits for the consumer, dropping none.
        camera: The camera model of the open source, else None.
    """

    description = "source"
    paced = True
    camera: CameraModel | None = None

    def open(self) -> None:
        """Start streaming.

        Raises:
            CaptureError: The device or file cannot be opened.
        """
        raise NotImplementedError

    def read(self, timeout_ms: int) -> RGBDFrame:
        """The next frame; ``host_time_ns`` is its arrival from librealsense.

        Raises:
            FrameTimeoutError: No frame within ``timeout_ms``.
            SourceLostError: The device or playback failed.
            EndOfStream: A non-looping replay or clip ended.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Stop streaming and release the device; never raises, safe to call twice."""
        raise NotImplementedError

    def __enter__(self) -> "FrameSource":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _librealsense_errors_lose(description: str) -> Iterator[None]:
    """librealsense's RuntimeErrors (device gone, filter or align failure) lose the source;
    our own CaptureErrors (also RuntimeErrors) pass through unchanged."""
    try:
        yield
    except CaptureError:
        raise
    except RuntimeError as exc:
        raise SourceLostError(f"{description}: {exc}") from exc


def _record_segment(path: str, index: int) -> str:
    """The recording file of the ``index``-th opening: the path itself, then numbered ones."""
    if index == 0:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix}"))


def _post_processing_chain(decimation: int) -> list:
    """librealsense's recommended depth filter order (rs-post-processing example)."""
    chain = [rs.decimation_filter(decimation)] if decimation > 1 else []
    return chain + [rs.disparity_transform(True), rs.spatial_filter(), rs.temporal_filter(),
                    rs.disparity_transform(False), rs.hole_filling_filter(1)]


class _FrameConverter:
    """librealsense frameset -> RGBDFrame: depth filters, align to colour, copies out.

    One converter per opened stream: ``rs.align`` caches tables per input profile and mixes
    them up when fed two geometries, and the temporal filter keeps per-stream history.
    Depth already registered to colour (same intrinsics, identity extrinsics, e.g. the demo
    clip) is not aligned: that would be the identity, and librealsense's align leaves ~4 %
    of the pixels empty from rounding ties when both images have the same scale.
    """

    def __init__(self, camera: CameraModel, options: CaptureOptions, name: str):
        self._camera = camera
        self._name = name
        decimation = options.decimation if options.post_processing else 1
        self._filters = _post_processing_chain(decimation) if options.post_processing else []
        needs_align = decimation > 1 or not camera.depth_is_registered()
        self._align = rs.align(rs.stream.color) if needs_align else None

    def convert(self, frameset: rs.composite_frame, arrival_ns: int) -> RGBDFrame | None:
        """The aligned frame, or None for a frameset lacking depth or colour or mispairing them."""
        depth_frame, color_frame = frameset.get_depth_frame(), frameset.get_color_frame()
        if not depth_frame or not color_frame or not self._paired(depth_frame, color_frame):
            return None
        for block in self._filters:
            frameset = block.process(frameset).as_frameset()
        if self._align is not None:
            frameset = self._align.process(frameset)
        depth_frame, color_frame = frameset.get_depth_frame(), frameset.get_color_frame()
        intrinsics = self._camera.color
        depth = np.array(depth_frame.get_data(), dtype=np.uint16, copy=True)  # (H, W)
        color = np.asanyarray(color_frame.get_data())
        code = _TO_RGB[color_frame.get_profile().format()]
        if code == cv2.COLOR_YUV2RGB_YUYV:
            color = color.reshape(intrinsics.height, intrinsics.width, 2)
        color = color.copy() if code is None else cv2.cvtColor(color, code)  # (H, W, 3) uint8
        if depth.shape != (intrinsics.height, intrinsics.width) or color.shape[:2] != depth.shape:
            raise CaptureError(f"{self._name}: frame {color_frame.get_frame_number()}: depth "
                               f"{depth.shape} and "
                               f"colour {color.shape} do not match the colour stream "
                               f"{intrinsics.width}x{intrinsics.height}")
        return RGBDFrame(color=color, depth=depth, depth_scale=self._camera.depth_scale,
                         intrinsics=intrinsics, timestamp_ms=float(color_frame.get_timestamp()),
                         host_time_ns=arrival_ns)

    def _paired(self, depth_frame: rs.depth_frame, color_frame: rs.video_frame) -> bool:
        """Whether depth and colour were taken together (within the slower stream's period).

        The syncer can pair frames a loop apart when a replay wraps (the last colour with
        the first depth); such a pair would misplace the face in depth, so it is skipped.
        Timestamps in different domains cannot be compared and are trusted.
        """
        if depth_frame.get_frame_timestamp_domain() != color_frame.get_frame_timestamp_domain():
            return True
        slower_fps = min(depth_frame.get_profile().fps(), color_frame.get_profile().fps())
        period_ms = 1000.0 / max(slower_fps, 1)
        apart_ms = abs(depth_frame.get_timestamp() - color_frame.get_timestamp())
        if apart_ms <= period_ms:
            return True
        log.debug("%s: skipped depth frame %d paired with colour frame %d, %.1f ms apart",
                  self._name, depth_frame.get_frame_number(), color_frame.get_frame_number(),
                  apart_ms)
        return False


class _PipelineSource(FrameSource):
    """A source read through ``rs.pipeline`` (camera or recording); subclasses configure it."""

    def __init__(self, options: CaptureOptions):
        self._options = options
        self._pipeline: rs.pipeline | None = None
        self._converter: _FrameConverter | None = None
        self._first_frame = True

    def _configure(self, pipeline: rs.pipeline) -> rs.config:
        """The config to start ``pipeline`` with (may raise RuntimeError from librealsense)."""
        raise NotImplementedError

    def _started(self, profile: rs.pipeline_profile) -> None:
        """Hook after a successful start (playback settings, device pinning)."""

    def _check_stream(self) -> None:
        """Hook on each empty wait: raise EndOfStream / SourceLostError if the stream ended."""

    def _timestamp(self, timestamp_ms: float) -> float:
        return timestamp_ms

    def open(self) -> None:
        pipeline = rs.pipeline()
        try:
            profile = pipeline.start(self._configure(pipeline))
        except RuntimeError as exc:
            raise CaptureError(f"{self.description}: cannot start ({exc})") from exc
        try:
            camera = CameraModel.from_realsense_profile(profile)
            color_format = profile.get_stream(rs.stream.color).format()
            if color_format not in _TO_RGB:
                raise ValueError(f"unsupported colour format {color_format}")
            self._started(profile)
        except (RuntimeError, ValueError) as exc:
            pipeline.stop()
            raise CaptureError(f"{self.description}: {exc}") from exc
        self.camera = camera
        self._converter = _FrameConverter(camera, self._options, self.description)
        self._pipeline = pipeline
        self._first_frame = True

    def read(self, timeout_ms: int) -> RGBDFrame:
        if self._pipeline is None:
            raise SourceLostError(f"{self.description}: not open")
        if self._first_frame:
            timeout_ms = max(timeout_ms, self._options.first_frame_timeout_ms)
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000.0)
            if remaining_ms <= 0:
                raise FrameTimeoutError(f"{self.description}: no frame within {timeout_ms} ms")
            with _librealsense_errors_lose(self.description):
                ok, frameset = self._pipeline.try_wait_for_frames(min(remaining_ms, _POLL_MS))
                frame = self._converter.convert(frameset, time.monotonic_ns()) if ok else None
            if not ok:
                self._check_stream()
                continue
            if frame is not None:  # else an unpaired frameset, as at the start of a stream
                self._first_frame = False
                frame.timestamp_ms = self._timestamp(frame.timestamp_ms)
                return frame

    def close(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        self._converter = None
        if pipeline is not None:
            try:
                pipeline.stop()  # also finalises a recording
            except RuntimeError as exc:
                log.debug("%s: stop failed: %s", self.description, exc)


class RealSenseSource(_PipelineSource):
    """A live RealSense camera: depth (z16) + colour (rgb8) through ``rs.pipeline``.

    After the first start the camera's serial number is pinned, so a reconnect reopens the
    same camera; a devices-changed callback reports its removal without waiting for a
    frame timeout.
    """

    def __init__(self, options: CaptureOptions):
        super().__init__(options)
        self._serial = options.serial
        self._openings = 0
        self._removed = threading.Event()
        self._context: rs.context | None = None
        self._device: rs.device | None = None

    @property
    def description(self) -> str:
        return f"RealSense camera {self._serial}" if self._serial else "RealSense camera"

    def _configure(self, pipeline: rs.pipeline) -> rs.config:
        # Checked first: without a device, pipeline.start() waits 15 s before it fails,
        # which would stall every reconnect attempt (and close()).
        serials = [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()
                   if d.supports(rs.camera_info.serial_number)]
        if not serials or (self._serial and self._serial not in serials):
            raise CaptureError(f"{self.description}: not connected")
        o = self._options
        config = rs.config()
        if self._serial:
            config.enable_device(self._serial)
        config.enable_stream(rs.stream.depth, o.width, o.height, rs.format.z16, o.fps)
        config.enable_stream(rs.stream.color, o.width, o.height, rs.format.rgb8, o.fps)
        if o.record:
            config.enable_record_to_file(_record_segment(o.record, self._openings))
        return config

    def _started(self, profile: rs.pipeline_profile) -> None:
        self._openings += 1
        self._device = profile.get_device()
        self._serial = self._device.get_info(rs.camera_info.serial_number)
        self._removed.clear()
        self._context = rs.context()
        self._context.set_devices_changed_callback(self._on_devices_changed)

    def _on_devices_changed(self, info: rs.event_information) -> None:
        if self._device is not None and info.was_removed(self._device):
            self._removed.set()

    def _check_stream(self) -> None:
        if self._removed.is_set():
            raise SourceLostError(f"{self.description}: disconnected")

    def close(self) -> None:
        self._context = None  # drops the callback
        self._device = None  # a held device would keep a recording open
        super().close()


class ReplaySource(_PipelineSource):
    """A ``.bag`` (ROS1) or ``.db3`` (ROS2) recording played through ``rs.pipeline``.

    With ``options.realtime`` False the playback waits until each frame is read, so none
    is dropped. Looping replays get timestamps that keep increasing across the wrap; at a
    wrap librealsense's syncer may lose the first frame of the new lap (seen under load).
    Recordings of any colour format librealsense writes (rgb8, bgr8, rgba8, bgra8, yuyv)
    come out as RGB.
    """

    def __init__(self, path: str | Path, options: CaptureOptions):
        super().__init__(options)
        self.path = Path(path)
        self.paced = options.realtime
        self._playback: rs.playback | None = None
        self._offset_ms = 0.0
        self._last_ms: float | None = None
        self._period_ms = 1000.0 / options.fps
        if self.path.suffix not in REPLAY_SUFFIXES:
            raise CaptureError(f"{self.path}: not a RealSense recording (.bag or .db3)")
        if options.record:
            raise CaptureError(f"{self.path}: --record works with a camera or the demo clip, "
                               f"not with a replay")

    @property
    def description(self) -> str:
        return f"recording {self.path}"

    def _configure(self, pipeline: rs.pipeline) -> rs.config:
        if not self.path.is_file():
            raise CaptureError(f"{self.path}: recording not found")
        config = rs.config()
        config.enable_device_from_file(str(self.path), repeat_playback=self._options.loop)
        config.enable_stream(rs.stream.depth)
        config.enable_stream(rs.stream.color)
        # Set the pace on the resolved device, which start() reuses: set after start(), a
        # real-time playback would already have dropped the first frames.
        resolved = config.resolve(rs.pipeline_wrapper(pipeline))
        resolved.get_device().as_playback().set_real_time(self._options.realtime)
        return config

    def _started(self, profile: rs.pipeline_profile) -> None:
        self._playback = profile.get_device().as_playback()
        self._period_ms = 1000.0 / profile.get_stream(rs.stream.color).fps()

    @property
    def playback(self) -> rs.playback | None:
        """The playback device while open (e.g. to pause or seek)."""
        return self._playback

    def _check_stream(self) -> None:
        if not self._options.loop and self._playback.current_status() == rs.playback_status.stopped:
            raise EndOfStream(f"{self.description}: end of recording")

    def _timestamp(self, timestamp_ms: float) -> float:
        wrapped = self._last_ms is not None and timestamp_ms + self._offset_ms <= self._last_ms
        if self._options.loop and wrapped:
            self._offset_ms = self._last_ms + self._period_ms - timestamp_ms  # wrapped around
        self._last_ms = timestamp_ms + self._offset_ms
        return self._last_ms

    def close(self) -> None:
        self._playback = None
        super().close()


class SoftwareDeviceSource(FrameSource):
    """Images played through an ``rs.software_device``: the camera's frame path, no camera.

    Each read pushes one depth + colour pair into the device's two sensors, takes the
    frameset out of an ``rs.syncer`` (pairing by hand the syncer's first, unpaired output)
    and converts it like a camera frame. Frame ``k`` pushed since opening (from 1) gets
    ``timestamp_ms = k * 1000 / fps``. With ``options.record`` the device is recorded with
    ``rs.recorder``; the file is finalised on close.

    Args:
        camera: Geometry of the images: colour in ``camera.color``, depth (raw units of
            ``camera.depth_scale``) in ``camera.depth``, related by ``camera.depth_to_color``.
        images: (colour (H, W, 3) uint8 RGB, depth (h, w) uint16) pairs; an item that raises
            ValueError is skipped with one log line.
        fps: Rate of the stream (also its pacing when ``options.realtime``).
        options: Capture options (realtime, loop, record, post-processing).
        labels: Per-image ground truth copied to ``RGBDFrame.ground_truth``.
        name: Device name, shown in logs and stored in recordings.
    """

    def __init__(self, camera: CameraModel, images: Sequence[tuple[np.ndarray, np.ndarray]],
                 fps: float, options: CaptureOptions,
                 labels: Sequence[str | None] | None = None, name: str = "software device"):
        if not fps > 0:
            raise ValueError(f"{name}: fps must be positive, got {fps}")
        self.camera = camera
        self.paced = options.realtime
        self.description = name
        self._images = images
        self._labels = labels
        self._fps = float(fps)
        self._options = options
        self._openings = 0
        self._device: rs.software_device | None = None

    def open(self) -> None:
        camera, fps = self.camera, int(round(self._fps))
        device = rs.software_device()
        device.register_info(rs.camera_info.name, self.description)
        device.register_info(rs.camera_info.serial_number, "software")
        device.create_matcher(rs.matchers.dlr_c)
        depth_sensor = device.add_sensor("Stereo Module")
        color_sensor = device.add_sensor("RGB Camera")
        depth_sensor.add_read_only_option(rs.option.depth_units, camera.depth_scale)
        depth_profile = depth_sensor.add_video_stream(
            _video_stream(rs.stream.depth, 0, rs.format.z16, 2, camera.depth, fps)
        ).as_video_stream_profile()
        color_profile = color_sensor.add_video_stream(
            _video_stream(rs.stream.color, 1, rs.format.rgb8, 3, camera.color, fps)
        ).as_video_stream_profile()
        depth_profile.register_extrinsics_to(color_profile, camera.depth_to_color.to_realsense())
        recorder = None
        if self._options.record:
            path = _record_segment(self._options.record, self._openings)
            try:
                recorder = rs.recorder(path, device)
            except RuntimeError as exc:
                raise CaptureError(f"{self.description}: cannot record to {path} ({exc})") from exc
        self._openings += 1
        self._syncer = rs.syncer(8)  # room for the unpaired framesets of the first push
        self._composed = rs.frame_queue(2, keep_frames=True)
        self._composer = rs.processing_block(self._compose_callback)
        self._composer.start(self._composed)
        self._pending: list[rs.frame] = []
        self._sensors = ((depth_sensor, depth_profile), (color_sensor, color_profile))
        try:
            for sensor, profile in self._sensors:
                sensor.open(profile)
                sensor.start(self._syncer)
        except RuntimeError as exc:
            raise CaptureError(f"{self.description}: cannot start its sensors ({exc})") from exc
        self._device, self._recorder = device, recorder
        self._converter = _FrameConverter(camera, self._options, self.description)
        self._index = 0  # next image
        self._pushed = 0  # frames pushed since opening
        self._next_due: float | None = None

    def read(self, timeout_ms: int) -> RGBDFrame:
        if self._device is None:
            raise SourceLostError(f"{self.description}: not open")
        skipped = 0
        while True:
            if self._index >= len(self._images):
                if not self._options.loop:
                    raise EndOfStream(f"{self.description}: end of stream")
                self._index = 0
            i = self._index
            self._index += 1
            try:
                color, depth = self._checked_image(i)
            except ValueError as exc:
                log.warning("%s", exc)
                skipped += 1
                if skipped >= len(self._images):
                    raise EndOfStream(f"{self.description}: no image can be played") from exc
                continue
            self._pace()
            self._pushed += 1
            with _librealsense_errors_lose(self.description):
                frameset = self._push_and_collect(color, depth, timeout_ms)
                frame = self._converter.convert(frameset, time.monotonic_ns())
            frame.ground_truth = self._labels[i] if self._labels is not None else None
            return frame

    def _checked_image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        color, depth = self._images[i]
        c, d = self.camera.color, self.camera.depth
        if (color.shape != (c.height, c.width, 3) or color.dtype != np.uint8
                or depth.shape != (d.height, d.width) or depth.dtype != np.uint16):
            raise ValueError(f"{self.description}: image {i}: expected colour "
                             f"{c.width}x{c.height}x3 uint8 and depth {d.width}x{d.height} "
                             f"uint16, got {color.dtype} {color.shape}, "
                             f"{depth.dtype} {depth.shape}")
        return np.ascontiguousarray(color), np.ascontiguousarray(depth)

    def _pace(self) -> None:
        """Sleep until the next frame is due (real-time mode); restart the clock if far behind."""
        if not self.paced:
            return
        now = time.monotonic()
        if self._next_due is None or now - self._next_due > 0.5:
            self._next_due = now
        elif self._next_due > now:
            time.sleep(self._next_due - now)
        self._next_due += 1.0 / self._fps

    def _push_and_collect(self, color: np.ndarray, depth: np.ndarray,
                          timeout_ms: int) -> rs.composite_frame:
        number, timestamp = self._pushed, self._pushed * 1000.0 / self._fps
        for (sensor, profile), pixels, bpp in zip(self._sensors, (depth, color), (2, 3)):
            frame = rs.software_video_frame()
            frame.pixels = pixels
            frame.bpp = bpp
            frame.stride = pixels.shape[1] * bpp
            frame.timestamp = timestamp
            frame.domain = rs.timestamp_domain.hardware_clock
            frame.frame_number = number
            frame.profile = profile
            if bpp == 2:
                frame.depth_units = self.camera.depth_scale
            sensor.on_video_frame(frame)
        deadline = time.monotonic() + timeout_ms / 1000.0
        got: dict[rs.stream, rs.frame] = {}
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000.0)
            if remaining_ms <= 0:
                raise FrameTimeoutError(f"{self.description}: frame {number} did not come out of "
                                        f"the syncer within {timeout_ms} ms")
            ok, frameset = self._syncer.try_wait_for_frames(remaining_ms)
            if not ok:
                continue
            for f in frameset:
                if f.get_frame_number() == number:  # older, unpaired leftovers are dropped
                    got[f.get_profile().stream_type()] = f
            if len(got) == 2:
                return frameset if frameset.size() == 2 else self._compose(got)

    def _compose(self, frames: dict[rs.stream, rs.frame]) -> rs.composite_frame:
        """A frameset of a depth and a colour frame that the syncer handed out separately."""
        self._pending = [frames[rs.stream.depth], frames[rs.stream.color]]
        self._composer.invoke(self._pending[0])
        ok, frameset = self._composed.try_wait_for_frame(1000)
        self._pending = []
        if not ok:
            raise SourceLostError(f"{self.description}: could not pair depth and colour")
        return frameset.as_frameset()

    def _compose_callback(self, _frame: rs.frame, source: rs.frame_source) -> None:
        source.frame_ready(source.allocate_composite_frame(self._pending))

    def close(self) -> None:
        if self._device is None:
            return
        for sensor, _ in self._sensors:
            for step in (sensor.stop, sensor.close):
                try:
                    step()
                except RuntimeError as exc:  # already stopped or closed
                    log.debug("%s: %s", self.description, exc)
        # Drop every librealsense object: the recorder writes its file when released.
        self._sensors = ()
        self._syncer = self._composer = self._composed = self._converter = None
        self._device = self._recorder = None


def _video_stream(kind: rs.stream, uid: int, fmt: rs.format, bpp: int,
                  intrinsics: CameraIntrinsics, fps: int) -> rs.video_stream:
    stream = rs.video_stream()
    stream.type, stream.index, stream.uid = kind, 0, uid
    stream.width, stream.height, stream.fps = intrinsics.width, intrinsics.height, fps
    stream.bpp, stream.fmt = bpp, fmt
    stream.intrinsics = intrinsics.to_realsense()
    return stream


class _ClipImages(Sequence):
    """A demo clip as a sequence of (colour, depth) images, decoded on access."""

    def __init__(self, clip: DemoClip):
        self._clip = clip

    def __len__(self) -> int:
        return len(self._clip)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        frame = self._clip.frame(i)  # DemoClipError (a ValueError) for a corrupt frame
        return frame.color, frame.depth


class DemoSource(SoftwareDeviceSource):
    """The demo clip played through an ``rs.software_device`` (see :class:`SoftwareDeviceSource`).

    Frames carry the clip's labels as ``ground_truth``; frame ``k`` (from 1) of a session is
    clip frame ``(k - 1) % len(clip)``, and its ``timestamp_ms`` is ``k * 1000 / clip.fps``.

    Raises:
        CaptureError: The clip is missing or corrupt.
    """

    def __init__(self, clip: str | Path | None, options: CaptureOptions):
        path = Path(clip) if clip else DEFAULT_DEMO_CLIP
        try:
            self.clip = DemoClip.load(path)
        except DemoClipError as exc:
            raise CaptureError(str(exc)) from exc
        super().__init__(self.clip.camera, _ClipImages(self.clip), self.clip.fps, options,
                         labels=self.clip.labels, name=f"demo clip {path}")


def camera_connected() -> bool:
    """Whether librealsense sees at least one device."""
    return len(rs.context().query_devices()) > 0


def resolve_source(options: CaptureOptions) -> FrameSource:
    """The source ``options.source`` names (not yet opened).

    Raises:
        CaptureError: Unknown source, or a file that is not a recording or a readable clip.
    """
    source = options.source
    if source == "auto":
        if camera_connected():
            return RealSenseSource(options)
        clip = options.demo_clip or DEFAULT_DEMO_CLIP
        log.warning("no RealSense camera found: playing the built-in demo clip %s", clip)
        return DemoSource(clip, options)
    if source == "realsense":
        return RealSenseSource(options)
    if source == "demo":
        return DemoSource(options.demo_clip, options)
    suffix = Path(source).suffix
    if suffix in REPLAY_SUFFIXES:
        return ReplaySource(source, options)
    if suffix == ".npz":
        return DemoSource(source, options)
    raise CaptureError(f"unknown capture source {source!r}: use auto, realsense, demo, or a "
                       f".bag/.db3 recording or .npz demo clip")


class CaptureThread:
    """Runs a source on its own thread; the consumer takes the newest frame with :meth:`get`.

    The source is opened in the constructor (so a bad source raises there, on the caller's
    thread) and closed by the thread when it ends. A paced source (camera, real-time replay)
    never waits for the consumer: a frame not taken before the next one arrives is dropped
    and counted. An unpaced source (as-fast-as-possible replay) waits until the consumer has
    taken the previous frame, so no frame is lost.

    Frames get their ``sequence`` here (0, 1, ... over the whole session, reconnects
    included); a frame whose ``timestamp_ms`` is zero or not above the previous one is
    dropped (debug log). A lost source (error or frame timeout) logs one line, emits a
    ``camera_lost`` event, sets :attr:`lost` and is reopened with exponential backoff; a
    success emits ``reconnected``. A finished replay emits ``end_of_stream`` and sets
    :attr:`finished`.

    Args:
        source: The (unopened) source; the thread owns it from now on.
        options: Timeouts and reconnect backoff (default :class:`CaptureOptions`).
        name: Thread name.

    Raises:
        CaptureError: The source cannot be opened.
    """

    def __init__(self, source: FrameSource, options: CaptureOptions | None = None,
                 name: str = "capture"):
        self.source = source
        self._options = options or CaptureOptions()
        self.finished = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._mailbox = threading.Condition()
        self._slot: RGBDFrame | None = None
        self._events: deque[CaptureEvent] = deque(maxlen=64)
        self._stats = CaptureStats()
        self._lossless = not source.paced
        source.open()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def get(self, timeout: float | None = None) -> RGBDFrame | None:
        """Take the newest frame, waiting up to ``timeout`` seconds (None: until one comes).

        Returns:
            The frame, or None on timeout or once the stream has finished and been drained.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mailbox:
            while self._slot is None:
                if self.finished.is_set():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._mailbox.wait(remaining)
            frame, self._slot = self._slot, None
            self._mailbox.notify_all()  # an unpaced source waits for the empty slot
            return frame

    def events(self) -> list[CaptureEvent]:
        """Status events since the last call, oldest first."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def stats(self) -> CaptureStats:
        """A snapshot of the counters."""
        with self._mailbox:
            return dataclasses.replace(self._stats)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout`` seconds for it (it closes the source).

        The thread notices the stop between frames, so this takes at most one frame wait:
        ``frame_timeout_ms``, or ``first_frame_timeout_ms`` right after a (re)open.
        """
        self._stop.set()
        with self._mailbox:
            self._mailbox.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("capture: thread did not stop within %.1f s", timeout)

    def __enter__(self) -> "CaptureThread":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        last_timestamp: float | None = None
        sequence = 0
        try:
            while not self._stop.is_set():
                try:
                    frame = self.source.read(self._options.frame_timeout_ms)
                except EndOfStream as exc:
                    log.info("capture: %s", exc)
                    self._event(STATUS_END_OF_STREAM, str(exc))
                    return
                except CaptureError as exc:
                    if isinstance(exc, FrameTimeoutError):
                        with self._mailbox:
                            self._stats.timeouts += 1
                    if not self._reconnect(exc):
                        return
                    last_timestamp = None  # a reopened device may restart its clock
                    continue
                if frame.timestamp_ms <= 0 or (last_timestamp is not None
                                               and frame.timestamp_ms <= last_timestamp):
                    log.debug("capture: dropped a frame with timestamp %.3f ms (previous %s)",
                              frame.timestamp_ms, last_timestamp)
                    with self._mailbox:
                        self._stats.rejected += 1
                    continue
                last_timestamp = frame.timestamp_ms
                frame.sequence = sequence
                sequence += 1
                self._put(frame)
        finally:
            self.source.close()
            self.finished.set()
            with self._mailbox:
                self._mailbox.notify_all()

    def _put(self, frame: RGBDFrame) -> None:
        with self._mailbox:
            if self._lossless:
                while self._slot is not None and not self._stop.is_set():
                    self._mailbox.wait(0.1)
                if self._stop.is_set():
                    return
            elif self._slot is not None:
                self._stats.dropped += 1
                log.debug("capture: frame %d overwritten before it was taken", self._slot.sequence)
            self._slot = frame
            self._stats.captured += 1
            self._mailbox.notify_all()

    def _reconnect(self, error: CaptureError) -> bool:
        """Close the lost source and reopen it with backoff; False if stopped meanwhile."""
        log.warning("capture: source lost (%s); reconnecting", error)
        with self._mailbox:
            self._stats.losses += 1
        self.lost.set()
        self._event(STATUS_CAMERA_LOST, str(error))
        self.source.close()
        delay = self._options.reconnect_initial_s
        attempt = 0
        while not self._stop.wait(delay):
            attempt += 1
            try:
                self.source.open()
            except CaptureError as exc:
                log.debug("capture: reconnect attempt %d failed: %s", attempt, exc)
                delay = min(delay * 2.0, self._options.reconnect_max_s)
                continue
            with self._mailbox:
                self._stats.reconnects += 1
            self.lost.clear()
            reason = f"{self.source.description} reopened after {attempt} attempt(s)"
            log.warning("capture: %s", reason)
            self._event(STATUS_RECONNECTED, reason)
            return True
        return False

    def _event(self, status: str, reason: str) -> None:
        self._events.append(CaptureEvent(status, reason, time.monotonic_ns()))
