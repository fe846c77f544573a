"""Subject-independent folds: no subject on both sides, every sample tested once, P1 fixed, P2 redrawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from realtime.spec import BASIC_SIX
from train.datasets.scan import ScanRecord
from train.protocols import PROTOCOL_SUBJECTS, ProtocolWarning, eligible_samples, make_folds


def _bu3dfe(subjects: list[str]) -> list[ScanRecord]:
    """Records of a full BU-3DFE layout (neutral + 6 expressions x 4 intensities), no files needed."""
    records = []
    for s in subjects:
        records.append(ScanRecord("bu3dfe", s, "neutral", 0, Path(f"{s}/{s}_NE00WH_F3D.wrl"), Path("t.bmp")))
        for e in BASIC_SIX:
            for i in range(1, 5):
                records.append(ScanRecord("bu3dfe", s, e, i, Path(f"{s}/{s}_{e}{i}_F3D.wrl"), Path("t.bmp")))
    return records


BU_SUBJECTS = [f"F{i:04d}" for i in range(1, 57)] + [f"M{i:04d}" for i in range(1, 45)]


def _bosphorus(complete: int, incomplete: int) -> list[ScanRecord]:
    """``complete`` subjects with all six emotions (some with a second take), ``incomplete`` missing one."""
    records = []
    for n in range(complete + incomplete):
        s = f"bs{n:03d}"
        emotions = BASIC_SIX if n < complete else BASIC_SIX[:-1]
        for e in emotions:
            for take in ((1, 0) if n % 7 == 0 else (0,)):  # second takes listed first: order must not matter
                records.append(ScanRecord("bosphorus", s, e, None, Path(f"{s}/{s}_E_{e}_{take}.bnt"), Path("t.png"),
                                          take=take))
        records.append(ScanRecord("bosphorus", s, "neutral", None, Path(f"{s}/{s}_N_N_0.bnt"), Path("t.png")))
    return records


def _check_partition(records, folds, expected_samples: int, subjects_per_fold: int | None = None) -> set[str]:
    """Asserts subject independence and once-only testing; returns the subjects used."""
    tested = np.concatenate([f.test_idx for f in folds])
    assert len(tested) == len(set(tested.tolist())) == expected_samples  # every sample tested exactly once
    used = set()
    for k, fold in enumerate(folds):
        train_subjects = {records[i].subject for i in fold.train_idx}
        test_subjects = {records[i].subject for i in fold.test_idx}
        assert not train_subjects & test_subjects  # no subject on both sides
        assert test_subjects == set(fold.test_subjects) and fold.fold == k
        assert set(fold.train_idx.tolist()) | set(fold.test_idx.tolist()) == set(tested.tolist())
        if subjects_per_fold is not None:
            assert len(test_subjects) == subjects_per_fold
        used |= test_subjects
    return used


def test_p1_uses_720_samples_of_a_fixed_60_subjects_in_10_folds():
    records = _bu3dfe(BU_SUBJECTS)
    subject_sets, assignments = [], []
    for repeat in range(3):
        folds = make_folds(records, "bu3dfe_p1", folds=10, repeat=repeat, seed=0)
        assert len(folds) == 10 and all(f.repeat == repeat for f in folds)
        subject_sets.append(_check_partition(records, folds, 720, subjects_per_fold=6))
        assert all(len({records[i].subject for i in f.train_idx}) == 54 for f in folds)
        for fold in folds:
            for i in fold.test_idx:
                assert records[i].expression in BASIC_SIX and records[i].intensity in (3, 4)
        assignments.append([f.test_subjects for f in folds])
    assert len(subject_sets[0]) == PROTOCOL_SUBJECTS
    assert subject_sets[0] == subject_sets[1] == subject_sets[2]  # P1: the same subjects every repeat
    assert _check_partition(records, make_folds(records, "bu3dfe_p1", repeat=0, seed=5), 720) == subject_sets[0]
    assert assignments[0] != assignments[1]  # ... in new folds each repeat
    assert {s[0] for s in subject_sets[0]} == {"F", "M"}  # a draw, not the first 60 (almost all F)


def test_fixed_subset_survives_a_missing_subject():
    records = _bu3dfe(BU_SUBJECTS)
    full = {s for f in make_folds(records, "bu3dfe_p1") for s in f.test_subjects}
    gone = sorted(full)[0]
    fewer = [r for r in records if r.subject != gone]
    now = {s for f in make_folds(fewer, "bu3dfe_p1") for s in f.test_subjects}
    assert len(now) == 60 and len(full - now) == 1 and gone not in now  # one replaced, 59 kept


def test_p2_redraws_the_60_subjects_each_repeat():
    records = _bu3dfe(BU_SUBJECTS)
    sets = [_check_partition(records, make_folds(records, "bu3dfe_p2", repeat=r, seed=1), 720, 6) for r in range(3)]
    assert all(len(s) == PROTOCOL_SUBJECTS for s in sets)
    assert sets[0] != sets[1] and sets[1] != sets[2]


def test_folds_are_deterministic_for_a_seed_and_repeat():
    records = _bu3dfe(BU_SUBJECTS)
    a = make_folds(records, "bu3dfe_p2", repeat=4, seed=9)
    b = make_folds(records, "bu3dfe_p2", repeat=4, seed=9)
    for x, y in zip(a, b):
        assert np.array_equal(x.test_idx, y.test_idx) and np.array_equal(x.train_idx, y.train_idx)
    c = make_folds(records, "bu3dfe_p2", repeat=4, seed=10)
    assert [f.test_subjects for f in a] != [f.test_subjects for f in c]


def test_bosphorus_uses_60_complete_subjects_one_sample_per_emotion():
    records = _bosphorus(complete=65, incomplete=5)
    eligible = eligible_samples(records, "bosphorus")
    assert len(eligible) == 65  # derived from the files present, incomplete subjects excluded
    chosen = set()
    for repeat in range(2):
        folds = make_folds(records, "bosphorus", repeat=repeat)
        chosen_now = _check_partition(records, folds, 360, subjects_per_fold=6)
        assert not chosen or chosen_now == chosen  # a fixed subset
        chosen = chosen_now
    assert len(chosen) == 60 and chosen <= set(eligible)
    tested = np.concatenate([f.test_idx for f in folds])
    assert all(records[i].take == 0 and records[i].expression != "neutral" for i in tested)
    per_subject = {s: sorted(records[i].expression for i in tested if records[i].subject == s) for s in chosen}
    assert all(v == sorted(BASIC_SIX) for v in per_subject.values())


def test_other_datasets_records_are_left_out():
    records = _bosphorus(3, 0) + _bu3dfe(BU_SUBJECTS[:70])
    folds = make_folds(records, "bu3dfe_p1")
    assert all(records[i].dataset == "bu3dfe" for f in folds for i in np.concatenate([f.train_idx, f.test_idx]))


def test_small_sets_degrade_with_a_warning():
    records = _bu3dfe(["F0001", "F0002", "M0001"])
    with pytest.warns(ProtocolWarning) as caught:
        folds = make_folds(records, "bu3dfe_p1", folds=10)
    messages = " ".join(str(w.message) for w in caught)
    assert "only 3 eligible subjects" in messages and "using 3 folds" in messages
    assert len(folds) == 3
    _check_partition(records, folds, 36, subjects_per_fold=1)  # leave one subject out


def test_impossible_splits_are_errors():
    with pytest.raises(ValueError, match="1 eligible subject"):
        make_folds(_bu3dfe(["F0001"]), "bu3dfe_p1")
    partial = [r for r in _bu3dfe(["F0001", "F0002"]) if not (r.subject == "F0002" and r.intensity == 4)]
    with pytest.raises(ValueError, match="1 eligible subject"):  # F0002 lacks intensity 04: not eligible
        make_folds(partial, "bu3dfe_p1")
    with pytest.raises(ValueError, match="folds must be >= 2"):
        make_folds(_bu3dfe(BU_SUBJECTS), "bu3dfe_p1", folds=1)
    with pytest.raises(ValueError, match="unknown protocol"):
        make_folds(_bu3dfe(BU_SUBJECTS), "bu3dfe_p3")


def test_synthetic_protocol_holds_out_identities():
    records = [ScanRecord("synthetic", f"id{s:02d}", e, None, Path(f"id{s:02d}_{e}_{k}.npz"), Path("t.png"))
               for s in range(12) for e in BASIC_SIX for k in range(3)]
    for folds_wanted, sizes in ((10, {1, 2}), (4, {3})):
        folds = make_folds(records, "synthetic", folds=folds_wanted, repeat=1)
        assert len(folds) == folds_wanted
        assert _check_partition(records, folds, len(records)) == {f"id{s:02d}" for s in range(12)}
        assert {len(f.test_subjects) for f in folds} == sizes
