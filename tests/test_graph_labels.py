"""The traced operator-graph analysis (lightning_prune.graph.labels): one hand-written module per operator
pattern, each group proven exact by the masked-vs-sliced proof; a gate-callback fit on a transformer whose
heads and residual stream are gated."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.graph import analyse_channels, masked_and_sliced, slice_units
from lightning_prune.graph.proof import compare_outputs
from tests.helpers import analyse_and_prove_each_group, logits_around_train_end, random_gates

torch.manual_seed(0)
X = torch.randn(2, 5, 16)


def _analyse(model: nn.Module, x: torch.Tensor = X):
    return analyse_and_prove_each_group(model, x)


def _group(analysis, name):
    return next(g for g in analysis.groups if g.name == name)


class _Heads(nn.Module):
    """q/k/v from one Linear, heads via reshape + permute, unbind, softmax(q k^T) v, merged back."""

    def __init__(self, dim: int = 16, num_heads: int = 2, fused: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = dim
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


class _Head(nn.Module):
    def __init__(self, block: nn.Module, dim: int = 16) -> None:
        super().__init__()
        self.block, self.out = block, nn.Linear(dim, 3)

    def forward(self, x):
        return self.out(self.block(x))


def test_qkv_unbind_heads_reshape_permute():
    for fused in (False, True):
        analysis = _analyse(_Head(_Heads(fused=fused)))
        heads = _group(analysis, "block.qkv")
        assert (heads.unit, heads.size, heads.width) == ("head", 2, 8)
        assert {("block", "num_heads", 1), ("block", "attn_dim", 8)} <= set(heads.attrs)


class _SwiGLU(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class _GLUConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 3), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, 1)
        return self.fc(self.conv2(a * b.sigmoid()).mean((2, 3)))


def test_swiglu_and_glu_chunk_pair_the_halves():
    analysis = _analyse(_Head(_SwiGLU()))
    gate = _group(analysis, "block.fc1")
    assert gate.size == 12  # one unit = a row of each half
    out = next(s for s in gate.slices if s.role == "out")
    assert len(out.channels) == 24 and sorted(set(out.units)) == list(range(12))
    analysis = _analyse(_GLUConv(), torch.randn(2, 3, 8, 8))
    assert _group(analysis, "conv1").size == 8


class _ClassAttention(nn.Module):
    """CaiT-style: the query of the class token only, keys and values of every token."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x[:, 0]).unsqueeze(1).reshape(b, 1, h, d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        cls = (attn @ v).transpose(1, 2).reshape(b, 1, h * d)
        return torch.cat([self.proj(cls), x[:, 1:]], dim=1)


def test_class_attention_heads():
    analysis = _analyse(_Head(_ClassAttention()))
    heads = next(g for g in analysis.groups if g.unit == "head")
    assert heads.size == 2 and {s.module for s in heads.slices if s.role == "out"} == {
        "block.q", "block.k", "block.v"}
    assert ("block", "num_heads", 1) in heads.attrs


class _RelPosAttention(_Heads):
    """A relative-position bias table (positions x heads) indexed by a buffer, added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, self.num_heads))
        self.register_buffer("index", torch.randint(0, 9, (5, 5)))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


def test_relative_position_bias_table_is_sliced_along_heads():
    analysis = _analyse(_Head(_RelPosAttention()))
    heads = _group(analysis, "block.qkv")
    table = next(s for s in heads.slices if s.module == "block.table")
    assert (table.role, table.dim, table.channels, table.units) == ("param", 1, (0, 1), (0, 1))


class _LayerScaleNet(nn.Module):
    """A residual stream with a LayerNorm, a layer-scale gamma, a position embedding and a class token."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 6, dim))
        self.norm1, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm(x)[:, 0])


def test_layer_scale_pos_embed_cls_token_follow_the_stream():
    analysis = _analyse(_LayerScaleNet(), torch.randn(2, 5, 8))
    stream = _group(analysis, "embed")
    assert stream.coupled and stream.size == 16
    params = {(s.module, s.dim) for s in stream.slices if s.role == "param"}
    assert {("gamma", 0), ("pos_embed", 2), ("cls_token", 2)} <= params
    assert {s.module for s in stream.sites if s.kind == "norm"} == {"norm1", "norm"}
    assert analysis.coverage > 0.95  # all but the output layer


class _FixedSplit(nn.Module):
    """A split whose size is written in the code (no attribute holds it): its units cannot go."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.fc1(x).split(8, dim=-1)
        return self.fc2(a) + self.fc3(b)


class _AttributeSplit(_FixedSplit):
    """The same split with its size in an attribute: found and updated."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8

    def forward(self, x):
        a, b = self.fc1(x).split(self.width, dim=-1)
        return self.fc2(a) + self.fc3(b)


def test_a_split_size_in_an_attribute_is_updated_and_one_written_in_the_code_is_skipped_with_the_line():
    """The attribute holding a split's size drops with the units (Res2Net's ``width``, SKNet's); a size
    written in the code cannot, and the reason names the line that raised and the size."""
    analysis = _analyse(_AttributeSplit())
    group = _group(analysis, "fc1")
    assert group.size == 8 and ("", "width", 1) in group.attrs
    small = _AttributeSplit().eval()  # a larger removal than the proof's sample (all but one unit) runs
    slice_units(small, [group], {"fc1": list(range(1, 8))})
    assert small.width == 1 and small(X).shape == (2, 5, 3)
    analysis = _analyse(_FixedSplit())
    assert not analysis.groups
    why = analysis.skipped["fc1"]
    assert "changes the outputs" in why and "test_graph_labels.py" in why, why  # where the model raised
    assert "aten.split with the size 8 written in the model's code" in why, why


