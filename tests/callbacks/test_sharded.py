"""Sharded training (FSDP2: Lightning's ModelParallelStrategy with ``fully_shard`` in ``configure_model``), on
two CPU processes with gloo: masks on the shards equal to DDP's, exact global thresholds across ranks, and
the strategies a callback cannot act under refused at setup."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.activation_decay import ActivationDecay
from lightning_prune.callbacks.distill import KnowledgeDistillation
from lightning_prune.callbacks.evolution import EvolutionaryMutation
from lightning_prune.core.masks import MaskSet
from lightning_prune.core.sharding import full_copy, local_tensor
from lightning_prune.testing import assert_state_equal, tiny_classifier, tiny_datamodule
from tests.sharded import ShardedClassifier, run_two


# ---------------------------------------------------------------------------------------------- refusals
def _fake_trainer(name: str, tensor_parallel_size: int | str = 1, num_processes: int = 2):
    strategy = type(name, (), {"_tensor_parallel_size": tensor_parallel_size,
                               "num_processes": num_processes})()  # only the name and sizes matter
    return type("T", (), {"strategy": strategy})()


def _every_callback():
    from lightning_prune_baselines import RandomUnstructured

    teacher = nn.Linear(2, 2)
    return [lp.GradualMagnitudePruning(), lp.LotteryTicket(), lp.GroupLassoPruning(), lp.L0Pruning(),
            ActivationDecay(), EvolutionaryMutation(mutation="gradient"),
            KnowledgeDistillation(teacher=teacher),
            RandomUnstructured(), lp.OneShotPruning("channels", target_flops=0.5)]


@pytest.mark.parametrize("name", ["FSDPStrategy", "XLAFSDPStrategy"])
def test_fsdp1_is_refused_at_setup_by_every_callback(name):
    for cb in _every_callback():
        with pytest.raises(MisconfigurationException, match=rf"does not run under {name} \(FSDP1\)"):
            cb.setup(_fake_trainer(name), tiny_classifier(), "fit")
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy\(data_parallel_size"):
        lp.GradualMagnitudePruning().setup(_fake_trainer(name), tiny_classifier(), "fit")


@pytest.mark.parametrize("size", [2, "auto"])
def test_tensor_parallelism_is_refused_at_setup_by_name(size):
    for cb in _every_callback():
        with pytest.raises(MisconfigurationException, match=r"tensor parallelism .*tensor_parallel_size=2"):
            cb.setup(_fake_trainer("ModelParallelStrategy", size), tiny_classifier(), "fit")


def test_callbacks_without_shard_support_refuse_fsdp2_at_setup():
    callbacks = _every_callback()
    reasons = {"EvolutionaryMutation": "mutation='gradient' differentiates the fitness loss outside",
               "OneShotPruning": "method='channels' removes units physically .*Alternatives: prune"
                                 " channels with OneShotPruning under DDP .*GroupLassoPruning/L0Pruning"}
    for cb in (callbacks[5], callbacks[8]):  # EvolutionaryMutation, OneShotPruning
        name = type(cb).__name__
        with pytest.raises(MisconfigurationException,
                           match=rf"{name} cannot act under ModelParallelStrategy \(FSDP2\) yet: .*"
                                 rf"{reasons[name]}.*HINT: use strategy='ddp'.*GroupLassoPruning"):
            cb.setup(_fake_trainer("ModelParallelStrategy"), tiny_classifier(), "fit")
    lp.GradualMagnitudePruning().setup(_fake_trainer("ModelParallelStrategy"), tiny_classifier(), "fit")
    for method in ("sparsegpt", "wanda", "magnitude"):
        lp.OneShotPruning(method).setup(_fake_trainer("ModelParallelStrategy"), tiny_classifier(), "fit")
    for mutation in ("uniform", "gaussian"):
        evo = EvolutionaryMutation(mutation=mutation)
        evo.setup(_fake_trainer("ModelParallelStrategy"), tiny_classifier(), "fit")


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"importance": "weight_norm"}, r"importance='weight_norm' ranks the units from the parameters"),
    ({"importance": "taylor"}, r"importance='taylor' ranks the units from the parameters"),
    ({"target_latency": 0.5}, r"target_latency times copies of the whole model"),
])
def test_a_gate_callback_refuses_fsdp2_when_its_choice_needs_whole_tensors(kwargs, why):
    """The gates themselves are replicated, but a weight criterion would rank each rank's shards and a latency
    target times whole-model copies: refused at setup, by name; the gates' own criterion and 'random' are
    not."""
    cb = lp.GroupLassoPruning(**kwargs)
    with pytest.raises(MisconfigurationException, match=rf"GroupLassoPruning cannot act under .*{why}"):
        cb.setup(_fake_trainer("ModelParallelStrategy"), tiny_classifier(), "fit")
    for fine in ({}, {"importance": "random"}, {"importance": "gate"}):
        assert lp.L0Pruning(**fine).supports_sharding, fine


# ---------------------------------------------------------------------------------------------- thresholds
def _constructed_model() -> nn.Module:
    """Weights with many ties (rounded), zeros and an odd row count (uneven shards)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 16), nn.Linear(16, 5, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 40).round() / 40)
    return model


def _magnitude(**kwargs) -> lp.GradualMagnitudePruning:
    return lp.GradualMagnitudePruning(include="*", verbose=False, **kwargs)


_CASES = [{"scope": "global"}, {"scope": "layer"}, {"scope": "global", "pattern": "2:4"},
          {"scope": "layer", "pattern": "2:4"},
          {"scope": "global", "pattern": "2:4", "pattern_ramp": "steps"},
          {"scope": "global", "layer_targets": {"2": 0.3}}]
_SPARSITIES = (0.3, 0.6, 0.85)


def _masks_of(cb, model):
    cb.targets = cb.select_targets(model)
    cb.masks = MaskSet.for_targets(cb.targets)
    out = []
    for s in _SPARSITIES:
        cb.bind_shards()
        masks = cb.compute_masks(s)
        out.append(({n: m.clone() for n, m in masks.items()}, dict(cb.thresholds)))
    return out


def _sharded_masks():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    results = []
    for case in _CASES:
        model = _constructed_model()
        cb = _magnitude(target_sparsity=0.9, **case)
        cb.targets = cb.select_targets(model)
        cb.masks = MaskSet.for_targets(cb.targets)
        fully_shard(model, mesh=mesh)  # after the masks were made, as configure_model does after setup
        per_sparsity = []
        for s in _SPARSITIES:
            cb.bind_shards()
            masks = cb.compute_masks(s)
            local_bytes = sum(m.numel() for m in masks.values())
            cb.masks.update(masks)
            full = cb.masks.state_dict()  # gathered
            per_sparsity.append((full, dict(cb.thresholds), local_bytes,
                                 {n: local_tensor(cb.masks.param(n)).shape for n in cb.masks}))
        results.append(per_sparsity)
    return results


def test_global_threshold_and_masks_across_ranks_equal_the_single_process_ones():
    """Two ranks, each holding half of every weight (uneven where the rows are odd): the thresholds (global,
    per layer, N:M) equal the single-process ones exactly, and the gathered masks are the same bits."""
    ranks = run_two(_sharded_masks)
    for case, rank0, rank1 in zip(_CASES, *ranks):
        cb = _magnitude(target_sparsity=0.9, **case)
        single = _masks_of(cb, _constructed_model())
        for (full0, thr0, bytes0, shapes0), (full1, thr1, bytes1, _), (masks, thresholds) in zip(
                rank0, rank1, single):
            assert thr0 == thresholds == thr1, case
            for name, mask in masks.items():
                assert torch.equal(full0[name], mask) and torch.equal(full1[name], mask), (case, name)
            total = sum(m.numel() for m in masks.values())
            assert bytes0 + bytes1 == total and bytes0 <= total / 2 + 16, case  # each rank: its half
            assert shapes0["0.weight"] == (4, 12)  # 7 rows: 4 on rank 0, 3 on rank 1


