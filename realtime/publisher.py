"""ZeroMQ PUB publisher for :class:`~realtime.schema.FrameMessage` results.

Wire format: a two-frame multipart message ``[topic, payload]``.

- topic: ``b"<prefix>.result"`` for processed frames (status ok/no_face/bad_depth/bad_fit),
  ``b"<prefix>.status"`` for capture events (camera_lost/reconnected/end_of_stream); the
  prefix defaults to ``afnet``. ZeroMQ filters by byte prefix, so a subscriber to ``b"afnet"``
  gets both and one to ``b"afnet.status"`` gets events only.
- payload: the message dict as msgpack (default) or UTF-8 JSON.

The payload is serialised before the first ``send``: a message that cannot be encoded raises
:class:`~realtime.schema.SchemaError` and nothing reaches the socket, never half a multipart.

Sends never block (``zmq.DONTWAIT``). A PUB socket drops messages for a subscriber whose
queue is full (``sndhwm`` messages, plus what the kernel's TCP buffers hold) and ZeroMQ does
not tell the publisher; every message therefore carries ``publish_seq`` (+1 per message),
from which a subscriber counts what it missed. ``zmq.Again`` (not raised by a lossy PUB,
counted in case) is reported as ``sent=False``. Measured here: with ``sndhwm=50``, bursts of
~10k messages/s lose a few messages even to a subscriber that keeps up (libzmq updates the
publisher's view of a queue in batches); at 1k messages/s and at camera rates none are lost.

A ZeroMQ socket is not thread-safe: one thread owns the publisher; a ``publish`` from a
second thread raises ``RuntimeError``.

Usage:
    with Publisher(PublisherOptions(endpoint="tcp://127.0.0.1:5556")) as pub:
        pub.publish(message)
"""

from __future__ import annotations

import collections
import ipaddress
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from realtime.schema import RESULT_STATUSES, FrameMessage, SchemaError, ensure_valid, topic_for

FORMATS = ("msgpack", "json")


class BindError(OSError):
    """The publisher could not bind its endpoint (e.g. the port is in use)."""


@dataclass
class PublisherOptions:
    """Where and how results are published."""

    endpoint: str = "tcp://127.0.0.1:5556"  # a port of "*" binds a free one (see Publisher.endpoint)
    format: str = "msgpack"  # "msgpack" | "json"
    sndhwm: int = 50  # messages queued per subscriber before ZeroMQ drops (~1.7 s at 30 fps)
    topic_prefix: str = "afnet"
    allow_all_interfaces: bool = False  # binding tcp://*: or 0.0.0.0 exposes results to the network
    linger_ms: int = 100  # how long close() may spend flushing queued messages
    validate: bool = True  # check every message against the schema before sending
    fps_window_s: float = 2.0  # sliding window of the stamped ``fps``


@dataclass
class PublishResult:
    """What happened to one message."""

    topic: str
    publish_seq: int
    sent: bool  # False if ZeroMQ refused it (zmq.Again); drops behind the HWM are not visible here
    size_bytes: int  # payload size
    message: dict[str, Any]  # the dict as sent, publisher stamps included


@dataclass
class PublisherStats:
    """Counters since the publisher was opened."""

    published: int = 0  # messages handed to ZeroMQ
    again: int = 0  # messages refused with zmq.Again (not sent)
    bytes: int = 0  # payload bytes handed to ZeroMQ


def is_all_interfaces(endpoint: str) -> bool:
    """Whether a tcp/ws ``endpoint`` binds every network interface (``*``, ``0.0.0.0``, ``::``)."""
    transport, sep, address = endpoint.partition("://")
    if not sep or transport not in ("tcp", "ws", "wss"):
        return False
    host = address.split("/", 1)[0].rpartition(":")[0].strip("[]")
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host or interface name: binds one interface
        return False


