"""Evolutionary mutation: SGD interleaved with offspring selection or evolution strategies.

"Spartan training", from the Habr article «Спартанское обучение нейронных сетей» ("Spartan training of neural
networks", in Russian): every few epochs of SGD, breed offspring of the weights by noise (or by
gradient-shaped noise) and either keep the fittest offspring when it beats the parent, or move the parent
along the fitness-weighted noise as in Salimans, Ho, Chen, Sidor, Sutskever, "Evolution Strategies as a
Scalable Alternative to Reinforcement Learning", 2017, arXiv:1703.03864.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_prune.callbacks._resume import resume_loader_position
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.logging import PREFIX, log_histograms, log_scalars
from lightning_prune.callbacks.schedules import steps_per_epoch, training_steps, warn_if_after_training
from lightning_prune.callbacks.sharding import check_sharding
from lightning_prune.callbacks.state import CallbackState, seeded_generator
from lightning_prune.core.sharding import is_sharded, local_slice, local_tensor, reshard
from lightning_prune.core.targets import matches
from lightning_prune.functional.evolution import (
    add_perturbation_,
    es_update_,
    es_weights,
    generation_seed,
    offspring_direction,
    offspring_seed,
)
from lightning_prune.validation import (
    check_bool,
    check_cadence,
    check_choice,
    check_exclusive,
    check_int,
    check_optional,
    check_patterns,
    check_positive,
)

__all__ = ["EvolutionaryMutation"]

_KEY = f"{PREFIX}/evolution"
_MUTATIONS = ("uniform", "gaussian", "gradient")
_STRATEGIES = ("select", "es")
_METRICS = ("loss", "accuracy")
_SHAPINGS = ("centered_rank", "normalized")
_RESPECT = ("callbacks", "zeros", "none")
_NOISE = {"uniform": "uniform", "gaussian": "gaussian", "gradient": "uniform01"}

FitnessFn = Callable[[pl.LightningModule, Any], Tensor]


def _hit(name: str, module_name: str, patterns: list[str]) -> bool:
    return matches(name, patterns) or bool(module_name and matches(module_name, patterns))


class EvolutionaryMutation(CallbackState):
    """SGD interleaved with evolutionary mutation (Habr's "Spartan training"; Salimans et al. 2017).

    Every ``every_n_epochs`` epochs (at the last training batch, before validation) or every
    ``every_n_steps`` optimizer steps (either as a float in (0, 1]: that fraction of the training between two
    generations), ``population`` offspring ``theta_i = theta + s * eps_i`` of the
    current weights are evaluated on a fitness set, and then:

    - ``strategy="select"``: the fittest offspring replaces the parent only if it is strictly fitter than
      the parent on the same batches (the fitness-set loss never goes up);
    - ``strategy="es"``: ``theta <- theta + es_lr / (n sigma) * sum_i F_i eps_i`` with shaped fitness
      (centred ranks or z-scores) and antithetic pairs ``(+eps_k, -eps_k)``.

    Mutations: ``"uniform"`` ``eps ~ U(-1, 1)`` (the Spartan-training article's), ``"gaussian"``
    ``eps ~ N(0, 1)``, and ``"gradient"`` (the article's random-gradient method): ``eps = -g * u`` with ``g``
    the gradient of the fitness-set loss at the parent and ``u ~ U(0, 1)`` elementwise, scaled by
    ``sigma * T`` where the temperature ``T = error_t / error_0`` (clipped to [0, 1]; error = loss, or 1 -
    accuracy) shrinks the steps as fitness improves. With ``"gradient"``, ``sigma`` is a step size like a
    learning rate.

    Offspring are never stored: each perturbation is regenerated from a seed (a per-generation seed from a
    ``torch.Generator`` kept in the callback state, hashed with the offspring's index), so memory is the
    parent copy plus the model itself whatever the population (plus one gradient copy for ``"gradient"``).
    Under DDP the ranks split the population, exchange only fitness scalars (one ``all_gather`` of
    ``population`` floats; the generation seed is broadcast from rank 0) and apply bit-identical updates;
    rank 0's buffers (BatchNorm running statistics) are broadcast first, as DDP does before every forward,
    so that every rank scores offspring with the same model.

    Under ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) every rank holds shards of the weights and
    every forward needs all ranks: each rank writes its part of every offspring (the noise of each tensor
    drawn whole from the shared seed, one tensor at a time, and cut to the rank's shard: exactly its part of
    the unsharded offspring), and the ranks score every offspring together, taking the fitness batches in
    turns and summing the per-batch values in batch order. Fitness, selection and the updated weights are
    those of the DDP run bit for bit. Memory: the parent's shards, plus one whole tensor of noise at a time.
    ``mutation="gradient"`` is refused there at setup (it differentiates the fitness loss outside the
    training step, which FSDP2's hooks do not reduce correctly): use ``"uniform"`` or ``"gaussian"``.

    Fitness: by default the validation set (the dataset behind ``val_dataloader``, read in order with its
    batch size, the same on every rank), first ``fitness_batches`` batches (and no more than an integer
    ``Trainer(limit_val_batches=...)``); or ``fitness_dataloader``.
    Offspring are evaluated in eval mode under ``torch.no_grad`` (BatchNorm running statistics untouched;
    train/eval modes restored afterwards). ``metric="loss"`` (default, what worked in the Spartan-training
    article): fitness is minus the mean cross-entropy of ``pl_module(x)`` against ``y`` for batches
    ``(x, y, ...)``; ``metric="accuracy"``: top-1 accuracy. ``fitness_fn(pl_module, batch) -> loss`` replaces
    the cross-entropy for other models or batch layouts (lower is better; averaged over batches).

    Pruning: weights masked by any :class:`~lightning_prune.callbacks.base.PruningCallback` of the trainer
    (``respect_masks="callbacks"``, read at every generation) stay exactly zero in every offspring and after
    the update; ``"zeros"`` also freezes every exact zero of the mutated parameters (for masks this library
    does not own); ``"none"`` mutates everything.

    Args:
        population: offspring per generation (>= 2; even with antithetic pairs).
        sigma: noise scale (> 0); the step size of the ``"gradient"`` mutation.
        mutation: ``"uniform"``, ``"gaussian"`` or ``"gradient"``.
        strategy: ``"select"`` or ``"es"``.
        every_n_epochs: epochs between generations (default 5, the Spartan-training article's, when
            ``every_n_steps`` is unset), or a float in (0, 1]: that fraction of ``max_epochs`` (at least one
            epoch).
        every_n_steps: optimizer steps between generations instead, or a float in (0, 1]: that fraction of the
            training steps (at least one step).
        fitness_batches: how many batches of the fitness set to use (``None`` = all).
        fitness_dataloader: a DataLoader (or any iterable of batches) to use as the fitness set.
        fitness_fn: ``fitness_fn(pl_module, batch) -> scalar loss`` (lower is better).
        metric: ``"loss"`` or ``"accuracy"`` (only without ``fitness_fn``).
        es_lr: the ES step size ``alpha``.
        fitness_shaping: ``"centered_rank"`` (ranks / (n - 1) - 0.5) or ``"normalized"`` (z-scores).
        antithetic: mirrored pairs ``(+eps, -eps)``; default ``True`` for ``"es"``, ``False`` for
            ``"select"``.
        respect_masks: ``"callbacks"``, ``"zeros"`` or ``"none"`` (see above).
        include: globs over parameter or module names to mutate (default: every floating-point parameter
            that requires grad, BatchNorm affine parameters included; buffers never).
        exclude: globs of parameters or modules to leave alone.
        seed: seeds the generator of generation seeds; ``None`` = ``torch.initial_seed()`` (what
            ``seed_everything`` set), rank zero's under DDP.
        log_media_every_n_epochs: a W&B histogram of the offspring's fitness at the generations of every that
            many epochs (``0`` = only the last generation's, at the end of training; with a WandbLogger).
        verbose: one console line per generation (rank zero).

    Raises:
        MisconfigurationException: bad arguments; no fitness data; nothing to mutate.

    Example::

        trainer = Trainer(callbacks=[EvolutionaryMutation(population=40, sigma=0.01, strategy="select")])
    """

    def __init__(
        self,
        population: int = 40,
        sigma: float = 0.01,
        mutation: str = "uniform",
        strategy: str = "select",
        every_n_epochs: int | float | None = None,
        every_n_steps: int | float | None = None,
        fitness_batches: int | None = 8,
        fitness_dataloader: Iterable[Any] | None = None,
        fitness_fn: FitnessFn | None = None,
        metric: str = "loss",
        es_lr: float = 1e-3,
        fitness_shaping: str = "centered_rank",
        antithetic: bool | None = None,
        respect_masks: str = "callbacks",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        seed: int | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.mutation = check_choice("mutation", mutation, _MUTATIONS)
        self.strategy = check_choice("strategy", strategy, _STRATEGIES)
        self.antithetic = (strategy == "es") if antithetic is None else check_bool("antithetic", antithetic)
        self.population = check_int(
            "population", population, 2, hint="selection and ES both compare at least two offspring.")
        if self.antithetic and population % 2:
            raise MisconfigurationException(
                f"`population` must be even with antithetic pairs (+eps, -eps), got {population}."
                f" HINT: use population={population + 1}, or antithetic=False.")
        self.sigma = check_positive("sigma", sigma,
                                    hint="sigma scales the noise; try 0.01 for weights near 0.1.")
        check_exclusive(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
                        hint="generations come every few epochs or every few steps.")
        self.every_n_steps = check_cadence("every_n_steps", every_n_steps, allow_none=True)
        self.every_n_epochs = None if every_n_steps is not None else check_cadence(
            "every_n_epochs", 5 if every_n_epochs is None else every_n_epochs)
        self.fitness_batches = None if fitness_batches is None else check_int(
            "fitness_batches", fitness_batches, 1, hint="None uses the whole fitness set.")
        if fitness_fn is not None and not callable(fitness_fn):
            raise MisconfigurationException(
                "`fitness_fn` must be callable as fitness_fn(pl_module, batch) -> loss,"
                f" got {type(fitness_fn)}.")
        self.metric = check_choice("metric", metric, _METRICS)
        if fitness_fn is not None and metric != "loss":
            raise MisconfigurationException(
                f"`metric={metric!r}` cannot be combined with `fitness_fn` (which returns a loss)."
                " HINT: compute the metric inside fitness_fn and return something lower-is-better.")
        self.fitness_fn = fitness_fn
        self.fitness_dataloader = fitness_dataloader
        self.es_lr = check_positive("es_lr", es_lr)
        self.fitness_shaping = check_choice("fitness_shaping", fitness_shaping, _SHAPINGS)
        self.respect_masks = check_choice("respect_masks", respect_masks, _RESPECT)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.seed = check_optional(check_int, "seed", seed, 0)
        self.log_media_every_n_epochs = check_int("log_media_every_n_epochs", log_media_every_n_epochs, 0)
        self.verbose = check_bool("verbose", verbose)
        # state (checkpointed)
        self._generator = seeded_generator(self.seed)
        self._seeded = self.seed is not None  # an explicit seed, or one resolved from the trainer
        self._period: tuple[str, int] | None = None  # ("steps" | "epochs", n) once resolved
        self.generation = 0
        self.last_step = 0
        self.initial_error: float | None = None
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.strategy, mutation=self.mutation,
                                        population=self.population, sigma=self.sigma,
                                        include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ what mutates
    def select_parameters(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        """The named parameters that mutate; raises a clear error when nothing matches."""
        chosen = []
        for name, param in pl_module.named_parameters():
            if not (param.is_floating_point() and param.requires_grad):
                continue
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            if self.include and not _hit(name, module_name, self.include):
                continue
            if self.exclude and _hit(name, module_name, self.exclude):
                continue
            chosen.append((name, param))
        if not chosen:
            some = ", ".join(n for n, _ in list(pl_module.named_parameters())[:6])
            raise MisconfigurationException(
                f"EvolutionaryMutation found no parameter to mutate: `include={self.include or 'all'}`"
                f" `exclude={self.exclude}`. Parameters that exist: {some or 'none'}."
                " HINT: patterns are globs over parameter or module names, e.g. include=['*layer4*'].")
        return chosen

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_sharding(trainer, "EvolutionaryMutation", supported=self.mutation != "gradient",
                       why="mutation='gradient' differentiates the fitness loss outside the training step,"
                           " and FSDP2 reaches the sharded parameters only through its own backward hooks"
                           " (tried: the root unit's parameters got wrong gradients); mutation='uniform' or"
                           " 'gaussian' act under ModelParallelStrategy")
        resume_loader_position(trainer)
        if stage == "fit":
            self.select_parameters(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._seeded:  # seed=None: what seed_everything set, rank zero's on every rank
            self._generator = seeded_generator(None, trainer)
            self._seeded = True
        self._period = self._resolve_period(trainer)
        unit, n = self._period
        per_epoch = steps_per_epoch(trainer) if unit == "epochs" else 1
        name = "every_n_epochs" if unit == "epochs" else "every_n_steps"
        fraction_of_epochs = unit == "epochs" and isinstance(self.every_n_epochs, float)
        warn_if_after_training("EvolutionaryMutation", trainer, name, getattr(self, name),
                               None if per_epoch is None else n * per_epoch - 1,
                               "the first generation would come after it, so this is plain SGD",
                               "a fraction in `every_n_epochs` counts trainer.max_epochs, and this fit stops"
                               " sooner (max_steps): give `every_n_steps` as a fraction (of the fit's steps),"
                               " or train longer." if fraction_of_epochs else None)
        if self.fitness_dataloader is None and self._val_source(trainer) is None:
            raise MisconfigurationException(
                "EvolutionaryMutation has no fitness data: the model and datamodule define no"
                " `val_dataloader`"
                " and no `fitness_dataloader` was given."
                " HINT: pass EvolutionaryMutation(fitness_dataloader=DataLoader(...)) or a validation set.")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._due(trainer):
            self.run_generation(trainer, pl_module)

    def _resolve_period(self, trainer: pl.Trainer) -> tuple[str, int]:
        """``("steps", n)`` or ``("epochs", n)``: a fraction becomes that share of the training (>= 1)."""
        if self.every_n_steps is not None:
            n = self.every_n_steps
            if isinstance(n, float):
                total = training_steps(trainer)
                if total is None:
                    raise MisconfigurationException(
                        f"`every_n_steps`={n} is a fraction of training, but this Trainer has no end."
                        " HINT: give an int number of steps.")
                n = max(int(round(n * total)), 1)
            return "steps", int(n)
        n = self.every_n_epochs
        if isinstance(n, float):
            epochs = trainer.max_epochs
            if not epochs or epochs < 0:
                raise MisconfigurationException(
                    f"`every_n_epochs`={n} is a fraction of training, but this Trainer has no max_epochs."
                    " HINT: give an int number of epochs.")
            n = max(int(round(n * epochs)), 1)
        return "epochs", int(n)  # type: ignore[arg-type]

    def _due(self, trainer: pl.Trainer) -> bool:
        unit, n = self._period or self._resolve_period(trainer)
        if unit == "steps":
            step = trainer.global_step
            if step > self.last_step and step % n == 0:
                self.last_step = step
                return True
            return False
        # the last batch of the epoch, before validation runs (and before the epoch's checkpoint is saved)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return bool(last) and (trainer.current_epoch + 1) % n == 0

    # ------------------------------------------------------------------ fitness
    @staticmethod
    def _val_source(trainer: pl.Trainer) -> Any:
        """Where the fit's validation dataloaders come from (Lightning's ``_DataLoaderSource``), or None."""
        source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
        if source is None or source.instance is None or not source.is_defined():
            return None
        return source

    def _fitness_source(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.fitness_dataloader is not None:
            return self.fitness_dataloader
        loaders = trainer.val_dataloaders
        if loaders is None:
            source = self._val_source(trainer)
            loaders = source.dataloader() if source is not None else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        elif isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise MisconfigurationException(
                "EvolutionaryMutation has no fitness data: no validation dataloader."
                " HINT: pass EvolutionaryMutation(fitness_dataloader=DataLoader(...)).")
        dataset = getattr(loaders, "dataset", None)
        if (isinstance(loaders, DataLoader) and loaders.batch_size is not None and dataset is not None
                and not isinstance(dataset, IterableDataset)):
            # the same batches on every rank: bypass the DistributedSampler Lightning may have inserted
            return DataLoader(dataset, batch_size=loaders.batch_size, shuffle=False,
                              collate_fn=loaders.collate_fn, num_workers=0, generator=torch.Generator())
        return loaders

    def fitness_data(self, trainer: pl.Trainer) -> list[Any]:
        """The batches of this generation's fitness set, on the model's device, their floating tensors in the
        precision's input dtype (as Lightning converts training batches: float64 under ``"64-true"``)."""
        cap = self.fitness_batches
        limit = trainer.limit_val_batches
        limited = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
        if self.fitness_dataloader is None and limited:
            cap = limit if cap is None else min(cap, limit)  # the validation data as the trainer limits it
        batches = []
        for i, batch in enumerate(self._fitness_source(trainer)):
            if cap is not None and i >= cap:
                break
            batches.append(trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch)))
        if not batches:
            raise MisconfigurationException(
                "EvolutionaryMutation's fitness set is empty."
                " HINT: check the validation (or fitness) dataloader.")
        return batches

    def _batch_loss(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, int]:
        """(sum of the per-sample values, samples) for one batch; the value is a loss or a correctness."""
        if self.fitness_fn is not None:
            loss = torch.as_tensor(self.fitness_fn(pl_module, batch))
            return loss.reshape(()).to(torch.float64), 1
        if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
            raise MisconfigurationException(
                "EvolutionaryMutation's default fitness needs batches `(x, y, ...)`,"
                f" got a {type(batch).__name__}."
                " HINT: pass fitness_fn=lambda pl_module, batch: <a scalar loss> for other batch layouts.")
        x, y = batch[0], batch[1]
        logits = pl_module(x)
        if self.metric == "accuracy":
            return (logits.argmax(dim=-1) == y).sum().to(torch.float64), y.shape[0]
        return F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64), y.shape[0]

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> float:
        """Fitness of the model's current weights on ``batches`` (higher is better; NaN becomes -inf).

        Sharded (FSDP2: every forward is a collective of all ranks): the ranks score the batches in turns
        (batch ``j`` on rank ``j % world``, a rank short of batches repeating a forward whose value is
        dropped), then exchange the per-batch values and sum them in batch order, as one process does: every
        rank gets the same fitness, bit for bit the unsharded one.
        """
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        sharded = world > 1 and any(is_sharded(p) for p in pl_module.parameters())
        rank = int(trainer.global_rank) if sharded else 0
        step = world if sharded else 1
        rounds = -(-len(batches) // step)
        values = torch.zeros(rounds * step, 2, dtype=torch.float64)
        if sharded:
            reshard(pl_module)  # the next forward gathers the shards as written (not the root's stale copy)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for j in range(rounds):
                index = j * step + rank
                value, n = self._batch_loss(pl_module, batches[index if index < len(batches) else 0])
                if index < len(batches):
                    values[index, 0], values[index, 1] = value.detach().cpu(), n
        if sharded:  # each batch's value is on exactly one rank (the others add zeros: exact)
            import torch.distributed as dist

            values = values.to(trainer.strategy.root_device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values.cpu()
        total, count = values[0, 0], 0
        for index in range(len(batches)):  # in batch order, as the unsharded sum
            total = total if index == 0 else total + values[index, 0]
            count += int(values[index, 1])
        mean = float(total.item()) / max(count, 1)
        fitness = mean if (self.metric == "accuracy" and self.fitness_fn is None) else -mean
        return fitness if math.isfinite(fitness) else -math.inf

    def _error(self, fitness: float) -> float:
        return (1.0 - fitness) if (self.metric == "accuracy" and self.fitness_fn is None) else -fitness

    def _gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[torch.nn.Parameter],
                  batches: list[Any]) -> list[Tensor]:
        """Gradient of the fitness-set loss at the parent (eval mode, not touching ``.grad``)."""
        grads = [torch.zeros_like(p) for p in params]
        with torch.enable_grad(), trainer.precision_plugin.forward_context():
            for batch in batches:
                parts = torch.autograd.grad(self._grad_loss(pl_module, batch) / len(batches), params,
                                            allow_unused=True)
                for g, part in zip(grads, parts):
                    if part is not None:
                        g.add_(part)
        return grads

    def _grad_loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if self.fitness_fn is not None:
            return torch.as_tensor(self.fitness_fn(pl_module, batch)).reshape(())
        x, y = batch[0], batch[1]
        return F.cross_entropy(pl_module(x).float(), y)

    # ------------------------------------------------------------------ masks
    def _masks(self, trainer: pl.Trainer, params: list[Tensor]) -> list[Tensor | None]:
        if self.respect_masks == "none":
            return [None] * len(params)
        by_id: dict[int, Tensor] = {}
        if self.respect_masks in ("callbacks", "zeros"):
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                masks = getattr(callback, "masks", None) if isinstance(callback, PruningCallback) else None
                if masks is None:
                    continue
                for name, mask in masks.items():
                    key = id(masks.param(name))
                    by_id[key] = mask if key not in by_id else by_id[key] & mask
        out: list[Tensor | None] = []
        for p in params:
            mask = by_id.get(id(p))  # (a sharded parameter's mask covers its local shard)
            if self.respect_masks == "zeros":
                nonzero = local_tensor(p).detach() != 0
                mask = nonzero if mask is None else (mask.to(p.device) & nonzero)
            local = local_tensor(p)
            out.append(None if mask is None else mask.to(device=local.device, dtype=local.dtype))
        return out

    # ------------------------------------------------------------------ one generation
    @torch.no_grad()
    def run_generation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Breed, evaluate and select (or ES-update) once; returns the logged metrics."""
        named = self.select_parameters(pl_module)
        params = [p for _, p in named]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # loaders and models must not consume the global RNG
                metrics = self._generation(trainer, pl_module, params)
        finally:
            if any(is_sharded(p) for p in params):
                reshard(pl_module)  # training's next forward gathers the new shards
            for module, training in modes.items():
                module.train(training)
        self.last_metrics = metrics
        self._log(trainer, metrics)
        return metrics

    def _generation(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    params: list[Tensor]) -> dict[str, float]:
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        gen_seed = generation_seed(self._generator)
        if world > 1:
            gen_seed = int(trainer.strategy.broadcast(gen_seed, src=0))
            self._broadcast_buffers(pl_module)
        batches = self.fitness_data(trainer)
        parent_fitness = self.evaluate(trainer, pl_module, batches)
        masks = self._masks(trainer, params)
        kind = _NOISE[self.mutation]
        shape_by, scale = None, self.sigma
        if self.mutation == "gradient":
            if self.initial_error is None:
                self.initial_error = self._error(parent_fitness)
            temperature = self._temperature(parent_fitness)
            scale = self.sigma * temperature
            shape_by = [g.neg_() for g in self._gradient(trainer, pl_module, params, batches)]
        # sharded (FSDP2): every rank writes its shards (the local tensors are the parameters' storage), the
        # noise drawn whole from the shared seed and cut to the shard: its part of the unsharded offspring
        sharded = any(is_sharded(p) for p in params)
        tensors = [local_tensor(p) for p in params]
        shapes = [tuple(p.shape) for p in params] if sharded else None
        cut = (lambda i, noise: local_slice(noise, params[i])) if sharded else None  # noqa: E731
        parent = [t.detach().clone() for t in tensors]

        def offspring(index: int) -> None:
            k, sign = offspring_direction(index, self.antithetic)
            seed = offspring_seed(gen_seed, k)
            add_perturbation_(tensors, parent, seed, sign * scale, kind, shape_by, masks, shapes, cut)

        if sharded:  # every forward needs every rank: all score every offspring, splitting the batches
            fitness = torch.zeros(self.population, dtype=torch.float64)
            for index in range(self.population):
                offspring(index)
                fitness[index] = self.evaluate(trainer, pl_module, batches)
        else:  # the ranks split the population and exchange the fitness scalars
            local = torch.zeros(self.population, dtype=torch.float64)
            for index in range(rank, self.population, world):
                offspring(index)
                local[index] = self.evaluate(trainer, pl_module, batches)
            fitness = self._exchange(trainer, local, world)

        changed = 0.0
        if self.strategy == "select":
            safe = torch.where(torch.isfinite(fitness), fitness, torch.full_like(fitness, -math.inf))
            best = int(torch.argmax(safe).item())  # first of ties
            if float(safe[best]) > parent_fitness:
                offspring(best)
                changed, new_fitness = 1.0, float(safe[best])
            else:
                for p, q in zip(tensors, parent):
                    p.copy_(q)
                new_fitness = parent_fitness
        else:
            weights = es_weights(fitness, self.antithetic, self.fitness_shaping)
            seeds = [offspring_seed(gen_seed, k) for k in range(weights.numel())]
            if scale > 0:
                es_update_(tensors, parent, seeds, weights, scale, self.es_lr, self.population, kind,
                           shape_by, masks, shapes, cut)
            else:  # temperature 0 (a perfect fitness set): the offspring were the parent, nothing to learn
                weights = torch.zeros_like(weights)
                for p, q in zip(tensors, parent):
                    p.copy_(q)
            changed = float(bool((weights != 0).any()))
            new_fitness = self.evaluate(trainer, pl_module, batches)
        parent.clear()  # free the parent copy now (`offspring` above closes over the list)
        self.generation += 1
        finite = fitness[torch.isfinite(fitness)]
        stats = finite if finite.numel() else fitness
        metrics = {
            f"{_KEY}/generation": float(self.generation),
            f"{_KEY}/fitness_min": float(stats.min()),
            f"{_KEY}/fitness_median": float(stats.median()),
            f"{_KEY}/fitness_max": float(stats.max()),
            f"{_KEY}/parent_fitness": parent_fitness,
            f"{_KEY}/new_fitness": new_fitness,
            f"{_KEY}/parent_changed": changed,
            f"{_KEY}/sigma": scale,
        }
        self._fitness_values = fitness
        return metrics

    @staticmethod
    def _broadcast_buffers(pl_module: pl.LightningModule) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward.

        Each rank's last training step updated its running statistics with its own batch; without this the
        ranks would score the same offspring differently.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for buffer in pl_module.buffers():
                dist.broadcast(buffer.data, src=0)

    def _temperature(self, parent_fitness: float) -> float:
        e0, et = self.initial_error, self._error(parent_fitness)
        if e0 is None or not math.isfinite(et) or e0 <= 0:
            return 1.0
        return min(max(et / e0, 0.0), 1.0)

    @staticmethod
    def _exchange(trainer: pl.Trainer, local: Tensor, world: int) -> Tensor:
        """Every rank's fitness scalars to every rank (offspring ``i`` is evaluated by rank ``i % world``)."""
        if world == 1:
            return local
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).cpu()
        gathered = gathered.reshape(world, -1)
        owner = torch.arange(local.numel()) % world
        return gathered[owner, torch.arange(local.numel())].to(torch.float64)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        log_scalars(trainer, metrics)
        n = self.log_media_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._log_fitness_histogram(trainer)
            self._histogram_logged = self.generation
        if self.verbose:
            rank_zero_info(
                f"[EvolutionaryMutation] generation {self.generation} ({self.strategy}, {self.mutation},"
                f" {self.population} offspring): fitness {metrics[f'{_KEY}/parent_fitness']:.4f} ->"
                f" {metrics[f'{_KEY}/new_fitness']:.4f}, offspring max {metrics[f'{_KEY}/fitness_max']:.4f}")

    def _log_fitness_histogram(self, trainer: pl.Trainer) -> None:
        if getattr(self, "_fitness_values", None) is not None:
            values = self._fitness_values[torch.isfinite(self._fitness_values)]
            if values.numel():
                log_histograms(trainer, {f"{_KEY}/fitness": values})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.generation and getattr(self, "_histogram_logged", None) != self.generation:
            self._log_fitness_histogram(trainer)  # the last generation's, unless its epoch already logged it

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._generator.get_state(),
            "seeded": self._seeded,
            "generation": self.generation,
            "last_step": self.last_step,
            "initial_error": self.initial_error,
            "last_metrics": dict(self.last_metrics),
        }

    @override
    def load_extra_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"].to(torch.uint8).cpu())
            self._seeded = bool(state_dict.get("seeded", True))
        self.generation = int(state_dict.get("generation", 0))
        self.last_step = int(state_dict.get("last_step", 0))
        initial = state_dict.get("initial_error")
        self.initial_error = None if initial is None else float(initial)
        self.last_metrics = dict(state_dict.get("last_metrics", {}))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = bytes(self._generator.get_state().tolist())  # plain bytes: no shared memory
        state["_fitness_values"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.tensor(list(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "_generator": generator})
