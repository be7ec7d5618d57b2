r"""Accuracy against measured latency from a channels result file: one panel per model, one line per method.

Reads the ``summary`` that ``benchmarks/channels.py`` writes into its result JSON (per model, method and
target: the mean and sd over seeds of the test accuracy and of the batch-64 latency as a fraction of the
dense model's) and draws, per model, x = that latency, y = that accuracy with the sd over seeds as error
bars (both axes), one line per method joining its budgets (a single budget is a marker), dense as a marker
at (1, acc) and a dotted horizontal line. Every number comes from the file; methods are whatever the rows
hold (a new method gets a new colour; the same method has the same colour in every panel).

The README's shapes tables and plot (``benchmarks/results/channels-shapes.{json,md,png}``) are the merge of
the per-run files of the same protocol (8 epochs, 5,000 training images, difficulty 0); add new per-run files
to the list and rerun (the ``rm``: the merge keeps rows already in ``--out``; a row of the same model, seed,
method and target in two files: the later file's wins; the dense rows of one model and seed agree across
these files but for the absolute ms, which the ratios divide out)::

    rm -f benchmarks/results/channels-shapes.json
    python benchmarks/channels.py --out channels-shapes --plot --merge \
        benchmarks/results/channels-shapes-r18c-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r18-taylor-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r18-taylor-s0-nocomp.json \
        benchmarks/results/channels-shapes-r18-nocomp-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r18-latency-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r18-latency-q-s{3,4}.json \
        benchmarks/results/channels-shapes-r18-025-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r50-adamw-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r50-adamw-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-effb0-zi-s{0,1,2}.json \
        benchmarks/results/channels-shapes-mbv3-s{0,1,2}.json \
        benchmarks/results/channels-shapes-regnety-adamw-s{0,1,2}.json \
        benchmarks/results/channels-shapes-convnext-wu-s{0,1,2}.json \
        benchmarks/results/channels-shapes-convnext-025-s{0,1,2}.json \
        benchmarks/results/channels-shapes-mbv3-025-s{0,1,2}.json \
        benchmarks/results/channels-shapes-vit-s{0,1,2}.json \
        benchmarks/results/channels-shapes-vit-025-s{0,1,2}.json \
        benchmarks/results/channels-shapes-vit-025-tp-s{0,2}.json \
        benchmarks/results/channels-shapes-effb0-025-s{0,1,2}.json \
        benchmarks/results/channels-shapes-convnext-025-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-vit-025-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-r18-latency-ew-s{3,4,5,6,7,8,9,10}.json \
        benchmarks/results/channels-shapes-r18-flops-s{3,4,5,6,7,8,9,10}.json \
        benchmarks/results/channels-shapes-effb0-flops-s{3,4,5}.json \
        benchmarks/results/channels-shapes-mbv3-025-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-regnety-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-convnext-05-ew-s{0,1,2}.json \
        benchmarks/results/channels-shapes-vit-05-ew-s{0,1,2}.json
    python benchmarks/readme_tables.py   # the README's blocks from the new file

(not ``channels-shapes-effb0-s0.json``: timm's init, before the mobile recipe; not
``channels-shapes-r50-s0.json``: resnet50 with SGD (dense 0.405), before its AdamW recipe; not
``channels-shapes-regnety-s0.json``: SGD, before regnety_002's AdamW recipe (dense 0.2355); not
``channels-shapes-convnext-s0.json``: convnext_atto with AdamW and 2x2 patches but no warm-up, dense at 0.153
(near chance: no comparison); not ``channels-shapes-r18-latency-s3.json``: timed on a machine loaded 4x (the
callback measured 0.497, torch-pruning's match 0.621 and the final timing 0.528 for the same model); not
``channels-shapes-r18b-*``: GroupLasso's old ``lam``; not ``channels-shapes-r18-taylor8-*``: an ablation of 8
calibration batches on seeds 0-1, in ``channels-shapes-r18-taylor.md``; not ``channels-shapes-r18-ew-s*``:
resnet18's seeds 0-2 on a later machine, whose dense models differ from the merged seeds 0-2 (its seeds 3-7,
``-r18-latency-q-s{3,4}``, ``-r18-latency-ew-*`` and ``-r18-flops-*``, all come from that later machine); not
the already merged ``channels-shapes-r18c.json`` and ``-r18-taylor.json``;
``channels-shapes-vit-025-tp-s{0,2}.json`` come after ``-vit-025-s{0,2}.json``: their torch-pruning rows
replace those runs' failures, from before its bisection took a ratio that breaks its ViT as too much.
mobilenetv3's dense rows differ between its 0.5 runs, made on an earlier machine (mean 0.9027), and its 0.25
runs (0.9142): the table shows the later ones; the paired differences to torch-pruning are within one run
either way. efficientnet_b0 likewise (dense 0.8217 in its 0.5 runs, 0.7990 in its 0.25 runs); those ran three
processes to the two cores: their batch-64 latencies are noisier than the others'; so do
``-r18-flops-s{3,4,5,6,7}`` and ``-effb0-flops-s{3,4,5}`` (up to four processes), on the later machine, and
``-r18-latency-ew-s{8,9,10}`` and ``-r18-flops-s{8,9,10}`` (three runs beside two coverage runs and tests:
five or more processes; each latency a ratio to its dense model timed in the same interleaved call);
``-r18-flops-s{8,9,10}`` ran at 26c180f, whose one-shot plans give back the most important units where the
last unit taken overshoots a FLOPs target (``core/allocation.py``): ours land at 0.499-0.500 of the FLOPs
there, at 0.48-0.50 on the earlier seeds.)

Usage, for a result file written without ``--plot``::

    python benchmarks/channels_plot.py benchmarks/results/channels-shapes.json   # writes channels-shapes.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# the method names the rows are told apart by: channels.py writes them, this plot and readme_tables.py read
# them (neither imports channels.py, which imports torch and timm)
DENSE = "dense"
#: torch-pruning at the same FLOPs as ours
PEER = "torch-pruning"
#: torch-pruning pruned to the latency one of our latency-target rows measured; matched to a row of another
#: criterion than the default it is named after it, ``torch-pruning (equal latency to taylor_elementwise,
#: compensate=False)`` (``channels.latency_tp_method``)
PEER_AT_LATENCY = "torch-pruning (equal latency)"


def is_peer_at_latency(method: str) -> bool:
    """A torch-pruning row at equal latency, under either name."""
    return method == PEER_AT_LATENCY or method.startswith(PEER_AT_LATENCY[:-1] + " to ")


MARKERS = "o^vP<>X*hdp"  # (no square: torch-pruning's)


def _sd(value: Any) -> float:
    """An sd from the summary (NaN, or absent, with one seed) as an error-bar length."""
    return 0.0 if value is None or value != value else float(value)


def _seeds(entries: list[dict[str, Any]]) -> str:
    sets = {tuple(e["seeds"]) for e in entries}
    every = sorted({s for e in entries for s in e["seeds"]})
    text = ("seed " if len(every) == 1 else "seeds ") + ",".join(map(str, every))
    return text + (" (fewer for some methods)" if len(sets) > 1 else "")


def _targets(entries: list[dict[str, Any]]) -> str:
    """``FLOPs target 0.5``, ``FLOPs targets 0.5, 0.25; latency target 0.5`` (``--latency-targets`` rows)."""
    parts = []
    for kind, label in (("flops", "FLOPs"), ("latency", "latency")):
        budgets = sorted({e["target"] for e in entries if e["method"] != DENSE
                          and e.get("target_kind", "flops") == kind}, reverse=True)
        if budgets:
            listed = ", ".join(f"{t:g}" for t in budgets)
            parts.append(f"{label} target{'s' if len(budgets) > 1 else ''} {listed}")
    return "; ".join(parts)


def plot(entries: list[dict[str, Any]], path: Path | str) -> Path:
    """Write the figure of ``entries`` (``channels.summary`` rows) to ``path`` (PNG); returns the path.

    Entries without ``latency_b64`` (failed or untimed runs) are left out: they have no x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [e for e in entries if e.get("latency_b64") is not None]
    models = list(dict.fromkeys(e["model"] for e in timed))
    if not models:
        raise ValueError("no entry with a measured latency_b64 to plot")
    methods = sorted({e["method"] for e in timed} - {DENSE, PEER})
    peers = [m for m in methods if is_peer_at_latency(m)]  # torch-pruning at equal latency: reds, dashed
    ours = [m for m in methods if m not in peers]
    tab20 = plt.get_cmap("tab20").colors  # (the strong shades first, then the light ones; no red, no grey)
    palette = [tab20[i] for i in (0, 2, 4, 8, 10, 12, 16, 18, 1, 3, 5, 9, 11, 13, 17, 19)]
    reds = ["darkred", "salmon", "firebrick"]
    style = {PEER: {"color": "tab:red", "marker": "s", "linestyle": "--"}}
    style.update({m: {"color": reds[i % len(reds)], "marker": "s", "linestyle": "--"}
                  for i, m in enumerate(peers)})
    style.update({m: {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                      "linestyle": "-"} for i, m in enumerate(ours)})
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        mine = [e for e in timed if e["model"] == model]
        for e in (e for e in mine if e["method"] == DENSE):
            ax.axhline(e["acc"], color="0.5", linestyle=":", linewidth=1)
            ax.errorbar([e["latency_b64"]], [e["acc"]], yerr=[_sd(e.get("acc_sd"))], color="0.3", marker="D",
                        linestyle="none", capsize=3, label=DENSE)
        for method in [PEER, *methods]:
            points = sorted((e for e in mine if e["method"] == method), key=lambda e: e["latency_b64"])
            if not points:
                continue
            ax.errorbar([e["latency_b64"] for e in points], [e["acc"] for e in points],
                        xerr=[_sd(e.get("latency_b64_sd")) for e in points],
                        yerr=[_sd(e.get("acc_sd")) for e in points], capsize=3, markersize=6,
                        elinewidth=0.8, label=method, **style[method])
        ax.set_title(f"{model}\n{_seeds(mine)}; {_targets(mine)}", fontsize=9)
        ax.set_xlabel("batch-64 latency / dense (1 CPU thread)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 3), fontsize=8,
               frameon=False)
    fig.suptitle("Channel pruning on lp.ShapesDataModule: accuracy against measured latency"
                 " (mean ± sd over seeds)", fontsize=10)
    legend_rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, 0.045 * legend_rows / rows + 0.01, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="a result JSON of benchmarks/channels.py")
    parser.add_argument("--out", type=Path, default=None, help="default: the result's path with .png")
    args = parser.parse_args(argv)
    data = json.loads(args.result.read_text(encoding="utf-8"))
    print(f"wrote {plot(data['summary'], args.out or args.result.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
