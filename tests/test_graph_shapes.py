"""Couplings made through a tensor's shape (lightning_prune.graph.shapes): a size the model's code reads from
``x.shape`` is a constant in the exported graph; the eager provenance pass ties it to the dim it was read
from, so that the residual stream and the tensors reshaped with its width are removed together."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.graph import analyse_channels
from tests.helpers import analyse_and_prove_each_group

torch.manual_seed(0)
X = torch.randn(2, 5, 12)


def _analyse(model: nn.Module, x: torch.Tensor = X):
    return analyse_and_prove_each_group(model, x)


class _ShapeAttention(nn.Module):
    """CrossViT's / ConViT's / Twins' attention: the head size ``C // self.num_heads`` and the merged width
    ``C`` are taken from the input's shape."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, C // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Blocks(nn.Module):
    def __init__(self, dim: int = 24, num_heads: int = 3, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(_ShapeAttention(dim, num_heads) for _ in range(depth))
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_head_size_and_a_width_taken_from_the_input_shape_follow_the_stream():
    analysis = _analyse(_Blocks())
    gated = {p for g in analysis.groups for p in g.producers}
    print(analysis.skipped)
    assert {"embed", "attns.0.q", "attns.0.kv", "attns.0.proj", "attns.1.q", "attns.1.proj", "fc2"} <= gated
    assert "fc1" in gated


def test_convit_heads_and_stream_taken_from_shapes_are_gated():
    """timm's ConViT (small): ``C // self.num_heads`` in its gated positional self-attention and
    ``reshape(B, N, C)`` after it; before the shape couplings only the MLP hidden units were exact."""
    timm = __import__("pytest").importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", img_size=32, patch_size=8, embed_dim=8, num_heads=2, depth=2,
                              local_up_to_layer=1, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = _analyse(model, x)
    gated = {p for g in analysis.groups for p in g.producers}
    assert {"patch_embed.proj", "blocks.0.attn.qk", "blocks.0.attn.v", "blocks.0.attn.proj",
            "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc2"} <= gated
    total = sum(analysis.weights.values())
    assert sum(w for name, w in analysis.weights.items() if name in gated) / total == 1.0



class _GlobalQuery(nn.Module):
    """GCViT's global query: one per image, repeated along the batch (``repeat_interleave(B, dim=0)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.q, self.out = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        B = x.shape[0]
        q = self.q(x[:1]).repeat_interleave(B // 1, dim=0)
        return self.out(self.fc(x) * q)


def test_repeat_interleave_along_the_batch_keeps_the_channels():
    analysis = _analyse(_GlobalQuery())
    group = next(g for g in analysis.groups if "fc" in g.producers)
    assert set(group.producers) == {"fc", "q"} and group.size == 8


class _EvalCache(nn.Module):
    """EfficientFormerV2's attention-bias cache: filled by a forward in eval mode, emptied by ``train()``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(12, 8), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training:
            bias = self.bias
        else:
            bias = self.cache.setdefault("cpu", self.bias * 1.0)
        B, N, C = x.shape
        return self.out(self.fc(x.reshape(B, N, C)) + bias)


def test_the_eager_pass_leaves_no_state_in_the_model():
    model = _EvalCache().eval()
    analyse_channels(model, X)
    assert model.cache == {}  # (a stale bias there broke EfficientFormerV2 after its heads were removed)


class _RelPosBias(nn.Module):
    """timm's RelPosBias: a bias table per head, viewed with the shape tuple ``bias_shape``."""

    def __init__(self, n: int, num_heads: int) -> None:
        super().__init__()
        self.bias_shape = (n, n, num_heads)
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * n - 1, num_heads))
        index = (torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1).flatten()
        self.register_buffer("relative_position_index", index, persistent=False)

    def get_bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(self.bias_shape).permute(2, 0, 1).unsqueeze(0)


class _GetBiasAttention(nn.Module):
    """MaxViT's / CoAtNet's attention: ``attn + self.rel_pos.get_bias()`` (the bias module's forward is not
    called, its ``bias_shape`` must still follow the heads)."""

    def __init__(self, dim: int = 12, num_heads: int = 3, n: int = 5) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.rel_pos = _RelPosBias(n, num_heads)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) + self.rel_pos.get_bias()).softmax(-1)
        return self.out(self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)))


def test_a_bias_shape_read_through_get_bias_follows_the_heads():
    analysis = _analyse(_GetBiasAttention())
    heads = next(g for g in analysis.groups if "qkv" in g.producers)
    assert heads.unit == "head" and heads.size == 3
    assert ("rel_pos", "bias_shape[2]", 1) in heads.attrs


class _MixerBlock(nn.Module):
    """MLP-Mixer: a token-mixing MLP along the tokens (its hidden units are units of the token dim), then a
    channel MLP; both added to the stream."""

    def __init__(self, tokens: int = 5, dim: int = 12) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, 8), nn.Linear(8, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.embed, self.head = nn.Linear(12, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok2(torch.relu(self.tok1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        x = x + self.ch2(torch.relu(self.ch1(self.norm2(x))))
        return self.head(x.mean(1))


def test_a_token_mixing_mlp_keeps_the_channels_and_its_hidden_units_apart():
    analysis = _analyse(_MixerBlock())
    gated = {p for g in analysis.groups for p in g.producers}
    assert {"embed", "ch2", "ch1", "tok1"} <= gated, analysis.skipped
    stream = next(g for g in analysis.groups if "embed" in g.producers)
    assert stream.size == 12 and "tok1" not in stream.producers


class _RotaryAttention(nn.Module):
    """EVA-02's attention: a rotary embedding rotates pairs of each head's channels
    (``stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)``) before ``q @ k`` merges the head, and the
    merged width is ``C`` of the input's shape."""

    def __init__(self, dim: int, num_heads: int, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("rope", torch.randn(tokens, dim // num_heads), persistent=False)

    @staticmethod
    def _rot(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = q * self.rope.cos() + self._rot(q) * self.rope.sin(), k * self.rope.cos() + self._rot(k)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _RotaryBlocks(_Blocks):
    def __init__(self, dim: int = 24, num_heads: int = 3, depth: int = 2) -> None:
        super().__init__(dim, num_heads, depth)
        self.attns = nn.ModuleList(_RotaryAttention(dim, num_heads) for _ in range(depth))


def test_a_rotary_embedding_within_the_heads_keeps_heads_and_stream_apart():
    """The rotation's pairs lie in one head: coupling the pairs' size (``reshape(x.shape)``) with the dim it
    was read from must not merge the heads (it did before ``q @ k`` merged each head: one unit, the heads
    and the stream left alone, EVA-02 at 0.44)."""
    analysis = _analyse(_RotaryBlocks())
    heads = [g for g in analysis.groups if "attns.0.qkv" in g.producers]
    assert heads and heads[0].unit == "head" and heads[0].size == 3, analysis.skipped
    stream = next(g for g in analysis.groups if "embed" in g.producers)
    assert {"attns.0.proj", "attns.1.proj", "fc2"} <= set(stream.producers)


def test_a_fingerprint_tells_a_square_tensor_from_its_transpose():
    """PVT-v2 at 64 tokens of 64 channels: the strided partial sum alone gave ``x`` and ``x.transpose`` the
    same fingerprint (64 = 1 modulo the stride 7), the tokens' size was tied to the channels and the stream
    fixed."""
    from lightning_prune.graph.shapes import _close, _fingerprint

    x = torch.randn(2, 64, 64)
    assert not _close(_fingerprint(x), _fingerprint(x.transpose(1, 2)))
    assert _close(_fingerprint(x), _fingerprint(x.clone()))
