#!/usr/bin/env python3
"""Subscribe to the expression recognizer's results and print, log or save them.

Usage:
    python examples/subscribe.py                                  # tcp://127.0.0.1:5556, all topics
    python examples/subscribe.py --topic afnet.status             # capture events only
    python examples/subscribe.py --jsonl out.jsonl --csv out.csv --count 300
    python examples/subscribe.py --endpoint tcp://192.168.1.20:5556 --format json

Self-contained: it needs only pyzmq and msgpack and imports nothing from this repository, so
you can copy it into your own application. The message fields are described in
docs/schema.md (schema version 1).

Wire format: each message is two ZeroMQ frames, [topic, payload]; topic is b"afnet.result"
(one per processed frame) or b"afnet.status" (camera_lost / reconnected / end_of_stream);
payload is a msgpack (default) or JSON map. --format auto tells them apart by the first byte.

One line is printed per message: seq, status, fps, capture->publish latency, and per face its
track id, label, probability of that label, the 2D/3D modality weights (mean over the fused
stages) and yaw/pitch/roll. --jsonl writes each decoded message as one JSON line; --csv writes
one row per face per message (a message without faces gets one row with empty face columns).
Messages the subscriber missed (ZeroMQ drops them when a subscriber falls behind) show up as
gaps in publish_seq and are counted in the summary line at exit.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from typing import Any, TextIO

import msgpack
import zmq

SCHEMA_VERSION = 1  # the message layout this script understands (docs/schema.md)
CSV_FACE_COLUMNS = [
    "track_id", "face_status", "label", "prob", "label_raw", "prob_raw",
    "w2d", "w3d", "yaw", "pitch", "roll", "fit_residual_mm",
]
CSV_FRAME_COLUMNS = [
    "seq", "publish_seq", "wall_time", "status", "status_reason", "fps",
    "capture_to_publish_ms", "frames_dropped",
]


def decode(payload: bytes, fmt: str) -> dict[str, Any]:
    """Decode one payload; ``auto`` picks JSON when it starts with '{' (never a msgpack map)."""
    if fmt == "json" or (fmt == "auto" and payload[:1] == b"{"):
        return json.loads(payload)
    return msgpack.unpackb(payload, raw=False)


def mean_weights(face: dict[str, Any]) -> tuple[float | None, float | None]:
    """Mean (w2d, w3d) over the fused stages, or (None, None) for an unclassified face."""
    rows = face["modality_weights"]
    if not rows:
        return None, None
    return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


def label_prob(face: dict[str, Any], names: list[str], probs_key: str, label_key: str) -> float | None:
    if face[label_key] is None:
        return None
    return face[probs_key][names.index(face[label_key])]


def format_line(msg: dict[str, Any]) -> str:
    """One human-readable line per message."""
    latency = msg["latency_ms"].get("capture_to_publish", 0.0)
    line = f"seq={msg['seq']:>6} {msg['status']:<13} fps={msg['fps']:5.1f} lat={latency:6.1f}ms"
    if msg["status_reason"]:
        line += f" ({msg['status_reason']})"
    for face in msg["faces"]:
        if face["status"] != "ok":
            line += f" | #{face['track_id']} {face['status']}"
            continue
        w2d, w3d = mean_weights(face)
        pose = face["head_pose"]
        prob = label_prob(face, msg["class_names"], "probs", "label")
        line += (
            f" | #{face['track_id']} {face['label']} {prob:.2f} w2d/w3d={w2d:.2f}/{w3d:.2f}"
            f" ypr={pose['yaw']:+.0f}/{pose['pitch']:+.0f}/{pose['roll']:+.0f}"
        )
    return line


def csv_rows(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per face (one row with empty face columns when there is none)."""
    frame = {
        "seq": msg["seq"], "publish_seq": msg["publish_seq"], "wall_time": msg["wall_time"],
        "status": msg["status"], "status_reason": msg["status_reason"], "fps": msg["fps"],
        "capture_to_publish_ms": msg["latency_ms"].get("capture_to_publish"),
        "frames_dropped": msg["frames_dropped"],
    }
    names = msg["class_names"]
    rows = []
    for face in msg["faces"]:
        w2d, w3d = mean_weights(face)
        pose = face["head_pose"] or {}
        row = dict(frame)
        row.update({
            "track_id": face["track_id"], "face_status": face["status"],
            "label": face["label"], "prob": label_prob(face, names, "probs", "label"),
            "label_raw": face["label_raw"], "prob_raw": label_prob(face, names, "probs_raw", "label_raw"),
            "w2d": w2d, "w3d": w3d, "yaw": pose.get("yaw"), "pitch": pose.get("pitch"),
            "roll": pose.get("roll"), "fit_residual_mm": face["fit_residual_mm"],
        })
        row.update({f"p_{name}": p for name, p in zip(names, face["probs"])})
        rows.append(row)
    return rows or [frame]


