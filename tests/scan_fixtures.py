"""Writers of tiny BU-3DFE and Bosphorus files in the real formats, and broken variants.

The licensed databases never enter the repository: tests write a small synthetic face
(a dome with a nose bump; the nose tip is the highest point) in each format:

- BU-3DFE: ``_F3D.wrl`` (VRML 2.0, triangles and quads mixed, texture coordinates in their
  own order with v from the bottom), ``_F3D.bmp`` texture with one red texel block,
  ``_F2D.bmp`` (a different image, never the texture), ``_F3D.bnd`` (83 landmarks).
- Bosphorus: ``.bnt`` (binary grid, rows bottom-up, background = zmin), ``.png`` texture
  with a red block under the nose tip (v from the top), ``.lm3`` and ``.lm2``.

Each writer returns what it wrote (positions, counts, the red texel) so tests can check
that the loaders put every point and texel where the geometry says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BU3DFE_BROKEN = (
    "truncated", "bad_header", "index_out_of_range", "nan", "empty",
    "missing_texture", "unreadable_texture", "bad_landmarks",
)
BOSPHORUS_BROKEN = (
    "truncated", "bad_header", "nan", "empty", "missing_texture", "unreadable_texture", "bad_landmarks",
)
RED = (255, 0, 0)
ZMIN = -1.0e9  # the background marker real .bnt files use


def face_surface(rows: int, cols: int, spacing: float, nose: tuple[int, int]) -> np.ndarray:
    """A face-like height field on a grid, rows top-down: (rows, cols, 3) mm, x right, y up.

    A dome plus a Gaussian nose bump whose peak (the highest point) is grid point ``nose``.
    """
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    x = (c - nose[1]) * spacing
    y = (nose[0] - r) * spacing  # row 0 is the top: largest y
    radius = spacing * max(rows, cols)
    z = 30.0 * (1.0 - (x**2 + (y + 10.0) ** 2) / radius**2) + 12.0 * np.exp(-(x**2 + y**2) / (2 * 6.0**2))
    return np.stack([x, y, z], axis=-1)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"{path}: cv2 could not write the image")


def _write_texture(path: Path, rgb: np.ndarray, broken: str | None) -> None:
    """The scan's texture image, or its broken variant: unreadable bytes, or no file."""
    if broken == "unreadable_texture":
        path.write_bytes(path.suffix.upper().encode() + b" this is not an image")
    elif broken != "missing_texture":
        _write_image(path, rgb)


