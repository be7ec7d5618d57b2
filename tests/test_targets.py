import pytest
import timm
from torch import nn

from lightning_prune.core.targets import matches, resolve_targets, timm_default_exclusions
from lightning_prune.errors import NoTargetsError
from lightning_prune.testing import TINY_MODELS, tiny_classifier


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_timm_first_conv_and_classifier_are_excluded_by_metadata(model_name):
    module = tiny_classifier(model_name)
    cfg = module.model.pretrained_cfg
    names = {t.module_name for t in resolve_targets(module)}
    assert names, "nothing targeted"
    assert f"model.{cfg['first_conv']}" not in names
    assert f"model.{cfg['classifier']}" not in names
    assert all(isinstance(t.module, (nn.Conv2d, nn.Linear)) for t in resolve_targets(module))


def test_resnet18_defaults_exclude_conv1_and_fc_only():
    model = timm.create_model("resnet18", num_classes=10)
    names = [t.module_name for t in resolve_targets(model)]
    assert "conv1" not in names and "fc" not in names
    assert len(names) == 19 and "layer1.0.conv1" in names and "layer2.0.downsample.0" in names


def test_sequential_stem_is_excluded_whole():
    # test_resnet's first_conv is "conv1.0" inside a deep stem
    assert "model.conv1.0" in timm_default_exclusions(tiny_classifier("test_resnet"))


def test_nested_attribute_and_plain_module():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.ModuleDict({"net": timm.create_model("test_resnet", num_classes=10)})

    names = {t.module_name for t in resolve_targets(Wrapper())}
    assert "backbone.net.fc" not in names and "backbone.net.layer1.0.conv1" in names
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [t.name for t in resolve_targets(mlp)] == ["0.weight", "2.weight"]  # no timm metadata: everything


def test_include_narrows_the_default_set_and_exclude_applies_last():
    module = tiny_classifier("test_resnet")
    names = {t.module_name for t in resolve_targets(module, include=["layer1.*", "fc"], exclude="*.conv2")}
    assert names and all(n.startswith("model.layer1") for n in names)  # the classifier stays out
    assert not any(n.endswith("conv2") for n in names)
    with pytest.raises(NoTargetsError, match="first conv and classifier are never targets"):
        resolve_targets(module, include="fc")


def test_include_keeps_the_type_filter_on_resnet18_layer4():
    """The new user's trap: `include=['layer4.*']` used to select layer4's BatchNorms too."""
    model = timm.create_model("resnet18", num_classes=10)
    targets = resolve_targets(model, include=["layer4.*"])
    assert len(targets) == 5 and all(isinstance(t.module, nn.Conv2d) for t in targets)
    assert all(t.module_name.startswith("layer4.") for t in targets)


def test_types_widens_the_default_set():
    model = timm.create_model("resnet18", num_classes=10)
    targets = resolve_targets(model, include=["layer4.*"], types=(nn.Conv2d, nn.BatchNorm2d))
    kinds = {type(t.module) for t in targets}
    assert kinds == {nn.Conv2d, nn.BatchNorm2d} and len(targets) == 10


def test_patterns_match_full_names_and_dotted_suffixes():
    assert matches("model.layer1.0.conv1", ["layer1.*"])
    assert matches("model.layer1.0.conv1", ["model.layer1.0.conv1"])
    assert matches("model.layer1.0.conv1", ["conv1"])
    assert not matches("model.layer1.0.conv1", ["layer2.*"])


def test_nothing_matched_names_patterns_and_existing_modules():
    module = tiny_classifier("test_resnet")
    with pytest.raises(NoTargetsError, match=r"include=\['nope\*'\].*Modules that could be: model\.conv1\.3"):
        resolve_targets(module, include="nope*")
    with pytest.raises(NoTargetsError, match="HINT"):
        resolve_targets(module, exclude="*")
    with pytest.raises(NoTargetsError, match="Modules that could be: none"):
        resolve_targets(nn.Sequential(nn.ReLU()))
    # our own error is a ValueError: no Lightning exception from a model function
    with pytest.raises(ValueError):
        resolve_targets(module, include="nope*")