# ---------------------------------------------------------------------------------------------- per-rank fits
def _strategy(kind: str):
    """``"fsdp2"`` (ModelParallelStrategy writing sharded checkpoints), ``"fsdp2-full"`` (full-state ones),
    ``"ddp"``, or ``"single"`` (one process)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if kind.startswith("fsdp2"):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=kind == "fsdp2")
    return {"ddp": "ddp", "single": "auto"}[kind]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (:func:`full_copy` gathers a shard, and hands a plain tensor back as it is)."""
    return full_copy(t.detach()).clone()


def _fit_on_two_ranks(kind: str, callbacks: list, steps: int, *, model=ShardedClassifier, epochs: int = 1,
                      datamodule=None, ckpt_path: str | None = None, checkpoint_every: int | None = None,
                      root: str | None = None, **trainer_options):
    """This rank's part of a seeded fit of ``model()`` (built after ``seed_everything(0)``) on 2 CPU devices
    (1 for ``kind="single"``) under :func:`_strategy` ``(kind)``: ``steps`` batches per epoch, no logger,
    progress bar or validation, deterministic; ``checkpoint_every`` steps a checkpoint under
    ``root/ckpt/step=N.ckpt``. Returns the Trainer and the full (gathered) weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    module = model()
    callbacks = list(callbacks)
    if checkpoint_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=f"{root}/ckpt", save_top_k=-1,
                                         every_n_train_steps=checkpoint_every, filename="{step}"))
    options = {"accelerator": "cpu", "devices": 1 if kind == "single" else 2, "strategy": _strategy(kind),
               "max_epochs": epochs, "limit_train_batches": steps, "limit_val_batches": 0, "logger": False,
               "enable_checkpointing": checkpoint_every is not None, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": True,
               "callbacks": callbacks, "default_root_dir": root, **trainer_options}
    trainer = pl.Trainer(**options)
    trainer.fit(module, datamodule=datamodule if datamodule is not None else tiny_datamodule(),
                ckpt_path=ckpt_path)
    return trainer, {k: _full(v) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- a fit
def _fit(kind: str, callback_kwargs: dict, steps: int = 6, lottery: bool = False):
    cb = (lp.LotteryTicket if lottery else lp.GradualMagnitudePruning)(verbose=False, **callback_kwargs)
    _, weights = _fit_on_two_ranks(kind, [cb], steps, epochs=3 if lottery else 1,
                                   limit_val_batches=2 if lottery else 0)
    if lottery:
        state = cb.state_dict()  # the rewind point gathered whole
        assert state["round"] == 2 and state["rewind_state"]["step"] == 2
        assert not any(hasattr(v, "full_tensor") for v in state["rewind_state"]["module"].values())
    return cb.masks.state_dict(), weights, cb.masks.memory_bytes(), cb.sparsity_metrics()


def _assert_same_as_ddp(callback_kwargs: dict, *fit_args) -> None:
    fsdp = run_two(_fit, "fsdp2", callback_kwargs, *fit_args)
    ddp = run_two(_fit, "ddp", callback_kwargs, *fit_args)
    masks, weights, mask_bytes, metrics = fsdp[0]
    ddp_masks, ddp_weights, ddp_bytes, ddp_metrics = ddp[0]
    assert masks.keys() == ddp_masks.keys() and len(masks) > 4
    for name in masks:
        assert torch.equal(masks[name], ddp_masks[name]), name  # bit for bit
        assert torch.equal(fsdp[1][0][name], masks[name]), name  # both ranks hold the same full masks
        assert torch.all(weights[name][~masks[name]] == 0), name  # applied on the shards
    assert metrics == ddp_metrics
    assert mask_bytes <= 0.55 * ddp_bytes  # each rank holds about half of the masks
    for name, w in ddp_weights.items():  # the same trajectory (not asserted bitwise: float32 reductions)
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lottery_ticket_on_a_sharded_vit_prunes_and_rewinds_like_ddp():
    """LotteryTicket, 2 rounds of one epoch, rewound to step 2 (the snapshot held as shards): DDP's masks."""
    _assert_same_as_ddp({"rounds": 2, "epochs_per_round": 1, "rewind_step": 2}, 4, True)


def test_magnitude_on_a_sharded_vit_prunes_like_ddp():
    """GradualMagnitudePruning(target_sparsity=0.7) on timm's test ViT under ModelParallelStrategy with
    fully_shard (before: the fit ran to the end and pruned nothing): the masks equal DDP's bit for bit."""
    _assert_same_as_ddp({"target_sparsity": 0.7, "every_n_steps": 2, "sparsity_end_step": 0.5})


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    {"scope": "layer"},
    {"pattern": "2:4"},
    {"pattern": "2:4", "scope": "layer", "pattern_ramp": "steps"},
])
def test_magnitude_variants_on_a_sharded_vit_prune_like_ddp(kwargs):
    _assert_same_as_ddp({"target_sparsity": 0.7, "every_n_steps": 2, "sparsity_end_step": 0.5, **kwargs})


# ---------------------------------------------------------------------------------------------- checkpoints
def _kind(distributed: bool | None) -> str:
    """The strategy of a checkpointing fit: sharded checkpoints (True), full-state (False), DDP (None)."""
    return {True: "fsdp2", False: "fsdp2-full", None: "ddp"}[distributed]


def _fit_with_checkpoints(root: str, distributed: bool | None, ckpt_path: str | None, steps: int = 4,
                          epochs: int = 2, lottery: bool = False, model_kwargs: dict | None = None):
    cb = (lp.LotteryTicket(rounds=2, epochs_per_round=1, rewind_step=2, verbose=False) if lottery else
          lp.GradualMagnitudePruning(target_sparsity=0.7, every_n_steps=2, sparsity_end_step=0.75,
                                     verbose=False))
    _, weights = _fit_on_two_ranks(_kind(distributed), [cb], steps, epochs=epochs,
                                   model=lambda: ShardedClassifier(**(model_kwargs or {})),
                                   limit_val_batches=2 if lottery else 0, root=root, ckpt_path=ckpt_path,
                                   checkpoint_every=3 if ckpt_path is None else None)
    return cb.state_dict(), weights


