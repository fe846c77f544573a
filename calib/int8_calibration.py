#!/usr/bin/env python3
"""INT8 by explicit quantisation: write a calibration set, then insert Q/DQ nodes into the ONNX.

Usage:
    python -m calib.int8_calibration write SAMPLES_DIR -o calib.npz [--max-samples 512] [--seed 0]
    python -m calib.int8_calibration write session.db3 -o calib.npz     # a recording, through the live path
    python -m calib.int8_calibration quantize model.onnx --calib calib.npz -o model.int8.onnx \
        [--method minmax|entropy|percentile]
    python export/build_engine.py model.onnx --int8 --calib-data calib.npz     # does both steps itself

Why Q/DQ: TensorRT 10.1 deprecated its implicit INT8 calibrators and 11.x removed them, along
with the INT8 builder flag; a Q/DQ ONNX (explicit quantisation) builds on 10.x and 11.x alike,
runs in ONNX Runtime too (so its accuracy can be checked on the CPU), and pins exactly which
tensors are INT8. ONNX Runtime's ``quantize_static`` inserts the nodes from activation ranges
measured on the calibration set: signed INT8, symmetric (zero point 0, as TensorRT requires),
per-channel weights, convolutions only by default (``--op-types``).

Samples (``write``): every ``*.npz`` under SAMPLES_DIR (recursively) that is either a sample of
the preprocessing cache (``python -m train.preprocess``: canonical maps, normalised here by
``realtime.model_inputs.arrays_to_feeds``) or holds the three model inputs ``texture`` (3,H,W),
``geometry`` (4,H,W) and ``masks`` (6,H,W) as floating-point arrays, each either one sample
(C,H,W) or a stack (N,C,H,W); other keys are ignored, and a file that fits neither (or was cached
by another preprocessing version) is skipped with one warning line. A ``.bag``/``.db3``
recording (or a demo clip) instead runs through the live path: capture, FaceMesh, canonical maps.

The calibration set (``calib.npz``) holds the three inputs stacked (N,C,H,W) float32 and the
``preprocessing_version`` of the runtime that wrote it; a model for other preprocessing is
refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from realtime.model_inputs import ARRAY_KEYS, arrays_to_feeds
from realtime.model_metadata import INPUT_NAMES, ModelMismatchError
from realtime.spec import GEOMETRY_CHANNELS, MASK_NAMES, PREPROCESSING_VERSION, SPEC

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("Conv",)
VERSION_KEY = "preprocessing_version"


class CalibrationDataError(ValueError):
    """Calibration data cannot be used; the message is one line naming the file."""


def default_input_shapes() -> dict[str, list[int]]:
    """Per-sample input shapes (C, H, W) of the current spec."""
    channels = {"texture": 3, "geometry": len(GEOMETRY_CHANNELS), "masks": len(MASK_NAMES)}
    return {name: [channels[name], SPEC.size, SPEC.size] for name in INPUT_NAMES}


def load_sample_file(path: str | Path, input_shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The model inputs stored in one sample ``.npz``, stacked (N, C, H, W) float32.

    Raises:
        CalibrationDataError: Unreadable, an input missing, not floating point, wrong shape,
            or inputs with different sample counts.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if all(k in data.files for k in ARRAY_KEYS):  # a preprocessing-cache sample (train.cache)
                version = str(data["version"]) if "version" in data.files else PREPROCESSING_VERSION
                if version != PREPROCESSING_VERSION:
                    raise CalibrationDataError(f"{path}: cached by preprocessing {version!r}, "
                                               f"this runtime makes {PREPROCESSING_VERSION!r}")
                return arrays_to_feeds([{k: data[k] for k in ARRAY_KEYS}])
            arrays = {name: data[name] for name in INPUT_NAMES if name in data.files}
    except CalibrationDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # damaged members too
        raise CalibrationDataError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    feeds = {}
    for name in INPUT_NAMES:
        if name not in arrays:
            raise CalibrationDataError(f"{path}: no {name!r} array")
        array = arrays[name]
        if not np.issubdtype(array.dtype, np.floating):
            raise CalibrationDataError(f"{path}: {name!r} has dtype {array.dtype}, expected floating point")
        expected = tuple(input_shapes[name])
        if array.shape == expected:
            array = array[None]
        if array.ndim != 4 or array.shape[1:] != expected:
            raise CalibrationDataError(
                f"{path}: {name!r} has shape {array.shape}, expected {expected} or (N, *{expected})"
            )
        feeds[name] = array.astype(np.float32, copy=False)
    counts = {len(a) for a in feeds.values()}
    if len(counts) != 1:
        raise CalibrationDataError(f"{path}: the inputs hold different sample counts {sorted(counts)}")
    return feeds


def collect_samples(
    samples_dir: str | Path, input_shapes: dict[str, list[int]], max_samples: int = 512, seed: int = 0
) -> dict[str, np.ndarray]:
    """A calibration set from a directory of sample ``.npz`` files (bad files skipped, logged).

    If there are more than ``max_samples`` samples, a seeded random subset is kept.

    Raises:
        CalibrationDataError: The directory is missing or holds no usable sample.
    """
    samples_dir = Path(samples_dir)
    if not samples_dir.is_dir():
        raise CalibrationDataError(f"{samples_dir}: not a directory")
    parts = []
    for path in sorted(samples_dir.rglob("*.npz")):
        try:
            parts.append(load_sample_file(path, input_shapes))
        except CalibrationDataError as exc:
            log.warning("calibration: skipping %s", exc)
    if not parts:
        raise CalibrationDataError(f"{samples_dir}: no usable sample .npz (each needs {', '.join(INPUT_NAMES)})")
    feeds = {name: np.concatenate([part[name] for part in parts]) for name in INPUT_NAMES}
    count = len(feeds[INPUT_NAMES[0]])
    if count > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(count, size=max_samples, replace=False))
        feeds = {name: array[keep] for name, array in feeds.items()}
    return feeds


def samples_from_recording(source: str | Path, max_samples: int = 512, every: int = 3) -> dict[str, np.ndarray]:
    """A calibration set from a ``.bag``/``.db3`` recording or a demo clip, through the live path.

    Every ``every``-th frame goes through capture (as fast as possible, nothing dropped),
    FaceMesh and the canonical stage, exactly as ``run_camera.py`` would process it; each face
    that canonicalises becomes one sample.

    Raises:
        CalibrationDataError: The recording cannot be opened or yields no usable face.
    """
    from realtime.canonical import Canonicalizer
    from realtime.capture import CaptureError, CaptureOptions, CaptureThread, resolve_source
    from realtime.landmarks import LandmarkDetector
    from realtime.model_inputs import face_to_arrays

    options = CaptureOptions(source=str(source), realtime=False, loop=False)
    samples = []
    try:
        with CaptureThread(resolve_source(options), options) as capture, LandmarkDetector() as detector, \
                Canonicalizer() as canonicalizer:
            while len(samples) < max_samples and (frame := capture.get(timeout=10.0)) is not None:
                if frame.sequence % every:
                    continue
                for face in detector.process(frame):
                    result = canonicalizer.process(frame, face)
                    if result.ok:
                        samples.append(face_to_arrays(result.face))
    except CaptureError as exc:
        raise CalibrationDataError(str(exc)) from None
    if not samples:
        raise CalibrationDataError(f"{source}: no face could be canonicalised in the recording")
    return arrays_to_feeds(samples[:max_samples])


def write_calibration_set(path: str | Path, feeds: dict[str, np.ndarray]) -> Path:
    """Save a calibration set (the three inputs and this runtime's preprocessing version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, **{name: feeds[name] for name in INPUT_NAMES}, **{VERSION_KEY: np.array(PREPROCESSING_VERSION)})
    return path


def load_calibration_set(path: str | Path, input_shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Read a set that :func:`write_calibration_set` wrote; refuse one for other preprocessing."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            version = str(data[VERSION_KEY]) if VERSION_KEY in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz ({exc})") from None
    if version is not None and version != PREPROCESSING_VERSION:
        raise ModelMismatchError(
            f"{path}: calibration set made for preprocessing {version!r}, this runtime makes {PREPROCESSING_VERSION!r}"
        )
    return load_sample_file(path, input_shapes)


def load_feeds(path: str | Path, input_shapes: dict[str, list[int]], max_samples: int = 512) -> dict[str, np.ndarray]:
    """A calibration set from a ``.npz`` set file or a directory of sample files."""
    path = Path(path)
    if path.is_dir():
        return collect_samples(path, input_shapes, max_samples)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such calibration file or directory")
    feeds = load_calibration_set(path, input_shapes)
    return {name: array[:max_samples] for name, array in feeds.items()}


def iter_batches(feeds: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches (B, C, H, W) of a feed set."""
    count = len(feeds[INPUT_NAMES[0]])
    for start in range(0, count, batch_size):
        yield {name: np.ascontiguousarray(array[start:start + batch_size]) for name, array in feeds.items()}


def _reader(feeds: dict[str, np.ndarray], batch_size: int) -> "CalibrationDataReader":  # noqa: F821
    """An ONNX Runtime ``CalibrationDataReader`` over ``feeds``."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter_batches(feeds, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter_batches(feeds, batch_size)

    return FeedsReader()


def quantize_qdq(
    onnx_path: str | Path,
    out_path: str | Path,
    feeds: dict[str, np.ndarray],
    method: str = "minmax",
    op_types: tuple[str, ...] | None = DEFAULT_OP_TYPES,
    batch_size: int = 8,
) -> Path:
    """Write a Q/DQ (explicitly quantised, INT8) copy of an ONNX model.

    The model is first cleaned by ONNX Runtime's quantisation pre-processing (shape inference,
    basic graph optimisations such as folding the exporter's Identity nodes into initializers),
    then ``quantize_static`` inserts the Q/DQ nodes.

    Args:
        onnx_path: The FP32 model; its metadata props are carried over.
        out_path: Where to write the Q/DQ model.
        feeds: Calibration inputs (N, C, H, W) per input name.
        method: Activation range estimate: ``minmax``, ``entropy`` or ``percentile``.
        op_types: Operator types to quantise (None: every type ONNX Runtime can). The default,
            convolutions only, is where the time goes; the small MA/IWC MLPs, gates and the
            head stay in float, which kept top-1 much closer to FP32 on afnet_m_rt.
        batch_size: Calibration batch size.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="afnet-qdq-") as tmp:
        # quantize_static writes its augmented model next to the output; keep those files out of sight
        cleaned, staged = Path(tmp) / "model.pre.onnx", Path(tmp) / "model.qdq.onnx"
        quant_pre_process(str(onnx_path), str(cleaned))
        quantize_static(
            str(cleaned), str(staged), _reader(feeds, batch_size),
            op_types_to_quantize=list(op_types) if op_types else None,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=calibrate,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True},
        )
        model = onnx.load(str(staged))
    source_props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **source_props})
    onnx.save(model, str(out_path))
    return out_path


def _model_input_shapes(model: str | None) -> dict[str, list[int]]:
    if model is None:
        return default_input_shapes()
    from realtime.engine import read_model_metadata

    return read_model_metadata(model).input_shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a calibration set from samples or a recording")
    write.add_argument("samples", help="directory of sample .npz files (a preprocessing cache or model feeds), "
                                       "or a .bag/.db3 recording or demo-clip .npz to run through the live path")
    write.add_argument("-o", "--output", required=True, help="calibration set .npz to write")
    write.add_argument("--max-samples", type=int, default=512)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--model", default=None, help="ONNX model whose input shapes to check against")
    quant = commands.add_parser("quantize", help="write a Q/DQ INT8 copy of an ONNX model")
    quant.add_argument("model", help="FP32 ONNX model")
    quant.add_argument("--calib", required=True, help="calibration set .npz or directory of sample .npz")
    quant.add_argument("-o", "--output", required=True, help="Q/DQ ONNX model to write")
    quant.add_argument("--method", choices=METHODS, default="minmax")
    quant.add_argument("--op-types", default=",".join(DEFAULT_OP_TYPES),
                       help="comma-separated operator types to quantise ('all': every supported type)")
    quant.add_argument("--max-samples", type=int, default=512)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from realtime.engine import EngineError

    try:
        if args.command == "write":
            if Path(args.samples).is_dir():
                feeds = collect_samples(args.samples, _model_input_shapes(args.model), args.max_samples, args.seed)
            else:
                feeds = samples_from_recording(args.samples, args.max_samples)
            path = write_calibration_set(args.output, feeds)
            print(f"wrote {path}: {len(feeds[INPUT_NAMES[0]])} samples")
        else:
            shapes = _model_input_shapes(args.model)
            feeds = load_feeds(args.calib, shapes, args.max_samples)
            op_types = None if args.op_types == "all" else tuple(t for t in args.op_types.split(",") if t)
            path = quantize_qdq(args.model, args.output, feeds, args.method, op_types)
            print(f"wrote {path}: Q/DQ INT8 ({args.method}, {len(feeds[INPUT_NAMES[0]])} calibration samples)")
    except (CalibrationDataError, ModelMismatchError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
