"""Demo clip format: round trip, labels/extras, and one clear error per kind of bad file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest

from calib.camera import D4XX_COLOR_640x480, CameraModel
from realtime.demo_clip import DemoClip, DemoClipError, write_demo_clip
from realtime.frames import RGBDFrame
from realtime.spec import EXPRESSIONS

FACE_PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def synthetic_frames(n: int = 5, depth_scale: float = 0.001) -> list[RGBDFrame]:
    """A real face photo at 640x480 with a depth plane at 600 mm and a moving bump.

    Frame i shifts the photo by 4*i pixels, raises the bump by i mm and has no depth in the
    top-left corner (0 = no depth), so frames differ and holes are exercised.
    """
    intr = D4XX_COLOR_640x480
    photo = cv2.cvtColor(cv2.imread(str(FACE_PHOTO)), cv2.COLOR_BGR2RGB)
    photo = cv2.resize(photo, (intr.width, intr.height), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:intr.height, 0:intr.width]
    units_per_mm = 0.001 / depth_scale
    frames = []
    for i in range(n):
        bump = (30.0 + i) * np.exp(-((xx - 320.0 - 4 * i) ** 2 + (yy - 220.0) ** 2) / (2 * 70.0**2))
        depth = np.round((600.0 - bump) * units_per_mm).astype(np.uint16)  # (H, W)
        depth[:40, :60] = 0
        frames.append(RGBDFrame(color=np.roll(photo, 4 * i, axis=1), depth=depth,
                                depth_scale=depth_scale, intrinsics=intr,
                                timestamp_ms=i * 33.3,
                                ground_truth=EXPRESSIONS[i % len(EXPRESSIONS)]))
    return frames


def write_clip(path: Path, n: int = 5, **kwargs) -> tuple[Path, list[RGBDFrame]]:
    frames = synthetic_frames(n)
    return write_demo_clip(path, frames, fps=30.0, **kwargs), frames


def test_round_trip_keeps_depth_exactly_and_colour_within_jpeg_error(tmp_path):
    head_pose = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    path, frames = write_clip(tmp_path / "clip.npz", extras={"head_pose": head_pose})
    clip = DemoClip.load(path)
    assert len(clip) == 5 and clip.fps == 30.0
    assert clip.camera == CameraModel(color=D4XX_COLOR_640x480, depth=D4XX_COLOR_640x480,
                                      depth_scale=0.001)
    assert clip.labels == tuple(f.ground_truth for f in frames)
    np.testing.assert_array_equal(clip.extras["head_pose"], head_pose)
    for i, (got, want) in enumerate(zip(clip, frames)):
        assert got.depth.dtype == np.uint16 and got.color.dtype == np.uint8
        np.testing.assert_array_equal(got.depth, want.depth)
        err = np.abs(got.color.astype(int) - want.color.astype(int))
        assert err.mean() < 3.0, f"frame {i}: colour differs by {err.mean():.2f} on average"
        assert got.intrinsics == want.intrinsics and got.depth_scale == want.depth_scale
        assert got.sequence == i and got.timestamp_ms == pytest.approx(i * 1000.0 / 30.0)
        assert got.ground_truth == want.ground_truth


def test_colour_channels_stay_rgb(tmp_path):
    frame = synthetic_frames(1)[0]
    frame.color[:] = (250, 10, 10)  # pure red: a BGR mix-up would make it blue
    clip = DemoClip.load(write_demo_clip(tmp_path / "red.npz", [frame], fps=10.0))
    assert tuple(clip.frame(0).color[240, 320]) == pytest.approx((250, 10, 10), abs=4)


def test_explicit_labels_override_frames_and_unlabelled_is_none(tmp_path):
    labels = ["happiness", None, "", "anger", "fear"]
    clip = DemoClip.load(write_clip(tmp_path / "l.npz", labels=labels)[0])
    assert clip.labels == ("happiness", None, None, "anger", "fear")
    assert clip.frame(1).ground_truth is None

    frames = synthetic_frames(2)
    for f in frames:
        f.ground_truth = None
    assert DemoClip.load(write_demo_clip(tmp_path / "n.npz", frames, fps=5.0)).labels is None


def test_clip_is_small(tmp_path):
    path, frames = write_clip(tmp_path / "clip.npz")
    raw = sum(f.color.nbytes + f.depth.nbytes for f in frames)
    assert path.stat().st_size < raw / 8


@pytest.mark.parametrize("bad", [
    dict(fps=0.0),
    dict(labels=["anger"]),
    dict(extras={"head_pose": np.zeros((4, 6))}),
])
def test_writer_refuses_bad_arguments(tmp_path, bad):
    kwargs = dict(fps=30.0) | bad
    with pytest.raises(ValueError):
        write_demo_clip(tmp_path / "x.npz", synthetic_frames(5), **kwargs)
    assert not (tmp_path / "x.npz").exists()


def test_writer_refuses_no_frames_and_mixed_frames(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        write_demo_clip(tmp_path / "x.npz", [], fps=30.0)
    frames = synthetic_frames(2)
    frames[1].depth = frames[1].depth.astype(np.float32)
    with pytest.raises(ValueError, match="frame 1"):
        write_demo_clip(tmp_path / "x.npz", frames, fps=30.0)


def _assert_one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message


def test_missing_clip(tmp_path):
    with pytest.raises(DemoClipError, match="not found") as exc:
        DemoClip.load(tmp_path / "nope.npz")
    _assert_one_line(exc, tmp_path / "nope.npz")


def test_not_a_zip_and_truncated_clip(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(DemoClipError) as exc:
        DemoClip.load(text)
    _assert_one_line(exc, text)

    path, _ = write_clip(tmp_path / "clip.npz", n=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DemoClipError) as exc:
        DemoClip.load(path)
    _assert_one_line(exc, path)


def test_npz_that_is_not_a_clip(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(DemoClipError, match="missing") as exc:
        DemoClip.load(path)
    _assert_one_line(exc, path)


def _rewrite(path: Path, **changes) -> None:
    """Rewrite some arrays of an existing clip file."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_inconsistent_offsets_and_other_version(tmp_path):
    path, _ = write_clip(tmp_path / "clip.npz", n=2)
    _rewrite(path, depth_offsets=np.array([0, 10], dtype=np.int64))
    with pytest.raises(DemoClipError, match="depth") as exc:
        DemoClip.load(path)
    _assert_one_line(exc, path)

    path, _ = write_clip(tmp_path / "v2.npz", n=2)
    _rewrite(path, version=np.array(2))
    with pytest.raises(DemoClipError, match="version 2"):
        DemoClip.load(path)


def test_corrupt_frame_names_the_frame_and_others_still_decode(tmp_path):
    path, frames = write_clip(tmp_path / "clip.npz", n=3)
    with np.load(path) as npz:
        data, offsets = npz["color_data"].copy(), npz["color_offsets"]
    data[offsets[1]:offsets[2]] = 7  # frame 1's JPEG becomes garbage
    _rewrite(path, color_data=data)
    clip = DemoClip.load(path)
    with pytest.raises(DemoClipError, match="frame 1: colour JPEG") as exc:
        clip.frame(1)
    _assert_one_line(exc, path)
    np.testing.assert_array_equal(clip.frame(2).depth, frames[2].depth)
    with pytest.raises(IndexError):
        clip.frame(3)


def test_clip_loads_without_pickle(tmp_path):
    path, _ = write_clip(tmp_path / "clip.npz", n=1)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
    assert {"color_data.npy", "depth_data.npy", "camera_json.npy", "labels.npy"} <= names
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)
