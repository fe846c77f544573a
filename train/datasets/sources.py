"""Data-set sources for preprocessing: records -> mesh -> the views (poses) to render.

Usage:
    from train.datasets.sources import make_source
    source = make_source("bu3dfe", root="/data/BU-3DFE", views=3, seed=0)
    index = source.index()                        # IndexResult: records + skipped files
    for record in index.records:
        views = source.views(record)              # View: cache key, pose, render seed, lighting
        mesh = source.load(record)                # TexturedMesh, or ScanError naming the file

A source is plain, picklable data: the preprocessing pool sends it to each worker, which then
loads meshes itself (``SyntheticSource`` builds its face model lazily, once per process).

Views of a scan (``ScanSource``): view 0 is frontal at ``frontal_distance_mm``; views 1..N-1
jitter the pose (yaw, pitch, roll, distance, offset) uniformly within ``PoseJitter``, which,
with the renderer's depth noise and holes, is pose and noise augmentation for free. Every
random draw is seeded by ``(seed, crc32(cache key))``: the same view of the same scan always
renders the same way, in any process and any order (``hash()`` would change per process).
A synthetic record is one view at its own pose and lighting.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.datasets.bosphorus import index_bosphorus, load_bosphorus
from train.datasets.bu3dfe import index_bu3dfe, load_bu3dfe
from train.datasets.scan import IndexResult, ScanRecord
from train.datasets.synthetic import SyntheticFaces, SyntheticOptions, SyntheticRecord, synthetic_records
from train.mesh import TexturedMesh
from train.render import RenderOptions, RenderPose

DATASETS: tuple[str, ...] = ("bu3dfe", "bosphorus", "synthetic")
_SCAN_READERS = {"bu3dfe": (index_bu3dfe, load_bu3dfe), "bosphorus": (index_bosphorus, load_bosphorus)}


@dataclass(frozen=True)
class View:
    """One sample to preprocess: a record rendered at one pose.

    Attributes:
        key: Cache key, a relative path without suffix (``bu3dfe/F0001/F0001_AN03WH_F3D_v0``).
        record: The sample's labels and files.
        view: 0 = the reference (frontal for scans), 1.. = jittered.
        pose: Where the head is in front of the camera.
        render_seed: Seeds the renderer's noise, holes, background and (unless set) light.
        intensity: Expression intensity for the cache (BU-3DFE level, synthetic strength; NaN: none).
        split: Held-out set of the subject ("train"/"val"/"test"; "" where the data set has none).
        render_changes: ``RenderOptions`` fields set for this view only (e.g. lighting).
    """

    key: str
    record: ScanRecord
    view: int
    pose: RenderPose
    render_seed: int
    intensity: float = float("nan")
    split: str = ""
    render_changes: tuple[tuple[str, object], ...] = ()

    def render_options(self, base: RenderOptions) -> RenderOptions:
        """``base`` with this view's changes applied."""
        return dataclasses.replace(base, **dict(self.render_changes)) if self.render_changes else base


@dataclass(frozen=True)
class PoseJitter:
    """Uniform pose jitter of views 1.. of a scan (view 0 is frontal at the middle distance)."""

    yaw_deg: float = 15.0
    pitch_deg: float = 10.0
    roll_deg: float = 6.0
    distance_mm: tuple[float, float] = (500.0, 700.0)
    offset_mm: tuple[float, float] = (30.0, 20.0)  # up to +-(x, y) off the optical axis


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from strings and numbers that is the same in every process."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


