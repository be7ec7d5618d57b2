"""The README's result tables, rendered from the benchmark result files, so they cannot go stale.

Every results table in ``README.md`` sits between two marker lines::

    <!-- results: benchmarks/results/NAME.md -->
    | ... the table ... |
    <!-- /results -->

The start line names the result file the table comes from. ``NAME.md#2`` takes the second table of that
file; ``NAME.md#KEY`` (a word) a table this module renders differently from the file. What fills the block:

* a renderer registered in :data:`RENDERERS` under ``NAME`` or ``NAME#KEY``: it reads ``NAME.json`` (the
  numbers the benchmark wrote) and returns the table — used where the README shows a digest of a larger
  result (fewer columns, selected rows);
* otherwise the table (first, or ``#N``) of ``NAME.md`` exactly as the benchmark wrote it (the benchmark
  renders its ``.md`` from the same numbers as its ``.json``).

One more kind of block holds the output of a command that imports nothing heavy::

    <!-- output: lightning-prune list -->

Usage::

    python benchmarks/readme_tables.py           # rewrite the README's blocks from the result files
    python benchmarks/readme_tables.py --check   # exit 1 and name the stale blocks (what the test runs)

A benchmark that adds a README table writes ``NAME.json`` and ``NAME.md``; the README gets the two marker
lines (with nothing or the old table between them) and this script fills them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (benchmarks/ is not a package)
from channels_plot import DENSE, PEER, PEER_AT_LATENCY, is_peer_at_latency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

BLOCK = re.compile(
    r"^<!-- (?P<kind>results|output): (?P<ref>[^\n]*?) -->\n(?P<body>.*?)^<!-- /(?P=kind) -->$",
    re.M | re.S)


class StaleError(Exception):
    """A block cannot be rendered: its result file or its table is missing."""


# ---------------------------------------------------------------------------------------------- helpers


def _load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise StaleError(f"{path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def _table(rows: list[list[str]], align: str) -> str:
    """A markdown table: ``rows[0]`` is the header, ``align`` one character per column (``l`` or ``r``)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(rows[0]) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def tables_of(markdown: str) -> list[str]:
    """The tables of a markdown text, in order (consecutive lines starting with ``|``)."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return tables


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _short_error(value: float) -> str:
    return f"{value:.0e}"


def _units(units: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in units.items()) or "–"


def _skipped(skipped: dict[str, int]) -> str:
    return "; ".join(f"{count}× {why}" for why, count in skipped.items()) or "–"


# -------------------------------------------------------------------------------------------- renderers


def _flag(value: Any) -> str:
    return "–" if value is None else "yes" if value is True else "NO" if value is False else str(value)


def _peer(value: Any) -> str:
    """torch-pruning's column: a number, yes, or the exception's type (its message is in the .md)."""
    if isinstance(value, str) and ":" in value:
        return value.split(":")[0]
    return _flag(value)


def _short_reasons(skipped: dict[str, int], width: int = 140) -> str:
    """Skip reasons for a table cell: numbers and quoted shapes elided so that one kind of reason is one
    entry, each cut to ``width`` characters (the result file keeps them whole)."""
    merged: dict[str, int] = {}
    for why, count in skipped.items():
        why = re.sub(r"'\[[^\]]*\]'", "'[…]'", why)
        why = re.sub(r"\b\d+(\.\d+)?(e[-+]\d+)?\b", "N", why)
        why = why if len(why) <= width else why[:width - 1] + "…"
        merged[why] = merged.get(why, 0) + count
    return _skipped(merged)


def render_coverage_list(data: dict[str, Any], which: str) -> str:
    """One list of the operator-graph sweep: reach, skip reasons, exactness, analysis CPU time, the peer."""
    rows = [["model", "input", "coverage", "units", "skipped groups (why)", "exact", "analysis CPU s",
             "0.5 reached", "export", "torch-pruning coverage", "its 50% step runs"]]
    for r in data["rows"]:
        if r.get("list") != which:
            continue
        if "coverage" not in r:
            rows.append([f"`{r['model']}`", str(r["input"]), "–", "–", r.get("error", "–")] + ["–"] * 4
                        + [_peer(r.get("tp_coverage")), _peer(r.get("tp_step_runs"))])
            continue
        exact = "–" if r.get("exact") is None else (
            f"{'yes' if r['exact'] else 'NO'} ({_short_error(r['max_rel_error'])})")
        rows.append([f"`{r['model']}`", str(r["input"]), f"{r['coverage']:.3f}", _units(r["units"]),
                     _short_reasons(r["skipped"]), exact, f"{r.get('cpu_s', r['seconds']):.1f}",
                     _flag(r.get("reaches_half")), _flag(r.get("export")), _peer(r.get("tp_coverage")),
                     _peer(r.get("tp_step_runs"))])
    return _table(rows, "lrrlllrllll")


def render_shrink_while_training(data: dict[str, Any]) -> str:
    names = {"in fit": "inside the fit, at finalisation", "at the end": "at the end"}
    rows = [["compressed", "ms per step before", "ms per step after", "fit (thread s)", "test acc"]]
    for r in data["runs"]:
        rows.append([names.get(r["run"], r["run"]), f"{r['ms_before']:.0f}", f"{r['ms_after']:.0f}",
                     f"{r['thread_s']:.0f}", f"{r['acc']:.4f}"])
    return _table(rows, "lrrrr")


def render_channels_l0(data: dict[str, Any]) -> str:
    by: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        by.setdefault((r["method"], r["lam"]), []).append(r)
    dense = by[("dense", None)]
    rows = [["method", "channels removed", "test acc", "params", "FLOPs"]]

    def cells(runs: list[dict[str, Any]]) -> list[str]:
        mean, sd = _mean_sd([r["acc"] for r in runs])
        acc = f"{mean:.4f} ± {sd:.4f}" if mean > 0.9 else f"{mean:.2f} ± {sd:.2f}"
        ratio = [f"{statistics.fmean(r[k] for r in runs):.2f}×" if k in runs[0] else "" for k in
                 ("params_ratio", "flops_ratio")]
        return [f"{statistics.fmean(r['removed'] for r in runs):.1%}", acc, *ratio]

    rows.append(["dense", "0%", cells(dense)[1], "1.00×", "1.00×"])
    for lam in data["config"]["lams"]:
        rows.append([f"L0, λ {lam:.0e}".replace("e-0", "e-"), *cells(by[("l0", lam)])])
    gl = data["config"]["gl_lam"]
    rows.append([f"group-LASSO, λ {gl:.0e}".replace("e-0", "e-"), *cells(by[("group_lasso", gl)])])
    firstk = [lam for lam in data["config"]["lams"] if ("first_k", lam) in by]
    good = [lam for lam in firstk if statistics.fmean(r["acc"] for r in by[("l0", lam)]) > 0.9]
    if good:
        removed = " / ".join(f"{statistics.fmean(r['removed'] for r in by[('first_k', lam)]):.1%}"
                             for lam in good)
        accs = " / ".join(f"{statistics.fmean(r['acc'] for r in by[('first_k', lam)]):.4f}"
                          for lam in good)
        rows.append([f"first k channels at {removed}", "", accs, "", ""])
    return _table(rows, "lrrrr")


LOTTERY_ROUNDS = {"mlp": (0, 8, 12), "test_resnet": (0, 10, 12)}  # the README's rows: dense, 2 sparse rounds
LOTTERY_MODELS = {"mlp": "LeNet-300-100 MLP", "test_resnet": "timm `test_resnet`"}


def render_lottery(data: dict[str, Any]) -> str:
    acc: dict[tuple[str, str, int], list[float]] = {}
    remaining: dict[tuple[str, int], list[float]] = {}
    for run in data["runs"]:
        for r in run["rounds"]:
            acc.setdefault((run["model"], run["variant"], r["round"]), []).append(r["test_acc"])
            if run["variant"] == "ticket":
                remaining.setdefault((run["model"], r["round"]), []).append(r["remaining"])
    rows = [["model", "weights remaining", "ticket (rewound)", "random reinit", "ticket's mask, fresh init"]]
    for model, rounds in LOTTERY_ROUNDS.items():
        for i, rnd in enumerate(rounds):
            cells = [LOTTERY_MODELS.get(model, model) if i == 0 else "",
                     f"{statistics.fmean(remaining[(model, rnd)]):.1%}".replace("100.0%", "100%")]
            for variant in ("ticket", "random", "same_mask"):
                mean = statistics.fmean(acc[(model, variant, rnd)])
                dense = statistics.fmean(acc[(model, variant, 0)])
                cells.append(f"{mean:.3f}" if rnd == 0 else f"{mean:.3f} ({mean / dense:.3f})")
            rows.append(cells)
    return _table(rows, "lrrrr")


REPARAM_ROWS = {  # README row label -> (arch, variant)
    "`reducenet_20` (ReduceNet's block), decay → fused": ("reducenet_20", "decay"),
    "`reducenet_20_act` (one ReLU kept per block), decay → fused": ("reducenet_20_act", "decay"),
    "`reducenet_20_plain`, the deployed shape trained directly": ("reducenet_20", "deploy-depth baseline"),
    "timm `resnet26` bottlenecks, decay → fused": ("resnet26 (bottleneck)", "decay"),
}


def _k(params: int) -> str:
    return f"{params / 1e3:.0f}k" if params >= 3e5 else f"{params / 1e3:.1f}k"


def render_reparam(data: dict[str, Any]) -> str:
    rows = [["model", "layers", "params", "latency b32, fused vs unfused", "test acc"]]
    for label, (arch, variant) in REPARAM_ROWS.items():
        entry = data["archs"][arch][variant]
        if "shape" in entry and "fused" in entry["shape"]:
            unfused, fused = entry["shape"]["unfused"], entry["shape"]["fused"]
            ratio = fused["latency_ms_b32"] / unfused["latency_ms_b32"]
            accuracy = f"{statistics.fmean(entry['acc_fused']):.3f}"
            plain = data["archs"][arch].get("no decay (deep)")
            if plain is not None and arch.startswith("resnet"):
                accuracy += f" ({statistics.fmean(plain['acc']):.3f} without decay)"
            rows.append([label, f"{unfused['layers']} → {fused['layers']}",
                         f"{_k(unfused['params'])} → {_k(fused['params'])}", f"{ratio:.2f}×", accuracy])
        else:
            rows.append([label, str(entry["shape"]["layers"]), _k(entry["shape"]["params"]), "",
                         f"{statistics.fmean(entry['acc']):.3f}"])
    return _table(rows, "lrrrr")


def render_evolution(data: dict[str, Any]) -> str:
    memory = {(m["strategy"], m["population"]): m["added_mib"] for m in data["memory"]}
    pops = sorted({m["population"] for m in data["memory"]})
    model = data["config"].get("memory_model", "resnet18")
    rows = [["", "final val acc", "time of one generation",
             f"peak memory of a generation ({model}), population {pops[0]} → {pops[-1]}"]]
    for key, label in (("sgd", "SGD"), ("select", "SGD + select"), ("es", "SGD + ES")):
        q = data["quality"][key]
        cells = [label, f"{q['final_val_acc_mean']:.4f} ± {q['final_val_acc_std']:.4f}"]
        if q.get("generation_s_median"):
            cells.append(f"{q['generation_s_median']:.1f} s ({q['generation_over_sgd_epoch']:.1f} epochs)")
            cells.append(f"+{memory[(key, pops[0])]:.1f} → +{memory[(key, pops[-1])]:.1f} MiB")
        else:
            cells += ["", ""]
        rows.append(cells)
    return _table(rows, "lrrr")


def _seconds(value: float) -> str:
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{value:.1f} s" if value < 10 else f"{seconds} s"


def render_first_hour(data: dict[str, Any]) -> str:
    rows = [["what", "command", "wall time", "CPU time", "result", "measured"]]

    def when(entry: dict[str, Any]) -> str:
        machine = entry.get("machine", {})
        load = machine.get("load_average_1min")
        return f"{entry.get('measured', '?')}" + (f", load {load:g} on {machine['cpus']} cores"
                                                  if load is not None and machine.get("cpus") else "")
    if "setup" in data:
        s = data["setup"]
        rows.append(["first set-up", "`make setup` (in a fresh clone)", _seconds(s["wall_s"]),
                     _seconds(s["cpu_s"]), f"`.venv` {s['venv_bytes'] / 1e9:.1f} GB (torch {s['torch']})",
                     when(s)])
    if "venv" in data and "setup" not in data:
        v = data["venv"]
        rows.append(["disk of the set-up", "`du -s .venv` after `make setup`", "", "",
                     f"`.venv` {v['venv_bytes'] / 1e9:.1f} GB (torch {v['torch']})", when(v)])
    def demo_result(d: dict[str, Any]) -> str:
        if d.get("test_acc") is None:
            return f"stopped after {_seconds(d.get('stopped_after_s') or d['wall_s'])}, unfinished"
        return f"test accuracy {d['test_acc']:.2%} at {d['sparsity']:.0%} sparsity"

    def threads(d: dict[str, Any]) -> str:
        t = d.get("torch_threads")
        if t is None:
            return ""
        return f" ({t} thread{'' if t == 1 else 's'})" if isinstance(t, int) else f" ({t} threads)"

    for key, what, command in (
            ("demo", "the demo", "`make demo` after set-up"),
            ("busy", "the demo, busy machine", "`make demo` beside two CPU-burning processes"),
            ("demo_default_threads", "the demo, torch's default threads",
             "`make demo ... --torch_threads null`"),
            ("busy_default_threads", "the demo, busy, default threads", "the same, `--torch_threads null`")):
        if key in data:
            d = data[key]
            note = f"; {d['note']}" if d.get("note") else ""
            rows.append([what, command + threads(d), _seconds(d["wall_s"]), _seconds(d["cpu_s"]),
                         demo_result(d), when(d) + note])
    if "test" in data:
        t = data["test"]
        rows.append(["the suite", "`make test`", _seconds(t["wall_s"]), "", f"{t['tests']} tests pass",
                     t.get("source") or t.get("measured", "?")])
    if "list" in data:
        lst = data["list"]
        for key, label in (("list", "`lightning-prune list`"), ("help", "`lightning-prune --help`"),
                           ("list --check", "`lightning-prune list --check` (imports every class)")):
            if key in lst:
                e = lst[key]
                result = f"{lst['list']['rows']} callbacks" if key == "list" else ""
                if key == "list" and not lst["list"].get("imports_torch", True):
                    result += ", torch not imported"
                rows.append(["what is installed" if key == "list" else "", label,
                             _seconds(e["median_wall_s"]), _seconds(e["median_cpu_s"]), result,
                             f"median of {e['runs']}" + (f", {when(lst)}" if key == "list" else "")])
    return _table(rows, "llrrll")


DENSE_TARGET = ("flops", 1.0)


def _seed_list(seeds: list[int] | tuple[int, ...]) -> str:
    return ",".join(map(str, seeds))


def _other_seeds(these: list[int], seeds: list[int]) -> str:
    """`` (seed 0)``, `` (seeds 0,1)``: ``these`` named where they are not the row's ``seeds``."""
    return "" if these == seeds else f" (seed{'s' if len(these) > 1 else ''} {_seed_list(these)})"


