import pytest
import torch

from lightning_prune.functional import (
    block_magnitude,
    kept_count,
    kth_largest,
    magnitude_mask,
    threshold_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99])
def test_kept_count_is_round_n_one_minus_s_without_ties(sparsity):
    w = torch.randperm(1000).float() + 1  # distinct magnitudes
    mask = magnitude_mask(w, sparsity)
    assert int(mask.sum()) == kept_count(1000, sparsity) == max(round(1000 * (1 - sparsity)), 1)
    assert w[mask].min() > w[~mask].max() if (~mask).any() else True


def test_ties_keep_extra_weights_like_tfmot():
    w = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert magnitude_mask(w, 0.6).tolist() == [False, True, True, True, True]  # k=2, threshold 2 keeps all 2s


def test_masks_are_nested_when_pruned_weights_are_zeroed():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    previous = torch.ones_like(w, dtype=torch.bool)
    for s in [0.2, 0.5, 0.7, 0.9]:
        mask = magnitude_mask(w.abs(), s)
        assert not (mask & ~previous).any()
        w = w * mask
        previous = mask


def test_zero_threshold_never_revives_zeros():
    w = torch.tensor([0.0, 0.0, 0.0, 5.0])
    assert threshold_mask(w, kth_largest(w, 3)).tolist() == [False, False, False, True]


def test_block_average_pooling_scores_whole_blocks():
    w = torch.tensor([[1.0, 3.0, 10.0, 10.0], [1.0, 3.0, 0.0, 0.0]])
    scores = block_magnitude(w, (2, 2))
    assert scores.tolist() == [[2.0, 2.0, 5.0, 5.0], [2.0, 2.0, 5.0, 5.0]]
    assert block_magnitude(w, (2, 2), "max").tolist() == [[3.0, 3.0, 10.0, 10.0]] * 2
    mask = magnitude_mask(scores, 0.5)
    assert mask.tolist() == [[False, False, True, True]] * 2


def test_partial_blocks_average_over_real_elements_and_minus_one_is_whole_dim():
    w = torch.arange(1.0, 16.0).reshape(3, 5)
    scores = block_magnitude(w, (2, 2))
    assert scores.shape == w.shape
    assert scores[2, 4] == 15.0  # a 1x1 remainder block is its own value
    assert scores[0, 4] == pytest.approx((5.0 + 10.0) / 2)
    rows = block_magnitude(w, (1, -1))
    assert torch.allclose(rows[:, 0], w.mean(dim=1))


def test_non_2d_weights_are_scored_per_element():
    w = torch.randn(4, 3, 3, 3)
    assert torch.equal(block_magnitude(w, (2, 2)), w.abs())


@pytest.mark.parametrize("rounding", [None, 1])
def test_kth_largest_of_several_tensors_equals_kthvalue_of_the_concatenation(rounding):
    from lightning_prune.functional import kth_largest_of

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).abs() for n in (7000, 3, 12000, 500)]
    if rounding is not None:  # many ties, and ties at histogram bin edges
        tensors = [t.round(decimals=rounding) for t in tensors]
    tensors[0][:1000] = 0
    flat = torch.cat(tensors)
    for k in (1, 2, 100, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        assert torch.equal(kth_largest_of(tensors, k), kth_largest(flat, k)), k
