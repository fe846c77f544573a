"""Engine cache (keys, stale/foreign/damaged entries, crashes, concurrent builders, timing cache),
parity rules, the INT8 Q/DQ path on ONNX Runtime, and build_engine.py's CLI. TensorRT itself
only where it exists: the cache logic runs with an injected builder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from calib.int8_calibration import (CalibrationDataError, collect_samples, default_input_shapes, load_feeds,
                                    quantize_qdq, write_calibration_set)
from export.build_engine import PARITY_LIMITS, check_parity, compare_outputs
from realtime.engine_cache import (BuildEnvironment, BuildOutput, CacheError, EngineCache, EngineKey, read_plan,
                                 sidecar_path, write_plan)
from onnx_fixtures import make_tiny_model, tiny_metadata
from realtime.engine import OnnxRuntimeEngine, synthetic_feeds
from realtime.engine_trt import tensorrt_unavailable_reason
from realtime.model_metadata import ModelMismatchError

REPO = Path(__file__).resolve().parents[1]
TRT_MISSING = tensorrt_unavailable_reason()
ENV = BuildEnvironment("10.8.0", "NVIDIA H100 80GB HBM3", "9.0")
KEY = EngineKey("ab" * 32, ENV, "fp16", (1, 1, 8))


class CountingBuilder:
    """A stand-in for the TensorRT build (the cache's only dependency on TensorRT)."""

    def __init__(self, plan: bytes = b"PLAN-BYTES" * 100) -> None:
        self.plan = plan
        self.timing_seen: list[bytes | None] = []

    def __call__(self, timing_cache: bytes | None) -> BuildOutput:
        self.timing_seen.append(timing_cache)
        return BuildOutput(self.plan, b"TIMING-%d" % len(self.timing_seen))

    @property
    def calls(self) -> int:
        return len(self.timing_seen)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


# --- keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(KEY, onnx_sha256="cd" * 32),
        dataclasses.replace(KEY, environment=dataclasses.replace(ENV, tensorrt_version="10.9.0")),
        dataclasses.replace(KEY, environment=dataclasses.replace(ENV, gpu_name="NVIDIA L4")),
        dataclasses.replace(KEY, environment=dataclasses.replace(ENV, compute_capability="8.9")),
        dataclasses.replace(KEY, precision="int8"),
        dataclasses.replace(KEY, profile=(1, 4, 8)),
        dataclasses.replace(KEY, profile=(1, 1, 16)),
    ],
)
def test_key_changes_when_any_component_changes(changed):
    assert changed.digest() != KEY.digest()


def test_key_is_stable_and_round_trips():
    same = EngineKey("ab" * 32, BuildEnvironment("10.8.0", "NVIDIA H100 80GB HBM3", "9.0"), "fp16", (1, 1, 8))
    assert same.digest() == KEY.digest()
    assert EngineKey.from_dict(json.loads(json.dumps(KEY.to_dict()))) == KEY


# --- cache entries ---------------------------------------------------------------------------

def test_builds_once_then_loads(tmp_path):
    cache, builder = EngineCache(tmp_path), CountingBuilder()
    built_plan, first = cache.get_or_build(KEY, builder, {"metadata": {"a": "1"}})
    loaded_plan, second = cache.get_or_build(KEY, builder, {"metadata": {"a": "1"}})
    assert builder.calls == 1 and first.built and not second.built
    assert built_plan == loaded_plan == builder.plan
    plan, entry = read_plan(second.plan_path, expected_key=KEY)
    assert plan == builder.plan and entry.info == {"metadata": {"a": "1"}}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_a_foreign_entry_is_rebuilt_not_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, precision="fp32")
    cache.get_or_build(other, CountingBuilder(b"FP32-PLAN"), {})
    # someone copies the fp32 entry under the fp16 key's name
    cache.plan_path(KEY).write_bytes(cache.plan_path(other).read_bytes())
    sidecar_path(cache.plan_path(KEY)).write_bytes(sidecar_path(cache.plan_path(other)).read_bytes())
    assert cache.lookup(KEY) is None
    builder = CountingBuilder(b"FP16-PLAN")
    _, entry = cache.get_or_build(KEY, builder, {})
    assert builder.calls == 1 and read_plan(entry.plan_path, KEY)[0] == b"FP16-PLAN"


