#!/usr/bin/env python3
"""Build a TensorRT plan from an AFNet-M ONNX export, cached, and check it against ONNX Runtime.

Usage:
    python export/build_engine.py model.onnx                         # fp32 -> model.fp32.plan
    python export/build_engine.py model.onnx --fp16 -o model.plan --max-batch 8
    python export/build_engine.py model.onnx --int8 --calib-data calib.npz   # or a directory of sample .npz
    python export/build_engine.py model.onnx --fp16 --cache-dir /var/cache/afnet --workspace 2048

Steps: read and check the model's metadata (ONNX Runtime CPU); for ``--int8`` write a Q/DQ copy
of the model from the calibration data (:mod:`calib.int8_calibration`); parse it with
TensorRT's ONNX parser (each parser error on its own line); build with one optimisation profile
over the batch axis (min 1, opt ``--opt-batch``, max ``--max-batch``) through the engine cache
(:mod:`realtime.engine_cache`: a plan for the same ONNX bytes, TensorRT, GPU, precision and
profile is reused, the timing cache persists); write the plan and its ``.json`` sidecar (the
model metadata the runtime needs) only if the same inputs run through TensorRT and through the
FP32 ONNX on ONNX Runtime CPU agree:

    fp32  max |prob diff| <= 1e-3
    fp16  max |prob diff| <= 1e-2 and top-1 agreement >= 99 %
    int8  top-1 agreement >= 97 %

(prob diff covers the class probabilities and the modality weights.) Parity inputs: the
calibration data if given (``--parity-data`` overrides), else synthetic feeds.

Exit codes: 0 built and in parity; 1 parity failed (no plan written; the build stays in the
cache); 2 bad input, TensorRT missing or the build failed (one line on stderr, parser errors one
per line).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from calib.int8_calibration import CalibrationDataError, iter_batches, load_feeds, quantize_qdq
from realtime.engine_cache import CacheError, EngineCache, write_plan
from realtime.engine import (Engine, EngineError, OnnxRuntimeEngine, probabilities, read_model_metadata,
                             synthetic_feeds)
from realtime.model_metadata import INPUT_NAMES, ModelMetadata, ModelMismatchError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ParityLimit:
    """What a precision must meet against the FP32 ONNX on ONNX Runtime CPU (None: not checked)."""

    max_prob_diff: float | None
    min_top1_agreement: float | None


PARITY_LIMITS = {
    "fp32": ParityLimit(1e-3, None),
    "fp16": ParityLimit(1e-2, 0.99),
    "int8": ParityLimit(None, 0.97),
}


@dataclass
class BuildOptions:
    """What to build; see the usage block for the flags."""

    onnx_path: Path
    output: Path | None = None
    precision: str = "fp32"
    calib_data: Path | None = None
    max_batch: int = 8
    opt_batch: int = 1
    workspace_mb: int = 1024
    cache_dir: Path | None = None
    parity_data: Path | None = None
    parity_samples: int = 256
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt batch ({self.opt_batch}) <= max batch ({self.max_batch})")
        if self.precision == "int8" and self.calib_data is None:
            raise ValueError("--int8 needs --calib-data (a calibration .npz or a directory of sample .npz)")
        if self.workspace_mb < 1:
            raise ValueError(f"workspace must be >= 1 MB, got {self.workspace_mb}")


@dataclass
class ParityReport:
    """TensorRT against the FP32 ONNX on ONNX Runtime CPU, over the same inputs."""

    precision: str
    samples: int
    max_abs_logit_diff: float
    max_abs_prob_diff: float  # class probabilities and modality weights
    top1_agreement: float
    passed: bool

    def describe(self) -> str:
        limit = PARITY_LIMITS[self.precision]
        wanted = []
        if limit.max_prob_diff is not None:
            wanted.append(f"prob diff <= {limit.max_prob_diff:g}")
        if limit.min_top1_agreement is not None:
            wanted.append(f"top-1 >= {limit.min_top1_agreement:.0%}")
        return (f"parity {'ok' if self.passed else 'FAILED'} ({self.precision}, {self.samples} samples): "
                f"max |logit diff| {self.max_abs_logit_diff:.3g}, max |prob diff| {self.max_abs_prob_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.2%}; needs {' and '.join(wanted)}")


@dataclass
class BuildReport:
    """What :func:`build_engine` did."""

    plan_path: Path
    precision: str
    environment: str
    build_seconds: float
    plan_size: int
    from_cache: bool
    parity: ParityReport


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str) -> ParityReport:
    """Parity of ``candidate`` outputs against ``reference`` outputs (same inputs, same order)."""
    ref_logits, cand_logits = reference["logits"], candidate["logits"]  # (N, NC)
    prob_diff = max(
        float(np.abs(probabilities(ref_logits) - probabilities(cand_logits)).max()),
        float(np.abs(reference["modality_weights"] - candidate["modality_weights"]).max()),  # (N, F, 2)
    )
    agreement = float(np.mean(ref_logits.argmax(axis=1) == cand_logits.argmax(axis=1)))
    limit = PARITY_LIMITS[precision]
    passed = ((limit.max_prob_diff is None or prob_diff <= limit.max_prob_diff)
              and (limit.min_top1_agreement is None or agreement >= limit.min_top1_agreement))
    return ParityReport(precision, len(ref_logits), float(np.abs(ref_logits - cand_logits).max()), prob_diff,
                        agreement, passed)


def run_all(engine: Engine, feeds: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Outputs of ``engine`` over a whole feed set, in batches of ``batch_size``."""
    parts = [engine.infer(batch) for batch in iter_batches(feeds, batch_size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def check_parity(reference: Engine, candidate: Engine, feeds: dict[str, np.ndarray], precision: str,
                 batch_size: int = 8) -> ParityReport:
    """Run ``feeds`` through both engines and compare (:func:`compare_outputs`)."""
    return compare_outputs(run_all(reference, feeds, batch_size), run_all(candidate, feeds, batch_size), precision)


def _qdq_model(options: BuildOptions, onnx_bytes: bytes, feeds: dict[str, np.ndarray], cache: EngineCache) -> Path:
    """The Q/DQ copy of the model for this calibration set, made once and kept in the cache."""
    digest = hashlib.sha256(onnx_bytes)
    for name in INPUT_NAMES:
        digest.update(feeds[name].tobytes())
    path = cache.root / f"qdq-{digest.hexdigest()[:32]}.onnx"
    if not path.exists():
        staged = cache.root / f".{path.name}.{os.getpid()}.tmp"
        quantize_qdq(options.onnx_path, staged, feeds)
        os.replace(staged, path)  # a crashed run never leaves a half model under the real name
    return path


def build_engine(options: BuildOptions) -> BuildReport:
    """Build (or reuse from the cache) a plan, write it with its sidecar, check parity.

    Raises:
        EngineError: TensorRT missing or the build failed (``TensorRTBuildError`` lists the
            parser's errors).
        ModelMismatchError: The model is not an AFNet-M export for this runtime.
        CalibrationDataError: Unusable calibration or parity data.
    """
    from realtime import engine_trt

    metadata = read_model_metadata(options.onnx_path)  # refuses foreign or stale models first
    reason = engine_trt.tensorrt_unavailable_reason(options.device_id)
    if reason:
        raise EngineError(reason)
    cache = EngineCache(options.cache_dir)
    calib = None
    source = Path(options.onnx_path)
    if options.precision == "int8":
        calib = load_feeds(options.calib_data, metadata.input_shapes)
        source = _qdq_model(options, source.read_bytes(), calib, cache)
    onnx_bytes = source.read_bytes()

    start = time.perf_counter()
    plan_bytes, entry = engine_trt.cached_plan(
        onnx_bytes, options.precision, (1, options.opt_batch, options.max_batch),
        engine_trt.plan_info(metadata, options.onnx_path), options.cache_dir, options.device_id,
        options.workspace_mb, source=str(source))
    seconds = time.perf_counter() - start
    parity_feeds = _parity_feeds(options, metadata, calib)
    with OnnxRuntimeEngine(options.onnx_path, "cpu") as reference, \
            engine_trt.TensorRTEngine(plan_bytes, metadata, str(entry.plan_path), options.device_id) as candidate:
        parity = check_parity(reference, candidate, parity_feeds, options.precision, min(8, options.max_batch))

    onnx_path = Path(options.onnx_path)
    output = options.output or onnx_path.with_name(f"{onnx_path.stem}.{options.precision}.plan")
    if parity.passed:  # a plan that failed parity stays in the cache only, never where it could be deployed
        write_plan(output, plan_bytes, entry.key, entry.info)
    return BuildReport(Path(output), options.precision, entry.key.environment.describe(), seconds, len(plan_bytes),
                       not entry.built, parity)


def _parity_feeds(options: BuildOptions, metadata: ModelMetadata, calib: dict[str, np.ndarray] | None) -> dict:
    if options.parity_data is not None:
        return load_feeds(options.parity_data, metadata.input_shapes, options.parity_samples)
    if calib is not None:
        return {name: array[: options.parity_samples] for name, array in calib.items()}
    return synthetic_feeds(metadata, options.parity_samples, seed=0)


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("onnx", type=Path, help="AFNet-M ONNX export (with its metadata)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="plan to write (default: next to the ONNX, <stem>.<precision>.plan)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_const", dest="precision", const="fp16", help="FP16 kernels allowed")
    precision.add_argument("--int8", action="store_const", dest="precision", const="int8",
                           help="INT8 from a Q/DQ copy of the model (needs --calib-data)")
    parser.add_argument("--calib-data", type=Path, default=None,
                        help="calibration set .npz (calib.int8_calibration write) or a directory of sample .npz")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the profile")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch the profile is tuned for (1: one face)")
    parser.add_argument("--workspace", type=int, default=1024, help="builder workspace limit, MB")
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default $AFNET_ENGINE_CACHE "
                        "or ~/.cache/afnet-realtime/engines)")
    parser.add_argument("--parity-data", type=Path, default=None, help="inputs for the parity check (.npz or dir)")
    parser.add_argument("--parity-samples", type=int, default=256)
    parser.add_argument("--device", type=int, default=0, help="CUDA device")
    args = parser.parse_args(argv)
    try:
        return BuildOptions(args.onnx, args.output, args.precision or "fp32", args.calib_data, args.max_batch,
                            args.opt_batch, args.workspace, args.cache_dir, args.parity_data, args.parity_samples,
                            args.device)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from realtime.engine_trt import TensorRTBuildError

    try:
        report = build_engine(options)
    except TensorRTBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    except (EngineError, ModelMismatchError, CalibrationDataError, CacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report.plan_path if report.parity.passed else 'not written: ' + str(report.plan_path)}: "
          f"{report.precision}, {report.plan_size / 2**20:.1f} MiB, "
          f"{'from cache' if report.from_cache else f'built in {report.build_seconds:.1f} s'}, {report.environment}")
    print(report.parity.describe())
    return 0 if report.parity.passed else 1


if __name__ == "__main__":
    sys.exit(main())