def _accuracy(entry: dict[str, Any], seeds: list[int]) -> str:
    """``mean ± sd`` of a ``channels.summary`` entry; its seeds named where they are not ``seeds``, and its
    FLOPs where a FLOPs budget was missed by more than a tenth (torch-pruning: 0.57 on regnety_002)."""
    sd = entry.get("acc_sd")
    text = f"{entry['acc']:.4f}" + (f" ± {sd:.4f}" if sd is not None and sd == sd else "")
    budget, flops = entry.get("target"), entry.get("flops")
    missed = (entry.get("target_kind", "flops") == "flops" and isinstance(budget, (int, float))
              and isinstance(flops, (int, float)) and flops > 1.1 * budget)
    return text + _other_seeds(entry["seeds"], seeds) + (f" (at FLOPs {flops:.2f})" if missed else "")


def _channels_entries(data: dict[str, Any]) -> tuple[list[str], dict[str, list[int]], dict[tuple, Any]]:
    """The models (in the file's order), each model's dense seeds, the summary by (model, method, target):
    a target is ``(kind, fraction)``, kind ``"flops"`` or ``"latency"`` (``--latency-targets`` rows)."""
    entries = {(e["model"], e["method"], (e.get("target_kind", "flops"), e["target"])): e
               for e in data["summary"]}
    models = list(dict.fromkeys(e["model"] for e in data["summary"]))
    seeds = {m: (entries.get((m, DENSE, DENSE_TARGET)) or {}).get("seeds", []) for m in models}
    return models, seeds, entries


