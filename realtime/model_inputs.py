"""Model feeds from canonical faces: the one normalisation path for the runtime and training.

Usage:
    from realtime.model_inputs import make_feeds, face_to_arrays, arrays_to_feeds, flip_arrays
    feeds = make_feeds([result.face for result in results if result.ok])  # runtime: straight to the engine
    arrays = face_to_arrays(face)         # training: cache these (np.savez), unnormalised
    feeds = arrays_to_feeds([arrays, ...])  # ... and normalise a batch of them the same way

Feeds follow the model I/O contract (``realtime.model_metadata.INPUT_NAMES``):
``texture`` (B, 3, S, S) float32 RGB in [0, 1]; ``geometry`` (B, 4, S, S) float32 = depth
(mm relative to the nose tip, clipped to [SPEC.depth_min_mm, SPEC.depth_max_mm], divided by
SPEC.depth_scale_mm) then the unit normals nx, ny, nz; ``masks`` (B, 6, S, S) float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from realtime.canonical import CanonicalFace
from realtime.masks import flip_masks
from realtime.spec import MASK_NAMES, SPEC, CanonicalSpec

ARRAY_KEYS = ("texture", "depth_mm", "normals", "masks", "valid")
"""Keys of :func:`face_to_arrays` (what a training cache stores per sample)."""


def face_to_arrays(face: CanonicalFace) -> dict[str, np.ndarray]:
    """The unnormalised maps of one face, as plain arrays.

    Returns:
        ``texture`` (S, S, 3) uint8 RGB, ``depth_mm`` (S, S) float32, ``normals`` (3, S, S)
        float32, ``masks`` (6, S, S) float32, ``valid`` (S, S) bool.
    """
    return {"texture": face.texture, "depth_mm": face.depth_mm, "normals": face.normals,
            "masks": face.masks, "valid": face.valid}


def _check(sample: Mapping[str, np.ndarray], i: int, spec: CanonicalSpec) -> None:
    s = spec.size
    expected = {"texture": (s, s, 3), "depth_mm": (s, s), "normals": (3, s, s), "masks": (len(MASK_NAMES), s, s)}
    for key, shape in expected.items():
        if key not in sample:
            raise ValueError(f"sample {i}: missing {key!r}")
        if tuple(np.shape(sample[key])) != shape:
            raise ValueError(f"sample {i}: {key} must be {shape}, got {tuple(np.shape(sample[key]))}")


def arrays_to_feeds(samples: Sequence[Mapping[str, np.ndarray]], spec: CanonicalSpec = SPEC) -> dict[str, np.ndarray]:
    """Normalise and batch samples shaped as :func:`face_to_arrays` returns them.

    Raises:
        ValueError: no samples, or a missing/misshapen array (naming the sample and key).
    """
    if len(samples) == 0:
        raise ValueError("no samples to batch")
    for i, sample in enumerate(samples):
        _check(sample, i, spec)
    texture = np.stack([np.asarray(x["texture"]) for x in samples]).astype(np.float32)  # (B, S, S, 3)
    texture = np.ascontiguousarray(texture.transpose(0, 3, 1, 2)) * np.float32(1.0 / 255.0)
    depth = np.stack([np.asarray(x["depth_mm"], np.float32) for x in samples])  # (B, S, S)
    depth = np.clip(depth, spec.depth_min_mm, spec.depth_max_mm) / np.float32(spec.depth_scale_mm)
    normals = np.stack([np.asarray(x["normals"], np.float32) for x in samples])  # (B, 3, S, S)
    geometry = np.concatenate([depth[:, None], normals], axis=1)  # (B, 4, S, S)
    masks = np.clip(np.stack([np.asarray(x["masks"], np.float32) for x in samples]), 0.0, 1.0)  # (B, 6, S, S)
    return {"texture": texture, "geometry": np.ascontiguousarray(geometry, np.float32), "masks": masks}


def make_feeds(faces: Sequence[CanonicalFace], spec: CanonicalSpec = SPEC) -> dict[str, np.ndarray]:
    """Feeds for a batch of canonical faces (``arrays_to_feeds`` of ``face_to_arrays``)."""
    return arrays_to_feeds([face_to_arrays(face) for face in faces], spec)


def flip_arrays(sample: Mapping[str, np.ndarray], spec: CanonicalSpec = SPEC) -> dict[str, np.ndarray]:
    """The mirror image of a sample (horizontal flip augmentation).

    Columns are reversed about the nose column (``spec.nose_col`` must be the centre of the
    raster's width, so the nose stays put), nx changes sign, left/right masks swap. Flipping
    twice gives the sample back.
    """
    if spec.nose_col != (spec.size - 1) / 2:
        raise ValueError(f"nose_col {spec.nose_col} is not the raster's centre column: a flip would move the nose")
    normals = np.asarray(sample["normals"])[:, :, ::-1].copy()
    normals[0] *= -1
    out = {"texture": np.ascontiguousarray(np.asarray(sample["texture"])[:, ::-1]),
           "depth_mm": np.ascontiguousarray(np.asarray(sample["depth_mm"])[:, ::-1]),
           "normals": normals,
           "masks": flip_masks(np.asarray(sample["masks"]))}
    if "valid" in sample:
        out["valid"] = np.ascontiguousarray(np.asarray(sample["valid"])[:, ::-1])
    return out
