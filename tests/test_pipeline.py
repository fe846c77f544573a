"""The live pipeline end to end on real parts: demo clip through ``rs.software_device``,
MediaPipe, ONNX Runtime (CPU), real ZeroMQ sockets on 127.0.0.1; and the demo clip itself.

The model is a random-weight ``afnet_m_rt`` exported here (the shipped demo model is trained
later): tests check the plumbing and statuses, never the predicted labels. One test checks that
the shipped model, once it exists, loads. The clip is the shipped demo clip; a checkout without
it gets a short one from the same generator (and the tests of the shipped file skip).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import realtime.pipeline as pipeline_module
from realtime.capture import CaptureOptions
from realtime.demo_clip import DEFAULT_DEMO_CLIP, DemoClip, write_demo_clip
from realtime.engine import EngineOptions, open_engine
from realtime.frames import RGBDFrame
from realtime.pipeline import STAGES, FrameProcessor, Pipeline, PipelineOptions, PipelineStats, default_model_path
from realtime.publisher import PublisherOptions
from realtime.schema import validate
from realtime.tracking import TrackerOptions
from realtime.spec import EXPRESSIONS, PREPROCESSING_VERSION
from train.make_demo_clip import DemoClipOptions, DemoClipRenderer, make_demo_clip, plan_clip

RECEIVE_TIMEOUT_S = 20.0  # generous: the 2-core machine is shared with other jobs


def export_random_model(path: Path) -> Path:
    """A random-weight ``afnet_m_rt`` exported with the real exporter (metadata included)."""
    torch = pytest.importorskip("torch", reason="exporting a test model needs the train extra (torch)")
    from export.export_onnx import export_onnx
    from train.model import build_model

    torch.manual_seed(0)
    return export_onnx(build_model("afnet_m_rt"), path).path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("model") / "afnet_m_rt_random.onnx")


needs_shipped_clip = pytest.mark.skipif(
    not DEFAULT_DEMO_CLIP.exists(),
    reason=f"{DEFAULT_DEMO_CLIP} is not in this checkout (make it with python -m train.make_demo_clip)")


@pytest.fixture(scope="session")
def demo_clip_path(tmp_path_factory) -> Path:
    """The shipped demo clip; in a checkout without it, a 2 s one from the same generator."""
    if DEFAULT_DEMO_CLIP.exists():
        return DEFAULT_DEMO_CLIP
    return make_demo_clip(tmp_path_factory.mktemp("clip") / "demo_clip.npz",
                          DemoClipOptions(seconds=2.0, people=1, gap_s=0.1), progress=False)


@pytest.fixture(scope="module")
def demo_clip(demo_clip_path) -> DemoClip:
    return DemoClip.load(demo_clip_path)


def pipeline_options(model: Path, source: str, realtime: bool = False, loop: bool = True,
                     **changes) -> PipelineOptions:
    """Options for a test run: ONNX Runtime CPU, a free port on 127.0.0.1, no status lines."""
    fields = dict(engine=EngineOptions(model, backend="onnxruntime-cpu"),
                  capture=CaptureOptions(source=source, realtime=realtime, loop=loop),
                  publisher=PublisherOptions(endpoint="tcp://127.0.0.1:*"), status_interval_s=0)
    return PipelineOptions(**{**fields, **changes})


def subscriber(context: zmq.Context, endpoint: str, **options: int) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    for name, value in options.items():
        sub.setsockopt(getattr(zmq, name), value)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub


def receive(sub: zmq.Socket, count: int) -> list[tuple[bytes, dict]]:
    """``count`` (topic, decoded msgpack payload) pairs, failing if they do not come in time."""
    received = []
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while len(received) < count:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        assert remaining_ms > 0 and sub.poll(remaining_ms), f"got {len(received)} of {count} messages in time"
        topic, payload = sub.recv_multipart()
        received.append((topic, msgpack.unpackb(payload, raw=False)))
    return received


class Runner:
    """Runs :meth:`Pipeline.run` on a thread (which then owns the publisher) until stopped."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.stop = threading.Event()
        self.stats: PipelineStats | None = None
        self._thread = threading.Thread(target=self._run, args=(pipeline,), daemon=True)
        self._thread.start()

    def _run(self, pipeline: Pipeline) -> None:
        self.stats = pipeline.run(self.stop)

    def finish(self) -> PipelineStats:
        self.stop.set()
        self._thread.join(30)
        assert self.stats is not None, "the pipeline did not stop"
        return self.stats


# ------------------------------------------------------------------------------------ end to end