def _target(target: tuple[str, Any]) -> str:
    """``1`` (dense), ``FLOPs 0.5``, ``latency 0.5``."""
    kind, fraction = target
    text = f"{fraction:g}" if isinstance(fraction, (int, float)) else str(fraction)
    return text if target == DENSE_TARGET else f"{'FLOPs' if kind == 'flops' else kind} {text}"


def _by_target(target: tuple[str, Any]) -> tuple:
    """FLOPs budgets in decreasing order, then latency targets (a non-numeric target, should a benchmark
    write one, after its kind's)."""
    kind, fraction = target
    numeric = isinstance(fraction, (int, float))
    return (kind != "flops", kind) + ((0, -fraction) if numeric else (1, str(fraction)))


def _ours(method: str) -> bool:
    return method not in (DENSE, PEER) and not is_peer_at_latency(method)


def _channels_peer(entries: dict[tuple, Any], model: str, target: tuple[str, Any],
                   best: dict[str, Any] | None) -> dict[str, Any] | None:
    """torch-pruning's entry for a target: at the same FLOPs, or at the latency that ``best`` (our row)
    measured -- the one matched to it (``matched`` in ``channels.summary``), else the plain one."""
    if target[0] != "latency":
        return entries.get((model, PEER, target))
    peers = [e for (m, method, t), e in entries.items()
             if m == model and t == target and is_peer_at_latency(method)]
    if best is not None:
        matched = [e for e in peers if e.get("matched") == [best["method"]]]
        if matched:
            return matched[0]
    return entries.get((model, PEER_AT_LATENCY, target))


