"""Bosphorus: index the folder tree by file name, load a ``.bnt`` range grid as a TexturedMesh.

File stems: ``bs000_E_HAPPY_0`` (emotion), ``bs000_N_N_0`` (neutral; several takes),
``bs000_LFAU_9_0`` / ``_UFAU_`` / ``_CAU_`` (action units), ``_YR_`` / ``_PR_`` / ``_CR_``
(head poses), ``_O_`` (occlusions). Only emotions and neutrals are expression samples; the
others are counted in the index summary. Each sample has ``.bnt`` (geometry), ``.png``
(texture), ``.lm3`` (3D landmarks) and ``.lm2`` (2D landmarks in the png).

``.bnt`` (little-endian): uint16 nrows, uint16 ncols, float64 zmin, uint16 L, L bytes of an
image name, uint32 count (= 5 * nrows * ncols), then float64 planes x, y, z, u, v, each
nrows x ncols row-major with the rows stored bottom-up. A point is invalid where x, y or z
equals zmin. u, v in [0, 1] index the png with v counted from the top.

Axes: zmin marks the background as the LOWEST depth, so +z points toward the camera; the
public readers show x growing with the image column and y growing upward (rows stored
bottom-up). The loader does not take the x and y directions on trust: it measures them
against the texture coordinates (:func:`bnt_axis_signs`) and flips an axis that runs the
other way, so the mesh always has +x toward the image right (the subject's left) and +y up.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.datasets.scan import (
    IndexResult,
    ScanError,
    ScanRecord,
    finish_mesh,
    read_bytes,
    read_text,
    read_texture,
    sort_records,
    walk_files,
)
from train.mesh import TexturedMesh

DATASET = "bosphorus"

EMOTION_CODES: dict[str, str] = {
    "ANGER": "anger", "DISGUST": "disgust", "FEAR": "fear",
    "HAPPY": "happiness", "SADNESS": "sadness", "SURPRISE": "surprise",
}
NON_EXPRESSION: dict[str, str] = {  # file category -> what the index summary counts it as
    "LFAU": "action_unit", "UFAU": "action_unit", "CAU": "action_unit",
    "YR": "pose", "PR": "pose", "CR": "pose", "O": "occlusion",
}
MAX_DEPTH_JUMP_MM = 10.0
"""A grid triangle whose corners differ more than this in depth spans a silhouette (hair,
ear, nose side seen edge-on), not skin: it is dropped. The grid spacing is ~1 mm."""

_NAME = re.compile(r"^(bs\d{3})_([A-Za-z]+)_(.+)_(\d+)$")
_HEADER = struct.Struct("<HHdH")  # nrows, ncols, zmin, image-name length
_COUNT = re.compile(r"^\s*(\d+)\s+landmarks?\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class BosphorusName:
    """Labels read from a Bosphorus file stem."""

    subject: str  # bs000..bs104
    category: str  # E, N, LFAU, UFAU, CAU, YR, PR, CR, O
    code: str  # HAPPY, N, 9, A22A25, R10...
    take: int  # the trailing number

    @property
    def expression(self) -> str | None:
        """The EXPRESSIONS name, or None for a sample that is not an expression."""
        if self.category == "N" and self.code == "N":
            return "neutral"
        return EMOTION_CODES.get(self.code) if self.category == "E" else None


@dataclass
class BntGrid:
    """A ``.bnt`` range grid, rows top-down (row 0 = top of the face)."""

    xyz: np.ndarray  # (R, C, 3) float64 mm, file axes
    uv: np.ndarray  # (R, C, 2) float64, v from the top of the png
    valid: np.ndarray  # (R, C) bool
    zmin: float  # the background marker
    image_name: str  # the name stored in the header


def parse_bosphorus_name(stem: str) -> BosphorusName:
    """Labels of a file stem such as ``bs000_E_HAPPY_0``.

    Raises:
        ValueError: Not a Bosphorus stem, or an E/N sample with an unknown code.
    """
    match = _NAME.match(stem)
    if not match:
        raise ValueError("not a Bosphorus name like bs000_E_HAPPY_0")
    subject, category, code, take = match.groups()
    name = BosphorusName(subject, category.upper(), code.upper(), int(take))
    if name.category in ("E", "N") and name.expression is None:
        raise ValueError(f"unknown expression code {name.category}_{name.code}")
    if name.expression is None and name.category not in NON_EXPRESSION:
        raise ValueError(f"unknown file category {name.category!r}")
    return name


def index_bosphorus(root: str | os.PathLike) -> IndexResult:
    """Every ``.bnt`` emotion or neutral sample under ``root`` (one folder per subject, or flat).

    A sample needs its ``.png`` texture; ``.lm3`` / ``.lm2`` are optional. Action-unit, pose
    and occlusion scans are counted in ``ignored`` (by kind); bad names and missing textures
    are listed in ``skipped``.
    """
    root = Path(root)
    records: list[ScanRecord] = []
    skipped: list[tuple[Path, str]] = []
    ignored: Counter = Counter()
    for path in walk_files(root):
        if path.suffix.lower() != ".bnt":
            continue  # png / lm2 / lm3: partners of a .bnt
        try:
            labels = parse_bosphorus_name(path.stem)
        except ValueError as err:
            skipped.append((path, str(err)))
            continue
        if labels.expression is None:
            ignored[NON_EXPRESSION[labels.category]] += 1
            continue
        texture = path.with_suffix(".png")
        if not texture.is_file():
            skipped.append((path, f"missing texture {texture.name}"))
            continue
        lm3, lm2 = path.with_suffix(".lm3"), path.with_suffix(".lm2")
        records.append(ScanRecord(
            dataset=DATASET,
            subject=labels.subject,
            expression=labels.expression,
            intensity=None,
            path=path,
            texture=texture,
            landmarks=lm3 if lm3.is_file() else None,
            landmarks_2d=lm2 if lm2.is_file() else None,
            take=labels.take,
        ))
    return IndexResult(root, sort_records(records), skipped, ignored)


def read_bnt(path: Path) -> BntGrid:
    """Parses a ``.bnt`` file (layout in the module docstring).

    Raises:
        ScanError: Missing file, bad header (empty grid, count != 5 * nrows * ncols),
            truncated (shorter than the header says), NaN/inf in a valid point.
    """
    data = read_bytes(path)
    if len(data) < _HEADER.size:
        raise ScanError(path, f"truncated: {len(data)} bytes, shorter than the .bnt header")
    nrows, ncols, zmin, name_len = _HEADER.unpack_from(data, 0)
    offset = _HEADER.size + name_len
    if len(data) < offset + 4:
        raise ScanError(path, f"truncated: {len(data)} bytes, the header needs {offset + 4}")
    image_name = data[_HEADER.size:offset].decode("latin-1")
    (count,) = struct.unpack_from("<I", data, offset)
    offset += 4
    cells = nrows * ncols
    if cells == 0 or count != 5 * cells or not np.isfinite(zmin):
        raise ScanError(path, f"bad header: {nrows}x{ncols} grid, {count} values (expected {5 * cells}), zmin {zmin}")
    if len(data) - offset < 8 * count:
        raise ScanError(path, f"truncated: header says {8 * count} bytes of data, file has {len(data) - offset}")
    planes = np.frombuffer(data, "<f8", count=count, offset=offset).reshape(5, nrows, ncols)[:, ::-1]  # top-down
    x, y, z, u, v = planes
    valid = (x != zmin) & (y != zmin) & (z != zmin)
    if not np.isfinite(planes[:, valid]).all():
        raise ScanError(path, "NaN/inf in grid points")
    return BntGrid(np.stack([x, y, z], axis=-1), np.stack([u, v], axis=-1), valid, zmin, image_name)


def bnt_axis_signs(grid: BntGrid) -> np.ndarray:
    """(3,) signs that turn the file's axes into +x image-right, +y up, +z toward the camera.

    x must grow with the texture column u and y must shrink as v (from the top) grows; z is
    +1 by the meaning of zmin (the background is the lowest depth). Fewer than 3 valid points
    (an empty scan, refused later) keep the file's axes.
    """
    if grid.valid.sum() < 3:
        return np.ones(3)
    xyz, uv = grid.xyz[grid.valid], grid.uv[grid.valid]  # (N, 3), (N, 2)
    centred_xyz, centred_uv = xyz - xyz.mean(axis=0), uv - uv.mean(axis=0)
    sx = np.sign(centred_xyz[:, 0] @ centred_uv[:, 0])
    sy = -np.sign(centred_xyz[:, 1] @ centred_uv[:, 1])
    return np.array([sx or 1.0, sy or 1.0, 1.0])  # 0 (no spread) keeps the file's axis


def grid_triangles(grid: BntGrid, max_depth_jump_mm: float = MAX_DEPTH_JUMP_MM) -> np.ndarray:
    """Triangles over the valid grid cells, as (T, 3) indices into the flattened grid.

    A cell with 4 valid corners gives two triangles (split along top-left/bottom-right),
    with 3 valid corners one; counter-clockwise for x right and y up. Triangles spanning more
    than ``max_depth_jump_mm`` in depth are dropped.
    """
    rows, cols = grid.valid.shape
    ids = np.arange(rows * cols).reshape(rows, cols)
    tl, tr, bl, br = (a.ravel() for a in (ids[:-1, :-1], ids[:-1, 1:], ids[1:, :-1], ids[1:, 1:]))
    ok = grid.valid.ravel()
    vtl, vtr, vbl, vbr = ok[tl], ok[tr], ok[bl], ok[br]
    candidates = (  # (corners, when): each 3-valid cell matches exactly one, a 4-valid cell the first two
        ((tl, bl, br), vtl & vbl & vbr),
        ((tl, br, tr), vtl & vbr & vtr),
        ((bl, br, tr), ~vtl & vbl & vbr & vtr),
        ((tl, bl, tr), vtl & vbl & vtr & ~vbr),
    )
    triangles = np.concatenate([np.stack(c, axis=1)[when] for c, when in candidates])  # (T, 3)
    depth = grid.xyz[..., 2].ravel()[triangles]  # (T, 3)
    return triangles[depth.max(axis=1) - depth.min(axis=1) <= max_depth_jump_mm]


def load_bosphorus(record: ScanRecord, max_depth_jump_mm: float = MAX_DEPTH_JUMP_MM,
                   landmarks: bool = True) -> TexturedMesh:
    """The record's ``.bnt`` grid as a TexturedMesh (mm, +x subject's left, +y up, facing +z).

    Vertices are the valid grid points; UVs come from the u, v planes; the texture is the
    ``.png`` of the same stem. ``.lm3`` landmarks (if ``landmarks`` and ``record.landmarks``)
    go into ``mesh.landmarks`` under snake_case names (``"nose_tip"``), in the mesh's axes;
    rendering does not need them, so preprocessing skips them.

    Raises:
        ScanError: Missing file or texture, bad header, truncated, NaN/inf, empty mesh,
            unreadable image, bad ``.lm3``.
    """
    grid = read_bnt(record.path)
    signs = bnt_axis_signs(grid)
    flat_index = np.cumsum(grid.valid.ravel()) - 1  # grid cell -> vertex number (valid cells)
    triangles = flat_index[grid_triangles(grid, max_depth_jump_mm)]  # (T, 3)
    vertices = grid.xyz[grid.valid] * signs  # (V, 3)
    uv = grid.uv[grid.valid].astype(np.float32)[triangles]  # (T, 3, 2)
    texture = read_texture(record.texture, record.path)
    named = None
    if landmarks and record.landmarks is not None:
        named = {name: (p * signs).astype(np.float32) for name, p in read_lm3(record.landmarks).items()}
    return finish_mesh(vertices, triangles, uv, texture, named, record.path)


def landmark_key(label: str) -> str:
    """A Bosphorus landmark label as a snake_case key: "Nose tip" -> "nose_tip"."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def read_lm3(path: Path) -> dict[str, np.ndarray]:
    """3D landmarks of a ``.lm3`` file: header, ``N landmarks:``, then N (label, ``x y z``) line pairs.

    Returns:
        snake_case label -> (3,) float64 mm, in the file's axes.

    Raises:
        ScanError: Missing file, no ``N landmarks:`` line, fewer pairs than N, bad numbers.
    """
    count, rest = _after_count(path)
    if len(rest) < 2 * count:
        raise ScanError(path, f"truncated: header says {count} landmarks, file has {len(rest) // 2}")
    labels, coords = rest[0:2 * count:2], rest[1:2 * count:2]
    return {landmark_key(label): _coords(text, 3, path, label) for label, text in zip(labels, coords)}


