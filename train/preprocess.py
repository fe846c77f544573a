"""Preprocess a data set into the sample cache: render -> FaceMesh -> canonical maps -> .npz.

Usage:
    python -m train.preprocess --dataset bu3dfe --root /data/BU-3DFE --out data/bu3dfe --views 3
    python -m train.preprocess --dataset bosphorus --root /data/Bosphorus --out data/bosphorus
    python -m train.preprocess --dataset synthetic --out data/synthetic --identities 60 --per-class 4
    python -m train.preprocess --dataset synthetic --out /tmp/syn --identities 4 --per-class 2 --workers 1

Every scan is rendered as a RealSense D4xx would see it (``train.render``: D4xx colour intrinsics,
the view's head pose and distance, depth noise, edge holes, dropouts and the stereo shadow
unless ``--ideal``), then goes through the SAME stages as a live frame: ``LandmarkDetector``
(static-image mode) and ``Canonicalizer``. The cache (``train.cache``) gets one compressed
``.npz`` per (scan, view) under ``OUT/<PREPROCESSING_VERSION>/``; samples already there are
skipped, so a re-run only does what is missing. Bad input never stops the run: a scan file
that cannot be read (ScanError), a frame where FaceMesh finds no face and a canonical failure
each skip that sample with a one-line reason. The run ends with a summary (processed, cached,
skipped grouped by reason, samples per expression, FaceMesh detection rate), written to
``OUT/summary.json`` too, and a contact sheet ``OUT/contact_sheet.png`` (texture, depth,
normals, masks over the texture) of a few samples.

Work is spread over a process pool (``--workers``, default 2: both cores); each worker builds
its renderer, FaceMesh and canonicalizer once. Workers are spawned, not forked: the parent may
hold threads (torch, OpenCV) that a fork would copy in a locked state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from realtime.canonical import CanonicalOptions, Canonicalizer
from realtime.landmarks import LandmarkDetector, LandmarkOptions
from realtime.model_inputs import face_to_arrays
from realtime.spec import EXPRESSIONS, MASK_NAMES, PREPROCESSING_VERSION, SPEC
from train.cache import CacheError, cache_root, entry_path, load_arrays, read_entry, save_sample
from train.datasets.scan import ScanError, ScanRecord
from train.datasets.sources import DATASETS, Source, View, make_source
from train.datasets.synthetic import SyntheticOptions
from train.mesh import TexturedMesh
from train.render import RenderOptions, ScanRenderer

STAGES = ("index", "load", "no_face", "bad_depth", "bad_fit")
"""Where a sample can be skipped: the data-set index, reading the scan, FaceMesh, the canonical fit."""

SUMMARY_NAME = "summary.json"
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")  # masked when skip reasons are grouped
SHEET_NAME = "contact_sheet.png"


@dataclass
class Job:
    """One record and the views of it still to make (the mesh is loaded once for all of them)."""

    record: ScanRecord
    views: list[View]


@dataclass
class SampleOutcome:
    """What became of one view."""

    key: str
    expression: str
    status: str  # "ok" | "cached" | one of STAGES
    reason: str = ""  # why it was skipped, one line (``message`` adds the key and the file)
    face_found: bool | None = None  # FaceMesh result; None where it did not run
    split: str = ""
    file: str = ""  # the bad file, for a scan that could not be read

    @property
    def message(self) -> str:
        """One line naming the sample (and the file) and the reason."""
        return f"{self.key}: {self.file + ': ' if self.file else ''}{self.reason}"


class SampleProcessor:
    """One worker's stage: load a record's mesh, render each view, find landmarks, canonicalise, save.

    Args:
        source: Where meshes come from.
        out_dir: The preprocessing output folder (the cache's version folder is below it).
        render: Base render options (a view may change its lighting).
        canonical: Canonicalizer options (the live pipeline's defaults unless testing).
    """

    def __init__(self, source: Source, out_dir: Path, render: RenderOptions | None = None,
                 canonical: CanonicalOptions | None = None) -> None:
        self.source = source
        self.out_dir = Path(out_dir)
        self.render_options = render or RenderOptions()
        self.renderer = ScanRenderer(self.render_options)
        self.detector = LandmarkDetector(LandmarkOptions(static_image_mode=True))
        self.canonicalizer = Canonicalizer(canonical)

    def __enter__(self) -> "SampleProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release FaceMesh and the renderer's scene."""
        self.detector.close()
        self.renderer.close()
        self.canonicalizer.close()

    def process(self, job: Job) -> list[SampleOutcome]:
        """Make and save every view of ``job``; failures become outcomes, never exceptions."""
        record = job.record
        try:
            mesh = self.source.load(record)
        except ScanError as err:
            return [SampleOutcome(v.key, record.expression, "load", err.reason, split=v.split, file=str(err.path))
                    for v in job.views]
        return [self._view(mesh, view) for view in job.views]

    def _view(self, mesh: TexturedMesh, view: View) -> SampleOutcome:
        record = view.record
        options = view.render_options(self.render_options)
        if options.intrinsics != self.renderer.options.intrinsics:
            raise ValueError(f"{view.key}: a view cannot change the camera intrinsics")
        # per-view options and noise stream: the same view renders the same way in any worker, any order
        self.renderer.options = options
        self.renderer.rng = np.random.default_rng(view.render_seed)
        frame = self.renderer.process(mesh, view.pose, sequence=view.view).frame
        faces = self.detector.process(frame)
        if not faces:
            return SampleOutcome(view.key, record.expression, "no_face", "FaceMesh found no face",
                                 face_found=False, split=view.split)
        result = self.canonicalizer.process(frame, faces[0])
        if not result.ok:
            reason = re.sub(r"^frame -?\d+: ", "", result.reason)  # the view is named by its key
            return SampleOutcome(view.key, record.expression, result.status, reason, face_found=True,
                                 split=view.split)
        pose = view.pose
        meta = {
            "version": PREPROCESSING_VERSION, "key": view.key, "dataset": record.dataset, "subject": record.subject,
            "expression": record.expression, "intensity": float(view.intensity), "view": view.view,
            "pose": np.array([pose.yaw, pose.pitch, pose.roll, pose.distance_mm, *pose.offset_mm], np.float64),
            "split": view.split, "source": str(record.path), "take": record.take,
        }
        save_sample(entry_path(self.out_dir, view.key), face_to_arrays(result.face), meta)
        return SampleOutcome(view.key, record.expression, "ok", face_found=True, split=view.split)


@dataclass
class PreprocessOptions:
    """How a data set is preprocessed.

    Attributes:
        out_dir: Output folder: the cache's version folders, summary.json and the contact sheet.
        workers: Processes; 1 runs in this process.
        render: Base render options (default: D4xx-like noise and holes).
        canonical: Canonicalizer options.
        limit: Only the first ``limit`` records (quick runs); None = all.
        sheet_samples: Samples on the contact sheet (0: none written).
        progress: tqdm bar; None = only when stderr is a terminal.
    """

    out_dir: Path
    workers: int = 2
    render: RenderOptions = field(default_factory=RenderOptions)
    canonical: CanonicalOptions = field(default_factory=CanonicalOptions)
    limit: int | None = None
    sheet_samples: int = 8
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class PreprocessResult:
    """What a preprocessing run did."""

    dataset: str
    version: str
    cache_dir: Path
    records: int  # records indexed (after --limit)
    outcomes: list[SampleOutcome]  # one per view of every record that the index accepted
    index_skipped: list[tuple[str, str]]  # (file, reason) that the data-set index rejected
    seconds: float
    records_done: int  # records whose mesh was loaded this run (not all views cached)
    job_done_seconds: list[float] = field(default_factory=list)  # when each record finished, from the start

    @property
    def steady_scans_per_second(self) -> float | None:
        """Throughput after the first record finished: without the start-up (worker spawn, FaceMesh set-up)."""
        done = self.job_done_seconds
        return (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """(stage, file or sample key, reason) of every skipped file or sample."""
        return ([("index", path, reason) for path, reason in self.index_skipped]
                + [(o.status, o.key, o.reason) for o in self.outcomes if o.status in STAGES])

    @property
    def detection(self) -> tuple[int, int]:
        """(frames with a face, frames FaceMesh ran on) this run."""
        ran = [o.face_found for o in self.outcomes if o.face_found is not None]
        return sum(ran), len(ran)

    @property
    def per_expression(self) -> dict[str, int]:
        """Usable samples (new and cached) per expression, EXPRESSIONS order."""
        counts = Counter(o.expression for o in self.outcomes if o.status in ("ok", "cached"))
        return {name: counts[name] for name in EXPRESSIONS if counts[name]}

    def grouped_skips(self) -> dict[str, list[str]]:
        """``"stage: reason pattern"`` -> the files / keys skipped for it (numbers in reasons masked)."""
        groups: dict[str, list[str]] = defaultdict(list)
        for stage, what, reason in self.skipped:
            pattern = _NUMBER.sub("#", reason)
            groups[f"{stage}: {pattern}"].append(what)
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    def to_dict(self) -> dict:
        found, ran = self.detection
        splits = Counter(o.split for o in self.outcomes if o.status in ("ok", "cached") and o.split)
        return {
            "dataset": self.dataset, "version": self.version, "cache_dir": str(self.cache_dir),
            "records": self.records, "samples": len(self.outcomes), "processed": self.count("ok"),
            "cached": self.count("cached"), "skipped": len(self.skipped),
            "skipped_by_stage": dict(Counter(stage for stage, _, _ in self.skipped)),
            "skipped_groups": self.grouped_skips(),
            "skipped_samples": [f"{path}: {reason}" for path, reason in self.index_skipped]
            + [o.message for o in self.outcomes if o.status in STAGES],
            "per_expression": self.per_expression, "per_split": dict(sorted(splits.items())),
            "facemesh_detected": found, "facemesh_frames": ran,
            "facemesh_detection_rate": found / ran if ran else None,
            "seconds": round(self.seconds, 3), "records_done": self.records_done,
            "scans_per_second": round(self.records_done / self.seconds, 3) if self.seconds > 0 else None,
            "steady_scans_per_second": (round(self.steady_scans_per_second, 3)
                                        if self.steady_scans_per_second else None),
        }

    def report(self, examples: int = 3) -> str:
        """The multi-line summary printed at the end of a run."""
        d = self.to_dict()
        lines = [f"preprocess {self.dataset} -> {self.cache_dir}",
                 f"  samples {d['samples']} of {d['records']} records: new {d['processed']}, cached {d['cached']}, "
                 f"skipped {d['skipped']}"]
        if d["facemesh_frames"]:
            lines.append(f"  FaceMesh found a face in {d['facemesh_detected']} of {d['facemesh_frames']} rendered "
                         f"frames ({100 * d['facemesh_detection_rate']:.1f} %)")
        per = ", ".join(f"{k} {v}" for k, v in d["per_expression"].items()) or "none"
        lines.append(f"  usable samples per expression: {per}")
        if d["per_split"]:
            lines.append("  per split: " + ", ".join(f"{k} {v}" for k, v in d["per_split"].items()))
        for group, items in d["skipped_groups"].items():
            shown = ", ".join(items[:examples]) + (", ..." if len(items) > examples else "")
            lines.append(f"  skipped {len(items)} x {group}  [{shown}]")
        if self.records_done:
            steady = (f" ({d['steady_scans_per_second']:.2f} scans/s after the first)"
                      if d["steady_scans_per_second"] else "")
            lines.append(f"  {self.records_done} scans in {self.seconds:.1f} s = {d['scans_per_second']:.2f} "
                         f"scans/s{steady}")
        return "\n".join(lines)


_WORKER: SampleProcessor | None = None
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _single_threaded_children():
    """Processes started inside get one BLAS / OpenMP thread each (spawned children copy the environment).

    With two workers on two cores, numpy's OpenBLAS threads spin-waiting for work on the core the
    other worker needs made two workers SLOWER than one (5.7 vs 7.5 scans/s); one thread each: 14.
    """
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _init_worker(source: Source, out_dir: Path, render: RenderOptions, canonical: CanonicalOptions) -> None:
    global _WORKER
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete
    _WORKER = SampleProcessor(source, out_dir, render, canonical)


def _work(job: Job) -> list[SampleOutcome]:
    return _WORKER.process(job)


class Preprocessor:
    """Runs a source's records through the sample stage into the cache (see the module docstring)."""

    def __init__(self, options: PreprocessOptions) -> None:
        self.options = options

    def __enter__(self) -> "Preprocessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held between runs (each run owns its pool)."""

    def process(self, source: Source) -> PreprocessResult:
        """Preprocess every record of ``source`` that is not cached yet; write the summary and sheet."""
        opt = self.options
        started = time.perf_counter()
        index = source.index()
        records = index.records[: opt.limit] if opt.limit is not None else index.records
        cached: list[SampleOutcome] = []
        jobs = []
        for record in records:
            todo = []
            for view in source.views(record):
                if self._cached(view):
                    cached.append(SampleOutcome(view.key, record.expression, "cached", split=view.split))
                else:
                    todo.append(view)
            if todo:
                jobs.append(Job(record, todo))
        made, done_at = self._run(source, jobs)
        result = PreprocessResult(
            dataset=source.dataset, version=PREPROCESSING_VERSION, cache_dir=cache_root(opt.out_dir),
            records=len(records), outcomes=cached + made,
            index_skipped=[(str(path), reason) for path, reason in index.skipped],
            seconds=time.perf_counter() - started, records_done=len(jobs),
            job_done_seconds=[t - started for t in done_at])
        opt.out_dir.mkdir(parents=True, exist_ok=True)
        (opt.out_dir / SUMMARY_NAME).write_text(json.dumps(result.to_dict(), indent=2))
        if opt.sheet_samples > 0:
            paths = _sheet_choice([o for o in result.outcomes if o.status in ("ok", "cached")], opt.sheet_samples)
            if paths:
                write_contact_sheet([entry_path(opt.out_dir, key) for key in paths], opt.out_dir / SHEET_NAME)
        return result

    def _cached(self, view: View) -> bool:
        """A complete sample of this version is already there (a damaged one is made again)."""
        path = entry_path(self.options.out_dir, view.key)
        if not path.is_file():
            return False
        try:
            read_entry(path)
        except CacheError:
            return False
        return True

    def _run(self, source: Source, jobs: list[Job]) -> tuple[list[SampleOutcome], list[float]]:
        """Outcomes of every job's views, and the time each job finished (perf_counter)."""
        opt = self.options
        outcomes: list[SampleOutcome] = []
        done_at: list[float] = []
        if not jobs:
            return outcomes, done_at
        show = opt.progress if opt.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=sum(len(j.views) for j in jobs), desc=f"preprocess {source.dataset}", unit="sample",
                   disable=not show)

        def collect(done: list[SampleOutcome]) -> None:
            done_at.append(time.perf_counter())
            for outcome in done:
                if outcome.status in STAGES:
                    bar.write(f"skipped {outcome.message}")  # one line each, as they happen
            bar.update(len(done))
            outcomes.extend(done)

        try:
            if opt.workers == 1 or len(jobs) == 1:
                with SampleProcessor(source, opt.out_dir, opt.render, opt.canonical) as stage:
                    for job in jobs:
                        collect(stage.process(job))
            else:
                context = multiprocessing.get_context("spawn")
                with _single_threaded_children():  # the pool starts its workers here
                    pool = context.Pool(min(opt.workers, len(jobs)), _init_worker,
                                        (source, opt.out_dir, opt.render, opt.canonical))
                with pool:
                    for done in pool.imap_unordered(_work, jobs):
                        collect(done)
        finally:
            bar.close()
        return outcomes, done_at


# ------------------------------------------------------------------------------------- contact sheet

_MASK_COLOURS = np.array([[255, 64, 64], [64, 128, 255], [255, 160, 0], [0, 200, 255], [80, 220, 80],
                          [230, 60, 230]], np.float32)  # RGB per mask, MASK_NAMES order
assert len(_MASK_COLOURS) == len(MASK_NAMES)


def _sheet_choice(outcomes: list[SampleOutcome], count: int) -> list[str]:
    """Up to ``count`` keys, cycling through the expressions so every class shows, subjects mixed."""
    by_expression: dict[str, list[str]] = defaultdict(list)
    for o in sorted(outcomes, key=lambda o: o.key):
        by_expression[o.expression].append(o.key)
    rng = np.random.default_rng(0)  # the same sheet for the same cache
    for keys in by_expression.values():
        rng.shuffle(keys)
    chosen, depth = [], 0
    while len(chosen) < count and any(len(v) > depth for v in by_expression.values()):
        for name in EXPRESSIONS:
            if depth < len(by_expression.get(name, [])) and len(chosen) < count:
                chosen.append(by_expression[name][depth])
        depth += 1
    return chosen


def sample_tiles(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Texture | depth | normals | masks over the texture, side by side (S, 4 S, 3) uint8 RGB."""
    texture = np.asarray(arrays["texture"], np.uint8)  # (S, S, 3)
    depth = np.asarray(arrays["depth_mm"], np.float32)  # (S, S), <= 0 behind the nose tip
    face = depth > SPEC.depth_min_mm  # the background holds depth_min_mm
    lo, hi = np.percentile(depth[face], [1, 99]) if face.any() else (SPEC.depth_min_mm, SPEC.depth_max_mm)
    scaled = np.clip((depth - lo) / max(hi - lo, 1e-3) * 255, 0, 255)  # this face's own range: more contrast
    depth_rgb = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_VIRIDIS)[:, :, ::-1].copy()
    depth_rgb[~face] = 0
    normals = np.clip((np.asarray(arrays["normals"]).transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    masks = np.clip(np.asarray(arrays["masks"], np.float32), 0, 1)  # (6, S, S)
    tint = np.einsum("khw,kc->hwc", masks, _MASK_COLOURS) / np.maximum(masks.sum(0), 1e-6)[..., None]
    alpha = 0.55 * masks.max(0)[..., None]
    overlay = (texture * (1 - alpha) + tint * alpha).astype(np.uint8)
    return np.concatenate([texture, depth_rgb, normals, overlay], axis=1)


def write_contact_sheet(paths: Sequence[Path], out: Path, scale: int = 2) -> Path:
    """One row per cached sample (label above it), columns texture, depth, normals, masks overlay.

    Raises:
        CacheError: A sample cannot be read.
    """
    rows = []
    for path in paths:
        entry = read_entry(path)
        tiles = sample_tiles(load_arrays(path))
        tiles = cv2.resize(tiles, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        banner = np.full((22, tiles.shape[1], 3), 255, np.uint8)
        label = f"{entry.subject} {entry.expression} view {entry.view} (yaw {entry.pose[0]:+.0f}, " \
                f"pitch {entry.pose[1]:+.0f}, {entry.pose[3]:.0f} mm)"
        cv2.putText(banner, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [banner, tiles]
    header = np.full((22, rows[1].shape[1], 3), 230, np.uint8)
    width = rows[1].shape[1] // 4
    for k, name in enumerate(("texture", "depth (own range)", "normals (x, y, z as RGB)", "masks")):
        cv2.putText(header, name, (k * width + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([header, *rows], axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), np.ascontiguousarray(sheet[:, :, ::-1])):
        raise OSError(f"{out}: cv2 could not write the contact sheet")
    return out


# ------------------------------------------------------------------------------------------------ CLI


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The data-set options shared with ``python -m train`` (which can preprocess first)."""
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", type=Path, default=None, help="data-set folder (bu3dfe, bosphorus; "
                        "ignored for synthetic)")
    parser.add_argument("--views", type=int, default=1, help="renders per scan: view 0 frontal, the rest with "
                        "random small pose jitter (scan data sets)")
    parser.add_argument("--identities", type=int, default=SyntheticOptions.identities, help="synthetic identities")
    parser.add_argument("--per-class", type=int, default=SyntheticOptions.samples_per_identity_expression,
                        help="synthetic samples per identity and class")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes (1: in this process)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (quick runs)")
    parser.add_argument("--ideal", action="store_true", help="render without depth noise, holes and random light")


def source_from_args(args: argparse.Namespace) -> Source:
    """The source the shared arguments describe (``args.seed`` seeds poses and the synthetic set)."""
    synthetic = SyntheticOptions(identities=args.identities, samples_per_identity_expression=args.per_class,
                                 seed=args.seed)
    return make_source(args.dataset, args.root, args.views, args.seed, synthetic)


def options_from_args(args: argparse.Namespace, out_dir: Path, sheet: int = 8) -> PreprocessOptions:
    render = RenderOptions.ideal() if args.ideal else RenderOptions()
    return PreprocessOptions(out_dir=out_dir, workers=args.workers, render=render, limit=args.limit,
                             sheet_samples=sheet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Usage examples are at the top of train/preprocess.py.")
    add_source_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (cache, summary.json, contact sheet)")
    parser.add_argument("--seed", type=int, default=0, help="seeds view poses, render noise and the synthetic set")
    parser.add_argument("--sheet", type=int, default=8, help="samples on the contact sheet (0: none)")
    args = parser.parse_args(argv)
    try:
        source = source_from_args(args)
        options = options_from_args(args, args.out, args.sheet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with Preprocessor(options) as preprocessor:
            result = preprocessor.process(source)
    except ScanError as err:  # the root itself is unusable (not a folder)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report())
    print(f"summary: {options.out_dir / SUMMARY_NAME}")
    return 0 if result.count("ok") + result.count("cached") else 1


if __name__ == "__main__":
    sys.exit(main())
