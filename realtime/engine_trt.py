"""TensorRT 10 backend: build a plan from the ONNX, load it, run it with pinned buffers on one stream.

Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``) and the
CUDA runtime bindings of ``cuda-python`` (no torch, no pycuda). Both are imported only inside
the functions that need them, so importing this module never touches a GPU; a machine without
them gets one line from :func:`tensorrt_unavailable_reason`. TensorRT 11 removed the weak-typing
builder flags: there ``fp32`` and ``int8`` (a Q/DQ ONNX) still build, ``fp16`` is refused.

A plan carries no AFNet-M metadata, so it travels with a JSON sidecar (see
:mod:`realtime.engine_cache`) holding the model's metadata props and the TensorRT version, GPU and
profile it was built for; the engine refuses a plan whose sidecar is missing, does not match
the plan's bytes, or names another GPU or TensorRT version.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from realtime.engine_cache import (BuildEnvironment, BuildOutput, CacheError, EngineCache, EngineKey, PlanFile,
                                   read_plan)
from realtime.engine import Engine, EngineError, EngineOptions, read_model_metadata
from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'afnet-realtime[gpu]'"
_trt_logger_instance = None  # TensorRT wants one logger per process


class TensorRTBuildError(EngineError):
    """The ONNX parser or the builder failed; ``errors`` holds the parser's messages, one per line."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{source}: TensorRT's ONNX parser failed with {len(errors)} error(s)")


def import_tensorrt() -> Any:
    """``import tensorrt``, or one :class:`EngineError` line saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f": {exc}"
        raise EngineError(f"TensorRT is not installed ({INSTALL_HINT}){detail}") from None
    return tensorrt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (new and old module layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise EngineError(f"cuda-python is not installed ({INSTALL_HINT})") from None
    return cudart


def cuda_check(result: tuple, what: str) -> Any:
    """Unpack a cuda-python ``(error, *values)`` tuple; raise :class:`EngineError` on an error."""
    cudart = import_cudart()
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1].decode(errors="replace")
        raise EngineError(f"CUDA {what} failed: {name}")
    return values[0] if len(values) == 1 else (values or None)


def tensorrt_unavailable_reason(device_id: int = 0) -> str | None:
    """Why TensorRT cannot run here (one line), or None. Creates no TensorRT object."""
    try:
        import_tensorrt()
        cudart = import_cudart()
    except EngineError as exc:
        return str(exc)
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA GPU is visible (driver missing or CUDA_VISIBLE_DEVICES empty)"
    if device_id >= count:
        return f"CUDA device {device_id} does not exist ({count} visible)"
    return None


def current_environment(device_id: int = 0) -> BuildEnvironment:
    """TensorRT version, GPU name and compute capability of this machine."""
    trt = import_tensorrt()
    cudart = import_cudart()
    props = cuda_check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return BuildEnvironment(trt.__version__, name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


def _logger(trt: Any) -> Any:
    global _trt_logger_instance
    if _trt_logger_instance is None:
        _trt_logger_instance = trt.Logger(trt.Logger.WARNING)
    return _trt_logger_instance


def resolve_precision(precision: str) -> str:
    """``auto`` -> fp16 where this TensorRT has the FP16 builder flag (10.x), else fp32."""
    if precision != "auto":
        return precision
    return "fp16" if hasattr(import_tensorrt().BuilderFlag, "FP16") else "fp32"


def _set_precision(trt: Any, config: Any, precision: str) -> None:
    # int8 = a Q/DQ network (explicit quantisation); FP16 lets the layers between Q/DQ pairs
    # run in half precision instead of FP32.
    wanted = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    for name in wanted:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            config.set_flag(flag)
        elif precision == "fp16":
            raise EngineError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (removed in 11.x, networks are strongly "
                "typed): build fp32, or an FP16/Q-DQ ONNX"
            )
        # TensorRT 11: the Q/DQ nodes alone select INT8, nothing to set


def build_plan(
    onnx_bytes: bytes,
    precision: str,
    profile: tuple[int, int, int],
    workspace_mb: int = 1024,
    timing_cache: bytes | None = None,
    source: str = "model",
) -> BuildOutput:
    """Parse an ONNX model and build a serialized TensorRT plan.

    Args:
        onnx_bytes: The model (for ``int8``: a Q/DQ model, see :mod:`calib.int8_calibration`).
        precision: ``fp32``, ``fp16`` or ``int8``.
        profile: Batch sizes (min, opt, max) of the one optimisation profile.
        workspace_mb: Builder workspace memory pool limit.
        timing_cache: A serialized timing cache to start from (None: empty).
        source: Name of the model in error messages.

    Returns:
        The plan and the updated timing cache.

    Raises:
        TensorRTBuildError: The parser failed (its messages in ``errors``).
        EngineError: TensorRT missing or without a builder, or the build failed.
    """
    trt = import_tensorrt()
    if not hasattr(trt, "Builder"):
        raise EngineError(f"TensorRT {trt.__version__} here has no builder (tensorrt-lean?); install full TensorRT")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise TensorRTBuildError(source, [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)])

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    _set_precision(trt, config, precision)

    low, opt, high = profile
    optimization_profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        sample = tuple(tensor.shape)[1:]  # (C, H, W); the batch axis is the only dynamic one
        if any(d < 0 for d in sample):
            raise EngineError(f"{source}: input {tensor.name!r} has dynamic non-batch dims {tuple(tensor.shape)}")
        optimization_profile.set_shape(tensor.name, (low, *sample), (opt, *sample), (high, *sample))
    config.add_optimization_profile(optimization_profile)

    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT: saved timing cache rejected (other device?); starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{source}: TensorRT failed to build a {precision} engine (see the TensorRT log above)")
    return BuildOutput(bytes(plan), bytes(config.get_timing_cache().serialize()))


def _sha256_file(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise EngineError(f"{path}: cannot read the model ({exc.strerror or exc})") from None


def plan_info(metadata: ModelMetadata, onnx_path: str | Path, onnx_sha256: str | None = None) -> dict:
    """What a plan's sidecar records about its model: metadata props and the source ONNX's hash.

    The hash lets the runtime refuse a plan next to an ONNX it was not built from.
    """
    return {"metadata": metadata.to_props(), "source": str(onnx_path),
            "source_sha256": onnx_sha256 or _sha256_file(onnx_path)}


def metadata_from_plan_info(info: dict, source: str) -> ModelMetadata:
    """The model metadata stored in a plan's sidecar, checked against this runtime."""
    metadata = ModelMetadata.from_props(info.get("metadata") or {}, source=source)
    metadata.check_preprocessing(source)
    return metadata


