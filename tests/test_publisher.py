"""The ZeroMQ publisher through real PUB/SUB sockets on 127.0.0.1, and examples/subscribe.py."""

import csv
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from realtime.publisher import BindError, Publisher, PublisherOptions, is_all_interfaces
from realtime.schema import FaceMessage, FrameMessage, SchemaError, example_message, frame_status, validate

REPO = Path(__file__).resolve().parents[1]
PROBE = "probe"


def _probe(pub):
    """A status message that only serves to detect that a subscriber is connected."""
    template = example_message()
    pub.publish(FrameMessage.status_only("reconnected", PROBE, class_names=template.class_names,
                                         model=template.model, host_time_ns=time.monotonic_ns()))


def _decode(payload, fmt):
    return msgpack.unpackb(payload, raw=False) if fmt == "msgpack" else json.loads(payload)


def _recv(sub, fmt, timeout_ms=5000):
    """Next non-probe message as (frames, decoded dict)."""
    while True:
        assert sub.poll(timeout_ms), "no message arrived"
        frames = sub.recv_multipart()
        msg = _decode(frames[1], fmt)
        if msg["status_reason"] != PROBE:
            return frames, msg


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _connect(context, pub, topic=b"afnet", **sockopts):
    sub = context.socket(zmq.SUB)
    for option, value in sockopts.items():
        sub.setsockopt(getattr(zmq, option), value)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(pub.endpoint)
    return sub


def _wait_joined(pub, subs, fmt):
    """Publish probes until every subscriber got one: a late joiner misses what came before."""
    pending = set(range(len(subs)))
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        _probe(pub)
        for i in list(pending):
            if subs[i].poll(20):
                assert _decode(subs[i].recv_multipart()[1], fmt)["status_reason"] == PROBE
                pending.discard(i)
    assert not pending, "subscriber never connected"


def _publisher(fmt="msgpack", **options):
    return Publisher(PublisherOptions(endpoint="tcp://127.0.0.1:*", format=fmt, **options))


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_round_trip_topics_and_schema(context, fmt):
    with _publisher(fmt) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith(":*")
        sub_all = _connect(context, pub)
        sub_status = _connect(context, pub, b"afnet.status")
        _wait_joined(pub, [sub_all, sub_status], fmt)

        sent = [pub.publish(example_message(seq=i, num_faces=1 + i % 2)) for i in range(5)]
        template = example_message()
        eos = FrameMessage.status_only("end_of_stream", "replay finished", class_names=template.class_names,
                                       model=template.model, seq=4, host_time_ns=time.monotonic_ns())
        sent.append(pub.publish(eos))

        received = [_recv(sub_all, fmt) for _ in range(6)]
        for result, (frames, msg) in zip(sent, received):
            assert len(frames) == 2 and frames[0] == result.topic.encode()
            assert (frames[1][:1] == b"{") == (fmt == "json")  # the payload is in the asked format
            assert validate(msg) == [], validate(msg)
            assert msg == result.message
        assert [f[0] for f, _ in received] == [b"afnet.result"] * 5 + [b"afnet.status"]
        assert [m["seq"] for _, m in received] == [0, 1, 2, 3, 4, 4]
        seqs = [m["publish_seq"] for _, m in received]
        assert seqs == list(range(seqs[0], seqs[0] + 6))
        assert [len(m["faces"]) for _, m in received] == [1, 2, 1, 2, 1, 0]
        first, last = received[0][1], received[4][1]
        assert last["publish_time_ns"] >= first["publish_time_ns"] > 0
        assert abs(last["wall_time"] - time.time()) < 60
        assert last["fps"] > 0 and {"capture_to_publish", "publish", "engine"} <= set(last["latency_ms"])
        # The status-only subscriber gets the event and nothing from the result topic.
        frames, msg = _recv(sub_status, fmt)
        assert frames[0] == b"afnet.status" and msg["status"] == "end_of_stream"
        assert not sub_status.poll(100)


def test_unencodable_message_sends_nothing(context):
    with _publisher("json", validate=False) as pub:
        sub = _connect(context, pub)
        _wait_joined(pub, [sub], "json")
        before = pub.stats().published
        bad = example_message(seq=1)
        bad.faces[0].fit_residual_mm = math.nan  # JSON has no NaN: encoding fails before any send
        with pytest.raises(SchemaError, match="message seq 1: cannot encode as json"):
            pub.publish(bad)
        assert pub.stats().published == before
        good = pub.publish(example_message(seq=2))
        frames, msg = _recv(sub, "json")
        assert len(frames) == 2 and msg["seq"] == 2 and msg["publish_seq"] == good.publish_seq


def test_invalid_message_is_refused_before_sending(context):
    with _publisher() as pub:
        sub = _connect(context, pub)
        _wait_joined(pub, [sub], "msgpack")
        bad = example_message(seq=1)
        bad.faces[0].label = "joy"
        with pytest.raises(SchemaError, match="faces\\[0\\].label: 'joy' is not in class_names"):
            pub.publish(bad)
        pub.publish(example_message(seq=2))
        assert _recv(sub, "msgpack")[1]["seq"] == 2


