"""The one definition of what the model sees: canonical map geometry, masks, classes.

Both the runtime and the training data go through this spec; the exported model carries
:data:`PREPROCESSING_VERSION` and the runtime refuses a model built for another one.

Canonical face frame (see ``canonical.py``): origin at the nose tip, +x toward the subject's
left (the right of a frontal image), +y up, +z out of the face toward the camera; millimetres.
The fit is rigid (rotation + translation, no scale), so the maps keep real face size.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPRESSIONS: tuple[str, ...] = (
    "neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise",
)
"""Default class list: the six basic expressions plus neutral (the paper's protocols use the six)."""

BASIC_SIX: tuple[str, ...] = EXPRESSIONS[1:]

MASK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth")
"""Salient regions, in mask-channel order; left/right are the subject's."""

GEOMETRY_CHANNELS: tuple[str, ...] = ("depth", "normal_x", "normal_y", "normal_z")
"""Channels of the 3D branch's input, in order."""


@dataclass(frozen=True)
class CanonicalSpec:
    """Raster geometry of the canonical maps.

    A square of ``size`` pixels at ``mm_per_px``; the nose tip lands on pixel
    (``nose_col``, ``nose_row``). 112 px at 1.2 mm covers 134 mm: brows (raised too) to
    below the lower lip, cheek to cheek; the nose sits above centre so the mouth fits.
    """

    size: int = 112
    mm_per_px: float = 1.2
    nose_col: float = 55.5  # the centre between the two middle columns
    nose_row: float = 54.0
    depth_scale_mm: float = 50.0  # depth channel = z_mm / depth_scale_mm (z <= 0 behind the nose tip)
    depth_min_mm: float = -100.0  # farther behind the nose tip is not face; also the value off the face
    depth_max_mm: float = 30.0  # nearer than this in front of the nose tip is not face


SPEC = CanonicalSpec()

TEMPLATE_ID = "e7558e3b63"
"""Short hash of the arrays in ``assets/canonical_template.npz`` (``realtime.canonical.template_id``;
a test checks it against the file). Regenerate both with ``python -m train.make_template``."""

PREPROCESSING_VERSION = (
    f"canon1-rigid-s{SPEC.size}-p{SPEC.mm_per_px:g}-n{SPEC.nose_col:g}x{SPEC.nose_row:g}"
    f"-g{len(GEOMETRY_CHANNELS)}-m{len(MASK_NAMES)}-t{TEMPLATE_ID}"
)
