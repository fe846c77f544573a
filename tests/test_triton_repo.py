"""Triton model repository writer (layout and config.pbtxt) and the Triton client backend's
offline parts: request building, metadata from a served config, an unreachable server."""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realtime.engine_cache import BuildEnvironment, EngineKey, write_plan
from export.triton_repo import TritonRepoOptions, write_triton_repo
from onnx_fixtures import make_tiny_model, tiny_metadata
from realtime.engine import EngineError, EngineOptions, open_engine, synthetic_feeds
from realtime.engine_triton import metadata_from_triton_config, parse_url
from realtime.model_metadata import ModelMismatchError

REPO = Path(__file__).resolve().parents[1]

try:
    import tritonclient.http as httpclient
except ImportError:
    httpclient = None
needs_tritonclient = pytest.mark.skipif(httpclient is None, reason="tritonclient[http] is not installed")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def _fake_plan(path: Path, max_batch: int, metadata=None) -> Path:
    """A plan file with a real sidecar; the bytes are opaque to the repository writer."""
    key = EngineKey("00" * 32, BuildEnvironment("10.8.0", "NVIDIA L4", "8.9"), "fp16", (1, 1, max_batch))
    write_plan(path, b"serialized-engine", key, {"metadata": (metadata or tiny_metadata()).to_props()})
    return path


def _field(text: str, name: str) -> str:
    match = re.search(rf"^\s*{name}: (.+)$", text, re.M)
    assert match, f"{name} missing from config"
    return match.group(1)


