"""Resume with another configuration is refused, naming the callback and what differs; a callback added or
removed and a state written by an older version load with a warning."""

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.testing import assert_state_equal, fit_tiny

FIT = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}


def _fit_with_checkpoints(callbacks, root):
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=2, filename="{step}")
    _, model = fit_tiny([*callbacks, saver], root / "full", **FIT)
    return model, root / "ckpt" / "step=2.ckpt"


def _messages(record):
    return [str(w.message) for w in record]


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("magnitude")
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, verbose=False)
    model, ckpt = _fit_with_checkpoints([pruner], root)
    return pruner, model, ckpt


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"target_sparsity": 0.8}, r"`target_sparsity` \(checkpoint 0.5, now 0.8\)"),  # another state_key
    ({"target_sparsity": 0.5, "every_n_steps": 3}, r"`every_n_steps` \(checkpoint 1, now 3\)"),
    ({"target_sparsity": 0.5, "scope": "layer"}, r"`scope` \(checkpoint 'global', now 'layer'\)"),
])
def test_magnitude_refuses_changed_arguments(magnitude_run, tmp_path, kwargs, expected):
    _, _, ckpt = magnitude_run
    pruner = lp.GradualMagnitudePruning(**{"every_n_steps": 1, "verbose": False, **kwargs})
    message = r"^GradualMagnitudePruning: the checkpoint was written with other arguments.*" + expected
    with pytest.raises(MisconfigurationException, match=message):
        fit_tiny([pruner], tmp_path, ckpt_path=ckpt, **FIT)


def test_magnitude_resumes_with_another_verbosity(magnitude_run, tmp_path):
    full_pruner, full_model, ckpt = magnitude_run
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, verbose=True,
                                        log_media_every_n_epochs=0)
    _, model = fit_tiny([pruner], tmp_path, ckpt_path=ckpt, **FIT)
    assert_state_equal({k: v for k, v in full_pruner.state_dict().items() if k != "config"},
                       {k: v for k, v in pruner.state_dict().items() if k != "config"})


def test_lottery_refuses_another_number_of_rounds(tmp_path):
    _, ckpt = _fit_with_checkpoints([lp.LotteryTicket(rounds=1, verbose=False)], tmp_path)
    with pytest.raises(MisconfigurationException, match=r"LotteryTicket: .*`rounds` \(checkpoint 1, now 3\)"):
        fit_tiny([lp.LotteryTicket(rounds=3, epochs_per_round=1, verbose=False)], tmp_path / "r",
                 ckpt_path=ckpt, **{**FIT, "max_epochs": 4})


def test_activation_decay_refuses_another_schedule(tmp_path):
    _, ckpt = _fit_with_checkpoints([lp.ActivationDecay(end_step=4, verbose=False)], tmp_path)
    message = r"ActivationDecay: .*`end_step` \(checkpoint 4, now 5\)"
    with pytest.raises(MisconfigurationException, match=message):
        fit_tiny([lp.ActivationDecay(end_step=5, verbose=False)], tmp_path / "r", ckpt_path=ckpt, **FIT)


def test_removed_callback_warns_once_and_loads_the_zeros(magnitude_run, tmp_path):
    _, _, ckpt = magnitude_run
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    weight = "model.layer1.0.conv1.weight"
    assert (saved[weight] == 0).any()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, model = fit_tiny([], tmp_path, ckpt_path=ckpt, **{**FIT, "max_epochs": 1})
    ignored = [m for m in _messages(record) if "pruning state of GradualMagnitudePruning" in m]
    assert len(ignored) == 1, _messages(record)
    assert "is ignored" in ignored[0]


def test_added_callback_starts_fresh_with_a_warning(tmp_path):
    _, ckpt = _fit_with_checkpoints([], tmp_path)
    pruner = lp.GradualMagnitudePruning(every_n_steps=1, verbose=False)
    with pytest.warns(UserWarning, match=r"GradualMagnitudePruning: the checkpoint holds no state for this"
                      r" callback .* starts fresh at step 2"):
        fit_tiny([pruner], tmp_path / "r", ckpt_path=ckpt, **FIT)
    assert pruner.masks.sparsity() > 0


def test_old_state_without_keys_loads_with_defaults_and_masks_from_the_weights(magnitude_run, tmp_path):
    full_pruner, full_model, ckpt = magnitude_run
    checkpoint = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GradualMagnitudePruning")]
    state = checkpoint["callbacks"][key]
    for dropped in ("masks", "thresholds", "config"):
        del state[dropped]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, verbose=False)
    with pytest.warns(UserWarning, match=r"GradualMagnitudePruning: the checkpoint's state lacks 'masks',"
                      r" 'thresholds' \(written by an older version\); loading them with their defaults, the"
                      r" masks rebuilt from the zeros of the weights"):
        _, model = fit_tiny([pruner], tmp_path / "r", ckpt_path=old, **FIT)
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert_state_equal(full_pruner.state_dict()["masks"], pruner.state_dict()["masks"])


def test_distillation_refuses_another_alpha(tmp_path):
    _, ckpt = _fit_with_checkpoints([lp.KnowledgeDistillation(alpha=0.5, verbose=False)], tmp_path)
    message = r"KnowledgeDistillation: .*`alpha` \(checkpoint 0.5, now 0.7\)"
    with pytest.raises(MisconfigurationException, match=message):
        fit_tiny([lp.KnowledgeDistillation(alpha=0.7, verbose=False)], tmp_path / "r", ckpt_path=ckpt, **FIT)
