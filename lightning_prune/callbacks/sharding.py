"""Which callbacks act under which sharded strategy, checked at setup so that none is silently a no-op.

Under Lightning's ``ModelParallelStrategy`` (PyTorch's FSDP2: ``fully_shard`` applied in the LightningModule's
``configure_model``) every parameter becomes a ``DTensor`` shard. The callbacks that say so
(``supports_sharding = True``: :class:`~lightning_prune.GradualMagnitudePruning`,
:class:`~lightning_prune.LotteryTicket`, and the gate callbacks :class:`~lightning_prune.GroupLassoPruning`
and :class:`~lightning_prune.L0Pruning`, whose gates are replicated) hold their masks on the shards; every
other callback refuses the strategy at setup, naming it and what to do. ``FSDPStrategy`` (FSDP1:
flat parameters) and tensor parallelism (``tensor_parallel_size > 1``) are refused by every callback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["FSDP1_STRATEGIES", "SHARDED_STRATEGY", "SUPPORTED", "check_sharding",
           "guard_distributed_checkpoints", "tensor_parallel_size"]

#: strategies that flatten parameters into FSDP1 ``FlatParameter`` shards: refused by every callback
FSDP1_STRATEGIES = ("FSDPStrategy", "XLAFSDPStrategy")
#: Lightning's FSDP2 strategy (``fully_shard`` in ``configure_model``)
SHARDED_STRATEGY = "ModelParallelStrategy"

#: the callbacks that act under ModelParallelStrategy (FSDP2), for the messages
SUPPORTED = ("GradualMagnitudePruning", "LotteryTicket", "GroupLassoPruning", "L0Pruning",
             "KnowledgeDistillation", "ActivationDecay", "EvolutionaryMutation (uniform and gaussian noise)",
             "the baselines plugin's RandomUnstructured, RandomChannels and FirstKChannels")

_FSDP2_HINT = ("ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with"
               " torch.distributed.fsdp.fully_shard applied in the LightningModule's configure_model (FSDP2)")


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (``"auto"`` is the number of processes per
    node, Lightning's rule)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if size == "auto":
        size = getattr(strategy, "num_processes", 1)
    return int(size)


def guard_distributed_checkpoints(strategy: Any) -> None:
    """Make ``strategy`` (not ModelParallelStrategy) refuse a sharded checkpoint of ModelParallelStrategy (a
    directory of ``torch.distributed.checkpoint`` shards) with the reason and what to do, instead of failing
    to open a directory. A full-state checkpoint (one file) of either strategy resumes under the other."""
    load = getattr(strategy, "load_checkpoint", None)
    if load is None or getattr(strategy, "_lightning_prune_guards_dcp", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = Path(str(checkpoint_path))
        if path.is_dir() and (path / ".metadata").exists():
            raise MisconfigurationException(
                f"{str(checkpoint_path)!r} is a sharded (distributed) checkpoint of {SHARDED_STRATEGY}"
                f" (FSDP2), a directory of shards: {type(strategy).__name__} reads one-file checkpoints"
                f" only. HINT: resume it under {SHARDED_STRATEGY}, or write full-state checkpoints"
                f" ({SHARDED_STRATEGY}(save_distributed_checkpoint=False)), which resume under DDP and a"
                f" single device (and a DDP checkpoint resumes under {SHARDED_STRATEGY}).")
        return load(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint
    strategy._lightning_prune_guards_dcp = True


def check_sharding(trainer: Any, who: str, supported: bool, why: str | None = None) -> None:
    """Raise a ``MisconfigurationException`` at setup when ``who`` cannot act under the Trainer's strategy.

    Args:
        trainer: the Trainer (``None``: nothing to check).
        who: the callback's name, for the message.
        supported: whether ``who`` works on FSDP2 shards (``ModelParallelStrategy`` with data parallelism).
        why: what ``who`` needs that shards do not give (said when it refuses FSDP2).
    """
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if name != SHARDED_STRATEGY:
        guard_distributed_checkpoints(strategy)
    if name in FSDP1_STRATEGIES:
        hint = (f"use {_FSDP2_HINT}, or strategy='ddp'." if supported else
                 f"use strategy='ddp' (or a single device): {who} does not run on sharded weights yet.")
        raise MisconfigurationException(
            f"{who} does not run under {name} (FSDP1): its flattened parameter shards hide the weights the"
            f" callback acts on. HINT: {hint}")
    if name != SHARDED_STRATEGY:
        return
    tp = tensor_parallel_size(strategy)
    if tp > 1:
        raise MisconfigurationException(
            f"{who} does not support tensor parallelism under {name} (tensor_parallel_size={tp}): a weight"
            " split across the tensor-parallel ranks cannot be scored or masked whole. HINT: use"
            f" {_FSDP2_HINT}; with tensor_parallel_size='auto' (the default) Lightning makes every device"
            " tensor-parallel, so set data_parallel_size to the number of devices.")
    if not supported:
        raise MisconfigurationException(
            f"{who} cannot act under {name} (FSDP2) yet: "
            + (why or "it would not see the sharded weights and would run without effect") + ". HINT:"
            " use strategy='ddp' (or a single device); under ModelParallelStrategy the"
            " supported callbacks are listed in the README's 'Sharded training' section"
            f" ({', '.join(SUPPORTED)}).")