class Publisher:
    """Binds a ZeroMQ PUB socket and publishes one message per call; owns its context."""

    def __init__(self, options: PublisherOptions | None = None) -> None:
        self.options = options = options or PublisherOptions()
        if options.format not in FORMATS:
            raise ValueError(f"publisher format {options.format!r}: expected one of {', '.join(FORMATS)}")
        if options.sndhwm < 1:
            raise ValueError(
                f"publisher sndhwm {options.sndhwm}: must be >= 1 (0 means unlimited in ZeroMQ: "
                "a stuck subscriber would grow memory without bound)"
            )
        if not options.topic_prefix:
            raise ValueError("publisher topic_prefix must not be empty")
        if is_all_interfaces(options.endpoint) and not options.allow_all_interfaces:
            raise ValueError(
                f"publisher endpoint {options.endpoint} binds every network interface; "
                "bind 127.0.0.1 or one address, or pass allow_all_interfaces=True (--allow-all-interfaces)"
            )
        self._encode = _pack_msgpack if options.format == "msgpack" else _pack_json
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, options.sndhwm)
        self._socket.setsockopt(zmq.LINGER, options.linger_ms)
        try:
            self._socket.bind(options.endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            self._context.term()
            in_use = exc.errno == zmq.EADDRINUSE
            hint = " (another publisher on this port? choose another --endpoint)" if in_use else ""
            raise BindError(
                f"cannot bind the ZeroMQ publisher to {options.endpoint}: {exc.strerror}{hint}"
            ) from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        """The bound endpoint, with the real port when ``*`` was asked for."""
        self._owner: int | None = None
        self._stats = PublisherStats()
        self._result_times: collections.deque[int] = collections.deque()  # (n,) monotonic ns of results
        self._last_publish_ms = 0.0

    def publish(self, msg: FrameMessage) -> PublishResult:
        """Stamp, validate, serialise and send one message without blocking.

        Stamps ``publish_seq``, ``publish_time_ns``, ``wall_time``, ``fps`` and
        ``latency_ms`` ``capture_to_publish`` and ``publish`` (the serialise + send time of the
        previous message: a message cannot carry its own).

        Raises:
            SchemaError: the message is invalid or cannot be encoded; nothing was sent.
            RuntimeError: the publisher is closed, or called from a second thread.
        """
        self._check_usable()
        start_ns = time.monotonic_ns()
        topic = topic_for(msg.status, self.options.topic_prefix)
        d = msg.to_dict()
        d["publish_seq"] = self._stats.published + self._stats.again
        d["publish_time_ns"] = start_ns
        d["wall_time"] = time.time()
        is_result = msg.status in RESULT_STATUSES
        d["fps"] = self._fps(start_ns, is_result)
        d["latency_ms"]["capture_to_publish"] = max(0.0, (start_ns - msg.host_time_ns) / 1e6)
        d["latency_ms"]["publish"] = self._last_publish_ms
        source = f"message seq {msg.seq}"
        if self.options.validate:
            ensure_valid(d, source)
        try:
            payload = self._encode(d)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SchemaError(f"{source}: cannot encode as {self.options.format}: {exc}") from None

        try:
            self._socket.send_multipart([topic.encode(), payload], flags=zmq.DONTWAIT)
            sent = True
            self._stats.published += 1
            self._stats.bytes += len(payload)
            if is_result:
                self._result_times.append(start_ns)
        except zmq.Again:
            sent = False
            self._stats.again += 1
        self._last_publish_ms = (time.monotonic_ns() - start_ns) / 1e6
        return PublishResult(topic, d["publish_seq"], sent, len(payload), d)

    process = publish  # the stage interface of style.md

    def stats(self) -> PublisherStats:
        """A copy of the counters."""
        return PublisherStats(self._stats.published, self._stats.again, self._stats.bytes)

    def close(self) -> None:
        """Close the socket; waits at most ``linger_ms`` to flush queued messages. Idempotent."""
        if self._socket is None:
            return
        self._socket.close()
        self._socket = None
        self._context.term()  # bounded by LINGER

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._socket is None:
            raise RuntimeError(f"publisher {self.endpoint} is closed")
        thread = threading.get_ident()
        if self._owner is None:
            self._owner = thread
        elif thread != self._owner:
            raise RuntimeError(
                f"publisher {self.endpoint} used from a second thread: ZeroMQ sockets are not "
                "thread-safe; publish from the one thread that owns it"
            )

    def _fps(self, now_ns: int, counting_now: bool) -> float:
        """Results per second over the last ``fps_window_s``, this one included if ``counting_now``.

        Decays to 0 when results stop (capture lost, end of a replay).
        """
        times = self._result_times
        while times and now_ns - times[0] > self.options.fps_window_s * 1e9:
            times.popleft()
        n = len(times) + counting_now
        if n < 2 or now_ns == times[0]:
            return 0.0
        return (n - 1) * 1e9 / (now_ns - times[0])  # up to now: the rate falls while results stop


def _pack_msgpack(d: dict[str, Any]) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _pack_json(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode("utf-8")