def test_demo_clip_end_to_end_reaches_a_real_subscriber(model_path, demo_clip):
    with Pipeline(pipeline_options(model_path, str(demo_clip.path))) as pipeline, zmq.Context() as context:
        sub = subscriber(context, pipeline.publisher.endpoint)
        runner = Runner(pipeline)
        try:
            received = receive(sub, 1)  # a late joiner misses the first few: wait for one...
            received += receive(sub, 40)  # ...then every later one arrives
        finally:
            stats = runner.finish()
            sub.close()

    messages = [m for _, m in received]
    for topic, message in received:
        assert validate(message) == [], message
        assert topic == b"afnet.result"
        assert message["class_names"] == list(EXPRESSIONS)
        assert message["model"]["preprocessing_version"] == PREPROCESSING_VERSION
    for key in ("seq", "publish_seq", "frames_processed", "host_time_ns"):
        values = [m[key] for m in messages]
        assert all(b > a for a, b in zip(values, values[1:])), f"{key} does not increase: {values}"
    statuses = Counter(m["status"] for m in messages)
    assert statuses["ok"] >= 0.9 * len(messages), statuses
    assert stats.processed >= len(messages) and stats.published == stats.processed

    # The unpaced demo drops nothing, so message seq k is clip frame k: the published head
    # pose must follow the clip's scripted one.
    errors = [m["faces"][0]["head_pose"]["yaw"] - demo_clip.extras["head_pose"][m["seq"] % len(demo_clip), 0]
              for m in messages if m["status"] == "ok"]
    assert np.median(np.abs(errors)) < 5.0, errors


def bad_frames_clip(path: Path, clip: DemoClip) -> tuple[Path, list[str]]:
    """A short clip of demo frames with a blank frame and a frame without depth among them.

    Returns:
        The clip and the frame status each of its frames must get.
    """
    frames, expected = [], []
    for i, kind in enumerate(["face", "face", "blank", "face", "no_depth", "face", "blank", "face"]):
        frame = clip.frame(i)
        if kind == "blank":
            frame = RGBDFrame(color=np.full_like(frame.color, 128), depth=np.zeros_like(frame.depth),
                              depth_scale=frame.depth_scale, intrinsics=frame.intrinsics)
        elif kind == "no_depth":
            frame.depth[:] = 0
        frames.append(frame)
        expected.append({"face": "ok", "blank": "no_face", "no_depth": "bad_depth"}[kind])
    return write_demo_clip(path, frames, fps=clip.fps), expected


def test_no_face_and_zero_depth_frames_get_statuses_and_the_stream_goes_on(model_path, demo_clip, tmp_path):
    clip_path, expected = bad_frames_clip(tmp_path / "bad_frames.npz", demo_clip)
    log_path = tmp_path / "log.jsonl"
    options = pipeline_options(model_path, str(clip_path), loop=False, log_path=str(log_path))
    with Pipeline(options) as pipeline:
        stats = pipeline.run()
    messages = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert all(validate(m) == [] for m in messages)
    assert [m["status"] for m in messages] == expected + ["end_of_stream"]
    assert [m["seq"] for m in messages[:-1]] == list(range(len(expected)))
    bad = {m["status"]: m for m in messages if m["status"] in ("no_face", "bad_depth")}
    assert bad["no_face"]["faces"] == []
    face = bad["bad_depth"]["faces"][0]
    assert face["status"] == "bad_depth" and face["label"] is None and face["status_reason"]
    assert stats.processed == len(expected) and stats.statuses["end_of_stream"] == 1


def test_smoothing_state_ends_with_the_track(model_path, demo_clip):
    """The tracker owns track lifetime: when it drops a face's track, the smoother forgets it too."""
    options = pipeline_options(model_path, "demo", tracker=TrackerOptions(max_unseen_frames=2))
    face = demo_clip.frame(0)
    blank = RGBDFrame(color=np.full_like(face.color, 128), depth=np.zeros_like(face.depth),
                      depth_scale=face.depth_scale, intrinsics=face.intrinsics)
    with open_engine(options.engine) as engine, FrameProcessor(options, engine) as processor:
        assert processor.process(face).message.status == "ok"
        assert processor.tracker.track_ids == processor.smoother.track_ids == [0]
        for i in range(3):  # unseen for 1 and 2 frames: kept; the 3rd drops it
            assert processor.process(blank).message.status == "no_face"
            assert processor.smoother.track_ids == processor.tracker.track_ids == ([0] if i < 2 else [])


