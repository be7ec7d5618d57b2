"""The shapes benchmark's README tables and plot, from hand-made result rows (nothing is trained).

``benchmarks/channels.py``'s ``summary`` (means, sds, paired differences over seeds) feeds
``benchmarks/readme_tables.py``'s two ``channels-shapes`` renderers and ``benchmarks/channels_plot.py``.
"""

from __future__ import annotations

import json

import lightning.pytorch  # noqa: F401  (channels.py's imports, loaded at collection as the suite's other
import pytest
import torch_pruning  # noqa: F401  test modules load theirs: the tests themselves train nothing)

from tests.helpers import benchmark_script


def _row(model, seed, method, target, acc, latency=None):
    row = {"model": model, "seed": seed, "method": method, "target": target, "acc": acc,
           "flops": target, "params": target}
    if latency is not None:
        row["latency_b64"] = latency
    return row


LATENCY_OURS = "ours one-shot (taylor, compensate=False, target_latency)"
ROWS = [
    # model m, seeds 0 and 1 (ours B only seed 0)
    _row("m", 0, "dense", 1.0, 0.80, 1.0), _row("m", 1, "dense", 1.0, 0.82, 1.0),
    _row("m", 0, "torch-pruning", 0.5, 0.85, 0.6), _row("m", 1, "torch-pruning", 0.5, 0.87, 0.7),
    _row("m", 0, "ours A", 0.5, 0.86, 0.5), _row("m", 1, "ours A", 0.5, 0.90, 0.5),
    _row("m", 0, "ours B", 0.5, 0.95, 0.55),
    # model n, seed 0 only, two budgets
    _row("n", 0, "dense", 1.0, 0.70, 1.0),
    _row("n", 0, "torch-pruning", 0.5, 0.72, 0.8), _row("n", 0, "ours A", 0.5, 0.75, 0.7),
    {**_row("n", 0, "torch-pruning", 0.25, 0.66, 0.6), "flops": 0.4},  # its budget missed: its FLOPs said
    _row("n", 0, "ours A", 0.25, 0.64, 0.4),
    # model m at a latency target of 0.5 (the same number as a FLOPs budget: kept apart), torch-pruning at
    # the latency ours measured
    *[{**_row("m", seed, LATENCY_OURS, 0.5, acc, 0.5), "target_kind": "latency"}
      for seed, acc in ((0, 0.84), (1, 0.88))],
    *[{**_row("m", seed, "torch-pruning (equal latency)", 0.5, acc, 0.5), "target_kind": "latency",
       "matched": LATENCY_OURS} for seed, acc in ((0, 0.83), (1, 0.85))],
]


@pytest.fixture
def result(monkeypatch):
    """A result file's content as ``channels.py`` writes it (JSON round trip: NaN sds of one seed)."""
    channels = benchmark_script("channels", monkeypatch)
    return json.loads(json.dumps({"config": {}, "rows": ROWS, "summary": channels.summary(ROWS)}))


def test_the_summary_has_the_mean_latency(result):
    entry = next(e for e in result["summary"] if e["model"] == "m" and e["method"] == "torch-pruning")
    assert entry["latency_b64"] == pytest.approx(0.65)
    assert entry["latency_b64_sd"] == pytest.approx(0.0707107, rel=1e-5)


def test_the_headline_table(result, monkeypatch):
    tables = benchmark_script("readme_tables", monkeypatch)
    lines = tables.RENDERERS["channels-shapes#readme"](result).splitlines()
    assert lines[0] == ("| model | target | seeds | dense | torch-pruning | best of ours | its method"
                        " | best of ours - torch-pruning (paired) |")
    # means and sds over seeds 0,1; the best of ours by mean among those on both seeds (A, not B: 0.95 on
    # seed 0 alone), paired with torch-pruning: 0.01, 0.03
    assert lines[2] == ("| `m` | FLOPs 0.5 | 0,1 | 0.8100 ± 0.0141 | 0.8600 ± 0.0141 | 0.8800 ± 0.0283"
                        " | ours A"
                        " | +0.0200 ± 0.0141 |")
    # one seed: no sd, the seeds column says so; budgets in decreasing order
    assert lines[3] == ("| `m` | latency 0.5 | 0,1 | 0.8100 ± 0.0141 | 0.8400 ± 0.0141 | 0.8600 ± 0.0283"
                        f" | {LATENCY_OURS} | +0.0200 ± 0.0141 |")  # paired with torch-pruning at its latency
    assert lines[4] == "| `n` | FLOPs 0.5 | 0 | 0.7000 | 0.7200 | 0.7500 | ours A | +0.0300 |"
    assert lines[5] == ("| `n` | FLOPs 0.25 | 0 | 0.7000 | 0.6600 (at FLOPs 0.40) | 0.6400 | ours A"
                        " | -0.0200 |")
    assert len(lines) == 6


