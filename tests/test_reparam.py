"""Decaying activations, the fusion plan and `reparameterize` on real timm models."""

import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.core.reparam import (
    DecayingActivation,
    plan_reparameterization,
    reparameterize,
    set_lambda,
    unwrap_activations,
    wrap_activations,
)
from lightning_prune.core.targets import matches
from lightning_prune.errors import CompressionError, InvalidArgumentError
from lightning_prune.training.reducenet import ReduceBlock
from tests.helpers import trained_looking

# (model name, kwargs, glob every default-selected activation matches, count)
FAMILIES = {
    "test_resnet": ({}, "layer3.0.act2", 1),  # its one Bottleneck; BasicBlocks do not fuse
    "test_efficientnet": ({}, "*", 4),  # EdgeResidual 3x3 -> 1x1 and the SE reduce -> expand
    "test_convnext": ({}, "*.mlp.act", 9),
    "test_vit": ({"img_size": 32}, "*.mlp.act", 6),
    "reducenet_20": ({}, "blocks.*.act", 9),
}
SMALL_BOTTLENECK = {"channels": (8, 16, 24, 32), "stem_width": 8}  # timm resnet26: Bottleneck blocks


def _model(name, **kwargs):
    torch.manual_seed(0)
    return trained_looking(timm.create_model(name, num_classes=10, **kwargs))


def _max_rel(out, ref):
    return ((out - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1)).max().item()


def _count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


# ------------------------------------------------------------------ wrapper
def test_wrapper_formula_for_several_activations():
    x = torch.randn(200)
    for act in (nn.ReLU(), nn.GELU(), nn.SiLU(), timm.layers.get_act_layer("gelu_tanh")()):
        for lam in (0.0, 0.25, 1.0):
            out = DecayingActivation(act, lam)(x)
            assert torch.allclose(out, (1 - lam) * act(x) + lam * x, atol=1e-6)
    assert torch.equal(DecayingActivation(nn.ReLU(), 0.3)(x), nn.functional.leaky_relu(x, 0.3))


def test_wrapping_keeps_state_dict_keys_and_unwraps_cleanly():
    model = _model("test_resnet")
    keys = list(model.state_dict())
    plan = plan_reparameterization(model)
    act = model.get_submodule("layer3.0.act2")
    assert act.inplace
    wrapped = wrap_activations(model, plan.decay, 0.5)
    assert list(model.state_dict()) == keys
    assert not any(True for w in wrapped.values() for _ in w.parameters())
    assert not any(True for w in wrapped.values() for _ in w.buffers())
    assert set_lambda(model, 0.7) == 1 and wrapped["layer3.0.act2"].lam == 0.7
    assert unwrap_activations(model) == ["layer3.0.act2"]
    assert model.get_submodule("layer3.0.act2") is act and act.inplace
    assert not any(isinstance(m, DecayingActivation) for m in model.modules())


def test_wrapper_refuses_activation_with_parameters():
    with pytest.raises(ValueError, match="has parameters or buffers"):
        DecayingActivation(nn.PReLU())


# ------------------------------------------------------------------ plan
def test_plan_test_resnet_basic_blocks_do_not_fuse():
    plan = plan_reparameterization(_model("test_resnet"))
    assert plan.decay == ["layer3.0.act2"]
    assert [(f.first, f.second, f.kind) for f in plan.fusions] == [
        ("layer3.0.conv2", "layer3.0.conv3", "conv∘1×1")]
    # BasicBlock 3x3 -> 3x3 with zero padding, bottleneck 1x1 -> 3x3 padded: not exact, and said so
    assert "not exact at the border" in plan.rejected["layer1.0.act1"]
    assert "not exact at the border" in plan.rejected["layer3.0.act1"]
    assert "add()" in plan.rejected["layer1.0.act2"]
    assert "layer1.0.act1" in str(plan) and "not exact" in str(plan)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_finds_exact_fusions_on_timm_families(name):
    kwargs, pattern, count = FAMILIES[name]
    plan = lp.ActivationDecay.plan(_model(name, **kwargs))
    assert len(plan.decay) == count and len(plan.fusions) == count
    assert all(matches(n, [pattern]) for n in plan.decay)


