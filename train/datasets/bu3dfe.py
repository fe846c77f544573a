"""BU-3DFE: index the folder tree by file name, load an ``_F3D.wrl`` as a TexturedMesh.

File names: ``F0001_AN01WH_F3D.wrl`` = subject ``F0001``, expression ``AN`` (anger), intensity
``01``, race code ``WH``; the neutral scan is ``NE00``. Beside each cropped face mesh lie its
texture ``_F3D.bmp`` (named by the mesh's ImageTexture url), the 83 landmarks ``_F3D.bnd``,
and ``_F2D.bmp``, a frontal image that is NOT the mesh's texture. ``_RAW.wrl`` (uncropped)
files are counted, not indexed.

The mesh is VRML 2.0 text: ``point [ x y z, ... ]`` (mm, the face toward +z),
``coordIndex [ a, b, c, -1, ... ]`` with triangles, quads (and larger polygons) mixed,
``TextureCoordinate { point [ u v, ... ] }`` with v counted from the BOTTOM of the image, and
``texCoordIndex`` per face corner. Polygons are fanned into triangles; v is turned into v from
the top, as :class:`train.mesh.TexturedMesh` wants.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.datasets.scan import (
    IndexResult,
    ScanError,
    ScanRecord,
    finish_mesh,
    parse_numbers,
    read_text,
    read_texture,
    sort_records,
    walk_files,
)
from train.mesh import TexturedMesh

DATASET = "bu3dfe"

EXPRESSION_CODES: dict[str, str] = {
    "NE": "neutral", "AN": "anger", "DI": "disgust", "FE": "fear",
    "HA": "happiness", "SA": "sadness", "SU": "surprise",
}

NUM_LANDMARKS = 83
LANDMARK_GROUPS: dict[str, tuple[int, int]] = {  # name -> [start, stop) rows of the .bnd
    "eyes": (0, 16), "eyebrows": (16, 36), "nose": (36, 48), "mouth": (48, 68), "contour": (68, 83),
}

_NAME = re.compile(r"^([FM]\d{4})_([A-Z]{2})(\d{2})([A-Z]{2})_F3D\.wrl$", re.IGNORECASE)
# Each pattern starts with a literal (fast search on a 2 MB file); VRML is case-sensitive, so
# "coord " and "coordIndex" never match inside "texCoord TextureCoordinate" / "texCoordIndex".
_COORD_POINT = re.compile(r"coord\s+(?:DEF\s+\S+\s+)?Coordinate\s*\{\s*point\s*\[")
_TEX_POINT = re.compile(r"TextureCoordinate\s*\{\s*point\s*\[")
_COORD_INDEX = re.compile(r"coordIndex\s*\[")
_TEX_INDEX = re.compile(r"texCoordIndex\s*\[")
_TEXTURE_URL = re.compile(r'ImageTexture\s*\{[^}]*?url\s*\[?\s*"([^"]*)"')
_LINE_COMMENT = re.compile(r"(?m)^\s*#.*$")


@dataclass(frozen=True)
class BU3DFEName:
    """Labels read from a BU-3DFE file name."""

    subject: str  # F0001..F0056, M0001..M0044
    expression: str  # realtime.spec.EXPRESSIONS name
    intensity: int  # 0 for neutral, 1..4 otherwise
    race: str  # WH, AE, BL, IN, LA, AM...


def parse_bu3dfe_name(name: str) -> BU3DFEName:
    """Labels of an ``..._F3D.wrl`` file name.

    Raises:
        ValueError: Not a BU-3DFE F3D mesh name, unknown expression code or bad intensity.
    """
    match = _NAME.match(name)
    if not match:
        raise ValueError("not a BU-3DFE name like F0001_AN01WH_F3D.wrl")
    subject, code, level, race = match.groups()
    code = code.upper()
    if code not in EXPRESSION_CODES:
        raise ValueError(f"unknown expression code {code!r}")
    intensity = int(level)
    if (code == "NE") != (intensity == 0) or intensity > 4:
        raise ValueError(f"intensity {level} is not valid for {code} (NE00, or 01..04)")
    return BU3DFEName(subject.upper(), EXPRESSION_CODES[code], intensity, race.upper())


def index_bu3dfe(root: str | os.PathLike) -> IndexResult:
    """Every ``_F3D.wrl`` expression sample under ``root`` (one folder per subject, or flat).

    A sample needs its ``_F3D.bmp`` texture beside it; ``.bnd`` and ``_F2D.bmp`` are
    optional. Bad names, missing textures and duplicates are listed in ``skipped``;
    ``_RAW.wrl`` files are counted in ``ignored["raw_mesh"]``.
    """
    root = Path(root)
    records: dict[tuple[str, str, int], ScanRecord] = {}
    skipped: list[tuple[Path, str]] = []
    ignored: Counter = Counter()
    for path in walk_files(root):
        name = path.name
        if not name.lower().endswith(".wrl"):
            continue  # textures, landmarks, pose files: partners of a mesh
        if name.lower().endswith("_raw.wrl"):
            ignored["raw_mesh"] += 1
            continue
        try:
            labels = parse_bu3dfe_name(name)
        except ValueError as err:
            skipped.append((path, str(err)))
            continue
        stem = name[: -len(".wrl")]
        texture = path.with_name(stem + ".bmp")
        if not texture.is_file():
            skipped.append((path, f"missing texture {texture.name}"))
            continue
        key = (labels.subject, labels.expression, labels.intensity)
        if key in records:
            skipped.append((path, f"duplicate of {records[key].path}"))
            continue
        landmarks = path.with_name(stem + ".bnd")
        photo = path.with_name(stem[: -len("_F3D")] + "_F2D.bmp")
        records[key] = ScanRecord(
            dataset=DATASET,
            subject=labels.subject,
            expression=labels.expression,
            intensity=labels.intensity,
            path=path,
            texture=texture,
            landmarks=landmarks if landmarks.is_file() else None,
            photo=photo if photo.is_file() else None,
        )
    return IndexResult(root, sort_records(list(records.values())), skipped, ignored)


def load_bu3dfe(record: ScanRecord, landmarks: bool = True) -> TexturedMesh:
    """The record's ``_F3D.wrl`` as a TexturedMesh (mm, facing +z, v from the top).

    The texture is the file the ImageTexture url names, looked up beside the mesh (the
    url's folder part is ignored: it may be a path on the machine that made the file);
    without an ImageTexture node, ``record.texture``. Landmarks (if ``landmarks`` and
    ``record.landmarks``) go into ``mesh.landmarks`` as the :data:`LANDMARK_GROUPS` arrays;
    rendering does not need them, so preprocessing skips them (a bad ``.bnd`` then costs nothing).

    Raises:
        ScanError: Missing file or texture, not VRML 2.0, truncated, index out of range,
            NaN/inf, empty mesh, unreadable image, bad ``.bnd``.
    """
    path = record.path
    text = read_text(path)
    if not text.startswith("#VRML V2.0"):
        first = text.split("\n", 1)[0][:40]
        raise ScanError(path, f"bad header: not a VRML 2.0 file (first line {first!r})")
    body = text
    if body.count("{") != body.count("}"):
        body = _LINE_COMMENT.sub("", text)  # a brace in a comment is no sign of truncation
        if body.count("{") != body.count("}"):
            raise ScanError(path, "truncated: unbalanced braces")

    points = _array(body, _COORD_POINT, np.float64, path, "Coordinate point")
    if points.size % 3:
        raise ScanError(path, f"bad structure: Coordinate point has {points.size} numbers, not x y z triples")
    vertices = points.reshape(-1, 3)  # (V, 3)
    coord_index = _array(body, _COORD_INDEX, np.int64, path, "coordIndex")
    tex_points = _array(body, _TEX_POINT, np.float64, path, "TextureCoordinate point")
    if tex_points.size % 2:
        raise ScanError(path, f"bad structure: TextureCoordinate has {tex_points.size} numbers, not u v pairs")
    texcoords = tex_points.reshape(-1, 2)  # (N, 2), v from the bottom
    tex_index = _array(body, _TEX_INDEX, np.int64, path, "texCoordIndex", required=False)
    if tex_index is None:
        tex_index = coord_index  # VRML: without texCoordIndex, coordIndex indexes the texCoords too
    elif len(tex_index) != len(coord_index) or not np.array_equal(tex_index == -1, coord_index == -1):
        raise ScanError(path, "bad structure: texCoordIndex does not match coordIndex face by face")
    _check_range(coord_index, len(vertices), path, "coordIndex", "vertices")
    _check_range(tex_index, len(texcoords), path, "texCoordIndex", "texture coordinates")

    triangles, tex_triangles = _fan(coord_index, tex_index)  # (T, 3) each
    uv = texcoords[tex_triangles] * np.array([1.0, -1.0]) + np.array([0.0, 1.0])  # (T, 3, 2), v from the top

    url = _TEXTURE_URL.search(body)
    texture_path = path.with_name(re.split(r"[\\/]", url.group(1))[-1]) if url else record.texture
    texture = read_texture(texture_path, path)
    named = None
    if landmarks and record.landmarks is not None:
        points83 = read_bnd(record.landmarks)
        named = {name: points83[a:b] for name, (a, b) in LANDMARK_GROUPS.items()}
    return finish_mesh(vertices, triangles, uv, texture, named, path)


def read_bnd(path: Path) -> np.ndarray:
    """The 83 landmarks of a ``.bnd`` file (lines ``index x y z``) as (83, 3) float32 mm.

    The index column (a vertex of the mesh) is not used: the coordinates are given.

    Raises:
        ScanError: Missing file, not 83 lines of 4 numbers, NaN/inf.
    """
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if len(lines) != NUM_LANDMARKS:
        raise ScanError(path, f"expected {NUM_LANDMARKS} landmark lines, got {len(lines)}")
    values = parse_numbers("\n".join(lines), np.float64, path, "landmarks")
    if values.size != NUM_LANDMARKS * 4:
        raise ScanError(path, f"expected lines of 'index x y z', got {values.size} numbers in {NUM_LANDMARKS} lines")
    points = values.reshape(NUM_LANDMARKS, 4)[:, 1:]  # (83, 3)
    if not np.isfinite(points).all():
        raise ScanError(path, "NaN/inf in landmark coordinates")
    return points.astype(np.float32)


def _array(
    text: str, start: re.Pattern, dtype: type, path: Path, what: str, required: bool = True
) -> np.ndarray | None:
    """The numbers of the first ``field [ ... ]`` that ``start`` finds (None if absent and optional)."""
    match = start.search(text)
    if match is None:
        if required:
            raise ScanError(path, f"bad structure: no {what}")
        return None
    end = text.find("]", match.end())
    if end < 0:
        raise ScanError(path, f"truncated: {what} [ not closed")
    return parse_numbers(text[match.end():end], dtype, path, what)


def _check_range(index: np.ndarray, count: int, path: Path, what: str, of: str) -> None:
    """Every entry of a face index array is -1 (separator) or in 0..count-1."""
    if index.size and (index.max() >= count or index.min() < -1):
        bad = index.max() if index.max() >= count else index.min()
        raise ScanError(path, f"index out of range: {what} has {bad}, {count} {of}")


def _fan(coord_index: np.ndarray, tex_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polygons separated by -1 split into triangle fans (corner 0, k, k+1), vectorised.

    Both arrays share the -1 layout; faces with fewer than 3 corners are dropped.
    """
    ends = np.flatnonzero(coord_index == -1)
    if len(coord_index) and coord_index[-1] != -1:
        ends = np.append(ends, len(coord_index))  # the last face may omit its -1
    starts = np.concatenate([[0], ends[:-1] + 1])[: len(ends)]  # no faces: no starts
    fans = np.maximum(ends - starts - 2, 0)  # triangles per face
    face = np.repeat(np.arange(len(starts)), fans)  # (T,) face of each triangle
    k = np.arange(len(face)) - np.repeat(np.cumsum(fans) - fans, fans) + 1  # 1..n-2 within the face
    corners = np.stack([starts[face], starts[face] + k, starts[face] + k + 1], axis=1)  # (T, 3) into the arrays
    return coord_index[corners], tex_index[corners]