@dataclass
class ScanSource:
    """A scanned data set (BU-3DFE or Bosphorus) under ``root``."""

    dataset: str
    root: Path
    views_per_scan: int = 1
    seed: int = 0
    jitter: PoseJitter = field(default_factory=PoseJitter)

    def __post_init__(self) -> None:
        if self.dataset not in _SCAN_READERS:
            raise ValueError(f"unknown scan data set {self.dataset!r}; choose one of {', '.join(_SCAN_READERS)}")
        if self.views_per_scan < 1:
            raise ValueError(f"views per scan must be >= 1, got {self.views_per_scan}")
        self.root = Path(self.root)

    def index(self) -> IndexResult:
        """The data set's expression samples (labels from file names) and the files it skipped."""
        return _SCAN_READERS[self.dataset][0](self.root)

    def views(self, record: ScanRecord) -> list[View]:
        """View 0 frontal, then ``views_per_scan - 1`` jittered poses."""
        j = self.jitter
        frontal = 0.5 * (j.distance_mm[0] + j.distance_mm[1])
        intensity = float(record.intensity) if record.intensity is not None else float("nan")
        views = []
        for v in range(self.views_per_scan):
            key = f"{self.dataset}/{record.subject}/{record.path.stem}_v{v}"
            rng = np.random.default_rng(stable_seed(self.seed, key))
            if v == 0:
                pose = RenderPose(distance_mm=frontal)
            else:
                pose = RenderPose(
                    yaw=float(rng.uniform(-1, 1) * j.yaw_deg), pitch=float(rng.uniform(-1, 1) * j.pitch_deg),
                    roll=float(rng.uniform(-1, 1) * j.roll_deg), distance_mm=float(rng.uniform(*j.distance_mm)),
                    offset_mm=(float(rng.uniform(-1, 1) * j.offset_mm[0]), float(rng.uniform(-1, 1) * j.offset_mm[1])))
            views.append(View(key, record, v, pose, int(rng.integers(2**31)), intensity))
        return views

    def load(self, record: ScanRecord) -> TexturedMesh:
        """The scan's mesh (without its landmark files: rendering does not use them); raises
        :class:`~train.datasets.scan.ScanError` for a bad file."""
        return _SCAN_READERS[self.dataset][1](record, landmarks=False)


@dataclass
class SyntheticSource:
    """The ICT-FaceKit synthetic set (``train.datasets.synthetic``); one view per record."""

    options: SyntheticOptions = field(default_factory=SyntheticOptions)
    dataset: str = "synthetic"
    _faces: SyntheticFaces | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_faces": None}  # workers build their own face model

    def index(self) -> IndexResult:
        """Every record of the set (nothing can be skipped: no files are read)."""
        return IndexResult(Path(f"<synthetic seed {self.options.seed}>"), list(synthetic_records(self.options)))

    def views(self, record: SyntheticRecord) -> list[View]:
        pose = RenderPose(record.yaw, record.pitch, record.roll, record.distance_mm, record.offset_mm)
        lighting = (("ambient", record.ambient), ("diffuse", record.diffuse),
                    ("light_direction", record.light_direction))
        return [View(f"{self.dataset}/{record.subject}/{record.path.name}_v0", record, 0, pose, record.render_seed,
                     record.strength, record.split, lighting)]

    def load(self, record: SyntheticRecord) -> TexturedMesh:
        if self._faces is None:
            self._faces = SyntheticFaces(self.options)
        return self._faces.process(record)


Source = ScanSource | SyntheticSource


def make_source(
    dataset: str,
    root: str | os.PathLike | None = None,
    views: int = 1,
    seed: int = 0,
    synthetic: SyntheticOptions | None = None,
) -> Source:
    """The source of a data set by name.

    Args:
        dataset: One of :data:`DATASETS`.
        root: The data set's folder (scan data sets only; ignored for "synthetic").
        views: Views per scan (scan data sets; synthetic records are one view each).
        seed: Seeds the views' poses and noise (scan data sets; synthetic: ``synthetic.seed``).
        synthetic: Options of the synthetic set (default ``SyntheticOptions(seed=seed)``).

    Raises:
        ValueError: Unknown data set, or a scan data set without ``root``.
    """
    if dataset == "synthetic":
        return SyntheticSource(synthetic or SyntheticOptions(seed=seed))
    if dataset not in _SCAN_READERS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"data set {dataset!r} needs --root (the folder holding its files)")
    return ScanSource(dataset, Path(root), views, seed)
