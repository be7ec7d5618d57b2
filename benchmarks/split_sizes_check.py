"""Families whose splits have sizes held in attributes (Res2Net, CSP stages): coverage of the analysis and
whether removing 40% of every group at once gives a model that runs (the split-size regression check).

    python benchmarks/split_sizes_check.py   # writes benchmarks/results/split_sizes_check.md
"""

from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch

from lightning_prune.graph import analyse_channels, slice_units

MODELS = ("res2net50_14w_8s", "cspresnet50", "cspdarknet53")
OUT = Path(__file__).parent / "results" / "split_sizes_check.md"


def main() -> None:
    torch.manual_seed(0)
    rows = ["| model | input | coverage | groups | 40% of every group removed |", "|---|---:|---:|---:|---|"]
    for name in MODELS:
        model = timm.create_model(name, num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64)
        analysis = analyse_channels(model, x)
        small = copy.deepcopy(model)
        try:
            removed = {g.name: list(range(int(g.size * 0.4))) for g in analysis.groups}
            slice_units(small, analysis.groups, removed)
            with torch.no_grad():
                small(x)
            runs = "runs"
        except Exception as error:  # noqa: BLE001 - the row says what happened
            runs = f"fails: {type(error).__name__}"
        rows.append(f"| `{name}` | 64 | {analysis.coverage:.3f} | {len(analysis.groups)} | {runs} |")
        print(rows[-1], flush=True)
    OUT.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