@pytest.mark.slow
def test_lottery_ticket_resumes_mid_epoch_from_a_sharded_checkpoint(tmp_path):
    """The rewind point (captured at step 2 as shards, saved whole) read back from a sharded checkpoint of
    step 3 and rewound into the shards at the round boundary: the uninterrupted run's masks and weights."""
    full = run_two(_fit_with_checkpoints, str(tmp_path / "full"), True, None, 4, 3, True)
    ckpt = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    resumed = run_two(_fit_with_checkpoints, str(tmp_path / "resumed"), True, str(ckpt), 4, 3, True)
    (state, weights), (resumed_state, resumed_weights) = full[0], resumed[0]
    assert state["round"] == resumed_state["round"] == 2
    for name, mask in state["masks"].items():
        assert torch.equal(mask, resumed_state["masks"][name]), name
    for name, w in weights.items():
        assert torch.equal(w, resumed_weights[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [True, False], ids=["sharded-checkpoint", "full-checkpoint"])
def test_magnitude_resumes_mid_epoch_exactly_from_an_fsdp2_checkpoint(tmp_path, distributed):
    """The callback's state (masks gathered whole, schedule, thresholds) is in both kinds of checkpoint;
    resuming at step 3 (mid-epoch: 4 steps per epoch) ends exactly like the uninterrupted run."""
    full = run_two(_fit_with_checkpoints, str(tmp_path / "full"), distributed, None)
    ckpt = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_dir() == distributed and ckpt.exists()
    resumed = run_two(_fit_with_checkpoints, str(tmp_path / "resumed"), distributed, str(ckpt))
    (state, weights), (resumed_state, resumed_weights) = full[0], resumed[0]
    assert state["last_update"] == 8 and set(state["masks"]) and state.keys() == resumed_state.keys()
    for name, mask in state["masks"].items():
        assert torch.equal(mask, resumed_state["masks"][name]), name
    assert state["thresholds"] == resumed_state["thresholds"]
    for name, w in weights.items():
        assert torch.equal(w, resumed_weights[name]), name


@pytest.mark.slow
def test_the_readme_example_runs_and_prunes(tmp_path):
    """The README's 'Sharded training' script, run as the user would (`python sharded.py`: Lightning launches
    the second process itself)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Sharded training"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "sharded.py").write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, "sharded.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparsity 70.00%" in done.stdout + done.stderr


def _lottery_rounds_on_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.core.sharding import gather_full, local_slice, shard_reduce
    from lightning_prune.functional.lottery import prune_by_percent_across

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    model = _constructed_model()
    fully_shard(model, mesh=mesh)
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    out = []
    for scope, rates in (("global", None), ("layer", None), ("global", {"3.weight": 0.1})):
        masks = {n: torch.ones_like(local_tensor(p), dtype=torch.bool) for n, p in params.items()}
        rounds = []
        for _ in range(3):
            local = {n: local_tensor(p) for n, p in params.items()}
            masks = prune_by_percent_across(local, masks, 0.3, scope, rates, shard_reduce(params.values()),
                                            dist.get_rank(), 2)
            rounds.append({n: gather_full(m, params[n]) for n, m in masks.items()})
        out.append(rounds)
    assert local_slice(torch.zeros(7, 12), params["0.weight"]).shape == (4 - dist.get_rank(), 12)
    return out


def test_lottery_rounds_across_ranks_equal_the_single_process_ones():
    """prune_by_percent on shards (ties broken in the full tensors' order, as a stable sort does) equals
    prune_by_percent on the whole tensors, round after round, for global, per-layer and output-layer rates."""
    from lightning_prune.functional.lottery import prune_by_percent

    ranks = run_two(_lottery_rounds_on_shards)
    weights = {n: p for n, p in _constructed_model().named_parameters() if p.dim() == 2}
    cases = (("global", None), ("layer", None), ("global", {"3.weight": 0.1}))
    for (scope, rates), rank0, rank1 in zip(cases, *ranks):
        masks = None
        for got0, got1 in zip(rank0, rank1):
            masks = prune_by_percent(weights, masks, 0.3, scope, rates)
            for name, mask in masks.items():
                assert torch.equal(got0[name], mask) and torch.equal(got1[name], mask), (scope, name)


# ---------------------------------------------------------------------------------------------- gates
def _gate_model() -> nn.Module:
    """A constructed MLP: two channel groups (7 and 16 units), rows uneven over 2 ranks (7 = 4 + 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 5))


def _gate_plan():
    """The groups, gate values and kept units of :func:`_gate_model` (the same on every rank)."""
    from lightning_prune.core.gates import GateSet, ScaleGate
    from lightning_prune.graph import CostModel, analyse_channels

    model, example = _gate_model(), torch.randn(2, 12)
    groups = analyse_channels(model, example).groups
    gates = GateSet(groups, [ScaleGate(g.size) for g in groups])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in gates.gates:
            gate.weight.copy_(torch.rand(gate.size, generator=generator) + 0.5)
    keep = [torch.arange(g.size) % 3 != 1 for g in groups]
    return model, example, groups, gates, keep, CostModel(model, example, groups)


def _gates_on_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.core.gates import unit_masks

    dist.init_process_group("gloo")
    model, _, groups, gates, keep, cost = _gate_plan()
    masks = MaskSet.for_targets([])
    for name, p in model.named_parameters():
        masks.add(name, p)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))  # after the plan, as configure_model after setup
    masks.rebind(dict(model.named_parameters()))
    gates.fold_(model)  # every rank folds its rows (no gather: the gates scale columns)
    masks.update(unit_masks(model, groups, keep))  # full masks, each rank keeps its part
    local_bytes = masks.memory_bytes()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    return weights, masks.state_dict(), local_bytes, cost.measured_ratios(
        {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(groups, keep)})


def test_gates_fold_and_unit_masks_on_shards_equal_the_single_process_ones():
    """The gates folded into the readers' shards and the unit masks cut to each rank's shards (two ranks,
    uneven rows) gather into the single-process weights and masks; the FLOPs measured on the meta skeleton
    of the sharded model equal those measured on the model."""
    from lightning_prune.core.gates import unit_masks

    ranks = run_two(_gates_on_shards)
    model, _, groups, gates, keep, cost = _gate_plan()
    gates.fold_(model)
    masks = unit_masks(model, groups, keep)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    ratios = cost.measured_ratios({g.name: (~k).nonzero().flatten().tolist() for g, k in zip(groups, keep)})
    for weights, sharded_masks, local_bytes, sharded_ratios in ranks:
        for name, p in model.named_parameters():
            assert torch.equal(weights[name], p.detach()), name
            expected = masks.get(name, torch.ones_like(p, dtype=torch.bool))
            assert torch.equal(sharded_masks[name], expected), name
        assert local_bytes <= sum(p.numel() for p in model.parameters()) / 2 + 16
        assert sharded_ratios == ratios and ratios[0] < 1


def _gate_fit(kind: str, cls: str, callback_kwargs: dict, steps: int = 6):
    cb = getattr(lp, cls)(verbose=False, finalize_step=3, round_to=1, **callback_kwargs)
    _, weights = _fit_on_two_ranks(kind, [cb], steps)
    return (cb.masks.state_dict(), weights, cb.keep, cb.gateset.state_dict()["gates"], cb.size_metrics(),
            cb.masks.memory_bytes(), cb.finalized)


