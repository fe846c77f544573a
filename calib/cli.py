"""Dump the camera model (intrinsics, depth-to-colour extrinsics, depth scale) as JSON.

Opens a connected RealSense camera, a .bag/.db3 recording or a demo clip exactly as
``run_camera.py`` would (:func:`realtime.capture.resolve_source`), and writes what
:meth:`calib.camera.CameraModel.from_json` loads.

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

from calib.camera import CameraModel


def read_camera_model(from_file: str | None = None, serial: str | None = None,
                      width: int = 640, height: int = 480, fps: int = 30) -> CameraModel:
    """Open the capture source (camera or recording) as the live path does, read its model, close it.

    Raises:
        ValueError: No such recording, no camera, or no usable depth + colour streams.
    """
    from realtime.capture import CaptureError, CaptureOptions, resolve_source  # lazy: needs pyrealsense2

    options = CaptureOptions(source=from_file or "realsense", serial=serial, width=width, height=height,
                             fps=fps, realtime=False)
    try:
        with resolve_source(options) as source:  # opens it
            return source.camera
    except CaptureError as exc:
        raise ValueError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-file", help="read a .bag/.db3 recording (or a .npz demo clip) instead of a camera")
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
