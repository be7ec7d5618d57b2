"""Recurrent layers on the traced operator graph: an LSTM/GRU reading a labelled feature dim is an input site
(its first layer's input weights, every gate and both directions, lose the units' columns, ``input_size``
with them), proven exact; gated once and folded into each direction's weight."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lightning_prune.core.gates import GateSet, ScaleGate
from lightning_prune.core.one_shot import prune_one_shot
from lightning_prune.graph import CostModel, analyse_channels, masked_and_sliced, slice_units
from lightning_prune.graph.proof import compare_outputs

X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


class _Recurrent(nn.Module):
    """A residual stream read by a LayerNorm and a bidirectional two-layer RNN (sequencer's LSTM2d)."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.rnn = rnn(8, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(8 if bidirectional else 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        y, _ = self.rnn(self.norm(x))
        return self.head(x + self.proj(y))


@pytest.mark.parametrize(("rnn", "bidirectional"), [(nn.LSTM, True), (nn.GRU, False)])
def test_an_rnn_reading_the_stream_is_an_input_site_and_removal_is_exact(rnn, bidirectional):
    torch.manual_seed(0)
    model = _Recurrent(rnn, bidirectional).eval()
    analysis = analyse_channels(model, X)
    stream = next(g for g in analysis.groups if "embed" in g.producers)
    assert stream.size == 8 and stream.coupled and not any("rnn" in why for why in analysis.skipped.values())
    weights = {s.weight for s in stream.input_sites() if s.module == "rnn"}
    directions = ["", "_reverse"] if bidirectional else [""]
    assert weights == {f"rnn.weight_ih_l0{d}" for d in directions}
    assert ("rnn", "input_size", 1) in stream.attrs
    removed = {stream.name: [0, 3, 5]}
    masked, small, sliced = masked_and_sliced(model, X, [stream], removed, seed=1)
    assert compare_outputs(masked, sliced, 1e-6) <= 1e-6
    assert small.rnn.input_size == 5 and small.rnn.weight_ih_l0.shape[1] == 5
    assert all(getattr(small.rnn, f"weight_ih_l0{d}").shape[1] == 5 for d in directions)
    assert small.rnn.weight_ih_l1.shape[1] == model.rnn.weight_ih_l1.shape[1]  # hidden units stay


def test_a_bidirectional_lstm_is_gated_once_and_folded_into_both_directions():
    torch.manual_seed(0)
    model = _Recurrent().eval()
    groups = analyse_channels(model, X).groups
    gates = [ScaleGate(g.size) for g in groups]
    for gate in gates:
        with torch.no_grad():
            gate.weight.uniform_(0.2, 1.5)
    gate_set = GateSet(groups, gates)
    gate_set.attach(model)
    with torch.no_grad():
        gated = model(X)
    gate_set.detach()
    gate_set.fold_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), gated, atol=1e-5, rtol=1e-5)


def test_sequencer2d_built_small_gates_its_stream_through_the_lstms():
    torch.manual_seed(0)
    model = timm.create_model("sequencer2d_s", num_classes=4, layers=[1, 1, 1], patch_sizes=[4, 2, 1],
                              embed_dims=[16, 24, 24], hidden_sizes=[8, 8, 8], mlp_ratios=[2.0] * 3).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    analysis = analyse_channels(model, x)
    assert analysis.coverage == 1.0, analysis.skipped
    removed = {g.name: list(range(0, g.size, 3))[: g.size - 1] for g in analysis.groups}
    masked, small, sliced = masked_and_sliced(model, x, analysis.groups, removed, seed=2)
    assert compare_outputs(masked, sliced, 1e-6) <= 1e-6
    smaller = copy.deepcopy(model)
    slice_units(smaller, analysis.groups, removed)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())


def test_one_shot_channel_pruning_scores_and_zeroes_the_lstm_s_input_weights():
    torch.manual_seed(0)
    model = _Recurrent().eval()
    prune_one_shot(model, [X] * 4, method="channels", target_flops=0.7)
    assert model.rnn.input_size == model.embed.out_features < 8
    assert model.rnn.weight_ih_l0_reverse.shape[1] == model.rnn.input_size
    assert model(X).shape == (2, 5, 3)


def test_the_cost_model_counts_an_lstm_s_flops_down_with_its_input_weights():
    torch.manual_seed(0)
    model = _Recurrent().eval()
    groups = analyse_channels(model, X).groups
    stream = next(g for g in groups if "embed" in g.producers)
    cost = CostModel(model, X, [stream])
    flops, _ = cost.cost({stream.name: list(range(6))})
    rnn = cost._flops["rnn"]
    lost = sum(getattr(model.rnn, f"weight_ih_l0{d}").numel() for d in ("", "_reverse")) * 6 / 8
    share = lost / sum(p.numel() for p in model.rnn.parameters())
    assert flops <= cost.dense_flops - rnn * share + 1e-6
