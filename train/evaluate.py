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
from train.cache import CacheEntry, load_arrays, scan_cache
from train.report import per_class_accuracy, write_confusion_png, write_json


def _predict_onnx(path: Path, entries: list[CacheEntry], batch: int) -> tuple[list[str], np.ndarray]:
    with open_engine(EngineOptions(path, backend="onnxruntime-cpu")) as engine:
        preds = [engine.infer(arrays_to_feeds([load_arrays(e.path) for e in entries[i:i + batch]]))["logits"]
                 .argmax(axis=1) for i in range(0, len(entries), batch)]
        return list(engine.class_names), np.concatenate(preds)


def _predict_checkpoint(path: Path, entries: list[CacheEntry], batch: int) -> tuple[list[str], np.ndarray]:
    import torch

    from train.checkpoint import load_checkpoint

    model, info = load_checkpoint(path)
    preds = []
    with torch.no_grad():
        for i in range(0, len(entries), batch):
            feeds = arrays_to_feeds([load_arrays(e.path) for e in entries[i:i + batch]])
            logits, _ = model(*(torch.from_numpy(feeds[k]) for k in ("texture", "geometry", "masks")))
            preds.append(logits.argmax(dim=1).numpy())
    return list(info.class_names), np.concatenate(preds)


def evaluate_file(model: Path, cache: Path, splits: tuple[str, ...] | None, batch: int = 32) -> dict:
    """Accuracy, per-class accuracy and confusion (rows = true class) of ``model`` on the cache."""
    entries = [e for e in scan_cache(cache).entries if splits is None or e.split in splits]
    if not entries:
        raise ValueError(f"{cache}: no cached samples{' of split ' + ','.join(splits) if splits else ''}")
    predict = _predict_onnx if model.suffix == ".onnx" else _predict_checkpoint
    names, pred = predict(model, entries, batch)
    unknown = sorted({e.expression for e in entries} - set(names))
    if unknown:
        raise ValueError(f"{model}: has no class for {', '.join(unknown)}")
    truth = np.array([names.index(e.expression) for e in entries])
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    return {"model": str(model), "cache": str(cache), "splits": list(splits or ["all"]), "samples": len(entries),
            "accuracy": float((truth == pred).mean()), "class_names": names,
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
    except (OSError, ValueError, EngineError, ModelMismatchError) as exc:
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