class _PartialResidual(nn.Module):
    """DPN / ReXNet: a residual added to the first ``self.width`` channels only (a slice bound in an
    attribute), the rest concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 6
        self.fc1, self.fc2, self.out = nn.Linear(16, 10), nn.Linear(16, 6), nn.Linear(10, 3)

    def forward(self, x):
        y = self.fc1(x)
        y = torch.cat([y[..., :self.width] + self.fc2(x), y[..., self.width:]], dim=-1)
        return self.out(y)


def test_a_slice_bound_in_an_attribute_drops_by_the_units_removed_before_it():
    analysis = _analyse(_PartialResidual())
    group = _group(analysis, "fc1")  # fc1's first 6 channels coupled with fc2's: one group of 10 units
    assert group.size == 10 and set(group.producers) == {"fc1", "fc2"}
    (module, attr, weights), = group.attrs
    assert (module, attr) == ("", "width") and sorted(weights) == [0] * 4 + [1] * 6


class _ListSplit(nn.Module):
    """MixNet: a split by a list attribute of (here unequal) sizes, each piece to its own layer."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [4, 12]
        self.fc1, self.a, self.b = nn.Linear(16, 16), nn.Linear(4, 3), nn.Linear(12, 3)

    def forward(self, x):
        a, b = torch.split(self.fc1(x), self.splits, -1)
        return self.a(a) + self.b(b)


def test_a_list_of_split_sizes_drops_per_piece():
    analysis = _analyse(_ListSplit())
    group = _group(analysis, "fc1")
    assert {(m, a) for m, a, _ in group.attrs} == {("", "splits[0]"), ("", "splits[1]")}
    small = copy.deepcopy(_ListSplit().eval())
    slice_units(small, analysis.groups, {"fc1": [0, 1, 5]})  # units 0, 1 in the first piece, 5 in the second
    assert small.splits == [2, 11] and small(X).shape == (2, 5, 3)


class _PieceAttributes(nn.Module):
    """FasterNet's partial conv: ``split(x, [self.dim_conv3, self.dim_untouched])``, one attribute per piece
    (no list attribute holds the sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.dim_conv3, self.dim_untouched = 4, 12
        self.fc1, self.a, self.b = nn.Linear(16, 16), nn.Linear(4, 3), nn.Linear(12, 3)

    def forward(self, x):
        a, b = torch.split(self.fc1(x), [self.dim_conv3, self.dim_untouched], -1)
        return self.a(a) + self.b(b)


def test_split_sizes_in_one_attribute_per_piece_drop_per_piece():
    analysis = _analyse(_PieceAttributes())
    group = _group(analysis, "fc1")
    assert {(m, a) for m, a, _ in group.attrs} == {("", "dim_conv3"), ("", "dim_untouched")}, analysis.skipped
    small = copy.deepcopy(_PieceAttributes().eval())
    slice_units(small, analysis.groups, {"fc1": [0, 1, 5]})
    assert (small.dim_conv3, small.dim_untouched) == (2, 11) and small(X).shape == (2, 5, 3)


class _SingleHeadPart(nn.Module):
    """SHViT's single-head attention on a part of the stream: ``split(x, [self.pdim, self.dim -
    self.pdim])`` (the second size computed from the whole), ``split(qkv, [self.qk_dim, self.qk_dim,
    self.pdim])`` and ``reshape(B, N, self.pdim)``: one attribute, ``pdim``, for the attended piece of the
    stream and for ``v``."""

    def __init__(self, dim: int = 16, pdim: int = 6, qk_dim: int = 4) -> None:
        super().__init__()
        self.dim, self.pdim, self.qk_dim = dim, pdim, qk_dim
        self.embed, self.norm = nn.Linear(16, dim), nn.LayerNorm(pdim)
        self.qkv, self.proj = nn.Linear(pdim, 2 * qk_dim + pdim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, _ = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=-1)
        q, k, v = torch.split(self.qkv(self.norm(x1)), [self.qk_dim, self.qk_dim, self.pdim], dim=-1)
        x1 = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).reshape(B, N, self.pdim)
        return self.out(x + self.proj(torch.relu(torch.cat([x1, x2], -1))))


def test_one_attribute_used_by_several_sizes_couples_their_positions():
    """``pdim`` sizes the attended piece of the stream and ``v``: the two lose the same number of positions
    (paired), ``dim`` (the whole) drops by all the stream's removed positions; before, each group changed
    ``pdim`` alone and failed its proof (SHViT at 0.49, EfficientViT-M's ``val_dim`` at 0.47)."""
    analysis = _analyse(_SingleHeadPart())
    stream = _group(analysis, "embed")
    assert {"embed", "proj", "qkv"} <= set(stream.producers), analysis.skipped
    assert {(m, a) for m, a, _ in stream.attrs} >= {("", "pdim"), ("", "dim")}
    small = copy.deepcopy(_SingleHeadPart().eval())
    slice_units(small, analysis.groups, {g.name: [1, 2] for g in analysis.groups})
    assert small.pdim + small.qk_dim * 2 == small.qkv.out_features and small(X).shape == (2, 5, 3)


class _ShapeSize(nn.Module):
    """SKNet: a reshape whose size comes from the tensor's shape (a constant in the traced graph) inside a
    module whose parent holds an unrelated attribute of the same value: nothing to update, the group stays."""

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            b, n, c = x.shape
            y = self.fc(x).reshape(b, n, 2, c // 2).softmax(2).reshape(b, n, c)
            return x * y

    def __init__(self) -> None:
        super().__init__()
        self.in_channels = 8  # = c // 2 above, but the parent's: not the size the reshape uses
        self.fc0, self.inner, self.out = nn.Linear(16, 16), self.Inner(), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.inner(self.fc0(x)))


def test_only_the_module_running_an_operator_is_searched_for_its_sizes():
    analysis = _analyse(_ShapeSize())
    assert all(not g.attrs for g in analysis.groups)
    assert any("inner.fc" in g.producers for g in analysis.groups), analysis.skipped


class _ViewedScale(nn.Module):
    """MetaFormer's layer scale: a parameter viewed with a shape held in a tuple attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.scale = nn.Parameter(torch.rand(8))
        self.shape = (8, 1, 1)

    def forward(self, x):
        return self.out(self.conv(x) * self.scale.view(self.shape))


def test_a_parameter_viewed_with_a_shape_attribute_updates_it():
    analysis = _analyse(_ViewedScale(), torch.randn(2, 3, 4, 4))
    group = _group(analysis, "conv")
    assert ("", "shape[0]", 1) in group.attrs
    assert ("scale", "param") in {(s.module, s.role) for s in group.slices}


class _BiasMlp(nn.Module):
    """timm's ``RelPosMlp``: a small MLP maps coordinates to one bias per head; its ``get_bias`` views the
    MLP's output with ``self.num_heads`` and ``self.bias_shape`` (not its forward: the caller's code)."""

    def __init__(self, num_heads: int, tokens: int) -> None:
        super().__init__()
        self.num_heads, self.bias_shape = num_heads, (tokens, tokens, num_heads)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, num_heads))
        self.register_buffer("coords", torch.randn(tokens, tokens, 2))

    def get_bias(self):
        return self.mlp(self.coords).view(-1, self.num_heads).view(self.bias_shape).permute(2, 0, 1)


class _CalleeBias(_Heads):
    """The attention adds the bias of ``self.rel_pos.get_bias()`` (vit_relpos, 0.33 coverage before: the
    views ran as the attention's operators, whose ``num_heads`` alone was updated)."""

    def __init__(self) -> None:
        super().__init__(num_heads=2)
        self.rel_pos = _BiasMlp(2, 5)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) + self.rel_pos.get_bias()).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