def _blocks(text: str, section: str) -> list[tuple[str, list[int]]]:
    body = re.search(rf"^{section} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
    return [(name, [int(d) for d in dims.split(",")])
            for name, dims in re.findall(r'name: "(\w+)"\s+data_type: TYPE_FP32\s+dims: \[ ([\d, ]+) \]', body)]


def test_onnx_repository_layout_and_config(model_path, tmp_path):
    options = TritonRepoOptions(model_path, tmp_path / "repo", max_batch=8, preferred_batch=(4, 8),
                                max_queue_delay_us=500, instances=2)
    model_dir = write_triton_repo(options)
    assert model_dir == tmp_path / "repo" / "afnet_m"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == model_path.read_bytes()
    text = (model_dir / "config.pbtxt").read_text()
    assert _field(text, "name") == '"afnet_m"'
    assert _field(text, "platform") == '"onnxruntime_onnx"'
    assert _field(text, "max_batch_size") == "8"
    # dims exclude the batch axis (Triton adds it because max_batch_size > 0)
    assert _blocks(text, "input") == [("texture", [3, 112, 112]), ("geometry", [4, 112, 112]), ("masks", [6, 112, 112])]
    assert _blocks(text, "output") == [("logits", [7]), ("modality_weights", [2, 2])]
    dynamic = re.search(r"dynamic_batching \{(.*?)\}", text, re.S).group(1)
    assert "preferred_batch_size: [ 4, 8 ]" in dynamic and "max_queue_delay_microseconds: 500" in dynamic
    assert re.search(r"instance_group \[\s*\{\s*count: 2\s*kind: KIND_AUTO\s*\}\s*\]", text)


def test_config_carries_the_model_metadata_as_parameters(model_path, tmp_path):
    text = (write_triton_repo(TritonRepoOptions(model_path, tmp_path)) / "config.pbtxt").read_text()
    found = dict(re.findall(r'key: "([^"]+)"\n  value: \{ string_value: ("(?:[^"\\]|\\.)*") \}', text))
    props = {key: ast.literal_eval(value) for key, value in found.items()}  # pbtxt escapes are Python's here
    assert props == tiny_metadata().to_props()
    config = {"parameters": {key: {"string_value": value} for key, value in props.items()}}
    assert metadata_from_triton_config(config, "served") == tiny_metadata()


def test_plan_repository(model_path, tmp_path):
    plan = _fake_plan(tmp_path / "m.plan", max_batch=16)
    model_dir = write_triton_repo(TritonRepoOptions(model_path, tmp_path / "repo", plan_path=plan, name="afnet_trt",
                                                    version=3, max_batch=16, preferred_batch=(8, 16)))
    assert (model_dir / "3" / "model.plan").read_bytes() == b"serialized-engine"
    text = (model_dir / "config.pbtxt").read_text()
    assert _field(text, "platform") == '"tensorrt_plan"' and _field(text, "name") == '"afnet_trt"'
    assert _field(text, "max_batch_size") == "16"


def test_plan_with_a_smaller_profile_is_refused(model_path, tmp_path):
    plan = _fake_plan(tmp_path / "m.plan", max_batch=4)
    with pytest.raises(ValueError, match="up to 4"):
        write_triton_repo(TritonRepoOptions(model_path, tmp_path / "repo", plan_path=plan, max_batch=8))


def test_plan_of_another_model_is_refused(model_path, tmp_path):
    plan = _fake_plan(tmp_path / "m.plan", 8, tiny_metadata(class_names=("a", "b")))
    with pytest.raises(ModelMismatchError, match="another model"):
        write_triton_repo(TritonRepoOptions(model_path, tmp_path / "repo", plan_path=plan))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preferred_batch": (4, 16)}, "outside 1..8"),
        ({"name": "bad/name"}, "model name"),
        ({"instances": 0}, "instances"),
        ({"instance_kind": "tpu"}, "instance kind"),
        ({"max_queue_delay_us": -1}, "queue delay"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TritonRepoOptions(Path("m.onnx"), Path("repo"), **kwargs)


def test_cli(model_path, tmp_path):
    script = REPO / "export" / "triton_repo.py"
    ok = subprocess.run([sys.executable, str(script), str(model_path), "--out", str(tmp_path), "--preferred-batch",
                         "2,4", "--max-batch", "4"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "preferred_batch_size: [ 2, 4 ]" in (tmp_path / "afnet_m" / "config.pbtxt").read_text()
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "absent.onnx"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "absent.onnx" in bad.stderr


@needs_tritonclient
def test_config_parses_with_tritons_own_schema(model_path, tmp_path):
    """Parse config.pbtxt with Triton's ModelConfig message (from tritonclient's generated module).

    tritonclient's *_pb2 modules need protobuf 6 to import, so the serialized descriptor is
    read out of the generated file and loaded into protobuf 4's pool directly.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, text_format

    generated = Path(httpclient.__file__).parents[1] / "grpc" / "model_config_pb2.py"
    serialized = ast.literal_eval(re.search(r"AddSerializedFile\((b'.*?')\)\n", generated.read_text(), re.S).group(1))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    model_config = message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))
    model_dir = write_triton_repo(TritonRepoOptions(model_path, tmp_path, instance_kind="gpu"))
    text = (model_dir / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    # the JSON form is what Triton's HTTP API returns to the client backend
    served = json_format.MessageToDict(config, preserving_proto_field_name=True)
    assert metadata_from_triton_config(served, "served") == tiny_metadata()


# --- the client backend, without a server -----------------------------------------------------

def test_metadata_from_a_config_without_parameters_is_refused():
    with pytest.raises(ModelMismatchError, match="not an AFNet-M export"):
        metadata_from_triton_config({"name": "resnet"}, "triton://h:8000/resnet")


def test_metadata_for_other_preprocessing_is_refused():
    props = tiny_metadata(preprocessing_version="canon0-old").to_props()
    with pytest.raises(ModelMismatchError, match="canon0-old"):
        metadata_from_triton_config({"parameters": {k: {"string_value": v} for k, v in props.items()}}, "served")


@pytest.mark.parametrize("url", ["localhost", "host:port", "h:0", "h:70000", "", "a b:80"])
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError, match="host:port"):
        parse_url(url)


def test_good_urls():
    assert parse_url("127.0.0.1:8000") == "127.0.0.1:8000"
    assert parse_url("http://triton.local:8000") == "triton.local:8000"


@needs_tritonclient
def test_request_carries_the_feeds_as_binary_fp32():
    from realtime.engine_triton import make_request

    feeds = synthetic_feeds(tiny_metadata(), 3)
    inputs, outputs = make_request(httpclient, feeds)
    assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [
        ("texture", [3, 3, 112, 112], "FP32"),
        ("geometry", [3, 4, 112, 112], "FP32"),
        ("masks", [3, 6, 112, 112], "FP32"),
    ]
    assert [o.name() for o in outputs] == ["logits", "modality_weights"]
    raw = inputs[0]._get_binary_data()
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(3, 3, 112, 112), feeds["texture"])


@needs_tritonclient
def test_unreachable_server_is_one_line(model_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineError) as info:
        open_engine(EngineOptions(model_path, backend="triton", triton_url=f"127.0.0.1:{port}"))
    text = str(info.value)
    assert "unreachable" in text and f"127.0.0.1:{port}" in text and "\n" not in text


def test_without_tritonclient_the_error_says_how_to_install(model_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)  # as if not installed
    with pytest.raises(EngineError, match=r"tritonclient is not installed \(pip install"):
        open_engine(EngineOptions(model_path, backend="triton", triton_url="127.0.0.1:8000"))
