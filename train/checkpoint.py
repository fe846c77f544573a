"""Training checkpoints: one ``torch.save`` dict that rebuilds the model without any other file.

Contents: format tag, model state dict, model config dict, class names, preprocessing version,
optimizer state, epoch/step, best metric, train config, and free ``extra`` values. Everything is
plain data (tensors, numbers, strings, lists, dicts), so :func:`load_checkpoint` can use
``torch.load(weights_only=True)``, which never runs code from the file.

Every failure raises :class:`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from realtime.spec import PREPROCESSING_VERSION
from train.model import AFNet, AFNetConfig

FORMAT = "afnet-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit what was asked; the message is one line."""


@dataclass
class CheckpointInfo:
    """What a checkpoint holds besides the weights."""

    path: Path
    config: AFNetConfig
    class_names: tuple[str, ...]
    preprocessing_version: str
    epoch: int = 0
    step: int = 0
    best_metric: float | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel/DataParallel wrapper."""
    return getattr(model, "module", model)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    epoch: int = 0,
    step: int = 0,
    best_metric: float | None = None,
    train_config: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and return its path.

    Args:
        path: Output file.
        model: An :class:`AFNet` (possibly DDP-wrapped).
        optimizer: Saved when given, so training can resume.
        epoch: Epochs completed.
        step: Optimizer steps completed.
        best_metric: Best validation metric so far.
        train_config: The training configuration as plain values.
        **extra: Further plain values (strings, numbers, lists, dicts, tensors).
    """
    bare = unwrap(model)
    if not isinstance(bare, AFNet):
        raise TypeError(f"save_checkpoint: expected an AFNet, got {type(bare).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "model_config": bare.config.to_dict(),
        "class_names": list(bare.config.class_names),
        "preprocessing_version": PREPROCESSING_VERSION,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
        "train_config": dict(train_config or {}),
        "extra": extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint under the real name
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate the raw checkpoint dict (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    # torch.save writes a zip; checking that first gives truncated and foreign files a clear reason.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no zip directory: truncated, or not written by torch.save)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            KeyError, IndexError) as exc:  # what a damaged archive makes torch.load raise
        reason = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an AFNet-M checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in ("model", "model_config", "class_names", "preprocessing_version") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    *,
    classes: tuple[str, ...] | list[str] | None = None,
    preprocessing_version: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[AFNet, CheckpointInfo]:
    """Rebuild the model from a checkpoint.

    Args:
        path: Checkpoint file.
        classes: If given, the checkpoint's class list must equal it (names and order).
        preprocessing_version: If given, the checkpoint's must equal it (pass
            ``realtime.spec.PREPROCESSING_VERSION`` to refuse maps made another way).
        map_location: Where the tensors go.

    Returns:
        (model in eval mode, info).

    Raises:
        CheckpointError: Missing, unreadable or foreign file, or a mismatch with what was asked.
    """
    path = Path(path)
    payload = read_checkpoint(path, map_location)
    try:
        config = AFNetConfig.from_dict(payload["model_config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad model config ({exc})") from None
    class_names = tuple(payload["class_names"])
    if class_names != config.class_names:
        raise CheckpointError(f"{path}: class names {list(class_names)} differ from its model config's")
    if classes is not None and tuple(classes) != class_names:
        raise CheckpointError(
            f"{path}: checkpoint classes {','.join(class_names)} differ from the requested {','.join(classes)}"
        )
    version = payload["preprocessing_version"]
    if preprocessing_version is not None and version != preprocessing_version:
        raise CheckpointError(
            f"{path}: trained on preprocessing {version!r}, current is {preprocessing_version!r}; retrain on new maps"
        )
    model = AFNet(config)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model config ({reason})") from None
    model.to(map_location).eval()
    info = CheckpointInfo(
        path=path,
        config=config,
        class_names=class_names,
        preprocessing_version=version,
        epoch=int(payload.get("epoch", 0)),
        step=int(payload.get("step", 0)),
        best_metric=payload.get("best_metric"),
        train_config=dict(payload.get("train_config") or {}),
        optimizer_state=payload.get("optimizer"),
        extra=dict(payload.get("extra") or {}),
    )
    return model, info
