"""Oracles for the lottery-ticket pruning functions (Frankle & Carbin 2019)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_prune.functional.lottery import prune_by_percent, prune_count, remaining_fraction, shuffle_like


def _weights(seed: int = 0, shapes=((40, 25), (10, 3, 3, 3), (7, 11))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


def test_prune_count_is_torch_rounding():
    assert prune_count(1000, 0.2) == 200
    assert prune_count(800, 0.2) == 160
    assert prune_count(640, 0.2) == 128
    assert prune_count(3, 0.2) == 1  # round(0.6)
    assert prune_count(2, 0.2) == 0  # round(0.4)
    assert prune_count(5, 1.0) == 5


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_repeated_20_percent_oracle(scope):
    """torch l1_unstructured(amount=0.2) repeated prunes 0.2, 0.36, 0.488 (verified); 0.8**k remain."""
    weights = {"a": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    masks = None
    for k, pruned in enumerate([0.2, 0.36, 0.488], start=1):
        masks = prune_by_percent(weights, masks, 0.2, scope)
        weights = {n: w * masks[n] for n, w in weights.items()}  # pruned weights are exact zeros
        assert 1.0 - remaining_fraction(masks.values()) == pytest.approx(pruned, abs=1e-12)
        assert remaining_fraction(masks.values()) == pytest.approx(0.8 ** k, abs=1e-12)
    for k in range(4, 11):
        masks = prune_by_percent(weights, masks, 0.2, scope)
        assert remaining_fraction(masks.values()) == pytest.approx(0.8 ** k, abs=2e-3)


def test_layer_scope_equals_torch_l1_unstructured_repeated():
    weights = _weights()
    modules = {n: nn.Linear(1, 1, bias=False) for n in weights}
    for name, module in modules.items():
        module.weight = nn.Parameter(weights[name].clone())
    masks = None
    for _ in range(4):
        for module in modules.values():
            prune.l1_unstructured(module, "weight", amount=0.2)
        masks = prune_by_percent({n: m.weight.detach() for n, m in modules.items()}, masks, 0.2, "layer")
        for name, module in modules.items():
            assert torch.equal(masks[name], module.weight_mask.bool()), name


def test_global_scope_equals_torch_global_unstructured_repeated():
    weights = _weights(3)
    modules = {n: nn.Linear(1, 1, bias=False) for n in weights}
    for name, module in modules.items():
        module.weight = nn.Parameter(weights[name].clone())
    masks = None
    for _ in range(4):
        prune.global_unstructured([(m, "weight") for m in modules.values()],
                                  pruning_method=prune.L1Unstructured, amount=0.2)
        masks = prune_by_percent({n: m.weight.detach() for n, m in modules.items()}, masks, 0.2, "global")
        for name, module in modules.items():
            assert torch.equal(masks[name], module.weight_mask.bool()), name
    # global ranking: layers end up at different sparsities, the total is exactly 0.8**4 (rounded)
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == _kept_after(total, 4)
    assert len({round(float(m.float().mean()), 3) for m in masks.values()}) > 1


def _kept_after(n: int, rounds: int, rate: float = 0.2) -> int:
    for _ in range(rounds):
        n -= prune_count(n, rate)
    return n


def test_masks_are_nested_and_prune_only_the_smallest_alive():
    weights = _weights(5)
    masks = prune_by_percent(weights, None, 0.3, "global")
    second = prune_by_percent(weights, masks, 0.3, "global")  # weights not zeroed: alive set still decides
    for n in weights:
        assert not (second[n] & ~masks[n]).any(), "a pruned weight came back"
    survivors = torch.cat([weights[n][second[n]].abs().reshape(-1) for n in weights])
    removed = torch.cat([weights[n][masks[n] & ~second[n]].abs().reshape(-1) for n in weights])
    assert removed.max() <= survivors.min()


def test_layer_rates_prune_the_output_layer_on_its_own():
    weights = _weights(7)
    masks = prune_by_percent(weights, None, 0.2, "global", layer_rates={"w2": 0.1})
    assert int((~masks["w2"]).sum()) == prune_count(77, 0.1) == 8
    pooled = weights["w0"].numel() + weights["w1"].numel()
    assert int((~masks["w0"]).sum() + (~masks["w1"]).sum()) == prune_count(pooled, 0.2)
    untouched = prune_by_percent(weights, None, 0.2, "layer", layer_rates={"w2": 0.0})
    assert untouched["w2"].all()
    assert int((~untouched["w0"]).sum()) == prune_count(1000, 0.2)


def test_ties_are_broken_by_position():
    weights = {"a": torch.ones(10)}
    masks = prune_by_percent(weights, None, 0.2)
    assert masks["a"].tolist() == [False, False] + [True] * 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown scope 'channel'"):
        prune_by_percent(_weights(), None, 0.2, "channel")
    with pytest.raises(KeyError, match="not in `weights`"):
        prune_by_percent(_weights(), None, 0.2, layer_rates={"fc": 0.1})


def test_shuffle_like_is_a_seeded_permutation():
    t = torch.randn(6, 5)
    a = shuffle_like(t, torch.Generator().manual_seed(0))
    b = shuffle_like(t, torch.Generator().manual_seed(0))
    c = shuffle_like(t, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, t)
    assert torch.equal(a.reshape(-1).sort().values, t.reshape(-1).sort().values)
    ones = torch.ones(4, 3)
    assert torch.equal(shuffle_like(ones, torch.Generator().manual_seed(0)), ones)
