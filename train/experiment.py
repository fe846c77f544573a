"""Protocol runner: subject-independent cross-validation (or one final model) on the sample cache.

Usage:
    python -m train --dataset bu3dfe --cache data/bu3dfe --protocol P1 --folds 10 --repeats 10 \\
        --model afnet_m --mode full --epochs 40 --batch-size 32 --lr 1e-3 --out runs/bu3dfe_p1
    python -m train --dataset bu3dfe --root /data/BU-3DFE --cache data/bu3dfe --views 3 --protocol P2 ...
    python -m train --dataset bosphorus --cache data/bosphorus --protocol bosphorus --out runs/bos
    python -m train --dataset synthetic --cache data/syn --preprocess --identities 60 --protocol synthetic \\
        --folds 5 --max-folds 1 --epochs 10 --out runs/syn_cv
    python -m train --dataset synthetic --cache data/syn --final --epochs 30 --out runs/demo   # -> final.pt
    torchrun --standalone --nproc_per_node 2 -m train --dataset synthetic --cache data/syn ...

Folds come from ``train.protocols.make_folds`` (P1 -> bu3dfe_p1, P2 -> bu3dfe_p2) on the cached
SCANS; every view of a train scan is a training sample, and each test scan is scored once, on
its lowest cached view (view 0 = frontal, the one sample per scan of the literature;
``--test-views all`` scores every view). Validation / early stopping: ``--val-fraction`` (default
0.1) of each fold's TRAIN subjects (at least one when there are two or more) are held out of
training and scored on their lowest views; fit() keeps the weights of the epoch with the best
validation accuracy (best.pt) and those are tested. ``--val-fraction 0`` trains on every train subject and tests the last epoch.
The protocols' classes are the six basic expressions (P1, P2, bosphorus) or every class present
(synthetic).

``--final`` trains one model instead: on the synthetic set, train identities (validation: the val
identities, test: the held-out test identities); on a scan data set, every subject with all the
protocol's samples, minus the validation subjects (no test). It writes ``final.pt``.

RUN_DIR gets ``results.json`` (configuration, per-fold subjects, sizes, accuracy, per-class
accuracy and confusion; mean and std over folds; pooled and per-repeat accuracy),
``confusion.png`` (the confusion summed over folds), ``folds/r<repeat>_f<fold>/`` (fit()'s
train_config.json and, with ``--keep best``, best.pt), and the last line printed is the mean ±
std accuracy. Under torchrun every rank runs the same folds in lockstep (fit() shards the
batches, evaluate() the test set); only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from realtime.spec import BASIC_SIX, EXPRESSIONS, PREPROCESSING_VERSION
from train.cache import CacheEntry, CachedDataset, CacheError, scan_cache
from train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from train.datasets.scan import ScanError
from train.model import MODES, build_model, list_variants, resolve_config
from train.protocols import ProtocolWarning, eligible_samples, make_folds
from train.report import per_class_accuracy, summarize, write_confusion_png, write_json
from train.train import EvalResult, FitResult, TrainConfig, evaluate, fit, setup_distributed

PROTOCOL_NAMES: dict[str, str] = {"P1": "bu3dfe_p1", "P2": "bu3dfe_p2", "bosphorus": "bosphorus",
                                  "synthetic": "synthetic"}
"""CLI name -> ``train.protocols`` name (the long names are accepted too)."""
PROTOCOL_DATASET = {"bu3dfe_p1": "bu3dfe", "bu3dfe_p2": "bu3dfe", "bosphorus": "bosphorus"}
"""Protocols tied to one data set; "synthetic" (plain subject k-fold) runs on any."""
DEFAULT_PROTOCOL = {"bu3dfe": "bu3dfe_p1", "bosphorus": "bosphorus", "synthetic": "synthetic"}
KEEP_CHECKPOINTS = ("best", "all", "none")
TEST_VIEWS = ("first", "all")


class ExperimentError(ValueError):
    """The experiment cannot run as asked (one line saying why)."""


@dataclass
class ExperimentOptions:
    """What to run (see the module docstring).

    Attributes:
        dataset: "bu3dfe" | "bosphorus" | "synthetic": the cached samples to use.
        cache_dir: The preprocessing output folder.
        out_dir: RUN_DIR.
        protocol: P1 | P2 | bosphorus | synthetic (or a ``train.protocols`` name); None = the
            data set's own (P1, bosphorus, synthetic).
        folds: Folds per repeat.
        repeats: Repetitions with new fold assignments (P2: new subjects too).
        max_folds: Run only the first K folds of each repeat (quick runs); None = all.
        model: Variant name (``train.model.list_variants``).
        mode: Ablation mode (``train.model.MODES``).
        model_overrides: Further AFNetConfig fields (e.g. ``width`` for tiny test models).
        train: Training settings; ``out_dir`` is set per fold.
        seed: Seeds folds, validation subjects and the initial weights.
        val_fraction: Share of the train subjects held out for validation (early stopping).
        test_views: "first" (each test scan once, its lowest view) or "all".
        final: Train one final model instead of cross-validating.
        keep_checkpoints: Per fold: "best" (best.pt), "all" (best.pt and last.pt) or "none".
        in_memory: Load every cached sample once (faster epochs, more memory).
    """

    dataset: str
    cache_dir: Path
    out_dir: Path
    protocol: str | None = None
    folds: int = 10
    repeats: int = 1
    max_folds: int | None = None
    model: str = "afnet_m_rt"
    mode: str = "full"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    val_fraction: float = 0.1
    test_views: str = "first"
    final: bool = False
    keep_checkpoints: str = "best"
    in_memory: bool = False

    def __post_init__(self) -> None:
        self.cache_dir, self.out_dir = Path(self.cache_dir), Path(self.out_dir)
        if self.protocol is None:
            self.protocol = DEFAULT_PROTOCOL.get(self.dataset, "synthetic")
        self.protocol = PROTOCOL_NAMES.get(self.protocol, self.protocol)
        if self.protocol not in PROTOCOL_NAMES.values():
            raise ExperimentError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
        needed = PROTOCOL_DATASET.get(self.protocol)
        if needed is not None and needed != self.dataset:
            raise ExperimentError(f"protocol {self.protocol} is defined on {needed}, not on {self.dataset}")
        if self.folds < 2 or self.repeats < 1 or (self.max_folds is not None and self.max_folds < 1):
            raise ExperimentError(f"folds ({self.folds}) must be >= 2, repeats ({self.repeats}) and max_folds "
                                  f"({self.max_folds}) >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ExperimentError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.test_views not in TEST_VIEWS:
            raise ExperimentError(f"test_views must be one of {TEST_VIEWS}, got {self.test_views!r}")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            raise ExperimentError(f"keep_checkpoints must be one of {KEEP_CHECKPOINTS}, got {self.keep_checkpoints!r}")
        if self.mode not in MODES:
            raise ExperimentError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.model not in list_variants():
            raise ExperimentError(f"unknown model {self.model!r}; choose one of {', '.join(list_variants())}")


# ------------------------------------------------------------------------------------------ planning


@dataclass
class FoldPlan:
    """Which cached samples one fold trains, validates and tests on (indices into the entries)."""

    repeat: int
    fold: int  # -1 for the final model
    train: list[int]
    val: list[int]
    test: list[int]

    def subjects(self, entries: Sequence[CacheEntry]) -> dict[str, list[str]]:
        """Subjects of each part, from the samples themselves."""
        return {part: sorted({entries[i].subject for i in getattr(self, part)}) for part in ("train", "val", "test")}


def protocol_classes(entries: Sequence[CacheEntry], protocol: str) -> tuple[str, ...]:
    """The classes a protocol scores: the six basic expressions, or (synthetic) every class present."""
    if protocol in PROTOCOL_DATASET:
        return BASIC_SIX
    present = {e.expression for e in entries}
    return tuple(name for name in EXPRESSIONS if name in present)


def _scans(entries: Sequence[CacheEntry]) -> tuple[list[list[int]], list]:
    """Entries grouped by scan (views of one scan together, lowest view first) and each scan's record."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        groups[entry.scan_id].append(i)
    scans = [sorted(idx, key=lambda i: entries[i].view) for idx in groups.values()]
    return scans, [entries[views[0]].scan_record() for views in scans]


