"""N:M sparsity in GradualMagnitudePruning (``pattern="2:4"``) and the pure functions under it."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune import GradualMagnitudePruning
from lightning_prune.functional import (
    nm_blocks,
    nm_mask,
    nm_schedule_masks,
    nm_violations,
    parse_pattern,
    ramp_kept,
)
from lightning_prune.testing import (
    TINY_MODELS,
    assert_state_equal,
    check_callback_conformance,
    fit_tiny,
    tiny_classifier,
)

FAST = {"max_epochs": 2, "limit_train_batches": 6, "limit_val_batches": 1}


def _pruner(**kwargs):
    defaults = {"pattern": "2:4", "target_sparsity": 0.5, "every_n_steps": 2, "sparsity_end_step": 8,
                "verbose": False}
    return GradualMagnitudePruning(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- functions
@pytest.mark.parametrize("shape", [(6, 8), (5, 10), (4, 7, 3, 3), (3, 4, 1, 1), (8, 1, 3, 3)])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_mask_keeps_the_top_n_of_every_block_along_the_input_dimension(shape, n, m):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    blocks, kept = nm_blocks(scores, m, fill=-1.0), nm_blocks(mask, m, fill=False)
    for block, keep in zip(blocks.reshape(-1, m), kept.reshape(-1, m)):
        real = block >= 0
        expected = min(n, int(real.sum()))
        assert int(keep.sum()) == expected
        assert set(block.topk(expected).indices.tolist()) == set(keep.nonzero().flatten().tolist())
    assert nm_violations(scores * mask, n, m) == 0


def test_blocks_run_along_dimension_one_of_a_conv_weight():
    weight = torch.zeros(2, 8, 3, 3)
    weight[0, 0:3, 1, 1] = 1.0  # three non-zeros among input channels 0-3 at one kernel position
    assert nm_violations(weight, 2, 4) == 1
    weight = torch.zeros(2, 8, 3, 3)
    weight[0, 0, :, :] = 1.0  # nine non-zeros along the kernel, one per block of input channels
    assert nm_violations(weight, 2, 4) == 0


def test_schedule_masks_blend_lands_on_the_pattern_and_keeps_the_count():
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(16, 32, generator=gen), "b": torch.rand(8, 16, 3, 3, generator=gen)}
    total = sum(s.numel() for s in scores.values())
    pattern = {k: nm_mask(s, 2, 4) for k, s in scores.items()}
    for sparsity in (0.0, 0.2, 0.45):
        masks = nm_schedule_masks(scores, sparsity, 2, 4, "blend")
        assert sum(int(m.sum()) for m in masks.values()) == round(total * (1 - sparsity))
        for k in scores:  # only weights outside the final pattern go
            assert bool((masks[k] | ~pattern[k]).all())
    final = nm_schedule_masks(scores, 0.5, 2, 4, "blend")
    assert all(torch.equal(final[k], pattern[k]) for k in scores)
    beyond = nm_schedule_masks(scores, 0.7, 2, 4, "blend")  # more than the pattern: pruned inside it
    assert sum(int(m.sum()) for m in beyond.values()) == round(total * 0.3)
    assert all(nm_violations(scores[k] * beyond[k], 2, 4) == 0 for k in scores)


def test_schedule_masks_steps_hold_a_pattern_at_every_sparsity():
    scores = {"w": torch.rand(32, 64, generator=torch.Generator().manual_seed(2))}
    for sparsity in (0.0, 0.1, 0.2, 0.3, 0.45, 0.5, 0.6):
        per_block = ramp_kept(sparsity, 2, 4)
        mask = nm_schedule_masks(scores, sparsity, 2, 4, "steps")["w"]
        assert nm_violations(scores["w"] * mask, per_block, 4) == 0
        assert int(mask.sum()) == min(round(2048 * (1 - sparsity)), 2048 * per_block // 4)


def test_zeros_are_never_kept_so_masks_are_nested():
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    scores[:, :3] = 0.0  # already pruned
    for ramp in ("blend", "steps"):
        for sparsity in (0.1, 0.5):
            mask = nm_schedule_masks({"w": scores}, sparsity, 2, 4, ramp)["w"]
            assert not mask[:, :3].any()


def test_blend_lands_on_the_pattern_where_blocks_hold_fewer_than_n_non_zeros():
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    scores[:, :3] = 0.0  # the first block of every row has one non-zero: the pattern holds 12 of the 16
    for sparsity in (0.5, 0.6):  # the count is more than the pattern holds, but the pattern must hold
        mask = nm_schedule_masks({"w": scores}, sparsity, 2, 4, "blend")["w"]
        assert nm_violations(scores * mask, 2, 4) == 0, sparsity
    assert int(nm_schedule_masks({"w": scores}, 0.5, 2, 4, "blend")["w"].sum()) == 12
    assert int(nm_schedule_masks({"w": scores}, 0.45, 2, 4, "blend")["w"].sum()) == 18  # on the way: count


def test_a_model_pruned_unstructured_before_is_fine_tuned_into_the_pattern(tmp_path):
    module = tiny_classifier()
    with torch.no_grad():  # a 60% unstructured-pruned model: many blocks of 4 hold fewer than 2 weights
        for p in module.model.parameters():
            if p.dim() > 1:
                p.mul_(p.abs() > p.abs().flatten().kthvalue(int(0.6 * p.numel())).values)
    pruner = _pruner()
    probe = PatternProbe(pruner)
    fit_tiny([pruner, probe], tmp_path, model=module, **FAST)
    assert probe.exact >= 3 and pruner.pattern_violations() == 0


@pytest.mark.parametrize("bad", ["2:2", "4:2", "0:4", "a:4", "2-4", "2:4:8", 24, None])
def test_parse_pattern_rejects_anything_but_n_below_m(bad):
    with pytest.raises(ValueError, match="an N:M pattern is a string 'N:M'"):
        parse_pattern(bad)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("1:16") == (1, 16)


# ---------------------------------------------------------------------------------------------- callback
class PatternProbe(Callback):
    """Before every training step (after the masks of the previous one were applied): masked weights are zero,
    and the pattern holds (``"steps"``: at every step, ``"blend"``: once the target is reached)."""

    def __init__(self, pruner, n=2, m=4):
        self.pruner, self.n, self.m, self.checked, self.exact = pruner, n, m, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pruner = self.pruner
        for name, mask in pruner.masks.items():
            assert torch.all(pruner.masks.param(name)[~mask] == 0), name
        s = pruner.current_target
        if pruner.pattern_ramp == "steps":
            bound = ramp_kept(s, self.n, self.m)
        else:
            bound = self.n if s >= 1 - self.n / self.m - 1e-9 else self.m
        for name in pruner.masks:
            assert nm_violations(pruner.masks.param(name), bound, self.m) == 0, (trainer.global_step, name)
        self.checked += 1
        self.exact += bound == self.n


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
@pytest.mark.parametrize("ramp", ["blend", "steps"])
def test_the_pattern_holds_in_every_block_at_every_step_on_timm_families(tmp_path, model_name, ramp):
    pruner = _pruner(pattern_ramp=ramp)
    probe = PatternProbe(pruner)
    trainer, _ = fit_tiny([pruner, probe], tmp_path, **FAST,
                          model=tiny_classifier(model_name))
    assert probe.checked == 12 and probe.exact >= 3  # the pattern is exact for the last steps
    assert pruner.pattern_violations() == 0
    for name in pruner.masks:
        weight = pruner.masks.param(name)
        assert nm_violations(weight, 2, 4) == 0, name
        if weight.shape[1] % 4 == 0:  # full blocks: at most half of the weights kept
            assert int(pruner.masks[name].sum()) <= weight.numel() // 2, name
    # one global count: layers with shorter blocks (depthwise convs) keep more, so others give up a few
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=0.005)
    assert trainer.callback_metrics.get("prune/pattern_violations", torch.tensor(0.0)) == 0


def test_a_target_beyond_the_pattern_prunes_inside_it_in_layer_scope(tmp_path):
    pruner = _pruner(target_sparsity=0.75, scope="layer")
    fit_tiny([pruner, PatternProbe(pruner)], tmp_path, **FAST)
    for name, mask in pruner.masks.items():
        assert nm_violations(pruner.masks.param(name), 2, 4) == 0
        assert 1 - mask.float().mean().item() == pytest.approx(0.75, abs=0.02), name


def test_one_in_four_with_a_step_ramp(tmp_path):
    pruner = _pruner(pattern="1:4", target_sparsity=0.75, pattern_ramp="steps")
    probe = PatternProbe(pruner, n=1, m=4)
    fit_tiny([pruner, probe], tmp_path, **FAST)
    assert probe.exact >= 3
    assert pruner.masks.sparsity() == pytest.approx(0.75, abs=0.01)


def test_unstructured_default_is_unchanged_and_the_state_key_too():
    plain = GradualMagnitudePruning()
    assert plain.pattern is None and "pattern" not in plain.state_key
    assert _pruner().state_key != plain.state_key


@pytest.mark.parametrize("ramp", ["blend", "steps"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, ramp):
    state = check_callback_conformance(
        lambda: GradualMagnitudePruning(pattern="2:4", every_n_steps=2, sparsity_end_step=6,
                                        pattern_ramp=ramp, verbose=False),
        tmp_path, max_epochs=3, resume_epoch=1)  # resumes at step 4, mid-ramp
    masks = state["masks"]
    assert masks and all(nm_violations(m.to(torch.uint8), 2, 4) == 0 for m in masks.values())
    assert_state_equal(state["schedule"], [0, 2**63 - 1, 0, 6])


@pytest.mark.parametrize("ramp", ["blend", "steps"])
def test_the_pattern_holds_at_every_step_after_resume(tmp_path, ramp):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    fit_tiny([_pruner(pattern_ramp=ramp), saver], tmp_path / "first", **{**FAST, "max_epochs": 1})
    pruner = _pruner(pattern_ramp=ramp)  # fresh, resumed mid-ramp at step 6 of 12
    probe = PatternProbe(pruner)
    fit_tiny([pruner, probe], tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", **FAST)
    assert probe.checked == 6 and probe.exact >= 3 and pruner.pattern_violations() == 0


class _RankMasks(Callback):
    def __init__(self, pruner, out):
        self.pruner, self.out = pruner, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for name in self.pruner.masks:  # the pattern holds on every rank at every step once reached
            if self.pruner.current_target >= 0.5:
                assert nm_violations(self.pruner.masks.param(name), 2, 4) == 0

    def on_train_end(self, trainer, pl_module):
        torch.save(self.pruner.masks.state_dict(), self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_both_ranks_hold_the_same_pattern(tmp_path):
    pruner = _pruner(sparsity_end_step=4)
    fit_tiny([pruner, _RankMasks(pruner, tmp_path)], tmp_path, strategy="ddp_spawn", devices=2, **FAST)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == set(rank1) and len(rank0) > 5
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert nm_violations(rank0[name].to(torch.uint8), 2, 4) == 0, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU converts for real")
def test_semi_structured_plan_of_a_2_4_vit_and_clear_errors_without_a_gpu(tmp_path, monkeypatch):
    import copy

    import lightning_prune as lp

    pruner = _pruner(sparsity_end_step=4)
    _, module = fit_tiny([pruner], tmp_path, model=tiny_classifier("test_vit"), **FAST)
    vit = module.model
    plan = lp.semi_structured_plan(vit, backend="cutlass")
    eligible = [n for n, why in plan.items() if why is None]
    assert eligible == [n for n in plan if n.startswith("blocks.")] and len(eligible) == 24
    assert plan["head"].startswith("shape 10x64: rows must be a multiple of 32")  # the classifier
    half = lp.semi_structured_plan(copy.deepcopy(vit).half(), backend="cusparselt")
    assert all(why is None for n, why in half.items() if n != "head")
    dense = tiny_classifier("test_vit").model
    fresh = lp.semi_structured_plan(dense, include="blocks.0.*", backend="cutlass")
    assert len(fresh) == 4 and all(why.startswith("not 2:4 sparse: ") for why in fresh.values())
    wide = lp.semi_structured_plan(vit.double(), backend="cutlass")
    assert wide["blocks.0.attn.qkv"].startswith("dtype float64")
    with pytest.raises(lp.UnsupportedDeviceError,
                       match=r"needs a CUDA GPU of compute capability >= 8.0 .* has none .*HINT: prune with"):
        lp.to_semi_structured(vit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(lp.UnsupportedDeviceError,
                       match=r"The model is on cpu, not on the GPU. HINT: .* and, with CUTLASS, float32"):
        lp.to_semi_structured(vit)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": "4:2"}, r"`pattern` must be 'N:M' with integers 1 <= N < M, got '4:2'. HINT"),
        ({"pattern": "2:4:8"}, r"`pattern` must be 'N:M'"),
        ({"pattern": 2}, r"`pattern` must be 'N:M' .* got 2"),
        ({"pattern": "2:4", "target_sparsity": 0.4},
         r"`target_sparsity` \(0.4\) must be at least 0.5 with `pattern`='2:4'.*HINT: target_sparsity=0.5"),
        ({"pattern": "1:4"}, r"must be at least 0.75 .* HINT: target_sparsity=0.75"),
        ({"pattern": "2:4", "block_size": (1, 4)}, r"`block_size` cannot be combined with `pattern`"),
        ({"pattern": "2:4", "threshold_decay": 0.5}, r"`threshold_decay` cannot be combined with `pattern`"),
        ({"pattern": "2:4", "layer_targets": {"layer1*": 0.6}, "target_sparsity": 0.6},
         r"`layer_targets` cannot be combined with `pattern`"),
        ({"pattern": "2:4", "pattern_ramp": "linear"}, r"`pattern_ramp` must be one of \['blend', 'steps'\]"),
    ],
)
def test_bad_pattern_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GradualMagnitudePruning(**kwargs)


def test_one_dimensional_targets_fail_at_setup(tmp_path):
    match = r"`pattern`='2:4' needs weights with an input dimension .* 15 targets are 1-D: \['model.conv1"
    with pytest.raises(MisconfigurationException, match=match):
        fit_tiny([_pruner(types=["Conv2d", "BatchNorm2d"])], tmp_path, **FAST)


def test_a_pattern_read_as_a_base_60_number_says_to_quote_it():
    match = r'got 124\. HINT: YAML 1.1 reads an unquoted 2:4 as the base-60 number 124; quote it: "2:4"'
    with pytest.raises(MisconfigurationException, match=match):
        GradualMagnitudePruning(target_sparsity=0.5, pattern=124)
