"""Training loop for AFNet-M: fit(), evaluate() and a toy-data CLI.

Usage:
    # Try the loop without any data set (a learnable synthetic task, CPU or GPU):
    python -m train.train --toy
    python -m train.train --toy --model afnet_m_rt --epochs 5 --size 64 --out runs/toy
    # Two processes (DDP; gloo on CPU, nccl on GPUs), same code:
    torchrun --standalone --nproc_per_node 2 -m train.train --toy --epochs 2

fit() is dataset-agnostic: it takes torch Datasets whose items are dicts
{"texture" (3,S,S), "geometry" (G,S,S), "masks" (K,S,S), "label" (int)}. The data-set CLI
(protocols, folds) builds those and calls fit().

Choices: AdamW (decoupled weight decay, none on norms and biases), lr 1e-3 with linear warm-up and
a cosine decay, label smoothing 0.1. The paper's group used Adam at 1e-4 on ImageNet-pretrained
ResNet-18s; we train from scratch (no downloadable weights), which wants the larger rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES
from train.augment import Augmenter, AugmentOptions
from train.checkpoint import save_checkpoint, unwrap
from train.model import AFNet, build_model, list_variants

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Training hyper-parameters and run settings (saved into every checkpoint).

    Attributes:
        epochs: Passes over the training set.
        batch_size: Samples per optimizer step and process.
        lr: Peak learning rate.
        weight_decay: AdamW decoupled weight decay (not applied to norms and biases).
        schedule: "cosine" (to ``min_lr_ratio * lr``), "step" (``step_gamma`` every
            ``step_epochs``) or "constant"; all after ``warmup_epochs`` of linear warm-up.
        warmup_epochs: Linear warm-up length (may be fractional).
        min_lr_ratio: Final learning rate of the cosine schedule, relative to ``lr``.
        step_epochs: Period of the step schedule.
        step_gamma: Factor of the step schedule.
        label_smoothing: Cross-entropy label smoothing.
        augment: Whether to apply :class:`~train.augment.Augmenter` to training batches.
        augment_options: Its strengths.
        grad_clip: Max gradient norm, or None.
        num_workers: DataLoader workers.
        seed: Seeds shuffling, dropout and augmentation.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        amp: bf16 autocast on CUDA (ignored on the CPU).
        out_dir: Where last.pt, best.pt and train_config.json go; None writes nothing.
        progress: tqdm bar; None = only when stderr is a terminal.
        eval_batch_size: Batch size of evaluate().
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    step_epochs: int = 10
    step_gamma: float = 0.1
    label_smoothing: float = 0.1
    augment: bool = True
    augment_options: AugmentOptions = field(default_factory=AugmentOptions)
    grad_clip: float | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    out_dir: str | None = None
    progress: bool | None = None
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: epochs {self.epochs}, batch_size {self.batch_size}, lr {self.lr}"
                             " must be positive")
        if isinstance(self.augment_options, dict):
            self.augment_options = AugmentOptions(**self.augment_options)
        _resolve_device(self.device)  # a missing GPU is a one-line error before any work

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """Classification quality on one data set."""

    accuracy: float
    per_class_accuracy: tuple[float, ...]  # recall per true class; nan where the class is absent
    confusion: np.ndarray  # (K, K) int64, rows = true class, columns = predicted class
    loss: float  # mean cross-entropy (no label smoothing)
    num_samples: int
    class_names: tuple[str, ...]

    def summary(self) -> str:
        per_class = " ".join(f"{n}={a:.3f}" for n, a in zip(self.class_names, self.per_class_accuracy)
                             if not math.isnan(a))
        return f"acc {self.accuracy:.4f} loss {self.loss:.4f} n {self.num_samples} [{per_class}]"


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class FitResult:
    """What fit() did."""

    history: list[EpochStats]
    best_metric: float | None  # best validation accuracy (None without a validation set)
    best_epoch: int | None
    final_eval: EvalResult | None  # validation result after the last epoch
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    steps: int


# ----------------------------------------------------------------------------------------------
# Distributed plumbing


@dataclass
class DistContext:
    """This process's place in the torchrun group (world size 1, rank 0 without torchrun)."""

    world_size: int = 1
    rank: int = 0
    owns_group: bool = False  # the caller that made the group also tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def setup_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA, one
    GPU per LOCAL_RANK); otherwise a single process. Returns the context and this rank's device.

    Raises:
        ValueError: ``device_name`` is unknown, or CUDA is asked for and absent.
    """
    device = _resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), owns_group=False)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), owns_group=True)
    else:
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return ctx, device


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's batch-norm statistics (each rank's last forward updated its own)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------------------
# Evaluation


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> EvalResult:
    """Accuracy, per-class accuracy and confusion matrix of ``model`` on ``dataset``.

    Under an initialised process group every rank scores its own share (no padding) and the
    confusion matrices are summed, so each rank returns the exact whole-set result.
    """
    bare: AFNet = unwrap(model)
    class_names = bare.config.class_names
    num_classes = bare.config.num_classes
    device = torch.device(device) if device is not None else next(bare.parameters()).device
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    shard = Subset(dataset, range(dist.get_rank(), len(dataset), world)) if world > 1 else dataset
    was_training = bare.training
    bare.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        batch = _to_device(batch, device)
        logits, _ = bare(batch["texture"], batch["geometry"], batch["masks"])
        labels = batch["label"].long()
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
        pairs = labels * num_classes + logits.argmax(dim=1)
        confusion += torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes).double()
    bare.train(was_training)
    _all_reduce_sum(confusion)
    _all_reduce_sum(loss_sum)
    matrix = confusion.round().long().cpu().numpy()
    total = int(matrix.sum())
    per_class = tuple(
        float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else float("nan") for i in range(num_classes)
    )
    return EvalResult(
        accuracy=float(np.trace(matrix) / total) if total else float("nan"),
        per_class_accuracy=per_class,
        confusion=matrix,
        loss=float(loss_sum.item() / total) if total else float("nan"),
        num_samples=total,
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------------
# Training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm scales (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit(model: AFNet, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig) -> FitResult:
    """Train ``model`` in place; validate, checkpoint and report after every epoch.

    Under ``torchrun`` (WORLD_SIZE > 1) this joins the process group (gloo on the CPU, nccl on
    CUDA), wraps the model in DDP and shards the data with a DistributedSampler; only rank 0
    prints and writes. With one process it is plain training. The model moves to CUDA when
    ``cfg.device`` is "auto" and a GPU is present.

    Returns:
        A :class:`FitResult`; the model holds the last epoch's weights.
    """
    ctx, device = setup_distributed(cfg.device)
    try:
        return _fit(model, train_set, val_set, cfg, ctx, device)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _fit(
    model: AFNet, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig,
    ctx: DistContext, device: torch.device,
) -> FitResult:
    torch.manual_seed(cfg.seed)  # dropout; the caller's seed decided the initial weights
    model.to(device)
    net: nn.Module = model
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = (DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
               if ctx.world_size > 1 else None)
    per_rank = len(sampler) if sampler is not None else len(train_set)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=per_rank % cfg.batch_size == 1,  # batch norm cannot train on a last batch of one
    )
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"fit: a training set of {len(train_set)} samples gives no batch of {cfg.batch_size}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    augmenter = Augmenter(cfg.augment_options) if cfg.augment else None
    aug_generator = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + ctx.rank)  # ranks see different draws
    show_progress = ctx.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    use_amp = cfg.amp and device.type == "cuda"

    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "model": model.config.to_dict()}, indent=2, sort_keys=True))

    history: list[EpochStats] = []
    best_metric: float | None = None
    best_epoch: int | None = None
    last_path = best_path = None
    final_eval: EvalResult | None = None
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress, leave=False)
        for batch in bar:
            batch = _to_device(batch, device)
            if augmenter is not None:
                batch = augmenter(batch, aug_generator)
            labels = batch["label"].long()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, _ = net(batch["texture"], batch["geometry"], batch["masks"])
            loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            n = labels.shape[0]
            totals += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n],
                                   dtype=torch.float64, device=device)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        _all_reduce_sum(totals)
        if ctx.world_size > 1:
            _broadcast_buffers(model)
        train_loss, train_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

        val_acc = None
        if val_set is not None:
            final_eval = evaluate(model, val_set, cfg.eval_batch_size, device, cfg.num_workers)
            val_acc = final_eval.accuracy
            if best_metric is None or val_acc > best_metric:
                best_metric, best_epoch = val_acc, epoch
                if out_dir is not None and ctx.is_main:
                    best_path = save_checkpoint(out_dir / "best.pt", model, optimizer, epoch=epoch, step=step,
                                                best_metric=best_metric, train_config=cfg.to_dict())
        if out_dir is not None and ctx.is_main:
            last_path = save_checkpoint(out_dir / "last.pt", model, optimizer, epoch=epoch, step=step,
                                        best_metric=best_metric, train_config=cfg.to_dict())
        stats = EpochStats(epoch, train_loss, train_acc, val_acc, optimizer.param_groups[0]["lr"],
                           time.perf_counter() - started)
        history.append(stats)
        if ctx.is_main:
            val_text = f" val_acc {val_acc:.4f}" if val_acc is not None else ""
            tqdm.write(f"epoch {epoch}/{cfg.epochs} train_loss {train_loss:.4f} train_acc {train_acc:.4f}"
                       f"{val_text} lr {stats.lr:.2e} ({stats.seconds:.1f} s)")

    if ctx.is_main:
        last = history[-1]
        parts = [f"final: epochs {cfg.epochs} steps {step} train_loss {last.train_loss:.4f}"]
        if final_eval is not None:
            parts.append(f"val {final_eval.summary()} best_val_acc {best_metric:.4f} (epoch {best_epoch})")
        if last_path is not None:
            parts.append(f"checkpoints {out_dir}")
        print(" ".join(parts), flush=True)
    return FitResult(history, best_metric, best_epoch, final_eval, last_path, best_path, step)


# ----------------------------------------------------------------------------------------------
# Toy data and CLI


class ToyExpressionDataset(Dataset):
    """A learnable stand-in for canonical maps: each class paints a blob of its own colour into the
    texture and a bump of its own height into the depth, at a random place, under noise. Both
    modalities carry the label. Masks are six fixed rectangles (one per MASK_NAMES entry).

    Args:
        num_samples: Dataset length.
        class_names: Classes (labels cycle through them).
        size: Map side in pixels.
        seed: Generates everything (same seed, same data).
    """

    def __init__(self, num_samples: int = 256, class_names: tuple[str, ...] = EXPRESSIONS,
                 size: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        k = len(class_names)
        self.labels = torch.arange(num_samples) % k
        share = self.labels.float() / k  # (N,) in [0, 1)
        colour = 0.5 + 0.4 * torch.cos(2 * math.pi * (share[:, None] + torch.tensor([0.0, 1 / 3, 2 / 3])))  # (N, 3)
        centre = (0.3 + 0.4 * torch.rand(num_samples, 2, generator=g)) * size  # (N, 2) columns, rows
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        dist2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2  # (N, S, S)
        blob = torch.exp(-dist2 / (2 * (size * 0.12) ** 2))[:, None]  # (N, 1, S, S)
        noise = torch.randn(num_samples, 3, size, size, generator=g)
        self.texture = (0.5 + blob * (colour[:, :, None, None] - 0.5) + 0.15 * noise).clamp(0, 1)  # (N, 3, S, S)
        geometry = torch.zeros(num_samples, len(GEOMETRY_CHANNELS), size, size)
        height = 0.1 + 0.4 * share  # (N,)
        depth_noise = 0.05 * torch.randn(num_samples, size, size, generator=g)
        geometry[:, 0] = -0.5 + height[:, None, None] * blob[:, 0] + depth_noise
        geometry[:, 3] = 1.0  # normals facing the camera
        self.geometry = geometry
        masks = torch.zeros(len(MASK_NAMES), size, size)
        q = size // 8
        for i, (r, c) in enumerate([(2, 1), (2, 5), (1, 1), (1, 5), (3, 3), (5, 3)]):
            masks[i, r * q:(r + 1) * q + q, c * q:(c + 2) * q] = 1.0
        self.masks = masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"texture": self.texture[index], "geometry": self.geometry[index], "masks": self.masks,
                "label": self.labels[index]}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Usage examples are at the top of train/train.py.")
    parser.add_argument("--toy", action="store_true", required=True,
                        help="fit the synthetic toy data set (the only data this CLI knows; real data: train.datasets)")
    parser.add_argument("--model", default="afnet_m_rt", choices=list_variants(), help="model variant")
    parser.add_argument("--mode", default=None, help="ablation mode override (2d, 3d, late_concat, iwc, ma, full)")
    parser.add_argument("--width", type=float, default=None, help="width multiplier override")
    parser.add_argument("--size", type=int, default=64, help="toy map size in pixels (model input size)")
    parser.add_argument("--samples", type=int, default=512, help="toy training samples (validation: a quarter)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar even on a terminal")
    parser.add_argument("--out", default=None, help="output directory for checkpoints (default: none written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides: dict[str, Any] = {"input_size": args.size}
    if args.mode is not None:
        overrides["mode"] = args.mode
    if args.width is not None:
        overrides["width"] = args.width
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, **overrides)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          device=args.device, amp=args.amp, augment=not args.no_augment,
                          progress=False if args.no_progress else None, out_dir=args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_set = ToyExpressionDataset(args.samples, model.config.class_names, args.size, seed=args.seed)
    val_set = ToyExpressionDataset(max(1, args.samples // 4), model.config.class_names, args.size, seed=args.seed + 1)
    fit(model, train_set, val_set, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