@pytest.mark.slow
@pytest.mark.parametrize("cls, kwargs", [
    ("GroupLassoPruning", {"lam": 0.05, "gate_lr": 1.0, "target_flops": 0.5}),
    ("L0Pruning", {"lam": 0.5, "gate_lr": 0.5, "target_flops": 0.5}),
    ("GroupLassoPruning", {"lam": 0.05, "gate_lr": 1.0, "prune_threshold": 0.72, "capture_threshold": 0.0}),
], ids=["group-lasso-flops", "l0-flops", "group-lasso-threshold"])
def test_gates_on_a_sharded_vit_train_and_finalise_like_ddp(cls, kwargs):
    """GroupLassoPruning and L0Pruning under ModelParallelStrategy with fully_shard (timm's test ViT): the
    replicated gates trained on the sharded model (gradients averaged as under DDP) finalise at step 3 into
    the DDP run's kept units and masks on every rank, the gates folded into the shards; 3 more steps of
    fine-tuning keep the DDP run's weights (float32: compared within a tolerance)."""
    fsdp = run_two(_gate_fit, "fsdp2", cls, kwargs)
    ddp = run_two(_gate_fit, "ddp", cls, kwargs)
    masks, weights, keep, gates, size, mask_bytes, finalized = fsdp[0]
    ddp_masks, ddp_weights, ddp_keep, ddp_gates, ddp_size, ddp_bytes, _ = ddp[0]
    assert finalized and 0 < sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)
    for rank in fsdp:  # every rank finalised alike
        assert all(torch.equal(a, b) for a, b in zip(rank[2], ddp_keep))
        assert rank[1].keys() == ddp_weights.keys()
    assert masks.keys() == ddp_masks.keys() and len(masks) > 4
    for name in masks:
        assert torch.equal(masks[name], ddp_masks[name]) and torch.equal(fsdp[1][0][name], masks[name]), name
        assert torch.all(weights[name][~masks[name]] == 0), name
    assert size == ddp_size and size["prune/flops_remaining"] < 0.75  # measured on the meta skeleton
    assert mask_bytes <= 0.55 * ddp_bytes
    for gate, ddp_gate in zip(gates, ddp_gates):
        for key in gate:
            torch.testing.assert_close(gate[key], ddp_gate[key], rtol=1e-4, atol=1e-5)
    for name, w in ddp_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)


class _Batches(pl.Callback):
    """The labels of every training batch, by the step that trains on it."""

    def __init__(self) -> None:
        self.labels: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels[trainer.global_step] = batch[1].tolist()


_GATES = {"GroupLassoPruning": {"lam": 0.05, "gate_lr": 1.0}, "L0Pruning": {"lam": 0.5, "gate_lr": 0.5}}


def _gate_fit_with_checkpoints(root: str, cls: str, ckpt_path: str | None):
    cb = getattr(lp, cls)(verbose=False, finalize_step=6, round_to=1, target_flops=0.5, **_GATES[cls])
    batches = _Batches()
    _, weights = _fit_on_two_ranks("fsdp2", [cb, batches], 4, epochs=2, root=root, ckpt_path=ckpt_path,
                                   checkpoint_every=3 if ckpt_path is None else None)
    return batches.labels, weights, cb.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("cls", sorted(_GATES))
def test_gates_resume_mid_epoch_exactly_under_fsdp2(tmp_path, cls):
    """A gate callback resumed under ModelParallelStrategy from the sharded checkpoint of step 3 (mid-epoch:
    4 batches per epoch), the gates finalised at step 6 after the resume: every resumed step trains on the
    uninterrupted run's batch, and the weights, gates, gate optimizer and kept units end the same. Before:
    the resumed step 3 trained on the epoch's first batch again (the callbacks' on_fit_start built the
    training loader before ModelParallelStrategy restored the loops, so Lightning never loaded the loader's
    saved position; see _resume.resume_loader_position)."""
    full = run_two(_gate_fit_with_checkpoints, str(tmp_path / "full"), cls, None)
    ckpt = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_dir()
    resumed = run_two(_gate_fit_with_checkpoints, str(tmp_path / "resumed"), cls, str(ckpt))
    for (labels, weights, state), (resumed_labels, resumed_weights, resumed_state) in zip(full, resumed):
        assert sorted(resumed_labels) == list(range(3, 8))
        assert {s: labels[s] for s in resumed_labels} == resumed_labels  # the same batch at every step
        assert state["finalized"] and resumed_state["finalized"]
        assert all(torch.equal(a, b) for a, b in zip(state["keep"], resumed_state["keep"]))
        assert_state_equal(state, resumed_state, cls)
        for name, w in weights.items():  # (the same ranks and reductions on one machine: exact)
            assert torch.equal(w, resumed_weights[name]), name


# ---------------------------------------------------------------------------------------------- compression
class _Net(nn.Module):
    """A container holding the network as ``.model`` (what compress_sharded_in_fit swaps)."""

    def __init__(self, ws: bool = False) -> None:
        super().__init__()
        self.model = _gate_model()
        if ws:  # a reader standardising its weight: frozen when its input units go
            plain, self.model[2] = self.model[2], _WSLinear(7, 16)
            self.model[2].load_state_dict(plain.state_dict())

    def forward(self, x):
        return self.model(x)


