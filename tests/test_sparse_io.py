"""Sparse checkpoints: bitmask + non-zero values, bit-identical on load, several times smaller when sparse."""

import io

import pytest
import timm
import torch

import lightning_prune as lp
from lightning_prune.deploy.sparse_io import decode_tensor, encode_tensor, pack_bits, unpack_bits
from lightning_prune.functional import magnitude_mask
from lightning_prune.testing import TINY_MODELS, fit_tiny, tiny_classifier


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 != 0.0 and NaN == NaN)."""
    return t.detach().contiguous().view(torch.uint8) if t.is_floating_point() else t


def assert_bit_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


@torch.no_grad()
def _prune_(model: torch.nn.Module, sparsity: float) -> None:
    """What a mask leaves: weight * mask, so negative pruned weights become -0.0."""
    for p in model.parameters():
        if p.dim() > 1:
            p.mul_(magnitude_mask(p.abs(), sparsity))


def _dense_bytes(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def test_pack_and_unpack_bits_round_trip():
    bits = torch.rand(1001, generator=torch.Generator().manual_seed(0)) > 0.7
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, bits.numel()), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_encode_keeps_every_bit_signed_zeros_nan_and_inf_included(dtype):
    t = torch.zeros(40, 30, dtype=dtype)
    t[0, :5] = torch.tensor([1.5, -2.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    t[3, 7] = -0.0
    t[9, 9] = 1e-30 if dtype != torch.float16 else 1e-7  # a denormal-ish value is not a zero
    entry = encode_tensor(t)
    assert entry is not None and "zero_signs" in entry
    assert torch.equal(_bits(decode_tensor(entry)), _bits(t))
    plain = torch.zeros(40, 30, dtype=dtype)
    plain[1, 1] = 3.0
    assert "zero_signs" not in encode_tensor(plain)  # no -0.0: no sign bits stored


def test_dense_and_integer_tensors_are_stored_as_they_are():
    assert encode_tensor(torch.randn(10, 10)) is None  # no zeros: bitmask + values would be larger
    assert encode_tensor(torch.arange(10)) is None


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_round_trip_is_bit_identical_on_timm_models(tmp_path, model_name):
    kwargs = TINY_MODELS[model_name]
    model = timm.create_model(model_name, num_classes=10, **kwargs)
    _prune_(model, 0.9)
    info = lp.save_sparse(model, tmp_path / "m.pt")
    assert info.sparse_tensors > 0 and info.file_bytes == (tmp_path / "m.pt").stat().st_size
    fresh = timm.create_model(model_name, num_classes=10, **kwargs)
    loaded = lp.load_sparse(tmp_path / "m.pt", fresh)
    assert loaded is fresh
    assert_bit_identical(model.state_dict(), fresh.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_loads_with_weights_only(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    _prune_(model, 0.5)
    lp.save_sparse(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "lightning_prune.sparse/1"


def test_a_ninety_percent_sparse_resnet18_is_several_times_smaller(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    sizes = {}
    for sparsity in (0.5, 0.9, 0.97):
        _prune_(model, sparsity)
        sizes[sparsity] = lp.save_sparse(model, tmp_path / f"{sparsity}.pt").file_bytes
        assert_bit_identical(model.state_dict(), lp.load_sparse(tmp_path / f"{sparsity}.pt"))
    dense = _dense_bytes(model.state_dict())
    assert dense / sizes[0.9] > 5 and dense / sizes[0.97] > 9 and sizes[0.5] < dense
    assert sizes[0.97] < sizes[0.9] < sizes[0.5]


def test_a_lightning_module_state_dict_and_a_trained_pruned_run(tmp_path):
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.8, every_n_steps=2, sparsity_end_step=4,
                                        verbose=False)
    _, module = fit_tiny([pruner], tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=1)
    info = lp.save_sparse(module.state_dict(), tmp_path / "state.pt")
    assert 0.5 < info.sparsity < 1.0
    fresh = lp.load_sparse(tmp_path / "state.pt", tiny_classifier())
    assert_bit_identical(module.state_dict(), fresh.state_dict())
    for name, mask in pruner.masks.items():  # the masked weights are zeros again, bit for bit
        assert torch.equal(_bits(fresh.get_parameter(name)), _bits(pruner.masks.param(name)))
        assert not fresh.get_parameter(name)[~mask].any()


def test_a_compressed_model_loads_onto_a_fresh_architecture(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        model.layer1[0].conv2.weight[:, :8] = 0  # channels that no layer reads
    small = lp.compress(model, input_size=(3, 32, 32), inplace=False)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    _prune_(small, 0.5)
    lp.save_sparse(small, tmp_path / "small.pt")
    fresh = lp.load_sparse(tmp_path / "small.pt", timm.create_model("test_resnet", num_classes=10))
    assert_bit_identical(small.state_dict(), fresh.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(small.eval()(x), fresh.eval()(x))


class TiedTwin(torch.nn.Module):
    """A timm model and a second layer that shares one of its weights (tied weights: two state_dict keys)."""

    def __init__(self):
        super().__init__()
        self.body = timm.create_model("test_resnet", num_classes=10)
        conv = self.body.layer2[0].conv2
        self.twin = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, bias=False)
        self.twin.weight = conv.weight


def test_tied_weights_are_stored_once_and_load_back_tied(tmp_path):
    model = TiedTwin()
    _prune_(model, 0.9)
    tied = lp.save_sparse(model, tmp_path / "tied.pt")
    alone = lp.save_sparse(model.body, tmp_path / "body.pt")
    assert tied.sparse_tensors == alone.sparse_tensors and tied.dense_bytes == alone.dense_bytes
    assert tied.file_bytes < alone.file_bytes + 1000  # the twin costs its name, not its values again
    fresh = lp.load_sparse(tmp_path / "tied.pt", TiedTwin())
    assert_bit_identical(model.state_dict(), fresh.state_dict())
    assert fresh.twin.weight is fresh.body.layer2[0].conv2.weight
    state = lp.load_sparse(tmp_path / "tied.pt")
    assert state["twin.weight"] is state["body.layer2.0.conv2.weight"]
    assert state["body.bn1.num_batches_tracked"].dtype == torch.int64  # integer buffers as they are


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(lp.InvalidArgumentTypeError, match=r"`model` must be an nn.Module .* got list"):
        lp.save_sparse([1, 2], tmp_path / "x.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(lp.InvalidArgumentError, match=r"was not written by lightning_prune.save_sparse"):
        lp.load_sparse(tmp_path / "plain.pt")
    model = timm.create_model("test_resnet", num_classes=10)
    _prune_(model, 0.9)
    lp.save_sparse(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    key = next(iter(payload["sparse"]))
    payload["sparse"][key]["values"] = payload["sparse"][key]["values"][:-1]
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(lp.InvalidArgumentError, match=r"the file is damaged"):
        lp.load_sparse(tmp_path / "damaged.pt")
    with pytest.raises(lp.InvalidArgumentError, match=r"does not fit VisionTransformer: missing keys"):
        lp.load_sparse(tmp_path / "m.pt", timm.create_model("test_vit", num_classes=10, img_size=32))
