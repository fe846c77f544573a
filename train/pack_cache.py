"""Pack a preprocessed sample cache into one small file for a training box, and unpack it there.

Usage:
    python -m train.pack_cache pack /data/syn -o syn.pack.npz        # ~13 kB a sample instead of ~190 kB
    python -m train.pack_cache pack /data/syn -o syn.pack.npz --splits train,test
    python -m train.pack_cache unpack syn.pack.npz -o /data/syn      # on the GPU box: a cache again
    python -m train --dataset synthetic --cache /data/syn --final --device cuda ...

Why: rendering needs Open3D and FaceMesh needs mediapipe, which a GPU box may not have, and a
cache of float32 maps is ~190 kB a sample. The pack is LOSSY, sized for slow links:
texture as JPEG (quality 90), depth in 0.51 mm steps (8-bit PNG; a D4xx's noise at 0.5 m is
~1 mm), the eight binary planes (six masks, ``valid``, the face region) bit-packed, and the
normals recomputed from the depth exactly as ``realtime.canonical`` does, except on the ring at
the face-oval edge whose smoothing reaches outside the oval (there the stored normals, 8-bit,
are used). A model trained on an unpacked cache is evaluated on the exact one
(``python -m train ... --cache EXACT``) to show the loss costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np

from realtime.canonical import CanonicalOptions, depth_normals
from realtime.spec import MASK_NAMES, PREPROCESSING_VERSION, SPEC
from train.cache import CacheEntry, entry_path, load_arrays, save_sample, scan_cache

PACK_FORMAT = "afnet-cache-pack"
DEPTH_STEP_MM = 0.51  # 255 steps cover the depth the model sees, depth_min_mm .. depth_max_mm (-100 .. +30 mm)
JPEG_QUALITY = 90
_SMOOTHING_PX = CanonicalOptions().normal_smoothing_px
RING_PX = int(np.ceil(4 * _SMOOTHING_PX)) + 2  # Gaussian support (cv2: 4 sigma) + the Sobel tap


def _region(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(S, S) bool face region: off it the canonical stage writes depth_min_mm, black, normal +z."""
    n = arrays["normals"]
    background = ((arrays["depth_mm"] == np.float32(SPEC.depth_min_mm)) & (n[0] == 0) & (n[1] == 0) & (n[2] == 1)
                  & ~arrays["texture"].any(axis=2))
    return ~background


