"""The cache of preprocessed samples and a torch Dataset over it.

Usage:
    from train.cache import CachedDataset, scan_cache
    index = scan_cache("data/bu3dfe")            # entries of the current PREPROCESSING_VERSION
    for path, reason in index.errors:            # corrupt or foreign files: listed, never used
        print(f"{path}: {reason}")
    dataset = CachedDataset(index)               # items: texture, geometry, masks, label, ...
    records = dataset.records                    # ScanRecords for train.protocols.make_folds

Layout: ``OUT/<PREPROCESSING_VERSION>/<dataset>/<subject>/<name>_v<view>.npz``, one compressed
file per (scan, view). Each file holds ``realtime.model_inputs.face_to_arrays(face)`` (texture
uint8, depth_mm, normals, masks, valid: unnormalised) plus the sample's metadata (version,
key, dataset, subject, expression, intensity, view, render pose, split, source file, take).
A cache made by another preprocessing version lives in another folder and is never read for
this one; a file whose own ``version`` differs (copied by hand) is reported and skipped.

Items are normalised by ``realtime.model_inputs.arrays_to_feeds``, the runtime's one
normalisation path, so training sees exactly what the engine will be fed.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from realtime.model_inputs import ARRAY_KEYS, arrays_to_feeds, flip_arrays
from realtime.spec import EXPRESSIONS, PREPROCESSING_VERSION
from train.datasets.scan import ScanRecord

SUFFIX = ".npz"
POSE_FIELDS = ("yaw", "pitch", "roll", "distance_mm", "offset_x_mm", "offset_y_mm")
_META_KEYS = ("version", "key", "dataset", "subject", "expression", "intensity", "view", "pose", "split",
              "source", "take")


class CacheError(ValueError):
    """A cache file that cannot be used; ``str()`` is one line: ``"path: reason"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class CacheWarning(UserWarning):
    """A cache file was skipped (the message names it and says why)."""


@dataclass(frozen=True)
class CacheEntry:
    """Metadata of one cached sample (its arrays stay in the file)."""

    path: Path
    key: str
    dataset: str
    subject: str
    expression: str
    intensity: float  # BU-3DFE level 0..4, synthetic strength in [0, 1], NaN for none
    view: int
    pose: tuple[float, ...]  # POSE_FIELDS of the render
    split: str  # "train" | "val" | "test" for the synthetic set, "" otherwise
    source: str  # the scan file (or the synthetic record's name)
    take: int = 0

    @property
    def scan_id(self) -> tuple[str, str]:
        """What the views of one scan share."""
        return self.dataset, self.source

    def scan_record(self) -> ScanRecord:
        """The scan's :class:`ScanRecord` (labels and source path), for ``train.protocols``."""
        level = None if np.isnan(self.intensity) or self.dataset != "bu3dfe" else int(round(self.intensity))
        return ScanRecord(dataset=self.dataset, subject=self.subject, expression=self.expression, intensity=level,
                          path=Path(self.source), texture=Path(self.source), take=self.take)


def cache_root(out_dir: str | os.PathLike, version: str = PREPROCESSING_VERSION) -> Path:
    """The folder holding the samples of one preprocessing version."""
    return Path(out_dir) / version


def entry_path(out_dir: str | os.PathLike, key: str, version: str = PREPROCESSING_VERSION) -> Path:
    """Where the sample with cache key ``key`` lives."""
    return cache_root(out_dir, version) / f"{key}{SUFFIX}"


