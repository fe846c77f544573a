"""Preprocessing CLI and cache on a tiny BU-3DFE-format data set of ICT faces, with bad scans in it."""

import contextlib
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ict_scans import write_ict_bu3dfe  # noqa: E402
from scan_fixtures import write_bosphorus_scan, write_bu3dfe_scan  # noqa: E402

from realtime.model_inputs import arrays_to_feeds, flip_arrays  # noqa: E402
from realtime.spec import EXPRESSIONS, PREPROCESSING_VERSION  # noqa: E402
from train.cache import (  # noqa: E402
    CachedDataset,
    CacheError,
    CacheWarning,
    cache_root,
    load_arrays,
    read_entry,
    save_sample,
    scan_cache,
)
from train.datasets.sources import PoseJitter, ScanSource, make_source  # noqa: E402
from train.preprocess import PreprocessOptions, Preprocessor, main  # noqa: E402

VIEWS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 ICT subjects x 2 samples, a dome 'face' FaceMesh cannot find, a truncated mesh, a bad name."""
    root = tmp_path_factory.mktemp("bu3dfe")
    write_ict_bu3dfe(root, subjects=("F0001", "M0001"), samples=[("anger", 3), ("happiness", 4)])
    write_bu3dfe_scan(root / "F0003", "F0003_SA03WH")  # a valid file, but no face to MediaPipe
    write_bu3dfe_scan(root / "F0004", "F0004_SU04WH", broken="truncated")
    write_bu3dfe_scan(root / "F0005", "F0005_SU04WH")
    (root / "F0005" / "F0005_SU04WH_F3D.wrl").rename(root / "F0005" / "F0005_XX04WH_F3D.wrl")  # unknown code
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """One CLI run over the data set; returns (out folder, printed text, summary dict)."""
    out = tmp_path_factory.mktemp("cache")
    argv = ["--dataset", "bu3dfe", "--root", str(dataset), "--out", str(out), "--views", str(VIEWS),
            "--workers", "1", "--seed", "0"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # capsys is per test, this run per module
        rc = main(argv)
    printed = printed.getvalue()
    assert rc == 0, printed
    return out, printed, json.loads((out / "summary.json").read_text())


def copy_of(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def test_summary_lists_processed_skipped_and_expressions(run):
    out, printed, summary = run
    assert summary["version"] == PREPROCESSING_VERSION
    assert summary["records"] == 4 + 2  # the ICT scans, the dome and the truncated mesh (the bad name: index)
    assert summary["processed"] == 4 * VIEWS and summary["cached"] == 0
    assert summary["per_expression"] == {"anger": 2 * VIEWS, "happiness": 2 * VIEWS}
    assert summary["skipped_by_stage"] == {"index": 1, "load": VIEWS, "no_face": VIEWS}
    assert summary["facemesh_frames"] == 5 * VIEWS and summary["facemesh_detected"] == 4 * VIEWS
    groups = summary["skipped_groups"]
    assert any(g.startswith("load: truncated") for g in groups)
    assert groups["no_face: FaceMesh found no face"] == [f"bu3dfe/F0003/F0003_SA03WH_F3D_v{v}" for v in range(VIEWS)]
    assert any("unknown expression code 'XX'" in g for g in groups)
    lines = summary["skipped_samples"]
    assert len(lines) == 1 + 2 * VIEWS and all("\n" not in line for line in lines)
    assert any("F0004_SU04WH_F3D.wrl: truncated" in line for line in lines)  # the bad file is named
    assert "skipped 2 x no_face: FaceMesh found no face" in printed
    assert f"new {4 * VIEWS}, cached 0, skipped {1 + 2 * VIEWS}" in printed


def test_contact_sheet_shows_every_sample(run):
    out, _, _ = run
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None
    assert sheet.shape == (22 + 4 * VIEWS * (22 + 224), 4 * 224, 3)  # header + (label + 2x tiles) per sample
    assert sheet[22 + 22:22 + 22 + 224, :224].std() > 10  # the first texture tile is an image, not blank


def test_cache_files_hold_the_maps_and_the_labels(run):
    out, _, _ = run
    index = scan_cache(out)
    assert index.root == cache_root(out) and not index.errors and not index.other_versions
    assert len(index.entries) == 4 * VIEWS
    for entry in index.entries:
        assert entry.dataset == "bu3dfe" and entry.subject in ("F0001", "M0001")
        assert entry.intensity == {"anger": 3.0, "happiness": 4.0}[entry.expression]
        assert entry.source.endswith("_F3D.wrl") and entry.view in range(VIEWS)
        assert entry.path == cache_root(out) / f"{entry.key}.npz"
        if entry.view == 0:
            assert entry.pose == (0.0, 0.0, 0.0, 600.0, 0.0, 0.0)  # frontal at the middle distance
        else:
            assert 0 < max(abs(a) for a in entry.pose[:3]) and 500 <= entry.pose[3] <= 700
    arrays = load_arrays(index.entries[0].path)
    assert arrays["texture"].shape == (112, 112, 3) and arrays["texture"].dtype == np.uint8
    assert arrays["normals"].shape == (3, 112, 112) and arrays["masks"].shape == (6, 112, 112)
    assert arrays["valid"].mean() > 0.3


def test_cached_dataset_items_use_the_runtime_normalisation(run):
    out, _, _ = run
    dataset = CachedDataset(out)
    assert len(dataset) == 4 * VIEWS
    item = dataset[3]
    feeds = arrays_to_feeds([load_arrays(dataset.entries[3].path)])
    for key, shape in (("texture", (3, 112, 112)), ("geometry", (4, 112, 112)), ("masks", (6, 112, 112))):
        assert item[key].dtype == torch.float32 and tuple(item[key].shape) == shape
        assert np.array_equal(item[key].numpy(), feeds[key][0])
    assert item["label"].item() == EXPRESSIONS.index(dataset.entries[3].expression)
    assert item["subject"] == dataset.entries[3].subject
    records = dataset.records
    assert {r.intensity for r in records} == {3, 4} and all(r.path.suffix == ".wrl" for r in records)
    six = CachedDataset(out, class_names=EXPRESSIONS[1:], in_memory=True)  # labels follow the given classes
    assert six[3]["label"].item() == EXPRESSIONS.index(dataset.entries[3].expression) - 1
    assert np.array_equal(six[3]["geometry"].numpy(), item["geometry"].numpy())
    assert len(six.subset([1, 5])) == 2 and six.subset([1, 5])[1]["subject"] == six[5]["subject"]
    with pytest.raises(ValueError, match="not in the classes"):
        CachedDataset(out, class_names=("neutral", "sadness"))
    flipped = CachedDataset(out, augment=True, seed=1)
    original = dataset[0]["texture"].numpy()
    mirror = arrays_to_feeds([flip_arrays(load_arrays(dataset.entries[0].path))])["texture"][0]
    kinds = set()
    for _ in range(12):
        texture = flipped[0]["texture"].numpy()
        kinds.add("same" if np.array_equal(texture, original) else "flip" if np.array_equal(texture, mirror)
                  else "other")
    assert kinds == {"same", "flip"}


def test_rerun_skips_cached_samples(run, dataset, capsys):
    out, _, _ = run
    before = {p: p.stat().st_mtime_ns for p in cache_root(out).rglob("*.npz")}
    assert main(["--dataset", "bu3dfe", "--root", str(dataset), "--out", str(out), "--views", str(VIEWS),
                 "--workers", "1", "--sheet", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == 0 and summary["cached"] == 4 * VIEWS
    assert summary["per_expression"] == {"anger": 2 * VIEWS, "happiness": 2 * VIEWS}
    assert {p: p.stat().st_mtime_ns for p in cache_root(out).rglob("*.npz")} == before
    assert "cached 8" in capsys.readouterr().out


def test_a_cache_of_another_version_is_never_used(run, tmp_path):
    out = copy_of(run[0], tmp_path)
    sample = next(cache_root(out).rglob("*.npz"))
    arrays, entry = load_arrays(sample), read_entry(sample)
    meta = {"version": "canon0-old-version", "key": entry.key, "dataset": entry.dataset, "subject": entry.subject,
            "expression": entry.expression, "intensity": entry.intensity, "view": entry.view,
            "pose": np.array(entry.pose), "split": entry.split, "source": entry.source, "take": entry.take}
    old = out / "canon0-old-version" / f"{entry.key}.npz"  # a cache made by another version, beside this one
    save_sample(old, arrays, meta)
    save_sample(sample, arrays, meta)  # and one of its files copied by hand into this version's folder
    index = scan_cache(out)
    assert index.other_versions == {"canon0-old-version": 1}
    assert len(index.entries) == 4 * VIEWS - 1
    assert index.errors == [(sample, f"made by preprocessing 'canon0-old-version', current is "
                                     f"'{PREPROCESSING_VERSION}'")]
    assert "not used (other preprocessing versions): canon0-old-version (1 files)" in index.summary()
    with pytest.raises(CacheError, match="made by preprocessing"):
        read_entry(sample)
    assert read_entry(old, version="canon0-old-version").key == entry.key  # readable only as what it is


def test_corrupt_cache_file_is_reported_skipped_and_remade(run, dataset, tmp_path):
    out = copy_of(run[0], tmp_path)
    paths = sorted(cache_root(out).rglob("*.npz"))
    bad = paths[2]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: no zip directory
    index = scan_cache(out)
    assert len(index.entries) == len(paths) - 1
    assert [p for p, _ in index.errors] == [bad]
    message = str(CacheError(*index.errors[0]))
    assert message.startswith(str(bad)) and "\n" not in message and "not a readable cache file" in message
    with pytest.warns(CacheWarning, match=str(bad.name)):
        dataset_from_paths = CachedDataset(paths)
    assert len(dataset_from_paths) == len(paths) - 1 and dataset_from_paths.skipped[0][0] == bad
    source = make_source("bu3dfe", dataset, views=VIEWS, seed=0)
    with Preprocessor(PreprocessOptions(out, workers=1, sheet_samples=0, progress=False)) as pre:
        result = pre.process(source)
    assert result.count("ok") == 1 and result.count("cached") == len(paths) - 1  # only the damaged one is redone
    assert not scan_cache(out).errors


def test_two_workers_give_the_same_samples_as_one(run, dataset, tmp_path):
    out = run[0]
    source = make_source("bu3dfe", dataset, views=1, seed=0)
    with Preprocessor(PreprocessOptions(tmp_path, workers=2, limit=2, sheet_samples=0, progress=False)) as pre:
        result = pre.process(source)
    assert result.count("ok") == 2 and result.records_done == 2
    for entry in scan_cache(tmp_path).entries:
        reference = cache_root(out) / f"{entry.key}.npz"
        a, b = load_arrays(entry.path), load_arrays(reference)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bosphorus_files_go_through_the_same_chain(tmp_path):
    root = tmp_path / "bosphorus"
    write_bosphorus_scan(root / "bs000", "bs000_E_HAPPY_0")  # a dome, not a face: FaceMesh finds none
    write_bosphorus_scan(root / "bs001", "bs001_E_ANGER_0", broken="nan")
    write_bosphorus_scan(root / "bs001", "bs001_LFAU_9_0")  # an action unit: not an expression sample
    with Preprocessor(PreprocessOptions(tmp_path / "out", workers=1, progress=False)) as pre:
        result = pre.process(make_source("bosphorus", root))
    assert [(o.key, o.status) for o in result.outcomes] == [("bosphorus/bs000/bs000_E_HAPPY_0_v0", "no_face"),
                                                            ("bosphorus/bs001/bs001_E_ANGER_0_v0", "load")]
    assert "NaN" in result.outcomes[1].message and result.outcomes[1].message.count("\n") == 0
    assert result.to_dict()["skipped_by_stage"] == {"no_face": 1, "load": 1}
    assert not (tmp_path / "out" / "contact_sheet.png").exists()  # nothing usable: no sheet


def test_views_are_frontal_first_then_jittered_and_reproducible(dataset):
    source = ScanSource("bu3dfe", dataset, views_per_scan=4, seed=7, jitter=PoseJitter(yaw_deg=10))
    record = source.index().records[0]
    views = source.views(record)
    assert [v.view for v in views] == [0, 1, 2, 3]
    assert (views[0].pose.yaw, views[0].pose.pitch, views[0].pose.distance_mm) == (0.0, 0.0, 600.0)
    assert all(abs(v.pose.yaw) <= 10 and 500 <= v.pose.distance_mm <= 700 for v in views)
    assert len({v.pose.yaw for v in views[1:]}) == 3 and len({v.render_seed for v in views}) == 4
    assert source.views(record) == views
    assert ScanSource("bu3dfe", dataset, views_per_scan=4, seed=8).views(record)[1].pose != views[1].pose


def test_misuse_and_bad_roots(tmp_path, capsys):
    with pytest.raises(ValueError, match="--root"):
        make_source("bu3dfe")
    with pytest.raises(ValueError, match="unknown data set"):
        make_source("affectnet", tmp_path)
    with pytest.raises(ValueError, match="workers"):
        PreprocessOptions(tmp_path, workers=0)
    assert main(["--dataset", "bosphorus", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "not a folder" in err
    os.makedirs(tmp_path / "empty")
    assert main(["--dataset", "bosphorus", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                 "--workers", "1"]) == 1  # ran, but nothing usable: a failing exit status
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty cache is not an error, just empty
        assert len(CachedDataset(tmp_path / "o")) == 0