class _WSLinear(nn.Linear):
    """A weight-standardised Linear (every row over its fan-in)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(1, keepdim=True)) / (w.var(1, keepdim=True, unbiased=False) + 1e-5).sqrt()
        return nn.functional.linear(x, w, self.bias)


def _compressed(sharded: bool, ws: bool = False):
    """Momentum SGD for 2 steps, the MLP's units 1, 4 (and 1, 4, 7, ...) removed, 2 more steps: the gathered
    weights, momentum buffers and local shapes."""
    from types import SimpleNamespace

    from lightning_prune.callbacks.shrink import compress_in_fit, compress_sharded_in_fit
    from lightning_prune.core.gates import unit_masks
    from lightning_prune.core.sharding import local_slice
    from lightning_prune.graph import analyse_channels, meta_copy

    net = _Net(ws).double()
    groups = analyse_channels(net, torch.randn(2, 12, dtype=torch.float64)).groups
    removed = {g.name: list(range(1, g.size, 3)) for g in groups}
    skeleton = meta_copy(net.model)
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (2,))
        fully_shard(net.model[2], mesh=mesh)
        fully_shard(net.model, mesh=mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    trainer = SimpleNamespace(optimizers=[optimizer], strategy=None)
    data = torch.randn(4, 2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def step(x):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()

    for x in data[:2]:
        step(x)
    keep = [~torch.isin(torch.arange(g.size), torch.tensor(removed[g.name])) for g in groups]
    with torch.no_grad():  # the removed units dead (as a callback's masks leave them)
        for name, mask in unit_masks(net, groups, keep).items():
            param = net.get_parameter(name)
            local_tensor(param).mul_(local_slice(mask, param))
    problems = None
    if sharded:
        from lightning_prune.callbacks.shrink import sharded_compression_problem

        problems = [sharded_compression_problem(net, prefix) for prefix in ("model", "", "model.0")]
        compress_sharded_in_fit(trainer, net, "model", skeleton, groups, removed, (12,))
    else:
        compress_in_fit(trainer, net, groups, removed, torch.randn(2, 12, dtype=torch.float64))
    for x in data[2:]:
        step(x)
    return ({n: _full(p) for n, p in net.named_parameters()},
            {n: _full(optimizer.state[p]["momentum_buffer"]) for n, p in net.named_parameters()},
            {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
             for n, p in net.named_parameters()}, problems)


def test_in_fit_removal_on_shards_equals_the_dense_removal():
    """compress_sharded_in_fit (gather, compress a plain copy, fully_shard it again, the momentum gathered,
    cut and sharded again) then 2 more steps, in float64: the weights and momentum of compress_in_fit on the
    unsharded network, each rank holding half of the smaller tensors."""
    ranks = run_two(_compressed, True)
    weights, momentum, shapes, _ = _compressed(False)
    assert shapes["model.0.weight"] == (5, 12)  # 7 units, 2 removed
    for got_weights, got_momentum, _, problems in ranks:
        assert problems[0] is None  # (what the callback checks at fit start)
        assert "the LightningModule itself" in problems[1] and "'model.0' is not an FSDP unit" in problems[2]
        for name, w in weights.items():
            torch.testing.assert_close(got_weights[name], w, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_momentum[name], momentum[name], rtol=1e-12, atol=1e-12)
    assert ranks[0][2]["model.0.weight"] == (3, 12) and ranks[1][2]["model.0.weight"] == (2, 12)
    assert ranks[0][2]["model.2.weight"][0] + ranks[1][2]["model.2.weight"][0] == shapes["model.2.weight"][0]


def test_in_fit_removal_on_shards_starts_a_frozen_weight_afresh_like_the_dense_removal():
    """A weight-standardised reader frozen by the removal keeps its weight's name but holds another quantity:
    its momentum starts afresh under FSDP2 as without it (the raw weight's was carried before)."""
    ranks = run_two(_compressed, True, True)
    weights, momentum, _, _ = _compressed(False, True)
    for got_weights, got_momentum, _, _ in ranks:
        for name, w in weights.items():
            torch.testing.assert_close(got_weights[name], w, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_momentum[name], momentum[name], rtol=1e-12, atol=1e-12)


def _compress_fit(kind: str, steps: int = 4, epochs: int = 2):
    cb = lp.GroupLassoPruning(verbose=False, finalize_step=3, round_to=1, compress=True, lam=0.05,
                              gate_lr=1.0, target_flops=0.5)
    trainer, _ = _fit_on_two_ranks(kind, [cb], steps, epochs=epochs,
                                   model=lambda: ShardedClassifier(optimizer="adamw", lr=1e-3))
    weights, state, shapes = _gathered_state(trainer, trainer.lightning_module)
    return (weights, state, shapes, cb.keep, cb.shrink.removed, trainer.global_step,
            len(trainer.optimizers[0].param_groups[0]["params"]))


@pytest.mark.slow
def test_in_fit_removal_on_a_sharded_vit_continues_like_ddp():
    """GroupLassoPruning(compress=True, target_flops=0.5) under ModelParallelStrategy with fully_shard: the
    units are removed at step 3 inside the fit (the network gathered, compressed, sharded again, AdamW's
    moments carried), and 5 more steps train the smaller sharded network as DDP trains its compressed one
    (float32: within a tolerance); each rank holds about half of every smaller tensor."""
    fsdp = run_two(_compress_fit, "fsdp2")
    ddp = run_two(_compress_fit, "ddp")
    weights, state, shapes, keep, removed, step, n_params = fsdp[0]
    ddp_weights, ddp_state, ddp_shapes, ddp_keep, ddp_removed, ddp_step, ddp_n = ddp[0]
    assert step == ddp_step == 8 and removed == ddp_removed and any(removed.values())
    assert all(torch.equal(a, b) for a, b in zip(keep, ddp_keep)) and n_params == ddp_n
    assert weights.keys() == ddp_weights.keys()
    for name, w in ddp_weights.items():
        assert weights[name].shape == w.shape, name  # the compressed shapes
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)
        for key, value in ddp_state[name].items():
            torch.testing.assert_close(state[name][key], value, rtol=1e-4, atol=1e-5)
        if w.dim() and w.shape[0] > 1:
            assert shapes[name][0] + fsdp[1][2][name][0] == w.shape[0] and shapes[name][1:] == w.shape[1:]
    assert ddp_shapes["model.patch_embed.proj.weight"][0] < 64  # the residual stream lost channels too


# ---------------------------------------------------------------------------------------------- distillation
def _distill_fit(kind: str, steps: int = 4):
    kd = KnowledgeDistillation(alpha=1.0, temperature=2.0, features=["blocks.1"], verbose=False)
    pruning = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=2,
                                         verbose=False)
    _, weights = _fit_on_two_ranks(kind, [pruning, kd], steps)
    teacher = {k: v.detach().clone() for k, v in kd.teacher_module.state_dict().items()}
    return weights, teacher, any(hasattr(v, "full_tensor") for v in kd.teacher_module.state_dict().values())


@pytest.mark.slow
def test_distillation_on_a_sharded_vit_trains_like_ddp():
    """KnowledgeDistillation (the default teacher: the student's shards gathered at fit start into a frozen,
    replicated copy; logits and FitNets hints) beside GradualMagnitudePruning under ModelParallelStrategy:
    the DDP run's teacher and weights (float32: within a tolerance)."""
    fsdp = run_two(_distill_fit, "fsdp2")
    ddp = run_two(_distill_fit, "ddp")
    (weights, teacher, sharded_teacher), (ddp_weights, ddp_teacher, _) = fsdp[0], ddp[0]
    assert not sharded_teacher  # replicated
    for name, w in ddp_teacher.items():
        assert torch.equal(teacher[name], w), name  # the dense initial student on both
    for name, w in ddp_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ddp_weights["model.head.weight"], ddp_teacher["head.weight"])


def test_distillation_refuses_a_compressing_callback_under_fsdp2():
    teacher = nn.Linear(2, 2)
    trainer = _fake_trainer("ModelParallelStrategy")
    trainer.callbacks = [lp.GroupLassoPruning(compress=True), KnowledgeDistillation(teacher=teacher)]
    with pytest.raises(MisconfigurationException, match=r"cannot follow GroupLassoPruning\(compress=True\)"):
        trainer.callbacks[1].setup(trainer, tiny_classifier(), "fit")


# ------------------------------------------------------------------------------------------- activation decay
def _decay_fit(kind: str, steps: int = 4):
    from lightning_prune.core.reparam import count_layers

    decay = ActivationDecay(end_step=2, fuse_on_train_end=True, verbose=False)
    trainer, _ = _fit_on_two_ranks(kind, [decay], steps)
    model = trainer.lightning_module
    state = model.state_dict()
    sharded = any(hasattr(v, "full_tensor") for v in state.values())
    return {k: v.detach().clone() for k, v in state.items()}, count_layers(model), sharded, decay.lam


@pytest.mark.slow
def test_activation_decay_on_a_sharded_vit_fuses_a_gathered_model_like_ddp():
    """ActivationDecay(fuse_on_train_end=True) under ModelParallelStrategy: λ rises on the sharded model, and
    at the end of training every rank gathers the network into a plain copy and fuses it: the DDP run's fused
    model (float32: within a tolerance), whole on every rank."""
    fsdp = run_two(_decay_fit, "fsdp2")
    ddp = run_two(_decay_fit, "ddp")
    (state, layers, sharded, lam), (ddp_state, ddp_layers, _, _) = fsdp[0], ddp[0]
    assert lam == 1.0 and not sharded and layers == ddp_layers and state.keys() == ddp_state.keys()
    for name, value in ddp_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fsdp[1][0][name], value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- baselines