def test_sizes_viewed_in_a_submodule_method_called_by_the_owner_update_the_submodule():
    analysis = _analyse(_Head(_CalleeBias()))
    group = _group(analysis, "block.qkv")
    assert group.size == 2  # the heads (with the bias MLP's outputs)
    assert {("block", "num_heads", 1), ("block.rel_pos", "num_heads", 1),
            ("block.rel_pos", "bias_shape[2]", 1)} <= set(group.attrs), group.attrs


def test_timm_vit_relpos_removes_heads_in_a_lightning_fit_with_its_bias_mlp(tmp_path):
    """timm's ``vit_relpos`` (its ``RelPosMlp.get_bias`` called by the attention): OneShotPruning removes a
    head inside the fit, and both ``num_heads`` follow (its whole stream was skipped before)."""
    from lightning_prune.callbacks.one_shot import OneShotPruning
    from lightning_prune.testing import fit_tiny, tiny_classifier

    module = tiny_classifier("vit_relpos_small_patch16_224", optimizer="adamw", lr=1e-3, model_kwargs={
        "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    dense = sum(p.numel() for p in module.parameters())
    cb = OneShotPruning("channels", target_flops=0.5, prune_step=1, calibration_batches=1, verbose=False)
    trainer, _ = fit_tiny([cb], tmp_path, model=module, max_epochs=1, limit_train_batches=3,
                          limit_val_batches=0)
    attn = module.model.blocks[0].attn
    assert trainer.global_step == 3 and cb.flops_remaining <= 0.5
    assert sum(p.numel() for p in module.parameters()) < dense
    assert attn.num_heads == attn.rel_pos.num_heads == attn.rel_pos.bias_shape[2] == 1
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _LiteralView(_ViewedScale):
    """A parameter viewed with a shape written in the code (``view(8, 1, 1)``): no attribute holds the size;
    looking for one attribute per entry met the entries that hold no unit positions (it raised on XCiT,
    CAFormer and TNT, and their whole operator graph was given up)."""

    def __init__(self) -> None:
        super().__init__()
        del self.shape

    def forward(self, x):
        return self.out(self.conv(x) * self.scale.view(8, 1, 1))


def test_a_parameter_viewed_with_a_literal_shape_is_skipped_with_the_reason_not_the_graph():
    analysis = _analyse(_LiteralView(), torch.randn(2, 3, 4, 4))
    assert not any("operator graph" in name for name in analysis.skipped), analysis.skipped
    assert "aten.view of a parameter with the size [8, 1, 1] written in the model's code" in \
        analysis.skipped["conv"], analysis.skipped


class _SameValue(nn.Module):
    """LeViT: ``num_heads == key_dim`` (both 4); the heads reshape's size is the first, the split's the
    second: updating both is wrong, the variant updating ``num_heads`` only is proven exact."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = 4, 4, 2
        self.kv, self.proj = nn.Linear(16, 4 * 6), nn.Linear(4 * 2, 3)

    def forward(self, x):
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (k @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.val_dim))


def test_one_size_in_two_attributes_tries_each_and_keeps_the_exact_one():
    analysis = _analyse(_SameValue())
    group = _group(analysis, "kv")
    assert group.unit == "head" and ("", "num_heads", 1) in group.attrs
    assert not any(a == "key_dim" for _, a, _ in group.attrs)


class _CoincidentHeads(nn.Module):
    """CrossViT: the head width taken from the stream's shape (``C // self.num_heads``). Cutting a third of
    both the stream (12 -> 8) and the heads (3 -> 2) keeps it at 4 by coincidence; other removals do not."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 3
        self.fc0, self.wq, self.proj, self.out = (nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 12),
                                                  nn.Linear(12, 3))

    def forward(self, x):
        s = self.fc0(x)
        b, n, c = s.shape
        q = self.wq(s).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        o = ((q @ q.transpose(-2, -1)).softmax(-1) @ q).transpose(1, 2).reshape(b, n, -1)
        return self.out(self.proj(o) + s)


def test_the_proof_takes_two_samples_so_a_coincidence_of_sizes_does_not_pass():
    model = _CoincidentHeads().eval()
    analysis = analyse_channels(model, X)
    for share in (0.25, 0.5, 0.75):  # whatever was accepted is exact at other removals too
        removed = {g.name: list(range(max(1, min(g.size - 1, int(g.size * share))))) for g in analysis.groups}
        masked, _, sliced = masked_and_sliced(model, X, analysis.groups, removed, seed=1)
        assert compare_outputs(masked, sliced, 1e-6) <= 1e-6, share


def test_updated_sizes_survive_save_and_load_compressed(tmp_path):
    """``save_compressed`` keeps every integer (and list of integers) attribute: a fresh model loads them."""
    import lightning_prune as lp

    model = _ListSplit().eval()
    analysis = _analyse(model)
    slice_units(model, analysis.groups, {"fc1": [0, 5, 6]})
    lp.save_compressed(model, tmp_path / "small.pt")
    fresh = lp.load_compressed(tmp_path / "small.pt", _ListSplit().eval())
    assert fresh.splits == model.splits == [3, 10]
    torch.testing.assert_close(fresh(X), model(X))


def test_untraceable_model_falls_back_and_names_why():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x):
            y = self.fc1(x)
            if y.abs().sum() >= 0:  # data-dependent control flow: torch.export refuses it
                y = y * 2
            return self.fc2(y)

    analysis = analyse_channels(Branchy(), X, engine="traced")
    assert any("operator graph" in k for k in analysis.skipped)
    assert [g.name for g in analysis.groups] == ["fc1"]  # torch-pruning's dependency graph instead


