#!/usr/bin/env bash
# Train the ablation on the synthetic set and pick the shipped demo model from it (a GPU box).
#
# Usage: scripts/train_synthetic.sh CACHE_OR_PACK OUT [EPOCHS] [SEEDS] [JOBS]
#   CACHE_OR_PACK  a preprocessing output folder, or a pack from `python -m train.pack_cache pack`
#   OUT            gets ablation/<mode>_s<seed>/ (results.json, confusion.png, final.pt), logs/, table.md
#   EPOCHS         per run (default 30); SEEDS (default "0 1 2"); JOBS runs at once (default 9)
# Every run: `python -m train --final` on the synthetic identity split (train / val / held-out test
# identities), afnet_m_rt, the same data, epochs and seeds for all six modes. The demo model is
# OUT/ablation/full_s0/final.pt (export it with export/export_onnx.py).
set -euo pipefail
src=$1; out=$2; epochs=${3:-30}; seeds=${4:-"0 1 2"}; jobs=${5:-9}
py=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # many runs share the CPU: keep each one's threads few
mkdir -p "$out/logs" "$out/ablation"
if [[ $src == *.npz ]]; then
    cache=$out/cache
    $py -m train.pack_cache unpack "$src" -o "$cache"
else
    cache=$src
fi
for seed in $seeds; do
    for mode in 2d 3d late_concat iwc ma full; do
        $py -m train --dataset synthetic --cache "$cache" --final --model afnet_m_rt --mode "$mode" \
            --seed "$seed" --epochs "$epochs" --in-memory --no-progress --keep best \
            --out "$out/ablation/${mode}_s$seed" > "$out/logs/${mode}_s$seed.log" 2>&1 &
        while (( $(jobs -rp | wc -l) >= jobs )); do wait -n || true; done
    done
done
wait || true
$py -m train.ablation "$out/ablation" | tee "$out/table.md"
