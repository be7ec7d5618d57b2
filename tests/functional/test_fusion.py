"""The fusion formulas (VanillaNet, RepVGG, DiverseBranchBlock), checked numerically (float64, <= 1e-6)."""

import pytest
import torch
import torch.nn.functional as F

from lightning_prune.functional import (
    expand_groups,
    fold_bn,
    fuse_1x1_kxk,
    fuse_conv_1x1,
    fuse_kxk_kxk,
    identity_kernel,
    pad_kernel,
)

TOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("linear", [False, True])
def test_conv_bn_fold_is_exact(linear):
    bn = torch.nn.BatchNorm2d(6).double() if not linear else torch.nn.BatchNorm1d(6).double()
    bn.running_mean.copy_(_rand(6))
    bn.running_var.copy_(_rand(6).abs() + 0.1)
    bn.weight.data.copy_(_rand(6))
    bn.bias.data.copy_(_rand(6))
    bn.eval()
    if linear:
        w, b, x = _rand(6, 5), _rand(6), _rand(8, 5)
        ref = bn(F.linear(x, w, b))
        wf, bf = fold_bn(w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        out = F.linear(x, wf, bf)
    else:
        w, x = _rand(6, 4, 3, 3), _rand(2, 4, 9, 9)
        ref = bn(F.conv2d(x, w, None, stride=2, padding=1))
        wf, bf = fold_bn(w, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)  # no conv bias
        out = F.conv2d(x, wf, bf, stride=2, padding=1)
    assert _max_err(out, ref) <= TOL


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 1), (2, 0, 1), (1, 1, 8)])
def test_any_conv_then_1x1_is_exact(stride, padding, groups):
    w1, b1 = _rand(8, 8 // groups, 3, 3), _rand(8)
    w2, b2 = _rand(5, 8, 1, 1), _rand(5)
    x = _rand(2, 8, 10, 10)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride, padding, groups=groups), w2, b2)
    w, b = fuse_conv_1x1(expand_groups(w1, groups), b1, w2, b2)
    assert _max_err(F.conv2d(x, w, b, stride, padding), ref) <= TOL


def test_vanillanet_matmul_form_equals_einsum():
    """VanillaNet's ``matmul(W2.transpose(1, 3), W1.squeeze()).transpose(1, 3)`` (its 1×1 convs)."""
    w1, w2 = _rand(7, 4, 1, 1), _rand(6, 7, 1, 1)
    vanilla = torch.matmul(w2.transpose(1, 3), w1.squeeze(3).squeeze(2)).transpose(1, 3)
    w, _ = fuse_conv_1x1(w1, None, w2, None)
    assert _max_err(w, vanilla) <= TOL


def test_linear_then_linear_is_exact():
    w1, b1, w2, b2, x = _rand(16, 4), _rand(16), _rand(3, 16), _rand(3), _rand(5, 7, 4)
    w, b = fuse_conv_1x1(w1, b1, w2, b2)
    assert _max_err(F.linear(x, w, b), F.linear(F.linear(x, w1, b1), w2, b2)) <= TOL


def test_1x1_then_kxk_exact_without_padding():
    w1, b1, w2, b2 = _rand(6, 4, 1, 1), _rand(6), _rand(5, 6, 3, 3), _rand(5)
    x = _rand(2, 4, 9, 9)
    k, b = fuse_1x1_kxk(w1, b1, w2, b2)
    assert k.shape == (5, 4, 3, 3)
    assert _max_err(F.conv2d(x, k, b), F.conv2d(F.conv2d(x, w1, b1), w2, b2)) <= TOL
    # with the intermediate map padded with the bias value (DBB's BNAndPadLayer) it is exact too
    bias_map = b1[None, :, None, None]
    mid = F.pad(F.conv2d(x, w1, b1) - bias_map, (1, 1, 1, 1)) + bias_map
    assert _max_err(F.conv2d(F.pad(x, (1, 1, 1, 1)), k, b), F.conv2d(mid, w2, b2)) <= TOL


