"""Two CPU processes (gloo) for the sharded-training tests: ``run_two(fn, *args)`` runs ``fn(*args)`` in two
processes with the environment Lightning reads when processes are created externally, and returns what each
rank returned (rank order). The processes come from a fork server (``fn`` and ``args`` are pickled:
module-level functions), never from the test process itself: a process forked after autograd ran (any
earlier test's ``backward``) cannot run ``backward`` again ("Unable to handle autograd's threading in
combination with fork-based multiprocessing"). ``ShardedClassifier`` is the tiny ImageClassifier with
``fully_shard`` applied in ``configure_model``."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_prune.testing import TINY_MODELS
from lightning_prune.training.models import ImageClassifier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_two(fn: Callable[..., Any], *args: Any, timeout: float = 240.0) -> list[Any]:
    """``fn(*args)`` on ranks 0 and 1; what each returned, or an AssertionError with each rank's error."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning.pytorch", "timm", "lightning_prune", "tests.sharded"])
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_child, args=(rank, 2, port, out, fn, args)) for rank in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for rank in range(2):
            path = Path(out) / f"rank{rank}.pt"
            if not path.exists():
                raise AssertionError(f"rank {rank} left no result (exit code {procs[rank].exitcode})")
            results.append(torch.load(path, weights_only=False))
    errors = [f"rank {r}: {v}" for r, (kind, v) in enumerate(results) if kind == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [v for _, v in results]


class ShardedClassifier(ImageClassifier):
    """The tiny timm classifier, every block and then the root sharded with FSDP2 in ``configure_model``
    (a plain replicated model when no device mesh is set: DDP)."""

    def __init__(self, model_name: str = "test_vit", **kwargs: Any) -> None:
        defaults = {"optimizer": "sgd", "lr": 0.05, "scheduler": "none", "weight_decay": 0.0}
        super().__init__(model_name, num_classes=10, model_kwargs=dict(TINY_MODELS.get(model_name, {})),
                         **{**defaults, **kwargs})

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for block in getattr(self.model, "blocks", []):
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])


class ShardedWSClassifier(ShardedClassifier):
    """:class:`ShardedClassifier` whose network reads its channels through layers that compute their weight
    (weight-standardised convs, a ``weight_norm`` Linear: ``tests.test_graph_frozen._WSNet``), sharded as one
    FSDP unit."""

    def __init__(self, **kwargs: Any) -> None:
        from tests.test_graph_frozen import _WSNet

        super().__init__("test_resnet", **kwargs)
        torch.manual_seed(0)
        self.model = _WSNet(10)
        self.model.pretrained_cfg = {"input_size": (3, 32, 32)}  # (traced as the network, as timm's are)
        self.example_input_array = None
