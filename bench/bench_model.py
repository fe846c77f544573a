"""Model size and CPU latency of the AFNet-M variants: parameters, ONNX size, ONNX Runtime vs PyTorch.

Usage:
    python bench/bench_model.py                         # afnet_m_rt and afnet_m, 2 threads, batch 1
    python bench/bench_model.py --variants afnet_m_rt --runs 500 --threads 2
    python bench/bench_model.py --sweep                 # also time the width/blocks candidates for afnet_m_rt

Prints, per variant: parameter counts (every ablation mode), ONNX file size, ONNX Runtime CPU
median / p90 ms as the runtime configures it (workers sleep between runs) and with ORT's default
spinning workers, PyTorch CPU median / p90 ms and its ratio to ORT (same process, one after the
other), and the max |PyTorch - ONNX Runtime| from the export check. Weights are random (speed
does not depend on them). A plain ResNet-18 trunk (afnet_m in "2d" mode) is timed first as a
reference. All models are timed round-robin, --repeats rounds, and each shows its least
disturbed round; on a shared machine compare ratios within one run, not numbers across runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the repo's packages importable
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import argparse
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from export.export_onnx import ExportReport, export_onnx, random_inputs
from realtime.engine import create_session
from realtime.model_metadata import INPUT_NAMES
from train.model import MODES, build_model, count_parameters, list_variants

SWEEP = [  # afnet_m_rt candidates: (width, blocks)
    (0.5, (1, 1, 1, 1)),
    (0.5, (2, 2, 2, 1)),
    (0.5, (2, 2, 2, 2)),
    (0.75, (1, 1, 1, 1)),
    (1.0, (1, 1, 1, 1)),
]


@dataclass
class Entry:
    """One model under test, with its ONNX Runtime session and the best timings seen so far."""

    label: str
    model: torch.nn.Module
    report: ExportReport
    session: ort.InferenceSession  # as the runtime opens it
    spinning: ort.InferenceSession  # ORT's default: workers spin between runs
    feeds: dict[str, np.ndarray]
    with_torch: bool
    ort_ms: np.ndarray | None = None
    spin_ms: np.ndarray | None = None
    torch_ms: np.ndarray | None = None


def time_ms(fn: Callable[[], object], runs: int) -> np.ndarray:
    """Wall-clock milliseconds of ``runs`` calls."""
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def keep_best(best: np.ndarray | None, times: np.ndarray) -> np.ndarray:
    """The timing with the lower median: the one less disturbed by other processes."""
    return times if best is None or np.median(times) < np.median(best) else best


def make_entry(name: str, overrides: dict, args: argparse.Namespace, workdir: Path, with_torch: bool) -> Entry:
    torch.manual_seed(0)
    model = build_model(name, input_size=args.size, **overrides).eval()
    report = export_onnx(model, workdir / f"model{len(list(workdir.iterdir()))}.onnx")
    label = name + (f" {overrides}" if overrides else "")
    feeds = random_inputs(report.metadata.input_shapes, 1, seed=1)
    sessions = [create_session(report.path, ["CPUExecutionProvider"], args.threads, spin=spin) for spin in (False, True)]
    return Entry(label, model, report, *sessions, feeds, with_torch)


def measure(entries: list[Entry], args: argparse.Namespace) -> None:
    """Time every entry ``args.repeats`` times, round-robin, so a burst of load hits all alike."""
    for repeat in range(args.repeats):
        for e in entries:
            for session, attr in ((e.session, "ort_ms"), (e.spinning, "spin_ms")):
                if repeat == 0:
                    time_ms(lambda: session.run(None, e.feeds), args.warmup)
                setattr(e, attr, keep_best(getattr(e, attr), time_ms(lambda: session.run(None, e.feeds), args.runs)))
            if e.with_torch:
                inputs = tuple(torch.from_numpy(e.feeds[n]) for n in INPUT_NAMES)
                with torch.inference_mode():
                    if repeat == 0:
                        time_ms(lambda: e.model(*inputs), args.warmup)
                    e.torch_ms = keep_best(e.torch_ms, time_ms(lambda: e.model(*inputs), args.runs))


def stats(times: np.ndarray) -> str:
    return f"median {np.median(times):6.2f} ms  p90 {np.percentile(times, 90):6.2f} ms"


def print_entry(e: Entry, reference: Entry) -> None:
    line = (f"{e.label}: params {count_parameters(e.model) / 1e6:.2f} M  onnx {e.report.size_bytes / 1e6:.1f} MB  "
            f"ORT {stats(e.ort_ms)} ({np.median(e.ort_ms) / np.median(reference.ort_ms):.2f}x reference)"
            f"  | ORT spinning {stats(e.spin_ms)}")
    if e.torch_ms is not None:
        line += (f"  | torch {stats(e.torch_ms)}  torch/ORT {np.median(e.torch_ms) / np.median(e.ort_ms):.2f}x"
                 f"  | max|torch-ORT| {e.report.max_abs_diff:.1e}")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="AFNet-M size and CPU latency (see the usage block in this file).")
    parser.add_argument("--variants", default="afnet_m_rt,afnet_m", help="comma-separated variant names")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=30, help="untimed runs first")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timing rounds over all models; each shows its least disturbed one")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    parser.add_argument("--size", type=int, default=112, help="input size in pixels")
    parser.add_argument("--sweep", action="store_true", help="also time the afnet_m_rt width/blocks candidates")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(list_variants()))
    if unknown:
        print(f"error: unknown variants {unknown}; known: {', '.join(list_variants())}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, batch 1, "
          f"{args.size}x{args.size}, {args.runs} runs after {args.warmup} warm-up, best of {args.repeats} repeats")

    for name in variants:
        counts = "  ".join(f"{mode} {count_parameters(build_model(name, mode=mode)) / 1e6:.2f}" for mode in MODES)
        print(f"{name} parameters (M) by mode: {counts}")
    with tempfile.TemporaryDirectory() as tmp:
        # Reference: one plain ResNet-18 trunk ("2d" mode of afnet_m), to compare with published figures.
        entries = [make_entry("afnet_m", {"mode": "2d"}, args, Path(tmp), with_torch=True)]
        entries += [make_entry(name, {}, args, Path(tmp), with_torch=True) for name in variants]
        if args.sweep:
            entries += [make_entry("afnet_m_rt", {"width": w, "blocks": b}, args, Path(tmp), with_torch=False)
                        for w, b in SWEEP]
        measure(entries, args)
        for entry in entries:
            print_entry(entry, entries[0])
    return 0

if __name__ == "__main__":
    sys.exit(main())