def test_plan_bottleneck_resnet_and_inverted_residual():
    plan = plan_reparameterization(_model("resnet26", **SMALL_BOTTLENECK))
    assert plan.decay == [f"layer{i}.{j}.act2" for i in range(1, 5) for j in range(2)]  # 3x3 -> last 1x1
    assert all("act1" in n or "act3" in n or n == "act1" for n in plan.rejected)
    plan = plan_reparameterization(_model("mobilenetv2_050"))
    # inside each inverted residual: after the depthwise conv, before the pointwise-linear projection
    assert {f.second.rsplit(".", 1)[1] for f in plan.fusions} == {"conv_pw", "conv_pwl"}
    assert all(n.endswith(("bn1.act", "bn2.act")) for n in plan.decay)
    assert "blocks.1.0.bn2.act" in plan.decay and "blocks.1.0.bn1.act" in plan.rejected


def test_plan_include_narrows_and_fusable_only_false_widens():
    model = _model("test_resnet")
    plan = plan_reparameterization(model, include=["layer1.*.act1", "layer3.0.act2"])
    assert plan.decay == ["layer3.0.act2"] and len(plan.fusions) == 1  # layer1.0.act1 cannot fuse: not added
    assert "not exact at the border" in plan.rejected["layer1.0.act1"]
    plan = plan_reparameterization(model, include=["layer1.*.act1", "layer3.0.act2"], fusable_only=False)
    assert plan.decay == ["layer1.0.act1", "layer3.0.act2"] and len(plan.fusions) == 1
    assert "fusable_only=False; no exact fusion" in str(plan)
    assert (plan_reparameterization(model, include=["layer1.*"]).rejected["layer3.0.act2"]
            == "not selected by `include`")
    plan = lp.ActivationDecay(exclude="*.mlp.act", verbose=False).plan(_model("test_vit", img_size=32))
    assert plan.decay == [] and all(v == "excluded by `exclude`" for v in plan.rejected.values())


