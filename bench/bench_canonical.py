#!/usr/bin/env python3
"""Speed of the canonical-face stage (and of the scan preprocessing around it) on this machine.

Renders ICT heads at random poses with D4xx-like depth, finds their landmarks once, then times
``Canonicalizer.process`` per face (median / p90 over all runs, and per step). With
``--preprocess`` it also times the whole scan preprocessing chain the training set uses
(render + FaceMesh + canonical + feeds) in scans per second.

Usage:
    python bench/bench_canonical.py                     # 12 scans x 30 repeats
    python bench/bench_canonical.py --scans 30 --repeats 50 --preprocess
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realtime.canonical import Canonicalizer  # noqa: E402
from realtime.landmarks import LandmarkDetector, LandmarkOptions  # noqa: E402
from realtime.model_inputs import make_feeds  # noqa: E402
from train.face_model import EXPRESSION_TABLE, FaceModel, expression_weights  # noqa: E402
from train.render import RenderOptions, RenderPose, ScanRenderer  # noqa: E402


def random_pose(rng: np.random.Generator) -> RenderPose:
    return RenderPose(yaw=rng.uniform(-35, 35), pitch=rng.uniform(-15, 15), roll=rng.uniform(-10, 10),
                      distance_mm=rng.uniform(450, 900), offset_mm=(rng.uniform(-60, 60), rng.uniform(-40, 40)))


def stats(values_ms: list[float]) -> str:
    v = np.asarray(values_ms)
    return f"median {np.median(v):6.3f} ms   p90 {np.percentile(v, 90):6.3f} ms   (n={len(v)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=12, help="rendered test faces")
    parser.add_argument("--repeats", type=int, default=30, help="canonicalisations per face")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preprocess", action="store_true", help="also time render + landmarks + canonical")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    model = FaceModel.load()
    names = list(EXPRESSION_TABLE)
    cases = []
    with ScanRenderer(RenderOptions(seed=args.seed)) as renderer, \
            LandmarkDetector(LandmarkOptions(static_image_mode=True)) as detector:
        texture = model.procedural_texture(rng)
        for i in range(args.scans):
            mesh = model.mesh(model.random_identity(rng), expression_weights(names[i % len(names)], 1.0, rng), texture)
            frame = renderer.process(mesh, random_pose(rng)).frame
            faces = detector.process(frame)
            if faces:
                cases.append((frame, faces[0]))
    print(f"{len(cases)} of {args.scans} rendered faces have landmarks")

    totals, steps, statuses = [], {}, {}
    with Canonicalizer() as canon:
        canon.timing = True
        for frame, landmarks in cases:
            canon.process(frame, landmarks)  # warm caches
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = canon.process(frame, landmarks)
                totals.append((time.perf_counter() - start) * 1000.0)
                for step, ms in result.timings_ms.items():
                    steps.setdefault(step, []).append(ms)
            statuses[result.status] = statuses.get(result.status, 0) + 1
    print(f"statuses: {statuses}")
    print(f"canonical per face      {stats(totals)}")
    for step, values in steps.items():
        print(f"  {step:<21} {stats(values)}")

    if args.preprocess:
        start, done = time.perf_counter(), 0
        with ScanRenderer(RenderOptions(seed=args.seed)) as renderer, \
                LandmarkDetector(LandmarkOptions(static_image_mode=True)) as detector, Canonicalizer() as canon:
            mesh = model.mesh(model.random_identity(rng), None, texture)
            for _ in range(args.scans):
                frame = renderer.process(mesh, random_pose(rng)).frame
                faces = detector.process(frame)
                result = canon.process(frame, faces[0]) if faces else None
                if result is not None and result.ok:
                    make_feeds([result.face])
                    done += 1
        elapsed = time.perf_counter() - start
        print(f"preprocess (render + FaceMesh + canonical + feeds, one mesh): {args.scans / elapsed:.1f} scans/s "
              f"({done} ok)")


if __name__ == "__main__":
    main()