def _best_rank(entry: dict[str, Any]) -> tuple[int, float]:
    """What the best of ours maximises: the paired difference to torch-pruning where there is one (at a
    FLOPs budget, where every method meets the same torch-pruning rows, the same order as the mean accuracy;
    at a latency target each method has its own match, and methods run on different seeds compare by their
    pairs, not by the seeds' dense models), else the mean accuracy (after every paired one)."""
    paired = entry.get("minus_tp")
    return (1, paired) if paired is not None else (0, entry["acc"])


def render_channels_headline(data: dict[str, Any]) -> str:
    """Per model and target: dense, torch-pruning, the best of our methods and its paired difference to
    torch-pruning (the same seeds on both sides), from ``channels.py``'s summary. The best: among our methods
    run on the most seeds, the largest paired difference to torch-pruning (:func:`_best_rank`)."""
    models, seeds, entries = _channels_entries(data)
    rows = [["model", "target", "seeds", "dense", "torch-pruning", "best of ours", "its method",
             "best of ours - torch-pruning (paired)"]]
    for model in models:
        dense = entries.get((model, DENSE, DENSE_TARGET))
        targets = sorted({t for (m, _, t) in entries if m == model and t != DENSE_TARGET}, key=_by_target)
        for target in targets:
            mine = [e for (m, _, t), e in entries.items() if m == model and t == target]
            ours = [e for e in mine if _ours(e["method"])]
            most = max((len(e["seeds"]) for e in ours), default=0)  # (a one-seed lucky draw is no best)
            best = max((e for e in ours if len(e["seeds"]) == most), key=_best_rank, default=None)
            peer = _channels_peer(entries, model, target, best)
            paired = "–"
            if best is not None and best.get("minus_tp") is not None:
                n, sd = best.get("minus_tp_n", 1), best.get("minus_tp_sd")
                both = sorted(set(best["seeds"]) & set(peer["seeds"])) if peer else []
                paired = (f"{best['minus_tp']:+.4f}" + (f" ± {sd:.4f}" if n > 1 and sd == sd else "")
                          + _other_seeds(both, seeds[model]))
            rows.append([f"`{model}`", _target(target), _seed_list(seeds[model]),
                         _accuracy(dense, seeds[model]) if dense else "–",
                         _accuracy(peer, seeds[model]) if peer else "–",
                         _accuracy(best, seeds[model]) if best else "–", best["method"] if best else "–",
                         paired])
    return _table(rows, "lrlrrrlr")