def _hold_out(subjects: Sequence[str], fraction: float, rng: np.random.Generator) -> set[str]:
    """``round(fraction * n)`` subjects (at least one, never all) for validation; none if fraction is 0."""
    if fraction <= 0 or len(subjects) < 2:
        return set()
    count = min(max(1, int(round(fraction * len(subjects)))), len(subjects) - 1)
    return set(rng.choice(sorted(subjects), count, replace=False).tolist())


def _split(scans: list[list[int]], scan_ids: Sequence[int], entries: Sequence[CacheEntry], all_views: bool,
           exclude: set[str] = frozenset(), only: set[str] | None = None) -> list[int]:
    """Entry indices of the given scans: every view, or the lowest one; optionally by subject."""
    out = []
    for s in scan_ids:
        subject = entries[scans[s][0]].subject
        if subject in exclude or (only is not None and subject not in only):
            continue
        out += scans[s] if all_views else scans[s][:1]
    return sorted(out)


def plan_folds(entries: Sequence[CacheEntry], protocol: str, folds: int = 10, repeats: int = 1, seed: int = 0,
               val_fraction: float = 0.1, test_views: str = "first", max_folds: int | None = None) -> list[FoldPlan]:
    """The folds of every repeat, as sample indices (see the module docstring for the rules).

    Raises:
        ValueError: From ``make_folds`` (unknown protocol, fewer than two eligible subjects).
    """
    scans, records = _scans(entries)
    plans = []
    for repeat in range(repeats):
        for fold in make_folds(records, protocol, folds, repeat, seed)[:max_folds]:
            train_subjects = sorted({records[s].subject for s in fold.train_idx})
            val = _hold_out(train_subjects, val_fraction, np.random.default_rng([seed, repeat, fold.fold, 0x7A1]))
            plans.append(FoldPlan(
                repeat, fold.fold,
                train=_split(scans, fold.train_idx, entries, True, exclude=val),
                val=_split(scans, fold.train_idx, entries, False, only=val),
                test=_split(scans, fold.test_idx, entries, test_views == "all")))
    return plans


