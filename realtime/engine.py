"""Inference engines: one interface over ONNX Runtime (CPU/CUDA), TensorRT and a Triton server.

Every backend is an :class:`Engine`: its public :meth:`Engine.infer` checks the feeds against the
model's metadata (names, float32, rank, per-sample shape, one batch size) and splits batches
larger than the backend allows, then ``_infer_impl`` does the work. Backends are picked by
:func:`open_engine`::

    with open_engine(EngineOptions("model.onnx")) as engine:   # auto: TensorRT plan > ORT CUDA > ORT CPU
        out = engine.infer({"texture": t, "geometry": g, "masks": m})   # (B,3,112,112), (B,4,..), (B,6,..)
        probs = probabilities(out["logits"])                             # (B, NC)

A model is read through ONNX Runtime's ``custom_metadata_map`` and refused (one line,
:class:`ModelMismatchError`) unless it was exported for this runtime's preprocessing. TensorRT
(:mod:`realtime.engine_trt`) and tritonclient (:mod:`realtime.engine_triton`) are imported only
when asked for, so this module works on a machine with neither. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata, ModelMismatchError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "triton")
PRECISIONS = ("auto", "fp32", "fp16")  # what a TensorRT build on first use may ask for
DEFAULT_TRITON_MODEL = "afnet_m"  # the name export/triton_repo.py gives the model


class EngineError(RuntimeError):
    """An engine cannot be opened or run; the message is one line naming the file or backend."""


@dataclass
class EngineOptions:
    """How to open an engine.

    Attributes:
        model_path: The exported ONNX model, the source of the metadata (not needed for
            ``triton``, where the server's model config is).
        backend: One of :data:`BACKENDS`. ``auto`` takes TensorRT when a plan is given and
            TensorRT and a GPU are present, else ONNX Runtime CUDA when its provider is
            available, else ONNX Runtime CPU, logging one line for each step down.
        plan_path: A TensorRT plan built by ``export/build_engine.py`` (with its ``.json``
            sidecar). ``model_path`` may itself be a ``.plan``.
        threads: ONNX Runtime CPU intra-op threads.
        triton_url: ``host:port`` of a Triton server's HTTP endpoint (backend ``triton``).
        triton_model: Model name on the Triton server (default ``afnet_m``, the name
            ``export/triton_repo.py`` gives).
        precision: TensorRT build on first use (``tensorrt`` without a plan): ``auto`` is fp16
            where this TensorRT has the FP16 builder flag (10.x), else fp32.
        max_batch: Largest batch of a TensorRT plan built on first use.
        cache_dir: Engine cache of builds on first use (default
            :func:`realtime.engine_cache.default_cache_dir`).
        device_id: CUDA device for TensorRT and ONNX Runtime CUDA.
    """

    model_path: str | Path | None
    backend: str = "auto"
    plan_path: str | Path | None = None
    threads: int = 2
    triton_url: str | None = None
    triton_model: str = DEFAULT_TRITON_MODEL
    precision: str = "auto"
    max_batch: int = 8
    cache_dir: str | Path | None = None
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown engine backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.backend == "triton" and not self.triton_url:
            raise ValueError("backend 'triton' needs triton_url (--triton-url host:port)")
        if self.backend != "triton" and self.model_path is None and self.plan_path is None:
            raise ValueError(f"backend {self.backend!r} needs a model (--model model.onnx) or a plan")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineOptions":
        """Options from the flags that :func:`add_engine_arguments` added."""
        return cls(
            model_path=args.model, backend=args.backend, plan_path=args.plan, threads=args.threads,
            triton_url=args.triton_url, triton_model=args.triton_model,
        )


def add_engine_arguments(parser: argparse.ArgumentParser, model_default: str | None = None) -> None:
    """Add the engine flags every entry script shares (``--model --backend --plan ...``)."""
    group = parser.add_argument_group("inference engine")
    group.add_argument("--model", default=model_default, help="exported AFNet-M ONNX model")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="auto: TensorRT plan if given and usable, else ONNX Runtime CUDA, else CPU")
    group.add_argument("--plan", default=None, help="TensorRT plan from export/build_engine.py")
    group.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    group.add_argument("--triton-url", default=None, help="Triton HTTP endpoint host:port (backend triton)")
    group.add_argument("--triton-model", default=DEFAULT_TRITON_MODEL, help="model name on the Triton server")


class Engine:
    """Base of every backend: validated ``infer`` around a backend's ``_infer_impl``.

    Attributes:
        metadata: What the model declares (classes, input shapes, fuse stages, ...).
        backend: The backend's name, one of :data:`BACKENDS` other than ``auto``.
        max_batch: Largest batch one ``_infer_impl`` call accepts (None: any); ``infer``
            splits larger batches.
    """

    backend: str = "base"

    def __init__(self, metadata: ModelMetadata, max_batch: int | None = None) -> None:
        self.metadata = metadata
        self.max_batch = max_batch
        self._closed = False

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in logit order."""
        return self.metadata.class_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one batch.

        Args:
            feeds: ``texture`` (B,3,H,W), ``geometry`` (B,4,H,W), ``masks`` (B,6,H,W), float32.

        Returns:
            ``logits`` (B, NC) and ``modality_weights`` (B, F, 2), float32.

        Raises:
            ValueError: A feed is missing, unknown, not float32, of the wrong rank or shape, or
                the batch sizes differ; the message names the input.
            EngineError: The engine is closed or the backend failed.
        """
        if self._closed:
            raise EngineError(f"{self.backend} engine is closed")
        batch = self._check_feeds(feeds)
        feeds = {name: np.ascontiguousarray(feeds[name]) for name in INPUT_NAMES}
        if self.max_batch is None or batch <= self.max_batch:
            return self._infer_impl(feeds)
        chunks = [
            self._infer_impl({name: array[start:start + self.max_batch] for name, array in feeds.items()})
            for start in range(0, batch, self.max_batch)
        ]
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in OUTPUT_NAMES}

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> int:
        """Validate ``feeds`` against the metadata; return the batch size."""
        if not isinstance(feeds, dict):
            raise ValueError(f"feeds must be a dict of arrays named {', '.join(INPUT_NAMES)}")
        unknown = sorted(set(feeds) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"unknown input {unknown[0]!r}; the model takes {', '.join(INPUT_NAMES)}")
        batch = None
        for name in INPUT_NAMES:
            if name not in feeds:
                raise ValueError(f"input {name!r} is missing")
            array = feeds[name]
            if not isinstance(array, np.ndarray):
                raise ValueError(f"input {name!r} is a {type(array).__name__}, expected a numpy array")
            if array.dtype != np.float32:
                raise ValueError(f"input {name!r} has dtype {array.dtype}, expected float32")
            expected = tuple(self.metadata.input_shapes[name])
            if array.ndim != 1 + len(expected) or array.shape[1:] != expected:
                raise ValueError(
                    f"input {name!r} has shape {tuple(array.shape)}, expected (B, {', '.join(map(str, expected))})"
                )
            if array.shape[0] < 1:
                raise ValueError(f"input {name!r} has an empty batch")
            if batch is not None and array.shape[0] != batch:
                raise ValueError(f"input {name!r} has batch {array.shape[0]}, the other inputs have {batch}")
            batch = array.shape[0]
        return batch

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's resources; further ``infer`` calls raise :class:`EngineError`."""
        self._closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (B, NC) from logits (B, NC)."""
    return softmax(np.asarray(logits, dtype=np.float32), axis=-1)


def synthetic_feeds(metadata: ModelMetadata, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Smooth random feeds of the model's shapes, for warm-up, benchmarks and parity checks.

    Each sample and channel is a different low-frequency pattern (a 4x4 random grid, upsampled)
    at a random gain, so even globally pooled features differ clearly between samples, which
    per-pixel noise would average away. Values lie in [0, 1] ([-1, 0] for geometry).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in INPUT_NAMES:
        channels, height, width = metadata.input_shapes[name]
        gain = rng.random((batch, channels, 1, 1), dtype=np.float32)
        coarse = gain * (0.5 + 0.5 * rng.random((batch, channels, 4, 4), dtype=np.float32))  # (B, C, 4, 4)
        rows = np.minimum(np.arange(height) * 4 // height, 3)
        cols = np.minimum(np.arange(width) * 4 // width, 3)
        fine = coarse[:, :, rows][:, :, :, cols]  # (B, C, H, W)
        if name == "geometry":
            fine = -fine  # depth/50 is <= 0 behind the nose tip
        feeds[name] = np.ascontiguousarray(fine, dtype=np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def _ort_load_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exceptions for a file it cannot load (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.NoSuchFile,
            state.NotImplemented, state.RuntimeException, state.EPFail)


def create_session(
    model_path: str | Path, providers: list, threads: int = 2, optimize: bool = True, spin: bool = False
) -> "onnxruntime.InferenceSession":  # noqa: F821
    """Create an ONNX Runtime session; a missing or unloadable file is one :class:`EngineError` line.

    ``spin`` keeps ORT's default of workers spinning between runs (benchmarks compare it).
    """
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise EngineError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Workers sleep between runs instead of spinning: at one small batch per frame, spinning
    # threads steal the cores from capture and MediaPipe (2-core box under load: unpaced 36-60
    # -> 70-84 fps, paced p99 41-54 -> 22-25 ms; idle p50 costs ~1.3 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only: fallbacks are reported by this module
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except _ort_load_errors() as exc:
        reason = " ".join(str(exc).split())[:300]
        raise EngineError(f"{path}: ONNX Runtime cannot load the model ({reason})") from None


def metadata_from_session(session: "onnxruntime.InferenceSession", source: str) -> ModelMetadata:  # noqa: F821
    """Read and check the AFNet-M metadata of an open session (refuses other preprocessing)."""
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, source=source)
    metadata.check_preprocessing(source)
    names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
    if set(names[0]) != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= set(names[1]):
        raise ModelMismatchError(
            f"{source}: model inputs {names[0]} / outputs {names[1]} are not the AFNet-M contract "
            f"{INPUT_NAMES} / {OUTPUT_NAMES}"
        )
    return metadata


def read_model_metadata(model_path: str | Path) -> ModelMetadata:
    """Metadata of an ONNX file, checked against this runtime (ONNX Runtime CPU reads it)."""
    session = create_session(model_path, ["CPUExecutionProvider"], threads=1, optimize=False)
    return metadata_from_session(session, str(model_path))


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the CPU or through its CUDA execution provider."""

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int = 2, device_id: int = 0) -> None:
        """Open ``model_path``.

        Args:
            model_path: The ONNX model.
            device: ``cpu`` or ``cuda``.
            threads: Intra-op threads (CPU work, including CPU fallback nodes under CUDA).
            device_id: CUDA device.

        Raises:
            EngineError: The file is missing or unloadable, or ``cuda`` was asked for and the
                CUDA provider could not be set up.
            ModelMismatchError: Metadata missing or for another preprocessing.
        """
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self._session = create_session(model_path, providers, threads=threads)
        metadata = metadata_from_session(self._session, str(model_path))
        # ORT silently drops a provider whose libraries fail to load; a CUDA engine that runs on
        # the CPU would be a lie, so say so.
        if device == "cuda" and self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineError(
                f"{model_path}: ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries missing?)"
            )
        self.backend = f"onnxruntime-{device}"
        super().__init__(metadata)

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(list(OUTPUT_NAMES), feeds)
        return dict(zip(OUTPUT_NAMES, values))

    def close(self) -> None:
        self._session = None
        super().close()