class _PinnedBuffer:
    """``count`` float32 values in page-locked host memory plus the same on the device.

    Each allocation registers its release on ``stack`` as soon as it exists.
    """

    def __init__(self, cudart: Any, count: int, stack: ExitStack) -> None:
        nbytes = count * 4
        self.host_ptr = cuda_check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")
        stack.callback(cudart.cudaFreeHost, self.host_ptr)
        self.host = np.ctypeslib.as_array(ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_float)), (count,))
        self.device = cuda_check(cudart.cudaMalloc(nbytes), "cudaMalloc")
        stack.callback(cudart.cudaFree, self.device)


class TensorRTEngine(Engine):
    """A deserialized plan with one execution context, one CUDA stream and pinned I/O buffers.

    Buffers are sized for the profile's largest batch once; each call sets the input shapes for
    its batch, copies in, runs ``execute_async_v3`` and copies out on the one stream.
    Not thread-safe: one engine per inference thread.
    """

    backend = "tensorrt"

    def __init__(self, plan: bytes, metadata: ModelMetadata, source: str, device_id: int = 0) -> None:
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self._device_id = device_id
        self._source = source
        cuda_check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        with ExitStack() as stack:
            self._runtime = trt.Runtime(_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineError(
                    f"{source}: TensorRT cannot deserialize this plan (other TensorRT version or GPU?); "
                    "rebuild it with export/build_engine.py"
                )
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = {n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
            if inputs != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= set(names) - inputs:
                raise EngineError(f"{source}: plan tensors {names} are not the AFNet-M contract")
            for name in names:
                dtype = self._engine.get_tensor_dtype(name)
                if dtype != trt.DataType.FLOAT:
                    raise EngineError(f"{source}: tensor {name!r} is {dtype}, not float32")
            min_shape, _, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)
            self._min_batch, max_batch = int(min_shape[0]), int(max_shape[0])
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError(f"{source}: TensorRT could not create an execution context (GPU memory?)")
            self._stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
            stack.callback(cudart.cudaStreamDestroy, self._stream)
            self._buffers: dict[str, _PinnedBuffer] = {}
            for name in names:
                per_sample = math.prod(tuple(self._engine.get_tensor_shape(name))[1:])
                buffer = _PinnedBuffer(cudart, max_batch * per_sample, stack)
                self._buffers[name] = buffer
                self._context.set_tensor_address(name, buffer.device)
            self._resources = stack.pop_all()
        super().__init__(metadata, max_batch=max_batch)

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        batch = feeds[INPUT_NAMES[0]].shape[0]
        if batch < self._min_batch:
            raise ValueError(f"{self._source}: batch {batch} is below the plan's profile minimum {self._min_batch}")
        # The runtime thread may not be the one that opened the engine; the device is per thread.
        cuda_check(cudart.cudaSetDevice(self._device_id), "cudaSetDevice")
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in INPUT_NAMES:
            array, buffer = feeds[name], self._buffers[name]
            buffer.host[: array.size] = array.reshape(-1)
            if not self._context.set_input_shape(name, array.shape):
                raise EngineError(f"{self._source}: TensorRT refused shape {array.shape} for {name!r}")
            cuda_check(cudart.cudaMemcpyAsync(buffer.device, buffer.host_ptr, array.nbytes, to_device, self._stream),
                       "cudaMemcpyAsync (to device)")
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError(f"{self._source}: TensorRT execution failed (see the TensorRT log)")
        shapes = {name: tuple(self._context.get_tensor_shape(name)) for name in OUTPUT_NAMES}
        for name, shape in shapes.items():
            buffer = self._buffers[name]
            cuda_check(cudart.cudaMemcpyAsync(buffer.host_ptr, buffer.device, math.prod(shape) * 4, to_host,
                                              self._stream), "cudaMemcpyAsync (to host)")
        cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: self._buffers[name].host[: math.prod(shape)].reshape(shape).copy()
                for name, shape in shapes.items()}

    def close(self) -> None:
        if self._closed:
            return
        self._cudart.cudaStreamSynchronize(self._stream)
        self._resources.close()  # buffers and stream, in reverse order of creation
        self._buffers = {}
        self._context = self._engine = self._runtime = None  # context before engine before runtime
        super().close()


