"""Camera model: JSON round trip, librealsense conversions, reading a recording's profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyrealsense2 as rs
import pytest

from calib.camera import D4XX_CAMERA, CameraIntrinsics, CameraModel, Extrinsics
from realtime.capture import CaptureOptions, SoftwareDeviceSource

ROOT = Path(__file__).resolve().parents[1]

# A rotation of 10 deg about an oblique axis: not symmetric, so a transposition shows.
_AXIS = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
_K = np.array([[0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0]])
_R = np.eye(3) + np.sin(np.radians(10)) * _K + (1 - np.cos(np.radians(10))) * _K @ _K
OBLIQUE = Extrinsics(tuple(_R.reshape(-1)), (0.015, -0.002, 0.001))

D435_LIKE = CameraModel(
    color=CameraIntrinsics(640, 480, 615.1, 615.3, 321.2, 238.9),
    depth=CameraIntrinsics(640, 480, 385.5, 385.5, 318.7, 241.1),
    depth_to_color=OBLIQUE,
    depth_scale=0.0001,
)


def test_json_round_trip(tmp_path):
    path = tmp_path / "camera.json"
    D435_LIKE.to_json(path)
    assert CameraModel.from_json(path) == D435_LIKE
    assert json.loads(path.read_text())["depth_scale"] == 0.0001
    assert CameraModel.from_dict(D435_LIKE.to_dict()) == D435_LIKE


@pytest.mark.parametrize("text", ["{not json", '{"color": {}}', "[]", '{"color": {"width": 1}}'])
def test_bad_json_is_a_value_error_naming_the_file(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.json") as exc:
        CameraModel.from_json(path)
    assert "\n" not in str(exc.value)


def test_missing_json_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        CameraModel.from_json(tmp_path / "missing.json")


def test_extrinsics_follow_librealsense_convention():
    ext = OBLIQUE.to_realsense()
    p = [0.1, -0.05, 0.6]
    want = OBLIQUE.matrix() @ np.append(p, 1.0)
    np.testing.assert_allclose(rs.rs2_transform_point_to_point(ext, p), want[:3], atol=1e-6)
    back = Extrinsics.from_realsense(ext)
    np.testing.assert_allclose(back.rotation, OBLIQUE.rotation, atol=1e-7)
    np.testing.assert_allclose(back.translation, OBLIQUE.translation, atol=1e-7)
    assert Extrinsics().is_identity() and not OBLIQUE.is_identity()


def test_intrinsics_to_librealsense_projects_the_same():
    intr = D435_LIKE.color
    point = np.array([0.05, -0.03, 0.7], dtype=np.float32)
    got = rs.rs2_project_point_to_pixel(intr.to_realsense(), point.tolist())
    np.testing.assert_allclose(got, intr.project(point[None])[0], atol=1e-3)
    assert CameraIntrinsics.from_realsense(intr.to_realsense()).is_close(intr)


def test_registered_depth():
    assert D4XX_CAMERA.depth_is_registered()
    assert not D435_LIKE.depth_is_registered()


def _record(path: Path, camera: CameraModel, frames: int = 3) -> None:
    """Record a software device with this camera model to a .db3 file."""
    c, d = camera.color, camera.depth
    images = [(np.full((c.height, c.width, 3), 100, np.uint8),
               np.full((d.height, d.width), 6000, np.uint16))] * frames
    source = SoftwareDeviceSource(camera, images, fps=30.0,
                                  options=CaptureOptions(realtime=False, record=str(path)))
    with source:
        for _ in range(frames):
            source.read(1000)


def _assert_models_close(got: CameraModel, want: CameraModel) -> None:
    assert got.color.is_close(want.color) and got.depth.is_close(want.depth)
    np.testing.assert_allclose(got.depth_to_color.matrix(), want.depth_to_color.matrix(), atol=1e-6)
    assert got.depth_scale == pytest.approx(want.depth_scale, rel=1e-6)


def test_from_realsense_profile_reads_a_recording(tmp_path):
    path = tmp_path / "cam.db3"
    _record(path, D435_LIKE)
    pipeline = rs.pipeline()
    config = rs.config()
    config.enable_device_from_file(str(path), repeat_playback=False)
    profile = pipeline.start(config)
    try:
        got = CameraModel.from_realsense_profile(profile)
    finally:
        pipeline.stop()
    _assert_models_close(got, D435_LIKE)


def test_cli_dumps_a_recordings_camera_model(tmp_path):
    rec, out = tmp_path / "cam.db3", tmp_path / "camera.json"
    _record(rec, D435_LIKE)
    result = subprocess.run([sys.executable, "-m", "calib.cli", "--from-file", str(rec),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    _assert_models_close(CameraModel.from_json(out), D435_LIKE)


def test_cli_reads_a_demo_clip_like_the_live_path(tmp_path):
    from realtime.demo_clip import DEFAULT_DEMO_CLIP, DemoClip

    if not DEFAULT_DEMO_CLIP.exists():
        pytest.skip(f"{DEFAULT_DEMO_CLIP} is not in this checkout")
    from calib.cli import read_camera_model

    clip = DemoClip.load(DEFAULT_DEMO_CLIP)
    got = read_camera_model(str(DEFAULT_DEMO_CLIP))
    assert got.color == clip.frame(0).intrinsics
    assert got.depth_scale == pytest.approx(clip.frame(0).depth_scale)


def test_cli_reports_a_bad_file_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calib.cli", "--from-file",
                             str(tmp_path / "missing.db3")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "missing.db3" in result.stderr


def test_calib_imports_without_pyrealsense2():
    code = ("import sys; sys.modules['pyrealsense2'] = None; "
            "import calib.camera, calib; print(calib.camera.D4XX_CAMERA.depth_scale)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
