"""How much of each timm family the channel groups reach, and whether removing them is exact.

For every family (random init, ``num_classes=10``, a small input):
:func:`lightning_prune.graph.analyse_channels` (its wall time), the **coverage** (the fraction of the
conv/linear weight elements, classifier excluded, whose output channels sit in a removable group), the number
of groups and of units by kind, the skipped groups with their reasons; then a random 40% of every group's
units is removed and checked:

* **exact**: the masked model (zeros at the readers, LayerNorm statistics over the kept channels) equals the
  physically sliced one within 1e-4 relative (float32);
* **reload**: ``save_compressed`` -> ``load_compressed`` onto a fresh ``timm.create_model`` gives the same
  outputs;
* **trace** / **export**: ``torch.jit.trace`` and ``torch.export.export`` accept the compressed model (a plain
  module: no hooks, no wrappers).

Usage::

    python benchmarks/timm_coverage.py                 # the sweep (about 10 minutes on 2 CPU cores)
    python benchmarks/timm_coverage.py --models resnet18 vit_tiny_patch16_224

Writes ``benchmarks/results/timm_coverage.json`` (and ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1]))

import lightning_prune as lp  # noqa: E402
from lightning_prune.graph import (  # noqa: E402
    analyse_channels,
    masked_and_sliced,
)

# (model, create kwargs, input side): the smallest variant of each family at a small input
SWEEP = [
    ("resnet18", {}, 64), ("resnet50", {}, 64), ("resnext26ts", {}, 64), ("seresnext26d_32x4d", {}, 64),
    ("resnetv2_50", {}, 64), ("regnetx_002", {}, 64), ("regnety_002", {}, 64), ("regnetz_b16", {}, 64),
    ("efficientnet_b0", {}, 64), ("mobilenetv1_100", {}, 64), ("mobilenetv2_050", {}, 64),
    ("mobilenetv3_small_100", {}, 64), ("mobilenetv4_conv_small", {}, 64), ("mnasnet_small", {}, 64),
    ("fbnetc_100", {}, 64), ("hardcorenas_a", {}, 64), ("tinynet_e", {}, 64), ("lcnet_050", {}, 64),
    ("ghostnet_100", {}, 64), ("convnext_atto", {}, 64), ("convnextv2_atto", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64), ("deit3_small_patch16_224", {"img_size": 64}, 64),
    ("mobilevit_xxs", {}, 64), ("efficientvit_b0", {}, 64), ("efficientformer_l1", {}, 224),
    ("densenet121", {}, 64), ("dla34", {}, 64), ("hrnet_w18_small", {}, 64), ("repvgg_a0", {}, 64),
    ("mobileone_s0", {}, 64), ("hgnetv2_b0", {}, 64), ("ese_vovnet19b_dw", {}, 64), ("vgg11", {}, 64),
    ("xception41", {}, 64), ("selecsls42b", {}, 64), ("gernet_s", {}, 64), ("darknet17", {}, 64),
    ("convmixer_768_32", {}, 64), ("tresnet_m", {}, 64),
]
# families tried whose coverage stays below the goal, reported with the structures that block them
SHORT = [
    ("rexnet_100", {}, 64), ("cspresnet50", {}, 64), ("levit_128s", {}, 224), ("res2net50_14w_8s", {}, 64),
    ("mixnet_s", {}, 64), ("edgenext_xx_small", {}, 64), ("fastvit_t8", {}, 64), ("nf_resnet26", {}, 64),
    ("swin_tiny_patch4_window7_224", {}, 224), ("mambaout_femto", {}, 64), ("poolformerv2_s12", {}, 64),
]


def _removed(groups, seed: int = 0, share: float = 0.4) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: sorted(torch.randperm(g.size, generator=gen)
                           [:max(1, min(g.size - 1, int(g.size * share)))].tolist()) for g in groups}


def measure(name: str, kwargs: dict, side: int, export: bool = True) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    analysis = analyse_channels(model, x)
    seconds = time.perf_counter() - start
    reasons: dict[str, int] = {}
    for why in analysis.skipped.values():
        if why != "no layer reads these channels (model output)":
            why = re.sub(r"`[^`]*`", "`…`", why)  # one line per kind of reason, not per layer
            reasons[why] = reasons.get(why, 0) + 1
    row = {"model": name, "input": side, "seconds": round(seconds, 2),
           "coverage": round(analysis.coverage, 4), "groups": len(analysis.groups), "units": {},
           "skipped": reasons}
    for g in analysis.groups:
        row["units"][g.unit] = row["units"].get(g.unit, 0) + g.size
    if not analysis.groups:
        row.update(exact=None, reload=None, trace=None, export=None)
        return row
    removed = _removed(analysis.groups)
    masked, small, sliced = masked_and_sliced(model, x, analysis.groups, removed, seed=3, dtype=torch.float32)
    error = float((masked - sliced).abs().max() / masked.abs().max().clamp_min(1e-12))
    row["max_rel_error"] = error
    row["exact"] = error <= 1e-4
    row["params_ratio"] = (sum(p.numel() for p in small.parameters())
                           / sum(p.numel() for p in model.parameters()))
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_compressed(small, Path(tmp) / "small.pt")
        fresh = lp.load_compressed(Path(tmp) / "small.pt",
                                   timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval())
    with torch.no_grad():
        row["reload"] = bool(torch.allclose(fresh(x), sliced, atol=1e-5, rtol=1e-5))
        try:
            traced = torch.jit.trace(copy.deepcopy(small), x, check_trace=False)
            row["trace"] = bool(torch.allclose(traced(x), sliced, atol=1e-4, rtol=1e-4))
        except Exception as err:  # noqa: BLE001 - report, do not stop the sweep
            row["trace"] = f"{type(err).__name__}: {str(err)[:80]}"
        if export:
            try:
                exported = torch.export.export(small, (x,))
                row["export"] = bool(torch.allclose(exported.module()(x), sliced, atol=1e-4, rtol=1e-4))
            except Exception as err:  # noqa: BLE001
                row["export"] = f"{type(err).__name__}: {str(err)[:80]}"
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | input | coverage | groups | units (kind: count) | skipped groups (why)"
             " | exact (max rel. error) | reload | trace | export | analysis s |",
             "|---|---:|---:|---:|---|---|---|---|---|---|---:|"]
    for r in rows:
        units = ", ".join(f"{k}: {v}" for k, v in sorted(r["units"].items()))
        skipped = "; ".join(f"{n}× {why}" for why, n in r["skipped"].items()) or "–"
        exact = ("–" if r.get("exact") is None
                 else f"{'yes' if r['exact'] else 'NO'} ({r['max_rel_error']:.1e})")
        flags = ["–" if r.get(k) is None
                 else ("yes" if r[k] is True else ("no" if r[k] is False else str(r[k])))
                 for k in ("reload", "trace", "export")]
        lines.append(f"| `{r['model']}` | {r['input']} | {r['coverage']:.3f} | {r['groups']} | {units or '–'}"
                     f" | {skipped} | {exact} | {' | '.join(flags)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="a subset (names from the sweep or the short list)")
    parser.add_argument("--no-export", action="store_true", help="skip torch.export (the slowest check)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    stem = f"timm_coverage{'-' + args.tag if args.tag else ''}"
    if args.render:
        payload = json.loads((RESULTS / f"{stem}.json").read_text())
        for row in payload["rows"]:
            merged: dict[str, int] = {}
            for why, n in row.get("skipped", {}).items():
                key = re.sub(r"`[^`]*`", "`…`", why)
                merged[key] = merged.get(key, 0) + n
            row["skipped"] = merged
        (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
        (RESULTS / f"{stem}.md").write_text(render(payload["summary"], payload["rows"]))
        return
    torch.set_num_threads(1)
    known = {n: (n, k, s) for n, k, s in SWEEP + SHORT}
    chosen = [known.get(m, (m, {}, 64)) for m in args.models] if args.models else SWEEP + SHORT
    sweep = {n for n, _, _ in SWEEP}
    rows = []
    for name, kwargs, side in chosen:
        try:
            row = measure(name, kwargs, side, export=not args.no_export)
        except Exception as err:  # noqa: BLE001
            row = {"model": name, "input": side, "error": f"{type(err).__name__}: {err}"[:200]}
        row["in_sweep"] = name in sweep
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if r["in_sweep"] and "coverage" in r]
    summary = {
        "families": len(ok),
        "mean_coverage": round(sum(r["coverage"] for r in ok) / max(len(ok), 1), 4),
        "min_coverage": min((r["coverage"] for r in ok), default=0.0),
        "all_exact": all(r.get("exact") for r in ok),
        "max_analysis_s": max((r["seconds"] for r in ok), default=0.0),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(render(summary, rows))
    print(json.dumps(summary))


def render(summary: dict, rows: list[dict]) -> str:
    body = [f"Sweep: {summary['families']} families, mean coverage {summary['mean_coverage']:.3f},"
            f" lowest {summary['min_coverage']:.3f}, all exact: {summary['all_exact']},"
            f" slowest analysis {summary['max_analysis_s']:.1f} s.", "",
            table([r for r in rows if r["in_sweep"] and "coverage" in r]), "",
            "Families tried that stay below the goal:", "",
            table([r for r in rows if not r["in_sweep"] and "coverage" in r])]
    errors = [r for r in rows if "error" in r]
    if errors:
        body += ["", "Errors:", ""] + [f"- `{r['model']}`: {r['error']}" for r in errors]
    return "\n".join(body) + "\n"


if __name__ == "__main__":
    main()
