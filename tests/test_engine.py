"""Inference engines: ONNX Runtime CPU on the tiny fixture, input validation, model checks,
backend selection and fallbacks; TensorRT and ONNX Runtime CUDA only where they exist."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import make_tiny_model, tiny_metadata, write_corrupt_model
from realtime.engine import (EngineError, EngineOptions, OnnxRuntimeEngine, open_engine, probabilities,
                             read_model_metadata, softmax, synthetic_feeds)
from realtime.engine_trt import tensorrt_unavailable_reason
from realtime.model_metadata import INPUT_NAMES, ModelMismatchError

REPO = Path(__file__).resolve().parents[1]
TRT_MISSING = tensorrt_unavailable_reason()


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def engine(model_path):
    with OnnxRuntimeEngine(model_path, "cpu", threads=1) as opened:
        yield opened


def test_cpu_engine_runs_the_contract(engine):
    assert engine.backend == "onnxruntime-cpu"
    assert engine.class_names == tiny_metadata().class_names
    for batch in (1, 3, 5):
        out = engine.infer(synthetic_feeds(engine.metadata, batch, seed=batch))
        assert out["logits"].shape == (batch, 7) and out["logits"].dtype == np.float32
        assert out["modality_weights"].shape == (batch, 2, 2)
        np.testing.assert_allclose(out["modality_weights"].sum(axis=-1), 1.0, atol=1e-5)
        assert (out["modality_weights"] >= 0).all()


def test_batch_results_do_not_depend_on_batching(engine):
    feeds = synthetic_feeds(engine.metadata, 5, seed=7)
    whole = engine.infer(feeds)
    single = [engine.infer({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(5)]
    np.testing.assert_allclose(whole["logits"], np.concatenate([s["logits"] for s in single]), atol=1e-5)


def test_infer_splits_batches_above_the_backend_limit(model_path):
    with OnnxRuntimeEngine(model_path, "cpu", threads=1) as limited:
        feeds = synthetic_feeds(limited.metadata, 5, seed=3)
        expected = limited.infer(feeds)
        limited.max_batch = 2  # as a TensorRT profile or Triton's max_batch_size would impose
        calls = []
        original = limited._infer_impl
        limited._infer_impl = lambda f: calls.append(len(f["texture"])) or original(f)
        got = limited.infer(feeds)
    assert calls == [2, 2, 1]
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6)


def test_non_contiguous_feeds_are_accepted(engine):
    feeds = synthetic_feeds(engine.metadata, 4, seed=1)
    strided = {k: v[::2] for k, v in feeds.items()}
    assert not strided["texture"].flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(engine.infer(strided)["logits"],
                               engine.infer({k: v.copy() for k, v in strided.items()})["logits"], atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("masks"), "'masks' is missing"),
        (lambda f: f.update(depth=f["geometry"]), "unknown input 'depth'"),
        (lambda f: f.update(texture=f["texture"].astype(np.float64)), "'texture' has dtype float64"),
        (lambda f: f.update(geometry=f["geometry"][0]), "'geometry' has shape (4, 112, 112)"),
        (lambda f: f.update(masks=f["masks"][:, :5]), "'masks' has shape (2, 5, 112, 112), expected (B, 6, 112, 112)"),
        (lambda f: f.update(texture=f["texture"][:, :, :100]), "'texture' has shape"),
        (lambda f: f.update(geometry=f["geometry"][:1]), "'geometry' has batch 1"),
        (lambda f: f.update(texture=f["texture"][:0], geometry=f["geometry"][:0], masks=f["masks"][:0]),
         "empty batch"),
        (lambda f: f.update(masks=f["masks"].tolist()), "'masks' is a list"),
    ],
)
def test_bad_feeds_raise_a_value_error_naming_the_input(engine, change, message):
    feeds = synthetic_feeds(engine.metadata, 2)
    change(feeds)
    with pytest.raises(ValueError) as info:
        engine.infer(feeds)
    assert message in str(info.value)


def test_feeds_must_be_a_dict(engine):
    with pytest.raises(ValueError, match="dict"):
        engine.infer([np.zeros((1, 3, 112, 112), np.float32)])


def test_closed_engine_refuses_to_run(model_path):
    opened = OnnxRuntimeEngine(model_path, "cpu", threads=1)
    opened.close()
    with pytest.raises(EngineError, match="closed"):
        opened.infer(synthetic_feeds(opened.metadata, 1))


def test_missing_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "absent.onnx"
    with pytest.raises(EngineError) as info:
        OnnxRuntimeEngine(path)
    assert str(path) in str(info.value) and "not found" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_file_is_one_line_naming_it(tmp_path):
    path = write_corrupt_model(tmp_path / "broken.onnx")
    with pytest.raises(EngineError) as info:
        open_engine(EngineOptions(path, backend="onnxruntime-cpu"))
    assert str(path) in str(info.value) and "cannot load" in str(info.value) and "\n" not in str(info.value)


def test_model_without_metadata_is_refused(tmp_path):
    path = make_tiny_model(tmp_path / "foreign.onnx", with_metadata=False)
    with pytest.raises(ModelMismatchError) as info:
        OnnxRuntimeEngine(path)
    assert str(path) in str(info.value) and "missing" in str(info.value) and "\n" not in str(info.value)


def test_model_for_other_preprocessing_is_refused(tmp_path):
    path = make_tiny_model(tmp_path / "old.onnx", tiny_metadata(preprocessing_version="canon0-old"))
    with pytest.raises(ModelMismatchError) as info:
        open_engine(EngineOptions(path))
    text = str(info.value)
    assert str(path) in text and "canon0-old" in text and "preprocessing" in text and "\n" not in text


def test_metadata_is_read_back_from_the_model(model_path):
    metadata = read_model_metadata(model_path)
    assert metadata == tiny_metadata()


def test_auto_on_a_cpu_machine_picks_onnxruntime_cpu_and_says_why(model_path, caplog):
    if _cuda_provider():
        pytest.skip("ONNX Runtime CUDA is available here: auto would pick it")
    with caplog.at_level(logging.INFO, logger="realtime.engine"):
        with open_engine(EngineOptions(model_path, threads=1)) as opened:
            assert opened.backend == "onnxruntime-cpu"
    assert any("CUDA" in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_auto_with_a_plan_but_no_tensorrt_falls_back_and_logs_why(model_path, tmp_path, caplog):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"never read: TensorRT is missing")
    with caplog.at_level(logging.WARNING, logger="realtime.engine"):
        with open_engine(EngineOptions(model_path, plan_path=plan, threads=1)) as opened:
            assert opened.backend.startswith("onnxruntime")
    assert any("TensorRT" in record.getMessage() and str(plan) in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_a_plan_alone_without_tensorrt_is_a_clear_error(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(EngineError, match="needs TensorRT"):
        open_engine(EngineOptions(plan))


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_forced_tensorrt_without_tensorrt_says_how_to_install(model_path):
    with pytest.raises(EngineError) as info:
        open_engine(EngineOptions(model_path, backend="tensorrt"))
    assert str(info.value) == TRT_MISSING
    assert "pip install" in TRT_MISSING and "\n" not in TRT_MISSING


def test_forced_onnxruntime_cuda_without_cuda_is_a_clear_error(model_path):
    if _cuda_provider():
        pytest.skip("ONNX Runtime CUDA is available here")
    with pytest.raises(EngineError, match="CUDAExecutionProvider"):
        open_engine(EngineOptions(model_path, backend="onnxruntime-cuda"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "openvino"}, "unknown engine backend"),
        ({"threads": 0}, "threads"),
        ({"backend": "triton"}, "triton_url"),
        ({"precision": "int4"}, "unknown precision"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions("model.onnx", **kwargs)


def test_a_model_is_required_except_for_triton():
    with pytest.raises(ValueError, match="needs a model"):
        EngineOptions(None)
    options = EngineOptions(None, backend="triton", triton_url="127.0.0.1:8000")
    assert options.triton_model == "afnet_m"  # export/triton_repo.py's default name


def test_options_from_the_shared_flags():
    import argparse

    from realtime.engine import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--model", "m.onnx", "--backend", "triton", "--triton-url", "h:8000", "--threads", "1"])
    options = EngineOptions.from_args(args)
    got = (options.model_path, options.backend, options.triton_url, options.threads)
    assert got == ("m.onnx", "triton", "h:8000", 1)


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1000.0, -1000.0], [0.0, 1.0, 2.0]], np.float32)
    probs = probabilities(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75], atol=1e-6)


def test_runtime_modules_import_neither_torch_nor_tensorrt():
    code = ("import sys; import realtime.engine, realtime.engine_trt, realtime.engine_triton, realtime.engine_cache; "
            "bad = {'torch', 'tensorrt', 'tritonclient'} & set(sys.modules); assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT unavailable: {TRT_MISSING}")
def test_tensorrt_builds_on_first_use_and_matches_onnxruntime(model_path, engine, tmp_path):
    options = EngineOptions(model_path, backend="tensorrt", precision="fp32", max_batch=4, cache_dir=tmp_path)
    feeds = synthetic_feeds(engine.metadata, 6, seed=5)  # 6 > max batch 4: split by infer()
    with open_engine(options) as trt_engine:
        assert trt_engine.backend == "tensorrt" and trt_engine.max_batch == 4
        got = trt_engine.infer(feeds)
    expected = engine.infer(feeds)
    np.testing.assert_allclose(probabilities(got["logits"]), probabilities(expected["logits"]), atol=1e-3)
    np.testing.assert_allclose(got["modality_weights"], expected["modality_weights"], atol=1e-3)
    with open_engine(options) as again:  # second open: from the cache, same results
        np.testing.assert_allclose(again.infer(feeds)["logits"], got["logits"], atol=1e-6)
    assert len(list(tmp_path.glob("*.plan"))) == 1


@pytest.mark.skipif(not _cuda_provider(), reason="ONNX Runtime has no CUDAExecutionProvider here")
def test_onnxruntime_cuda_matches_cpu(model_path, engine):
    feeds = synthetic_feeds(engine.metadata, 3, seed=2)
    with open_engine(EngineOptions(model_path, backend="onnxruntime-cuda")) as cuda_engine:
        got = cuda_engine.infer(feeds)
    np.testing.assert_allclose(probabilities(got["logits"]), probabilities(engine.infer(feeds)["logits"]), atol=1e-3)


def test_every_input_name_is_checked(engine):
    feeds = synthetic_feeds(engine.metadata, 1)
    for name in INPUT_NAMES:
        broken = dict(feeds, **{name: feeds[name].astype(np.float16)})
        with pytest.raises(ValueError, match=repr(name)):
            engine.infer(broken)
