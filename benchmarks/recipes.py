"""Run the digits recipes as a user would (``lightning-prune fit --config ...``), record what they end with.

For each recipe: the final test accuracy (the CLI's test after fit), the parameters of the final model, its
non-zero parameters and the sparsity of the targeted weights (``lp.sparsity_report``), its FLOPs at 32x32
(torch-pruning's ``count_ops_and_params``), and the wall time of the fit. The README's recipe numbers come
from the result file.

Usage::

    python benchmarks/recipes.py                                   # every recipe in recipes/digits
    python benchmarks/recipes.py recipes/digits/group_lasso.yaml   # some of them (merged into the results)

Writes ``benchmarks/results/recipes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch_pruning.utils import count_ops_and_params  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.cli import run as run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recipes"


def run(recipe: Path) -> dict[str, Any]:
    started = time.perf_counter()
    cli = run_cli(["fit", "--config", str(recipe)])
    wall = time.perf_counter() - started
    model = cli.model
    report = lp.sparsity_report(model)
    net = getattr(model, "model", model)
    flops, params = count_ops_and_params(net.eval(), torch.randn(1, 3, 32, 32))
    return {"recipe": str(recipe.relative_to(ROOT)),
            "test_acc": float(cli.trainer.callback_metrics["test/acc"]), "params": float(params),
            "nonzero_params": float(report.nonzero_params), "sparsity": float(report.sparsity),
            "flops": float(flops), "fit_and_test_s": wall}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["Digits, 32x32, seed 0 (each recipe's own settings), on the shared 2-core CPU.", "",
             "| recipe | test acc | params | non-zero params | sparsity of targeted weights | MFLOPs"
             " | fit + test s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['recipe']}` | {r['test_acc']:.4f} | {r['params'] / 1e6:.2f} M |"
                     f" {r['nonzero_params'] / 1e6:.2f} M | {r['sparsity']:.1%} | {r['flops'] / 1e6:.1f} |"
                     f" {r['fit_and_test_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    args = parser.parse_args(argv)
    recipes = [p.resolve() for p in args.recipes] or sorted((ROOT / "recipes" / "digits").glob("*.yaml"))
    path = RESULTS.with_suffix(".json")
    previous = {r["recipe"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    for recipe in recipes:
        row = run(recipe)
        previous[row["recipe"]] = row
        print(json.dumps(row), flush=True)
    rows = [previous[k] for k in sorted(previous)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    RESULTS.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