def test_gate_fit_gates_heads_and_residual_stream(tmp_path):
    """GroupLassoPruning(compress=True) on timm's test_vit: heads and the residual stream are gated, the
    fit shrinks the model and the compressed logits equal the gated ones."""
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny, tiny_classifier

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cb = GroupLassoPruning(finalize_step=1.0, compress=True, prune_coupled=True, lam=0.3, gate_lr=0.2,
                           gate_optimizer="sgd", capture_threshold=0.02, prune_threshold=0.3, verbose=False)
    model = tiny_classifier("test_vit")
    dense = sum(p.numel() for p in model.parameters())
    callbacks, seen = logits_around_train_end(cb, x)
    fit_tiny(callbacks, tmp_path, model=model, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    kinds = {g.unit for g in cb.groups}
    assert "head" in kinds and any(g.coupled for g in cb.groups)
    assert cb.finalized and sum(p.numel() for p in model.parameters()) < dense
    torch.testing.assert_close(seen["compressed"], seen["gated"], atol=1e-4, rtol=1e-4)


class _SplitAttention(nn.Module):
    """ResNeSt-style split attention: one conv gives ``radix x C`` channels (a grouped conv, one conv group
    per radix piece, or a plain one), reshaped to ``(B, radix, C, H, W)`` and summed over the pieces; an
    attention over the ``radix x C`` logits, softmax over the pieces, weights the pieces before they are
    summed again."""

    def __init__(self, c: int = 8, radix: int = 2, grouped: bool = True) -> None:
        super().__init__()
        self.radix = radix
        self.conv1, self.bn1 = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix if grouped else 1)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 16, 1), nn.Conv2d(16, c * radix, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(torch.relu(self.bn1(self.conv1(x))))))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        attn = self.fc2(torch.relu(self.fc1(x.sum(1).mean((2, 3), keepdim=True))))
        attn = attn.view(b, 1, self.radix, -1).transpose(1, 2).softmax(1).reshape(b, -1).view(b, -1, 1, 1)
        out = (x * attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(1)
        return self.head(out.mean((2, 3)))


def test_a_radix_split_summed_over_its_pieces_pairs_the_channels_across_the_pieces():
    x = torch.randn(2, 3, 6, 6)
    for grouped in (True, False):
        analysis = _analyse(_SplitAttention(grouped=grouped), x)
        split = next(g for g in analysis.groups if "conv" in g.producers)
        assert split.size == 8 and set(split.producers) == {"conv", "fc2"}, split  # c of every radix piece
        out = next(s for s in split.slices if s.module == "conv" and s.role == "out")
        assert len(out.channels) == 16 and sorted(set(out.units)) == list(range(8))
        assert "fc1" in {p for g in analysis.groups for p in g.producers}
        first = next(g for g in analysis.groups if "conv1" in g.producers)
        # a grouped conv: the i-th input of each group is one unit (4 per group); a plain one reads all 8
        assert first.size == (4 if grouped else 8)


def test_a_grouped_conv_kept_only_by_a_fix_is_not_paired():
    """A grouped conv whose units only the model's output keeps (not merged by any operator) is not paired
    across its groups: no second propagation; the split attention's conv is paired."""
    from lightning_prune.graph.labels import LabelGraph

    x = torch.randn(2, 3, 6, 6)
    last = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2)).eval()
    graph = LabelGraph(last, (x,))
    assert graph.paired == set()  # ({"2"} before, from a second propagation)
    assert LabelGraph(_SplitAttention(grouped=True).eval(), (x,)).paired == {"conv"}


def _split_attention_classifier(model_name: str = ""):
    """An ImageClassifier around ``_SplitAttention(grouped=True)`` (10 classes), or around timm's
    ``model_name``."""
    from lightning_prune.testing import classifier_around, tiny_classifier

    if model_name:
        return tiny_classifier(model_name)
    torch.manual_seed(0)
    net = _SplitAttention(grouped=True)
    net.head = nn.Linear(8, 10)
    return classifier_around(net)


def _paired_site(groups):
    """The input site of a grouped conv whose units are paired across its groups."""
    return next(s for g in groups for s in g.input_sites() if s.columns)


