"""Inference latency of each engine backend on one model: ONNX Runtime CPU/CUDA, TensorRT FP16/INT8.

Usage:
    python bench/bench_engine.py model.onnx                        # every backend available here
    python bench/bench_engine.py model.onnx --batches 1,8 --runs 300 --warmup 30
    python bench/bench_engine.py model.onnx --plan-fp16 m.fp16.plan --plan-int8 m.int8.plan
    python bench/bench_engine.py model.onnx --calib-data calib.npz  # builds the TensorRT plans (cached) first

Rows: ONNX Runtime CPU with 2 (the baseline) and 1 threads, ONNX Runtime CUDA, TensorRT FP16 and INT8, each at
every batch size; a backend that cannot run here prints ``skipped: <reason>``. TensorRT plans
come from --plan-fp16/--plan-int8, else are built through the engine cache (INT8 needs
--calib-data). Each figure is the median and p90 of --runs timed ``Engine.infer`` calls (host
arrays in, host arrays out: copies included) after --warmup untimed ones, on synthetic inputs.
``x CPU2`` is the per-sample speed relative to ONNX Runtime CPU, 2 threads, same batch, same
run: compare ratios within one run, not absolute figures across machines or runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calib.int8_calibration import CalibrationDataError
from realtime.engine import Engine, EngineError, EngineOptions, open_engine, read_model_metadata, synthetic_feeds
from realtime.model_metadata import ModelMismatchError


@dataclass
class Timing:
    median_ms: float
    p90_ms: float


def time_engine(engine: Engine, batch: int, runs: int, warmup: int) -> Timing:
    """Median and p90 latency of ``engine.infer`` at ``batch``."""
    feeds = synthetic_feeds(engine.metadata, batch, seed=batch)
    for _ in range(warmup):
        engine.infer(feeds)
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        engine.infer(feeds)
        samples[i] = time.perf_counter() - start
    return Timing(float(np.median(samples)) * 1e3, float(np.percentile(samples, 90)) * 1e3)


def _tensorrt_plan(args: argparse.Namespace, precision: str) -> Path:
    """The plan for ``precision``: given on the command line, or built (and parity-checked) now."""
    given = args.plan_fp16 if precision == "fp16" else args.plan_int8
    if given is not None:
        return given
    from realtime.engine_trt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise EngineError(reason)
    if precision == "int8" and args.calib_data is None:
        raise EngineError("INT8 needs --plan-int8 or --calib-data")
    from export.build_engine import BuildOptions, build_engine

    output = Path(args.cache_dir or ".") / f"{Path(args.model).stem}.bench.{precision}.plan"
    report = build_engine(BuildOptions(Path(args.model), output, precision, args.calib_data,
                                       max_batch=max(args.batches), cache_dir=args.cache_dir))
    print(f"  built {report.plan_path} ({report.parity.describe()})")
    return report.plan_path


def backends(args: argparse.Namespace) -> list[tuple[str, Callable[[], Engine]]]:
    """(label, opener) for every row; an opener raises EngineError when its backend is unavailable."""
    model = args.model

    def tensorrt(precision: str) -> Engine:
        return open_engine(EngineOptions(model, "tensorrt", plan_path=_tensorrt_plan(args, precision)))

    return [
        ("onnxruntime-cpu 2 threads", lambda: open_engine(EngineOptions(model, "onnxruntime-cpu", threads=2))),
        ("onnxruntime-cpu 1 thread", lambda: open_engine(EngineOptions(model, "onnxruntime-cpu", threads=1))),
        ("onnxruntime-cuda", lambda: open_engine(EngineOptions(model, "onnxruntime-cuda"))),
        ("tensorrt fp16", lambda: tensorrt("fp16")),
        ("tensorrt int8", lambda: tensorrt("int8")),
    ]


def _batches(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="AFNet-M ONNX export")
    parser.add_argument("--batches", type=_batches, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--plan-fp16", type=Path, default=None)
    parser.add_argument("--plan-int8", type=Path, default=None)
    parser.add_argument("--calib-data", type=Path, default=None, help="calibration .npz or dir (to build INT8)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache and built bench plans")
    args = parser.parse_args(argv)
    try:
        metadata = read_model_metadata(args.model)
    except (EngineError, ModelMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: model {metadata.model_version}, {len(metadata.class_names)} classes; "
          f"{args.runs} runs after {args.warmup} warm-up, batches {args.batches}")
    print(f"{'backend':<28}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'ms/sample':>11}{'x CPU2':>8}")
    baseline: dict[int, float] = {}
    for label, opener in backends(args):
        try:
            engine = opener()
        except (EngineError, ModelMismatchError, CalibrationDataError) as exc:
            print(f"{label:<28}  skipped: {exc}")
            continue
        with engine:
            for batch in args.batches:
                timing = time_engine(engine, batch, args.runs, args.warmup)
                per_sample = timing.median_ms / batch
                if label == "onnxruntime-cpu 2 threads":
                    baseline[batch] = per_sample
                ratio = f"{baseline[batch] / per_sample:.2f}" if batch in baseline else "-"
                print(f"{label:<28}{batch:>6}{timing.median_ms:>11.3f}{timing.p90_ms:>9.3f}"
                      f"{per_sample:>11.3f}{ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
