"""RandomChannels and RandomUnstructured: exact counts, the polynomial schedule, seeding, resume and DDP."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from unit_checks import CompressAtFitEnd, check_unit_masks, check_weights_masked

import lightning_prune as lp
from lightning_prune.callbacks.schedules import polynomial_sparsity
from lightning_prune.functional import kept_count
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune_baselines import RandomChannels, RandomUnstructured, channel_groups, first_k_keep


def _spy(cls):
    class Spy(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates, self.keeps = [], []

        def update_masks(self, new_masks, trainer=None):
            super().update_masks(new_masks, trainer)
            self.updates.append((trainer.global_step, self.current_target, self.masks.state_dict()))
            if self.channel_wise:
                self.keeps.append([k.clone() for k in self.keep])

    return Spy


@pytest.mark.parametrize("model_name", ["test_efficientnet", "test_vit"])
def test_random_unstructured_follows_the_schedule_with_exact_nested_counts(tmp_path, model_name):
    # the old `begin_step=2, end_step=8` (a ramp over steps 2..8) is now a window opening at step 2 and a ramp
    pruner = _spy(RandomUnstructured)(
        target_sparsity=0.8,
        begin_step=2,
        sparsity_begin_step=2,
        sparsity_end_step=8,
        every_n_steps=2,
        verbose=False,
    )
    fit_tiny(
        [pruner],
        tmp_path,
        model=tiny_classifier(model_name),
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=0,
    )
    steps = [step for step, _, _ in pruner.updates]
    assert steps == [2, 4, 6, 8]  # then the target is reached and the masks stay
    previous = None
    for step, sparsity, masks in pruner.updates:
        assert sparsity == pytest.approx(polynomial_sparsity(step, 0.0, 0.8, 2, 8, 3.0))
        assert set(masks) == set(pruner.weight_names)  # weights only
        for name, mask in masks.items():
            assert int(mask.sum()) == kept_count(mask.numel(), sparsity), name
            if previous is not None:
                assert not torch.any(mask & ~previous[name]), name  # nested
        previous = masks
    assert pruner.sparsity_metrics()["prune/sparsity"] == pytest.approx(0.8, abs=0.01)
    for name, mask in pruner.masks.items():  # and the model's weights are exact zeros there after training
        assert torch.all(pruner.masks.param(name)[~mask] == 0)


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_random_channels_schedule_prunes_nested_random_units_and_compresses_exactly(tmp_path, model_name):
    pruner = _spy(RandomChannels)(target_sparsity=0.6, sparsity_end_step=6, every_n_steps=3, verbose=False)
    at_end = CompressAtFitEnd(pruner, torch.randn(8, 3, 32, 32))
    _, model = fit_tiny([pruner, at_end], tmp_path, model=tiny_classifier(model_name), max_epochs=2,
                        limit_train_batches=5, limit_val_batches=0)
    assert [step for step, _, _ in pruner.updates] == [1, 4, 7]
    groups = pruner.groups
    assert [g.name for g in groups] == [g.name for g in channel_groups(tiny_classifier(model_name))]
    previous = None
    for (step, sparsity, masks), keep in zip(pruner.updates, pruner.keeps):
        assert sparsity == pytest.approx(polynomial_sparsity(step, 0.0, 0.6, 0, 6, 3.0))
        assert len(keep) == len(groups)
        for group, kept in zip(groups, keep):  # exact counts of units per group, nested
            assert kept.shape == (group.size,), group.name
            assert int(kept.sum()) == kept_count(group.size, sparsity), group.name
        if previous is not None:
            assert all(not torch.any(k & ~p) for k, p in zip(keep, previous))
        # every tensor of a pruned unit is masked there (filters, BatchNorm and LayerNorm entries, the
        # readers' columns, pos_embed, layer scales...), nothing else
        check_unit_masks(at_end.state, groups, keep, masks)
        previous = keep
    assert all(torch.equal(k, p) for k, p in zip(pruner.keep, previous))
    assert any(not torch.equal(k, first_k_keep(k.numel(), 0.6)) for k in previous)  # not the first k
    # the BatchNorm and LayerNorm biases did not grow back during training; the kept entries trained
    check_weights_masked(at_end.state, at_end.masks)
    units = sum(g.size for g in groups)
    assert at_end.metrics["prune/channel_sparsity"] == pytest.approx(
        sum(g.size - kept_count(g.size, 0.6) for g in groups) / units
    )
    # with the callback's restricted norms attached, the masked model is the compressed one
    at_end.check(groups, previous)
    assert not any(m._forward_hooks for m in model.modules())  # teardown left a plain model


def test_updates_stop_at_the_end_of_the_window(tmp_path):
    # end_step closes the window (as for GradualMagnitudePruning): no update after step 6, although the ramp
    # (to step 10, given as the fraction 10/12 of training) has not reached the target
    pruner = _spy(RandomUnstructured)(
        target_sparsity=0.8,
        begin_step=2,
        end_step=6,
        every_n_steps=2,
        sparsity_end_step=10 / 12,
        verbose=False,
    )
    fit_tiny([pruner], tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=0)
    assert [step for step, _, _ in pruner.updates] == [2, 4, 6]
    assert pruner.schedule == (2, 6, 0, 10)
    assert pruner.current_target == pytest.approx(polynomial_sparsity(6, 0.0, 0.8, 0, 10, 3.0))
    assert pruner.current_target < pruner.target_sparsity
    assert pruner.sparsity_metrics()["prune/sparsity"] == pytest.approx(pruner.current_target, abs=0.01)


def test_same_seed_same_masks_other_seed_other_masks(tmp_path):
    def masks(cls, seed, root, run_seed=0):
        pruner = cls(target_sparsity=0.5, seed=seed, verbose=False)
        fit_tiny(
            [pruner], tmp_path / root, seed=run_seed, max_epochs=1, limit_train_batches=1, limit_val_batches=0
        )
        return pruner.masks.state_dict(), pruner.state_dict()["rng_state"]

    for cls in (RandomChannels, RandomUnstructured):
        (a, rng_a), (b, _), (c, _) = (
            masks(cls, 7, f"{cls.__name__}a"),
            masks(cls, 7, f"{cls.__name__}b"),
            masks(cls, 8, f"{cls.__name__}c"),
        )
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], c[n]) for n in a)
        assert not torch.equal(rng_a, torch.Generator().manual_seed(7).get_state())  # the state advanced
        # seed=None (the default) is what seed_everything set, resolved at fit start
        (d, _), (e, _) = (
            masks(cls, None, f"{cls.__name__}d", run_seed=7),
            masks(cls, None, f"{cls.__name__}e"),
        )
        assert all(torch.equal(a[n], d[n]) for n in a)
        assert any(not torch.equal(a[n], e[n]) for n in a)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        (
            "random_channels",
            {
                "target_sparsity": 0.6,
                "begin_step": 1,
                "sparsity_begin_step": 1,
                "sparsity_end_step": 8,
                "every_n_steps": 2,
            },
        ),
        (
            "random_unstructured",
            {"target_sparsity": 0.7, "initial_sparsity": 0.1, "sparsity_end_step": 0.75, "every_n_steps": 3},
        ),
    ],
)
def test_resume_mid_schedule_draws_the_same_numbers(tmp_path, name, kwargs):
    # 3 epochs x 4 steps, resumed from the checkpoint after step 4: later draws come from the saved generator
    state = check_callback_conformance(
        lambda: lp.create_callback(name, verbose=False, **kwargs),
        tmp_path,
        max_epochs=3,
        limit_train_batches=4,
    )
    assert state["current_target"] == pytest.approx(kwargs["target_sparsity"])
    assert state["updated_at_step"] > 4 and isinstance(state["rng_state"], torch.Tensor)
    # (begin, end, sparsity_begin, sparsity_end); end_step=1.0 (the default) is stored as 2**62: never stop
    assert state["schedule"] == ([1, 2**62, 1, 8] if name == "random_channels" else [0, 2**62, 0, 9])
    if name == "random_channels":  # the kept units of every group, checkpointed with the masks
        assert len(state["keep"]) == len(channel_groups(tiny_classifier()))
        assert all(int(k.sum()) == kept_count(k.numel(), 0.6) for k in state["keep"])
    else:
        assert state.get("keep") is None


class _SaveMasks(Callback):
    def __init__(self, pruner, out):
        self.pruner, self.out = pruner, out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "masks": self.pruner.masks.state_dict(),
                "rng": self.pruner.rng_state,
                "keep": self.pruner.keep,
                "groups": [g.name for g in self.pruner.groups],
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow  # about 45 s on 2 busy CPU cores (two spawned processes)
def test_ddp_spawn_masks_identical_on_both_ranks_and_to_a_single_process_run(tmp_path):
    kwargs = {"target_sparsity": 0.5, "sparsity_end_step": 4, "every_n_steps": 2, "verbose": False}
    run = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 0}
    pruner = RandomChannels(**kwargs)
    fit_tiny([pruner, _SaveMasks(pruner, tmp_path)], tmp_path, strategy="ddp_spawn", devices=2, **run)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = RandomChannels(**kwargs)
    fit_tiny([single], tmp_path / "single", **run)
    assert rank0["groups"] == rank1["groups"] == [g.name for g in single.groups] and len(single.groups) > 10
    assert set(rank0["masks"]) == set(rank1["masks"]) == set(single.masks.names())
    for a, b, c in zip(rank0["keep"], rank1["keep"], single.keep):
        assert torch.equal(a, b) and torch.equal(a, c)
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), name
        assert torch.equal(mask, single.masks[name].cpu()), name
    assert torch.equal(rank0["rng"], rank1["rng"])
    assert single.sparsity_metrics()["prune/channel_sparsity"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("cls", [RandomChannels, RandomUnstructured])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"target_sparsity": 1.0},
            r"`target_sparsity` must be a number in \[0, 1\), got 1.0. HINT: 0.75 prunes",
        ),
        ({"target_sparsity": True}, r"`target_sparsity` must be a number in \[0, 1\), got True"),
        ({"target_sparsity": float("nan")}, r"`target_sparsity` must be a number in \[0, 1\), got nan"),
        (
            {"target_sparsity": 0.5, "initial_sparsity": 0.6},
            r"`initial_sparsity` must be a number in \[0, 0.5\], got 0.6. HINT: the schedule grows",
        ),
        (
            {"begin_step": -1},
            r"`begin_step` must be optimizer steps \(an int >= 0\) or a fraction of training"
            r" \(a float in \[0, 1\]\), got -1. HINT: a step \(int\) or a fraction",
        ),
        ({"begin_step": True}, r"`begin_step` must be optimizer steps \(an int >= 0\) .* got True"),
        ({"begin_step": float("inf")}, r"`begin_step` must be optimizer steps \(an int >= 0\) .* got inf"),
        # the window and the ramp must not end before they begin (the old `end_step < begin_step` check)
        ({"begin_step": 5, "end_step": 3}, r"`end_step` \(3\) must not come before `begin_step` \(5\)\."),
        (
            {"sparsity_begin_step": 0.5, "sparsity_end_step": 0.25},
            r"`sparsity_end_step` \(0.25\) must not come before `sparsity_begin_step` \(0.5\)\.",
        ),
        (
            {"end_step": 1.5},
            r"`end_step` must be optimizer steps \(an int >= 0\) .* got 1.5. HINT: 1.0 keeps the window open",
        ),
        ({"end_step": float("nan")}, r"`end_step` must be optimizer steps \(an int >= 0\) .* got nan"),
        # (the old `end_step=0.0` case is gone: 0.0 is now a valid fraction of training, a window closing
        # at step 0)
        (
            {"sparsity_begin_step": -3},
            r"`sparsity_begin_step` must be optimizer steps \(an int >= 0\) .* got -3. HINT: a step \(int\)",
        ),
        (
            {"sparsity_end_step": 1.5},
            r"`sparsity_end_step` must be optimizer steps \(an int >= 0\) .* got 1.5. HINT: 0 prunes to the"
            r" target at once",
        ),
        (
            {"sparsity_end_step": False},
            r"`sparsity_end_step` must be optimizer steps \(an int >= 0\) .* got False",
        ),
        ({"every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0. HINT: masks change every"),
        ({"every_n_steps": True}, r"`every_n_steps` must be an integer >= 1, got True"),
        ({"every_n_steps": 2.5}, r"`every_n_steps` must be an integer >= 1, got 2.5"),
        ({"exponent": 0}, r"`exponent` must be a number > 0, got 0. HINT: 3 is the cubic schedule"),
        ({"exponent": True}, r"`exponent` must be a number > 0, got True"),
        ({"exponent": float("inf")}, r"`exponent` must be a number > 0, got inf"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"seed": 1.0}, r"`seed` must be an integer >= 0, got 1.0"),
        ({"seed": True}, r"`seed` must be an integer >= 0, got True"),
        ({"log_media_every_n_epochs": -1}, r"`log_media_every_n_epochs` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_fail_at_construction(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("value", "shown"),
    [((3, -1, 32), r"\(3, -1, 32\)"), ((3, 32, 0), r"\(3, 32, 0\)"), ("3x32x32", "'3x32x32'"), ((), r"\(\)"),
     ((3, 32.0, 32), r"\(3, 32.0, 32\)")],
)
def test_bad_input_size_fails_at_construction(value, shown):
    match = (r"`input_size` must be None or a sequence of positive ints such as \(3, 32, 32\), got "
             rf"{shown}\. HINT: it is the shape of one input sample")
    with pytest.raises(MisconfigurationException, match=match):
        RandomChannels(input_size=value)
    assert RandomChannels(input_size=[3, 32, 32]).input_size == (3, 32, 32)


def test_state_keys_tell_instances_apart():
    assert RandomChannels(seed=1).state_key != RandomChannels(seed=2).state_key
    assert (
        RandomUnstructured(target_sparsity=0.5).state_key != RandomUnstructured(target_sparsity=0.9).state_key
    )


def test_wandb_media_for_channel_masks(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pruner = RandomChannels(target_sparsity=0.5, verbose=False)
    logger = WandbLogger(save_dir=str(tmp_path), project="baselines")
    trainer, _ = fit_tiny(
        [pruner], tmp_path, logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=0
    )
    run_dir = logger.experiment.dir
    logger.experiment.finish()
    images = {
        p.name.rsplit("_", 2)[0] for p in (tmp_path / "wandb").glob("*/files/media/images/prune/mask/*.png")
    }
    assert images == set(pruner.weight_names), images  # one image per weight, none for BatchNorms
    # the BatchNorms, the first conv's filters, the classifier's columns: masked with the units, not shown
    extra = {"model.bn1.weight", "model.bn1.bias", "model.conv1.0.weight", "model.fc.weight"}
    assert extra <= set(pruner.masks.names()) and not extra & images
    assert run_dir and trainer.global_step == 2