def test_the_methods_table(result, monkeypatch):
    tables = benchmark_script("readme_tables", monkeypatch)
    lines = tables.RENDERERS["channels-shapes#methods"](result).splitlines()
    assert lines[0] == "| method | target | `m` (seeds 0,1) | `n` (seed 0) |"
    assert lines[2:] == [
        "| dense | 1 | 0.8100 ± 0.0141 · 1.00 | 0.7000 · 1.00 |",
        "| torch-pruning | FLOPs 0.5 | 0.8600 ± 0.0141 · 0.65 | 0.7200 · 0.80 |",
        "| ours A | FLOPs 0.5 | 0.8800 ± 0.0283 · 0.50 | 0.7500 · 0.70 |",
        "| ours B | FLOPs 0.5 | 0.9500 (seed 0) · 0.55 |  |",  # fewer seeds than the model's dense: named
        "| torch-pruning | FLOPs 0.25 |  | 0.6600 (at FLOPs 0.40) · 0.60 |",
        "| ours A | FLOPs 0.25 |  | 0.6400 · 0.40 |",
        "| torch-pruning (equal latency) | latency 0.5 | 0.8400 ± 0.0141 · 0.50 |  |",
        f"| {LATENCY_OURS} | latency 0.5 | 0.8600 ± 0.0283 · 0.50 |  |",
    ]


def test_the_plot_writes_a_png(result, tmp_path, monkeypatch):
    plot = benchmark_script("channels_plot", monkeypatch)
    failed = {"model": "n", "method": "failed", "target": 0.5, "seeds": [0], "acc": 0.1}
    entries = [*result["summary"], failed]
    out = plot.plot(entries, tmp_path / "shapes.png")  # (an entry without a latency has no x: left out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    plot.main([str(path)])
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no entry"):
        plot.plot([e for e in entries if "latency_b64" not in e], tmp_path / "none.png")


def test_torch_pruning_matched_to_two_latency_rows_pairs_each_with_its_own(monkeypatch):
    """``--latency-importance``: a second one-shot criterion at the latency target gets its own
    torch-pruning match, named after it; the summary pairs each of ours with the match to it, and the
    headline shows the best of ours by its paired difference (not by its mean: the two ran on different
    seeds here) beside the peer matched to it."""
    channels = benchmark_script("channels", monkeypatch)
    tables = benchmark_script("readme_tables", monkeypatch)
    other = channels.latency_one_shot_method(4, "taylor_elementwise-nocomp")
    assert other == "ours one-shot (taylor_elementwise, compensate=False, target_latency)"
    its_peer = channels.latency_tp_method(other)
    assert its_peer == "torch-pruning (equal latency to taylor_elementwise, compensate=False)"
    assert channels.latency_tp_method(LATENCY_OURS) == channels.LATENCY_TP
    assert channels.latency_tp_method(channels.LATENCY_OURS) == channels.LATENCY_TP
    latency = {"target_kind": "latency"}
    rows = [r for r in ROWS if r["model"] == "m"] + [  # (seeds 2 and 3: their dense models weaker)
        _row("m", 2, "dense", 1.0, 0.70, 1.0), _row("m", 3, "dense", 1.0, 0.72, 1.0),
        *[{**_row("m", seed, other, 0.5, acc, 0.5), **latency} for seed, acc in ((2, 0.80), (3, 0.78))],
        *[{**_row("m", seed, its_peer, 0.5, acc, 0.5), **latency, "matched": other}
          for seed, acc in ((2, 0.75), (3, 0.76))]]
    summary = json.loads(json.dumps(channels.summary(rows)))
    entries = {(e["method"], e.get("target_kind")): e for e in summary}
    assert entries[(other, "latency")]["minus_tp"] == pytest.approx(0.035)  # (0.05 + 0.02) / 2
    assert entries[(LATENCY_OURS, "latency")]["minus_tp"] == pytest.approx(0.02)  # still its own match
    assert entries[(its_peer, "latency")]["matched"] == [other]
    lines = tables.RENDERERS["channels-shapes#readme"]({"summary": summary}).splitlines()
    # the best of ours: `other` (+0.035 against its match), though its mean (0.79) is below LATENCY_OURS'
    # (0.86, on the stronger seeds 0-1); torch-pruning's column is its match
    assert lines[3] == ("| `m` | latency 0.5 | 0,1,2,3 | 0.7600 ± 0.0589 | 0.7550 ± 0.0071 (seeds 2,3)"
                        f" | 0.7900 ± 0.0141 (seeds 2,3) | {other} | +0.0350 ± 0.0212 (seeds 2,3) |")
