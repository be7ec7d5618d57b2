"""Physical channel removal and save/load (lightning_prune.compress)."""

from __future__ import annotations

import importlib

import pytest
import timm
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.compression import (
    CompressionError,
    compress,
    dead_channels,
    load_compressed,
    save_compressed,
)
from lightning_prune.gates import find_channel_groups
from lightning_prune.testing import TINY_MODELS, tiny_classifier

FAMILIES = list(TINY_MODELS)
compress_mod = importlib.import_module("lightning_prune.compression")


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **{**TINY_MODELS.get(name, {}), **kwargs})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.fill_(1.0)
    return model.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _kill(model: nn.Module, groups, every: int = 2) -> int:
    """Zero every ``every``-th channel at each group's gate sites (what a zero gate folds into)."""
    killed = 0
    for group in groups:
        for site in group.sites:
            module = model.get_submodule(site)
            module.weight[::every] = 0
            if module.bias is not None:
                module.bias[::every] = 0
        killed += len(range(0, group.size, every))
    return killed


def _channels(model: nn.Module) -> int:
    return sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize(("name", "coupled"), [(n, False) for n in FAMILIES] + [("test_resnet", True)])
def test_compress_equals_masked_model_and_reloads(name, coupled, tmp_path):
    """Deleting zeroed channels leaves eval logits unchanged; save -> load onto a fresh timm model."""
    model = _model(name)
    groups, _ = find_channel_groups(model, X, prune_coupled=coupled)
    _kill(model, groups)
    masked = model(X)
    params = sum(p.numel() for p in model.parameters())
    out = compress(model, X)
    assert out is model
    assert sum(p.numel() for p in model.parameters()) < params
    torch.testing.assert_close(model(X), masked, atol=1e-5, rtol=1e-4)
    save_compressed(model, tmp_path / "small.pt")
    fresh = lp.load_compressed(tmp_path / "small.pt",
                               timm.create_model(name, num_classes=10, **TINY_MODELS.get(name, {})))
    assert torch.equal(fresh.eval()(X), model(X))
    assert dead_channels(model, X) == []  # nothing left to remove


def test_residual_channel_removed_only_when_every_branch_is_dead():
    model = _model("test_resnet")
    branches = ("layer2.0.bn2", "layer2.0.downsample.2")
    with torch.no_grad():
        model.get_submodule(branches[0]).weight[:5] = 0
        model.get_submodule(branches[0]).bias[:5] = 0
    assert dead_channels(model, X) == []  # one branch of the sum still carries channels 0-4
    with torch.no_grad():
        model.get_submodule(branches[1]).weight[:3] = 0
        model.get_submodule(branches[1]).bias[:3] = 0
    assert dead_channels(model, X) == [("layer2.0.downsample.1", [0, 1, 2], 48)]
    before = model(X)
    compress(model, X)
    assert model.layer2[0].conv2.out_channels == 45 and model.layer3[0].conv1.in_channels == 45
    torch.testing.assert_close(model(X), before, atol=1e-5, rtol=1e-4)


def test_round_to_keeps_widths_multiple():
    model = _model("test_resnet")
    groups, _ = find_channel_groups(model, X)
    _kill(model, groups, every=3)  # e.g. 32 channels -> 11 dead, 21 alive
    before = model(X)
    compress(model, X, round_to=8)
    for group in groups:
        assert model.get_submodule(group.name).out_channels % 8 == 0
    torch.testing.assert_close(model(X), before, atol=1e-5, rtol=1e-4)


def test_zero_conv_without_bn_and_zero_filter_before_bn():
    model = _model("test_vit")
    fc1 = model.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.weight[:7] = 0
        fc1.bias[:7] = 0
        fc1.bias[7] = 1.0
        fc1.weight[7] = 0  # zero filter but a nonzero bias: not dead
    assert dead_channels(model, X) == [("blocks.0.mlp.fc1", list(range(7)), fc1.out_features)]
    resnet = _model("test_resnet")
    with torch.no_grad():
        resnet.layer1[0].conv1.weight[:4] = 0  # the BatchNorm after it still adds beta - gamma*mu/sigma
    assert dead_channels(resnet, X) == []


class SigmoidNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sigmoid()
        self.conv2, self.pool, self.fc = nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.act(self.bn(self.conv1(x))))).flatten(1))


def test_activation_with_nonzero_at_zero_is_not_removed(monkeypatch):
    model = SigmoidNet().eval()
    with torch.no_grad():
        model.bn.weight[:4] = 0
        model.bn.bias[:4] = 0
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    assert dead_channels(model, x) == []  # sigmoid(0) = 0.5 reaches conv2
    compress(model, x)
    assert model.conv1.out_channels == 8
    torch.testing.assert_close(model(x), before)
    # if the check were fooled, the output comparison still refuses the result
    monkeypatch.setattr(compress_mod, "_covers", lambda *args, **kwargs: True)
    with pytest.raises(CompressionError, match="changed the outputs"):
        compress(model, x)


def test_compress_lightning_module_copy_and_dense_noop():
    module = tiny_classifier("test_resnet")
    module.eval()
    groups, _ = find_channel_groups(module.model, X)
    _kill(module.model, groups, every=3)
    before = module(X)
    small = compress(module, inplace=False, input_size=(3, 32, 32))
    assert small is not module and _channels(small.model) < _channels(module.model)
    torch.testing.assert_close(small(X), before, atol=1e-5, rtol=1e-4)
    dense = _model("test_resnet")
    n = _channels(dense)
    compress(dense, X)
    assert _channels(dense) == n


def test_public_name_is_callable_even_after_importing_the_submodule():
    model = _model("test_resnet")
    assert callable(lp.compress) and lp.compress(model, X) is model


def test_load_compressed_rejects_other_files(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not written by lightning_prune.save_compressed"):
        load_compressed(tmp_path / "x.pt", _model("test_resnet"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "regnety_002", "densenet121"])
def test_compress_real_timm_families(name, tmp_path):
    model = _model(name)
    groups, _ = find_channel_groups(model, X, prune_coupled=True)
    assert groups
    _kill(model, groups)
    masked = model(X)
    compress(model, X)
    torch.testing.assert_close(model(X), masked, atol=1e-5, rtol=1e-4)
    save_compressed(model, tmp_path / "m.pt")
    assert torch.equal(load_compressed(tmp_path / "m.pt", timm.create_model(name, num_classes=10)).eval()(X),
                       model(X))