def test_never_reading_subscriber_neither_blocks_nor_raises(context):
    """20000 messages to a subscriber that stopped reading: all publishes return; ZeroMQ drops the excess."""
    total = 20000
    outcome = {}

    def flood():
        pub = _publisher(sndhwm=10, validate=False)
        # A fixed small kernel receive buffer keeps TCP from absorbing the whole flood.
        sub = _connect(context, pub, RCVHWM=10, RCVBUF=65536)
        _wait_joined(pub, [sub], "msgpack")
        msg = example_message(seq=0, num_faces=3)
        results = [pub.publish(msg) for _ in range(total)]
        outcome["stats"], outcome["results"] = pub.stats(), results
        pub.close()  # with messages still queued: bounded by linger, never hangs
        outcome["sub"] = sub

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    worker.join(timeout=300)  # completion check, not a timing threshold
    assert not worker.is_alive(), "publishing blocked"
    assert all(r.sent for r in outcome["results"])
    assert outcome["stats"].again == 0 and outcome["stats"].published >= total
    sub = outcome["sub"]
    seqs = []
    while sub.poll(500):
        seqs.append(_decode(sub.recv_multipart()[1], "msgpack")["publish_seq"])
    first = outcome["results"][0].publish_seq
    seqs = [s for s in seqs if s >= first]
    assert seqs == sorted(seqs) and len(seqs) < total  # the drop is visible as publish_seq gaps
    sub.close()


@pytest.mark.parametrize("endpoint", ["tcp://*:5556", "tcp://0.0.0.0:5556", "tcp://[::]:5556", "tcp://*:*"])
def test_all_interfaces_must_be_asked_for(endpoint):
    assert is_all_interfaces(endpoint)
    with pytest.raises(ValueError, match="binds every network interface.*allow_all_interfaces=True"):
        Publisher(PublisherOptions(endpoint=endpoint))


def test_all_interfaces_when_asked_and_local_endpoints():
    for endpoint in ("tcp://127.0.0.1:5556", "tcp://localhost:*", "tcp://[::1]:5556", "ipc:///tmp/x", "inproc://a"):
        assert not is_all_interfaces(endpoint), endpoint
    with Publisher(PublisherOptions(endpoint="tcp://*:*", allow_all_interfaces=True)) as pub:
        assert pub.endpoint.startswith("tcp://0.0.0.0:")


def test_address_in_use_is_one_line_naming_the_endpoint():
    with _publisher() as first:
        with pytest.raises(BindError) as err:
            Publisher(PublisherOptions(endpoint=first.endpoint))
    text = str(err.value)
    assert first.endpoint in text and "in use" in text and "\n" not in text


@pytest.mark.parametrize("options, match", [
    ({"format": "xml"}, "format 'xml'"),
    ({"sndhwm": 0}, "sndhwm 0: must be >= 1"),
    ({"topic_prefix": ""}, "topic_prefix"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        Publisher(PublisherOptions(endpoint="tcp://127.0.0.1:*", **options))


def test_misuse_after_close_and_from_a_second_thread():
    pub = _publisher()
    pub.publish(example_message())
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_catch(pub.publish, example_message())))
    thread.start()
    thread.join()
    assert "second thread" in str(errors[0])
    pub.close()
    pub.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        pub.publish(example_message())


def _catch(fn, *args):
    try:
        fn(*args)
    except RuntimeError as exc:
        return exc
    return None


def _rotating_message(i):
    """ok (2 faces) / no_face / bad_depth / status event, in turn."""
    template = example_message(seq=i, num_faces=2)
    kind = i % 4
    if kind == 1:
        template.faces = []
    elif kind == 2:
        template.faces = [FaceMessage(track_id=9, bbox=(0, 0, 10, 10), status="bad_depth",
                                      status_reason="no depth under the face")]
    elif kind == 3:
        return FrameMessage.status_only("camera_lost", "device disconnected", class_names=template.class_names,
                                        model=template.model, seq=i, host_time_ns=time.monotonic_ns())
    template.status, template.status_reason = frame_status(template.faces)
    return template


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_subscribe_example_writes_jsonl_and_csv(tmp_path, fmt):
    count = 6
    jsonl, csv_path = tmp_path / "out.jsonl", tmp_path / "out.csv"
    with _publisher(fmt) as pub:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "subscribe.py"), "--endpoint", pub.endpoint,
             "--jsonl", str(jsonl), "--csv", str(csv_path), "--count", str(count), "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        i = 0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            pub.publish(_rotating_message(i))  # until the late-joining subscriber has its --count
            i += 1
            time.sleep(0.01)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    messages = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(messages) == count
    assert all(validate(m) == [] for m in messages)
    seqs = [m["publish_seq"] for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + count))
    assert {m["status"] for m in messages} == {"ok", "no_face", "bad_depth", "camera_lost"}
    lines = out.splitlines()
    assert len(lines) == count and all(line.startswith("seq=") for line in lines)
    assert f"{count} messages received, 0 missed" in err

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [(m, face) for m in messages for face in (m["faces"] or [None])]
    assert len(rows) == len(expected)
    for row, (msg, face) in zip(rows, expected):
        assert int(row["publish_seq"]) == msg["publish_seq"] and row["status"] == msg["status"]
        if face is None:
            assert row["track_id"] == "" and row["label"] == ""
        elif face["status"] != "ok":
            assert row["face_status"] == face["status"] and row["label"] == "" and row["w2d"] == ""
        else:
            assert int(row["track_id"]) == face["track_id"] and row["label"] == face["label"]
            assert float(row["prob"]) == pytest.approx(max(face["probs"]))
            assert float(row["w2d"]) == pytest.approx((0.58 + 0.47) / 2)
            assert float(row["yaw"]) == pytest.approx(face["head_pose"]["yaw"])
            assert float(row["p_happiness"]) == pytest.approx(face["probs"][4])
