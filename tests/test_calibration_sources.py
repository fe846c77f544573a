"""INT8 calibration sets from the preprocessing cache and from a recording run through the live path."""

import numpy as np
import pytest

from calib.int8_calibration import (CalibrationDataError, collect_samples, default_input_shapes,
                                    samples_from_recording)
from realtime.demo_clip import DemoClip, write_demo_clip
from realtime.model_inputs import arrays_to_feeds
from realtime.spec import MASK_NAMES, SPEC
from train.cache import save_sample

S = SPEC.size


def cache_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normals = np.zeros((3, S, S), np.float32)
    normals[2] = 1.0
    return {"texture": rng.integers(0, 255, (S, S, 3), dtype=np.uint8),
            "depth_mm": rng.uniform(-60, 0, (S, S)).astype(np.float32), "normals": normals,
            "masks": (rng.random((len(MASK_NAMES), S, S)) > 0.8).astype(np.float32),
            "valid": np.ones((S, S), bool)}


def meta(key: str, version: str | None = None) -> dict:
    from realtime.spec import PREPROCESSING_VERSION
    return {"version": version or PREPROCESSING_VERSION, "key": key, "dataset": "synthetic", "subject": "syn000",
            "expression": "neutral", "intensity": 0.0, "view": 0, "pose": np.zeros(6), "split": "train",
            "source": key, "take": 0}


def test_cache_samples_become_exactly_the_runtime_feeds(tmp_path):
    samples = [cache_arrays(i) for i in range(3)]
    for i, arrays in enumerate(samples):
        save_sample(tmp_path / f"s{i}.npz", arrays, meta(f"s{i}"))
    save_sample(tmp_path / "old.npz", cache_arrays(9), meta("old", version="canon0-old"))
    feeds = collect_samples(tmp_path, default_input_shapes())
    expected = arrays_to_feeds(samples)  # the other version's sample is skipped
    for name, array in expected.items():
        np.testing.assert_array_equal(feeds[name], array)


def test_a_recording_runs_through_landmarks_and_canonical_maps(tmp_path):
    from realtime.demo_clip import DEFAULT_DEMO_CLIP
    if not DEFAULT_DEMO_CLIP.exists():
        pytest.skip(f"{DEFAULT_DEMO_CLIP} is not in this checkout (python -m train.make_demo_clip)")
    clip = DemoClip.load(DEFAULT_DEMO_CLIP)
    short = write_demo_clip(tmp_path / "short.npz", [clip.frame(i) for i in range(9)], fps=clip.fps)
    feeds = samples_from_recording(short, max_samples=2, every=3)
    assert feeds["texture"].shape == (2, 3, S, S) and feeds["masks"].shape == (2, len(MASK_NAMES), S, S)
    assert feeds["masks"].reshape(2, len(MASK_NAMES), -1).max(axis=2).min() == 1.0  # every region found


def test_a_recording_without_faces_is_one_clear_error(tmp_path):
    from realtime.frames import RGBDFrame
    from calib.camera import D4XX_COLOR_640x480 as intr
    blank = [RGBDFrame(np.full((480, 640, 3), 90, np.uint8), np.full((480, 640), 600, np.uint16), 0.001, intr,
                       timestamp_ms=33.3 * (i + 1)) for i in range(3)]
    clip = write_demo_clip(tmp_path / "blank.npz", blank, fps=30.0)
    with pytest.raises(CalibrationDataError, match="no face"):
        samples_from_recording(clip, max_samples=4, every=1)
