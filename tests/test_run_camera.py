"""run_camera.py as a user runs it: a subprocess on the built-in demo clip (MediaPipe, ONNX
Runtime CPU, a real ZeroMQ socket on a free 127.0.0.1 port), its log, video, recording and
replay, Ctrl-C, and the one-line refusals of bad models.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import onnx
import pytest

from realtime.schema import validate
from realtime.demo_clip import DEFAULT_DEMO_CLIP
from test_pipeline import demo_clip_path, export_random_model  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 120  # completion bound only: a hung run fails instead of blocking the suite


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("model") / "afnet_m_rt_random.onnx")


@pytest.fixture(scope="module")
def demo(demo_clip_path) -> str:
    """The --source of the demo: ``demo`` (the shipped clip), else the generated stand-in."""
    return "demo" if demo_clip_path == DEFAULT_DEMO_CLIP else str(demo_clip_path)


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_camera.py"), "--endpoint", "tcp://127.0.0.1:*",
            "--status-interval", "0", *args]


def run_camera(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def read_log(path: Path) -> list[dict]:
    """Every line of a --log file, each a valid message."""
    messages = [json.loads(line) for line in path.read_text().splitlines()]
    for message in messages:
        assert validate(message) == [], message
    return messages


def error_lines(stderr: str) -> list[str]:
    """The lines run_camera logged at ERROR level (MediaPipe/absl add their own lines to stderr)."""
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_help_shows_the_usage():
    result = run_camera("--help")
    assert result.returncode == 0 and "--source" in result.stdout and "--record" in result.stdout


def test_demo_run_writes_n_messages_and_an_n_frame_video(model_path, demo, tmp_path):
    n = 12
    log, video = tmp_path / "out.jsonl", tmp_path / "overlay.mp4"
    result = run_camera("--model", str(model_path), "--source", demo, "--max-frames", str(n),
                        "--log", str(log), "--format", "json", "--save-video", str(video))
    assert result.returncode == 0, result.stderr
    messages = read_log(log)
    assert len(messages) == n
    assert sum(m["status"] == "ok" for m in messages) >= n - 2
    capture = cv2.VideoCapture(str(video))
    try:
        assert capture.isOpened()
        frames = []
        while (frame := capture.read()[1]) is not None:
            frames.append(frame)
    finally:
        capture.release()
    assert len(frames) == n and frames[0].shape == (480, 640, 3)


def test_record_then_replay_processes_the_recorded_frames(model_path, demo, tmp_path):
    n = 15
    recording, live_log, replay_log = tmp_path / "session.db3", tmp_path / "live.jsonl", tmp_path / "replay.jsonl"
    live = run_camera("--model", str(model_path), "--source", demo, "--max-frames", str(n),
                      "--record", str(recording), "--log", str(live_log))
    assert live.returncode == 0, live.stderr
    assert recording.stat().st_size > 0
    replay = run_camera("--model", str(model_path), "--source", str(recording), "--fast",
                        "--log", str(replay_log))
    assert replay.returncode == 0, replay.stderr
    last_live = read_log(live_log)[-1]
    assert last_live["frames_processed"] == n
    messages = read_log(replay_log)
    results = [m for m in messages if m["status"] != "end_of_stream"]
    # the recording holds every frame the device made: the processed ones, the ones the paced
    # live run dropped, and the few pushed after the last processed one before capture stopped
    recorded = n + last_live["frames_dropped"]
    assert recorded <= len(results) <= recorded + 5
    assert messages[-1]["status"] == "end_of_stream"
    assert sum(m["status"] == "ok" for m in results) >= len(results) - 2
    assert [m["seq"] for m in results] == list(range(len(results)))  # --fast: none dropped


def test_ctrl_c_stops_cleanly_with_a_complete_log(model_path, demo, tmp_path):
    log = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        command("--model", str(model_path), "--source", demo, "--log", str(log)), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell that started the tests in the background makes its children ignore SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (log.exists() and log.read_text().count("\n") >= 5):
            assert process.poll() is None and time.monotonic() < deadline, "no messages logged"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    messages = read_log(log)  # every line complete and valid
    assert len(messages) >= 5
    assert f"done: {len(messages)} frames" in stderr


def model_with_preprocessing(source: Path, path: Path, version: str) -> Path:
    """A copy of ``source`` whose metadata claims another preprocessing version."""
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key.endswith("preprocessing_version"):
            prop.value = version
    onnx.save(model, str(path))
    return path


def test_model_for_other_preprocessing_is_refused_in_one_line(model_path, demo, tmp_path):
    stale = model_with_preprocessing(model_path, tmp_path / "stale.onnx", "canon0-old")
    result = run_camera("--model", str(stale), "--source", demo, "--max-frames", "3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "stale.onnx" in line and "canon0-old" in line


def test_missing_model_is_refused_in_one_line(demo, tmp_path):
    result = run_camera("--model", str(tmp_path / "nowhere.onnx"), "--source", demo, "--max-frames", "3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "nowhere.onnx" in line and "not found" in line
