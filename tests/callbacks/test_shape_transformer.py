"""A hand-written transformer whose heads and residual stream are coupled only through a tensor's shape
(``B, N, C = x.shape; qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)``,
:mod:`lightning_prune.graph.shapes`): GroupLassoPruning gates the heads together with the stream, removes them
inside the fit, resumes from checkpoints taken before and after the removal to the uninterrupted run's
weights, and under ``ddp_spawn`` (2 CPU processes) both ranks remove the same heads and end with the
single-process weights. In float64: the claims are exactness, float32 trajectories part by 1e-4 on other
CPUs' kernels. (It tests :mod:`lightning_prune.graph.shapes` through a callback's fit, so it sits with the
callback tests rather than mirroring one module.)"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from tests.helpers import Spy

DIM, HEADS, TOKENS, FEATURES, CLASSES = 16, 4, 6, 8, 5
#: 3 epochs of 4 batches; the units are decided and removed at step 6 (mid-epoch 1)
FIT = {"max_epochs": 3, "limit_val_batches": 0, "precision": "64-true"}
#: the weights are float64 but the gates stay float32: the gradient reductions' rounding reaches the gates at
#: float32 precision (~1e-7), and through them the weights
CLOSE = {"atol": 1e-6, "rtol": 1e-5}


class _Attention(nn.Module):
    """Not timm's ``Attention``: the head size and the merged width are read from the input's shape."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShapeTransformer(pl.LightningModule):
    """Tokens (B, N, FEATURES) -> embedding -> 2 blocks on the residual stream -> norm -> mean -> classes;
    SGD with momentum (its buffers follow the removed units). Random, fixed data: ``batch_size`` per
    process, not shuffled (under DDP, the two ranks' batches of 4 are the single process's batch of 8)."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.embed = nn.Linear(FEATURES, DIM)
        self.blocks = nn.Sequential(_Block(DIM, HEADS), _Block(DIM, HEADS))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, CLASSES)
        self.example_input_array = torch.randn(2, TOKENS, FEATURES,
                                               generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(32, TOKENS, FEATURES, generator=g, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (32,), generator=g)
        data = TensorDataset(x, y)
        # (Lightning's own distributed sampler shuffles: this one gives rank r the samples r, r + 2, ...)
        sampler = DistributedSampler(data, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def _model(batch_size: int = 8) -> ShapeTransformer:
    pl.seed_everything(0, verbose=False)
    # built in float64: Lightning loads a checkpoint's weights before "64-true" converts the module, so a
    # float32 module would round them on resume
    return ShapeTransformer(batch_size).double()


def _callback() -> GroupLassoPruning:
    # a strong penalty: the gates part within the 6 steps before the decision
    return GroupLassoPruning(lam=0.05, gate_lr=1.0, target_flops=0.6, finalize_step=6, compress=True,
                             round_to=1, verbose=False)


def _fit(callbacks, root, model, ckpt_path=None, **kwargs) -> None:
    """A seeded fit on the module's own data (``fit_tiny``'s options)."""
    pl.seed_everything(0, verbose=False)
    saves = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "default_root_dir": str(root), "num_sanity_val_steps": 0,
               "deterministic": True, "enable_checkpointing": saves, **FIT, **kwargs}
    trainer = pl.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(model, ckpt_path=str(ckpt_path) if ckpt_path else None)


def _heads_and_stream(cb: GroupLassoPruning) -> int:
    """The group of the heads and the residual stream (the embedding, every qkv/proj and the MLP's fc2):
    its index in ``cb.groups``."""
    [index] = [i for i, g in enumerate(cb.groups) if "embed" in g.producers]
    group = cb.groups[index]
    assert group.unit == "head" and group.size == HEADS
    assert {"embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.qkv",
            "blocks.1.attn.proj", "blocks.1.mlp.fc2"} <= set(group.producers)
    assert {("blocks.0.attn", "num_heads", 1), ("blocks.1.attn", "num_heads", 1)} <= set(group.attrs)
    return index


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], **CLOSE, msg=lambda m, key=key: f"{key}: {m}")


def test_heads_and_stream_removed_in_the_fit_resume_before_and_after_the_removal(tmp_path):
    """Checkpoints at the ends of epochs 0 (step 4: gates training) and 1 (step 8: two steps after the heads
    and stream channels were removed): a fresh module and callback resume from each to the uninterrupted
    run's removal, weights and shapes."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    cb, model = _callback(), _model()
    _fit([cb, saver], tmp_path / "full", model, limit_train_batches=4)
    index = _heads_and_stream(cb)
    removed = cb.shrink.removed
    assert 0 < len(removed[cb.groups[index].name]) < HEADS  # some heads (and their stream channels) went
    assert model.blocks[0].attn.num_heads == model.blocks[1].attn.num_heads == HEADS - len(
        removed[cb.groups[index].name])
    assert model.embed.out_features == DIM // HEADS * model.blocks[0].attn.num_heads
    expected = _weights(model)
    for step in (4, 8):
        resumed_cb, resumed = _callback(), _model()
        ckpt = tmp_path / "ckpt" / f"step={step}.ckpt"
        _fit([resumed_cb], tmp_path / f"resumed{step}", resumed, ckpt_path=ckpt, limit_train_batches=4)
        assert resumed_cb.shrink.removed == removed, step
        got = _weights(resumed)
        assert got.keys() == expected.keys()
        for key, value in expected.items():  # (the same operations replayed: bit for bit)
            assert torch.equal(got[key], value), (step, key)


def _rank_dump(trainer, module, hook):
    cb = next(c for c in trainer.callbacks if isinstance(c, GroupLassoPruning))
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"rank{trainer.global_rank}.pt"
    torch.save({"removed": cb.shrink.removed, "weights": _weights(module),
                "heads": module.blocks[0].attn.num_heads}, out)


@pytest.mark.slow
def test_ddp_spawn_removes_the_same_heads_on_both_ranks_as_the_single_process(tmp_path, monkeypatch):
    """Two processes with batches of 4 and one process with batches of 8 (the same samples): the same heads
    and stream channels removed at step 6, identical weights on both ranks, equal to the single process's
    up to rounding (the gradient reductions sum in another order; the gates are float32)."""
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    _fit([_callback(), Spy(_rank_dump, ("on_train_end",))], tmp_path / "ddp", _model(batch_size=4),
         strategy="ddp_spawn", devices=2, use_distributed_sampler=False, limit_train_batches=4)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single_cb, single = _callback(), _model()
    _fit([single_cb], tmp_path / "single", single, limit_train_batches=4)
    _heads_and_stream(single_cb)
    assert r0["removed"] == r1["removed"] == single_cb.shrink.removed
    assert r0["heads"] == r1["heads"] == single.blocks[0].attn.num_heads < HEADS
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    _assert_weights_close(r0["weights"], _weights(single))