def plan_final(entries: Sequence[CacheEntry], protocol: str, seed: int = 0, val_fraction: float = 0.1) -> FoldPlan:
    """The final model's split: the synthetic set's own identity splits, else protocol subjects minus val.

    Raises:
        ValueError: No training sample.
    """
    scans, records = _scans(entries)
    if any(entries[v[0]].split for v in scans):  # the synthetic set carries held-out identity sets
        by_split: dict[str, list[int]] = defaultdict(list)
        for s, views in enumerate(scans):
            by_split[entries[views[0]].split].append(s)
        plan = FoldPlan(0, -1, _split(scans, by_split["train"], entries, True),
                        _split(scans, by_split["val"], entries, False), _split(scans, by_split["test"], entries, False))
    else:
        eligible = eligible_samples(records, protocol)
        chosen = sorted(s for idx in eligible.values() for s in idx)
        val = _hold_out(sorted(eligible), val_fraction, np.random.default_rng([seed, 0x7A1]))
        plan = FoldPlan(0, -1, _split(scans, chosen, entries, True, exclude=val),
                        _split(scans, chosen, entries, False, only=val), [])
    if not plan.train:
        raise ValueError("the final split has no training sample")
    return plan


# ------------------------------------------------------------------------------------------- running


@dataclass
class FoldOutcome:
    """One trained and tested fold."""

    repeat: int
    fold: int
    subjects: dict[str, list[str]]  # "train" / "val" / "test" -> subjects, from the samples used
    sizes: dict[str, int]  # samples per part
    test: EvalResult | None
    val: EvalResult | None
    best_epoch: int | None
    checkpoint: str | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"repeat": self.repeat, "fold": self.fold, "sizes": self.sizes,
                               "subjects": self.subjects, "best_epoch": self.best_epoch, "checkpoint": self.checkpoint}
        for name, ev in (("test", self.test), ("val", self.val)):
            if ev is not None:
                out[name] = {"accuracy": ev.accuracy, "loss": ev.loss, "samples": ev.num_samples,
                             "per_class_accuracy": dict(zip(ev.class_names, ev.per_class_accuracy)),
                             "confusion": ev.confusion}
        return out


