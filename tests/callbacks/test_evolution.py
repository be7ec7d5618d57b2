import csv
import pickle
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import EvolutionaryMutation, GradualMagnitudePruning, create_callback
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier

FAST = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1}
KEY = "prune/evolution"


def _evo(**kwargs):
    defaults = {"population": 4, "sigma": 0.01, "every_n_epochs": 1, "fitness_batches": 2, "verbose": False}
    if "every_n_steps" in kwargs:
        defaults.pop("every_n_epochs")
    return EvolutionaryMutation(**{**defaults, **kwargs})


def _val_batches(trainer, n):
    """The first ``n`` validation batches, read independently of the callback."""
    dataset = trainer.datamodule.val_set
    loader = DataLoader(dataset, batch_size=trainer.datamodule.batch_size, shuffle=False)
    return [b for _, b in zip(range(n), loader)]


def _loss(pl_module, batches):
    was = pl_module.training
    pl_module.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(pl_module(x), y, reduction="sum").double() for x, y in batches)
    pl_module.train(was)
    return float(total) / sum(len(y) for _, y in batches)


class Probe(Callback):
    """Placed before and after the evolution callback: records the fitness-set loss, BN buffers and RNG."""

    def __init__(self, evo, record: list, when: str, n_batches: int):
        self.evo, self.record, self.when, self.n = evo, record, when, n_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        buffers = {k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k}
        rng = torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):  # the probe's own DataLoader draws a seed from the global RNG
            loss = _loss(pl_module, _val_batches(trainer, self.n))
        self.record.append({
            "when": self.when, "generation": self.evo.generation, "loss": loss,
            "buffers": buffers, "training": pl_module.training, "rng": rng,
            "params": [p.detach().clone() for p in pl_module.parameters()],
        })


def _probed_fit(evo, tmp_path, model=None, n_batches=2, first=(), **kwargs):
    record = []
    callbacks = [*first, Probe(evo, record, "before", n_batches), evo, Probe(evo, record, "after", n_batches)]
    options = {**FAST, "limit_val_batches": n_batches, **kwargs}
    trainer, module = fit_tiny(callbacks, tmp_path, model=model, **options)
    pairs = list(zip(record[0::2], record[1::2]))
    generations = [(b, a) for b, a in pairs if a["generation"] > b["generation"]]
    return trainer, module, generations