def _group_lasso_fold_and_compress(module, tmp_path, **target):
    """GroupLassoPruning(compress=True) fit a few steps: without a target the compressed logits equal the
    gated ones (the gates folded into the weight columns); with one, the budget is met."""
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cb = GroupLassoPruning(finalize_step=1.0, compress=True, recalibrate_bn_batches=0, round_to=1, lam=0.3,
                           gate_lr=0.2, gate_optimizer="sgd", capture_threshold=0.02, prune_threshold=0.3,
                           verbose=False, **target)
    dense = sum(p.numel() for p in module.parameters())
    callbacks, seen = logits_around_train_end(cb, x)
    fit_tiny(callbacks, tmp_path, model=module, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    site = _paired_site(cb.groups)
    assert len(site.channels) == 2 * len(set(site.columns))  # every tensor channel, half as many columns
    assert cb.finalized
    if target:
        assert sum(p.numel() for p in module.parameters()) < dense
        flops = next(v for k, v in cb.size_metrics().items() if k.endswith("flops_remaining"))
        assert flops <= target["target_flops"] + 1e-6
    else:
        torch.testing.assert_close(seen["compressed"], seen["gated"], atol=1e-4, rtol=1e-4)


def _one_shot_channels(module, tmp_path):
    from lightning_prune.callbacks.one_shot import OneShotPruning
    from lightning_prune.testing import fit_tiny

    cb = OneShotPruning("channels", target_flops=0.5, calibration_batches=2, verbose=False)
    dense = sum(p.numel() for p in module.parameters())
    trainer, _ = fit_tiny([cb], tmp_path, model=module, max_epochs=1, limit_train_batches=2,
                          limit_val_batches=0)
    assert cb.flops_remaining <= 0.5 and trainer.global_step == 2
    assert sum(p.numel() for p in module.parameters()) < dense
    site = _paired_site(cb.groups)
    conv = module.get_submodule(site.module)
    assert conv.weight.shape[1] * conv.groups == conv.in_channels  # (the conv keeps its groups)


def test_a_grouped_conv_paired_across_its_groups_folds_and_masks_its_weight_columns():
    """The paired conv's input site reads all ``cin`` input channels but its weight has ``cin / groups``
    columns (the site's ``columns``): random gates fold into those columns (IndexError before) without
    changing the outputs; closed gates, folded and masked, equal the sliced model; the units whose columns
    are zero are dead (index out of range before)."""
    from lightning_prune.core.compression import dead_units
    from lightning_prune.core.gates import unit_masks

    x = torch.randn(2, 3, 6, 6)
    model = _SplitAttention(grouped=True).eval()
    groups = analyse_channels(model, x).groups
    site = _paired_site(groups)
    assert site.module == "conv" and len(site.channels) == 8 and site.columns == (0, 1, 2, 3) * 2
    assert site.column_units() == ((0, 1, 2, 3), site.units[:4])
    gates, keep = random_gates(groups)
    gates.attach(model)
    gated = model(x)
    gates.detach()
    gates.fold_(model)
    torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for name, mask in unit_masks(model, groups, keep).items():
            model.get_parameter(name).mul_(mask)
    removed = {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(groups, keep)}
    paired = next(g for g in groups if site in g.sites)
    assert removed[paired.name] and set(dead_units(model, [paired])[paired.name]) == set(removed[paired.name])
    slice_units(model, groups, removed)
    assert model.conv.groups == 2 and model.conv.in_channels == 2 * len(site.columns) // 2 - 2 * len(
        removed[paired.name])
    torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-4)


def test_a_resnest_like_model_prunes_its_paired_grouped_conv_in_lightning_fits(tmp_path):
    """GroupLassoPruning(target_flops=0.5, compress=True) folds and compresses, OneShotPruning('channels')
    scores, refits and removes: both through the paired conv (IndexErrors before)."""
    _group_lasso_fold_and_compress(_split_attention_classifier(), tmp_path / "gl", target_flops=0.5)
    _one_shot_channels(_split_attention_classifier(), tmp_path / "os")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["group_lasso", "group_lasso_target", "one_shot"])
def test_resnest_split_attention_prunes_through_its_paired_grouped_convs(run, tmp_path):
    module = _split_attention_classifier("resnest14d")
    if run == "one_shot":
        _one_shot_channels(module, tmp_path)
    else:
        _group_lasso_fold_and_compress(module, tmp_path, **({"target_flops": 0.5} if "target" in run else {}))