def render_channels_methods(data: dict[str, Any]) -> str:
    """Every method (rows) on every model (columns): mean ± sd of the test accuracy over seeds and the mean
    batch-64 latency as a fraction of dense, from ``channels.py``'s summary."""
    models, seeds, entries = _channels_entries(data)
    methods = sorted({(method, target) for (_, method, target) in entries},
                     key=lambda k: (_by_target(k[1]), k[0] != DENSE, _ours(k[0]), k[0]))
    header = ["method", "target"] + [
        f"`{m}` (seed{'s' if len(seeds[m]) > 1 else ''} {_seed_list(seeds[m])})" for m in models]
    rows = [header]
    for method, target in methods:
        cells = [method, _target(target)]
        for model in models:
            e = entries.get((model, method, target))
            latency = "" if e is None or e.get("latency_b64") is None else f" · {e['latency_b64']:.2f}"
            cells.append("" if e is None else _accuracy(e, seeds[model]) + latency)
        rows.append(cells)
    return _table(rows, "lr" + "r" * len(models))


RENDERERS: dict[str, Callable[[Any], str]] = {
    "timm_coverage-traced#first": lambda data: render_coverage_list(data, "first"),
    "timm_coverage-traced#second": lambda data: render_coverage_list(data, "second"),
    "timm_coverage-traced#third": lambda data: render_coverage_list(data, "third"),
    "shrink_while_training": render_shrink_while_training,
    "channels_l0-6ep-3seeds": render_channels_l0,
    "lottery": render_lottery,
    "reparam": render_reparam,
    "evolution.full": render_evolution,
    "first_hour": render_first_hour,
    "channels-shapes#readme": render_channels_headline,
    "channels-shapes#methods": render_channels_methods,
}


