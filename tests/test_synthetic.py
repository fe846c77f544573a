"""The synthetic ICT-FaceKit set: deterministic records, disjoint identity splits, reproducible samples."""

import json
from collections import Counter

import numpy as np
import pytest

from realtime.spec import EXPRESSIONS
from train.cache import load_arrays, read_entry, scan_cache
from train.datasets.scan import IndexResult
from train.datasets.sources import SyntheticSource
from train.datasets.synthetic import (
    SyntheticFaces,
    SyntheticOptions,
    identity_splits,
    synthetic_record,
    synthetic_records,
)
from train.preprocess import PreprocessOptions, Preprocessor, main
from train.protocols import make_folds


def test_records_are_deterministic_given_the_seed():
    options = SyntheticOptions(identities=5, samples_per_identity_expression=2, seed=3)
    first, again = synthetic_records(options), synthetic_records(options)
    assert first == again
    # record i depends on (seed, i) only: made alone, in another order, it is the same
    assert [synthetic_record(options, i) for i in (17, 3, 60)] == [first[17], first[3], first[60]]
    other = synthetic_records(SyntheticOptions(identities=5, samples_per_identity_expression=2, seed=4))
    assert [r.yaw for r in other] != [r.yaw for r in first]
    # a bigger set extends the smaller one's identities without changing their records
    bigger = synthetic_records(SyntheticOptions(identities=6, samples_per_identity_expression=2, seed=3))
    assert [(r.yaw, r.strength, r.render_seed) for r in bigger[:70]] == \
        [(r.yaw, r.strength, r.render_seed) for r in first]


def test_every_identity_shows_every_class_within_the_ranges():
    options = SyntheticOptions(identities=4, samples_per_identity_expression=3, seed=0)
    records = synthetic_records(options)
    assert len(records) == options.num_records == 4 * 7 * 3
    assert sorted({r.subject for r in records}) == ["syn000", "syn001", "syn002", "syn003"]
    counts = Counter((r.subject, r.expression) for r in records)
    assert set(counts.values()) == {3} and len(counts) == 4 * len(EXPRESSIONS)
    for r in records:
        assert abs(r.yaw) <= 35 and abs(r.pitch) <= 20 and abs(r.roll) <= 12
        assert 450 <= r.distance_mm <= 900
        assert (r.strength == 0.0) if r.expression == "neutral" else (0.4 <= r.strength <= 1.0)
        assert np.isclose(np.linalg.norm(r.light_direction), 1.0) and r.light_direction[2] < 0
    assert len({r.path for r in records}) == len(records)  # unique names: unique cache keys
    assert np.std([r.yaw for r in records]) > 10  # really varied, not all frontal


def test_identity_splits_are_disjoint_and_cover_every_identity():
    options = SyntheticOptions(identities=20, seed=1, val_fraction=0.15, test_fraction=0.2)
    splits = identity_splits(options)
    assert len(splits) == 20
    groups = {name: {s for s, v in splits.items() if v == name} for name in ("train", "val", "test")}
    assert (len(groups["test"]), len(groups["val"]), len(groups["train"])) == (4, 3, 13)
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    assert identity_splits(options) == splits
    records = synthetic_records(SyntheticOptions(identities=20, samples_per_identity_expression=1, seed=1,
                                                 val_fraction=0.15, test_fraction=0.2))
    assert all(r.split == splits[r.subject] for r in records)
    # tiny sets still hold one identity out for each (and keep one for training)
    tiny = identity_splits(SyntheticOptions(identities=3))
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_synthetic_records_give_subject_independent_folds():
    records = synthetic_records(SyntheticOptions(identities=6, samples_per_identity_expression=1))
    for fold in make_folds(records, "synthetic", folds=3):
        train = {records[i].subject for i in fold.train_idx}
        test = {records[i].subject for i in fold.test_idx}
        assert train and test and not train & test


@pytest.mark.parametrize("changes", [dict(identities=0), dict(classes=("joy",)), dict(distance_mm=(900, 450)),
                                     dict(val_fraction=0.6, test_fraction=0.5)])
def test_bad_options_raise(changes):
    with pytest.raises(ValueError, match="SyntheticOptions"):
        SyntheticOptions(**changes)


def test_meshes_are_the_same_whatever_builds_them():
    options = SyntheticOptions(identities=2, samples_per_identity_expression=1, seed=5)
    records = synthetic_records(options)
    with SyntheticFaces(options) as a:
        mesh_a = a.process(records[9])
        neutral = a.process(records[7])  # identity 1, neutral
    with SyntheticFaces(options, cache_identities=1) as b:
        b.process(records[0])  # another identity first: the cache must not matter
        mesh_b = b.process(records[9])
    assert np.array_equal(mesh_a.vertices, mesh_b.vertices)
    assert np.array_equal(mesh_a.texture, mesh_b.texture)
    assert not np.array_equal(mesh_a.vertices, neutral.vertices)  # the expression moved the face
    source = SyntheticSource(options)
    (view,) = source.views(records[9])
    assert view.key == f"synthetic/{records[9].subject}/{records[9].path.name}_v0"
    assert view.split == records[9].split and view.pose.yaw == records[9].yaw
    assert dict(view.render_changes)["light_direction"] == records[9].light_direction


def test_preprocess_synthetic_reports_detection_and_is_reproducible(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--identities", "3", "--per-class", "1", "--seed", "2", "--workers", "1",
            "--limit", "8", "--sheet", "2"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--root", "/ignored/for/synthetic"]) == 0
    printed = capsys.readouterr().out
    assert "FaceMesh found a face in" in printed
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["facemesh_frames"] == 8 and summary["facemesh_detected"] >= 7
    assert summary["facemesh_detection_rate"] == summary["facemesh_detected"] / 8
    assert summary["processed"] + summary["skipped"] == 8
    assert sum(summary["per_split"].values()) == summary["processed"]
    index = scan_cache(tmp_path / "a")
    assert len(index.entries) == summary["processed"] and not index.errors
    splits = identity_splits(SyntheticOptions(identities=3, seed=2))
    assert all(e.split == splits[e.subject] and e.dataset == "synthetic" for e in index.entries)

    # the same records made in another run, in reverse order, in another process state: equal arrays
    class Reversed(SyntheticSource):
        def index(self) -> IndexResult:
            return IndexResult(tmp_path, list(reversed(super().index().records[:8])))

    source = Reversed(SyntheticOptions(identities=3, samples_per_identity_expression=1, seed=2))
    with Preprocessor(PreprocessOptions(tmp_path / "b", workers=1, sheet_samples=0, progress=False)) as pre:
        pre.process(source)
    for entry in index.entries[:3]:
        other = tmp_path / "b" / entry.path.relative_to(tmp_path / "a")
        assert read_entry(other).pose == entry.pose
        a, b = load_arrays(entry.path), load_arrays(other)
        assert all(np.array_equal(a[k], b[k]) for k in a)