class _SharedAct(nn.Module):
    """torchvision style: one ReLU module called after every conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.c(self.relu(self.b(self.relu(self.a(x)))))


def test_shared_activation_called_at_a_non_fusable_place_is_kept():
    plan = plan_reparameterization(_SharedAct())
    assert plan.decay == [] and "called at 2 places" in plan.rejected["relu"]


def test_nothing_fusable_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    plan = plan_reparameterization(model)
    assert not plan and "not exact at the border" in plan.rejected["1"]
    with pytest.raises(CompressionError, match="Nothing to fuse"):
        reparameterize(model)


def test_untraceable_model_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x)) if x.sum() > 0 else x

    with pytest.raises(InvalidArgumentError, match="Could not trace .* HINT: pass `fusable_only=False`"):
        plan_reparameterization(Dynamic())
    assert plan_reparameterization(Dynamic(), include="act", fusable_only=False).decay == ["act"]


# ------------------------------------------------------------------ reparameterize
@pytest.mark.parametrize("name", [*FAMILIES, "resnet26", "mobilenetv2_050"])
def test_fused_outputs_equal_unfused(name):
    kwargs = FAMILIES[name][0] if name in FAMILIES else SMALL_BOTTLENECK if name == "resnet26" else {}
    model = _model(name, **kwargs)
    plan = plan_reparameterization(model)
    wrap_activations(model, plan.decay, 1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        n_linear = _count(model, (nn.Conv2d, nn.Linear))
        fused = reparameterize(model, inplace=False).eval()
        out = fused(x)
    assert _max_rel(out, ref) <= 1e-4
    assert _count(fused, (nn.Conv2d, nn.Linear)) == n_linear - len(plan.fusions)
    assert not any(isinstance(m, DecayingActivation) for m in fused.modules())
    if name != "reducenet_20":  # ReduceBlocks fuse themselves (timm's reparameterize_model path)
        assert len(fused._lightning_prune_fusions) == len(plan.fusions)
    if name != "test_convnext" and name != "test_vit":  # no BatchNorm left to fold
        assert _count(fused, nn.modules.batchnorm._BatchNorm) < _count(model, nn.modules.batchnorm._BatchNorm)


def test_reducenet_fuses_into_a_plain_stack_of_3x3_convs(tmp_path):
    model = _model("reducenet_20")
    wrap_activations(model, plan_reparameterization(model).decay, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize(model).eval()
        out = fused(x)
    assert _max_rel(out, ref) <= 1e-4
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 9 and all(c.kernel_size == (3, 3) for c in convs)  # stem + one 3x3 per block
    assert _count(fused, nn.BatchNorm2d) == 0
    assert _count(fused, nn.ReLU) == 1  # only the stem's activation, which never decays
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_reducenet_act_fuses_into_the_plain_baseline_architecture():
    model = _model("reducenet_20_act")
    plan = plan_reparameterization(model)
    assert len(plan.decay) == 9 and "blocks.0.act_out" in plan.rejected  # the permanent ReLU stays
    wrap_activations(model, plan.decay, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize(model).eval()
        assert _max_rel(fused(x), ref) <= 1e-4
    plain = timm.create_model("reducenet_20_plain", num_classes=10)
    shapes = lambda m: [tuple(c.weight.shape) for c in m.modules() if isinstance(c, (nn.Conv2d, nn.Linear))]  # noqa
    assert shapes(fused) == shapes(plain)
    assert _count(fused, nn.ReLU) == _count(plain, nn.ReLU) == 10


def test_reducenet_bad_block_type():
    with pytest.raises(ValueError, match="`block` must be 'reduce' or 'plain', got 'vgg'"):
        timm.create_model("reducenet_20", block="vgg")


def test_reducenet_block_refuses_to_fuse_before_decay():
    block = ReduceBlock(4, 4)
    with pytest.raises(RuntimeError, match="not the identity"):
        block.reparameterize()
    with pytest.raises(RuntimeError, match="not the identity"):
        reparameterize(timm.create_model("reducenet_20", num_classes=10))


def test_fusing_with_lambda_below_one_is_refused():
    model = _model("test_vit", img_size=32)
    wrap_activations(model, plan_reparameterization(model).decay, 0.99)
    with pytest.raises(CompressionError, match=r"λ < 1.*blocks\.0\.mlp\.act \(λ=0\.99\)"):
        reparameterize(model)


def test_reparameterize_a_checkpoint_loaded_without_wrappers():
    model = _model("test_convnext")
    plan = plan_reparameterization(model)
    wrap_activations(model, plan.decay, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fresh = timm.create_model("test_convnext", num_classes=10)
    fresh.load_state_dict(model.state_dict())  # same keys: a plain timm checkpoint
    fused = reparameterize(fresh, decayed=plan.decay).eval()
    with torch.no_grad():
        assert _max_rel(fused(x), ref) <= 1e-4


def test_timm_reparameterize_model_is_applied():
    model = _model("repvgg_a0")  # timm's own RepVGG blocks, no decay involved
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize(model, inplace=False).eval()
        assert _max_rel(fused(x), ref) <= 1e-4
    assert _count(fused, nn.Conv2d) < _count(model, nn.Conv2d)


def test_reducenet_is_registered_with_timm():
    expected = {"reducenet_20", "reducenet_56", "reducenet_20_act", "reducenet_56_act", "reducenet_20_plain"}
    assert expected <= set(timm.list_models("reducenet_*"))
    model = timm.create_model("reducenet_20_plain", num_classes=10)
    assert model.pretrained_cfg["first_conv"] == "stem.0" and model.pretrained_cfg["classifier"] == "fc"
    assert not plan_reparameterization(model)  # the plain baseline has nothing to decay


@pytest.mark.slow  # a fresh interpreter: ~15 s on 2 busy cores
def test_reducenet_is_registered_by_importing_its_module():
    """As lightning_prune/__init__.py says: ``import lightning_prune`` stays light (lazy); the ReduceNet
    models are registered by ``lp.ImageClassifier``, by the first lazy name used, or by importing their
    module."""
    code = ("import lightning_prune.training.reducenet, timm;"
            " m = timm.create_model('reducenet_56', num_classes=10); print(len(m.blocks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "27"
    assert "reducenet_20_plain" in timm.list_models("reducenet_*")