class CsvLog:
    """CSV writer whose header (with one p_<class> column per class) follows the first message."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._writer: csv.DictWriter | None = None

    def write(self, msg: dict[str, Any]) -> None:
        if self._writer is None:
            columns = CSV_FRAME_COLUMNS + CSV_FACE_COLUMNS + [f"p_{n}" for n in msg["class_names"]]
            self._writer = csv.DictWriter(self._stream, columns, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerows(csv_rows(msg))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="publisher to connect to")
    parser.add_argument("--format", choices=("msgpack", "json", "auto"), default="auto",
                        help="payload encoding (default: auto-detect)")
    parser.add_argument("--topic", default="afnet", help="topic prefix to subscribe to ('' = all)")
    parser.add_argument("--jsonl", help="write each message as one JSON line to this file")
    parser.add_argument("--csv", help="write one row per face per message to this CSV file")
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds without a message")
    parser.add_argument("--quiet", action="store_true", help="do not print a line per message")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
    socket.connect(args.endpoint)
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None
    csv_file = open(args.csv, "w", encoding="utf-8", newline="") if args.csv else None
    csv_log = CsvLog(csv_file) if csv_file else None
    received, missed, last_pub_seq, rc = 0, 0, None, 0
    # publish_seq counts both topics: its gaps mean lost messages only when both are subscribed
    sees_every_topic = all(t.startswith(args.topic) for t in ("afnet.result", "afnet.status"))
    last_message = time.monotonic()
    try:
        while args.count is None or received < args.count:
            # Poll in short slices so Ctrl-C and --timeout are noticed promptly.
            if not socket.poll(200):
                if args.timeout is not None and time.monotonic() - last_message > args.timeout:
                    print(f"subscribe: no message from {args.endpoint} for {args.timeout:g} s", file=sys.stderr)
                    rc = 1
                    break
                continue
            topic, payload = socket.recv_multipart()[:2]
            try:
                msg = decode(payload, args.format)
            except (ValueError, msgpack.UnpackException) as exc:
                print(f"subscribe: undecodable message on {topic!r}: {exc}", file=sys.stderr)
                continue
            if not isinstance(msg, dict) or msg.get("schema") != SCHEMA_VERSION:
                print(f"subscribe: skipping a message on {topic!r} that is not schema {SCHEMA_VERSION}",
                      file=sys.stderr)
                continue
            last_message = time.monotonic()
            received += 1
            if sees_every_topic and last_pub_seq is not None and msg["publish_seq"] > last_pub_seq + 1:
                missed += msg["publish_seq"] - last_pub_seq - 1
            last_pub_seq = msg["publish_seq"]
            if not args.quiet:
                print(format_line(msg), flush=True)
            if jsonl:
                jsonl.write(json.dumps(msg) + "\n")
            if csv_log:
                csv_log.write(msg)
    except KeyboardInterrupt:
        pass
    finally:
        for f in (jsonl, csv_file):
            if f:
                f.close()
        socket.close()
        context.term()
    gaps = f"{missed} missed (publish_seq gaps)" if sees_every_topic else "missed: not counted for one topic"
    print(f"subscribe: {received} messages received, {gaps}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