@pytest.mark.parametrize("damage", ["truncate_plan", "drop_sidecar", "garble_sidecar", "drop_plan"])
def test_damaged_entries_are_rebuilt_never_loaded(tmp_path, damage):
    cache = EngineCache(tmp_path)
    cache.get_or_build(KEY, CountingBuilder(), {})
    plan_path = cache.plan_path(KEY)
    if damage == "truncate_plan":  # e.g. a crash or full disk in a non-atomic writer
        plan_path.write_bytes(plan_path.read_bytes()[:100])
    elif damage == "drop_sidecar":  # crash between the plan's rename and the sidecar's
        sidecar_path(plan_path).unlink()
    elif damage == "garble_sidecar":
        sidecar_path(plan_path).write_text("{not json")
    else:
        plan_path.unlink()
    assert cache.lookup(KEY) is None
    builder = CountingBuilder()
    assert cache.get_or_build(KEY, builder, {})[1].built and builder.calls == 1
    assert read_plan(plan_path, KEY)[0] == builder.plan


def test_read_plan_errors_are_one_line_naming_the_file(tmp_path):
    plan_path = tmp_path / "model.plan"
    with pytest.raises(CacheError, match="cannot read the plan"):
        read_plan(plan_path)
    plan_path.write_bytes(b"x")
    with pytest.raises(CacheError) as info:
        read_plan(plan_path)
    assert "sidecar" in str(info.value) and str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    write_plan(plan_path, b"PLAN", KEY, {})
    with pytest.raises(CacheError, match="another key"):
        read_plan(plan_path, expected_key=dataclasses.replace(KEY, precision="int8"))


def test_timing_cache_is_persisted_per_environment(tmp_path):
    cache, builder = EngineCache(tmp_path), CountingBuilder()
    cache.get_or_build(KEY, builder, {})
    cache.get_or_build(dataclasses.replace(KEY, precision="fp32"), builder, {})
    foreign = dataclasses.replace(KEY, environment=dataclasses.replace(ENV, gpu_name="NVIDIA L4"))
    cache.get_or_build(foreign, builder, {})
    assert builder.timing_seen == [None, b"TIMING-1", None]
    assert cache.timing_cache_path(ENV).read_bytes() == b"TIMING-2"


CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from realtime.engine_cache import BuildOutput, EngineCache, EngineKey
    root, key, log, mode = sys.argv[2], EngineKey.from_dict(json.loads(sys.argv[3])), sys.argv[4], sys.argv[5]

    def build(timing_cache):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        if mode == "crash":
            os._exit(3)  # dies holding the lock, mid-build
        time.sleep(1.0)
        return BuildOutput(b"PLAN-FROM-" + str(os.getpid()).encode())

    _, entry = EngineCache(root).get_or_build(key, build, {})
    print(json.dumps({"built": entry.built}))