def save_sample(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, object]) -> Path:
    """Write one sample atomically (a temporary file, then a rename: a crash never leaves half a file).

    Args:
        path: Output ``.npz``.
        arrays: ``face_to_arrays(face)``.
        meta: The metadata fields (see the module docstring); strings, numbers, number tuples.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [k for k in ARRAY_KEYS if k not in arrays] + [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: sample lacks {', '.join(missing)}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **{k: np.asarray(arrays[k]) for k in ARRAY_KEYS},
                            **{k: np.asarray(meta[k]) for k in _META_KEYS})
    os.replace(tmp, path)
    return path


def _open(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CacheError(path, "missing file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CacheError(path, f"not a readable cache file ({type(exc).__name__}: {exc})") from None


def read_entry(path: str | os.PathLike, version: str = PREPROCESSING_VERSION) -> CacheEntry:
    """The metadata of one cache file (the arrays are not decompressed).

    Raises:
        CacheError: Unreadable or damaged file, missing fields, or made by another version.
    """
    path = Path(path)
    try:
        with _open(path) as z:
            missing = [k for k in _META_KEYS + ARRAY_KEYS if k not in z.files]
            if missing:
                raise CacheError(path, f"not a sample of this cache (lacks {', '.join(missing)})")
            meta = {k: z[k] for k in _META_KEYS}
    except CacheError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CacheError(path, f"damaged cache file ({type(exc).__name__}: {exc})") from None
    if str(meta["version"]) != version:
        raise CacheError(path, f"made by preprocessing {str(meta['version'])!r}, current is {version!r}")
    return CacheEntry(path=path, key=str(meta["key"]), dataset=str(meta["dataset"]), subject=str(meta["subject"]),
                      expression=str(meta["expression"]), intensity=float(meta["intensity"]),
                      view=int(meta["view"]), pose=tuple(float(v) for v in np.ravel(meta["pose"])),
                      split=str(meta["split"]), source=str(meta["source"]), take=int(meta["take"]))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``face_to_arrays`` arrays of one cache file.

    Raises:
        CacheError: The file cannot be read or a member is damaged.
    """
    path = Path(path)
    try:
        with _open(path) as z:
            return {k: z[k] for k in ARRAY_KEYS}
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CacheError(path, f"damaged cache file ({type(exc).__name__}: {exc})") from None


@dataclass
class CacheIndex:
    """The usable samples of a cache folder and what was left out."""

    root: Path  # the version folder
    entries: list[CacheEntry]
    errors: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason): skipped
    other_versions: dict[str, int] = field(default_factory=dict)  # version folder -> files, never read

    def summary(self) -> str:
        """One line: samples, scans, subjects per data set, skipped files, other versions present."""
        per_dataset = Counter(e.dataset for e in self.entries)
        parts = [f"{name} {n}" for name, n in sorted(per_dataset.items())]
        subjects = len({(e.dataset, e.subject) for e in self.entries})
        scans = len({e.scan_id for e in self.entries})
        text = (f"{self.root}: {len(self.entries)} samples ({', '.join(parts) or 'none'}) of {scans} scans, "
                f"{subjects} subjects; skipped {len(self.errors)} files")
        if self.other_versions:
            other = ", ".join(f"{v} ({n} files)" for v, n in sorted(self.other_versions.items()))
            text += f"; not used (other preprocessing versions): {other}"
        return text


def scan_cache(out_dir: str | os.PathLike, version: str = PREPROCESSING_VERSION,
               dataset: str | None = None) -> CacheIndex:
    """Every usable sample under ``out_dir/<version>`` (sorted by key), the bad files listed apart.

    Args:
        out_dir: The preprocessing output folder (the one holding version folders).
        version: Which preprocessing version to read; other version folders are only counted.
        dataset: Keep only this data set's samples.
    """
    out_dir = Path(out_dir)
    root = cache_root(out_dir, version)
    other = {}
    if out_dir.is_dir():
        for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name != version):
            count = sum(1 for _ in folder.rglob(f"*{SUFFIX}"))
            if count:
                other[folder.name] = count
    entries, errors = [], []
    for path in sorted(root.rglob(f"*{SUFFIX}")) if root.is_dir() else []:
        try:
            entry = read_entry(path, version)
        except CacheError as err:
            errors.append((path, err.reason))
            continue
        if dataset is None or entry.dataset == dataset:
            entries.append(entry)
    entries.sort(key=lambda e: e.key)
    return CacheIndex(root, entries, errors, other)