def open_tensorrt_engine(
    options: EngineOptions, plan: str | Path | None, onnx_path: str | Path | None
) -> TensorRTEngine:
    """Load ``plan`` (checked against its sidecar and this machine), or build one from the ONNX.

    Without a plan, the ONNX is built once into the engine cache (``options.cache_dir``) with
    precision ``options.precision`` and batch profile (1, 1, ``options.max_batch``), and loaded
    from there afterwards.
    """
    environment = current_environment(options.device_id)
    if plan is not None:
        try:
            plan_bytes, entry = read_plan(plan)
        except CacheError as exc:
            raise EngineError(str(exc)) from None
        if entry.key.environment != environment:
            raise EngineError(
                f"{plan}: built for {entry.key.environment.describe()}, this machine has {environment.describe()}; "
                "rebuild it with export/build_engine.py"
            )
        if onnx_path is not None and entry.info.get("source_sha256") != _sha256_file(onnx_path):
            raise EngineError(
                f"{plan}: built from another model than {onnx_path}; rebuild it with export/build_engine.py"
            )
        return TensorRTEngine(plan_bytes, metadata_from_plan_info(entry.info, str(plan)), str(plan), options.device_id)

    if onnx_path is None:
        raise EngineError("backend 'tensorrt' needs a plan or an ONNX model to build one from")
    metadata = read_model_metadata(onnx_path)
    onnx_bytes = Path(onnx_path).read_bytes()
    onnx_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
    try:
        plan_bytes, entry = cached_plan(onnx_bytes, resolve_precision(options.precision), (1, 1, options.max_batch),
                                        plan_info(metadata, onnx_path, onnx_sha256), options.cache_dir,
                                        options.device_id, source=str(onnx_path), onnx_sha256=onnx_sha256)
    except CacheError as exc:
        raise EngineError(str(exc)) from None
    return TensorRTEngine(plan_bytes, metadata, str(entry.plan_path), options.device_id)


def cached_plan(
    onnx_bytes: bytes,
    precision: str,
    profile: tuple[int, int, int],
    info: dict,
    cache_dir: str | Path | None = None,
    device_id: int = 0,
    workspace_mb: int = 1024,
    source: str = "model",
    onnx_sha256: str | None = None,
) -> tuple[bytes, PlanFile]:
    """The plan for ``onnx_bytes`` on this GPU from the engine cache; TensorRT builds it on a miss
    (once across processes, from the saved timing cache). ``info`` goes into the sidecar
    (:func:`plan_info`); ``onnx_sha256`` is the bytes' hash where the caller has it already; the
    other arguments are :func:`build_plan`'s.

    Raises:
        EngineError: The build failed. CacheError: The cache could not be written.
    """
    key = EngineKey(onnx_sha256 or hashlib.sha256(onnx_bytes).hexdigest(), current_environment(device_id), precision,
                    profile)

    def build(timing_cache: bytes | None) -> BuildOutput:
        log.info("engine: building a %s TensorRT plan for %s (first use; cached afterwards)", precision, source)
        return build_plan(onnx_bytes, precision, profile, workspace_mb, timing_cache, source=source)

    return EngineCache(cache_dir).get_or_build(key, build, info)