""")


def _child(tmp_path: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(REPO), str(tmp_path / "cache"), json.dumps(KEY.to_dict()),
         str(tmp_path / "builds.log"), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_processes_build_the_same_key_once(tmp_path):
    children = [_child(tmp_path, "build"), _child(tmp_path, "build")]
    results = [child.communicate(timeout=60) for child in children]
    assert all(child.returncode == 0 for child in children), results
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert sorted(json.loads(out)["built"] for out, _ in results) == [False, True]
    plan, _ = read_plan(EngineCache(tmp_path / "cache").plan_path(KEY), KEY)
    assert plan.startswith(b"PLAN-FROM-")


def test_a_builder_that_crashes_leaves_nothing_loadable_and_no_stuck_lock(tmp_path):
    child = _child(tmp_path, "crash")
    child.communicate(timeout=60)
    assert child.returncode == 3
    cache = EngineCache(tmp_path / "cache")
    assert cache.lookup(KEY) is None
    builder = CountingBuilder()
    assert cache.get_or_build(KEY, builder, {})[1].built and builder.calls == 1  # the lock died with the process


# --- parity rules ----------------------------------------------------------------------------

def _outputs(logits: np.ndarray) -> dict[str, np.ndarray]:
    return {"logits": logits.astype(np.float32), "modality_weights": np.full((len(logits), 2, 2), 0.5, np.float32)}


def test_identical_outputs_pass_every_precision():
    logits = np.random.default_rng(0).normal(size=(100, 7))
    for precision in PARITY_LIMITS:
        report = compare_outputs(_outputs(logits), _outputs(logits), precision)
        assert report.passed and report.top1_agreement == 1.0 and report.max_abs_prob_diff == 0.0


def test_fp32_fails_above_its_probability_tolerance():
    logits = np.random.default_rng(0).normal(size=(100, 7))
    nudged = logits.copy()
    nudged[0, 0] += 0.05  # moves that sample's probabilities by ~1e-2
    assert not compare_outputs(_outputs(logits), _outputs(nudged), "fp32").passed
    assert compare_outputs(_outputs(logits), _outputs(nudged), "fp16").max_abs_prob_diff < 0.02


def test_modality_weights_count_in_the_probability_difference():
    logits = np.random.default_rng(0).normal(size=(10, 7))
    shifted = _outputs(logits)
    shifted["modality_weights"][3, 0] = [0.6, 0.4]
    report = compare_outputs(_outputs(logits), shifted, "fp16")
    assert not report.passed and report.max_abs_prob_diff == pytest.approx(0.1)


def test_int8_needs_97_percent_top1_agreement():
    logits = np.tile(np.eye(7)[None], (100, 1, 1))[:, 0] * 5  # every sample predicts class 0
    flipped = logits.copy()
    flipped[:3] = np.roll(flipped[:3], 1, axis=1)  # 3 % disagree
    assert compare_outputs(_outputs(logits), _outputs(flipped), "int8").passed
    flipped[:4] = np.roll(logits[:4], 1, axis=1)  # 4 % disagree
    report = compare_outputs(_outputs(logits), _outputs(flipped), "int8")
    assert not report.passed and report.top1_agreement == pytest.approx(0.96)
    assert "FAILED" in report.describe() and "top-1 >= 97%" in report.describe()


# --- INT8 by Q/DQ, on ONNX Runtime CPU --------------------------------------------------------

def test_qdq_model_runs_on_onnxruntime_and_agrees_with_fp32(model_path, tmp_path):
    metadata = tiny_metadata()
    calib = write_calibration_set(tmp_path / "calib.npz", synthetic_feeds(metadata, 64, seed=11))
    feeds = load_feeds(calib, metadata.input_shapes)
    qdq = quantize_qdq(model_path, tmp_path / "tiny.int8.onnx", feeds)
    import onnx

    ops = {node.op_type for node in onnx.load(str(qdq)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with OnnxRuntimeEngine(model_path) as fp32, OnnxRuntimeEngine(qdq) as int8:
        assert int8.metadata == fp32.metadata  # metadata props carried over
        report = check_parity(fp32, int8, synthetic_feeds(metadata, 64, seed=12), "int8")
    assert report.top1_agreement >= 0.8, report.describe()
    assert report.max_abs_logit_diff > 0  # it really is quantised


def test_calibration_set_from_a_directory_of_samples(tmp_path, caplog):
    shapes = default_input_shapes()
    feeds = synthetic_feeds(tiny_metadata(), 5, seed=1)
    samples = tmp_path / "samples"
    (samples / "subject1").mkdir(parents=True)
    for i in range(3):  # one sample per file, (C, H, W), plus a label the reader ignores
        np.savez(samples / "subject1" / f"s{i}.npz", label=np.int64(i), **{k: v[i] for k, v in feeds.items()})
    np.savez(samples / "stack.npz", **{k: v[3:].astype(np.float16) for k, v in feeds.items()})  # (2, C, H, W)
    np.savez(samples / "no_masks.npz", texture=feeds["texture"][0], geometry=feeds["geometry"][0])
    (samples / "junk.npz").write_bytes(b"not a zip")
    collected = collect_samples(samples, shapes, max_samples=100)
    assert collected["texture"].shape == (5, 3, 112, 112) and collected["masks"].dtype == np.float32
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2
    assert collect_samples(samples, shapes, max_samples=4)["geometry"].shape[0] == 4


def test_calibration_data_errors(tmp_path):
    shapes = default_input_shapes()
    with pytest.raises(CalibrationDataError, match="no usable sample"):
        collect_samples(tmp_path, shapes)
    with pytest.raises(CalibrationDataError, match="no such"):
        load_feeds(tmp_path / "absent.npz", shapes)
    stale = tmp_path / "stale.npz"
    np.savez(stale, preprocessing_version=np.array("canon0-old"), **synthetic_feeds(tiny_metadata(), 2))
    with pytest.raises(ModelMismatchError, match="canon0-old"):
        load_feeds(stale, shapes)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **dict(synthetic_feeds(tiny_metadata(), 2), masks=np.zeros((2, 5, 112, 112), np.float32)))
    with pytest.raises(CalibrationDataError, match="'masks' has shape"):
        load_feeds(wrong, shapes)


def test_calibration_cli_writes_a_set_and_a_qdq_model(model_path, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "a.npz", **synthetic_feeds(tiny_metadata(), 16, seed=3))
    run = lambda *args: subprocess.run([sys.executable, str(REPO / "calib" / "int8_calibration.py"), *map(str, args)],
                                       capture_output=True, text=True, timeout=120)
    written = run("write", samples, "-o", tmp_path / "calib.npz")
    assert written.returncode == 0 and "16 samples" in written.stdout, written.stderr
    quantized = run("quantize", model_path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "q.onnx")
    assert quantized.returncode == 0, quantized.stderr
    with OnnxRuntimeEngine(tmp_path / "q.onnx") as engine:
        assert engine.infer(synthetic_feeds(engine.metadata, 2))["logits"].shape == (2, 7)
    missing = run("quantize", model_path, "--calib", tmp_path / "none.npz", "-o", tmp_path / "x.onnx")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "none.npz" in missing.stderr


# --- the command line ------------------------------------------------------------------------

def _build(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "export" / "build_engine.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_help_has_the_usage_block():
    result = _build("--help")
    assert result.returncode == 0 and "--int8 --calib-data" in result.stdout and "Exit codes" in result.stdout


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_cli_without_tensorrt_is_one_line_and_exit_2(model_path, tmp_path):
    result = _build(model_path, "-o", tmp_path / "m.plan", "--cache-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {TRT_MISSING}"
    assert not (tmp_path / "m.plan").exists()


def test_cli_refuses_bad_models_before_anything_else(tmp_path):
    missing = _build(tmp_path / "absent.onnx")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "absent.onnx" in missing.stderr
    foreign = make_tiny_model(tmp_path / "foreign.onnx", with_metadata=False)
    result = _build(foreign)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not an AFNet-M export" in result.stderr


def test_cli_int8_needs_calibration_data(model_path):
    result = _build(model_path, "--int8")
    assert result.returncode == 2 and "--calib-data" in result.stderr


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT unavailable: {TRT_MISSING}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cli_builds_a_plan_in_parity(model_path, tmp_path, precision):
    args = [model_path, "-o", tmp_path / "m.plan", "--cache-dir", tmp_path / "cache", "--max-batch", "4"]
    if precision != "fp32":
        args.append(f"--{precision}")
    if precision == "int8":
        args += ["--calib-data", write_calibration_set(tmp_path / "c.npz", synthetic_feeds(tiny_metadata(), 64, 4))]
    result = _build(*args)
    if precision == "int8" and result.returncode == 1:
        # the tiny fixture's random features are fragile under INT8; demand a sane build, not 97 %
        agreement = float(re.search(r"top-1 agreement ([\d.]+)%", result.stdout).group(1))
        assert agreement >= 85.0, result.stdout
        assert not (tmp_path / "m.plan").exists()  # a plan out of parity is not written
        return
    assert result.returncode == 0, result.stderr + result.stdout
    assert "parity ok" in result.stdout and "built in" in result.stdout
    _, entry = read_plan(tmp_path / "m.plan")
    assert entry.key.precision == precision and entry.key.profile == (1, 1, 4)
    assert "from cache" in _build(*args).stdout


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT unavailable: {TRT_MISSING}")
def test_runtime_refuses_a_plan_next_to_another_model(model_path, tmp_path):
    from export.build_engine import BuildOptions, build_engine
    from realtime.engine import EngineError, EngineOptions, open_engine

    report = build_engine(BuildOptions(model_path, tmp_path / "m.plan", cache_dir=tmp_path / "cache", max_batch=2))
    assert report.parity.passed
    with open_engine(EngineOptions(model_path, plan_path=report.plan_path)) as engine:
        assert engine.backend == "tensorrt" and engine.max_batch == 2
    other = make_tiny_model(tmp_path / "other.onnx", seed=9)
    with pytest.raises(EngineError, match="another model"):
        open_engine(EngineOptions(other, plan_path=report.plan_path))
    report.plan_path.write_bytes(report.plan_path.read_bytes()[:-10])
    with pytest.raises(EngineError, match="do not match"):
        open_engine(EngineOptions(model_path, backend="tensorrt", plan_path=report.plan_path))


# --- the cache plumbing around TensorRT, with its build and load stood in ----------------------

@pytest.fixture
def tensorrt_stand_in(monkeypatch, model_path):
    """TensorRT's two calls replaced where no GPU exists: the "plan" is the ONNX's bytes and the
    "engine" runs that ONNX on ONNX Runtime CPU (so parity holds). Everything else is real: keys,
    the engine cache, sidecars, parity checks, the plan written beside the model."""
    from realtime import engine_trt

    builds, loads = [], []

    def build_plan(onnx_bytes, precision, profile, workspace_mb=1024, timing_cache=None, source="model"):
        builds.append((precision, profile))
        return BuildOutput(onnx_bytes, b"TIMING")

    class LoadedPlan(OnnxRuntimeEngine):
        def __init__(self, plan, metadata, source, device_id=0):
            loads.append(plan)
            super().__init__(model_path)

    monkeypatch.setattr(engine_trt, "tensorrt_unavailable_reason", lambda device_id=0: None)
    monkeypatch.setattr(engine_trt, "current_environment", lambda device_id=0: ENV)
    monkeypatch.setattr(engine_trt, "build_plan", build_plan)
    monkeypatch.setattr(engine_trt, "TensorRTEngine", LoadedPlan)
    return builds, loads


def test_build_engine_builds_once_then_serves_the_cached_plan(model_path, tmp_path, tensorrt_stand_in):
    from export.build_engine import BuildOptions, build_engine

    builds, loads = tensorrt_stand_in
    options = BuildOptions(model_path, tmp_path / "m.plan", cache_dir=tmp_path / "cache", max_batch=4)
    first, second = build_engine(options), build_engine(options)
    assert builds == [("fp32", (1, 1, 4))] and not first.from_cache and second.from_cache
    assert first.parity.passed and loads == [model_path.read_bytes()] * 2
    plan, entry = read_plan(tmp_path / "m.plan")
    assert plan == model_path.read_bytes() and entry.key.environment == ENV
    assert entry.info["source_sha256"] == entry.key.onnx_sha256  # fp32: the plan's source is the model itself


def test_runtime_builds_on_first_use_and_then_loads_from_the_cache(model_path, tmp_path, tensorrt_stand_in):
    from realtime.engine import EngineOptions, open_engine

    builds, loads = tensorrt_stand_in
    options = EngineOptions(model_path, backend="tensorrt", precision="fp16", max_batch=2, cache_dir=tmp_path)
    for _ in range(2):
        with open_engine(options) as engine:
            assert engine.infer(synthetic_feeds(engine.metadata, 2))["logits"].shape[0] == 2
    assert builds == [("fp16", (1, 1, 2))] and len(loads) == 2
    _, entry = read_plan(next(tmp_path.glob("*.plan")))
    assert entry.key.onnx_sha256 == entry.info["source_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