@dataclass
class ExperimentResult:
    """Every fold's outcome and the summary written to results.json."""

    options: ExperimentOptions
    class_names: tuple[str, ...]
    folds: list[FoldOutcome]
    model_config: dict[str, Any]
    cache_summary: str

    @property
    def confusion(self) -> np.ndarray:
        """Test confusion summed over folds and repeats (K, K)."""
        k = len(self.class_names)
        return sum((f.test.confusion for f in self.folds if f.test is not None), np.zeros((k, k), np.int64))

    def accuracy(self) -> dict[str, Any]:
        """Mean/std of the fold accuracies; per repeat, the accuracy pooled over its folds."""
        tested = [f for f in self.folds if f.test is not None]
        per_repeat = []
        for r in sorted({f.repeat for f in tested}):
            matrix = sum(f.test.confusion for f in tested if f.repeat == r)
            per_repeat.append(float(np.trace(matrix) / matrix.sum()) if matrix.sum() else float("nan"))
        total = self.confusion
        return {"folds": summarize([f.test.accuracy for f in tested]),
                "repeats": summarize(per_repeat), "per_repeat": per_repeat,
                "pooled": float(np.trace(total) / total.sum()) if total.sum() else None}

    def to_dict(self) -> dict[str, Any]:
        opt = self.options
        config = {k: v for k, v in dataclasses.asdict(opt).items() if k != "train"}
        return {
            "mode": "final" if opt.final else "cross_validation",
            "config": config, "train_config": opt.train.to_dict(), "model_config": self.model_config,
            "preprocessing_version": PREPROCESSING_VERSION, "cache": self.cache_summary,
            "classes": list(self.class_names),
            "accuracy": self.accuracy(),
            "per_class_accuracy": dict(zip(self.class_names, per_class_accuracy(self.confusion))),
            "confusion": self.confusion,
            "folds": [f.to_dict() for f in self.folds],
        }

    def final_line(self) -> str:
        acc = self.accuracy()
        if self.options.final:
            fold = self.folds[0]
            part, ev = ("test", fold.test) if fold.test is not None else ("val", fold.val)
            return f"final model: {part} accuracy {ev.accuracy:.4f} ({ev.num_samples} samples)" if ev else \
                "final model: trained (no validation or test samples)"
        folds, repeats = acc["folds"], acc["repeats"]
        if not folds["n"]:
            return "accuracy: no fold was tested"
        return (f"accuracy {100 * folds['mean']:.2f} ± {100 * folds['std']:.2f} % over {folds['n']} folds "
                f"({repeats['n']} repeats; pooled {100 * acc['pooled']:.2f} %)")