class CachedDataset:
    """A map-style torch dataset over cached samples (``DataLoader`` takes it as it is).

    Items are dicts: ``texture`` (3, S, S), ``geometry`` (4, S, S), ``masks`` (6, S, S) float32
    tensors made by ``arrays_to_feeds`` (the runtime's normalisation), ``label`` (int64 index into
    ``class_names``), ``index`` (the item's position) and ``subject`` (str). ``records`` and
    ``entries`` give every item's metadata for protocol splits without reading the arrays.

    torch is imported on the first item, not with this module: the preprocessing workers, which
    only write the cache, then start without it (about a second saved per worker).

    Args:
        source: A :class:`CacheIndex`, a list of :class:`CacheEntry`, a cache output folder, or a
            list of ``.npz`` paths (unreadable or foreign ones are skipped with a
            :class:`CacheWarning` and listed in ``skipped``).
        augment: Mirror each item with probability 1/2 (``realtime.model_inputs.flip_arrays``).
            ``train.train.fit`` augments whole batches itself; this is for other loops.
        class_names: Label order; every sample's expression must be one of them.
        in_memory: Read every file once at construction and keep the arrays (no I/O per item).
        seed: Seeds the flips.

    Raises:
        ValueError: A sample's expression is not in ``class_names``.
    """

    def __init__(
        self,
        source: CacheIndex | Sequence[CacheEntry] | Sequence[str | os.PathLike] | str | os.PathLike,
        augment: bool = False,
        class_names: Sequence[str] = EXPRESSIONS,
        in_memory: bool = False,
        seed: int = 0,
    ) -> None:
        self.skipped: list[tuple[Path, str]] = []
        if isinstance(source, (str, os.PathLike)):
            source = scan_cache(source)
        if isinstance(source, CacheIndex):
            self.skipped = list(source.errors)
            entries = list(source.entries)
        else:
            entries = []
            for item in source:
                if isinstance(item, CacheEntry):
                    entries.append(item)
                    continue
                try:
                    entries.append(read_entry(item))
                except CacheError as err:
                    self.skipped.append((err.path, err.reason))
                    warnings.warn(str(err), CacheWarning, stacklevel=2)
        self.entries: list[CacheEntry] = entries
        self.class_names = tuple(class_names)
        unknown = sorted({e.expression for e in entries} - set(self.class_names))
        if unknown:
            raise ValueError(f"cached samples of {', '.join(unknown)} are not in the classes {list(self.class_names)}")
        self.labels = np.array([self.class_names.index(e.expression) for e in entries], np.int64)  # (N,)
        self.augment = augment
        self._rng = np.random.default_rng(seed)
        self._arrays = [load_arrays(e.path) for e in entries] if in_memory else None

    @property
    def records(self) -> list[ScanRecord]:
        """Each item's scan record (views of one scan give equal records)."""
        return [e.scan_record() for e in self.entries]

    def subset(self, indices: Sequence[int]) -> "CachedDataset":
        """A dataset of some of this one's items (shares loaded arrays; same classes and augmentation)."""
        sub = CachedDataset.__new__(CachedDataset)
        sub.skipped = []
        sub.entries = [self.entries[i] for i in indices]
        sub.class_names = self.class_names
        sub.labels = self.labels[np.asarray(indices, np.int64)] if len(indices) else np.zeros(0, np.int64)
        sub.augment = self.augment
        sub._rng = np.random.default_rng(self._rng.integers(2**31))
        sub._arrays = [self._arrays[i] for i in indices] if self._arrays is not None else None
        return sub

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, object]:
        entry = self.entries[index]
        arrays = self._arrays[index] if self._arrays is not None else load_arrays(entry.path)
        import torch

        if self.augment and self._rng.uniform() < 0.5:
            arrays = flip_arrays(arrays)
        try:
            feeds = arrays_to_feeds([arrays])
        except ValueError as exc:  # misshapen arrays: name the file, not "sample 0"
            raise CacheError(entry.path, str(exc)) from None
        return {"texture": torch.from_numpy(feeds["texture"][0]),  # (3, S, S)
                "geometry": torch.from_numpy(feeds["geometry"][0]),  # (4, S, S)
                "masks": torch.from_numpy(feeds["masks"][0]),  # (6, S, S)
                "label": torch.tensor(self.labels[index]),
                "index": index,
                "subject": entry.subject}