def test_1x1_then_kxk_with_zero_padding_has_border_error_only():
    w1, b1, w2, b2 = _rand(6, 4, 1, 1), _rand(6), _rand(5, 6, 3, 3), _rand(5)
    x = _rand(2, 4, 9, 9)
    k, b = fuse_1x1_kxk(w1, b1, w2, b2)
    ref, out = F.conv2d(F.conv2d(x, w1, b1), w2, b2, padding=1), F.conv2d(x, k, b, padding=1)
    assert _max_err(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]) <= TOL
    assert _max_err(out, ref) > 0.1  # zero padding leaves a border error [0.24]


def test_kxk_then_kxk_exact_for_valid_convs_border_error_when_padded():
    w1, b1, w2, b2 = _rand(6, 4, 3, 3), _rand(6), _rand(5, 6, 3, 3), _rand(5)
    x = _rand(2, 4, 11, 11)
    m, b = fuse_kxk_kxk(w1, b1, w2, b2)
    assert m.shape == (5, 4, 5, 5)
    assert _max_err(F.conv2d(x, m, b), F.conv2d(F.conv2d(x, w1, b1), w2, b2)) <= TOL
    # strided second conv
    assert _max_err(F.conv2d(x, m, b, stride=2), F.conv2d(F.conv2d(x, w1, b1), w2, b2, stride=2)) <= TOL
    # "same" padding: interior only [border error 0.42 in the reference]
    ref = F.conv2d(F.conv2d(x, w1, b1, padding=1), w2, b2, padding=1)
    out = F.conv2d(x, m, b, padding=2)
    assert _max_err(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2]) <= TOL
    assert _max_err(out, ref) > 0.1


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_identity_kernel_is_the_identity(groups):
    x = _rand(2, 8, 6, 6)
    k = identity_kernel(8, 3, groups=groups, dtype=torch.float64)
    assert k.shape == (8, 8 // groups, 3, 3)
    assert _max_err(F.conv2d(x, k, padding=1, groups=groups), x) == 0.0


def test_repvgg_branches_add_into_one_kernel():
    k3, b3, k1, b1, x = _rand(8, 8, 3, 3), _rand(8), _rand(8, 8, 1, 1), _rand(8), _rand(2, 8, 7, 7)
    ref = F.conv2d(x, k3, b3, padding=1) + F.conv2d(x, k1, b1) + x
    k = k3 + pad_kernel(k1, 3) + identity_kernel(8, 3, dtype=torch.float64)
    assert _max_err(F.conv2d(x, k, b3 + b1, padding=1), ref) <= TOL


def test_expand_groups_matches_grouped_conv():
    w, x = _rand(8, 2, 3, 3), _rand(1, 8, 5, 5)
    assert _max_err(F.conv2d(x, expand_groups(w, 4), padding=1), F.conv2d(x, w, padding=1, groups=4)) <= TOL


def test_leaky_relu_is_the_decayed_relu():
    """VanillaNet's F.leaky_relu(x, λ) equals (1 - λ) relu(x) + λ x [verified]."""
    x = _rand(1000)
    for lam in (0.0, 0.3, 0.7, 1.0):
        assert _max_err(F.leaky_relu(x, lam), (1 - lam) * F.relu(x) + lam * x) <= 1e-12


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="first conv must be 1x1"):
        fuse_1x1_kxk(_rand(4, 4, 3, 3), None, _rand(4, 4, 3, 3), None)
    with pytest.raises(ValueError, match="channel mismatch"):
        fuse_conv_1x1(_rand(4, 3, 3, 3), None, _rand(2, 5, 1, 1), None)
    with pytest.raises(ValueError, match="must be odd"):
        identity_kernel(4, 2)
    with pytest.raises(ValueError, match="larger than"):
        pad_kernel(_rand(2, 2, 5, 5), 3)