def test_a_run_keeps_a_bounded_latency_history(model_path, demo_clip, tmp_path, monkeypatch):
    """A live run never ends: its per-stage latency lists must not grow with it."""
    monkeypatch.setattr(pipeline_module, "LATENCY_HISTORY", 3)
    clip_path, expected = bad_frames_clip(tmp_path / "clip.npz", demo_clip)
    with Pipeline(pipeline_options(model_path, str(clip_path), loop=False)) as pipeline:
        stats = pipeline.run()
    assert stats.processed == len(expected) > 3
    assert {name: len(values) for name, values in stats.latency_ms.items()} == {
        name: 3 for name in (*STAGES, "total", "capture_to_publish", "publish")}


def test_a_subscriber_that_never_reads_does_not_slow_the_pipeline(model_path, demo_clip_path):
    """Paced at the clip's 30 fps for a fixed time, a stuck subscriber (tiny queues, never
    read) must not cost processed frames: publishing never waits for it. (Two seconds of
    messages still fit in the socket buffers; test_publisher floods a stuck subscriber until
    ZeroMQ drops.)"""
    def run(stuck: bool) -> PipelineStats:
        options = pipeline_options(model_path, str(demo_clip_path), realtime=True, duration_s=2.0,
                                   publisher=PublisherOptions(endpoint="tcp://127.0.0.1:*", sndhwm=1))
        with Pipeline(options) as pipeline, zmq.Context() as context:
            sub = subscriber(context, pipeline.publisher.endpoint, RCVHWM=1, RCVBUF=4096) if stuck else None
            time.sleep(0.3)  # let the subscription reach the publisher
            stats = pipeline.run()
            assert pipeline.publisher.stats().again == 0  # a PUB socket drops, it never refuses
            if sub is not None:
                sub.close()
        return stats

    free, stuck = run(stuck=False), run(stuck=True)
    assert stuck.processed >= 0.75 * free.processed, (stuck.processed, free.processed)
    assert stuck.published == stuck.processed


def test_shipped_model_loads():
    path = default_model_path()
    if not path.exists():
        pytest.skip(f"{path} is not there yet (trained and exported by the lead)")
    with open_engine(EngineOptions(path, backend="onnxruntime-cpu")) as engine:
        assert engine.metadata.preprocessing_version == PREPROCESSING_VERSION
        assert list(engine.class_names) == list(EXPRESSIONS)


# -------------------------------------------------------------------------------- the demo clip


@needs_shipped_clip
def test_shipped_demo_clip_holds_what_the_generator_documents(demo_clip):
    options = DemoClipOptions()
    plan = plan_clip(options)
    assert len(demo_clip) == len(plan) and demo_clip.fps == options.fps
    assert [label or "" for label in demo_clip.labels] == [step.label for step in plan]
    person, expression = demo_clip.extras["person"], demo_clip.extras["expression"]
    for p in range(options.people):  # everybody makes all seven expressions, each labelled
        assert {str(e) for e in expression[person == p]} == set(EXPRESSIONS)
        assert {label for label, q in zip(demo_clip.labels, person) if q == p} == {*EXPRESSIONS, None}
    pose = demo_clip.extras["head_pose"]  # (N, 6)
    face = person >= 0
    assert np.isfinite(pose[face]).all() and np.isnan(pose[~face]).all()
    assert np.abs(pose[face, 0]).max() == pytest.approx(options.max_yaw, abs=0.01)
    assert 450 < pose[face, 5].min() and pose[face, 5].max() < 850  # nose tip distance, mm
    assert DEFAULT_DEMO_CLIP.stat().st_size < 30e6


def test_labels_follow_the_intensity_rule():
    options = DemoClipOptions(seconds=6, people=1)
    plan = plan_clip(options)
    assert plan == plan_clip(options)  # deterministic
    for step in plan:
        if step.person < 0:
            assert step.label == ""
        elif step.intensity == 0:
            assert step.label == "neutral"
        else:
            assert step.label in ("", step.expression)
    ramp = [s for s in plan if s.person >= 0 and 0 < s.intensity < 0.3]
    assert ramp and all(s.label == "" for s in ramp)  # faint onsets are unlabelled
    assert plan_clip(DemoClipOptions(seconds=6, people=1, seed=1)) != plan


@needs_shipped_clip
def test_generator_reproduces_the_shipped_clip(demo_clip):
    """Same seed, same frame: depth exactly, colour within JPEG error."""
    options = DemoClipOptions()
    with DemoClipRenderer(options) as renderer:
        frame = renderer.process(plan_clip(options)[0], 0).frame
    shipped = demo_clip.frame(0)
    np.testing.assert_array_equal(frame.depth, shipped.depth)
    assert np.abs(frame.color.astype(int) - shipped.color).mean() < 3.0
