"""A synthetic expression data set from the ICT-FaceKit face model (no licensed data needed).

Usage:
    from train.datasets.synthetic import SyntheticFaces, SyntheticOptions, synthetic_records
    options = SyntheticOptions(identities=60, samples_per_identity_expression=4, seed=0)
    records = synthetic_records(options)            # cheap: parameters only, no mesh is built
    with SyntheticFaces(options) as faces:
        mesh = faces.process(records[0])            # TexturedMesh, then train.render as any scan

    python -m train.preprocess --dataset synthetic --out data/synthetic --identities 60 --per-class 4

Subjects are identities ``syn000``, ``syn001``...; each has its own identity coefficients, skin
(``FaceModel.procedural_texture``) and skin tone. Every identity shows every class of
``options.classes`` (the six basic expressions and neutral) ``samples_per_identity_expression``
times, each at a random intensity with per-side jitter of the blendshape weights, a random head
pose, distance, offset and lighting. Record ``i`` is identity ``i // (classes * K)``, class
``(i // K) % classes``; its random parameters come from ``default_rng([seed, i])`` and the
identity's from ``default_rng([seed, SALT_IDENTITY, identity])``: any record can be made alone,
in any process, in any order (parallel and resumable generation), and the same seed gives the
same data.

Identities are split into held-out sets (``split`` of each record): a seeded permutation puts
``test_fraction`` of them in "test", ``val_fraction`` in "val", the rest in "train"; the
experiment's ``--final`` mode trains on "train", selects on "val" and reports "test", and its
cross-validation splits by subject anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime.spec import EXPRESSIONS
from train.datasets.scan import ScanRecord
from train.mesh import TexturedMesh
from train.render import random_light_direction

DATASET = "synthetic"
SPLITS = ("train", "val", "test")
SALT_IDENTITY = 0x1D  # separates identity streams from record streams of the same seed
SALT_SPLIT = 0x5B


@dataclass(frozen=True)
class SyntheticOptions:
    """What the synthetic set contains and how it is varied.

    Attributes:
        identities: Number of identities (subjects ``syn000``...).
        samples_per_identity_expression: Samples of each class per identity.
        seed: Seeds everything.
        classes: Expression classes (``realtime.spec.EXPRESSIONS`` names).
        intensity_range: Expression intensity drawn uniformly in it (1 = the face model's prototype);
            neutral has none.
        weight_jitter: Relative per-side noise of every blendshape weight (face_model.expression_weights).
        identity_sigma: Standard deviation of the identity coefficients.
        skin_tone_range: Skin tone (0 light .. 1 dark) drawn uniformly in it, per identity.
        yaw_deg, pitch_deg, roll_deg: Head rotation drawn uniformly in +-these.
        distance_mm: Camera distance of the head's centre, drawn uniformly in this range.
        offset_mm: Head centre moved off the optical axis by up to +-(x, y).
        ambient_range, diffuse_range: Lighting strengths drawn uniformly (train.render model).
        light_spread_deg: The light comes from up to this far off the camera axis.
        val_fraction, test_fraction: Shares of the identities held out for validation and test.
    """

    identities: int = 60
    samples_per_identity_expression: int = 4
    seed: int = 0
    classes: tuple[str, ...] = EXPRESSIONS
    intensity_range: tuple[float, float] = (0.4, 1.0)
    weight_jitter: float = 0.15
    identity_sigma: float = 1.0
    skin_tone_range: tuple[float, float] = (0.0, 1.0)
    yaw_deg: float = 35.0
    pitch_deg: float = 20.0
    roll_deg: float = 12.0
    distance_mm: tuple[float, float] = (450.0, 900.0)
    offset_mm: tuple[float, float] = (60.0, 40.0)
    ambient_range: tuple[float, float] = (0.3, 0.6)
    diffuse_range: tuple[float, float] = (0.45, 0.8)
    light_spread_deg: float = 50.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.identities < 1 or self.samples_per_identity_expression < 1:
            raise ValueError(f"SyntheticOptions: identities ({self.identities}) and samples_per_identity_expression "
                             f"({self.samples_per_identity_expression}) must be >= 1")
        unknown = [c for c in self.classes if c not in EXPRESSIONS]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"SyntheticOptions: classes must be distinct names of {EXPRESSIONS}, got {self.classes}")
        for name in ("intensity_range", "skin_tone_range", "distance_mm", "ambient_range", "diffuse_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"SyntheticOptions: {name} {getattr(self, name)} must be (low, high)")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"SyntheticOptions: val_fraction {self.val_fraction} + test_fraction "
                             f"{self.test_fraction} must be in [0, 1)")

    @property
    def num_records(self) -> int:
        return self.identities * len(self.classes) * self.samples_per_identity_expression


@dataclass(frozen=True)
class SyntheticRecord(ScanRecord):
    """One synthetic sample: a :class:`ScanRecord` (labels, subject) plus its generation parameters.

    ``path`` is a virtual name (``syn003/syn003_000123_happiness``), unique per record; the
    pose is the ``train.render.RenderPose`` the sample is rendered at.
    """

    index: int = 0
    identity: int = 0
    split: str = "train"
    strength: float = 0.0  # expression intensity (0 for neutral)
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    distance_mm: float = 600.0
    offset_mm: tuple[float, float] = (0.0, 0.0)
    ambient: float = 0.45
    diffuse: float = 0.65
    light_direction: tuple[float, float, float] = (0.0, 0.0, -1.0)  # toward the light, camera frame
    render_seed: int = 0  # seeds the renderer's noise, holes and background for this sample


def subject_name(identity: int, identities: int) -> str:
    """``syn007``: three digits, more when the set has more than 1000 identities."""
    return f"syn{identity:0{max(3, len(str(identities - 1)))}d}"


def identity_splits(options: SyntheticOptions) -> dict[str, str]:
    """Subject -> "train" | "val" | "test" (a seeded permutation; the held-out sets are disjoint).

    Each held-out set gets ``round(fraction * identities)`` identities, at least one when its
    fraction is positive and at least one identity stays for training.
    """
    n = options.identities
    order = np.random.default_rng([options.seed, SALT_SPLIT]).permutation(n)
    sizes = []
    for fraction in (options.test_fraction, options.val_fraction):
        size = int(round(fraction * n))
        if fraction > 0 and size == 0 and n - sum(sizes) > 1:
            size = 1
        sizes.append(min(size, max(0, n - sum(sizes) - 1)))
    n_test, n_val = sizes
    split = {}
    for rank, identity in enumerate(order):
        split[subject_name(int(identity), n)] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def synthetic_record(options: SyntheticOptions, index: int, splits: dict[str, str] | None = None) -> SyntheticRecord:
    """Record ``index`` of the set described by ``options`` (depends only on the seed and the index)."""
    if not 0 <= index < options.num_records:
        raise IndexError(f"synthetic record {index} out of range 0..{options.num_records - 1}")
    per_identity = len(options.classes) * options.samples_per_identity_expression
    identity = index // per_identity
    expression = options.classes[(index % per_identity) // options.samples_per_identity_expression]
    subject = subject_name(identity, options.identities)
    splits = splits if splits is not None else identity_splits(options)
    rng = np.random.default_rng([options.seed, index])
    strength = 0.0 if expression == "neutral" else float(rng.uniform(*options.intensity_range))
    light = random_light_direction(rng, options.light_spread_deg)
    return SyntheticRecord(
        dataset=DATASET, subject=subject, expression=expression, intensity=None,
        path=Path(subject) / f"{subject}_{index:06d}_{expression}", texture=Path("procedural"),
        index=index, identity=identity, split=splits[subject], strength=strength,
        yaw=float(rng.uniform(-1, 1) * options.yaw_deg), pitch=float(rng.uniform(-1, 1) * options.pitch_deg),
        roll=float(rng.uniform(-1, 1) * options.roll_deg), distance_mm=float(rng.uniform(*options.distance_mm)),
        offset_mm=(float(rng.uniform(-1, 1) * options.offset_mm[0]), float(rng.uniform(-1, 1) * options.offset_mm[1])),
        ambient=float(rng.uniform(*options.ambient_range)), diffuse=float(rng.uniform(*options.diffuse_range)),
        light_direction=light, render_seed=int(rng.integers(2**31)),
    )


def synthetic_records(options: SyntheticOptions) -> list[SyntheticRecord]:
    """Every record of the set, in index order (identity-major)."""
    splits = identity_splits(options)
    return [synthetic_record(options, i, splits) for i in range(options.num_records)]


class SyntheticFaces:
    """Builds the mesh of a synthetic record (the face model and recent identities are kept).

    Identities' coefficients and skins are cached for the last ``cache_identities`` identities:
    records come identity by identity, and a skin takes ~0.2 s to paint.
    """

    def __init__(self, options: SyntheticOptions, cache_identities: int = 4) -> None:
        from train.face_model import FaceModel  # loads the vendored asset; not needed to list records

        self.options = options
        self.model = FaceModel.load()
        self._identities: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._capacity = max(1, cache_identities)

    def __enter__(self) -> "SyntheticFaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cached identities."""
        self._identities.clear()

    def identity(self, identity: int) -> tuple[np.ndarray, np.ndarray]:
        """(coefficients (K,) float32, texture (H, W, 3) uint8) of an identity, from the seed alone."""
        if identity in self._identities:
            self._identities.move_to_end(identity)
            return self._identities[identity]
        rng = np.random.default_rng([self.options.seed, SALT_IDENTITY, identity])
        coefficients = self.model.random_identity(rng, sigma=self.options.identity_sigma)
        texture = self.model.procedural_texture(rng, float(rng.uniform(*self.options.skin_tone_range)))
        self._identities[identity] = (coefficients, texture)
        while len(self._identities) > self._capacity:
            self._identities.popitem(last=False)
        return coefficients, texture

    def process(self, record: SyntheticRecord) -> TexturedMesh:
        """The record's textured head (mm, +z toward the viewer)."""
        from train.face_model import expression_weights

        coefficients, texture = self.identity(record.identity)
        rng = np.random.default_rng([self.options.seed, record.index, 1])  # the weights' jitter
        weights = expression_weights(record.expression, record.strength, rng, self.options.weight_jitter)
        mesh = self.model.mesh(coefficients, weights, texture)
        mesh.source = str(record.path)
        return mesh
