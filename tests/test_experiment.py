"""python -m train end to end on BU-3DFE-format files, and the fold planning it relies on."""

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ict_scans import write_ict_bu3dfe  # noqa: E402

from realtime.spec import BASIC_SIX, EXPRESSIONS, PREPROCESSING_VERSION  # noqa: E402
from train.cache import CacheEntry  # noqa: E402
from train.checkpoint import load_checkpoint  # noqa: E402
from train.datasets.sources import make_source  # noqa: E402
from train.experiment import (  # noqa: E402
    ExperimentError,
    ExperimentOptions,
    ExperimentRunner,
    main,
    plan_final,
    plan_folds,
)
from train.preprocess import PreprocessOptions, Preprocessor  # noqa: E402
from train.train import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("F0001", "M0001", "F0002")
TINY = ["--width", "0.125", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """P1's 12 samples (six expressions x levels 3, 4) of three subjects, preprocessed (one view each)."""
    root = tmp_path_factory.mktemp("bu3dfe")
    write_ict_bu3dfe(root, SUBJECTS, [(e, level) for e in BASIC_SIX for level in (3, 4)])
    write_ict_bu3dfe(root, ("F0001",), [("neutral", 0)], seed=9)  # not a P1 sample: must be left out
    out = tmp_path_factory.mktemp("cache")
    with Preprocessor(PreprocessOptions(out, workers=1, sheet_samples=0, progress=False)) as pre:
        result = pre.process(make_source("bu3dfe", root))
    assert result.count("ok") == 37, result.report()
    return out


@pytest.fixture(scope="module")
def cv_run(cache, tmp_path_factory):
    """``python -m train`` in its own process: P1, three folds (leave one subject out), tiny model."""
    run_dir = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "train", "--dataset", "bu3dfe", "--cache", str(cache), "--protocol", "P1",
           "--folds", "3", "--out", str(run_dir), *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout, json.loads((run_dir / "results.json").read_text())


def test_cross_validation_writes_sane_results(cv_run):
    run_dir, stdout, results = cv_run
    assert results["mode"] == "cross_validation" and results["config"]["protocol"] == "bu3dfe_p1"
    assert results["preprocessing_version"] == PREPROCESSING_VERSION
    assert results["classes"] == list(BASIC_SIX)  # P1 scores the six basic expressions
    assert len(results["folds"]) == 3
    for fold in results["folds"]:
        assert fold["sizes"] == {"train": 12, "val": 12, "test": 12}  # one subject each (neutral left out)
        test = fold["test"]
        assert 0.0 <= test["accuracy"] <= 1.0 and test["samples"] == 12
        assert np.array(test["confusion"]).sum() == 12
        assert fold["best_epoch"] == 1
        assert Path(fold["checkpoint"]).name == "best.pt" and Path(fold["checkpoint"]).is_file()
        assert not (Path(fold["checkpoint"]).parent / "last.pt").exists()  # --keep best (the default)
    confusion = np.array(results["confusion"])
    assert confusion.shape == (6, 6) and confusion.sum() == 36 and (confusion.sum(axis=1) == 6).all()
    accuracies = [f["test"]["accuracy"] for f in results["folds"]]
    assert results["accuracy"]["folds"]["mean"] == pytest.approx(np.mean(accuracies))
    assert results["accuracy"]["folds"]["std"] == pytest.approx(np.std(accuracies))
    assert results["accuracy"]["pooled"] == pytest.approx(np.trace(confusion) / 36)
    assert set(results["per_class_accuracy"]) == set(BASIC_SIX)
    png = cv2.imread(str(run_dir / "confusion.png"))
    assert png is not None and min(png.shape[:2]) > 300
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy ") and " ± " in last and "over 3 folds" in last
    assert "only 3 eligible subjects" in stdout  # the protocol's small-set warning is shown


def test_no_subject_is_in_train_and_test_of_any_fold_run(cv_run):
    _, _, results = cv_run
    tested = []
    for fold in results["folds"]:
        parts = {k: set(v) for k, v in fold["subjects"].items()}
        assert parts["train"] and parts["val"] and parts["test"]
        assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
        assert not parts["train"] & parts["val"]
        tested += sorted(parts["test"])
    assert sorted(tested) == sorted(SUBJECTS)  # every subject tested exactly once per repeat


def fake_entries(subjects: int, views: int) -> list[CacheEntry]:
    """Cache metadata of a BU-3DFE-like set (no files): 25 scans per subject, ``views`` views each."""
    entries = []
    codes = [("neutral", 0)] + [(e, level) for e in BASIC_SIX for level in (1, 2, 3, 4)]
    for s, (expression, level), v in product(range(subjects), codes, range(views)):
        subject = f"F{s:04d}"
        source = f"/data/{subject}/{subject}_{expression}{level}_F3D.wrl"
        entries.append(CacheEntry(Path(f"{source}_{v}.npz"), f"bu3dfe/{subject}/{expression}{level}_v{v}", "bu3dfe",
                                  subject, expression, float(level), v, (0.0,) * 6, "", source))
    return entries


@pytest.mark.parametrize("protocol", ["bu3dfe_p1", "bu3dfe_p2"])
def test_fold_plans_keep_subjects_and_views_apart(protocol):
    entries = fake_entries(subjects=66, views=3)
    plans = plan_folds(entries, protocol, folds=10, repeats=2, seed=1, val_fraction=0.1)
    assert len(plans) == 20
    for repeat in (0, 1):
        tested_scans = []
        for plan in [p for p in plans if p.repeat == repeat]:
            parts = plan.subjects(entries)
            assert not set(parts["train"]) & set(parts["test"]) and not set(parts["val"]) & set(parts["test"])
            assert not set(parts["train"]) & set(parts["val"])
            assert len(parts["test"]) == 6 and len(parts["val"]) == 5 and len(parts["train"]) == 49
            assert all(entries[i].view == 0 for i in plan.test + plan.val)  # each test scan once: its view 0
            assert {entries[i].view for i in plan.train} == {0, 1, 2}  # every view of a train scan trains
            assert all(entries[i].intensity in (3.0, 4.0) and entries[i].expression in BASIC_SIX
                       for i in plan.train + plan.val + plan.test)
            assert len(plan.train) == 49 * 12 * 3 and len(plan.test) == 6 * 12
            tested_scans += [entries[i].source for i in plan.test]
        assert len(tested_scans) == len(set(tested_scans)) == 60 * 12  # every protocol scan tested once
    all_views = plan_folds(entries, protocol, folds=10, seed=1, test_views="all", max_folds=2)
    assert len(all_views) == 2 and len(all_views[0].test) == 6 * 12 * 3


def test_final_plan_uses_the_synthetic_identity_splits():
    entries = [CacheEntry(Path(f"{i}.npz"), f"synthetic/syn{i // 7:03d}/{i}_v0", "synthetic", f"syn{i // 7:03d}",
                          EXPRESSIONS[i % 7], 0.5, 0, (0.0,) * 6, ("train", "train", "val", "test")[(i // 7) % 4],
                          f"syn{i // 7:03d}/{i}") for i in range(7 * 8)]
    plan = plan_final(entries, "synthetic")
    split_of = {p: {entries[i].split for i in getattr(plan, p)} for p in ("train", "val", "test")}
    assert split_of == {"train": {"train"}, "val": {"val"}, "test": {"test"}}
    assert len(plan.train) + len(plan.val) + len(plan.test) == len(entries)
    scans = plan_final(fake_entries(subjects=10, views=2), "bu3dfe_p1", val_fraction=0.2)
    parts = scans.subjects(fake_entries(subjects=10, views=2))
    assert len(parts["val"]) == 2 and len(parts["train"]) == 8 and not parts["test"]


def test_final_model_is_saved_and_loads(cache, tmp_path):
    options = ExperimentOptions(dataset="bu3dfe", cache_dir=cache, out_dir=tmp_path, protocol="P1", final=True,
                                model_overrides={"width": 0.125},
                                train=TrainConfig(epochs=1, batch_size=8, device="cpu", progress=False))
    with ExperimentRunner(options) as runner:
        result = runner.process()
    assert result.folds[0].val is not None and result.folds[0].test is None  # scans: val subjects, no test set
    model, info = load_checkpoint(tmp_path / "final.pt", classes=BASIC_SIX,
                                  preprocessing_version=PREPROCESSING_VERSION)
    assert info.extra["dataset"] == "bu3dfe" and info.config.width == 0.125
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "final" and len(results["folds"][0]["subjects"]["val"]) == 1
    assert (tmp_path / "confusion.png").is_file()


def test_misuse_gives_one_line_errors(tmp_path, capsys):
    with pytest.raises(ExperimentError, match="defined on bu3dfe"):
        ExperimentOptions(dataset="bosphorus", cache_dir=tmp_path, out_dir=tmp_path, protocol="P1")
    with pytest.raises(ExperimentError, match="val_fraction"):
        ExperimentOptions(dataset="bu3dfe", cache_dir=tmp_path, out_dir=tmp_path, val_fraction=1.0)
    assert ExperimentOptions(dataset="synthetic", cache_dir=tmp_path, out_dir=tmp_path).protocol == "synthetic"
    assert main(["--dataset", "bu3dfe", "--cache", str(tmp_path / "empty"), "--out", str(tmp_path / "run"),
                 *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cached bu3dfe samples" in err and "python -m train.preprocess" in err
    assert main(["--dataset", "bu3dfe", "--cache", str(tmp_path), "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err