class _PosEnc(nn.Module):
    """A depthwise conv over the tokens laid out as an image, added to them (CoaT's ConvPosEnc)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        b, n, c = x.shape
        return x + self.proj(x.transpose(1, 2).reshape(b, c, 4, 4)).flatten(2).transpose(1, 2)


class _SharedBlock(nn.Module):
    def __init__(self, dim: int, pos: nn.Module) -> None:
        super().__init__()
        self.pos = pos  # the same module in every block (a second name for it)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = self.pos(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class _SharedPosEncBlocks(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.pos = _PosEnc(dim)
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(_SharedBlock(dim, self.pos) for _ in range(2))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_a_module_shared_by_blocks_is_followed_under_its_first_name():
    analysis = _analyse(_SharedPosEncBlocks(), torch.randn(2, 16, 12))
    stream = _group(analysis, "embed")
    assert set(stream.producers) == {"embed", "blocks.0.fc2", "blocks.1.fc2"} and stream.size == 8
    assert ("pos.proj", "channel") in {(s.module, s.role) for s in stream.slices}
    assert list(analysis.skipped) == ["head"], analysis.skipped  # (the model's output)
    assert {p for g in analysis.groups for p in g.producers} == {"embed", "blocks.0.fc1", "blocks.0.fc2",
                                                                 "blocks.1.fc1", "blocks.1.fc2"}


class _SplitDepthwise(nn.Module):
    """Channels split into pieces of unequal sizes, each read by a depthwise conv of its own kernel (CoaT's
    ConvRelPosEnc, MixNet): a piece must keep a channel."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [2, 4]
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.convs = nn.ModuleList([nn.Conv2d(2, 2, 1, groups=2), nn.Conv2d(4, 4, 3, padding=1, groups=4)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        pieces = torch.split(self.conv1(x), self.splits, dim=1)
        x = torch.cat([conv(p) for conv, p in zip(self.convs, pieces)], dim=1)
        return self.head(x.mean((2, 3)))


def test_a_removal_that_would_empty_a_piece_keeps_one_of_its_units():
    x = torch.randn(2, 3, 6, 6)
    model = _SplitDepthwise().eval()
    group = _group(_analyse(model, x), "conv1")
    piece = tuple(sorted(u for s in group.slices if s.module == "convs.0" for u in s.units))
    assert piece in group.floors and len(group.floors) == 2  # (each piece keeps one)
    removed = {"conv1": [*piece, 5]}  # the whole first piece: its first unit stays
    assert group.feasible(removed["conv1"]) == {piece[1], 5}
    masked, _, sliced = masked_and_sliced(model, x, [group], removed, seed=1)
    assert compare_outputs(masked, sliced, 1e-6) <= 1e-6
    small = copy.deepcopy(model)
    assert slice_units(small, [group], removed) == 2
    assert small.splits == [1, 3] and small.convs[0].groups == 1


def test_the_size_a_slice_cuts_is_one_function_with_or_without_affine_weights():
    """The labels' floors, the cost model and the latency model take the size of a sliced dim from one
    function: a norm without affine weights has one (the labels' copy gave None, so no floor)."""
    from lightning_prune.graph.slicing import slice_extent

    assert slice_extent(nn.LayerNorm(8, elementwise_affine=False), "channel") == 8
    assert slice_extent(nn.BatchNorm2d(6, affine=False), "channel") == 6
    assert slice_extent(nn.GroupNorm(1, 4, affine=False), "channel") == 4
    conv = nn.Conv2d(8, 12, 3, groups=4)
    assert (slice_extent(conv, "in"), slice_extent(conv, "out"), slice_extent(conv, "group")) == (2, 12, 12)
    assert slice_extent(conv.weight, "param", 1) == 2 and slice_extent(conv, "free") is None
    assert slice_extent(nn.Linear(5, 7), "in") == 5


def test_a_plan_that_would_empty_a_piece_is_made_feasible_where_it_is_made():
    """Every plan goes through ``round_kept``, which puts a floor's first unit back before rounding: the
    kept count is rounded after it (one off before), and the masks, the slicing and the FLOPs then describe
    the same removal."""
    from lightning_prune.core.compression import round_kept
    from lightning_prune.core.gates import unit_masks
    from lightning_prune.core.one_shot import channel_plan
    from lightning_prune.graph.cost import CostModel

    x = torch.randn(2, 3, 6, 6)
    model = _SplitDepthwise().eval()
    group = _group(_analyse(model, x), "conv1")
    piece = next(f for f in group.floors if len(f) == 2)
    assert round_kept(group, [*piece, 5], 1) == [piece[1], 5]
    assert round_kept(group, [*piece, 5], 2) == [piece[1], 5]  # 4 kept (before: 3 rounded to 4, then 5)
    scores = torch.ones(6, dtype=torch.float64)
    scores[[*piece, 5]] = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    cost = CostModel(model, x, [group])
    plan = channel_plan([group], [scores], cost, None, None, 0.5)  # the 3 lowest: the piece and unit 5
    assert plan == {"conv1": [piece[1], 5]}
    keep = [torch.tensor([u not in plan["conv1"] for u in range(6)])]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in unit_masks(masked, [group], keep).items():
            masked.get_parameter(name).mul_(mask)
    small = copy.deepcopy(model)
    assert slice_units(small, [group], plan) == 2
    torch.testing.assert_close(small(x), masked(x), atol=1e-6, rtol=1e-6)
    assert cost.ratios(plan) == pytest.approx(cost.measured_ratios(plan), rel=1e-3)  # (one unit: 5%)


@pytest.mark.parametrize("step", ["_attribute_couplings", "shape_provenance"])
def test_a_failing_coupling_step_is_named_in_the_skip_reasons(monkeypatch, step):
    """The coupling of the sizes one integer attribute holds (and the eager pass finding sizes taken from
    shapes) only help the proof; when either raises, the groups that then fail the proof say so in their
    skip reason (it used to be swallowed without a word)."""
    import lightning_prune.graph.labels as labels

    def boom(*args, **kwargs):
        raise RuntimeError("boom in the coupling")

    if step == "shape_provenance":  # (a width taken from the input's shape: the stream needs the pass)
        from tests.test_graph_shapes import _Blocks

        monkeypatch.setattr(labels, "shape_provenance", boom)
        model, x = _Blocks(), torch.randn(2, 5, 12)
    else:
        monkeypatch.setattr(labels.LabelGraph, "_attribute_couplings", boom)
        model, x = _SingleHeadPart(), X
    analysis = analyse_channels(model.eval(), x)
    reasons = [why for why in analysis.skipped.values() if "boom in the coupling" in why]
    assert reasons, analysis.skipped
    assert all("RuntimeError" in why for why in reasons)


class _Blurred(nn.Module):
    """timm's ``BlurPool2d`` (``F.conv2d(x, self.filt, groups=self.channels)``: a depthwise conv of a fixed
    buffer) between two convs, and an antialiased bicubic interpolation of a positional parameter
    (``F.interpolate(self.pos, antialias=True)``, NaFlexViT's learned position embedding) added to them."""

    def __init__(self) -> None:
        from timm.layers import BlurPool2d

        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = BlurPool2d(channels=8, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 8, 3, 3))
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.blur(self.conv(x))
        pos = F.interpolate(self.pos, size=x.shape[-2:], mode="bicubic", antialias=True)
        return self.out(x + pos)


def test_a_depthwise_conv_of_a_module_buffer_and_an_interpolated_parameter_follow_the_channels():
    """The blur's filter (a buffer) and the positional parameter are sliced with the conv's channels, and
    the blur's ``channels`` (its conv's ``groups``) shrinks with them (it used to stop the group: ``a
    convolution whose weight is not a Conv module's``, ``a tensor computed from parameters``)."""
    model = _Blurred().eval()
    analysis = _analyse(model, torch.randn(2, 3, 8, 8))
    group = _group(analysis, "conv")
    assert ("blur.filt", 0) in {(s.module, s.dim) for s in group.slices if s.role == "param"}
    assert ("pos", 1) in {(s.module, s.dim) for s in group.slices if s.role == "param"}
    assert ("blur", "channels", 1) in group.attrs
    slice_units(model, [group], {"conv": [1, 4, 6]})
    assert model.blur.channels == 5 == model.blur.filt.shape[0] == model.pos.shape[1]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 4, 4)