def _baseline_fit(kind: str, name: str, kwargs: dict, steps: int = 4):
    import lightning_prune_baselines as baselines

    cb = getattr(baselines, name)(verbose=False, seed=3, **kwargs) if name != "FirstKChannels" else \
        baselines.FirstKChannels(verbose=False, **kwargs)
    _, weights = _fit_on_two_ranks(kind, [cb], steps, epochs=2)
    return cb.masks.state_dict(), weights, cb.masks.memory_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [
    ("RandomUnstructured", {"target_sparsity": 0.6, "every_n_steps": 2, "sparsity_end_step": 0.5}),
    ("RandomChannels", {"target_sparsity": 0.5, "every_n_steps": 2, "sparsity_end_step": 0.5}),
    ("FirstKChannels", {"target_sparsity": 0.5, "prune_step": 2, "compress": True}),
])
def test_baselines_on_a_sharded_vit_prune_like_ddp(name, kwargs):
    """The baselines plugin under ModelParallelStrategy: random masks drawn over the full tensors from the
    shared generator (RandomUnstructured), random and first-k channel units (FirstKChannels compressing inside
    the sharded fit): the DDP run's masks bit for bit, its weights within a tolerance."""
    fsdp = run_two(_baseline_fit, "fsdp2", name, kwargs)
    ddp = run_two(_baseline_fit, "ddp", name, kwargs)
    (masks, weights, mask_bytes), (ddp_masks, ddp_weights, ddp_bytes) = fsdp[0], ddp[0]
    assert masks.keys() == ddp_masks.keys() and len(masks) > 4
    pruned = 0
    for key in masks:
        assert torch.equal(masks[key], ddp_masks[key]) and torch.equal(fsdp[1][0][key], masks[key]), key
        pruned += int((~masks[key]).sum())
    assert pruned > 0 or kwargs.get("compress")
    assert mask_bytes <= 0.55 * ddp_bytes
    for key, w in ddp_weights.items():
        torch.testing.assert_close(weights[key], w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FSDP2 <-> DDP
@pytest.mark.slow
@pytest.mark.parametrize("written, resumed", [(False, None), (None, False)],
                         ids=["fsdp2-full-to-ddp", "ddp-to-fsdp2"])
def test_a_full_state_checkpoint_resumes_across_fsdp2_and_ddp(tmp_path, written, resumed):
    """A full-state checkpoint of ModelParallelStrategy (save_distributed_checkpoint=False) resumes mid-epoch
    under DDP, and a DDP checkpoint under ModelParallelStrategy (AdamW's moments included): the uninterrupted
    run's masks and weights."""
    adam = {"optimizer": "adamw", "lr": 1e-3}
    full = run_two(_fit_with_checkpoints, str(tmp_path / "full"), written, None, 4, 2, False, adam)
    ckpt = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_file()
    again = run_two(_fit_with_checkpoints, str(tmp_path / "resumed"), resumed, str(ckpt), 4, 2, False, adam)
    (state, weights), (resumed_state, resumed_weights) = full[0], again[0]
    assert state["last_update"] == 8 and state["masks"]
    for name, mask in state["masks"].items():
        assert torch.equal(mask, resumed_state["masks"][name]), name
    for name, w in weights.items():  # (the same reductions on 2 CPU ranks: equal; a tolerance for others)
        torch.testing.assert_close(resumed_weights[name], w, rtol=1e-5, atol=1e-6)


def test_a_sharded_checkpoint_is_refused_outside_fsdp2_with_the_reason(tmp_path):
    """A directory of torch.distributed.checkpoint shards under DDP: the reason and what to do, not
    IsADirectoryError."""
    (tmp_path / "step=3.ckpt").mkdir()
    (tmp_path / "step=3.ckpt" / ".metadata").write_bytes(b"")
    loaded = []
    strategy = type("DDPStrategy", (), {"load_checkpoint": lambda self, path, *a, **k: loaded.append(path)})()
    trainer = type("T", (), {"strategy": strategy})()
    lp.GradualMagnitudePruning().setup(trainer, tiny_classifier(), "fit")
    lp.GradualMagnitudePruning(scope="layer").setup(trainer, tiny_classifier(), "fit")  # (guarded once)
    with pytest.raises(MisconfigurationException, match=r"sharded \(distributed\) checkpoint of"
                       r" ModelParallelStrategy .*DDPStrategy reads one-file checkpoints only. HINT:"
                       r" resume it under ModelParallelStrategy, or write full-state checkpoints"):
        strategy.load_checkpoint(tmp_path / "step=3.ckpt")
    strategy.load_checkpoint(tmp_path / "one-file.ckpt")
    assert loaded == [tmp_path / "one-file.ckpt"]


# ---------------------------------------------------------------------------------------------- evolution
def _offspring_on_shards(sharded: bool):
    """Offspring of the constructed model (uniform noise from one seed, a masked weight) written into the
    shards (FSDP2, uneven rows) after a forward, then scored: the gathered offspring and its output."""
    from lightning_prune.core.sharding import local_slice, reshard
    from lightning_prune.functional.evolution import add_perturbation_

    model = _constructed_model()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    mask = torch.rand(params[0].shape, generator=torch.Generator().manual_seed(3)) > 0.5
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (2,))
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
    with torch.no_grad():
        before = model(x)  # (FSDP2 keeps the root unit's parameters gathered after this forward)
        tensors = [local_tensor(p) for p in params]
        parent = [t.clone() for t in tensors]
        masks = [local_slice(mask, params[0]).float()] + [None] * (len(params) - 1)
        shapes = [tuple(p.shape) for p in params] if sharded else None
        cut = (lambda i, noise: local_slice(noise, params[i])) if sharded else None  # noqa: E731
        add_perturbation_(tensors, parent, 11, 0.1, "uniform", None, masks, shapes, cut)
        stale = model(x)  # (sharded: the root unit still gathered from before the write)
        if sharded:
            reshard(model)
        after = model(x)
    full = [p.full_tensor() if sharded else p.detach().clone() for p in params]
    return full, after, torch.equal(before, after), tuple(tensors[0].shape), stale


def test_offspring_written_into_shards_equal_the_unsharded_offspring():
    """Each rank's part of every noise tensor is the whole tensor's noise (drawn whole from the seed, cut to
    the shard), so the gathered offspring, masked zeros included, and its output are the single-process ones
    bit for bit; without re-gathering after the write, FSDP2's root unit scores its stale gathered parent."""
    ranks = run_two(_offspring_on_shards, True)
    weights, output, _, _, _ = _offspring_on_shards(False)
    for got, got_output, unchanged, _, stale in ranks:
        assert not unchanged and torch.equal(got_output, output)
        assert not torch.equal(stale, output)  # what the callback's reshard avoids
        for w, g in zip(weights, got):
            assert torch.equal(w, g)
    assert ranks[0][3] == (4, 12) and ranks[1][3] == (3, 12)


