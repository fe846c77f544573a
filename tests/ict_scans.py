"""Writes small BU-3DFE-format datasets whose scans are ICT-FaceKit faces (FaceMesh finds them).

The dome faces of ``scan_fixtures.py`` test the readers; they are not faces to MediaPipe. For
the preprocessing chain (render -> FaceMesh -> canonical) the tests need real-looking faces in
the real file formats, so this module crops the ICT head to the face (as BU-3DFE's ``_F3D``
meshes are cropped) and writes, per sample, ``{subject}_{XX}{ii}WH_F3D.wrl`` (VRML 2.0: point,
coordIndex, TextureCoordinate with v from the BOTTOM, texCoordIndex, ImageTexture url),
``_F3D.bmp`` (the texture the UVs index) and ``_F3D.bnd`` (83 landmark lines).

Usage (in a test):
    from ict_scans import write_ict_bu3dfe
    paths = write_ict_bu3dfe(tmp_path / "bu3dfe", subjects=("F0001", "M0001"),
                             samples=[("anger", 3), ("happiness", 4)])
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from scan_fixtures import vrml_text
from train.datasets.bu3dfe import EXPRESSION_CODES
from train.face_model import FaceModel, expression_weights
from train.mesh import TexturedMesh

CODE_OF = {name: code for code, name in EXPRESSION_CODES.items()}
INTENSITY_SCALE = {0: 0.0, 1: 0.4, 2: 0.6, 3: 0.8, 4: 1.0}  # BU-3DFE level -> ICT expression intensity
TEXTURE_PX = (256, 1024)  # (H, W) of the written _F3D.bmp: the ICT atlas at half resolution


def _rows(values: np.ndarray, fmt: str) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, values, fmt=fmt, delimiter=" ", newline=",\n")
    return buffer.getvalue()


class BU3DFEWriter:
    """Writes ICT meshes, cropped to the face, as BU-3DFE ``_F3D`` files.

    Every mesh of one face model shares the crop, faces and texture coordinates, so their text
    is made once; only the vertex positions differ per scan.
    """

    def __init__(self, model: FaceModel) -> None:
        keep_vertex = ((model.region != model.region_names.index("head_neck"))
                       & (model.neutral[:, 2] > 20.0) & (np.abs(model.neutral[:, 0]) < 85.0)
                       & (model.neutral[:, 1] > -100.0) & (model.neutral[:, 1] < 115.0))
        self.triangles = np.flatnonzero(keep_vertex[model.triangles].all(axis=1))  # (T,) kept ICT triangles
        faces = model.triangles[self.triangles]  # (T, 3)
        self.used, inverse = np.unique(faces, return_inverse=True)  # written vertices, in order
        minus_one = -np.ones((len(faces), 1), int)
        uv = model.uv[self.triangles].reshape(-1, 2) * np.array([1.0, -1.0]) + np.array([0.0, 1.0])  # v from bottom
        self.coord_index = _rows(np.concatenate([inverse.reshape(-1, 3), minus_one], 1), "%d")
        self.tex_points = _rows(uv, "%.6f")
        self.tex_index = _rows(np.concatenate([np.arange(len(uv)).reshape(-1, 3), minus_one], 1), "%d")
        self.landmark_ids = np.linspace(0, len(self.used) - 1, 83).astype(int)

    def write(self, folder: Path, stem: str, mesh: TexturedMesh) -> Path:
        """Writes ``{stem}.wrl``, ``{stem}.bmp`` and ``{stem}.bnd`` into ``folder``; returns the ``.wrl``."""
        folder.mkdir(parents=True, exist_ok=True)
        vertices = mesh.vertices[self.used]  # (V, 3) mm
        body = vrml_text(stem, _rows(vertices, "%.4f"), self.coord_index, self.tex_points, self.tex_index,
                         "ICT-FaceKit face in the BU-3DFE _F3D layout [test data, not BU-3DFE]")
        wrl = folder / f"{stem}.wrl"
        wrl.write_text(body)
        texture = cv2.resize(mesh.texture, TEXTURE_PX[::-1], interpolation=cv2.INTER_AREA)
        if not cv2.imwrite(str(folder / f"{stem}.bmp"), np.ascontiguousarray(texture[:, :, ::-1])):
            raise OSError(f"{folder / stem}.bmp: cv2 could not write the image")
        bnd = [f"{i}\t\t{x:.4f}\t\t{y:.4f}\t\t{z:.4f}" for i, (x, y, z) in
               zip(self.landmark_ids, vertices[self.landmark_ids])]
        (folder / f"{stem}.bnd").write_text("\n".join(bnd) + "\n")
        return wrl


def write_ict_bu3dfe(
    root: Path,
    subjects: Sequence[str] = ("F0001", "M0001"),
    samples: Sequence[tuple[str, int]] = (("anger", 3), ("happiness", 4)),
    seed: int = 0,
) -> list[Path]:
    """A BU-3DFE-format dataset: one folder per subject, one ``_F3D`` scan per (expression, level).

    Each subject is its own ICT identity with its own procedural skin; expressions are the
    face model's prototypes at the level's intensity (``INTENSITY_SCALE``) with a little jitter.

    Returns:
        The written ``.wrl`` paths, subjects in the given order.
    """
    model = FaceModel.load()
    writer = BU3DFEWriter(model)
    paths = []
    for k, subject in enumerate(subjects):
        rng = np.random.default_rng([seed, k])
        identity = model.random_identity(rng, sigma=0.8)
        texture = model.procedural_texture(rng)
        for expression, level in samples:
            weights = expression_weights(expression, INTENSITY_SCALE[level], rng, jitter=0.05)
            mesh = model.mesh(identity, weights, texture)
            paths.append(writer.write(root / subject, f"{subject}_{CODE_OF[expression]}{level:02d}WH_F3D", mesh))
    return paths