def _ring(region: np.ndarray) -> np.ndarray:
    """Region pixels whose normal smoothing reaches outside the region."""
    inner = cv2.erode(region.view(np.uint8), np.ones((2 * RING_PX + 1, 2 * RING_PX + 1), np.uint8))
    return region & ~inner.view(bool)


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def pack_sample(arrays: dict[str, np.ndarray]) -> list[bytes]:
    """Encoded streams of one sample: texture JPEG, depth PNG, planes PNG, ring normals (int8)."""
    region = _region(arrays)
    depth = np.clip(np.round((arrays["depth_mm"] - SPEC.depth_min_mm) / DEPTH_STEP_MM), 0, 255).astype(np.uint8)
    planes = np.concatenate([arrays["masks"] > 0.5, arrays["valid"][None], region[None]])  # (8, S, S) bool
    ring_normals = arrays["normals"][:2, _ring(region)]  # (2, R)
    return [
        cv2.imencode(".jpg", cv2.cvtColor(arrays["texture"], cv2.COLOR_RGB2BGR),
                     [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes(),
        _png(depth),
        _png(np.packbits(planes, axis=0)[0]),
        np.clip(np.round(ring_normals * 127), -127, 127).astype(np.int8).tobytes(),
    ]


def unpack_sample(streams: list[bytes]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_sample` (lossy): ``face_to_arrays``-shaped arrays."""
    jpeg, depth_png, planes_png, ring_bytes = streams
    texture = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    depth8 = cv2.imdecode(np.frombuffer(depth_png, np.uint8), cv2.IMREAD_UNCHANGED)
    planes = np.unpackbits(cv2.imdecode(np.frombuffer(planes_png, np.uint8), cv2.IMREAD_UNCHANGED)[None],
                           axis=0).astype(bool)  # (8, S, S)
    masks, valid, region = planes[:len(MASK_NAMES)], planes[len(MASK_NAMES)], planes[len(MASK_NAMES) + 1]
    depth = (depth8.astype(np.float32) * np.float32(DEPTH_STEP_MM) + np.float32(SPEC.depth_min_mm))
    normals = depth_normals(depth, SPEC.mm_per_px, _SMOOTHING_PX)
    ring = _ring(region)
    nxy = np.frombuffer(ring_bytes, np.int8).reshape(2, -1).astype(np.float32) / 127.0
    normals[:2, ring] = nxy
    normals[2, ring] = np.sqrt(np.clip(1.0 - (nxy ** 2).sum(axis=0), 0.0, 1.0))
    normals[:, ~region] = np.array([0.0, 0.0, 1.0], np.float32)[:, None]
    depth[~region] = np.float32(SPEC.depth_min_mm)
    texture[~region] = 0
    return {"texture": texture, "depth_mm": depth, "normals": normals, "masks": masks.astype(np.float32),
            "valid": valid}


def _meta(entry: CacheEntry) -> dict:
    return {"key": entry.key, "dataset": entry.dataset, "subject": entry.subject, "expression": entry.expression,
            "intensity": entry.intensity, "view": entry.view, "pose": list(entry.pose), "split": entry.split,
            "source": entry.source, "take": entry.take}


def pack(cache_dir: str | Path, out: str | Path, splits: tuple[str, ...] | None = None) -> int:
    """Pack the usable samples of ``cache_dir`` (current preprocessing version) into ``out``.

    Args:
        splits: Keep only samples of these synthetic splits ("train", "val", "test"); None: all.
    """
    entries = [e for e in scan_cache(cache_dir).entries if splits is None or e.split in splits]
    blobs, offsets, metas = [], [0], []
    for entry in entries:
        for stream in pack_sample(load_arrays(entry.path)):
            blobs.append(stream)
            offsets.append(offsets[-1] + len(stream))
        metas.append(_meta(entry))
    np.savez(out, format=PACK_FORMAT, version=PREPROCESSING_VERSION, meta=json.dumps(metas),
             data=np.frombuffer(b"".join(blobs), np.uint8), offsets=np.asarray(offsets, np.int64))
    return len(entries)


def unpack(pack_file: str | Path, out_dir: str | Path) -> int:
    """Write the samples of a pack as a cache under ``out_dir``; returns how many.

    Raises:
        ValueError: not a pack, or packed by another preprocessing version (one line).
    """
    try:
        with np.load(pack_file, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != PACK_FORMAT:
                raise ValueError(f"{pack_file}: not a cache pack")
            if str(z["version"]) != PREPROCESSING_VERSION:
                raise ValueError(f"{pack_file}: packed by preprocessing {str(z['version'])!r}, "
                                 f"this code is {PREPROCESSING_VERSION!r}")
            metas, data, offsets = json.loads(str(z["meta"])), z["data"].tobytes(), z["offsets"]
        for i, meta in enumerate(metas):
            streams = [data[offsets[4 * i + k]:offsets[4 * i + k + 1]] for k in range(4)]
            meta = {**meta, "version": PREPROCESSING_VERSION, "pose": np.asarray(meta["pose"], np.float64)}
            save_sample(entry_path(out_dir, meta["key"]), unpack_sample(streams), meta)
    except (KeyError, IndexError, EOFError, zipfile.BadZipFile, zlib.error, cv2.error, json.JSONDecodeError) as exc:
        raise ValueError(f"{pack_file}: damaged pack ({type(exc).__name__}: {exc})") from None
    return len(metas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack a sample cache into one small lossy file, or unpack it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="cache folder -> pack file")
    p.add_argument("cache", help="preprocessing output folder (holds <version>/...)")
    p.add_argument("-o", "--out", required=True, help="pack file (.npz)")
    p.add_argument("--splits", help="comma-separated synthetic splits to keep (e.g. train,test); default all")
    u = sub.add_parser("unpack", help="pack file -> cache folder")
    u.add_argument("pack", help="pack file")
    u.add_argument("-o", "--out", required=True, help="preprocessing output folder to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            n = pack(args.cache, args.out, tuple(args.splits.split(",")) if args.splits else None)
        else:
            n = unpack(args.pack, args.out)
    except (OSError, ValueError) as exc:
        print(f"pack_cache: {exc}", file=sys.stderr)
        return 2
    print(f"{args.command}: {n} samples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
