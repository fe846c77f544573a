"""A textured triangle mesh: what every scan source turns into before rendering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TexturedMesh:
    """A textured face in millimetres, facing +z (nose toward +z), +y up, +x subject's left.

    UVs are per triangle corner (seams are allowed); ``v`` counts from the TOP of the
    texture image (row = v * H), whatever the source file's convention was.
    """

    vertices: np.ndarray  # (V, 3) float32, mm
    triangles: np.ndarray  # (T, 3) int32, counter-clockwise seen from outside
    uv: np.ndarray  # (T, 3, 2) float32 in [0, 1]
    texture: np.ndarray  # (H, W, 3) uint8 RGB
    landmarks: dict[str, np.ndarray] | None = None  # named 3D points (mm) from the source, if any
    source: str = ""  # file it came from, for error messages

    def __post_init__(self) -> None:
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"{self.source}: vertices must be (V, 3), got {self.vertices.shape}")
        if self.triangles.ndim != 2 or self.triangles.shape[1] != 3:
            raise ValueError(f"{self.source}: triangles must be (T, 3), got {self.triangles.shape}")
        if self.uv.shape != (len(self.triangles), 3, 2):
            raise ValueError(f"{self.source}: uv must be (T, 3, 2), got {self.uv.shape}")
        if len(self.triangles) and (self.triangles.min() < 0 or self.triangles.max() >= len(self.vertices)):
            raise ValueError(f"{self.source}: triangle index out of range 0..{len(self.vertices) - 1}")