# ---------------------------------------------------------------------------------------------
# Choosing a backend


def _is_plan(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix in (".plan", ".engine")


def open_engine(options: EngineOptions) -> Engine:
    """Open the engine ``options`` ask for (see :class:`EngineOptions` for ``auto``).

    Raises:
        EngineError: A forced backend is unavailable, or a file is missing or unloadable.
        ModelMismatchError: The model is not an AFNet-M export for this runtime's preprocessing.
    """
    from realtime import engine_trt  # no TensorRT import at module level

    plan = options.plan_path if options.plan_path is not None else (
        options.model_path if _is_plan(options.model_path) else None)
    onnx_path = None if _is_plan(options.model_path) else options.model_path

    if options.backend == "triton":
        from realtime.engine_triton import TritonEngine

        return TritonEngine(options.triton_url, options.triton_model)

    if options.backend == "tensorrt":
        reason = engine_trt.tensorrt_unavailable_reason(options.device_id)
        if reason:
            raise EngineError(reason)
        return engine_trt.open_tensorrt_engine(options, plan, onnx_path)

    if options.backend == "auto" and plan is not None:
        reason = engine_trt.tensorrt_unavailable_reason(options.device_id)
        if reason is None:
            return engine_trt.open_tensorrt_engine(options, plan, onnx_path)
        log.warning("engine: not using the TensorRT plan %s: %s", plan, reason)
        if onnx_path is None:
            raise EngineError(f"{plan}: a TensorRT plan needs TensorRT ({reason}) and no ONNX model was given")

    if onnx_path is None:
        raise EngineError(f"backend {options.backend!r} needs an ONNX model (--model model.onnx), not only a plan")

    if options.backend in ("auto", "onnxruntime-cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                return OnnxRuntimeEngine(onnx_path, "cuda", options.threads, options.device_id)
            except EngineError as exc:
                if options.backend == "onnxruntime-cuda":
                    raise
                log.info("engine: ONNX Runtime CUDA unusable, using the CPU: %s", exc)
        elif options.backend == "onnxruntime-cuda":
            raise EngineError(
                "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu instead of onnxruntime)"
            )
        else:
            log.info("engine: ONNX Runtime has no CUDA provider here, using the CPU (%d threads)", options.threads)
    return OnnxRuntimeEngine(onnx_path, "cpu", options.threads)
