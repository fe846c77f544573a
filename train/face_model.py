"""ICT-FaceKit morphable head as a :class:`~train.mesh.TexturedMesh`, with expressions and skin.

Usage:
    from train.face_model import FaceModel, expression_weights
    model = FaceModel.load()
    rng = np.random.default_rng(0)
    mesh = model.mesh(model.random_identity(rng),
                      expression_weights("happiness", 0.8, rng),
                      model.procedural_texture(rng))

    python -m train.face_model --out /tmp/ict.png   # render a contact sheet to look at

The vendored asset (``assets/ict_facekit/ict_face.npz``, see its PROVENANCE.md) is in
centimetres, as the source; :meth:`FaceModel.mesh` returns millimetres with the axes the
ICT model already uses (+x subject's left, +y up, +z where the face looks), origin near the
centre of the head. Textures live in one atlas made here from the ICT UDIM tiles:
``[face tile 0 | tile 1 (head, ears, mouth and eye sockets) | teeth | eyeball]``, each
``tile_px`` square. The procedural skin is painted per texel from the texel's 3D position on the
neutral mean head (baked once by ray casting the UV layout), so features (brows, lips, iris)
are placed by geometry, not by hand-picked texture coordinates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from train.mesh import TexturedMesh

MODEL_PATH = Path(__file__).with_name("assets") / "ict_facekit" / "ict_face.npz"
CM_TO_MM = 10.0

# Six basic expressions + neutral as ARKit blendshape weights (README of the shared asset: FACS
# prototypes -> ARKit shapes; a pair name without _L/_R means both sides). Tuned by eye on renders:
# happiness got a little mouthUpperUp and jawOpen so that teeth can show at high intensity.
EXPRESSION_TABLE: dict[str, dict[str, float]] = {
    "neutral": {},
    "happiness": {"cheekSquint": 0.6, "mouthSmile": 0.9, "mouthUpperUp": 0.2, "jawOpen": 0.08},
    "sadness": {"browInnerUp": 0.8, "browDown": 0.4, "mouthFrown": 0.8, "mouthShrugLower": 0.3},
    "surprise": {"browInnerUp": 0.8, "browOuterUp": 0.8, "eyeWide": 0.7, "jawOpen": 0.35},
    "fear": {"browInnerUp": 0.8, "browOuterUp": 0.5, "browDown": 0.3, "eyeWide": 0.7, "eyeSquint": 0.3,
             "mouthStretch": 0.6, "jawOpen": 0.25},
    "anger": {"browDown": 0.9, "eyeWide": 0.4, "eyeSquint": 0.5, "mouthPress": 0.7},
    "disgust": {"noseSneer": 0.8, "mouthFrown": 0.5, "mouthLowerDown": 0.4, "mouthUpperUp": 0.3},
}

# ICT shapes without an _L/_R pair.
_UNPAIRED_SHAPES = frozenset({"jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthFunnel",
                              "mouthLeft", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper",
                              "mouthShrugLower", "mouthShrugUpper"})

# Skin tones from light to dark (sRGB), interpolated by ``skin_tone`` in [0, 1].
_SKIN_TONES = np.array([[246, 214, 192], [226, 182, 150], [198, 145, 108], [160, 106, 72],
                        [112, 72, 48], [72, 46, 32]], np.float32)
_HAIR_COLOURS = np.array([[25, 20, 18], [45, 32, 24], [80, 55, 35], [120, 90, 60], [150, 120, 80],
                          [90, 85, 80]], np.float32)
_IRIS_COLOURS = np.array([[70, 45, 25], [95, 60, 30], [120, 85, 45], [60, 90, 120], [80, 110, 90],
                          [40, 30, 25]], np.float32)

# Atlas tiles, in order; the source's UDIM tile index (floor(u)) or region decides the tile.
_ATLAS_TILES = 4
_TILE_OF_UDIM = {0: 0, 1: 1, 3: 2}  # UDIM 2 (gums/tongue) is not vendored
_EYE_TILE = 3


def expression_weights(name: str, intensity: float = 1.0, rng: np.random.Generator | None = None,
                       jitter: float = 0.15) -> dict[str, float]:
    """ARKit weights for one basic expression.

    Args:
        name: one of :data:`EXPRESSION_TABLE` (``realtime.spec.EXPRESSIONS``).
        intensity: scales every weight (1 = the table; BU-3DFE's levels 1..4 map well to
            about 0.4, 0.6, 0.8, 1.0).
        rng: if given, each weight is multiplied by ``1 + N(0, jitter)`` independently per side,
            so the same expression is never exactly symmetric or identical.
        jitter: relative standard deviation of that noise.

    Returns:
        ``{shape_name: weight}`` with weights clipped to [0, 1]; unknown names raise ``ValueError``.
    """
    if name not in EXPRESSION_TABLE:
        raise ValueError(f"unknown expression {name!r}; expected one of {sorted(EXPRESSION_TABLE)}")
    weights: dict[str, float] = {}
    for shape, w in EXPRESSION_TABLE[name].items():
        for side in [shape] if shape in _UNPAIRED_SHAPES else [shape + "_L", shape + "_R"]:
            value = w * intensity * (1.0 + jitter * rng.standard_normal() if rng is not None else 1.0)
            weights[side] = float(np.clip(value, 0.0, 1.0))
    return weights


@dataclass
class _UVBake:
    """Per atlas texel: the neutral-head 3D point (mm) and region it shows (baked once)."""

    covered: np.ndarray  # (H, W) bool: a triangle covers the texel
    position: np.ndarray  # (H, W, 3) float32 mm on the neutral mean head
    region: np.ndarray  # (H, W) int8, -1 where not covered
    fill_index: np.ndarray  # (H, W) int: flat index of the nearest covered texel (gutter fill)


@dataclass
class FaceModel:
    """The vendored ICT-FaceKit model (mm in memory; shapes add linearly to ``neutral``)."""

    neutral: np.ndarray  # (V, 3) float32 mm
    identity_basis: np.ndarray  # (K, V, 3) float32 mm, a_i ~ N(0, 1)
    expression_basis: np.ndarray  # (E, V, 3) float32 mm, b_j in [0, 1]
    expression_names: tuple[str, ...]
    triangles: np.ndarray  # (T, 3) int32, counter-clockwise seen from outside
    uv: np.ndarray  # (T, 3, 2) float32 atlas coordinates, v from the top
    region: np.ndarray  # (V,) int8 region id
    region_names: tuple[str, ...]
    landmarks_multipie68: np.ndarray  # (68,) int32 vertex ids
    tile_px: int = 512
    _bake: _UVBake | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path = MODEL_PATH, tile_px: int = 512) -> "FaceModel":
        """Load the vendored model; a missing or broken file raises ``ValueError`` naming it."""
        try:
            z = np.load(path)
            neutral = z["neutral"].astype(np.float32) * CM_TO_MM
            identity = z["identity_basis"].astype(np.float32) * CM_TO_MM
            expression = z["expression_basis"].astype(np.float32) * CM_TO_MM
            names = tuple(str(n) for n in z["expression_names"])
            triangles = z["triangles"].astype(np.int32)
            uv_table, triangles_uv = z["uv"], z["triangles_uv"]
            region = z["region"].astype(np.int8)
            region_names = tuple(str(n) for n in z["region_names"])
            lm68 = z["landmarks_multipie68"].astype(np.int32)
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a vendored ICT face model ({exc})") from exc
        return cls(neutral, identity, expression, names, triangles,
                   _atlas_uv(uv_table[triangles_uv], region[triangles], region_names), region,
                   region_names, lm68, tile_px)

    @property
    def num_identity(self) -> int:
        return len(self.identity_basis)

    def random_identity(self, rng: np.random.Generator, sigma: float = 1.0, clip: float = 2.5) -> np.ndarray:
        """Identity coefficients a_i ~ N(0, sigma^2), clipped to +-clip (K,) float32."""
        return np.clip(sigma * rng.standard_normal(self.num_identity), -clip, clip).astype(np.float32)

    def expression_vector(self, weights: dict[str, float] | np.ndarray) -> np.ndarray:
        """Blendshape weights as an (E,) float32 vector; unknown shape names raise ``ValueError``."""
        if isinstance(weights, dict):
            vector = np.zeros(len(self.expression_names), np.float32)
            index = {n: i for i, n in enumerate(self.expression_names)}
            for name, w in weights.items():
                if name not in index:
                    raise ValueError(f"unknown ICT blendshape {name!r}")
                vector[index[name]] = w
            return vector
        vector = np.asarray(weights, np.float32)
        if vector.shape != (len(self.expression_names),):
            raise ValueError(f"expression weights must be ({len(self.expression_names)},), got {vector.shape}")
        return vector

    def vertices(self, identity: np.ndarray | None = None,
                 expression_weights: dict[str, float] | np.ndarray | None = None) -> np.ndarray:
        """Deformed vertices (V, 3) float32 in mm."""
        v = self.neutral.copy()
        if identity is not None:
            identity = np.asarray(identity, np.float32)
            if identity.shape != (self.num_identity,):
                raise ValueError(f"identity must be ({self.num_identity},), got {identity.shape}")
            v += np.tensordot(identity, self.identity_basis, axes=1)
        if expression_weights is not None:
            b = self.expression_vector(expression_weights)
            active = np.flatnonzero(b)  # a handful of shapes: skip the zero ones
            v += np.tensordot(b[active], self.expression_basis[active], axes=1)
        return v

    def mesh(self, identity: np.ndarray | None, expression_weights: dict[str, float] | np.ndarray | None,
             texture: np.ndarray) -> TexturedMesh:
        """A textured head in mm (+x subject's left, +y up, +z toward the viewer).

        ``landmarks`` holds ``"nose_tip"`` (1, 3) and ``"multipie68"`` (68, 3), both on the
        deformed surface, for tests and checks.
        """
        v = self.vertices(identity, expression_weights)
        lm = v[self.landmarks_multipie68]
        return TexturedMesh(vertices=v, triangles=self.triangles, uv=self.uv, texture=texture,
                            landmarks={"nose_tip": lm[30:31].copy(), "multipie68": lm},
                            source="ict-facekit")

    # ------------------------------------------------------------------ texture
    def uv_bake(self) -> _UVBake:
        """Where each atlas texel sits on the neutral head (computed once, ~0.1 s)."""
        if self._bake is None:
            self._bake = _bake_uv(self.neutral, self.triangles, self.uv, self.region,
                                  (self.tile_px, self.tile_px * _ATLAS_TILES))
        return self._bake

    def procedural_texture(self, rng: np.random.Generator, skin_tone: float | None = None) -> np.ndarray:
        """A random plausible face texture in this model's atlas.

        Args:
            rng: the randomness (skin tone, hair/iris colour, blotches, brows, stubble).
            skin_tone: 0 (very light) .. 1 (very dark); drawn uniformly if None.

        Returns:
            (tile_px, 4 * tile_px, 3) uint8 RGB.
        """
        bake = self.uv_bake()
        painter = _Painter(self, bake, rng)
        return painter.paint(rng.uniform(0.0, 1.0) if skin_tone is None else float(skin_tone))


def _atlas_uv(corner_uv: np.ndarray, corner_region: np.ndarray, region_names: tuple[str, ...]) -> np.ndarray:
    """Source per-corner UDIM UVs (T, 3, 2) (v from the bottom) -> atlas UVs, v from the top."""
    eye = np.isin(corner_region[:, 0], [region_names.index("sclera_left"), region_names.index("sclera_right")])
    udim = np.floor(corner_uv[:, :, 0].mean(axis=1)).astype(int)  # a triangle never spans tiles
    tile = np.array([_TILE_OF_UDIM.get(int(t), 0) for t in range(int(udim.max()) + 1)])[udim]
    tile[eye] = _EYE_TILE
    u = (tile[:, None] + corner_uv[:, :, 0] - np.where(eye, 0, udim)[:, None]) / _ATLAS_TILES
    return np.stack([u, 1.0 - corner_uv[:, :, 1]], axis=-1).astype(np.float32)


def _bake_uv(neutral: np.ndarray, triangles: np.ndarray, uv: np.ndarray, region: np.ndarray,
             shape: tuple[int, int]) -> _UVBake:
    """Ray cast the UV layout (as a flat mesh) to find each texel's triangle and barycentrics."""
    import open3d as o3d  # training-only dependency

    h, w = shape
    flat = np.concatenate([uv * np.array([w, h], np.float32), np.zeros((*uv.shape[:2], 1), np.float32)], -1)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(flat.reshape(-1, 3)),
                        o3d.core.Tensor(np.arange(flat.shape[0] * 3, dtype=np.uint32).reshape(-1, 3)))
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5)
    rays = np.stack([cols, rows, np.ones_like(cols), np.zeros_like(cols), np.zeros_like(cols),
                     -np.ones_like(cols)], -1)  # (H, W, 6)
    hit = scene.cast_rays(o3d.core.Tensor(rays))
    prim = hit["primitive_ids"].numpy().astype(np.int64)
    covered = prim != o3d.t.geometry.RaycastingScene.INVALID_ID
    prim[~covered] = 0
    bary = hit["primitive_uvs"].numpy()  # (H, W, 2): point = (1-a-b) p0 + a p1 + b p2
    weights = np.stack([1.0 - bary[..., 0] - bary[..., 1], bary[..., 0], bary[..., 1]], -1)
    corners = triangles[prim]  # (H, W, 3)
    position = np.einsum("hwk,hwkc->hwc", weights, neutral[corners]).astype(np.float32)
    texel_region = region[np.take_along_axis(corners, weights.argmax(-1)[..., None], -1)[..., 0]]
    texel_region[~covered] = -1
    from scipy import ndimage  # pulled in by open3d; training-only

    _, (ir, ic) = ndimage.distance_transform_edt(~covered, return_indices=True)
    return _UVBake(covered, position, texel_region.astype(np.int8), ir * w + ic)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-blurred white noise (H, W) float32."""
    n = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-6)


class _Painter:
    """Paints one texture. Every feature is a function of the texel's point on the neutral head.

    Works on the covered texels only, as flat (N,) / (N, 3) float32 arrays, and scatters them into
    the atlas at the end (gutters take the nearest covered texel's colour so bilinear lookups
    near seams stay clean).
    """

    _PLANE_MM = 0.5  # resolution of the frontal (x, y) feature planes
    _PLANE_COARSE = 4  # blotch noise is drawn this much coarser, then resized

    def __init__(self, model: FaceModel, bake: _UVBake, rng: np.random.Generator) -> None:
        self.bake, self.rng = bake, rng
        self.texels = np.flatnonzero(bake.covered)  # (N,) flat atlas index of each covered texel
        self.p = bake.position.reshape(-1, 3)[self.texels]  # (N, 3) mm
        self.region_of = bake.region.reshape(-1)[self.texels]
        self.region_id = {n: i for i, n in enumerate(model.region_names)}
        self.lm = model.neutral[model.landmarks_multipie68]  # (68, 3) mm, neutral head
        lo, hi = model.neutral[:, :2].min(0) - 5, model.neutral[:, :2].max(0) + 5
        self.plane_origin = lo
        self.plane_shape = tuple(int(v) for v in np.ceil((hi - lo)[::-1] / self._PLANE_MM))  # (rows = y, cols = x)
        # each texel's pixel in the frontal plane (nearest), to look features up
        plane_row = np.clip(((self.p[:, 1] - lo[1]) / self._PLANE_MM).astype(np.int32), 0, self.plane_shape[0] - 1)
        plane_col = np.clip(((self.p[:, 0] - lo[0]) / self._PLANE_MM).astype(np.int32), 0, self.plane_shape[1] - 1)
        self.plane_index = plane_row * self.plane_shape[1] + plane_col
        self.front = self.p[:, 2] > self.lm[:, 2].min() - 25.0  # texels on the front of the head
        self.sclera = {n: model.neutral[model.region == self.region_id[n]] for n in ("sclera_left", "sclera_right")}

    def region(self, *names: str) -> np.ndarray:
        return np.isin(self.region_of, [self.region_id[n] for n in names])

    def atlas_noise(self, sigma: float, sigma_y: float | None = None) -> np.ndarray:
        """Unit-std blurred noise drawn in atlas space, at the covered texels (N,)."""
        h, w = self.bake.covered.shape
        n = cv2.GaussianBlur(self.rng.standard_normal((h, w), dtype=np.float32), (0, 0), sigmaX=sigma,
                             sigmaY=sigma if sigma_y is None else sigma_y)
        n = n.reshape(-1)[self.texels]
        return n / (n.std() + 1e-6)

    def _plane_lookup(self, img: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        return img.reshape(-1)[self.plane_index if where is None else self.plane_index[where]]

    def _plane_points(self, points_mm: np.ndarray) -> np.ndarray:
        return ((points_mm[:, :2] - self.plane_origin) / self._PLANE_MM * 16).round().astype(np.int32)

    def plane_polygon(self, points_mm: np.ndarray, blur_mm: float, where: np.ndarray) -> np.ndarray:
        """A soft filled polygon drawn in the frontal plane, at the texels ``where`` (M,) float32."""
        img = np.zeros(self.plane_shape, np.float32)
        cv2.fillPoly(img, [self._plane_points(points_mm)], 1.0, lineType=cv2.LINE_AA, shift=4)
        return self._plane_lookup(cv2.GaussianBlur(img, (0, 0), blur_mm / self._PLANE_MM), where)

    def plane_polyline(self, points_mm: np.ndarray, width_mm: float, blur_mm: float, where: np.ndarray) -> np.ndarray:
        """A soft open polyline drawn in the frontal plane, at the texels ``where`` (M,) float32."""
        img = np.zeros(self.plane_shape, np.float32)
        cv2.polylines(img, [self._plane_points(points_mm)], False, 1.0,
                      thickness=max(1, int(round(width_mm / self._PLANE_MM))), lineType=cv2.LINE_AA, shift=4)
        return self._plane_lookup(cv2.GaussianBlur(img, (0, 0), blur_mm / self._PLANE_MM), where)

    @staticmethod
    def blend(colour: np.ndarray, where: np.ndarray, alpha: np.ndarray, paint: np.ndarray) -> None:
        """colour[where] moves toward ``paint`` by ``alpha`` (M,); only texels with alpha > 0 are touched."""
        some = alpha > 1e-3
        idx, a = where[some], alpha[some][:, None]
        paint = paint[some] if paint.ndim == 2 and len(paint) == len(alpha) else paint
        colour[idx] += a * (paint - colour[idx])

    def paint(self, skin_tone: float) -> np.ndarray:
        rng, p, lm = self.rng, self.p, self.lm
        f32 = np.float32
        # skin: tone + hue jitter, low-frequency blotches (frontal plane), fine pores (atlas)
        tone = float(np.clip(skin_tone, 0.0, 1.0)) * (len(_SKIN_TONES) - 1)
        i0 = min(int(tone), len(_SKIN_TONES) - 2)
        skin = (_SKIN_TONES[i0] * (1 - (tone - i0)) + _SKIN_TONES[i0 + 1] * (tone - i0)) * rng.uniform(0.92, 1.06, 3)
        skin = skin.astype(f32)
        coarse = tuple(v // self._PLANE_COARSE + 1 for v in self.plane_shape)
        blotch = cv2.resize(_smooth_noise(rng, coarse, 30 / self._PLANE_MM / self._PLANE_COARSE),
                            self.plane_shape[::-1], interpolation=cv2.INTER_LINEAR)
        pores = self.atlas_noise(0.8)
        shade = 1.0 + 0.05 * self._plane_lookup(blotch) + 0.025 * pores
        colour = skin[None, :] * shade[:, None]  # (N, 3)

        face = self.region("face") & self.front
        fi = np.flatnonzero(face)
        fp = p[fi]
        # redness: nose tip and cheeks
        red = np.zeros(len(fi), f32)
        for centre, sigma in ((lm[30], 8.0), (0.5 * (lm[31] + lm[2]), 14.0), (0.5 * (lm[35] + lm[14]), 14.0)):
            red += np.exp(-((fp[:, 0] - centre[0]) ** 2 + (fp[:, 1] - centre[1]) ** 2) / f32(2 * sigma**2))
        colour[fi] *= 1.0 - (red * f32(rng.uniform(0.04, 0.12)))[:, None] * np.array([0.0, 0.6, 0.5], f32)

        # stubble (sometimes): speckled darkening over the chin, jaw and upper lip
        if rng.uniform() < 0.3:
            lower = np.clip((lm[33, 1] - fp[:, 1]) / 10.0, 0, 1) * (np.abs(fp[:, 0]) < 70)
            speck = np.clip(self.atlas_noise(0.6)[fi], 0, None)
            colour[fi] *= (1.0 - f32(rng.uniform(0.1, 0.25)) * lower * (0.5 + 0.5 * speck))[:, None]

        # lips: the outer lip contour (the inner lips belong to the mouth socket)
        lips = self.plane_polygon(lm[48:60], 0.8, fi)
        lip_colour = (skin * np.array([0.78, 0.50, 0.52]) * rng.uniform(0.85, 1.05) + np.array([25, 0, 5])).astype(f32)
        self.blend(colour, fi, lips, lip_colour[None, :] * (0.97 + 0.03 * pores[fi, None]))

        hair = (_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.2)).astype(f32)
        streaks = self.atlas_noise(3.0, 0.6)  # hair runs along u
        # brows: a band around the Multi-PIE brow points, thick at the inner end, with hair streaks
        brow = np.zeros(len(fi), f32)
        thick, lift = rng.uniform(5.0, 8.0), rng.uniform(-1.0, 2.0)
        for idx in (np.arange(17, 22), np.arange(26, 21, -1)):  # outer -> inner, each side
            pts = lm[idx, :2] + np.array([0.0, lift])
            taper = np.linspace(0.55, 1.0, len(pts))[:, None] * thick
            brow = np.maximum(brow, self.plane_polygon(np.concatenate([pts + [0, 0.35] * taper,
                                                                       (pts - [0, 0.65] * taper)[::-1]]), 1.0, fi))
        brow *= np.clip(f32(rng.uniform(0.75, 0.95)) + 0.15 * streaks[fi], 0, 1)
        self.blend(colour, fi, brow, hair)

        # lashes / lid margins: dark lines along the eye openings (upper thicker)
        lash = np.zeros(len(fi), f32)
        lids = ((lm[[36, 37, 38, 39]], lm[[39, 40, 41, 36]]), (lm[[42, 43, 44, 45]], lm[[45, 46, 47, 42]]))
        for upper, lower in lids:  # (upper, lower) lid margins of each eye
            lash = np.maximum(lash, self.plane_polyline(upper, 1.6, 0.5, fi))
            lash = np.maximum(lash, 0.6 * self.plane_polyline(lower, 0.8, 0.4, fi))
        self.blend(colour, fi, lash * f32(rng.uniform(0.75, 0.95)), np.array([20, 15, 15], f32))

        # scalp hair above a random hairline (sometimes none); behind the ears it comes lower
        if rng.uniform() < 0.85:
            hairline = lm[19, 1] + rng.uniform(38.0, 55.0)
            head = np.flatnonzero(self.region("face", "head_neck"))
            hp = p[head]
            back = hp[:, 2] < lm[0, 2] - 40
            scalp = np.clip((hp[:, 1] - hairline) / 4.0 + 0.5 + back, 0, 1) * (hp[:, 1] > hairline - 40 * back)
            self.blend(colour, head, scalp * np.clip(0.9 + 0.1 * streaks[head], 0, 1), hair)

        # inside of the mouth and the eye sockets (caruncle, inner lids): dark pink; teeth off-white
        colour[self.region("mouth_socket")] = np.array([110, 45, 50], f32) * f32(rng.uniform(0.6, 1.0))
        colour[self.region("eye_socket_left", "eye_socket_right")] = skin * np.array([0.75, 0.5, 0.5], f32)
        teeth = self.region("teeth")
        colour[teeth] = np.array([228, 220, 198], f32) * f32(rng.uniform(0.8, 1.0)) * shade[teeth][:, None]
        self._paint_eyes(colour, pores)

        h, w = self.bake.covered.shape
        atlas = np.zeros((h * w, 3), f32)
        atlas[self.texels] = colour
        atlas = atlas[self.bake.fill_index.reshape(-1)]  # covered texels map to themselves
        return np.clip(atlas + 0.5, 0, 255).astype(np.uint8).reshape(h, w, 3)

    def _paint_eyes(self, colour: np.ndarray, pores: np.ndarray) -> None:
        """Sclera white, iris (radial striations, dark limbus) and pupil on the eyeball shells."""
        rng = self.rng
        iris_colour = (_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.8, 1.2)).astype(np.float32)
        iris_r, pupil_r = rng.uniform(5.6, 6.2), rng.uniform(1.8, 2.6)
        for name, verts in self.sclera.items():
            mask = self.region(name)
            d = self.p[mask] - 0.5 * (verts.min(0) + verts.max(0))  # from the eyeball's centre
            rho = np.hypot(d[:, 0], d[:, 1])  # distance from the gaze axis (+z)
            front = d[:, 2] > 0
            angle = np.arctan2(d[:, 1], d[:, 0])
            striation = 1.0 + 0.15 * np.sin(angle * 23 + 3 * np.sin(angle * 7)) + 0.1 * pores[mask]
            c = np.array([236, 230, 224], np.float32) * (1.0 - 0.05 * np.clip(rho / 12.0, 0, 1))[:, None]
            iris = front & (rho < iris_r)
            limbus = np.clip(rho - (iris_r - 1.0), 0, 1)[:, None]
            c[iris] = (iris_colour * striation[:, None] * (1 - 0.5 * limbus))[iris]
            c[front & (rho < pupil_r)] = 12.0
            colour[mask] = c


def main() -> None:
    """Render a contact sheet of random heads and expressions to look at."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from train.render import RenderOptions, RenderPose, ScanRenderer

    model = FaceModel.load()
    rng = np.random.default_rng(args.seed)
    tiles = []
    with ScanRenderer(RenderOptions(seed=args.seed)) as renderer:
        for name in EXPRESSION_TABLE:
            mesh = model.mesh(model.random_identity(rng), expression_weights(name, 1.0, rng),
                              model.procedural_texture(rng))
            pose = RenderPose(yaw=rng.uniform(-25, 25), pitch=rng.uniform(-10, 10), roll=rng.uniform(-8, 8))
            tiles.append(renderer.process(mesh, pose).frame.color[60:420, 140:500])
    sheet = np.concatenate([np.concatenate(tiles[:4], 1), np.concatenate(tiles[4:] + [tiles[0] * 0], 1)], 0)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
