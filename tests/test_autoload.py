import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune import GradualMagnitudePruning
from lightning_prune._autoload import callbacks_from_env, parse_spec


def test_parse_spec_values_and_several_callbacks():
    spec = "magnitude:target_sparsity=0.9,every_n_steps=50,block_size=(1, 4),scope=layer; magnitude"
    assert parse_spec(spec) == [
        ("magnitude", {"target_sparsity": 0.9, "every_n_steps": 50, "block_size": (1, 4), "scope": "layer"}),
        ("magnitude", {}),
    ]


def test_unset_adds_nothing(monkeypatch):
    assert callbacks_from_env() == []
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not any(isinstance(cb, GradualMagnitudePruning) for cb in trainer.callbacks)


def test_environment_adds_callbacks_to_every_trainer(monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE", "magnitude:target_sparsity=0.9,every_n_steps=50")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    found = [cb for cb in trainer.callbacks if isinstance(cb, GradualMagnitudePruning)]
    assert len(found) == 1 and found[0].target_sparsity == 0.9 and found[0].every_n_steps == 50


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("magnitude:target_sparsity",
         r"'target_sparsity' in 'magnitude:target_sparsity' is not a key=value pair"),
        ("magnitude:=3", r"'=3' .* is not a key=value pair"),
        (":target_sparsity=0.9", "does not start with a callback name"),
        ("nope:x=1", "No pruning callback named 'nope'"),
        ("magnitud:x=1", "No pruning callback named 'magnitud'.* Did you mean 'magnitude'"),
        ("magnitude:bogus=1", r"'magnitude' \(GradualMagnitudePruning\) has no argument `bogus`; its argum"),
        ("magnitude:target_sparsty=0.5", "has no argument `target_sparsty`; did you mean `target_sparsity`"),
        ("magnitude:target_sparsity=1.5", r"'magnitude': `target_sparsity` must be a number in \[0, 1\), "),
        ("magnitude:scope='all'", "'magnitude': `scope` must be one of"),
    ],
)
def test_malformed_value_names_the_bad_part(monkeypatch, value, match):
    monkeypatch.setenv("LIGHTNING_PRUNE", value)
    with pytest.raises(MisconfigurationException, match=match) as raised:
        pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert str(raised.value).startswith("LIGHTNING_PRUNE: "), "the variable is named as the source"
