"""Cut the shared ICT-FaceKit asset down to what the scan renderer needs.

Usage:
    python train/assets/ict_facekit/vendor.py \
        --source ../shared/assets/ict-facekit/face_model.npz \
        --out train/assets/ict_facekit/ict_face.npz

Keeps the face, head/neck, mouth socket, eye sockets, the eyeball shells (sclera, which a ray
hits before the iris sphere inside it) and the front teeth; drops gums/tongue, the iris spheres
and the back teeth, which a camera in front of the face never sees. Triangles that lose a corner
are dropped and the rest are re-indexed. Deltas stay float16 in centimetres, exactly as in the
source (no requantisation); :mod:`train.face_model` converts to millimetres on load.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

KEEP_REGIONS = ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right",
                "sclera_left", "sclera_right")
FRONT_TEETH_MIN_Z_CM = 9.0  # incisors and canines: what an open mouth shows
IDENTITY_MODES = 60  # 99.2 % of the identity energy; mode 60 moves vertices < 0.5 mm
SHARED_SOURCE = Path(__file__).resolve().parents[4] / "shared" / "assets" / "ict-facekit" / "face_model.npz"


def vendor(source: Path, out: Path, identity_modes: int = IDENTITY_MODES) -> dict[str, int]:
    """Write the reduced model to ``out``; returns counts for the provenance note."""
    src = np.load(source)
    region_names = [str(n) for n in src["region_names"]]
    region = src["region"]
    neutral = src["neutral"]
    keep = np.isin(region, [region_names.index(n) for n in KEEP_REGIONS])
    keep |= (region == region_names.index("teeth")) & (neutral[:, 2] > FRONT_TEETH_MIN_Z_CM)

    old_ids = np.flatnonzero(keep).astype(np.int32)  # (V,) source vertex id of each kept vertex
    remap = np.full(len(neutral), -1, np.int64)
    remap[old_ids] = np.arange(len(old_ids))
    tri_keep = keep[src["triangles"]].all(axis=1)
    triangles = remap[src["triangles"][tri_keep]].astype(np.int32)  # (T, 3)
    triangles_uv_src = src["triangles_uv"][tri_keep]
    used_uv, triangles_uv = np.unique(triangles_uv_src, return_inverse=True)
    landmarks = remap[src["landmarks_multipie68"]]
    if (landmarks < 0).any():
        raise ValueError(f"{source}: a Multi-PIE landmark vertex was dropped")

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        neutral=neutral[old_ids],  # (V, 3) float32 cm
        identity_basis=src["identity_basis"][:identity_modes][:, old_ids],  # (K, V, 3) float16 cm
        expression_basis=src["expression_basis"][:, old_ids],  # (E, V, 3) float16 cm
        expression_names=src["expression_names"],
        triangles=triangles,
        uv=src["uv"][used_uv],  # (N, 2) float32, OBJ convention (v from the bottom), UDIM tiles in u
        triangles_uv=triangles_uv.reshape(-1, 3).astype(np.int32),
        region=region[old_ids],
        region_names=src["region_names"],
        landmarks_multipie68=landmarks.astype(np.int32),
        source_vertex=old_ids,
    )
    return {"vertices": len(old_ids), "triangles": len(triangles), "identity_modes": identity_modes,
            "bytes": out.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SHARED_SOURCE,
                        help="the full ICT-FaceKit asset (default: ../shared beside this checkout)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ict_face.npz"))
    parser.add_argument("--identity-modes", type=int, default=IDENTITY_MODES)
    args = parser.parse_args()
    counts = vendor(args.source, args.out, args.identity_modes)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: {counts}, sha256 {digest}")


if __name__ == "__main__":
    main()