class ExperimentRunner:
    """Runs :class:`ExperimentOptions` on the cache: plan, fit, evaluate, write RUN_DIR."""

    def __init__(self, options: ExperimentOptions) -> None:
        self.options = options
        # One group for all folds (fit() would make and tear down one per fold); evaluate() and the
        # barriers below need it to outlive fit().
        self._dist, _ = setup_distributed(options.train.device)
        self.rank = self._dist.rank

    def __enter__(self) -> "ExperimentRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group if this runner made it."""
        if self._dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._dist.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def process(self) -> ExperimentResult:
        """Run every fold (or the final model) and write results.json and confusion.png.

        Raises:
            ExperimentError: No usable cached sample, or the protocol finds no split.
        """
        opt = self.options
        index = scan_cache(opt.cache_dir, dataset=opt.dataset)
        for path, reason in index.errors:
            self.log(f"skipped cache file {path}: {reason}")
        self.log(index.summary())
        if not index.entries:
            raise ExperimentError(f"{index.root}: no cached {opt.dataset} samples of preprocessing "
                                  f"{PREPROCESSING_VERSION}; run python -m train.preprocess first")
        classes = protocol_classes(index.entries, opt.protocol)
        entries = [e for e in index.entries if e.expression in classes]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ProtocolWarning)
                plans = ([plan_final(entries, opt.protocol, opt.seed, opt.val_fraction)] if opt.final else
                         plan_folds(entries, opt.protocol, opt.folds, opt.repeats, opt.seed, opt.val_fraction,
                                    opt.test_views, opt.max_folds))
        except ValueError as exc:
            raise ExperimentError(f"{opt.protocol} on {index.root}: {exc}") from None
        for message in dict.fromkeys(str(w.message) for w in caught):  # each warning once, not once per repeat
            self.log(f"warning: {message}")
        dataset = CachedDataset(entries, class_names=classes, in_memory=opt.in_memory)
        outcomes = [self._run_fold(dataset, plan, classes) for plan in plans]
        result = ExperimentResult(opt, classes, outcomes, self._model_config(classes), index.summary())
        if self.is_main:
            write_json(opt.out_dir / "results.json", result.to_dict())
            acc = result.accuracy()
            title = f"{opt.dataset}, protocol {opt.protocol}, {opt.model} ({opt.mode})"
            if acc["pooled"] is not None:
                title += f": pooled accuracy {100 * acc['pooled']:.1f} %"
                write_confusion_png(result.confusion, classes, opt.out_dir / "confusion.png", title)
            elif opt.final and outcomes[0].val is not None:
                write_confusion_png(outcomes[0].val.confusion, classes, opt.out_dir / "confusion.png",
                                    title + " (validation)")
        self.log(result.final_line())
        return result

    def _model_config(self, classes: tuple[str, ...]) -> dict[str, Any]:
        opt = self.options
        return resolve_config(opt.model, mode=opt.mode, class_names=classes, **opt.model_overrides).to_dict()

    def _run_fold(self, dataset: CachedDataset, plan: FoldPlan, classes: tuple[str, ...]) -> FoldOutcome:
        opt = self.options
        name = "final" if plan.fold < 0 else f"r{plan.repeat}_f{plan.fold}"
        fold_dir = opt.out_dir / ("final_fit" if plan.fold < 0 else f"folds/{name}")
        subjects = plan.subjects(dataset.entries)
        sizes = {part: len(getattr(plan, part)) for part in ("train", "val", "test")}
        self.log(f"{name}: train {sizes['train']} samples of {len(subjects['train'])} subjects, val {sizes['val']} "
                 f"({', '.join(subjects['val']) or 'none'}), test {sizes['test']} "
                 f"({', '.join(subjects['test']) or 'none'})")
        torch.manual_seed(opt.seed)  # every rank (and every fold) starts from the same weights
        model = build_model(opt.model, mode=opt.mode, class_names=classes, **opt.model_overrides)
        cfg = dataclasses.replace(opt.train, out_dir=str(fold_dir))
        val_set = dataset.subset(plan.val) if plan.val else None
        fitted = fit(model, dataset.subset(plan.train), val_set, cfg)
        self._barrier()  # rank 0 has written best.pt
        best = fold_dir / "best.pt"
        if val_set is not None and best.is_file():
            try:
                model.load_state_dict(read_checkpoint(best)["model"])
            except CheckpointError as err:
                raise ExperimentError(str(err)) from None
        self._barrier()  # every rank has read it before rank 0 may delete it
        test = evaluate(model, dataset.subset(plan.test), cfg.eval_batch_size) if plan.test else None
        val = evaluate(model, val_set, cfg.eval_batch_size) if val_set is not None else None
        checkpoint = self._keep(fold_dir, plan, model, cfg, fitted, test, classes)
        if test is not None:
            self.log(f"{name}: test {test.summary()}" + (f" (best epoch {fitted.best_epoch})"
                                                         if fitted.best_epoch else ""))
        return FoldOutcome(plan.repeat, plan.fold, subjects, sizes, test, val, fitted.best_epoch, checkpoint)

    def _keep(self, fold_dir: Path, plan: FoldPlan, model: torch.nn.Module, cfg: TrainConfig, fitted: FitResult,
              test: EvalResult | None, classes: tuple[str, ...]) -> str | None:
        """Prune the fold's checkpoints as asked; the final model is saved as RUN_DIR/final.pt."""
        opt = self.options
        if not self.is_main:
            return None
        best, last = fold_dir / "best.pt", fold_dir / "last.pt"
        if plan.fold < 0:
            path = save_checkpoint(opt.out_dir / "final.pt", model, epoch=fitted.best_epoch or cfg.epochs,
                                   step=fitted.steps, best_metric=fitted.best_metric, train_config=cfg.to_dict(),
                                   dataset=opt.dataset,
                                   protocol=opt.protocol, classes=list(classes),
                                   test_accuracy=None if test is None else test.accuracy)
            shutil.rmtree(fold_dir, ignore_errors=True)  # final.pt holds the chosen weights
            return str(path)
        if opt.keep_checkpoints == "none":
            best.unlink(missing_ok=True)
            last.unlink(missing_ok=True)
            return None
        if opt.keep_checkpoints == "best" and best.is_file():
            last.unlink(missing_ok=True)
        kept = best if best.is_file() else last
        return str(kept) if kept.is_file() else None


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from train.preprocess import add_source_arguments

    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Usage examples are at the top of train/experiment.py.")
    add_source_arguments(parser)
    parser.add_argument("--cache", type=Path, required=True, help="preprocessing output folder (the sample cache)")
    parser.add_argument("--preprocess", action="store_true", help="preprocess into --cache first (implied by "
                        "--root); samples already cached are skipped")
    parser.add_argument("--protocol", default=None, choices=sorted({*PROTOCOL_NAMES, *PROTOCOL_NAMES.values()}),
                        help="default: P1 for bu3dfe, bosphorus for bosphorus, synthetic for synthetic")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-folds", type=int, default=None, help="run only the first K folds of each repeat")
    parser.add_argument("--final", action="store_true", help="train one final model (final.pt) instead of folds")
    parser.add_argument("--model", default="afnet_m_rt", choices=list_variants())
    parser.add_argument("--mode", default="full", choices=MODES)
    parser.add_argument("--width", type=float, default=None, help="override the variant's width multiplier")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="train subjects held out for validation")
    parser.add_argument("--test-views", default="first", choices=TEST_VIEWS)
    parser.add_argument("--keep", default="best", choices=KEEP_CHECKPOINTS, help="fold checkpoints to keep")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--in-memory", action="store_true", help="load the whole cache into memory once")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--out", type=Path, required=True, help="RUN_DIR for results and checkpoints")
    return parser.parse_args(argv)


