#!/usr/bin/env python3
"""Real-time 2D+3D facial-expression recognition from a RealSense camera, published over ZeroMQ.

Usage:
    python run_camera.py                              # camera if one is plugged in, else the demo clip
    python run_camera.py --source demo --max-frames 300
    python run_camera.py --source session.db3 --fast  # replay a recording as fast as possible
    python run_camera.py --record session.db3         # record the live camera while running
    python run_camera.py --save-video overlay.mp4 --duration 10
    python examples/subscribe.py                      # in another terminal: one line per result

Every processed frame is published as one message [topic, payload] on
tcp://127.0.0.1:5556 (msgpack; --format json for text). The message schema is in the README.
Ctrl-C stops cleanly: capture thread joined, recording finalised, socket closed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from realtime.canonical import CanonicalOptions
from realtime.capture import REPLAY_SUFFIXES, CaptureError, CaptureOptions
from realtime.engine import EngineError, EngineOptions, add_engine_arguments
from realtime.landmarks import LandmarkOptions
from realtime.model_metadata import ModelMismatchError
from realtime.overlay import DisplayError, Overlay, OverlayOptions
from realtime.pipeline import Pipeline, PipelineOptions, default_model_path
from realtime.publisher import BindError, PublisherOptions
from realtime.smoothing import SmoothingOptions

log = logging.getLogger("run_camera")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Recognise facial expressions in RGB-D frames and publish one ZeroMQ message per frame.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = parser.add_argument_group("source")
    src.add_argument("--source", default="auto",
                     help="auto (camera if present, else the built-in demo clip), realsense, demo, "
                          "or a .bag/.db3 recording (or a demo-clip .npz)")
    src.add_argument("--width", type=int, default=640, help="camera stream width")
    src.add_argument("--height", type=int, default=480, help="camera stream height")
    src.add_argument("--fps", type=int, default=30, help="camera frame rate")
    src.add_argument("--post-processing", action="store_true",
                     help="run the librealsense depth filters (decimation, spatial, temporal, hole filling)")
    src.add_argument("--fast", action="store_true",
                     help="replay a recording/clip as fast as it is processed instead of at its recorded rate")
    src.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                     help="start a recording over at its end (default: the demo loops, recordings do not)")
    src.add_argument("--record", help="record the camera session to this .db3 file")
    src.add_argument("--serial", help="serial number of the camera to open")

    run = parser.add_argument_group("run")
    run.add_argument("--max-frames", type=int, help="stop after this many processed frames")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--max-faces", type=int, default=1, help="faces tracked per frame")
    run.add_argument("--no-smoothing", action="store_true",
                     help="publish raw per-frame probabilities as the smoothed ones too")
    run.add_argument("--status-interval", type=float, default=5.0, help="seconds between console status lines")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    add_engine_arguments(parser, model_default=str(default_model_path()))

    out = parser.add_argument_group("output")
    out.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="ZeroMQ PUB endpoint to bind")
    out.add_argument("--bind-all", action="store_true",
                     help="allow binding to all interfaces (tcp://*:5556 or tcp://0.0.0.0:5556)")
    out.add_argument("--format", choices=("msgpack", "json"), default="msgpack", help="payload encoding")
    out.add_argument("--log", dest="log_path", help="also write every message to this JSONL file")
    out.add_argument("--show", action="store_true", help="show the overlay in a window (q or Esc stops)")
    out.add_argument("--save-video", help="write the overlay to this .mp4 file (works without a display)")
    return parser.parse_args(argv)


def build_options(args: argparse.Namespace) -> PipelineOptions:
    """Pipeline options from the command line."""
    is_recording = Path(args.source).suffix in REPLAY_SUFFIXES
    capture = CaptureOptions(
        source=args.source, width=args.width, height=args.height, fps=args.fps,
        post_processing=args.post_processing, realtime=not args.fast,
        loop=args.loop if args.loop is not None else not is_recording,
        record=args.record, serial=args.serial)
    return PipelineOptions(
        engine=EngineOptions.from_args(args),
        capture=capture,
        landmarks=LandmarkOptions(max_faces=args.max_faces),
        canonical=CanonicalOptions(),
        publisher=PublisherOptions(endpoint=args.endpoint, format=args.format,
                                   allow_all_interfaces=args.bind_all),
        smoothing=SmoothingOptions(enabled=not args.no_smoothing),
        max_frames=args.max_frames, duration_s=args.duration,
        status_interval_s=args.status_interval, log_path=args.log_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        options = build_options(args)
        with Overlay(OverlayOptions(show=args.show, video_path=args.save_video, fps=args.fps)) as overlay:
            callback = overlay.process if (args.show or args.save_video) else None
            with Pipeline(options, frame_callback=callback) as pipeline:
                stats = pipeline.run()
    except (ValueError, EngineError, ModelMismatchError, CaptureError, BindError, DisplayError, OSError) as exc:
        log.error("%s", exc)
        return 2
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(stats.statuses.items()))
    log.info("done: %d frames in %.1f s (%.1f fps), %d dropped by capture; %s",
             stats.processed, stats.elapsed_s, stats.fps, stats.dropped, statuses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
