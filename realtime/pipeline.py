"""The live pipeline: capture -> landmarks -> canonical maps -> engine -> smoothing -> publisher.

Usage:
    from realtime.pipeline import Pipeline, PipelineOptions
    with Pipeline(PipelineOptions(engine=EngineOptions("model.onnx"))) as pipeline:
        stats = pipeline.run()          # until the stream ends, a limit, or Ctrl-C

Capture runs on its own thread and keeps only the newest frame (``realtime.capture``); every
other stage runs on the thread that calls :meth:`Pipeline.run`, one frame at a time, so a
slow stage makes capture drop stale frames instead of building a backlog. Each processed
frame becomes exactly one published :class:`~realtime.schema.FrameMessage`; capture events
(camera lost, reconnected, end of stream) become status-only messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from realtime.canonical import CanonicalOptions, CanonicalResult, Canonicalizer
from realtime.capture import STATUS_END_OF_STREAM, CaptureEvent, CaptureOptions, CaptureThread, resolve_source
from realtime.engine import Engine, EngineOptions, open_engine, probabilities
from realtime.frames import FaceLandmarks, RGBDFrame
from realtime.landmarks import LandmarkDetector, LandmarkOptions
from realtime.model_inputs import make_feeds
from realtime.publisher import Publisher, PublisherOptions
from realtime.schema import FaceMessage, FrameMessage, HeadPose, ModelInfo, SchemaError, frame_status
from realtime.smoothing import SmoothingOptions, TemporalSmoother
from realtime.tracking import FaceTracker, TrackerOptions

log = logging.getLogger(__name__)

STAGES = ("landmarks", "canonical", "engine", "postprocess")
LATENCY_HISTORY = 9000  # latencies a run keeps per stage (5 min at 30 fps): a live run never ends


@dataclass
class PipelineOptions:
    """Everything the pipeline needs; each stage keeps its own options dataclass."""

    engine: EngineOptions
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    landmarks: LandmarkOptions = field(default_factory=LandmarkOptions)
    canonical: CanonicalOptions = field(default_factory=CanonicalOptions)
    publisher: PublisherOptions = field(default_factory=PublisherOptions)
    smoothing: SmoothingOptions = field(default_factory=SmoothingOptions)
    tracker: TrackerOptions = field(default_factory=TrackerOptions)
    max_frames: int | None = None  # stop after this many processed frames
    duration_s: float | None = None  # stop after this long
    status_interval_s: float = 5.0  # console status line period (0: never)
    log_path: str | None = None  # JSONL file receiving every published message

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")


@dataclass
class FrameResult:
    """What processing one frame produced: the message plus the stage outputs behind it."""

    message: FrameMessage
    frame: RGBDFrame
    faces: list[FaceLandmarks]
    canonical: list[CanonicalResult]
    published: dict | None = None  # the message as sent, with the publisher's fps and latencies


@dataclass
class PipelineStats:
    """Totals of one :meth:`Pipeline.run`."""

    processed: int = 0
    published: int = 0
    statuses: Counter = field(default_factory=Counter)
    dropped: int = 0
    elapsed_s: float = 0.0
    # per stage + capture_to_publish: the last LATENCY_HISTORY values
    latency_ms: dict[str, deque[float]] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0


class FrameProcessor:
    """Landmarks -> tracking -> canonical maps -> engine -> smoothing for one frame.

    Owns the per-frame stages (not capture or publishing), so benchmarks and tests can push
    frames through exactly what the live pipeline runs.
    """

    def __init__(self, options: PipelineOptions, engine: Engine) -> None:
        self.engine = engine
        self.class_names = list(engine.class_names)
        self.model_info = ModelInfo(engine.metadata.model_version, engine.metadata.preprocessing_version)
        with ExitStack() as stack:
            self.detector = stack.enter_context(LandmarkDetector(options.landmarks))
            self.canonicalizer = stack.enter_context(Canonicalizer(options.canonical))
            self.tracker = stack.enter_context(FaceTracker(options.tracker))
            self.smoother = stack.enter_context(TemporalSmoother(options.smoothing))
            self._stages = stack.pop_all()

    def __enter__(self) -> "FrameProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def process(self, frame: RGBDFrame, frames_dropped: int = 0, frames_processed: int = 0) -> FrameResult:
        """Run every stage on ``frame``; bad faces become face statuses, never exceptions."""
        latency: dict[str, float] = {}
        t0 = time.perf_counter()
        faces = self.detector.process(frame)
        self.smoother.forget(self.tracker.process(faces).dropped_ids)
        t1 = time.perf_counter()
        results = [self.canonicalizer.process(frame, face) for face in faces]
        t2 = time.perf_counter()
        ok = [i for i, r in enumerate(results) if r.ok]
        probs = weights = None
        if ok:
            out = self.engine.infer(make_feeds([results[i].face for i in ok]))
            probs = probabilities(out["logits"])  # (B, C)
            weights = out["modality_weights"]  # (B, F, 2)
            finite = np.isfinite(probs).all(axis=1) & np.isfinite(weights).all(axis=(1, 2))
            for k in np.flatnonzero(~finite):  # e.g. an fp16 overflow in a GPU engine
                results[ok[k]] = CanonicalResult("bad_fit", f"frame {frame.sequence}: the model's output is not finite")
            probs, weights, ok = probs[finite], weights[finite], [i for i, f in zip(ok, finite) if f]
        t3 = time.perf_counter()
        smoothed = self.smoother.process(
            # the source's clock, not the host's: a fast replay smooths over the recording's real time
            {faces[i].track_id: probs[k] for k, i in enumerate(ok)}, frame.timestamp_ms)
        messages = []
        for i, (face, result) in enumerate(zip(faces, results)):
            if not result.ok:
                messages.append(FaceMessage(track_id=face.track_id, bbox=face.bbox,
                                            status=result.status, status_reason=result.reason))
                continue
            k = ok.index(i)
            pred = smoothed.tracks[face.track_id]
            c = result.face
            messages.append(FaceMessage(
                track_id=face.track_id, bbox=face.bbox,
                label=self.class_names[pred.label], label_raw=self.class_names[pred.label_raw],
                probs=pred.probs, probs_raw=pred.probs_raw, modality_weights=weights[k],
                head_pose=HeadPose(c.yaw, c.pitch, c.roll, c.translation),
                fit_residual_mm=c.residual_mm,
            ))
        status, reason = frame_status(messages)
        t4 = time.perf_counter()
        for name, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            latency[name] = (b - a) * 1e3
        latency["total"] = (t4 - t0) * 1e3
        message = FrameMessage(
            seq=frame.sequence, capture_ts_ms=frame.timestamp_ms, host_time_ns=frame.host_time_ns,
            status=status, status_reason=reason, class_names=self.class_names, model=self.model_info,
            faces=messages, latency_ms=latency, frames_dropped=frames_dropped,
            frames_processed=frames_processed + 1,
        )
        return FrameResult(message, frame, faces, results)

    def close(self) -> None:
        self._stages.close()


class Pipeline:
    """The whole runtime. Stages are opened in the constructor, engine first, so a bad model
    fails before the camera starts; :meth:`close` releases everything (safe to call twice)."""

    def __init__(self, options: PipelineOptions, frame_callback=None) -> None:
        """Args:
            options: Pipeline settings.
            frame_callback: Called with every :class:`FrameResult` after it is published
                (the overlay window/video writer hooks in here).
        """
        self.options = options
        self._frame_callback = frame_callback
        self._events: deque[CaptureEvent] = deque()  # taken from capture, not yet published
        self._last_frame: RGBDFrame | None = None  # status messages carry its seq and timestamp
        self.unpublished = 0  # messages the schema refused (logged, skipped)
        with ExitStack() as stack:  # closed in reverse: capture first, then socket, stages, engine
            self.engine = stack.enter_context(open_engine(options.engine))
            self.processor = stack.enter_context(FrameProcessor(options, self.engine))
            self.publisher = stack.enter_context(Publisher(options.publisher))
            self._log_file = stack.enter_context(open(options.log_path, "w")) if options.log_path else None
            self.capture = stack.enter_context(CaptureThread(resolve_source(options.capture), options.capture))
            self._resources = stack.pop_all()
        log.info("publishing on %s (%s), model %s via %s", self.publisher.endpoint,
                 options.publisher.format, options.engine.model_path, self.engine.backend)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop capture first (no new frames), then release the log, socket, stages and engine."""
        self._resources.close()

    def _publish(self, message: FrameMessage, stats: PipelineStats) -> dict | None:
        """Publish; returns the message as sent (the publisher fills in fps and latencies), or
        None when the schema refused it (one log line; the stream goes on)."""
        try:
            sent = self.publisher.publish(message).message
        except SchemaError as exc:
            self.unpublished += 1
            log.error("frame %s not published: %s", message.seq, exc)
            return None
        stats.published += 1
        stats.statuses[message.status] += 1
        if self._log_file is not None:
            self._log_file.write(json.dumps(sent) + "\n")
        return sent

    def _publish_events(self, stats: PipelineStats, drained: bool = False) -> None:
        """Publish capture events in order. ``end_of_stream`` waits until the mailbox is
        ``drained``: capture reports the end as soon as it has handed over the last frame, and
        the message must follow that frame's result."""
        self._events.extend(self.capture.events())
        while self._events:
            if self._events[0].status == STATUS_END_OF_STREAM and not drained:
                return
            event = self._events.popleft()
            log.info("capture: %s %s", event.status, event.reason)
            last = self._last_frame
            self._publish(FrameMessage.status_only(
                event.status, event.reason, class_names=self.processor.class_names,
                model=self.processor.model_info, host_time_ns=event.host_time_ns,
                seq=-1 if last is None else last.sequence, capture_ts_ms=None if last is None else last.timestamp_ms,
                frames_dropped=self.capture.stats().dropped, frames_processed=stats.processed), stats)
            if event.status == "reconnected":
                self.processor.smoother.reset()
                self.processor.tracker.reset()

    def run(self, stop=None) -> PipelineStats:
        """Process frames until the stream ends, ``max_frames``/``duration_s``, ``stop`` is
        set (a ``threading.Event``), or Ctrl-C. Returns the run's totals."""
        opt = self.options
        stats = PipelineStats(latency_ms={name: deque(maxlen=LATENCY_HISTORY)
                                          for name in (*STAGES, "total", "capture_to_publish")})
        start = time.monotonic()
        next_status = start + opt.status_interval_s
        try:
            while stop is None or not stop.is_set():
                self._publish_events(stats)
                if opt.duration_s is not None and time.monotonic() - start >= opt.duration_s:
                    break
                frame = self.capture.get(timeout=0.1)
                if frame is None:
                    if self.capture.finished.is_set():
                        self._publish_events(stats, drained=True)
                        break
                    continue
                self._last_frame = frame
                dropped = self.capture.stats().dropped
                result = self.processor.process(frame, dropped, stats.processed)
                sent = result.published = self._publish(result.message, stats)
                stats.processed += 1
                if sent is None:
                    continue
                for name, value in sent["latency_ms"].items():
                    stats.latency_ms.setdefault(name, deque(maxlen=LATENCY_HISTORY)).append(value)
                if self._frame_callback is not None:
                    self._frame_callback(result)
                if opt.max_frames is not None and stats.processed >= opt.max_frames:
                    break
                if opt.status_interval_s and time.monotonic() >= next_status:
                    next_status += opt.status_interval_s
                    log.info(status_line(sent, stats))
        except KeyboardInterrupt:
            log.info("interrupted: stopping")
        stats.elapsed_s = time.monotonic() - start
        stats.dropped = self.capture.stats().dropped
        return stats


def status_line(sent: dict, stats: PipelineStats) -> str:
    """One console line: fps, latency, per-stage time, drops, and the faces of the last message sent."""
    def p50(name: str) -> float:
        values = list(stats.latency_ms.get(name) or [0.0])
        return float(np.median(values[-300:]))

    stages = " ".join(f"{name} {p50(name):.1f}" for name in (*STAGES[:3], "total"))
    names = sent["class_names"]
    faces = ", ".join(f"#{f['track_id']} {f['label']} {f['probs'][names.index(f['label'])]:.2f}" if f["label"]
                      else f"#{f['track_id']} {f['status']}" for f in sent["faces"]) or sent["status"]
    return (f"fps {sent['fps']:.1f} | capture->publish p50 {p50('capture_to_publish'):.1f} ms | "
            f"stages ms: {stages} | dropped {sent['frames_dropped']} | {faces}")


def default_model_path() -> Path:
    """The shipped demo model."""
    return Path(__file__).with_name("assets") / "afnet_m_demo.onnx"
