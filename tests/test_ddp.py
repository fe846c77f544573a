"""fit() under torchrun: two CPU processes (gloo) end with identical weights; only rank 0 writes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from train.model import build_model
    from train.train import ToyExpressionDataset, TrainConfig, fit

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = build_model("afnet_m", input_size=32, width=0.125, blocks=(1, 1, 1, 1))
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, device="cpu", out_dir=os.path.join(out, "ckpt"))
    result = fit(model, ToyExpressionDataset(40, size=32), ToyExpressionDataset(14, size=32, seed=1), cfg)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"hash": digest.hexdigest(), "steps": result.steps, "val_acc": result.final_eval.accuracy,
                   "val_n": result.final_eval.num_samples, "world": int(os.environ["WORLD_SIZE"]),
                   "initialized_after": torch.distributed.is_initialized()}, f)
""")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_cpu_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert all(r["world"] == 2 and not r["initialized_after"] for r in ranks)
    assert [r["steps"] for r in ranks] == [2 * 3, 2 * 3]  # 40 samples / 2 ranks / batch 8 = 3 steps per epoch
    assert ranks[0]["val_n"] == ranks[1]["val_n"] == 14  # evaluation covers the whole set exactly once
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]
    assert proc.stdout.count("final:") == 1  # only rank 0 reports
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "last.pt", "train_config.json"]
