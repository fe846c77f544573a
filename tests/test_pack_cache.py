"""The lossy cache pack used to carry training data to a GPU box, and the tools around training runs."""

import json

import cv2
import numpy as np
import pytest

from realtime.canonical import depth_normals
from realtime.model_inputs import arrays_to_feeds
from realtime.spec import MASK_NAMES, SPEC
from train.ablation import table
from train.cache import load_arrays, save_sample, scan_cache
from train.pack_cache import pack, unpack

S = SPEC.size


def canonical_like(seed: int) -> dict[str, np.ndarray]:
    """Maps shaped like the canonical stage's: a face oval with a smooth dome, background outside."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:S, 0:S].astype(np.float32)
    r2 = ((cols - SPEC.nose_col) / 45) ** 2 + ((rows - SPEC.nose_row) / 52) ** 2
    region = r2 < 1
    depth = np.where(region, -60 * r2 + rng.normal(0, 0.3, (S, S)), SPEC.depth_min_mm).astype(np.float32)
    normals = depth_normals(np.where(region, -60 * r2, -60).astype(np.float32), SPEC.mm_per_px, 1.5)
    normals[:, ~region] = np.array([0, 0, 1], np.float32)[:, None]
    texture = cv2.GaussianBlur(rng.integers(60, 200, (S, S, 3)).astype(np.uint8), (0, 0), 2)
    texture[~region] = 0
    masks = np.zeros((len(MASK_NAMES), S, S), np.float32)
    masks[0, 30:40, 65:85] = masks[5, 75:90, 40:72] = 1
    return {"texture": texture, "depth_mm": depth, "normals": normals, "masks": masks, "valid": region.copy()}


def write_cache(root, count: int) -> list[dict]:
    from realtime.spec import PREPROCESSING_VERSION
    samples = []
    for i in range(count):
        arrays = canonical_like(i)
        key = f"synthetic/syn00{i}/s{i}_v0"
        save_sample(root / PREPROCESSING_VERSION / f"{key}.npz", arrays, {
            "version": PREPROCESSING_VERSION, "key": key, "dataset": "synthetic", "subject": f"syn00{i}",
            "expression": "happiness", "intensity": 0.7, "view": 0, "pose": np.arange(6.0),
            "split": "test" if i else "train", "source": key, "take": 0})
        samples.append(arrays)
    return samples


def test_pack_round_trip_keeps_labels_and_the_model_inputs_within_the_documented_loss(tmp_path):
    originals = write_cache(tmp_path / "cache", 3)
    assert pack(tmp_path / "cache", tmp_path / "p.npz") == 3
    assert unpack(tmp_path / "p.npz", tmp_path / "out") == 3
    entries = scan_cache(tmp_path / "out").entries
    assert [e.subject for e in entries] == ["syn000", "syn001", "syn002"]
    assert entries[1].split == "test" and entries[1].pose == tuple(np.arange(6.0))
    for entry, original in zip(entries, originals):
        a, b = arrays_to_feeds([original]), arrays_to_feeds([load_arrays(entry.path)])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        depth_error_mm = np.abs(a["geometry"][:, 0] - b["geometry"][:, 0]).max() * SPEC.depth_scale_mm
        assert depth_error_mm <= 0.26  # half a 0.51 mm step
        assert np.abs(a["geometry"][:, 1:] - b["geometry"][:, 1:]).max() < 0.1  # normals, 8-bit at the oval's edge
        assert np.abs(a["texture"] - b["texture"]).mean() < 0.02  # JPEG quality 90


def test_pack_keeps_only_the_splits_asked_for(tmp_path):
    write_cache(tmp_path / "cache", 3)
    assert pack(tmp_path / "cache", tmp_path / "p.npz", splits=("train",)) == 1


def test_a_damaged_pack_is_one_line(tmp_path):
    write_cache(tmp_path / "cache", 1)
    pack(tmp_path / "cache", tmp_path / "p.npz")
    data = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged pack") as err:
        unpack(tmp_path / "cut.npz", tmp_path / "out")
    assert "\n" not in str(err.value)


def test_ablation_table_lists_unusable_runs_instead_of_dropping_them(tmp_path):
    config = {"name": "afnet_m_rt", "mode": "full", "width": 0.125, "blocks": [1, 1, 1, 1]}
    for seed, accuracy in ((0, 0.8), (1, 0.9)):
        run = tmp_path / f"full_s{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"model_config": config, "accuracy": {"pooled": accuracy}}))
    (tmp_path / "iwc_s0").mkdir()  # crashed before writing results
    text = table(tmp_path)
    assert "| AFNet-M (MA + IWC) | 85.0 ± 5.0 % | 2 |" in text and "runs without results: iwc_s0" in text
