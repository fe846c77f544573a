#!/usr/bin/env python3
"""Preprocessing throughput (scans/s) with 1 and 2 worker processes, in one run.

Each scan goes through the whole chain of ``python -m train.preprocess``: read the scan file,
render it as a D4xx frame (noise and holes on), FaceMesh, canonical maps, compressed cache
file. By default the scans are ICT-FaceKit faces written as BU-3DFE ``_F3D`` files (the test
writer ``tests/ict_scans.py``: ~12.8k vertices, 2.8 MB of VRML, close to a real BU-3DFE scan);
``--root`` measures a real data set instead, ``--dataset synthetic`` the synthetic generator.
Each run prints two rates: over the whole run (start-up included: spawning the workers, FaceMesh
and Open3D set-up, a few seconds that a full data set amortises) and after the first scan
finished (the steady rate a long run approaches).

Usage:
    python bench/bench_preprocess.py                      # 40 generated BU-3DFE-format scans
    python bench/bench_preprocess.py --scans 80
    python bench/bench_preprocess.py --dataset bu3dfe --root /data/BU-3DFE --scans 100
    python bench/bench_preprocess.py --dataset synthetic --scans 60
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from realtime.spec import BASIC_SIX  # noqa: E402
from train.datasets.sources import make_source  # noqa: E402
from train.datasets.synthetic import SyntheticOptions  # noqa: E402
from train.preprocess import PreprocessOptions, Preprocessor  # noqa: E402


def generated_bu3dfe(folder: Path, scans: int) -> Path:
    """``scans`` ICT faces as BU-3DFE files (12 per subject: six expressions x levels 3, 4)."""
    from ict_scans import write_ict_bu3dfe

    subjects = [f"F{k + 1:04d}" for k in range(-(-scans // 12))]
    write_ict_bu3dfe(folder, subjects, [(e, level) for e in BASIC_SIX for level in (3, 4)])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="bu3dfe", choices=("bu3dfe", "bosphorus", "synthetic"))
    parser.add_argument("--root", type=Path, default=None, help="a real data set (default: generated files)")
    parser.add_argument("--scans", type=int, default=40, help="scans per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        if args.dataset == "synthetic":
            per_identity = 7
            source = make_source("synthetic", synthetic=SyntheticOptions(
                identities=-(-args.scans // per_identity), samples_per_identity_expression=1))
            what = "synthetic ICT records"
        else:
            root = args.root
            if root is None:
                if args.dataset != "bu3dfe":
                    parser.error("--root is needed for bosphorus (generated files exist for bu3dfe only)")
                started = time.perf_counter()
                root = generated_bu3dfe(tmp / "scans", args.scans)
                print(f"wrote {args.scans} BU-3DFE-format ICT scans in {time.perf_counter() - started:.1f} s")
            source = make_source(args.dataset, root)
            what = f"{args.dataset} scans from {root}"
        print(f"{what}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs")
        rates = {}
        for workers in args.workers:
            options = PreprocessOptions(tmp / f"out_{workers}", workers=workers, limit=args.scans, sheet_samples=0,
                                        progress=False)
            with Preprocessor(options) as preprocessor:
                result = preprocessor.process(source)
            rates[workers] = (result.records_done / result.seconds, result.steady_scans_per_second or 0.0)
            found, ran = result.detection
            print(f"workers {workers}: {result.records_done} scans in {result.seconds:6.1f} s = "
                  f"{rates[workers][0]:5.2f} scans/s with start-up, {rates[workers][1]:5.2f} scans/s after the "
                  f"first scan (ok {result.count('ok')}, faces {found}/{ran}); load average {os.getloadavg()[0]:.2f}")
        if 1 in rates and len(rates) > 1:
            for workers, (total, steady) in rates.items():
                if workers != 1:
                    print(f"speed-up {workers} workers vs 1: {total / rates[1][0]:.2f}x with start-up, "
                          f"{steady / max(rates[1][1], 1e-9):.2f}x after the first scan")


if __name__ == "__main__":
    main()
