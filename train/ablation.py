"""Summarise ablation runs (one ``python -m train ... --final`` run folder per mode and seed).

Usage:
    python -m train.ablation runs/ablation            # folders named <mode>_s<seed>/results.json
    python -m train.ablation runs/ablation --markdown # the README table

Prints, per mode in :data:`train.model.MODES` order, the held-out test accuracy as mean ± std over
seeds (population std, as ``train.report.summarize``), the number of seeds and the model's
parameter count. A run folder without a readable results.json holding a test accuracy (a crashed
or unfinished run, or a final run without test subjects) is listed as missing, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from train.model import MODES, AFNetConfig, build_model, count_parameters
from train.report import summarize

MODE_TITLES = {
    "2d": "2D only (texture stream)", "3d": "3D only (geometry stream)",
    "late_concat": "late concatenation (paper's baseline)", "iwc": "+ IWC (importance-weight fusion)",
    "ma": "+ MA (mask attention, late concatenation)", "full": "AFNet-M (MA + IWC)",
}


def collect(root: Path) -> tuple[dict[str, list[float]], dict[str, dict], list[str]]:
    """Test accuracies per mode, one model config per mode, and the run folders lacking results."""
    accuracies: dict[str, list[float]] = defaultdict(list)
    configs: dict[str, dict] = {}
    missing = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            data = json.loads((run / "results.json").read_text())
            mode, accuracy = data["model_config"]["mode"], data["accuracy"]["pooled"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            accuracy = None
        if accuracy is None:  # crashed, unfinished, or a final run without a test set
            missing.append(run.name)
            continue
        accuracies[mode].append(float(accuracy))
        configs[mode] = data["model_config"]
    return accuracies, configs, missing


def table(root: Path) -> str:
    accuracies, configs, missing = collect(root)
    rows = ["| model | test accuracy (mean ± std) | seeds | parameters |", "|---|---|---|---|"]
    for mode in MODES:
        if mode not in accuracies:
            continue
        stats = summarize(accuracies[mode])
        params = count_parameters(build_model(AFNetConfig.from_dict(configs[mode])))
        rows.append(f"| {MODE_TITLES[mode]} | {100 * stats['mean']:.1f} ± {100 * stats['std']:.1f} % "
                    f"| {stats['n']} | {params / 1e6:.2f} M |")
    if missing:
        rows.append(f"\nruns without results: {', '.join(missing)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise ablation runs as a table.")
    parser.add_argument("root", type=Path, help="folder holding one run folder per mode and seed")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"ablation: {args.root}: no such folder", file=sys.stderr)
        return 2
    print(table(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