# ----------------------------------------------------------------------------------------------- blocks


def render_block(kind: str, ref: str) -> str:
    """What the block ``<!-- kind: ref -->`` must hold (without a trailing newline)."""
    if kind == "output":
        if ref.strip() != "lightning-prune list":
            raise StaleError(f"no renderer for the output of {ref!r}")
        sys.path.insert(0, str(ROOT))
        from lightning_prune.cli import format_callback_list

        return "```console\n$ lightning-prune list\n" + format_callback_list() + "\n```"
    path, _, key = ref.partition("#")
    match = re.fullmatch(r"benchmarks/results/(?P<name>[\w.\-]+)\.md", path.strip())
    if not match:
        raise StaleError(f"{ref!r} is not benchmarks/results/NAME.md[#N|#KEY]")
    name = match.group("name")
    renderer = RENDERERS.get(f"{name}#{key}" if key else name)
    if renderer is not None:
        return renderer(_load(name))
    if key and not key.isdigit():
        raise StaleError(f"no renderer {name}#{key} in benchmarks/readme_tables.py")
    md = RESULTS / f"{name}.md"
    if not md.exists():
        raise StaleError(f"{md} does not exist")
    tables = tables_of(md.read_text(encoding="utf-8"))
    index = int(key or 1) - 1
    if not 0 <= index < len(tables):
        raise StaleError(f"{md} has {len(tables)} tables, not a table #{index + 1}")
    return tables[index]


def blocks(text: str) -> list[re.Match[str]]:
    return list(BLOCK.finditer(text))


def rendered(text: str) -> str:
    """``text`` with every block refilled."""
    def fill(m: re.Match[str]) -> str:
        return f"<!-- {m['kind']}: {m['ref']} -->\n{render_block(m['kind'], m['ref'])}\n<!-- /{m['kind']} -->"

    return BLOCK.sub(fill, text)


def stale_blocks(text: str) -> list[str]:
    """The refs of the blocks whose content differs from what the result files render."""
    return [m["ref"] for m in blocks(text) if m["body"].rstrip("\n") != render_block(m["kind"], m["ref"])]


def unmarked_tables(text: str) -> list[str]:
    """Start markers with no end marker (a block the script would not see)."""
    starts = re.findall(r"^<!-- (?:results|output): ([^\n]*?) -->$", text, re.M)
    inside = {m["ref"] for m in blocks(text)}
    return [s for s in starts if s not in inside]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    broken = unmarked_tables(text)
    if broken:
        print(f"start markers without `<!-- /results -->`: {broken}", file=sys.stderr)
        return 1
    if args.check:
        stale = stale_blocks(text)
        for ref in stale:
            print(f"stale: {ref}", file=sys.stderr)
        return 1 if stale else 0
    new = rendered(text)
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{len(blocks(new))} blocks in {args.readme}: {'rewritten' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
