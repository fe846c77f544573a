"""Score a model file on cached samples: what ships (ONNX through the runtime's engine) or a checkpoint.

Usage:
    python -m train.evaluate realtime/assets/afnet_m_demo.onnx --cache data/syn --split test --out runs/eval
    python -m train.evaluate runs/demo/final.pt --cache data/syn --split val,test

An ``.onnx`` file runs through ``realtime.engine`` (ONNX Runtime, the runtime's own checks:
metadata, preprocessing version); a ``.pt`` checkpoint runs in PyTorch. Samples are normalised
by ``realtime.model_inputs.arrays_to_feeds`` as everywhere else. Prints accuracy and per-class
accuracy; with ``--out``, writes eval.json and confusion.png there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from realtime.engine import EngineError, EngineOptions, open_engine
from realtime.model_inputs import arrays_to_feeds
from realtime.model_metadata import ModelMismatchError
from realtime.spec import PREPROCESSING_VERSION
from train.cache import CacheEntry, load_arrays, scan_cache
from train.checkpoint import CheckpointError
from train.report import per_class_accuracy, write_confusion_png, write_json


def _onnx_confusion(path: Path, entries: list[CacheEntry], batch: int) -> tuple[list[str], np.ndarray]:
    """Class names and confusion (rows = true class) of an ONNX model run by the runtime's engine."""
    with open_engine(EngineOptions(path, backend="onnxruntime-cpu")) as engine:
        names = list(engine.class_names)
        truth = _labels(entries, names, path)
        pred = np.concatenate([engine.infer(arrays_to_feeds([load_arrays(e.path) for e in entries[i:i + batch]]))
                               ["logits"].argmax(axis=1) for i in range(0, len(entries), batch)])
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    return names, confusion


def _checkpoint_confusion(path: Path, entries: list[CacheEntry], batch: int) -> tuple[list[str], np.ndarray]:
    """The same for a PyTorch checkpoint, through ``train.train.evaluate``."""
    from train.cache import CachedDataset
    from train.checkpoint import load_checkpoint
    from train.train import evaluate

    model, info = load_checkpoint(path, preprocessing_version=PREPROCESSING_VERSION)
    names = list(info.class_names)
    _labels(entries, names, path)
    return names, evaluate(model, CachedDataset(entries, class_names=names), batch_size=batch).confusion


def _labels(entries: list[CacheEntry], names: list[str], model: Path) -> np.ndarray:
    unknown = sorted({e.expression for e in entries} - set(names))
    if unknown:
        raise ValueError(f"{model}: has no class for {', '.join(unknown)}")
    return np.array([names.index(e.expression) for e in entries])


def evaluate_file(model: Path, cache: Path, splits: tuple[str, ...] | None, batch: int = 32) -> dict:
    """Accuracy, per-class accuracy and confusion (rows = true class) of ``model`` on the cache."""
    entries = [e for e in scan_cache(cache).entries if splits is None or e.split in splits]
    if not entries:
        raise ValueError(f"{cache}: no cached samples{' of split ' + ','.join(splits) if splits else ''}")
    confusion_of = _onnx_confusion if model.suffix == ".onnx" else _checkpoint_confusion
    names, confusion = confusion_of(model, entries, batch)
    return {"model": str(model), "cache": str(cache), "splits": list(splits or ["all"]), "samples": len(entries),
            "accuracy": float(np.trace(confusion) / confusion.sum()), "class_names": names,
            "per_class_accuracy": dict(zip(names, per_class_accuracy(confusion))), "confusion": confusion.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a model (.onnx or .pt checkpoint) on cached samples.")
    parser.add_argument("model", type=Path, help="exported .onnx (runs through the runtime engine) or a .pt checkpoint")
    parser.add_argument("--cache", type=Path, required=True, help="preprocessing output folder")
    parser.add_argument("--split", default="test", help="comma-separated synthetic splits, or 'all'")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write eval.json and confusion.png here")
    args = parser.parse_args(argv)
    splits = None if args.split == "all" else tuple(args.split.split(","))
    try:
        result = evaluate_file(args.model, args.cache, splits, args.batch)
    except (OSError, ValueError, EngineError, ModelMismatchError, CheckpointError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    per_class = " ".join(f"{k}={v:.3f}" for k, v in result["per_class_accuracy"].items())
    print(f"{args.model}: accuracy {100 * result['accuracy']:.2f} % on {result['samples']} samples "
          f"({args.split}) [{per_class}]")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "eval.json", result)
        write_confusion_png(np.array(result["confusion"]), result["class_names"], args.out / "confusion.png",
                            f"{args.model.name} on {args.split} ({100 * result['accuracy']:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