class _FrozenClassifier(ShardedClassifier):
    """SGD at lr 0: the training steps leave the weights exactly as they are, so that only the generations
    change them and runs under different strategies can be compared bit for bit."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _evolution_fit(kind: str, evo_kwargs: dict, frozen: bool = True, steps: int = 4):
    initial = {}

    def model():
        module = _FrozenClassifier() if frozen else ShardedClassifier()
        initial.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        return module

    pruning = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=1,
                                         verbose=False)
    evo = EvolutionaryMutation(**{"population": 4, "sigma": 0.05, "every_n_steps": 2, "fitness_batches": 3,
                                  "seed": 7, "verbose": False, **evo_kwargs})
    _, weights = _fit_on_two_ranks(kind, [pruning, evo], steps, model=model)
    masks = pruning.masks.state_dict()
    moved = any(not torch.equal(w, initial[k] * masks[k] if k in masks else initial[k])
                for k, w in weights.items())
    return weights, masks, evo.generation, dict(evo.last_metrics), moved


def _assert_evolution_equal(fsdp: list, other: tuple, exact: bool = True) -> None:
    weights, masks, generation, metrics, moved = fsdp[0]
    other_weights, other_masks, other_generation, other_metrics, _ = other
    assert generation == other_generation == fsdp[1][2] == 2 and moved  # the generations moved the weights
    for name, mask in other_masks.items():
        assert torch.equal(masks[name], mask), name
        assert torch.all(weights[name][~mask] == 0), name  # the offspring kept the pruned zeros
    for name, w in other_weights.items():
        assert torch.equal(fsdp[1][0][name], weights[name]), name  # every rank holds the same model
        if exact:
            assert torch.equal(weights[name], w), name
        else:
            torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)
    if exact:
        assert metrics == other_metrics == fsdp[1][3]  # the same fitness values, bit for bit


@pytest.mark.slow
def test_evolution_on_a_sharded_vit_equals_the_unsharded_run_bit_for_bit():
    """EvolutionaryMutation(strategy="select") beside GradualMagnitudePruning under ModelParallelStrategy
    (before: refused at setup): each rank perturbs its shards with its part of the noise drawn from the
    shared seeds, the ranks score every offspring together (3 fitness batches: uneven turns), and after 2
    generations the weights, masks and fitness are the single-process run's bit for bit (training at lr 0, so
    that only the generations move the weights; the DDP run equals the single-process one, see
    test_evolution's DDP test and the slow DDP comparisons here). Before the shards were re-gathered after
    each write, the FSDP2 root's stale gathered copy scored every offspring as the parent's."""
    fsdp = run_two(_evolution_fit, "fsdp2", {"strategy": "select"})
    _assert_evolution_equal(fsdp, _evolution_fit("single", {"strategy": "select"}))


@pytest.mark.slow
@pytest.mark.parametrize("evo_kwargs, exact, frozen", [
    ({"strategy": "select", "mutation": "uniform"}, True, True),
    ({"strategy": "es", "mutation": "gaussian", "es_lr": 0.05}, True, True),
    ({"strategy": "es", "mutation": "uniform", "es_lr": 0.05}, False, False),
], ids=["select-uniform", "es-gaussian", "es-training"])
def test_evolution_on_a_sharded_vit_equals_ddp(evo_kwargs, exact, frozen):
    """Under FSDP2 and DDP: the same weights, masks and fitness after 2 generations, bit for bit at lr 0;
    with training between the generations within a tolerance (float32 gradient reductions)."""
    fsdp = run_two(_evolution_fit, "fsdp2", evo_kwargs, frozen)
    ddp = run_two(_evolution_fit, "ddp", evo_kwargs, frozen)
    _assert_evolution_equal(fsdp, ddp[0], exact)


# ---------------------------------------------------------------------------------------------- one-shot
_ONE_SHOT = [("sparsegpt", None), ("wanda", None), ("magnitude", None), ("sparsegpt", (2, 4)),
             ("wanda", (2, 4))]


def _one_shot_on_shards(sharded: bool):
    """prune_unstructured on the constructed model (the root unit holding layers 0 and 3, layer 2 a unit of
    its own; 7 rows: uneven shards), every rank on the same calibration batches (reduce: their sum)."""
    from lightning_prune.core.one_shot import prune_unstructured
    from lightning_prune.core.sharding import gather_full
    from lightning_prune.core.targets import Target

    batches = [(torch.randn(6, 12, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    mesh = None
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (2,))

        def reduce(t):
            dist.all_reduce(t)
            return t
    else:
        def reduce(t):
            return t + t  # (what the sum of two ranks' identical statistics is, exactly)
    out = []
    for method, nm in _ONE_SHOT:
        model = _constructed_model()
        targets = [Target(str(i), model[i]) for i in (0, 2, 3)]
        if sharded:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model[2], mesh=mesh)
            fully_shard(model, mesh=mesh)
        masks, errors = prune_unstructured(model, targets, method, batches, 0.5, nm, reduce=reduce,
                                           block_size=4)
        local_shapes = {n: tuple(m.shape) for n, m in masks.items()}
        full_masks = {t.name: gather_full(masks[t.name], t.param) for t in targets}
        weights = {n: p.full_tensor() if sharded else p.detach().clone() for n, p in model.named_parameters()}
        out.append((full_masks, weights, errors, local_shapes))
    return out


def test_one_shot_on_shards_equals_the_unsharded_pruning():
    """SparseGPT, Wanda and magnitude (unstructured and 2:4) on an FSDP2-sharded model: the statistics summed
    over the ranks, each layer gathered for its choice, each rank keeping its shard of the updated weight and
    of the mask: the gathered masks, weights (SparseGPT's updates included) and errors equal the unsharded
    pruning's bit for bit, each rank's masks its shard's part."""
    ranks = run_two(_one_shot_on_shards, True)
    single = _one_shot_on_shards(False)
    for case, (masks, weights, errors, _), rank0, rank1 in zip(_ONE_SHOT, single, *ranks):
        for got in (rank0, rank1):
            assert got[2] == errors, case
            for name, mask in masks.items():
                assert torch.equal(got[0][name], mask), (case, name)
            for name, w in weights.items():
                assert torch.equal(got[1][name], w), (case, name)
        assert rank0[3]["0.weight"] == (4, 12) and rank1[3]["0.weight"] == (3, 12)
        assert 0 < sum(int((~m).sum()) for m in masks.values())


def _one_shot_fit(kind: str, kwargs: dict, steps: int = 3):
    cb = lp.OneShotPruning(verbose=False, calibration_batches=3, block_size=16, **kwargs)
    _, weights = _fit_on_two_ranks(kind, [cb], steps)
    return cb.masks.state_dict(), weights, cb.masks.memory_bytes(), cb.errors


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{"method": "sparsegpt", "target_sparsity": 0.5},
                                    {"method": "wanda", "pattern": "2:4"}], ids=["sparsegpt", "wanda-2:4"])
def test_one_shot_on_a_sharded_vit_prunes_like_ddp(kwargs):
    """OneShotPruning at the start of the fit under ModelParallelStrategy (before: refused at setup), each
    rank on its own calibration batches (the statistics summed over the ranks): the DDP run's masks and
    reconstruction errors bit for bit on every rank, each rank holding about half of the masks; 3 steps of
    fine-tuning keep the DDP run's weights (float32: within a tolerance)."""
    fsdp = run_two(_one_shot_fit, "fsdp2", kwargs)
    ddp = run_two(_one_shot_fit, "ddp", kwargs)
    (masks, weights, mask_bytes, errors), (ddp_masks, ddp_weights, ddp_bytes, ddp_errors) = fsdp[0], ddp[0]
    assert masks.keys() == ddp_masks.keys() and len(masks) > 4 and errors == ddp_errors == fsdp[1][3]
    for name in masks:
        assert torch.equal(masks[name], ddp_masks[name]) and torch.equal(fsdp[1][0][name], masks[name]), name
        assert torch.all(weights[name][~masks[name]] == 0), name
    assert mask_bytes <= 0.55 * ddp_bytes
    for name, w in ddp_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------- resume after an in-fit removal
class _StateAt(pl.Callback):
    """The gathered weights and optimizer state when the (resumed) training starts and after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.start, self.at_step = step, None, None

    def on_train_start(self, trainer, pl_module):
        self.start = _gathered_state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.at_step = _gathered_state(trainer, pl_module)


def _gathered_state(trainer, model):
    """The gathered weights and optimizer state, and each rank's local parameter shapes."""
    opt = trainer.optimizers[0]
    return ({n: _full(p) for n, p in model.named_parameters()},
            {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in model.named_parameters()},
            {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
             for n, p in model.named_parameters()})