def _texture_with_red(height: int, width: int, row: int, col: int) -> np.ndarray:
    """A grey gradient (H, W, 3) RGB with a 3x3 red block centred on (row, col)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = np.linspace(60, 200, width, dtype=np.uint8)[None, :, None]
    image[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = RED
    return image


# ----------------------------------------------------------------------------- BU-3DFE

@dataclass
class BUScan:
    """What :func:`write_bu3dfe_scan` wrote."""

    wrl: Path
    texture: Path
    bnd: Path
    photo: Path
    vertices: np.ndarray  # (V, 3) as written
    vertex_uv: np.ndarray  # (V, 2) each vertex's (u, v from the top)
    quads: int  # quads in coordIndex
    triangles: int  # triangles in coordIndex
    nose_index: int  # vertex with the largest z
    red_vertex: int  # vertex whose texture coordinate lies on the red block
    landmarks: np.ndarray  # (83, 3) as written in the .bnd
    texture_shape: tuple[int, int]  # (H, W) of the _F3D.bmp

    @property
    def expected_triangles(self) -> int:
        return self.triangles + 2 * self.quads


def vrml_text(stem: str, points: str, coord_index: str, tex_points: str, tex_index: str, comment: str) -> str:
    """A BU-3DFE ``_F3D.wrl`` (VRML 2.0, one IndexedFaceSet) around already formatted array bodies."""
    return "\n".join([
        "#VRML V2.0 utf8",
        "",
        f"# {comment}",
        "Transform {",
        "  children [",
        "    Shape {",
        "      appearance Appearance {",
        "        material Material { diffuseColor 0.7 0.7 0.7 }",
        f'        texture ImageTexture {{ url "{stem}.bmp" }}',
        "      }",
        "      geometry IndexedFaceSet {",
        "        creaseAngle 3.14",
        "        solid FALSE",
        "        coord Coordinate { point [",
        points,
        "        ] }",
        "        coordIndex [",
        coord_index,
        "        ]",
        "        texCoord TextureCoordinate { point [",
        tex_points,
        "        ] }",
        "        texCoordIndex [",
        tex_index,
        "        ]",
        "      }",
        "    }",
        "  ]",
        "}",
        "",
    ])


def write_bu3dfe_scan(
    folder: Path,
    name: str = "F0001_AN01WH",
    rows: int = 12,
    cols: int = 10,
    broken: str | None = None,
    clockwise: bool = False,
) -> BUScan:
    """Writes ``{name}_F3D.wrl``, ``_F3D.bmp``, ``_F2D.bmp`` and ``_F3D.bnd`` into ``folder``.

    Args:
        folder: Created if needed.
        name: Sample name without the ``_F3D`` suffix (``F0001_AN01WH``).
        rows, cols: Vertex grid (rows * cols >= 83 for the landmarks).
        broken: None or one of :data:`BU3DFE_BROKEN`.
        clockwise: Write every face clockwise seen from +z (the loader must re-orient).
    """
    folder.mkdir(parents=True, exist_ok=True)
    nose = (rows // 2, cols // 2)
    xyz = face_surface(rows, cols, 4.0, nose)
    vertices = xyz.reshape(-1, 3)  # (V, 3), id = r * cols + c
    ids = np.arange(rows * cols).reshape(rows, cols)

    faces, quads, tris = [], 0, 0
    for r in range(rows - 1):
        for c in range(cols - 1):
            tl, tr, bl, br = ids[r, c], ids[r, c + 1], ids[r + 1, c], ids[r + 1, c + 1]
            if (r + c) % 3 == 0:
                faces.append([tl, bl, br, tr])  # counter-clockwise for x right, y up
                quads += 1
            else:
                faces += [[tl, bl, br], [tl, br, tr]]
                tris += 2
    if clockwise:
        faces = [f[::-1] for f in faces]

    # Texture coordinates in the reverse vertex order, so that a loader using coordIndex
    # for them (instead of texCoordIndex) gets the wrong texels.
    r_grid, c_grid = np.divmod(np.arange(rows * cols), cols)
    u = 0.1 + 0.8 * c_grid / (cols - 1)
    v_top = 0.1 + 0.8 * r_grid / (rows - 1)
    perm = np.arange(rows * cols)[::-1]  # texcoord k belongs to vertex perm[k]
    tex_of_vertex = np.argsort(perm)
    texcoords = np.stack([u[perm], 1.0 - v_top[perm]], axis=1)  # v from the bottom, as BU-3DFE writes

    height, width = 48, 64
    red_vertex = int(ids[2, 3])  # upper part: a missing v flip samples far below it
    texture_rgb = _texture_with_red(height, width, int(v_top[red_vertex] * height), int(u[red_vertex] * width))

    point_lines = [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    index_lines = [", ".join(str(i) for i in f) + ", -1" for f in faces]
    tex_lines = [f"{a:.6f} {b:.6f}" for a, b in texcoords]
    tex_index_lines = [", ".join(str(tex_of_vertex[i]) for i in f) + ", -1" for f in faces]
    if broken == "nan":
        point_lines[5] = "nan 0.0 0.0"
    if broken == "index_out_of_range":
        index_lines[0] = index_lines[0].replace(f"{faces[0][1]},", f"{len(vertices) + 7},", 1)
    if broken == "empty":
        point_lines, index_lines, tex_lines, tex_index_lines = [], [], [], []

    stem = f"{name}_F3D"
    text = vrml_text(stem, ",\n".join(point_lines), ",\n".join(index_lines), ",\n".join(tex_lines),
                     ",\n".join(tex_index_lines), "synthetic test face [not BU-3DFE data] {scan_fixtures}")
    if broken == "bad_header":
        text = text.replace("#VRML V2.0 utf8", "#VRML V1.0 ascii", 1)
    if broken == "truncated":
        cut = text.index("coordIndex [")
        text = text[: cut + 40]  # mid-array

    wrl = folder / f"{stem}.wrl"
    wrl.write_text(text)
    texture = folder / f"{stem}.bmp"
    _write_texture(texture, texture_rgb, broken)
    photo = folder / f"{name}_F2D.bmp"
    _write_image(photo, np.full((32, 32, 3), (0, 0, 255), np.uint8))

    landmark_ids = np.linspace(0, len(vertices) - 1, 83).astype(int)
    landmarks = vertices[landmark_ids]
    bnd_lines = [f"{i}\t\t{x:.6f}\t\t{y:.6f}\t\t{z:.6f}" for i, (x, y, z) in zip(landmark_ids, landmarks)]
    if broken == "bad_landmarks":
        bnd_lines = bnd_lines[:82]
    bnd = folder / f"{stem}.bnd"
    bnd.write_text("\n".join(bnd_lines) + "\n")
    return BUScan(wrl, texture, bnd, photo, vertices, np.stack([u, v_top], axis=1), quads, tris, int(ids[nose]),
                  red_vertex, landmarks, (height, width))


# --------------------------------------------------------------------------- Bosphorus

@dataclass
class BosphorusScan:
    """What :func:`write_bosphorus_scan` wrote (grids top-down, in the mesh's axes)."""

    bnt: Path
    png: Path
    lm3: Path
    lm2: Path
    xyz: np.ndarray  # (R, C, 3) mm, +x right, +y up (before the file's axis signs)
    uv: np.ndarray  # (R, C, 2), v from the top
    valid: np.ndarray  # (R, C) bool
    nose: tuple[int, int]  # grid cell of the nose tip (largest z, red texel)
    spike: tuple[int, int]  # valid point 40 mm behind its neighbours (a depth jump)
    hole: tuple[int, int]  # isolated invalid point inside the face
    landmarks_3d: dict[str, np.ndarray]  # label -> (3,), mesh axes
    landmarks_2d: dict[str, np.ndarray]  # label -> (2,), png pixels
    texture_shape: tuple[int, int]


LANDMARK_CELLS = {  # label -> grid cell, as fractions of (rows, cols)
    "Outer left eyebrow": (0.2, 0.75),
    "Nose tip": None,  # the nose cell
    "Left mouth corner": (0.75, 0.65),
    "Chin middle": (0.9, 0.5),
}


def write_bosphorus_scan(
    folder: Path,
    stem: str = "bs000_E_HAPPY_0",
    rows: int = 20,
    cols: int = 16,
    broken: str | None = None,
    file_axis_signs: tuple[float, float] = (1.0, 1.0),
) -> BosphorusScan:
    """Writes ``{stem}.bnt``, ``.png``, ``.lm3`` and ``.lm2`` into ``folder``.

    Args:
        folder: Created if needed.
        stem: File stem (``bs000_E_HAPPY_0``).
        rows, cols: Grid size.
        broken: None or one of :data:`BOSPHORUS_BROKEN`.
        file_axis_signs: Signs applied to x and y in the files (``(1, -1)``: a y-down file),
            to check that the loader measures the axes instead of trusting them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nose = (int(rows * 0.4), cols // 2)  # above the middle: a v flip would miss the red block
    xyz = face_surface(rows, cols, 3.0, nose)
    r, c = np.mgrid[0:rows, 0:cols]
    uv = np.stack([(c + 0.5) / cols, (r + 0.5) / rows], axis=-1)  # v from the top
    ellipse = ((r - (rows - 1) / 2) / (rows / 2)) ** 2 + ((c - (cols - 1) / 2) / (cols / 2)) ** 2 <= 1.0
    valid = ellipse.copy()
    hole = (rows * 3 // 5, cols // 4 + 1)
    valid[hole] = False
    spike = (rows * 3 // 5, cols * 3 // 4)
    xyz[spike + (2,)] -= 40.0
    if broken == "empty":
        valid[:] = False

    height, width = rows * 3, cols * 3
    png_rgb = _texture_with_red(height, width, int(uv[nose][1] * height), int(uv[nose][0] * width))
    cells = {label: nose if f is None else (int(f[0] * rows), int(f[1] * cols)) for label, f in LANDMARK_CELLS.items()}
    landmarks_3d = {label: xyz[cell].copy() for label, cell in cells.items()}
    landmarks_2d = {label: uv[cell] * (width, height) for label, cell in cells.items()}

    signs = np.array([file_axis_signs[0], file_axis_signs[1], 1.0])
    planes = np.concatenate([xyz * signs, uv], axis=-1).transpose(2, 0, 1).copy()  # (5, R, C)
    planes[:, ~valid] = ZMIN
    if broken == "nan":
        planes[2][nose] = np.nan
    name = f"{stem}.png".encode()
    count = 5 * rows * cols + (1 if broken == "bad_header" else 0)
    data = struct.pack("<HHdH", rows, cols, ZMIN, len(name)) + name + struct.pack("<I", count)
    data += planes[:, ::-1, :].astype("<f8").tobytes()  # rows bottom-up
    if broken == "truncated":
        data = data[:-100]
    bnt = folder / f"{stem}.bnt"
    bnt.write_bytes(data)

    png = folder / f"{stem}.png"
    _write_texture(png, png_rgb, broken)

    labels = list(cells)
    pairs = [f"{label}\n{' '.join(f'{v:.6f}' for v in landmarks_3d[label] * signs)}" for label in labels]
    if broken == "bad_landmarks":
        pairs = pairs[:-1]
    lm3 = folder / f"{stem}.lm3"
    lm3.write_text(f"# LANDMARKS 3D\n\n{len(labels)} landmarks:\n" + "\n".join(pairs) + "\n")
    lm2 = folder / f"{stem}.lm2"
    lm2.write_text(
        f"# LANDMARKS 2D\n\n{len(labels)} landmarks:\n\nLabels:\n" + "\n".join(labels)
        + "\n\n2D Image coordinates:\n"
        + "\n".join(f"{landmarks_2d[label][0]:.6f} {landmarks_2d[label][1]:.6f}" for label in labels) + "\n"
    )
    return BosphorusScan(bnt, png, lm3, lm2, xyz, uv, valid, nose, spike, hole, landmarks_3d, landmarks_2d,
                         (height, width))