# ---------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("mutation", ["uniform", "gaussian", "gradient"])
def test_select_never_increases_the_fitness_set_loss(tmp_path, mutation):
    sigma = 0.05 if mutation == "gradient" else 0.02
    evo = _evo(strategy="select", mutation=mutation, sigma=sigma, population=6, every_n_steps=2)
    _, _, generations = _probed_fit(evo, tmp_path, max_epochs=1, limit_train_batches=6)
    assert len(generations) == 3
    changed = 0
    for before, after in generations:
        assert after["loss"] <= before["loss"]
        moved = any(not torch.equal(p, q) for p, q in zip(before["params"], after["params"]))
        changed += moved
        if not moved:
            assert after["loss"] == before["loss"]
    assert changed >= 1  # the invariant was exercised on real replacements
    assert evo.last_metrics[f"{KEY}/new_fitness"] >= evo.last_metrics[f"{KEY}/parent_fitness"]
    assert -evo.last_metrics[f"{KEY}/new_fitness"] == pytest.approx(generations[-1][1]["loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["select", "es"])
def test_evaluation_leaves_batchnorm_statistics_modes_and_global_rng_untouched(tmp_path, strategy):
    evo = _evo(strategy=strategy, population=4)
    _, _, generations = _probed_fit(evo, tmp_path)
    assert len(generations) == 2
    for before, after in generations:
        assert before["buffers"] and all(torch.equal(before["buffers"][k], after["buffers"][k])
                                         for k in before["buffers"])
        assert before["training"] and after["training"]
        assert torch.equal(before["rng"], after["rng"])


def test_es_moves_the_parent_and_logs_fitness(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    evo = _evo(strategy="es", mutation="gaussian", population=6, es_lr=0.01)
    _, _, generations = _probed_fit(evo, tmp_path, logger=logger)
    assert len(generations) == 2
    for before, after in generations:
        assert any(not torch.equal(p, q) for p, q in zip(before["params"], after["params"]))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"{KEY}/fitness_max")]
    assert [int(r["step"]) for r in rows] == [4, 8]
    for row in rows:
        lo, mid, hi = (float(row[f"{KEY}/fitness_{s}"]) for s in ("min", "median", "max"))
        assert lo <= mid <= hi < 0  # minus a cross-entropy
        assert float(row[f"{KEY}/sigma"]) == 0.01 and float(row[f"{KEY}/parent_changed"]) == 1.0
    assert -float(rows[-1][f"{KEY}/new_fitness"]) == pytest.approx(generations[-1][1]["loss"], rel=1e-5)


def test_wandb_offline_run_gets_a_fitness_histogram_per_generation(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lightning_prune.testing import read_wandb_offline_history

    logger = WandbLogger(save_dir=str(tmp_path), project="lp-test", offline=True)
    evo = _evo(strategy="select", population=4)
    try:
        fit_tiny([evo], tmp_path, logger=logger, **FAST)
    finally:
        wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    for _ in range(50):  # the W&B service may still be flushing the offline log after wandb.finish()
        history = read_wandb_offline_history(run_dir)
        hists = [r for r in history if f"{KEY}/fitness/_type" in r]
        if len(hists) >= 2:
            break
        time.sleep(0.2)
    assert len(hists) == 2 and hists[-1][f"{KEY}/fitness/_type"] == "histogram"
    changed = [r[f"{KEY}/parent_changed"] for r in history if f"{KEY}/parent_changed" in r]
    assert len(changed) == 2 and set(changed) <= {0.0, 1.0}


def test_gradient_mutation_temperature_shrinks_sigma_as_fitness_improves(tmp_path):
    evo = _evo(strategy="select", mutation="gradient", sigma=0.5, population=4, every_n_steps=1)
    sigmas = []

    class Spy(Callback):
        def on_train_batch_end(self, *args):
            sigmas.append(evo.last_metrics[f"{KEY}/sigma"])

    fit_tiny([evo, Spy()], tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=1)
    assert sigmas[0] == 0.5  # T = 1 at the first generation
    assert evo.initial_error is not None and 0 < min(sigmas[1:]) < 0.5
    error = -evo.last_metrics[f"{KEY}/parent_fitness"]
    assert sigmas[-1] == pytest.approx(0.5 * min(error / evo.initial_error, 1.0))


class Freeze(Callback):
    """No SGD change at all: lr 0 and BatchNorm statistics frozen (eval mode during the training step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 0.0
        pl_module.eval()


def test_gradient_es_at_zero_temperature_keeps_the_parent(tmp_path):
    # the fitness set is labelled with the model's own predictions: error 0 against an initial error of 0.5
    model = tiny_classifier()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    model.train()
    initial = [p.detach().clone() for p in model.parameters()]
    evo = _evo(strategy="es", mutation="gradient", metric="accuracy", population=4, every_n_steps=1,
               fitness_dataloader=DataLoader(TensorDataset(x, y), batch_size=8))
    evo.initial_error = 0.5
    fit_tiny([Freeze(), evo], tmp_path, model=model, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    assert evo.generation == 2
    assert evo.last_metrics[f"{KEY}/sigma"] == 0.0 and evo.last_metrics[f"{KEY}/parent_changed"] == 0.0
    assert evo.last_metrics[f"{KEY}/new_fitness"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(initial, model.parameters()))


def test_fitness_dataloader_fitness_fn_and_accuracy_metric(tmp_path):
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    calls = []

    def fitness_fn(pl_module, batch):
        calls.append(batch[0].shape[0])
        return F.cross_entropy(pl_module(batch[0]), batch[1])

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    evo = _evo(fitness_dataloader=loader, fitness_fn=fitness_fn, fitness_batches=None, population=4)
    fit_tiny([evo], tmp_path, **FAST)
    assert set(calls) == {8} and len(calls) == 2 * (1 + 4) * 3  # 2 generations x 5 evaluations x 3 batches
    acc = _evo(metric="accuracy", population=4)
    fit_tiny([acc], tmp_path, **FAST)
    assert 0.0 <= acc.last_metrics[f"{KEY}/fitness_min"] <= acc.last_metrics[f"{KEY}/fitness_max"] <= 1.0


def test_default_fitness_set_is_capped_by_fitness_batches_and_limit_val_batches(tmp_path):
    calls = []

    def fitness_fn(pl_module, batch):
        calls.append(len(batch[1]))
        return F.cross_entropy(pl_module(batch[0]), batch[1])

    evo = _evo(fitness_fn=fitness_fn, fitness_batches=None)
    fit_tiny([evo], tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    assert calls == [32, 16] * 5  # parent + 4 offspring, both validation batches (48 images) each
    calls.clear()
    fit_tiny([_evo(fitness_fn=fitness_fn, fitness_batches=1)], tmp_path, max_epochs=1, limit_train_batches=2)
    assert calls == [32] * 5


def test_include_exclude_choose_what_mutates(tmp_path):
    evo = _evo(strategy="es", include=["*layer1*"], exclude=["*bn*"], population=4)
    model = tiny_classifier()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in evo.select_parameters(model)]
    assert names and all("layer1" in n and "bn" not in n for n in names)

    fit_tiny([Freeze(), evo], tmp_path, model=model, **FAST)
    changed = {k for k, v in model.state_dict().items() if k in dict(model.named_parameters())
               and not torch.equal(v, initial[k])}
    assert changed and changed <= set(names)


# ---------------------------------------------------------------------------------------------- pruning
class MaskedOffspring(EvolutionaryMutation):
    """Checks at every offspring evaluation that pruned weights are exact zeros."""

    def __init__(self, pruner, **kwargs):
        super().__init__(**kwargs)
        self.pruner, self.checked = pruner, 0

    def evaluate(self, trainer, pl_module, batches):
        for name, mask in self.pruner.masks.items():
            assert torch.all(self.pruner.masks.param(name)[~mask] == 0), name
        self.checked += 1
        return super().evaluate(trainer, pl_module, batches)


@pytest.mark.parametrize(("strategy", "mutation"), [("es", "uniform"), ("select", "gradient")])
def test_weights_pruned_by_another_callback_stay_zero_in_offspring_and_after_update(tmp_path, strategy,
                                                                                    mutation):
    pruner = GradualMagnitudePruning(target_sparsity=0.6, every_n_steps=1, sparsity_end_step=2, verbose=False)
    evo = MaskedOffspring(pruner, population=4, sigma=0.05, strategy=strategy, mutation=mutation,
                          every_n_steps=2, fitness_batches=1, verbose=False)
    _, module, generations = _probed_fit(evo, tmp_path, n_batches=1, first=[pruner], max_epochs=1,
                                         limit_train_batches=6)
    assert evo.generation == 3
    assert evo.checked == 3 * (6 if strategy == "es" else 5)  # ES also scores the updated parent
    assert pruner.masks.sparsity() == pytest.approx(0.6, abs=0.01)
    for name, mask in pruner.masks.items():
        assert torch.all(pruner.masks.param(name)[~mask] == 0)
    assert any(not torch.equal(p, q) for b, a in generations for p, q in zip(b["params"], a["params"]))


def test_respect_masks_zeros_freezes_exact_zeros_and_none_does_not(tmp_path):
    def fit(respect):
        model = tiny_classifier()
        with torch.no_grad():
            model.model.layer1[0].conv1.weight[:4] = 0.0

        evo = _evo(strategy="es", respect_masks=respect, population=4)
        fit_tiny([Freeze(), evo], tmp_path, model=model, **FAST)
        return model.model.layer1[0].conv1.weight[:4]

    assert torch.all(fit("zeros") == 0)
    assert torch.any(fit("none") != 0)


# ---------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("model_name", [m for m in TINY_MODELS if m != "test_resnet"])
def test_timm_families(tmp_path, model_name):
    evo = _evo(strategy="select", mutation="gaussian", population=4, sigma=0.02)
    _, _, generations = _probed_fit(evo, tmp_path, model=tiny_classifier(model_name), max_epochs=1)
    assert len(generations) == 1
    before, after = generations[0]
    assert after["loss"] <= before["loss"] and torch.equal(before["rng"], after["rng"])
    assert all(torch.equal(before["buffers"][k], after["buffers"][k]) for k in before["buffers"])


# ---------------------------------------------------------------------------------------------- contract
def test_conformance_with_defaults(tmp_path):
    # the default cadence is a generation every 5 epochs: fit 5 so that the default really runs one
    state = check_callback_conformance(lambda: create_callback("evolution"), tmp_path, max_epochs=5)
    assert state["generation"] == 1


@pytest.mark.parametrize("strategy", ["es", "select"])
def test_resume_mid_run_equals_uninterrupted(tmp_path, strategy):
    state = check_callback_conformance(
        lambda: _evo(strategy=strategy, mutation="uniform", population=4, sigma=0.05), tmp_path,
        max_epochs=3, resume_epoch=1)
    assert state["generation"] == 3


def test_resume_with_every_n_steps_keeps_the_step_schedule(tmp_path):
    # generations at steps 3, 6, 9, 12 straddle the epoch boundaries (4 steps per epoch)
    state = check_callback_conformance(
        lambda: _evo(strategy="es", mutation="gradient", population=4, every_n_steps=3), tmp_path,
        max_epochs=3, resume_epoch=1)
    assert state["generation"] == 4 and state["last_step"] == 12


def test_state_keys_and_pickling():
    a, b = _evo(strategy="es"), _evo(strategy="select")
    assert a.state_key != b.state_key
    c = pickle.loads(pickle.dumps(a))
    assert c.state_key == a.state_key
    assert torch.equal(c._generator.get_state(), a._generator.get_state())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"population": 1}, r"`population` must be an integer >= 2, got 1.*HINT"),
    ({"population": 5, "strategy": "es"}, r"`population` must be even with antithetic pairs.*got 5.*HINT"),
    ({"population": 5, "antithetic": True}, r"`population` must be even"),
    ({"sigma": 0.0}, r"`sigma` must be a number > 0, got 0.0.*HINT"),
    ({"sigma": -1}, r"`sigma` must be a number > 0, got -1"),
    ({"sigma": float("inf")}, r"`sigma` must be a number > 0, got inf"),
    ({"sigma": True}, r"`sigma` must be a number > 0, got True"),
    ({"es_lr": 0}, r"`es_lr` must be a number > 0"),
    ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
    ({"antithetic": "no"}, r"`antithetic` must be True or False, got 'no'"),
    ({"log_media_every_n_epochs": -1}, r"`log_media_every_n_epochs` must be an integer >= 0, got -1"),
    ({"mutation": "cauchy"}, r"`mutation` must be one of \['uniform', 'gaussian', 'gradient'\]"),
    ({"strategy": "cmaes"}, r"`strategy` must be one of \['select', 'es'\]"),
    ({"metric": "f1"}, r"`metric` must be one of"),
    ({"fitness_shaping": "rank"}, r"`fitness_shaping` must be one of"),
    ({"respect_masks": "yes"}, r"`respect_masks` must be one of"),
    ({"every_n_epochs": 2, "every_n_steps": 3}, r"Pass only one of `every_n_epochs`, `every_n_steps`; got"
                                                r" `every_n_epochs`=2, `every_n_steps`=3"),
    ({"every_n_epochs": 0}, r"`every_n_epochs` must be a number of epochs \(an int >= 1\) or a fraction"),
    ({"every_n_steps": 0},
     r"`every_n_steps` must be a number of optimizer steps \(an int >= 1\) or a fraction"),
    ({"every_n_steps": 1.5}, r"`every_n_steps` must be .* got 1.5"),
    ({"fitness_batches": 0}, r"`fitness_batches` must be an integer >= 1.*HINT"),
    ({"fitness_fn": 3}, r"`fitness_fn` must be callable"),
    ({"fitness_fn": lambda m, b: 0.0, "metric": "accuracy"}, r"cannot be combined with `fitness_fn`.*HINT"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        EvolutionaryMutation(**kwargs)


def test_no_fitness_data_is_a_clear_error(tmp_path):
    dm = pl.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), batch_size=8)
    with pytest.raises(MisconfigurationException, match=r"no fitness data.*HINT: pass.*fitness_dataloader"):
        fit_tiny([_evo()], tmp_path, datamodule=dm, max_epochs=1)


def test_empty_fitness_set_is_a_clear_error(tmp_path):
    empty_set = TensorDataset(torch.randn(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    empty = DataLoader(empty_set, batch_size=4)
    with pytest.raises(MisconfigurationException, match="fitness set is empty"):
        fit_tiny([_evo(fitness_dataloader=empty)], tmp_path, max_epochs=1, limit_train_batches=2)


def test_batches_that_are_not_pairs_need_a_fitness_fn(tmp_path):
    loader = DataLoader([{"x": torch.randn(3, 32, 32)} for _ in range(4)], batch_size=2)
    match = r"needs batches `\(x, y, ...\)`, got a dict.*HINT.*fitness_fn"
    with pytest.raises(MisconfigurationException, match=match):
        fit_tiny([_evo(fitness_dataloader=loader)], tmp_path, max_epochs=1, limit_train_batches=2)


def test_patterns_matching_nothing_fail_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"no parameter to mutate.*HINT"):
        fit_tiny([_evo(include=["nothing*"])], tmp_path, max_epochs=1)


# ---------------------------------------------------------------------------------------------- DDP
class _SaveRank(Callback):
    """Writes each rank's parameters and evolution records to its own file (compared in the main process)."""

    def __init__(self, evos, out: Path):
        self.evos, self.out = evos, out

    def on_train_end(self, trainer, pl_module):
        torch.save({"params": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                    "evaluated": [e.evaluated for e in self.evos],
                    "generation": [e.generation for e in self.evos],
                    "metrics": [e.last_metrics for e in self.evos]},
                   self.out / f"rank{trainer.global_rank}.pt")


class CountingEvolution(EvolutionaryMutation):
    evaluated = 0

    def evaluate(self, trainer, pl_module, batches):
        self.evaluated += 1
        return super().evaluate(trainer, pl_module, batches)


@pytest.mark.slow
def test_ddp_spawn_ranks_split_the_population_and_stay_bit_identical(tmp_path):
    es = CountingEvolution(population=6, sigma=0.02, strategy="es", every_n_epochs=1, fitness_batches=2,
                           verbose=False)
    select = CountingEvolution(population=6, sigma=0.05, strategy="select", mutation="gradient",
                               every_n_epochs=1, fitness_batches=2, verbose=False)
    fit_tiny([es, select, _SaveRank([es, select], tmp_path)], tmp_path, strategy="ddp_spawn", devices=2,
             max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["generation"] == rank1["generation"] == [2, 2]
    # per generation each rank evaluates the parent and its half of the offspring (+ the ES result)
    assert rank0["evaluated"] == rank1["evaluated"] == [2 * (1 + 3 + 1), 2 * (1 + 3)]
    assert rank0["metrics"] == rank1["metrics"]
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name


def test_a_float64_fit_scores_its_offspring_in_float64(tmp_path):
    """precision="64-true" converts the model; the fitness batches are converted like the training batches
    (they were float32 and the offspring's evaluation failed)."""
    evo = EvolutionaryMutation(population=2, every_n_steps=1, fitness_batches=1, verbose=False)
    fit_tiny([evo], tmp_path, model=tiny_classifier(), precision="64-true", max_epochs=1,
             limit_train_batches=1, limit_val_batches=1)
    assert evo.generation == 1