def test_timm_rmsnorm_on_the_residual_stream_is_a_norm_site(tmp_path):
    """A ViT normalised by timm's ``RmsNorm`` (``aten.rms_norm``: AIMv2, EVA and the LLM-style ViTs): the
    residual stream is a group whose norms compute their statistics over the kept channels (its whole
    stream stayed before, named as the model's output), proven exact, and a one-shot removal inside a
    Lightning fit shrinks every norm."""
    from timm.layers import RmsNorm

    from lightning_prune.callbacks.one_shot import OneShotPruning
    from lightning_prune.testing import fit_tiny, tiny_classifier

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2,
              "norm_layer": RmsNorm}
    module = tiny_classifier("vit_tiny_patch16_224", optimizer="adamw", lr=1e-3, model_kwargs=kwargs)
    analysis = _analyse(copy.deepcopy(module.model), torch.randn(2, 3, 32, 32))
    stream = next(g for g in analysis.groups if g.coupled)
    norms = {s.module for s in stream.sites if s.kind == "norm"}
    assert norms >= {"blocks.0.norm1", "blocks.1.norm2", "norm"}
    assert analysis.coverage == 1.0
    cb = OneShotPruning("channels", target_flops=0.5, prune_step=1, calibration_batches=1, verbose=False)
    trainer, _ = fit_tiny([cb], tmp_path, model=module, max_epochs=1, limit_train_batches=3,
                          limit_val_batches=0)
    norms = [m for m in module.model.modules() if isinstance(m, RmsNorm)]
    assert trainer.global_step == 3 and cb.flops_remaining < 0.6  # (the widths step by 8 of 32: 0.50-0.51)
    assert len({m.normalized_shape[0] for m in norms}) == 1 and norms[0].normalized_shape[0] < 32
    assert norms[0].weight.shape == norms[0].normalized_shape
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _ChannelStatisticGate(nn.Module):
    """CSATv2's spatial attention, reduced: the channel mean of the stream, one value per position, goes
    through ``Linear(1, 3)`` split by ``unbind(-1)`` (whose pieces drop the last dim) and gates the stream:
    the mean makes every channel one unit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.qkv, self.out = nn.Linear(16, 16), nn.Linear(1, 3, bias=False), nn.Linear(16, 3)

    def forward(self, x):
        x = self.a(x)
        q, k, v = self.qkv(x.mean(-1, keepdim=True)).unbind(-1)
        gate = (q.unsqueeze(-1) @ k.unsqueeze(-2)).softmax(-1) @ v.unsqueeze(-1)
        return self.out(x * gate)


def test_an_unbind_of_the_last_dim_is_followed_and_a_merged_stream_is_named_by_its_operator():
    analysis = _analyse(_ChannelStatisticGate(), X)
    reason = analysis.skipped["a"]
    assert "aten.mean over these channels makes them one unit" in reason, reason
    assert "IndexError" not in " ".join(analysis.skipped.values())


class _Windows(nn.Module):
    """Overlapping windows of a conv's output (halo attention's ``kv.unfold(2, win, step).unfold(3, ...)``)
    averaged back: the channels pass through the windows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        w = F.pad(self.conv(x), [1, 1, 1, 1]).unfold(2, 3, 2).unfold(3, 3, 2)  # (B, C, h, w, 3, 3)
        return self.out(w.mean((-1, -2)))


def test_unfold_into_windows_keeps_the_channel_labels():
    analysis = _analyse(_Windows(), torch.randn(2, 3, 8, 8))
    assert _group(analysis, "conv").size == 8