def _preprocess(args: argparse.Namespace) -> None:
    from train.preprocess import Preprocessor, options_from_args, source_from_args

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ExperimentError("preprocess once without torchrun (python -m train.preprocess ... or python -m train "
                              "--preprocess ...), then start torchrun with --cache")
    source = source_from_args(args)
    options = options_from_args(args, args.cache)
    if args.no_progress:
        options.progress = False
    with Preprocessor(options) as preprocessor:
        print(preprocessor.process(source).report(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # settings first: a typo fails here, before any preprocessing or training
        overrides = {"width": args.width} if args.width is not None else {}
        train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, augment=not args.no_augment,
                                num_workers=args.loader_workers, seed=args.seed, device=args.device, amp=args.amp,
                                progress=False if args.no_progress else None)
        options = ExperimentOptions(
            dataset=args.dataset, cache_dir=args.cache, out_dir=args.out, protocol=args.protocol, folds=args.folds,
            repeats=args.repeats, max_folds=args.max_folds, model=args.model, mode=args.mode,
            model_overrides=overrides, train=train_cfg, seed=args.seed, val_fraction=args.val_fraction,
            test_views=args.test_views, final=args.final, keep_checkpoints=args.keep, in_memory=args.in_memory)
        resolve_config(args.model, mode=args.mode, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.preprocess or args.root is not None:
            _preprocess(args)
        with ExperimentRunner(options) as runner:
            runner.process()
    except (ExperimentError, CacheError, ScanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
