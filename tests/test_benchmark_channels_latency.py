"""``benchmarks/channels.py`` at a latency target: the pure logic, without training or real timing.

The bisection of torch-pruning's ``pruning_ratio`` on a measured latency (with an injected timing function),
and the summary's pairing of ours at a latency target with torch-pruning at equal latency -- never with a
FLOPs row of the same number.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def channels():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return benchmark_script("channels", monkeypatch)


def test_bisect_ratio_below_is_torch_pruning_at_flops(channels) -> None:
    """The default: the last probe at most the target, stopping within ``tol`` below (the FLOPs rule)."""
    seen = []
    model, ratio, value = channels.bisect_ratio(lambda r: r, lambda r: seen.append(r) or 1 - r, 0.6)
    assert value <= 0.6 and 0.6 - value < 0.01
    assert ratio == model == seen[-1] and value == 1 - ratio and len(seen) <= 12
    # nothing reachable: prune(hi)
    model, ratio, value = channels.bisect_ratio(lambda r: r, lambda r: 1.0, 0.5, steps=3)
    assert ratio == model == 0.95 and value == 1.0


def test_bisect_ratio_goes_lower_where_pruning_fails(channels) -> None:
    """A ratio whose pruning raises (torch-pruning's ViT left with a layer of no heads above 0.5) is too much:
    the bisection goes lower; with no probe reaching the target, the highest ratio that worked is kept; with
    none that worked, the error is raised."""
    def prune(r):
        if r > 0.5:
            raise RuntimeError("shape '[1, 17, 3, 0, 64]' is invalid")
        return r

    model, ratio, value = channels.bisect_ratio(prune, lambda r: 1 - r / 2, 0.25)
    assert 0.49 < ratio <= 0.5 and model == ratio and value == 1 - ratio / 2
    model, ratio, value = channels.bisect_ratio(prune, lambda r: 1 - r, 0.6)  # reachable: as before
    assert value <= 0.6 and 0.6 - value < 0.01
    with pytest.raises(RuntimeError, match="is invalid"):
        channels.bisect_ratio(prune, lambda r: 1.0, 0.5, hi=0.95, steps=1)


def test_torch_pruning_at_latency_matches_the_measured_reference(channels) -> None:
    """The bisection on a measured latency: the candidate timed with the dense model and ours in one call
    of the injected timing; the probe kept is the closest to equal latency, within 2%, and the row's
    fractions come from that probe's call. A machine whose load doubles between probes cancels out."""
    dense, ours = SimpleNamespace(speed=1.0), SimpleNamespace(speed=0.43)
    calls = []

    def timing(models, batch, reps, inner):  # the load drifts from call to call: only ratios are stable
        assert batch == 64 and reps == 3 and list(models) == ["dense", "reference", "candidate"]
        load = 1.0 + len(calls)
        calls.append(models["candidate"].speed)
        return {k: m.speed * load for k, m in models.items()}

    def pruner(net, grads):  # torch-pruning's latency falls linearly with its ratio
        assert net == "net" and grads == {"g": 1}
        return lambda ratio: SimpleNamespace(speed=1.0 - 0.9 * ratio, ratio=ratio)

    channels_pruner = channels.torch_pruning_pruner
    channels.torch_pruning_pruner = pruner
    try:
        model, ratio, match = channels.torch_pruning_at_latency("net", {"g": 1}, ours, dense, 3, timing)
    finally:
        channels.torch_pruning_pruner = channels_pruner
    assert model.ratio == ratio and abs(model.speed / 0.43 - 1) < 0.02
    assert match["probes"] == len(calls) <= 10
    assert match["matched_to"] == pytest.approx(0.43)
    assert match["latency_matched"] == pytest.approx(model.speed)
    assert match["latency_to_ours"] == pytest.approx(model.speed / 0.43)


def test_bisect_ratio_closest_takes_either_side(channels) -> None:
    """``closest=True``: no probe within ``tol``, the closest on either side is kept (here above)."""
    seen = []

    def measure(r: float) -> float:
        seen.append(r)
        return 0.52 if r < 0.5 else 0.3

    model, ratio, value = channels.bisect_ratio(lambda r: r, measure, 0.5, tol=0.001, steps=3, closest=True)
    assert (ratio, value) == (0.475, 0.52) and len(seen) == 3 and seen[1] > 0.7


def row(method: str, seed: int, acc: float, target: float = 0.5, kind: str | None = None,
        **extra) -> dict:
    r = {"model": "resnet18", "seed": seed, "method": method, "target": target, "acc": acc, "flops": 0.4,
         "params": 0.4, **extra}
    if kind:
        r["target_kind"] = kind
    return r


def test_summary_pairs_latency_rows_with_torch_pruning_at_equal_latency(channels) -> None:
    ours = channels.latency_one_shot_method(4)
    rows = []
    for seed, (a, b, c, d) in enumerate([(0.80, 0.78, 0.70, 0.60), (0.82, 0.79, 0.74, 0.70)]):
        rows += [row("dense", seed, 0.9, 1.0, latency_b64=1.0),
                 row("torch-pruning", seed, 0.5),  # FLOPs rows at the same number: never paired with those
                 row(ours, seed, a, kind="latency", latency_b64=0.50 + seed / 100, latency_callback=0.49),
                 row(channels.LATENCY_TP, seed, b, kind="latency", matched=ours, latency_b64=0.49),
                 row(channels.LATENCY_OURS, seed, c, kind="latency", latency_b64=0.6),
                 row(channels.LATENCY_TP, seed, d, target=0.25, kind="latency", matched=ours)]
    entries = {(e["method"], e["target"], e.get("target_kind", "flops")): e for e in channels.summary(rows)}
    one_shot = entries[(ours, 0.5, "latency")]
    assert one_shot["minus_tp"] == pytest.approx(0.025) and one_shot["minus_tp_n"] == 2
    assert one_shot["minus_tp_sd"] == pytest.approx(0.0070711, abs=1e-6)
    assert one_shot["minus_dense"] == pytest.approx(-0.09)
    assert one_shot["latency_b64"] == pytest.approx(0.505)
    assert one_shot["tp_latency_b64"] == pytest.approx(0.49)
    assert one_shot["minus_tp_latency_b64"] == pytest.approx(0.015)
    assert "minus_one_shot" not in one_shot and one_shot["latency_callback"] == pytest.approx(0.49)
    # GroupLasso at the latency target: torch-pruning was matched to the one-shot model, not to it
    assert "minus_tp" not in entries[(channels.LATENCY_OURS, 0.5, "latency")]
    tp = entries[(channels.LATENCY_TP, 0.5, "latency")]
    assert "minus_tp" not in tp and tp["minus_dense"] == pytest.approx(-0.115)
    # the FLOPs row of the same number stays a FLOPs row, unpaired with the latency rows
    assert entries[("torch-pruning", 0.5, "flops")]["minus_dense"] == pytest.approx(-0.4)
    assert "target_kind" not in entries[("torch-pruning", 0.5, "flops")]
    # keys and the timing's names keep the kinds apart; the markdown says which target is which
    assert channels._key(rows[1]) != channels._key({**rows[1], "target_kind": "latency"})
    assert channels._net_key(rows[2]) == f"{ours} 0.5 latency"
    assert channels._net_key(rows[1]) == "torch-pruning 0.5"
    config = {"difficulty": 0.0, "train_size": 512, "epochs": 2, "lr": 0.05, "taylor_batches": 8, "reps": 3,
              "command": "x"}
    text = channels.markdown(rows, [], config)
    assert "| target latency |" in text and "| latency 0.5 |" in text and "| FLOPs 0.5 |" in text
    assert (f"| {ours} | 0.5 | 0,1 | 0.8100 ± 0.0141 | 0.505 | 0.490 | 0.400 | -0.0900 ± 0.0141"
            " | +0.0250 ± 0.0071 | 0.490 | +0.0150 ± 0.0071 |") in text
    flops_only = channels.markdown([r for r in rows if "target_kind" not in r], [], config)
    assert "| target FLOPs |" in flops_only and "latency 0.5" not in flops_only
