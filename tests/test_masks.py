import pytest
import torch
from torch import nn

from lightning_prune.core.masks import MaskSet
from lightning_prune.core.targets import resolve_targets


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))


def test_masks_are_bool_one_byte_per_parameter_and_apply_in_place():
    model = _model()
    masks = MaskSet.for_targets(resolve_targets(model))
    assert all(m.dtype == torch.bool for _, m in masks.items())
    n = sum(t.param.numel() for t in resolve_targets(model))
    assert masks.memory_bytes() == n
    weight = model[0].weight
    data_ptr = weight.data_ptr()
    mask = torch.rand_like(weight) > 0.5
    masks.update({"0.weight": mask})
    assert weight.data_ptr() == data_ptr  # in place: no copy of the weight
    assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
    assert masks.sparsity() == pytest.approx(float((~mask).sum()) / n)
    assert masks.layer_sparsity()["3.weight"] == 0.0


def test_state_dict_round_trip_and_errors():
    model = _model()
    masks = MaskSet.for_targets(resolve_targets(model))
    masks.update({"3.weight": torch.rand_like(model[3].weight) > 0.3})
    state = masks.state_dict()
    other_model = _model()
    other = MaskSet.for_targets(resolve_targets(other_model))
    other.load_state_dict(state)
    assert torch.equal(other["3.weight"], masks["3.weight"])
    assert torch.all(other_model[3].weight[~state["3.weight"]] == 0)
    with pytest.raises(KeyError, match="does not target"):
        other.load_state_dict({"9.weight": state["3.weight"]})
    with pytest.raises(ValueError, match="shape"):
        other.update({"0.weight": torch.ones(3, dtype=torch.bool)})


def test_optimizer_state_is_zeroed_at_pruned_positions():
    model = _model()
    masks = MaskSet.for_targets(resolve_targets(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    mask = torch.rand_like(model[0].weight) > 0.5
    masks.update({"0.weight": mask})
    masks.mask_optimizer_state(opt)
    assert torch.all(opt.state[model[0].weight]["momentum_buffer"][~mask] == 0)