def _compress_fit_with_checkpoints(root: str, distributed: bool | None, ckpt_path: str | None):
    cb = lp.GroupLassoPruning(verbose=False, finalize_step=3, round_to=1, compress=True, lam=0.05,
                              gate_lr=1.0, target_flops=0.5)
    at = _StateAt(5)
    trainer, _ = _fit_on_two_ranks(_kind(distributed), [cb, at], 7,
                                   model=lambda: ShardedClassifier(optimizer="adamw", lr=1e-3),
                                   datamodule=tiny_datamodule(batch_size=16), root=root, ckpt_path=ckpt_path,
                                   checkpoint_every=5 if ckpt_path is None else None)
    return at.start, at.at_step, _gathered_state(trainer, trainer.lightning_module), cb.shrink.removed, \
        trainer.global_step, cb.masks.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("distributed, resumed", [(True, True), (False, False), (False, None)],
                         ids=["sharded-checkpoint", "full-checkpoint", "fsdp2-full-to-ddp"])
def test_resume_after_an_in_fit_removal_under_fsdp2(tmp_path, distributed, resumed):
    """GroupLassoPruning(compress=True) removes units at step 3 under ModelParallelStrategy; its checkpoint of
    step 5 (mid-epoch, the smaller model) resumes under ModelParallelStrategy (before: refused) -- the sharded
    network gathered, sliced to the recorded shapes and sharded again, the optimizer pointed at the new
    parameters, before ModelParallelStrategy loads the checkpoint into them -- with the weights and AdamW
    moments of the run at step 5 bit for bit, each rank holding its half of the smaller tensors, the masks
    and removed units of the checkpoint, and trains on to the end like the uninterrupted run: exactly under
    ModelParallelStrategy (before: the resumed steps trained on other batches), within float32 tolerance
    under DDP (other reductions); the full-state checkpoint also resumes under DDP."""
    written = run_two(_compress_fit_with_checkpoints, str(tmp_path / "full"), distributed, None)
    ckpt = tmp_path / "full" / "ckpt" / "step=5.ckpt"
    assert ckpt.is_dir() == distributed and ckpt.exists()
    again = run_two(_compress_fit_with_checkpoints, str(tmp_path / "resumed"), resumed, str(ckpt))
    _, (weights, state, shapes), full_end, removed, step, masks = written[0]
    (loaded, loaded_state, loaded_shapes), _, end, removed2, step2, masks2 = again[0]
    assert step == step2 == 7 and removed == removed2 and any(removed.values())
    assert masks.keys() == masks2.keys() and weights.keys() == loaded.keys() == end[0].keys()
    for name, mask in masks.items():
        assert torch.equal(mask, masks2[name]), name
    for name, w in weights.items():
        assert torch.equal(loaded[name], w), name
        assert end[0][name].shape == w.shape, name  # trained on with the smaller shapes
        if resumed is None:  # DDP after FSDP2: other float32 reductions
            torch.testing.assert_close(end[0][name], full_end[0][name], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(end[0][name], full_end[0][name]), name
        for key, value in state[name].items():
            assert torch.equal(loaded_state[name][key], value), (name, key)
        if resumed is not None and w.dim() and w.shape[0] > 1:  # each rank its half of the smaller tensor
            assert loaded_shapes[name][0] + again[1][0][2][name][0] == w.shape[0], name
    rows = loaded_shapes["model.patch_embed.proj.weight"][0]  # 64 dense channels; FSDP2: half per rank
    assert rows == weights["model.patch_embed.proj.weight"].shape[0] < 64 if resumed is None else rows < 32


@pytest.mark.parametrize("other", ["ActivationDecay", "GradualMagnitudePruning", "LotteryTicket"])
def test_compress_under_fsdp2_refuses_callbacks_holding_the_old_network(other):
    """The in-fit removal under FSDP2 replaces the network with a new module tree: a callback holding its
    parameters or modules (masks, wrapped activations) is refused at setup by name, not left acting on the
    old tree (KnowledgeDistillation refuses the same from its side, above)."""
    others = {"ActivationDecay": ActivationDecay, "GradualMagnitudePruning": lp.GradualMagnitudePruning,
              "LotteryTicket": lp.LotteryTicket}
    trainer = _fake_trainer("ModelParallelStrategy")
    cb = lp.GroupLassoPruning(compress=True, target_flops=0.5)
    trainer.callbacks = [others[other](), cb]
    with pytest.raises(MisconfigurationException, match=rf"GroupLassoPruning\(compress=True\) cannot share a"
                       rf" fit under ModelParallelStrategy with {other}: .*HINT: compress=False"):
        cb._refuse_stale_holders(trainer)
    ddp = _fake_trainer("DDPStrategy")
    ddp.callbacks = trainer.callbacks
    if other == "LotteryTicket":  # (its rewind snapshot: refused under every strategy, see test_shrink)
        with pytest.raises(MisconfigurationException, match=r"cannot share a fit with LotteryTicket"):
            cb._refuse_stale_holders(ddp)
    else:
        cb._refuse_stale_holders(ddp)  # (under DDP the module tree stays; masks follow the removal)
    trainer.callbacks = [cb, EvolutionaryMutation()]  # (re-selects the parameters at every generation)
    cb._refuse_stale_holders(trainer)


def _ws_compress_fit(root: str, kind: str, ckpt_path: str | None):
    from lightning_prune.graph import frozen_names
    from tests.sharded import ShardedWSClassifier

    cb = lp.GroupLassoPruning(verbose=False, finalize_step=2, round_to=1, compress=True,
                              recalibrate_bn_batches=0, lam=0.05, gate_lr=1.0, target_flops=0.5)
    every = 3 if ckpt_path is None else None
    trainer, weights = _fit_on_two_ranks(kind, [cb], 5, model=ShardedWSClassifier, root=root,
                                         ckpt_path=ckpt_path, checkpoint_every=every)
    return sorted(cb.shrink.frozen), frozen_names(trainer.lightning_module), cb.shrink.removed, weights


@pytest.mark.slow
def test_readers_computing_their_weight_under_fsdp2(tmp_path):
    """Readers that compute their weight (weight standardisation) are frozen before their input channels are
    gated or removed, which is not done on shards: a gate fit on them under FSDP2 is refused at fit start by
    name (before, the gates folded into the raw weights, standardised away); a DDP checkpoint written after
    the in-fit removal resumes under FSDP2 with its readers frozen again on the gathered network (as the
    single-process resume does), to the DDP run's end."""
    with pytest.raises(RuntimeError, match=r"GroupLassoPruning cannot act under ModelParallelStrategy"
                       r" \(FSDP2\) on the groups read by .*compute their weight.*HINT: strategy='ddp'"):
        run_two(_ws_compress_fit, str(tmp_path / "fsdp2"), "fsdp2-full", None)
    written = run_two(_ws_compress_fit, str(tmp_path / "ddp"), "ddp", None)
    ckpt = tmp_path / "ddp" / "ckpt" / "step=3.ckpt"
    again = run_two(_ws_compress_fit, str(tmp_path / "resumed"), "fsdp2-full", str(ckpt))
    (frozen, names, removed, weights), (frozen2, names2, removed2, weights2) = written[0], again[0]
    assert frozen and frozen2 == frozen and names2 == names and removed2 == removed and any(removed.values())
    assert weights.keys() == weights2.keys()
    for name, w in weights.items():
        torch.testing.assert_close(weights2[name], w, rtol=1e-4, atol=1e-5)