class _DepthwiseUpsampling(nn.Module):
    """LowFormer's (``fused_conv=False``) attention upsampling: a depthwise ``ConvTranspose2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.up(self.conv(x)))


def test_a_depthwise_transposed_conv_passes_its_channels_and_loses_them():
    model = _DepthwiseUpsampling().eval()
    analysis = _analyse(model, torch.randn(2, 3, 8, 8))
    assert ("up", "channel") in {(s.module, s.role) for s in _group(analysis, "conv").slices}
    slice_units(model, analysis.groups, {"conv": [0, 3, 5]})
    assert model.up.weight.shape[0] == model.up.in_channels == model.up.out_channels == model.up.groups == 5


class _NormAct(nn.Module):
    """A conv into timm's ``LayerNormAct2d`` (LayerNorm over the channels, then GELU in the same module:
    MaxxViT's and CoAtNeXt's stems)."""

    def __init__(self) -> None:
        from timm.layers import LayerNormAct2d

        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(3, 8, 3, padding=1), LayerNormAct2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.norm(self.conv(x)))


def test_a_norm_with_its_own_activation_computes_the_activation_over_the_kept_channels_too():
    """The masked model's norm (statistics over the kept channels) runs the module's activation after it, as
    the module does: the group is exact (it failed its proof by 1e-3 before)."""
    analysis = _analyse(_NormAct(), torch.randn(2, 3, 6, 6))
    assert "norm" in {s.module for s in _group(analysis, "conv").sites if s.kind == "norm"}


class _FoldedHeads(nn.Module):
    """Heads folded into the batch dim (timm's BottleneckAttn and HaloAttn): ``q.reshape(B *
    self.num_heads, self.dim_head, -1)``, with a relative position table over the head dim shared by
    every head (``q @ self.rel``)."""

    def __init__(self, dim: int = 8, num_heads: int = 2, dim_head: int = 4, side: int = 3) -> None:
        super().__init__()
        self.num_heads, self.dim_head, self.dim_out = num_heads, dim_head, num_heads * dim_head
        self.qkv = nn.Conv2d(dim, 3 * self.dim_out, 1)
        self.rel = nn.Parameter(torch.randn(dim_head, side * side))
        self.out = nn.Conv2d(self.dim_out, 5, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = torch.split(self.qkv(x), [self.dim_out] * 3, dim=1)
        q = q.reshape(b * self.num_heads, self.dim_head, -1).transpose(-1, -2)
        k = k.reshape(b * self.num_heads, self.dim_head, -1)
        v = v.reshape(b * self.num_heads, self.dim_head, -1).transpose(-1, -2)
        attn = (q @ k + q @ self.rel).softmax(-1)
        return self.out((attn @ v).transpose(-1, -2).reshape(b, self.dim_out, h, w))


def test_heads_folded_into_the_batch_dim_are_units_with_their_count_updated():
    """The number of heads is a literal multiple of the batch in the reshape's size: it shrinks with the
    heads (``num_heads``: the group was rejected before, its sliced copy failing in the reshape), and the
    table shared by the heads keeps its head dim."""
    model = _FoldedHeads().eval()
    x = torch.randn(2, 8, 3, 3)
    analysis = _analyse(model, x)
    group = _group(analysis, "qkv")
    assert group.unit == "head" and group.size == 2
    assert {("", "num_heads", 1), ("", "dim_out", 4)} <= set(group.attrs)
    slice_units(model, [group], {"qkv": [0]})
    assert model.num_heads == 1 and model.dim_out == 4 and model.rel.shape == (4, 9)
    assert model(x).shape == (2, 5, 3, 3)


@pytest.mark.parametrize("layer", ["bottleneck", "halo"])
def test_timm_bottleneck_and_halo_attention_lose_heads_in_a_lightning_fit(tmp_path, layer):
    """timm's BoTNet / HaloNet blocks (a small ``ByobNet``: one bottleneck block, one self-attention block):
    their heads, folded into the batch, are removed by a one-shot step inside a fit (the whole block's qkv was
    left alone before), and training goes on with the smaller model."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    from lightning_prune.callbacks.one_shot import OneShotPruning
    from lightning_prune.testing import classifier_around, fit_tiny

    kwargs = {"block_size": 2, "halo_size": 1} if layer == "halo" else {}
    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="bottle", d=1, c=32, s=2, br=0.25),
                              ByoBlockCfg(type="self_attn", d=1, c=64, s=2, br=0.5, self_attn_layer=layer,
                                          self_attn_kwargs=kwargs)),
                      stem_chs=16, stem_type="tiered", stem_pool="")
    net = ByobNet(cfg, num_classes=10, **({"img_size": 32} if layer == "bottleneck" else {}))
    attn = net.stages[1][0].self_attn
    heads = attn.num_heads
    cb = OneShotPruning("channels", target_flops=0.3, importance="weight_norm", prune_step=0,
                        calibration_batches=1, verbose=False)
    trainer, module = fit_tiny([cb], tmp_path, model=classifier_around(net), max_epochs=1,
                               limit_train_batches=3, limit_val_batches=0)
    assert trainer.global_step == 3 and cb.flops_remaining <= 0.3
    assert any(g.unit == "head" for g in cb.groups)
    assert attn.num_heads < heads and attn.dim_out_v == attn.num_heads * attn.dim_head_v
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_mvitv2_pooled_heads_lose_heads_in_a_lightning_fit(tmp_path):
    """MViTv2's attention pools q, k and v with depthwise convs over the head dim, the heads folded into the
    batch (``reshape(-1, H, W, head_dim)``): the conv's weight is shared by the heads, so each head goes whole
    and the conv keeps its channels (pairing channel c across the heads merged every head with the
    contraction of q and k: ``mvitv2_tiny`` was at 0.79, all its attention left alone). A small MViTv2
    (two stages of two and four heads) loses heads in a one-shot step inside a fit and trains on."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    from lightning_prune.callbacks.one_shot import OneShotPruning
    from lightning_prune.testing import classifier_around, fit_tiny

    cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=(16, 32), num_heads=(2, 4), stride_q=((1, 1), (2, 2)),
                           stride_kv_adaptive=(2, 2))
    net = MultiScaleVit(cfg, img_size=(32, 32), num_classes=10)
    analysis = _analyse(copy.deepcopy(net).eval(), torch.randn(2, 3, 32, 32))
    heads = [g for g in analysis.groups if g.unit == "head"]
    assert [g.size for g in heads] == [2, 4]
    assert ("stages.1.blocks.0.attn", "num_heads", 1) in heads[1].attrs
    attn = net.stages[1].blocks[0].attn
    cb = OneShotPruning("channels", target_flops=0.3, importance="weight_norm", prune_step=0,
                        calibration_batches=1, verbose=False)
    trainer, module = fit_tiny([cb], tmp_path, model=classifier_around(net), max_epochs=1,
                               limit_train_batches=3, limit_val_batches=0)
    assert trainer.global_step == 3 and cb.flops_remaining <= 0.3
    assert attn.num_heads < 4 and attn.qkv.out_features == 3 * attn.dim_out
    assert attn.pool_q.weight.shape[0] == attn.dim_out // attn.num_heads  # the pool keeps its channels
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
