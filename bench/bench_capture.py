#!/usr/bin/env python3
"""Throughput of the capture paths on this machine, all in one run so ratios compare.

Measures, as fast as possible (no pacing), per frame:
  * demo clip decode alone (JPEG + 16-bit PNG),
  * the demo source through rs.software_device + syncer (registered depth: no align),
  * the same with the librealsense post-processing chain (decimation 2 + align back),
  * a D435-like software device (depth in its own geometry, so rs.align does real work),
  * replay of a .db3 recording of the demo source,
  * the CaptureThread handing the demo frames to a consumer (the pipeline's path).

Usage:
    python bench/bench_capture.py                       # a generated 60-frame clip
    python bench/bench_capture.py --clip realtime/assets/demo_clip.npz --frames 120
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.camera import D4XX_COLOR_640x480, CameraIntrinsics, CameraModel, Extrinsics  # noqa: E402
from realtime.capture import (  # noqa: E402
    CaptureOptions, CaptureThread, DemoSource, FrameSource, ReplaySource, SoftwareDeviceSource,
)
from realtime.demo_clip import DemoClip, write_demo_clip  # noqa: E402
from realtime.frames import RGBDFrame  # noqa: E402


def generated_clip(path: Path, n: int) -> Path:
    """A smooth colour gradient and a depth plane with a moving 30 mm bump, 640x480."""
    intr = D4XX_COLOR_640x480
    yy, xx = np.mgrid[0:intr.height, 0:intr.width].astype(np.float32)
    frames = []
    for i in range(n):
        color = np.stack([xx / 640 * 255, yy / 480 * 255, np.full_like(xx, 4 * i % 255)], -1)
        bump = 30.0 * np.exp(-((xx - 320 - 2 * i) ** 2 + (yy - 240) ** 2) / (2 * 70.0**2))
        frames.append(RGBDFrame(color=color.astype(np.uint8), depth=(600 - bump).astype(np.uint16),
                                depth_scale=0.001, intrinsics=intr))
    return write_demo_clip(path, frames, fps=30.0)


def per_frame_ms(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = run()
    return (time.perf_counter() - start) * 1000.0 / count


def read_all(source: FrameSource, n: int) -> int:
    with source:
        for _ in range(n):
            source.read(2000)
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", help="demo clip to use (default: generate one)")
    parser.add_argument("--frames", type=int, default=60, help="frames per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_capture_") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> int:
    clip_path = Path(args.clip) if args.clip else generated_clip(tmp / "clip.npz", args.frames)
    clip = DemoClip.load(clip_path)
    n = min(args.frames, len(clip))
    fast = CaptureOptions(realtime=False)
    recording = tmp / "demo.db3"

    color = clip.frame(0).color
    depth_intr = CameraIntrinsics(640, 480, 385.0, 385.0, 321.0, 238.0)
    d435 = CameraModel(color=clip.camera.color, depth=depth_intr,
                       depth_to_color=Extrinsics(translation=(0.015, 0.0, 0.0)), depth_scale=0.001)
    d435_images = [(color, np.full((480, 640), 800, np.uint16))] * n

    def thread_run() -> int:
        with CaptureThread(DemoSource(clip_path, fast), fast) as capture:
            got = 0
            while capture.get(timeout=5.0) is not None:
                got += 1
        return got

    post = CaptureOptions(realtime=False, post_processing=True, decimation=2)
    record = CaptureOptions(realtime=False, record=str(recording))
    results = {
        "clip decode": per_frame_ms(lambda: sum(1 for i in range(n) if clip.frame(i) is not None)),
        "demo source (no align)": per_frame_ms(lambda: read_all(DemoSource(clip_path, fast), n)),
        "demo + post-processing": per_frame_ms(lambda: read_all(DemoSource(clip_path, post), n)),
        "software device + align": per_frame_ms(lambda: read_all(SoftwareDeviceSource(
            d435, d435_images, 30.0, fast), n)),
        "demo source + record": per_frame_ms(lambda: read_all(DemoSource(clip_path, record), n)),
        "replay .db3": per_frame_ms(lambda: read_all(ReplaySource(recording, fast), n)),
        "capture thread (demo)": per_frame_ms(thread_run),
    }
    base = results["clip decode"]
    size_mb = clip_path.stat().st_size / 1e6
    print(f"{n} frames of {clip_path} ({size_mb:.1f} MB, {len(clip)} frames)")
    print(f"{'path':28s} {'ms/frame':>9s} {'fps':>7s} {'x decode':>9s}")
    for name, ms in results.items():
        print(f"{name:28s} {ms:9.2f} {1000.0 / ms:7.1f} {ms / base:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
