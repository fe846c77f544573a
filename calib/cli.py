"""Dump the camera model (intrinsics, depth-to-colour extrinsics, depth scale) as JSON.

Reads a connected RealSense camera (started briefly with the capture settings) or a
.bag/.db3 recording, and writes what :meth:`calib.camera.CameraModel.from_json` loads.

Usage:
    python -m calib.cli                                # first camera, 640x480 @ 30, to stdout
    python -m calib.cli --serial 123456789 --out camera.json
    python -m calib.cli --from-file session.db3 --out camera.json
    python -m calib.cli --help
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calib.camera import CameraModel


def read_camera_model(from_file: str | None = None, serial: str | None = None,
                      width: int = 640, height: int = 480, fps: int = 30) -> CameraModel:
    """Start a pipeline on a recording or camera, read its model, stop it.

    Raises:
        ValueError: No such recording, no camera, or no depth + colour streams.
    """
    import pyrealsense2 as rs  # lazy: calib imports without pyrealsense2

    config = rs.config()
    if from_file:
        if not Path(from_file).is_file():
            raise ValueError(f"{from_file}: recording not found")
        config.enable_device_from_file(from_file, repeat_playback=False)
        config.enable_stream(rs.stream.depth)
        config.enable_stream(rs.stream.color)
        what = from_file
    else:
        if len(rs.context().query_devices()) == 0:  # pipeline.start() would wait 15 s first
            raise ValueError("no RealSense camera connected")
        if serial:
            config.enable_device(serial)
        config.enable_stream(rs.stream.depth, width, height, rs.format.z16, fps)
        config.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        what = f"RealSense camera {serial or ''}".strip()
    pipeline = rs.pipeline()
    try:
        profile = pipeline.start(config)
    except RuntimeError as exc:
        raise ValueError(f"{what}: cannot start ({exc})") from exc
    try:
        return CameraModel.from_realsense_profile(profile)
    finally:
        pipeline.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-file", help="read a .bag/.db3 recording instead of a camera")
    parser.add_argument("--serial", help="camera serial number (default: the first camera)")
    parser.add_argument("--width", type=int, default=640, help="stream width (camera only)")
    parser.add_argument("--height", type=int, default=480, help="stream height (camera only)")
    parser.add_argument("--fps", type=int, default=30, help="frame rate (camera only)")
    parser.add_argument("--out", help="JSON file to write (default: print to stdout)")
    args = parser.parse_args(argv)
    try:
        model = read_camera_model(args.from_file, args.serial, args.width, args.height, args.fps)
    except ValueError as exc:
        print(f"calib: {exc}", file=sys.stderr)
        return 1
    if args.out:
        model.to_json(args.out)
    else:
        print(json.dumps(model.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
