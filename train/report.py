"""Experiment outputs: results JSON, confusion-matrix PNG, accuracy summaries.

Usage:
    from train.report import summarize, write_confusion_png, write_json
    stats = summarize([0.81, 0.84, 0.79])          # {"mean": ..., "std": ..., "n": 3}
    write_confusion_png(confusion, class_names, "run/confusion.png", title="BU-3DFE P1")
    write_json("run/results.json", results)        # NaN -> null, written atomically

The PNG is drawn with matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), so no
GUI backend is touched and nothing global (``pyplot`` state) changes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and population standard deviation (ddof 0, so one value gives std 0) of ``values``."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def per_class_accuracy(confusion: np.ndarray) -> list[float]:
    """Recall of each true class (row); NaN where a class has no sample."""
    confusion = np.asarray(confusion, np.float64)
    totals = confusion.sum(axis=1)
    return [float(confusion[i, i] / totals[i]) if totals[i] else float("nan") for i in range(len(confusion))]


def _plain(value: Any) -> Any:
    """JSON-able copy: numpy to Python, NaN/inf to None, paths and tuples to strings and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented, strict JSON (NaN -> null) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def write_confusion_png(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """A confusion matrix as a PNG: colours = row-normalised rates, text = rate and count.

    Args:
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        class_names: K names, in row order.
        path: Output PNG.
        title: Shown above the matrix (e.g. the protocol and mean accuracy).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion, np.int64)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} classes, got {confusion.shape}")
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros(confusion.shape, np.float64), where=totals > 0)  # (K, K)
    size = 1.0 + 0.9 * k
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{100 * rates[i, j]:.0f}%\n{confusion[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
