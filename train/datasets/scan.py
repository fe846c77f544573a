"""What the scan-dataset readers share: records, the index result, errors, mesh finishing.

A dataset index walks a folder tree, reads labels from file names only (cheap), and returns
:class:`IndexResult`: the expression samples it found, the files it skipped with a reason,
and counts of files that are valid but not expression samples (action units, poses...).
Loading one sample (``load_bu3dfe`` / ``load_bosphorus``) parses the files and returns a
:class:`train.mesh.TexturedMesh`, or raises :class:`ScanError` naming the bad file; a
caller that converts a whole dataset catches ``ScanError`` per sample and keeps going.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from realtime.spec import EXPRESSIONS
from train.mesh import TexturedMesh


class ScanError(ValueError):
    """A scan file that cannot be used; ``str()`` is one line: ``"path: reason"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause text held
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class ScanRecord:
    """One expression sample of a scan dataset, as found by an index (no file is read)."""

    dataset: str  # "bu3dfe" | "bosphorus" (the synthetic set uses its own name)
    subject: str  # "F0001", "bs000"
    expression: str  # one of realtime.spec.EXPRESSIONS
    intensity: int | None  # BU-3DFE 0 (neutral) .. 4; None where the dataset has none
    path: Path  # the geometry file: .wrl (BU-3DFE) or .bnt (Bosphorus)
    texture: Path  # the texture image the mesh's UVs index
    landmarks: Path | None = None  # 3D landmarks: .bnd (BU-3DFE) or .lm3 (Bosphorus)
    landmarks_2d: Path | None = None  # Bosphorus .lm2 (pixels of ``texture``)
    photo: Path | None = None  # BU-3DFE _F2D.bmp frontal image (NOT the mesh texture)
    take: int = 0  # Bosphorus trailing index (bs000_N_N_2 -> 2); 0 elsewhere

    def __post_init__(self) -> None:
        if self.expression not in EXPRESSIONS:
            raise ValueError(f"{self.path}: expression {self.expression!r} is not one of {EXPRESSIONS}")


@dataclass
class IndexResult:
    """What an index found under a dataset root."""

    root: Path
    records: list[ScanRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason), bad files
    ignored: Counter = field(default_factory=Counter)  # category -> count: valid non-expression files

    def summary(self) -> str:
        """One line: samples per expression, skipped and ignored counts."""
        per_expr = Counter(r.expression for r in self.records)
        parts = [f"{name} {per_expr[name]}" for name in EXPRESSIONS if per_expr[name]]
        ignored = ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items())) or "none"
        subjects = len({r.subject for r in self.records})
        return (
            f"{self.root}: {len(self.records)} samples of {subjects} subjects ({', '.join(parts) or 'none'}); "
            f"skipped {len(self.skipped)}; not expression samples: {ignored}"
        )


def sort_records(records: list[ScanRecord]) -> list[ScanRecord]:
    """Records in a stable order: subject, expression (EXPRESSIONS order), intensity, take."""
    return sorted(
        records,
        key=lambda r: (r.subject, EXPRESSIONS.index(r.expression), r.intensity or 0, r.take, str(r.path)),
    )


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` (subfolders included), in sorted order for reproducible indexes."""
    if not root.is_dir():
        raise ScanError(root, "dataset root is not a folder")
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def read_text(path: Path) -> str:
    """A text file's content; latin-1 so that stray bytes never raise a decode error."""
    try:
        return path.read_text(encoding="latin-1")
    except FileNotFoundError:
        raise ScanError(path, "missing file") from None
    except OSError as err:
        raise ScanError(path, f"cannot read: {err.strerror}") from None


def read_bytes(path: Path) -> bytes:
    """A binary file's content, with the errors named like the rest of the readers."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ScanError(path, "missing file") from None
    except OSError as err:
        raise ScanError(path, f"cannot read: {err.strerror}") from None


def read_texture(path: Path, scan: Path) -> np.ndarray:
    """A texture image as (H, W, 3) uint8 RGB.

    Args:
        path: The image file (BMP, PNG...).
        scan: The scan that references it, named in the error message.

    Raises:
        ScanError: The image is missing or cannot be decoded.
    """
    if not path.is_file():
        raise ScanError(path, f"missing texture (for {scan.name})")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # None, not an exception, when undecodable
    if bgr is None or bgr.size == 0:
        raise ScanError(path, f"unreadable image (texture of {scan.name})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) RGB


def parse_numbers(text: str, dtype: type, path: Path, what: str) -> np.ndarray:
    """Whitespace/comma separated numbers in C speed; any stray token is an error.

    Args:
        text: The array body (between the brackets).
        dtype: ``np.float64`` or ``np.int64``.
        path: File named in errors.
        what: Array named in errors (e.g. ``"coordIndex"``).
    """
    if "#" in text:  # a VRML comment inside an array: drop it up to the end of its line
        text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    text = text.replace(",", " ")
    if not text.strip():
        return np.zeros(0, dtype=dtype)
    with warnings.catch_warnings():
        # numpy 1.x warns (2.x raises) and returns a prefix when a token is not a number
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=" ")
        except (DeprecationWarning, ValueError):
            raise ScanError(path, f"bad number in {what}") from None


def finish_mesh(
    vertices: np.ndarray,
    triangles: np.ndarray,
    uv: np.ndarray,
    texture: np.ndarray,
    landmarks: dict[str, np.ndarray] | None,
    source: Path,
) -> TexturedMesh:
    """Checks a parsed mesh and returns it facing +z with counter-clockwise triangles.

    The winding of the whole mesh is flipped when the area-weighted normal points away
    from the viewer (a face scan is seen from +z; flipping each triangle on its own would
    wrongly turn the sides of the nose and the chin). UVs are clipped into [0, 1].

    Args:
        vertices: (V, 3) mm.
        triangles: (T, 3) vertex indices.
        uv: (T, 3, 2) per-corner texture coordinates, v from the top.
        texture: (H, W, 3) uint8 RGB.
        landmarks: Named points in the mesh frame, or None.
        source: The scan file, named in errors and kept in the mesh.

    Raises:
        ScanError: Empty mesh, NaN/inf, index out of range.
    """
    if len(vertices) == 0 or len(triangles) == 0:
        raise ScanError(source, f"empty mesh ({len(vertices)} vertices, {len(triangles)} triangles)")
    if not np.isfinite(vertices).all():
        raise ScanError(source, "NaN/inf in vertex coordinates")
    if not np.isfinite(uv).all():
        raise ScanError(source, "NaN/inf in texture coordinates")
    if triangles.min() < 0 or triangles.max() >= len(vertices):
        raise ScanError(source, f"index out of range: vertex index {triangles.max()} >= {len(vertices)} vertices")
    x, y = (vertices[:, k][triangles] for k in range(2))  # (T, 3) each
    if ((x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])).sum() < 0:
        triangles = triangles[:, ::-1]
        uv = uv[:, ::-1]
    return TexturedMesh(
        vertices=np.ascontiguousarray(vertices, dtype=np.float32),
        triangles=np.ascontiguousarray(triangles, dtype=np.int32),
        uv=np.clip(uv.astype(np.float32), 0.0, 1.0),
        texture=texture,
        landmarks=landmarks,
        source=str(source),
    )