def read_lm2(path: Path) -> dict[str, np.ndarray]:
    """2D landmarks of a ``.lm2`` file: ``N landmarks:``, ``Labels:`` + N labels, ``2D Image coordinates:`` + N ``x y``.

    Returns:
        snake_case label -> (2,) float64 pixels of the png (x right, y down).

    Raises:
        ScanError: Missing file, missing sections, fewer entries than N, bad numbers.
    """
    count, rest = _after_count(path)
    sections = {line.strip().lower(): i for i, line in enumerate(rest) if line.strip().endswith(":")}
    labels_at, coords_at = sections.get("labels:"), sections.get("2d image coordinates:")
    if labels_at is None or coords_at is None:
        raise ScanError(path, "bad header: no 'Labels:' or '2D Image coordinates:' section")
    labels = rest[labels_at + 1:labels_at + 1 + count]
    coords = rest[coords_at + 1:coords_at + 1 + count]
    found = min(len(coords), coords_at - labels_at - 1)  # labels run up to the coordinates section
    if found < count:
        raise ScanError(path, f"truncated: header says {count} landmarks, file has {found}")
    return {landmark_key(label): _coords(text, 2, path, label) for label, text in zip(labels, coords)}


def _after_count(path: Path) -> tuple[int, list[str]]:
    """N of a landmark file's ``N landmarks:`` line, and the non-blank lines after it."""
    lines = read_text(path).splitlines()
    for i, line in enumerate(lines):
        match = _COUNT.match(line)
        if match:
            return int(match.group(1)), [rest.strip() for rest in lines[i + 1:] if rest.strip()]
    raise ScanError(path, "bad header: no 'N landmarks:' line")


def _coords(text: str, dims: int, path: Path, label: str) -> np.ndarray:
    """One landmark's coordinate line as (dims,) float64."""
    try:
        values = np.array([float(t) for t in text.split()])
    except ValueError:
        raise ScanError(path, f"bad coordinates for {label!r}: {text[:40]!r}") from None
    if values.shape != (dims,) or not np.isfinite(values).all():
        raise ScanError(path, f"bad coordinates for {label!r}: {text[:40]!r}")
    return values
